"""Tables (SQLAlchemy 2 typed models), the one engine and sessionmaker, and the session dependency."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, create_engine, event, false
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from utp_dist import states
from utp_dist.errors import UserError, first_line

SQLITE_BUSY_TIMEOUT_MS = 10_000


def now() -> float:
    """The server's clock (seconds since the epoch): leases and heartbeats are compared on it, never an agent's."""
    return time.time()


class Base(DeclarativeBase):
    """The declarative base of every table."""


class Project(Base):
    """A group of configs and the runs queued from them."""

    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    archived: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created: Mapped[float] = mapped_column(Float, default=now)
    configs: Mapped[list[ConfigRow]] = relationship(back_populates="project", cascade="all, delete-orphan")


class ConfigRow(Base):
    """A config as the user gave it (validated before it is stored) and the fingerprint of its resolved form."""

    __tablename__ = "configs"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_hash: Mapped[str] = mapped_column(String(64), index=True)
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    archived: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created: Mapped[float] = mapped_column(Float, default=now)
    project: Mapped[Project] = relationship(back_populates="configs")


class Agent(Base):
    """A machine that runs queued jobs (an agent): its heartbeat and whether it takes new work."""

    __tablename__ = "agents"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    last_heartbeat: Mapped[float | None] = mapped_column(Float, nullable=True)
    drain: Mapped[bool] = mapped_column(Boolean, default=False)
    # put away by the user: off the agents page's default list, and it claims nothing (as drained) until unarchived
    archived: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created: Mapped[float] = mapped_column(Float, default=now)
    gpus: Mapped[list[Gpu]] = relationship(back_populates="agent", cascade="all, delete-orphan", order_by="Gpu.index")


class Gpu(Base):
    """One GPU of an agent, as its inventory reports it."""

    __tablename__ = "gpus"
    __table_args__ = (UniqueConstraint("agent_id", "index", name="uq_gpus_agent_index"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200), default="")
    memory_mb: Mapped[int] = mapped_column(Integer, default=0)
    util: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Utilisation in % at the agent's latest heartbeat (None: never reported, or the driver did not say)."""
    memory_used_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Memory in use at the agent's latest heartbeat."""
    agent: Mapped[Agent] = relationship(back_populates="gpus")


class Run(Base):
    """A run: queued here (config_id set) or found on disk by the indexer (folder set), or both once a queued run writes its folder."""

    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("root", "dataset", "name", name="uq_runs_folder"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="SET NULL"), nullable=True, index=True)
    config_id: Mapped[int | None] = mapped_column(ForeignKey("configs.id", ondelete="SET NULL"), nullable=True)
    source: Mapped[str] = mapped_column(String(16), default="queue")  # queue | disk
    state: Mapped[str] = mapped_column(String(16), default=states.QUEUED, index=True)
    # the run folder (utp_dist.store.run_dir.RunDir(root, dataset, name)); null until a queued run made it
    root: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    dataset: Mapped[str | None] = mapped_column(String(255), nullable=True)
    name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    config_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # the sweep whose ledger has a task for this run (same output root, name and config fingerprint)
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("sweeps.id", ondelete="SET NULL"), nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id", ondelete="SET NULL"), nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    slurm_job: Mapped[str | None] = mapped_column(String(64), nullable=True)
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    best_metric: Mapped[str | None] = mapped_column(String(64), nullable=True)
    best: Mapped[float | None] = mapped_column(Float, nullable=True)
    img_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # what an agent last saw its training process print (a queued run's folder may have no log of its own)
    log_tail: Mapped[str | None] = mapped_column(Text, nullable=True)
    # the indexer's bookkeeping: the newest mtime among the run's files when it last read them
    indexed_mtime: Mapped[float | None] = mapped_column(Float, nullable=True)
    # what users add: a name shown instead of the folder's, free notes, and archived runs leave the default lists
    display_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    archived: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false(), index=True)
    created: Mapped[float] = mapped_column(Float, default=now, index=True)
    updated: Mapped[float] = mapped_column(Float, default=now, onupdate=now)
    project: Mapped[Project | None] = relationship()
    tags: Mapped[list[RunTag]] = relationship(cascade="all, delete-orphan", order_by="RunTag.tag", passive_deletes=True)
    jobs: Mapped[list[Job]] = relationship(back_populates="run", cascade="all, delete-orphan", order_by="Job.id")


class RunValue(Base):
    """One config key or metric of a run, narrow so that the run table filters and sorts on any of them in SQL.

    `num` holds numbers and booleans (1/0), `text` the value as shown (strings, lists as JSON); the indexes on
    (key, num, run_id) and (key, text, run_id) answer `optim.lr < 0.003` or a sort by `val_acc@1` without reading every run.
    """

    __tablename__ = "run_values"
    # WITHOUT ROWID on SQLite: the rows lie in (run_id, key) order, so a sort's lookup of one key per run reads no second b-tree
    __table_args__ = (
        Index("ix_run_values_key_num", "key", "num", "run_id"),
        Index("ix_run_values_key_text", "key", "text", "run_id"),
        {"sqlite_with_rowid": False},
    )
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    num: Mapped[float | None] = mapped_column(Float, nullable=True)
    text: Mapped[str | None] = mapped_column(String(500), nullable=True)


class RunTag(Base):
    """A tag on a run (a user's label: baseline, keep, broken-data...)."""

    __tablename__ = "run_tags"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class Job(Base):
    """A queue entry: one attempt-counted claim on a run. Every state change is a compare-and-swap on (state, attempt)."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=states.QUEUED, index=True)
    gpus: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # the fencing token: +1 on every claim
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    # failed exits and lost leases: what max_attempts limits (a user's stop and resume costs nothing)
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_expires: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id", ondelete="SET NULL"), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[float] = mapped_column(Float, default=now, index=True)
    updated: Mapped[float] = mapped_column(Float, default=now, onupdate=now)
    run: Mapped[Run] = relationship(back_populates="jobs")


class AgentToken(Base):
    """A credential for agents only (see tokens.py): its name and the SHA-256 of its secret, never the secret itself."""

    __tablename__ = "agent_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[float] = mapped_column(Float, default=now)


class Sweep(Base):
    """A sweep ledger found under an output root (OUTPUT_ROOT/sweeps/NAME/sweep.json)."""

    __tablename__ = "sweeps"
    id: Mapped[int] = mapped_column(primary_key=True)
    folder: Mapped[str] = mapped_column(String(1000), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    executor: Mapped[str] = mapped_column(String(32), default="")
    tasks: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[float] = mapped_column(Float, default=now)
    indexed_mtime: Mapped[float | None] = mapped_column(Float, nullable=True)


class Database:
    """The engine and the one sessionmaker of the app."""

    def __init__(self, url: str):
        sqlite = url.startswith("sqlite")
        try:
            self.engine: Engine = create_engine(url, connect_args={"check_same_thread": False} if sqlite else {}, pool_pre_ping=not sqlite)
        except (ArgumentError, NoSuchModuleError, ImportError) as err:
            shown = re.sub(r"//[^@/]*@", "//***@", url)  # never print a password
            raise UserError(
                f"--db {shown!r} is not a usable database URL ({first_line(err)}); e.g. sqlite:///dash.db or postgresql+psycopg://..."
            ) from None
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        name = make_url(url).database if sqlite else None
        self.file = Path(name).resolve() if name and name != ":memory:" else None
        self.file_id: tuple[int, int] | None = None

    def watch_file(self) -> None:
        """Remember which SQLite file this is (once it exists), for file_deleted()."""
        self.file_id = _file_id(self.file)

    def file_deleted(self) -> bool:
        """Whether the SQLite file is gone or was replaced since watch_file(): open connections would go on writing into
        an unlinked file, answering 200 for writes nobody will ever read."""
        return self.file_id is not None and _file_id(self.file) != self.file_id

    def reopen(self) -> None:
        """Drop every connection to the old file and start a new one (the caller migrates it); its leftover WAL is not ours."""
        self.engine.dispose()
        if not self.file.exists():
            for leftover in (self.file.with_name(self.file.name + "-wal"), self.file.with_name(self.file.name + "-shm")):
                leftover.unlink(missing_ok=True)
        with self.engine.connect():  # creates the file
            pass
        self.watch_file()

    def session(self) -> Iterator[Session]:
        """One session per request (the FastAPI dependency behind get_session)."""
        with self.sessions() as session:
            yield session


def _file_id(path: Path | None) -> tuple[int, int] | None:
    try:
        stat = os.stat(path) if path is not None else None
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino) if stat else None


def _sqlite_pragmas(connection, _record) -> None:
    # WAL lets the indexer write while pages read; the busy timeout makes a writer wait instead of failing at once
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
