"""Downloads of a run: a folder of it (the best export, its logs, its checkpoints) as one streamed zip, a config as YAML.

A zip holds only files that resolve inside the output roots (a symlink out of them is left out) and never a database
or token file; it is written while it is sent, so a multi-GB export needs no temporary copy and no memory.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import yaml
from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse

from utp_dist.config import ConfigError, from_dict
from utp_dist.dashboard import files, readmodels, services
from utp_dist.dashboard.db import ConfigRow
from utp_dist.dashboard.deps import IdPath, SessionDep, SettingsDep
from utp_dist.store import runfiles
from utp_dist.store.run_dir import inside

router = APIRouter(tags=["downloads"])
CHUNK = 1 << 20
Folder = Literal["best", "logs", "checkpoints"]


class _Pipe:
    """A write-only stream that hands zipfile's output to the response in pieces (zipfile writes data descriptors when
    it cannot seek back, so no byte needs to be kept)."""

    def __init__(self):
        self.pieces: list[bytes] = []
        self.written = 0

    def write(self, data: bytes) -> int:
        self.pieces.append(bytes(data))
        self.written += len(data)
        return len(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.pieces = b"".join(self.pieces), []
        return data


def members(folder: Path, roots: tuple[Path, ...]) -> list[tuple[Path, str]]:
    """(file, name in the zip) of every file below `folder` that resolves inside the roots and is no secret, sorted."""
    found = []
    for parent, dirs, names in os.walk(folder):  # symlinked folders are not followed: one could lead anywhere
        dirs.sort()
        for name in sorted(names):
            path = Path(parent) / name
            resolved = inside(path, roots)
            if resolved is not None and resolved.is_file() and not files.secret(resolved):
                found.append((resolved, path.relative_to(folder).as_posix()))
    return found


def zip_stream(entries: list[tuple[Path, str]], prefix: str) -> Iterator[bytes]:
    """The zip of `entries` under the folder name `prefix`, yielded about a MiB at a time (stored: weights do not compress)."""
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path, name in entries:
            try:
                source = open(path, "rb")  # noqa: SIM115 (closed below, after its entry)
            except OSError:  # a file removed while the zip is written (a state rotated away): the rest still comes
                continue
            with source, archive.open(f"{prefix}/{name}", "w", force_zip64=True) as target:
                while chunk := source.read(CHUNK):
                    target.write(chunk)
                    if sum(map(len, pipe.pieces)) >= CHUNK:
                        yield pipe.take()
            yield pipe.take()
    yield pipe.take()


def attachment(name: str) -> dict[str, str]:
    """The header that saves the answer as `name` (kept to safe characters)."""
    return {"Content-Disposition": f'attachment; filename="{re.sub(r"[^A-Za-z0-9._=-]+", "-", name)}"'}


@router.get("/api/v1/runs/{run_id}/download/{what}", response_class=StreamingResponse)
def download_folder(run_id: IdPath, what: Folder, session: SessionDep, settings: SettingsDep):
    """A folder of the run as one zip: `best` (the exported model), `logs` or `checkpoints` (404 when it has none)."""
    run = services.get_run(session, run_id)
    folder = readmodels.run_folder(run, settings.roots)
    if folder is None or not folder.exists():
        raise services.NotFound(f"run {run_id} has no run folder inside the output roots")
    target = {"best": runfiles.best_export(folder), "logs": folder.logs, "checkpoints": folder.checkpoints}[what]
    target = inside(target, settings.roots) if target is not None else None
    if target is None or not target.is_dir():
        raise services.NotFound(f"run {run_id} has no {'best export' if what == 'best' else what + ' folder'} inside the output roots")
    name = f"{folder.name}-{what}"
    entries = members(target, settings.roots)
    return StreamingResponse(zip_stream(entries, name), media_type="application/zip", headers=attachment(name + ".zip"))


def yaml_answer(config: dict, name: str) -> Response:
    return Response(yaml.safe_dump(config, sort_keys=False), media_type="application/yaml", headers=attachment(name + ".yaml"))


@router.get("/api/v1/runs/{run_id}/config.yaml")
def run_config(run_id: IdPath, session: SessionDep, settings: SettingsDep) -> Response:
    """The run's resolved config as a YAML file (the one it saved; for a queued run, its config row resolved)."""
    run = services.get_run(session, run_id)
    config = readmodels.run_detail(session, run, settings.roots)["config"]
    if not config:
        raise services.NotFound(f"run {run_id} has no readable config")
    return yaml_answer(config, run.name or f"run-{run_id}")


@router.get("/api/v1/configs/{config_id}/config.yaml")
def stored_config(config_id: IdPath, session: SessionDep) -> Response:
    """A stored config, resolved (every default filled in), as a YAML file that `python -m utp_dist.train` takes."""
    row = services.found(session, ConfigRow, config_id, "config")
    try:
        config = from_dict(row.config, row.name).to_dict()
    except ConfigError:  # a config stored before a key was renamed: as it was stored
        config = row.config
    return yaml_answer(config, row.name)
