"""Request and response bodies of the API (apart from the table models, so the wire format is stated on its own)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ProjectIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    description: str = ""


class ProjectPatch(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = None


class ProjectOut(Out):
    id: int
    name: str
    description: str
    created: float


class ConfigIn(BaseModel):
    """A config: its sections as a mapping (`config`) or the text of a config file (`yaml`), one of the two."""

    project_id: int
    name: str = Field(min_length=1, max_length=200)
    config: dict[str, Any] | None = None
    yaml: str | None = None


class ConfigOut(Out):
    id: int
    project_id: int
    name: str
    config: dict[str, Any]
    config_hash: str
    created: float


class QueueIn(BaseModel):
    """How to queue a run of a config (every field optional: a CPU job of priority 0)."""

    gpus: int = Field(default=0, ge=0, le=64)
    priority: int = 0
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
    created: float
    updated: float


class RunDetail(RunOut):
    """A run with what its folder says: resolved config, progress, summary, and its queue entries."""

    config: dict[str, Any] | None = None
    progress: dict[str, Any] = {}
    summary: dict[str, Any] | None = None
    paths: dict[str, str | None] = {}
    jobs: list[JobOut] = []
    log_tail: str | None = None
    """What the agent running it last saw its training process print (issue 12)."""
    sweep_task: dict[str, Any] | None = None
    """The sweep task that trained it, when one did: sweep folder and id, task index, job id, host, pid, attempts."""


class StateChangeOut(BaseModel):
    run_id: int
    job_id: int
    state: str


class GpuIn(BaseModel):
    agent_id: int
    index: int = Field(ge=0)
    name: str = ""
    memory_mb: int = Field(default=0, ge=0)


class GpuOut(Out):
    id: int
    agent_id: int
    index: int
    name: str
    memory_mb: int


class AgentIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    host: str = ""


class AgentPatch(BaseModel):
    host: str | None = None
    drain: bool | None = None


class AgentOut(Out):
    id: int
    name: str
    host: str
    last_heartbeat: float | None
    drain: bool
    created: float
    gpus: list[GpuOut] = []


class SweepOut(Out):
    id: int
    folder: str
    name: str
    executor: str
    tasks: int
    created: float


class SweepBoard(SweepOut):
    rows: list[dict[str, Any]]
    leaderboard_columns: list[str]
    leaderboard: list[dict[str, Any]]
    seed_groups: list[dict[str, Any]]
    error: str | None = None


class ResubmitOut(BaseModel):
    exit_code: int
    message: str


# --- what agents send and get back (issue 12)


class GpuReport(BaseModel):
    index: int = Field(ge=0)
    name: str = ""
    memory_mb: int = Field(default=0, ge=0)


class RegisterIn(BaseModel):
    """An agent announcing itself: its name (unique), host, GPU inventory, and whether it starts drained."""

    name: str = Field(min_length=1, max_length=200)
    host: str = ""
    gpus: list[GpuReport] = []
    drain: bool = False


class RegisterOut(BaseModel):
    agent_id: int
    lease_seconds: float
    heartbeat_seconds: float
    """How often to heartbeat: a third of the lease, so two lost heartbeats do not yet cost the job."""


class HeldJob(BaseModel):
    job_id: int
    attempt: int


class HeartbeatIn(BaseModel):
    jobs: list[HeldJob] = []
    name: str | None = None
    """The agent's name: a database that was reset may give its id to another agent, and then this one must register again."""


class HeartbeatOut(BaseModel):
    drain: bool
    abort: list[int]
    """Jobs a user asked to stop (state stopping): send SIGTERM, the run saves and exits 75."""
    lost: list[int]
    """Jobs this agent no longer holds (its lease expired, or they were cancelled): kill their processes now."""
    unknown: list[int] = []
    """Jobs the server has no row for (its database was reset): let them finish; their runs are indexed from their folders."""


class ClaimIn(BaseModel):
    agent_id: int
    free_gpus: int = Field(default=0, ge=0)
    cpu: bool = True
    """Whether the agent can take a CPU job (gpus = 0) now."""
    refused: list[int] = []
    """Jobs this agent refused before (it cannot run them): never offered to it again."""


class RunFolder(BaseModel):
    root: str
    dataset: str
    name: str


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


class AgentCall(BaseModel):
    """Every call about a held job names the agent and the attempt it claimed (the fencing token)."""

    agent_id: int
    attempt: int


class StartIn(AgentCall):
    pid: int


class ProgressIn(AgentCall):
    run_folder: RunFolder | None = None
    epoch: int | None = None
    step: int | None = None
    best_metric: str | None = None
    best: float | None = None
    img_per_s: float | None = None
    restarts: int | None = None
    log_tail: str | None = None


class FinishIn(AgentCall):
    exit_code: int
    error: str | None = None
    """The one line `utp_dist: error: ...` the CLI printed last (exit code 2)."""
    log_tail: str | None = None


class RefuseIn(AgentCall):
    reason: str = Field(min_length=1, max_length=2000)


class RunStateOut(BaseModel):
    state: str
    restarts: int
    attempts: int
