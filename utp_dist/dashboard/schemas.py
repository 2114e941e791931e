"""Request and response bodies of the API (apart from the table models, so the wire format is stated on its own).

Every request body is bounded to what the database can store, so junk input is a 422 naming the field, never a 500
from the database: integers fit PostgreSQL's INTEGER, strings fit their columns and hold no NUL character, numbers
are finite, names are not blank.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

MAX_INT = 2**31 - 1  # PostgreSQL's INTEGER, the narrowest column ids and counts live in
MAX_GPUS = 64  # GPUs of one machine, or of one job
MAX_LISTED = 10_000  # ids in one request (refused jobs, held jobs): well below the databases' bound-parameter limits

Id = Annotated[int, Field(ge=1, le=MAX_INT)]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
Int = Annotated[int, Field(ge=-MAX_INT - 1, le=MAX_INT)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Host = Annotated[str, Field(max_length=255)]


def problem(errors: list[dict]) -> str:
    """One line for a list of validation errors: where the first is and what is wrong (`body.priority: Input should be ...`)."""
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return " ".join(f"{where}: {first.get('msg', 'invalid')}{more}".split())


def _storable(value: Any, where: str = "") -> None:
    """ValueError when a string (or key) anywhere in `value` holds a NUL character or a number is NaN or infinite."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where or 'the value'} contains a NUL character")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where or 'the value'} is not a finite number")
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable(key, where)
            _storable(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _storable(item, f"{where}[{i}]" if where else f"[{i}]")


class In(BaseModel):
    """A request body: no NUL character in any string (PostgreSQL cannot store one), no NaN or infinity (JSON has none)."""

    @field_validator("*", mode="after")
    @classmethod
    def storable(cls, value: Any) -> Any:
        _storable(value)
        return value


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ProjectIn(In):
    name: Name
    description: str = ""


class ProjectPatch(In):
    name: Name | None = None
    description: str | None = None
    archived: bool | None = None


class ProjectOut(Out):
    id: int
    name: str
    description: str
    archived: bool = False
    created: float


class ConfigIn(In):
    """A config: its sections as a mapping (`config`) or the text of a config file (`yaml`), one of the two."""

    project_id: Id
    name: Name
    config: dict[str, Any] | None = None
    yaml: str | None = None
    description: str = Field(default="", max_length=10_000)


class ConfigOut(Out):
    id: int
    project_id: int
    name: str
    config: dict[str, Any]
    config_hash: str
    description: str = ""
    archived: bool = False
    created: float


class ConfigVersionIn(In):
    """An edited config: stored as a new version next to the old one (runs queued from the old one keep it)."""

    config: dict[str, Any] | None = None
    yaml: str | None = None
    description: str | None = Field(default=None, max_length=10_000)


class ConfigPatch(In):
    """What may change on a stored config without making it another config: its description, whether it is archived."""

    description: str | None = Field(default=None, max_length=10_000)
    archived: bool | None = None


Tag = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[^,\s][^,]*$")]


class RunPatch(In):
    """What users add to a run (every field optional; "" clears a display name or notes)."""

    display_name: str | None = Field(default=None, max_length=255)
    notes: str | None = Field(default=None, max_length=100_000)
    tags: list[Tag] | None = Field(default=None, max_length=50, description="the run's tags, replacing the ones it has")
    add_tags: list[Tag] = Field(default=[], max_length=50)
    remove_tags: list[Tag] = Field(default=[], max_length=50)
    archived: bool | None = None


class CloneIn(In):
    """A new run from a run's config with some keys changed (dotted keys: {"optim.lr": 0.001}), queued like any other."""

    overrides: dict[Annotated[str, StringConstraints(min_length=1, max_length=200)], Any] = Field(default={}, max_length=200)
    name: Name | None = Field(default=None, description="the stored config's name; default: clone of run N")
    dry_run: bool = Field(default=False, description="validate and show the changes only (the editor checks as the user types)")
    gpus: int = Field(default=0, ge=0, le=MAX_GPUS)
    priority: Int = 0
    max_attempts: int = Field(default=3, ge=1, le=100)


class BulkTags(In):
    """Tags added to and removed from many runs at once (the run table's bulk action)."""

    run_ids: list[Id] = Field(min_length=1, max_length=MAX_LISTED)
    add: list[Tag] = Field(default=[], max_length=50)
    remove: list[Tag] = Field(default=[], max_length=50)


class QueueIn(In):
    """How to queue a run of a config (every field optional: a CPU job of priority 0)."""

    gpus: int = Field(default=0, ge=0, le=MAX_GPUS)
    priority: Int = 0
    max_attempts: int = Field(default=3, ge=1, le=100)


class QueueOut(BaseModel):
    run_id: int
    job_id: int
    state: str


class JobOut(Out):
    id: int
    run_id: int
    state: str
    gpus: int
    priority: int
    attempt: int
    max_attempts: int
    failures: int = 0
    """Failed exits and lost leases so far; a lost lease requeues the job while failures < max_attempts."""
    lease_expires: float | None
    agent_id: int | None
    reason: str | None
    created: float
    updated: float


class RunOut(Out):
    id: int
    project_id: int | None
    config_id: int | None
    source: str
    state: str
    root: str | None
    dataset: str | None
    name: str | None
    config_hash: str | None
    sweep_id: int | None
    attempts: int
    restarts: int
    agent_id: int | None
    pid: int | None
    slurm_job: str | None
    epoch: int | None
    step: int | None
    best_metric: str | None
    best: float | None
    img_per_s: float | None
    error: str | None
    display_name: str | None = None
    notes: str | None = None
    archived: bool = False
    created: float
    updated: float


class RunRow(RunOut):
    """A row of the run table: the run, its tags, its project's and sweep's names, and the values of the columns asked."""

    tags: list[str] = []
    project: str | None = None
    sweep: str | None = None
    values: dict[str, Any] = {}


class RunDetail(RunOut):
    """A run with what its folder says: resolved config, progress, summary, and its queue entries."""

    config: dict[str, Any] | None = None
    progress: dict[str, Any] = {}
    summary: dict[str, Any] | None = None
    paths: dict[str, str | None] = {}
    jobs: list[JobOut] = []
    log_tail: str | None = None
    """What the agent running it last saw its training process print."""
    tags: list[str] = []
    sweep_task: dict[str, Any] | None = None
    """The sweep task that trained it, when one did: sweep folder and id, task index, job id, host, pid, attempts."""


class StateChangeOut(BaseModel):
    run_id: int
    job_id: int
    state: str


class GpuIn(In):
    agent_id: Id
    index: int = Field(ge=0, lt=MAX_GPUS)
    name: str = Field(default="", max_length=200)
    memory_mb: Count = 0


class GpuOut(Out):
    id: int
    agent_id: int
    index: int
    name: str
    memory_mb: int
    util: float | None = None
    memory_used_mb: int | None = None


class AgentIn(In):
    name: Name
    host: Host = ""


class AgentPatch(In):
    host: Host | None = None
    drain: bool | None = None
    archived: bool | None = None


class AgentOut(Out):
    id: int
    name: str
    host: str
    last_heartbeat: float | None
    drain: bool
    archived: bool = False
    created: float
    gpus: list[GpuOut] = []


class SweepOut(Out):
    id: int
    folder: str
    name: str
    executor: str
    tasks: int
    created: float


class StudyOut(BaseModel):
    """A search's study: its metric and rungs, the space, one row per trial, and parameter importances."""

    metric: str
    mode: str
    method: str
    budget: int
    rungs: list[int]
    params: list[dict[str, Any]]
    trials: list[dict[str, Any]]
    """number, state, rung reached (0: none yet), its epochs and value there, values per rung, params, attempts, error,
    logs, run, curve ({x: epochs from 1, y: the metric})"""
    importances: dict[str, float] | None
    importance_note: str


class SweepBoard(SweepOut):
    rows: list[dict[str, Any]]
    leaderboard_columns: list[str]
    leaderboard: list[dict[str, Any]]
    seed_groups: list[dict[str, Any]]
    study: StudyOut | None = None
    """a search's trials (its rows are its workers)"""
    error: str | None = None


class ResubmitOut(BaseModel):
    exit_code: int
    message: str


# --- what agents send and get back


class GpuReport(In):
    index: int = Field(ge=0, lt=MAX_GPUS)
    name: str = Field(default="", max_length=200)
    memory_mb: Count = 0


class RegisterIn(In):
    """An agent announcing itself: its name (unique), host, GPU inventory, and whether it starts drained."""

    name: Name
    host: Host = ""
    gpus: list[GpuReport] = Field(default=[], max_length=MAX_GPUS)
    drain: bool = False

    @field_validator("gpus")
    @classmethod
    def distinct(cls, gpus: list[GpuReport]) -> list[GpuReport]:
        indices = [g.index for g in gpus]
        twice = sorted({i for i in indices if indices.count(i) > 1})
        if twice:
            raise ValueError(f"GPU index {twice[0]} is listed twice; each GPU once, by its CUDA index")
        return gpus


class RegisterOut(BaseModel):
    agent_id: int
    lease_seconds: float
    heartbeat_seconds: float
    """How often to heartbeat: a third of the lease, so two lost heartbeats do not yet cost the job."""


class HeldJob(In):
    job_id: Id
    attempt: Count


class GpuUsage(In):
    index: Count
    util: float | None = Field(default=None, ge=0, le=100)
    memory_used_mb: Count | None = None


class HeartbeatIn(In):
    jobs: list[HeldJob] = Field(default=[], max_length=MAX_LISTED)
    gpus: list[GpuUsage] = Field(default=[], max_length=MAX_LISTED)
    """What each of the agent's GPUs is doing now, as NVML reports it (utilisation %, memory in use)."""
    name: str | None = Field(default=None, max_length=200)
    """The agent's name: a database that was reset may give its id to another agent, and then this one must register again."""


class HeartbeatOut(BaseModel):
    drain: bool
    abort: list[int]
    """Jobs a user asked to stop (state stopping): send SIGTERM, the run saves and exits 75."""
    lost: list[int]
    """Jobs this agent no longer holds (its lease expired, or they were cancelled): kill their processes now."""
    unknown: list[int] = []
    """Jobs the server has no row for (its database was reset): let them finish; their runs are indexed from their folders."""


class ClaimIn(In):
    agent_id: Id
    free_gpus: Count = 0
    cpu: bool = True
    """Whether the agent can take a CPU job (gpus = 0) now."""
    refused: list[Id] = Field(default=[], max_length=MAX_LISTED)
    """Jobs this agent refused before (it cannot run them): never offered to it again."""


class RunFolder(In):
    root: str = Field(min_length=1, max_length=1000)
    dataset: str = Field(min_length=1, max_length=255)
    name: str = Field(min_length=1, max_length=255)


class ClaimedJob(BaseModel):
    job_id: int
    run_id: int
    attempt: int
    gpus: int
    config_name: str
    config: dict[str, Any]
    run_folder: RunFolder | None
    """The run folder an earlier attempt made: continue it (checkpoint.resume at it) when it has a complete state."""
    lease_seconds: float


class ClaimOut(BaseModel):
    job: ClaimedJob | None


class AgentCall(In):
    """Every call about a held job names the agent and the attempt it claimed (the fencing token)."""

    agent_id: Id
    attempt: Count


class StartIn(AgentCall):
    pid: Count


class ProgressIn(AgentCall):
    run_folder: RunFolder | None = None
    epoch: Count | None = None
    step: Count | None = None
    best_metric: str | None = Field(default=None, max_length=64)
    best: float | None = None
    img_per_s: float | None = None
    restarts: Count | None = None
    log_tail: str | None = None


class FinishIn(AgentCall):
    exit_code: Int
    error: str | None = None
    """The one line `utp_dist: error: ...` the CLI printed last (exit code 2)."""
    log_tail: str | None = None


class RefuseIn(AgentCall):
    reason: str = Field(min_length=1, max_length=2000)


class RunStateOut(BaseModel):
    state: str
    restarts: int
    attempts: int


class AgentTokenIn(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="what the token is for, e.g. the agent's machine")


class AgentTokenOut(Out):
    """An agent token as listed: never its secret (only a hash of it is stored)."""

    id: int
    name: str
    created: float


class AgentTokenCreated(AgentTokenOut):
    token: str = Field(description="the secret, shown this once: give it to the agent as --token or UTP_DASHBOARD_TOKEN")
