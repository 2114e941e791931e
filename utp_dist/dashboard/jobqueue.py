"""What agents do with the queue: register, heartbeat, claim, start, report, finish, refuse; and the reaper.

Claiming is one atomic statement; every later change of a job goes through `swap`, a compare-and-swap on
(state, attempt). The attempt number is the agent's fencing token: once a lease expired and the job was requeued
(attempt + 1 on the next claim), whatever the old holder still sends changes nothing and is answered 409.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from sqlalchemy import delete, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from utp_dist import states
from utp_dist.dashboard.db import Agent, ConfigRow, Gpu, Job, Run, now
from utp_dist.dashboard.services import Conflict, NotFound, found, get_run, latest_job
from utp_dist.errors import EXIT_USER_ERROR

HELD = (states.CLAIMED, states.RUNNING, states.STOPPING)  # the states in which a job belongs to an agent
LOG_TAIL_CHARS = 8000
PROGRESS_FIELDS = ("epoch", "step", "best_metric", "best", "img_per_s", "restarts", "log_tail")


def register(session: Session, name: str, host: str, gpus: list[dict], drain: bool, lease_s: float) -> Agent:
    """Create the agent called `name`, or take over the row of one that stopped heartbeating: its host, GPUs and heartbeat.

    While an agent of that name heartbeats (within the lease) a second one is refused (409): two processes sharing one
    row would renew and lose each other's jobs.
    """
    agent = session.scalar(select(Agent).where(Agent.name == name))
    if agent is None:
        agent = Agent(name=name, host=host)
        session.add(agent)
        try:
            session.flush()
        except IntegrityError:  # the same name registered concurrently: that one is alive
            session.rollback()
            raise Conflict(f"--name {name}: another agent registered that name at the same moment; give this one another --name") from None
    elif agent.last_heartbeat is not None and now() - agent.last_heartbeat < lease_s:
        age = now() - agent.last_heartbeat
        raise Conflict(
            f"--name {name}: an agent of that name is running on {agent.host or 'another host'} (heartbeat {age:.0f} s ago); "
            f"give this one another --name, or start it again once that one has been silent for {lease_s:.0f} s"
        )
    agent.host, agent.last_heartbeat = host, now()
    agent.drain = agent.drain or drain
    session.execute(delete(Gpu).where(Gpu.agent_id == agent.id))
    session.add_all(Gpu(agent_id=agent.id, index=g["index"], name=g.get("name", ""), memory_mb=g.get("memory_mb", 0)) for g in gpus)
    session.commit()
    session.refresh(agent)
    return agent


def heartbeat(
    session: Session, agent_id: int, held: list[tuple[int, int]], lease_s: float, name: str | None = None, usage: list[dict] = ()
) -> dict:
    """Renew the leases of the (job, attempt) pairs the agent holds; answer what to abort, what it lost, what the server never heard of.

    A job whose agent row was deleted (DELETE /api/v1/agents/ID) while it ran has no agent; the re-registered agent that
    still holds it at the same attempt takes it back, so the run goes on as the same run.
    """
    agent = found(session, Agent, agent_id, "agent")
    if name is not None and agent.name != name:  # a reset database gave this id to another agent
        raise NotFound(f"agent {agent_id} is '{agent.name}', not '{name}': register again")
    drain = agent.drain or agent.archived  # read now: the row may be deleted before the answer is sent
    with _agent_kept(session, agent_id):
        lost, unknown = _renew(session, agent, held, lease_s, usage)
    mine = [job_id for job_id, _ in held if job_id not in lost and job_id not in unknown]
    abort = list(session.scalars(select(Job.id).where(Job.id.in_(mine), Job.state == states.STOPPING))) if mine else []
    return {"drain": drain, "abort": abort, "lost": lost, "unknown": unknown}


def _renew(session: Session, agent: Agent, held: list[tuple[int, int]], lease_s: float, usage: list[dict]) -> tuple[list[int], list[int]]:
    """The writes of a heartbeat, committed: (jobs lost to another holder, jobs the server has no row of)."""
    agent_id = agent.id
    agent.last_heartbeat = now()
    for gpu in usage:  # shown on the agents page; a GPU the inventory does not list is ignored
        values = {"util": gpu.get("util"), "memory_used_mb": gpu.get("memory_used_mb")}
        session.execute(update(Gpu).where(Gpu.agent_id == agent_id, Gpu.index == gpu["index"]).values(**values))
    lost, unknown = [], []
    for job_id, attempt in held:
        ours = (Job.id == job_id, Job.attempt == attempt, Job.state.in_(HELD))
        renewed = session.execute(update(Job).where(*ours, Job.agent_id == agent_id).values(lease_expires=now() + lease_s))
        if renewed.rowcount:
            continue
        adopted = session.execute(
            update(Job).where(*ours, Job.agent_id.is_(None)).values(agent_id=agent_id, lease_expires=now() + lease_s).returning(Job.run_id)
        ).first()
        if adopted is not None:
            session.execute(update(Run).where(Run.id == adopted.run_id).values(agent_id=agent_id))
        elif session.scalar(select(Job.id).where(Job.id == job_id)) is None:
            unknown.append(job_id)
        else:
            lost.append(job_id)
    session.commit()
    return lost, unknown


@contextmanager
def _as_it_stands(session: Session, check: Callable[[], object], changed: str) -> Iterator[None]:
    """Writes of an agent's call, checked again when they find their rows changed after the call read them (a Conflict
    from a fence, a key to a row deleted meanwhile, an update that matched no row): rolled back, and answered as the
    database stands now. `check` raises that answer: 404 when the agent's row was deleted (the agent registers again
    and its children train on), a 409 when the job is another's (the agent kills its child); else 409 `changed`."""
    try:
        yield
    except (Conflict, IntegrityError, StaleDataError) as err:
        session.rollback()
        check()
        if isinstance(err, Conflict):
            raise
        raise Conflict(changed) from None


def _agent_kept(session: Session, agent_id: int) -> AbstractContextManager[None]:
    """_as_it_stands for writes that name this agent's row (a heartbeat, a claim)."""
    return _as_it_stands(session, lambda: found(session, Agent, agent_id, "agent"), f"agent {agent_id} changed meanwhile")


def claim(session: Session, agent_id: int, free_gpus: int, cpu: bool, refused: list[int], lease_s: float) -> dict | None:
    """Take the best queued job this agent can serve (priority, then age; GPU count must fit) in ONE atomic statement.

    SQLite runs one writer at a time, so `UPDATE ... WHERE id = (SELECT ...) AND state = 'queued' RETURNING` cannot
    hand one job to two agents; on PostgreSQL the inner SELECT takes its row FOR UPDATE SKIP LOCKED, so racing agents
    pass over each other's candidate instead of queueing behind it. None: nothing fits, or the agent is drained or archived.
    """
    agent = found(session, Agent, agent_id, "agent")
    if agent.drain or agent.archived:
        return None
    session.commit()  # end the read: the claim below is a transaction of its own
    pick = select(Job.id).where(Job.state == states.QUEUED, Job.gpus <= free_gpus)
    if not cpu:
        pick = pick.where(Job.gpus > 0)
    if refused:
        pick = pick.where(Job.id.not_in(refused))
    pick = pick.order_by(Job.priority.desc(), Job.created, Job.id).limit(1)
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    with _agent_kept(session, agent_id):
        claimed = session.execute(
            update(Job)
            .where(Job.id == pick.scalar_subquery(), Job.state == states.QUEUED)
            .values(state=states.CLAIMED, agent_id=agent_id, attempt=Job.attempt + 1, lease_expires=now() + lease_s, updated=now())
            .returning(Job.id, Job.run_id, Job.attempt, Job.gpus)
            .execution_options(synchronize_session=False)
        ).first()
        if claimed is None:
            session.rollback()
            return None
        run_values = {"state": states.CLAIMED, "agent_id": agent_id, "pid": None, "updated": now()}
        session.execute(update(Run).where(Run.id == claimed.run_id).values(**run_values))
        session.commit()
    run = session.get(Run, claimed.run_id, populate_existing=True)
    config = session.get(ConfigRow, run.config_id) if run.config_id is not None else None
    if config is None:
        job = session.get(Job, claimed.id, populate_existing=True)
        swap(session, job, states.FAILED, reason="its config was deleted: queue the run again from a config")
        return None
    folder = {"root": run.root, "dataset": run.dataset, "name": run.name} if run.root else None
    return {
        "job_id": claimed.id,
        "run_id": claimed.run_id,
        "attempt": claimed.attempt,
        "gpus": claimed.gpus,
        "config_name": config.name,
        "config": config.config,
        "run_folder": folder,
        "lease_seconds": lease_s,
    }


@contextmanager
def fenced(session: Session, job_id: int, agent_id: int, attempt: int) -> Iterator[Job]:
    """The job this agent holds (held_job), for writes fenced again by the database; when they find it changed, the
    answer is held_job's as the database stands then (_as_it_stands)."""
    job = held_job(session, job_id, agent_id, attempt)
    with _as_it_stands(session, lambda: held_job(session, job_id, agent_id, attempt), f"job {job_id} changed meanwhile"):
        yield job


def held_job(session: Session, job_id: int, agent_id: int, attempt: int) -> Job:
    """The job, if this agent still holds it at this attempt; else 409 naming who has it now (the agent kills its child)."""
    found(session, Agent, agent_id, "agent")  # 404 for an agent the server forgot: it registers again and keeps its jobs
    job = session.get(Job, job_id, populate_existing=True)  # as the database has it now, not as this session last saw it
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    if job.agent_id is None and job.attempt == attempt and job.state in HELD:  # its agent row was deleted (the id may be another's now)
        raise NotFound(f"job {job_id} has no agent since its agent was deleted: register again and name it in the heartbeat")
    if job.agent_id != agent_id or job.attempt != attempt or job.state not in HELD:
        raise Conflict(f"job {job_id} attempt {attempt} is no longer this agent's (now: {job.state}, attempt {job.attempt})", job.state)
    return job


def start(session: Session, job_id: int, agent_id: int, attempt: int, pid: int) -> Job:
    """claimed -> running: the training process `pid` started (one more attempt of the run)."""
    with fenced(session, job_id, agent_id, attempt) as job:
        # a new attempt's output starts empty: the last one's stays in its own file in the run folder, linked from the run page
        fresh = {"pid": pid, "agent_id": agent_id, "attempts": Run.attempts + 1, "error": None, "log_tail": None}
        if not swap(session, job, states.RUNNING, run=fresh):
            raise Conflict(f"job {job_id} changed meanwhile; not started", job.state)
    return job


def progress(session: Session, job_id: int, agent_id: int, attempt: int, folder: dict | None, values: dict) -> None:
    """Store what the run's own files say (and the log tail) on the run, fenced by the attempt like every write of an agent."""
    changes = {k: v for k, v in values.items() if k in PROGRESS_FIELDS and v is not None}
    if "log_tail" in changes:
        changes["log_tail"] = changes["log_tail"][-LOG_TAIL_CHARS:]
    if folder:  # from the training's handshake; the indexer leaves a held job's new folder to this report (Indexer._runs)
        changes.update(root=folder["root"], dataset=folder["dataset"], name=folder["name"])
    fence = exists().where(Job.id == job_id, Job.attempt == attempt, Job.agent_id == agent_id, Job.state.in_(HELD))
    with fenced(session, job_id, agent_id, attempt) as job:
        written = session.execute(update(Run).where(Run.id == job.run_id, fence).values(updated=now(), **changes))
        if not written.rowcount:
            raise Conflict(f"job {job_id} attempt {attempt} is no longer this agent's", job.state)
        session.commit()


def finish(session: Session, job_id: int, agent_id: int, attempt: int, exit_code: int, error: str | None, log_tail: str | None) -> Job:
    """running/stopping -> succeeded | stopped | failed from the exit code; a failure keeps the CLI's line (first) or the log tail."""
    new = states.from_exit(exit_code)
    tail = (log_tail or "")[-LOG_TAIL_CHARS:] or None
    message = reason = None
    if new == states.FAILED:
        if exit_code == EXIT_USER_ERROR and error:
            message = error
        elif exit_code > 0 and error:  # e.g. accelerate launch ends with 1 when its ranks ended with the CLI's line
            message = f"{error} (exit code {exit_code})\n{tail or ''}".strip()
        elif exit_code < 0:
            message = f"killed by signal {-exit_code}\n{tail or ''}".strip()
        else:
            message = f"exit code {exit_code}\n{tail or ''}".strip()
        reason = message.splitlines()[0]
    run = {"pid": None, "error": message, **({"log_tail": tail} if tail else {})}
    # a success keeps the job's last reason (why it was requeued, who refused it): the history of how it got there
    failed = {"reason": reason, "failures": Job.failures + 1} if new == states.FAILED else {}
    with fenced(session, job_id, agent_id, attempt) as job:
        if not swap(session, job, new, run=run, lease_expires=None, **failed):
            raise Conflict(f"job {job_id} changed meanwhile; its outcome was not recorded", job.state)
    return job


def refuse(session: Session, job_id: int, agent_id: int, attempt: int, reason: str) -> Job:
    """claimed -> queued: this agent cannot run the job (e.g. its output root is not writable there); the reason is shown."""
    with fenced(session, job_id, agent_id, attempt) as job:
        name = session.scalar(select(Agent.name).where(Agent.id == agent_id))
        refused = {"agent_id": None, "lease_expires": None, "reason": f"refused by agent {name}: {reason}"}
        if not swap(session, job, states.QUEUED, run={"agent_id": None}, **refused):
            raise Conflict(f"job {job_id} changed meanwhile", job.state)
    return job


def reap(session: Session) -> int:
    """Jobs whose lease expired on the server's clock: back to the queue while failures < max_attempts, else failed; how many.

    A lost lease is a failure; a user's stop is not (stopped -> resume may repeat any number of times), and a job lost
    while only claimed never started. The attempt number (the fencing token) grows on every claim regardless.
    """
    query = select(Job).where(Job.state.in_(HELD), Job.lease_expires < now()).execution_options(populate_existing=True)
    expired = list(session.scalars(query))
    for job in expired:
        agent = session.scalar(select(Agent.name).where(Agent.id == job.agent_id)) if job.agent_id else None
        lapse = f"agent {agent or '?'} stopped renewing its lease"
        released = {"agent_id": None, "lease_expires": None}
        if job.state == states.STOPPING:  # asked to stop and its agent is gone: it saved what it could, resume continues it
            swap(session, job, states.STOPPED, run={"pid": None}, reason=f"{lapse} while stopping", **released)
        elif job.state == states.CLAIMED:
            swap(session, job, states.QUEUED, run={"pid": None, "agent_id": None}, reason=f"requeued: {lapse}", **released)
        elif job.failures + 1 < job.max_attempts:
            requeued = f"requeued: {lapse} (failure {job.failures + 1} of {job.max_attempts} allowed)"
            swap(session, job, states.QUEUED, run={"pid": None, "agent_id": None}, reason=requeued, failures=job.failures + 1, **released)
        else:
            reason = f"{lapse} on attempt {job.attempt}: failure {job.failures + 1} of {job.max_attempts} allowed, no attempts left"
            swap(session, job, states.FAILED, run={"pid": None, "error": reason}, reason=reason, failures=job.failures + 1, **released)
    return len(expired)


def held_by_agent(session: Session) -> dict[int, list[tuple[int, str]]]:
    """(run id, state) of the jobs each agent holds now, for the agents page."""
    held: dict[int, list[tuple[int, str]]] = {}
    for agent_id, run_id, state in session.execute(select(Job.agent_id, Job.run_id, Job.state).where(Job.state.in_(HELD)).order_by(Job.id)):
        held.setdefault(agent_id, []).append((run_id, state))
    return held


def run_states(session: Session, run_ids: list[int]) -> dict[int, dict]:
    """The state, restarts and job reason of each run (what `submit status` asks for the tasks of a grid on agents)."""
    rows = session.execute(select(Run.id, Run.state, Run.restarts, Run.attempts).where(Run.id.in_(run_ids))).all()
    return {r.id: {"state": r.state, "restarts": r.restarts, "attempts": r.attempts} for r in rows}


# --- the user's side of the queue, and the one compare-and-swap every change of a job goes through

# job state -> the states it may move to. Agents drive claimed/running/succeeded/failed/stopped; users drive cancel
# (queued/claimed -> cancelled, running -> stopping) and resume (stopped/failed/cancelled -> queued).
TRANSITIONS: dict[str, tuple[str, ...]] = {
    states.QUEUED: (states.CLAIMED, states.CANCELLED),
    states.CLAIMED: (states.RUNNING, states.QUEUED, states.CANCELLED, states.FAILED),
    states.RUNNING: (states.SUCCEEDED, states.FAILED, states.STOPPING, states.STOPPED, states.QUEUED),
    states.STOPPING: (states.STOPPED, states.FAILED, states.SUCCEEDED, states.QUEUED),
    states.STOPPED: (states.QUEUED,),
    states.FAILED: (states.QUEUED,),
    states.CANCELLED: (states.QUEUED,),
    states.SUCCEEDED: (),
}
# what a user's action asks for, by the job's current state
CANCEL = {states.QUEUED: states.CANCELLED, states.CLAIMED: states.CANCELLED, states.RUNNING: states.STOPPING}
RESUME = {states.STOPPED: states.QUEUED, states.FAILED: states.QUEUED, states.CANCELLED: states.QUEUED}
ACTIONS = {"cancel": CANCEL, "resume": RESUME}


def allowed(current: str, new: str) -> bool:
    """Whether a job may move from `current` to `new`."""
    return new in TRANSITIONS.get(current, ())


def queue_run(session: Session, config_id: int, gpus: int = 0, priority: int = 0, max_attempts: int = 3) -> tuple[Run, Job]:
    """A run of this config and its queue entry, both queued (an agent claims it)."""
    config = found(session, ConfigRow, config_id, "config")
    run = Run(project_id=config.project_id, config_id=config.id, source="queue", state=states.QUEUED, config_hash=config.config_hash)
    job = Job(run=run, state=states.QUEUED, gpus=gpus, priority=priority, max_attempts=max_attempts)
    session.add_all([run, job])
    session.commit()
    return run, job


def swap(session: Session, job: Job, new: str, run: dict | None = None, **values) -> bool:
    """Move a job from the (state, attempt) it was read with to `new`, and its run with it, as one compare-and-swap.

    False (nothing written) when another actor changed the job first; the one place every state change goes through,
    for users and for agents, whose attempt number is their fencing token. `run`: more run columns to set.
    """
    if not allowed(job.state, new):
        return False
    changed = {"state": new, "updated": now(), **values}
    swapped = session.execute(update(Job).where(Job.id == job.id, Job.state == job.state, Job.attempt == job.attempt).values(**changed))
    if not swapped.rowcount:
        session.rollback()
        return False
    session.execute(update(Run).where(Run.id == job.run_id).values(state=new, updated=now(), **(run or {})))
    session.commit()
    session.refresh(job)
    return True


def change_state(session: Session, run_id: int, action: str) -> Job:
    """Cancel or resume a run's job (409 with the current state when that state does not allow it, or another actor won)."""
    run = get_run(session, run_id)
    job = latest_job(session, run)
    if job is None:
        raise Conflict(f"run {run_id} was not queued here (found on disk as {run.state}): there is no job to {action}", run.state)
    target = ACTIONS[action].get(job.state)
    if target is None:
        raise Conflict(f"cannot {action} run {run_id}: its job is {job.state}", job.state)
    requeue = {"agent_id": None, "lease_expires": None, "reason": None} if target == states.QUEUED else {}
    if not swap(session, job, target, **requeue):
        current = session.scalar(select(Job.state).where(Job.id == job.id))
        raise Conflict(f"cannot {action} run {run_id}: its job changed to {current} meanwhile", current)
    return job
