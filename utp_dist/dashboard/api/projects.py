"""/api/v1/projects"""

from __future__ import annotations

from fastapi import APIRouter, status

from utp_dist.dashboard import services
from utp_dist.dashboard.deps import IdPath, PagingDep, SessionDep
from utp_dist.dashboard.schemas import ProjectIn, ProjectOut, ProjectPatch

router = APIRouter(prefix="/api/v1/projects", tags=["projects"])


@router.get("", response_model=list[ProjectOut])
def list_projects(session: SessionDep, paging: PagingDep, archived: bool = False):
    """Every project, oldest first (`?archived=true`: the archived ones)."""
    return paging.total(*services.list_projects(session, paging.limit, paging.offset, archived))


@router.post("", response_model=ProjectOut, status_code=status.HTTP_201_CREATED)
def create_project(body: ProjectIn, session: SessionDep):
    """Create a project (409 when the name is taken)."""
    return services.create_project(session, body.name, body.description)


@router.get("/{project_id}", response_model=ProjectOut)
def get_project(project_id: IdPath, session: SessionDep):
    """One project."""
    return services.found(session, services.Project, project_id, "project")


@router.patch("/{project_id}", response_model=ProjectOut)
def update_project(project_id: IdPath, body: ProjectPatch, session: SessionDep):
    """Rename a project, change its description, or archive it (409 when the new name is taken)."""
    project = services.update_project(session, project_id, body.name, body.description)
    return project if body.archived is None else services.patch(session, services.Project, project_id, "project", archived=body.archived)


@router.delete("/{project_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_project(project_id: IdPath, session: SessionDep):
    """Delete a project with its configs (its runs stay, without a project)."""
    services.delete_project(session, project_id)
