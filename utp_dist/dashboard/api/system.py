"""/api/v1/index and /files: refreshing the index of the output roots, and files from inside them only."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

from utp_dist.dashboard import files
from utp_dist.dashboard.deps import SettingsDep

router = APIRouter(tags=["system"])


@router.post("/api/v1/index/refresh")
def refresh_index(request: Request) -> dict[str, int]:
    """Index the output roots now (the background indexer does it every few seconds anyway)."""
    return request.app.state.indexer.refresh()


@router.get("/api/v1/index")
def index_status(request: Request) -> dict:
    """Whether the first pass over the output roots is still under way (indexing), how many runs it has seen so far,
    how long it took once done (first_pass_s), and how many run folders all passes since the start have read and
    forgotten (runs_read_total, runs_gone_total)."""
    return dict(request.app.state.indexer.status)


@router.get("/files/{root}/{path:path}")
def serve_file(root: int, path: str, settings: SettingsDep) -> FileResponse:
    """A file below output root number `root` (figures, logs, exports); 403 for anything resolving outside the roots and
    for database and token files."""
    try:
        return FileResponse(files.served(settings.roots, root, path))
    except files.NotServed as err:
        raise HTTPException(status_code=err.status, detail=str(err)) from None
