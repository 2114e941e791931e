"""/api/v1/agent-tokens: credentials for agents only; made and revoked with the dashboard's own token (see tokens.py)."""

from __future__ import annotations

from fastapi import APIRouter, status

from utp_dist.dashboard import tokens
from utp_dist.dashboard.deps import PagingDep, SessionDep
from utp_dist.dashboard.schemas import AgentTokenCreated, AgentTokenIn, AgentTokenOut

router = APIRouter(prefix="/api/v1/agent-tokens", tags=["agents"])


@router.post("", response_model=AgentTokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: AgentTokenIn, session: SessionDep):
    """A new agent token; its secret is in this answer only (409 when the name is taken)."""
    row, token = tokens.create_token(session, body.name)
    return AgentTokenCreated(id=row.id, name=row.name, created=row.created, token=token)


@router.get("", response_model=list[AgentTokenOut])
def list_tokens(session: SessionDep, paging: PagingDep):
    """Agent tokens by name, without their secrets."""
    return paging.total(*tokens.list_tokens(session, paging.limit, paging.offset))


@router.delete("/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(token_id: int, session: SessionDep):
    """Revoke an agent token: its agents get 401 from their next call."""
    tokens.revoke_token(session, token_id)
