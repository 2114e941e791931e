"""/api/v1/configs: configs validated by the same code as the CLI before they are stored."""

from __future__ import annotations

from fastapi import APIRouter, status

from utp_dist.dashboard import clone, services
from utp_dist.dashboard.db import ConfigRow
from utp_dist.dashboard.deps import IdPath, PagingDep, SessionDep, SettingsDep
from utp_dist.dashboard.schemas import ConfigIn, ConfigOut, ConfigPatch, ConfigVersionIn

router = APIRouter(prefix="/api/v1/configs", tags=["configs"])


@router.post("", response_model=ConfigOut, status_code=status.HTTP_201_CREATED)
def create_config(body: ConfigIn, session: SessionDep, settings: SettingsDep):
    """Store a config given as `config` (sections) or `yaml` (file text); a bad key or value is 422 with the CLI's line.

    It may name only registered names and import paths under the server's --allow-import modules (422 otherwise)."""
    row = services.create_config(session, body.project_id, body.name, body.config, body.yaml, settings.allow_import)
    if body.description:
        row.description = body.description
        session.commit()
    return row


@router.get("/project/{project_id}", response_model=list[ConfigOut])
def list_configs(project_id: IdPath, session: SessionDep, paging: PagingDep, name: str | None = None, archived: bool = False):
    """The configs of a project (`?name=`: the one of that name, if any; `?archived=true`: the archived ones)."""
    return paging.total(*services.list_configs(session, project_id, paging.limit, paging.offset, name, archived))


@router.get("/{config_id}", response_model=ConfigOut)
def get_config(config_id: IdPath, session: SessionDep):
    """One config: its sections as given and the fingerprint of its resolved form."""
    return services.found(session, ConfigRow, config_id, "config")


@router.post("/{config_id}/versions", response_model=ConfigOut, status_code=status.HTTP_201_CREATED)
def new_config_version(config_id: IdPath, body: ConfigVersionIn, session: SessionDep, settings: SettingsDep):
    """Store an edited config as a new version (NAME v2, v3...) next to this one, validated as any config (422 with the
    CLI's line); runs queued from the old version keep it."""
    return clone.new_version(session, config_id, body.config, body.yaml, settings.allow_import, body.description)


@router.patch("/{config_id}", response_model=ConfigOut)
def patch_config(config_id: IdPath, body: ConfigPatch, session: SessionDep):
    """Change a config's description, or archive it (archived configs leave the project's list)."""
    return services.patch(session, ConfigRow, config_id, "config", description=body.description, archived=body.archived)


@router.delete("/{config_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_config(config_id: IdPath, session: SessionDep):
    """Delete a config (runs queued from it stay)."""
    services.delete_config(session, config_id)
