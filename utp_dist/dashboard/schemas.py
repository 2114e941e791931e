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
