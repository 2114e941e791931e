"""/api/v1/sweeps: sweep ledgers found under the output roots, their board, and `resubmit --failed`."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from utp_dist.dashboard import readmodels, security, services, sources
from utp_dist.dashboard.deps import IdPath, PagingDep, SessionDep, SettingsDep
from utp_dist.dashboard.schemas import ResubmitOut, SweepBoard, SweepOut

router = APIRouter(prefix="/api/v1/sweeps", tags=["sweeps"])


@router.get("", response_model=list[SweepOut])
def list_sweeps(session: SessionDep, paging: PagingDep):
    """Every sweep ledger found under the output roots, newest first."""
    return paging.total(*services.list_sweeps(session, paging.limit, paging.offset))


@router.get("/{sweep_id}", response_model=SweepBoard)
def sweep_board(sweep_id: IdPath, session: SessionDep, settings: SettingsDep):
    """One row per task (the same status code as `submit status`), the leaderboard and mean ± std over seeds."""
    sweep = services.get_sweep(session, sweep_id)
    return SweepBoard(
        **SweepOut.model_validate(sweep).model_dump(), **readmodels.sweep_board(sweep, settings.roots, security.own_server(settings))
    )


@router.post("/{sweep_id}/resubmit-failed", response_model=ResubmitOut)
def resubmit_failed(sweep_id: IdPath, session: SessionDep, settings: SettingsDep):
    """`submit resubmit SWEEP --failed` by the sweep code: exit code 0 and the line it ends with, or 2 and why it was refused."""
    folder = Path(services.get_sweep(session, sweep_id).folder)
    code, message = sources.resubmit_failed(folder, security.own_server(settings), settings.allow_import)
    return ResubmitOut(exit_code=code, message=message)
