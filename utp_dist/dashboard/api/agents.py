"""/api/v1/agents: the machines that run queued jobs, their GPUs, registration and heartbeats."""

from __future__ import annotations

from fastapi import APIRouter, status

from utp_dist.dashboard import jobqueue, services
from utp_dist.dashboard.db import Agent
from utp_dist.dashboard.deps import IdPath, PagingDep, SessionDep, SettingsDep
from utp_dist.dashboard.schemas import AgentIn, AgentOut, AgentPatch, GpuIn, GpuOut, HeartbeatIn, HeartbeatOut, RegisterIn, RegisterOut

router = APIRouter(prefix="/api/v1/agents", tags=["agents"])


@router.get("", response_model=list[AgentOut])
def list_agents(session: SessionDep, paging: PagingDep, archived: bool = False):
    """Every agent with its GPUs (`?archived=true`: the archived ones)."""
    return paging.total(*services.list_agents(session, paging.limit, paging.offset, archived))


@router.post("", response_model=AgentOut, status_code=status.HTTP_201_CREATED)
def create_agent(body: AgentIn, session: SessionDep):
    """Register an agent (409 when the name is taken)."""
    return services.create_agent(session, body.name, body.host)


@router.post("/gpus", response_model=GpuOut, status_code=status.HTTP_201_CREATED)
def add_gpu(body: GpuIn, session: SessionDep):
    """Add a GPU to an agent's inventory (409 when that index is already listed)."""
    return services.add_gpu(session, body.agent_id, body.index, body.name, body.memory_mb)


@router.post("/register", response_model=RegisterOut)
def register(body: RegisterIn, session: SessionDep, settings: SettingsDep):
    """An agent process starting: create the agent of this name, or take over one that stopped heartbeating (409 while it is alive)."""
    agent = jobqueue.register(session, body.name, body.host, [g.model_dump() for g in body.gpus], body.drain, settings.lease_s)
    return RegisterOut(agent_id=agent.id, lease_seconds=settings.lease_s, heartbeat_seconds=settings.lease_s / 3)


@router.post("/{agent_id}/heartbeat", response_model=HeartbeatOut)
def heartbeat(agent_id: IdPath, body: HeartbeatIn, session: SessionDep, settings: SettingsDep):
    """Renew the leases of the jobs the agent holds; answer the jobs to abort, the jobs it lost (kill them) and drain."""
    held = [(j.job_id, j.attempt) for j in body.jobs]
    usage = [g.model_dump() for g in body.gpus]
    return HeartbeatOut(**jobqueue.heartbeat(session, agent_id, held, settings.lease_s, body.name, usage))


@router.get("/{agent_id}", response_model=AgentOut)
def get_agent(agent_id: IdPath, session: SessionDep):
    """One agent with its GPUs."""
    return services.found(session, Agent, agent_id, "agent")


@router.patch("/{agent_id}", response_model=AgentOut)
def update_agent(agent_id: IdPath, body: AgentPatch, session: SessionDep):
    """Change an agent's host, drain it (it finishes what it runs and claims nothing new), or archive it (it claims nothing
    either, and leaves the default list)."""
    return services.update_agent(session, agent_id, body.host, body.drain, body.archived)


@router.delete("/{agent_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_agent(agent_id: IdPath, session: SessionDep):
    """Forget an agent and its GPUs."""
    services.delete_agent(session, agent_id)
