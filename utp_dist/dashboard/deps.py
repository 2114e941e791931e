"""FastAPI dependencies shared by the API routers and the pages: the database session, settings, pagination."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Query, Request, Response
from sqlalchemy.orm import Session

from utp_dist.dashboard.schemas import MAX_INT
from utp_dist.dashboard.settings import Settings

MAX_PAGE = 500


def get_session(request: Request) -> Iterator[Session]:
    """One database session per request."""
    yield from request.app.state.db.session()


def get_settings(request: Request) -> Settings:
    """The settings the app was started with."""
    return request.app.state.settings


class Paging:
    """?limit=&offset= on every list; the total count comes back in the X-Total-Count header."""

    def __init__(self, response: Response, limit: int = Query(100, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=MAX_INT)):
        self.response, self.limit, self.offset = response, limit, offset

    def total(self, items: list, total: int) -> list:
        """Set X-Total-Count and hand the page's items back."""
        self.response.headers["X-Total-Count"] = str(total)
        return items


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
PagingDep = Annotated[Paging, Depends()]
# an id in a URL: what the database's integer key can hold, so a huge or negative one is a 422, not a database error
IdPath = Annotated[int, Path(ge=1, le=MAX_INT)]
