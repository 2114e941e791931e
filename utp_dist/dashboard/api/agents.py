"""/api/v1/agents: the machines that will run queued jobs (issue 12) and their GPUs."""

from __future__ import annotations

from fastapi import APIRouter, status

from utp_dist.dashboard import services
from utp_dist.dashboard.db import Agent
from utp_dist.dashboard.deps import PagingDep, SessionDep
from utp_dist.dashboard.schemas import AgentIn, AgentOut, AgentPatch, GpuIn, GpuOut

router = APIRouter(prefix="/api/v1/agents", tags=["agents"])


@router.get("", response_model=list[AgentOut])
def list_agents(session: SessionDep, paging: PagingDep):
    """Every agent with its GPUs."""
    return paging.total(*services.list_agents(session, paging.limit, paging.offset))


@router.post("", response_model=AgentOut, status_code=status.HTTP_201_CREATED)
def create_agent(body: AgentIn, session: SessionDep):
    """Register an agent (409 when the name is taken)."""
    return services.create_agent(session, body.name, body.host)


@router.post("/gpus", response_model=GpuOut, status_code=status.HTTP_201_CREATED)
def add_gpu(body: GpuIn, session: SessionDep):
    """Add a GPU to an agent's inventory (409 when that index is already listed)."""
    return services.add_gpu(session, body.agent_id, body.index, body.name, body.memory_mb)


@router.get("/{agent_id}", response_model=AgentOut)
def get_agent(agent_id: int, session: SessionDep):
    """One agent with its GPUs."""
    return services.found(session, Agent, agent_id, "agent")


@router.patch("/{agent_id}", response_model=AgentOut)
def update_agent(agent_id: int, body: AgentPatch, session: SessionDep):
    """Change an agent's host, or drain it (it finishes what it runs and claims nothing new)."""
    return services.update_agent(session, agent_id, body.host, body.drain)


@router.delete("/{agent_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_agent(agent_id: int, session: SessionDep):
    """Forget an agent and its GPUs."""
    services.delete_agent(session, agent_id)
