"""Agent tokens: credentials that reach only what an agent calls (register, heartbeat, claim, start, progress, finish, refuse).

The user token (settings.token) may do everything; an agent token copied off an agent machine cannot queue jobs,
create projects, read configs or make more tokens. Only the SHA-256 of each token is stored, so the database holds
no usable credential; the secret is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from utp_dist.dashboard.db import AgentToken, Database
from utp_dist.dashboard.services import Invalid, add, page, remove

AGENT_PATHS = re.compile(r"/api/v1/agents/(register|\d+/heartbeat)|/api/v1/jobs/(claim|\d+/(start|progress|finish|refuse))")
"""What utp_dist.agent calls (all POST): the only endpoints an agent token reaches."""
AGENT_ONLY = "an agent token may only register, heartbeat, claim and report jobs; this needs the dashboard's own token"
PREFIX = "utpa_"  # tells an agent token from the user's at a glance (in a log, in a leaked file)


def agent_may(method: str, path: str) -> bool:
    """Whether an agent token may make this request."""
    return method == "POST" and AGENT_PATHS.fullmatch(path) is not None


def digest(token: str) -> str:
    """What is stored of a token: its SHA-256 (the tokens are random, so no salt or slow hash is needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def agent_token_valid(database: Database, token: str) -> bool:
    """Whether `token` is an agent token that exists now (read on every call, so a revoked one stops at once)."""
    if not token.startswith(PREFIX):
        return False
    with database.sessions() as session:
        return session.scalar(select(AgentToken.id).where(AgentToken.token_hash == digest(token))) is not None


async def is_agent(request: Request, token: str | None) -> bool:
    """agent_token_valid for the access middleware, off the event loop."""
    return bool(token) and await run_in_threadpool(agent_token_valid, request.app.state.db, token)


def create_token(session: Session, name: str) -> tuple[AgentToken, str]:
    """A new agent token (409 when the name is taken): the row, and the secret, which is not stored and not shown again."""
    name = name.strip()
    if not name:
        raise Invalid("name: give the token a name, e.g. the machine its agent runs on")
    token = PREFIX + secrets.token_urlsafe(32)
    return add(session, AgentToken(name=name, token_hash=digest(token)), f"an agent token named '{name}' already exists"), token


def list_tokens(session: Session, limit: int = 100, offset: int = 0) -> tuple[list[AgentToken], int]:
    """Agent tokens, oldest first (names and dates; the secrets are not stored)."""
    return page(session, select(AgentToken).order_by(AgentToken.id), limit, offset)


def revoke_token(session: Session, token_id: int) -> None:
    """Delete an agent token: its agents get 401 from their next call."""
    remove(session, AgentToken, token_id, "agent token")
