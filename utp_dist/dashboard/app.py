"""The FastAPI application: database, migrations, the indexer, the routers, the pages and the error answers."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError, IntegrityError
from starlette.concurrency import run_in_threadpool

from utp_dist.dashboard import downloads, jobqueue, managepages, migrate, pages, runpages, searches
from utp_dist.dashboard.api import agent_tokens, agents, configs, jobs, projects, runs, sweeps, system
from utp_dist.dashboard.db import Database
from utp_dist.dashboard.indexer import Indexer
from utp_dist.dashboard.limits import BodyLimit
from utp_dist.dashboard.schemas import problem
from utp_dist.dashboard.security import CSP, AccessMiddleware, Sessions, Throttle
from utp_dist.dashboard.services import Conflict, Invalid, NotFound
from utp_dist.dashboard.settings import Settings
from utp_dist.errors import one_line
from utp_dist.version import __version__

HERE = Path(__file__).parent
log = logging.getLogger(__name__)
SEARCH_STEP_S = 2.0  # how often the server steps the searches agents run (reports rungs, promotes, queues trials)
# the first index pass holds the interpreter most of the time it runs (parsing, SQL): begun a moment after the port
# opens, it no longer doubles the time of the first answers (about 0.1 s even with an empty root; more with a big one)
FIRST_INDEX_AFTER_S = 0.25


def create_app(settings: Settings) -> FastAPI:
    """The app for these settings: migrates the database, then indexes the roots in the background."""
    database = Database(settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        """Migrate, then index in the background (the first pass too: the port opens at once) until shutdown."""
        migrate.upgrade(database.engine)
        database.watch_file()
        indexer.start(settings.index_interval_s, first_after_s=FIRST_INDEX_AFTER_S)
        reaper = asyncio.create_task(reap_forever(database, indexer, min(settings.lease_s / 4, 2.0)))
        controller = asyncio.create_task(control_searches_forever(database, settings, SEARCH_STEP_S))
        yield
        for task in (reaper, controller):
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        indexer.stop()
        database.engine.dispose()

    indexer = Indexer(settings.roots, database.sessions)
    # /docs is served below from vendored Swagger UI files (FastAPI's default loads them from a CDN); no ReDoc
    app = FastAPI(title="utp_dist dashboard", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings, app.state.db, app.state.indexer = settings, database, indexer
    app.state.sessions, app.state.throttle = Sessions(settings), Throttle()
    app.add_middleware(BodyLimit, max_bytes=settings.max_body)  # inside the access check, so routes see its 413 as raised
    app.add_middleware(AccessMiddleware, settings=settings, sessions=app.state.sessions, throttle=app.state.throttle)
    for module in (projects, configs, runs, agents, agent_tokens, jobs, sweeps, system, downloads):
        app.include_router(module.router)
    app.include_router(runpages.router)  # before pages: its /web/runs is the run table
    app.include_router(managepages.router)  # before pages: /web/runs/{id}/delete is not one of its /web/runs/{id}/{action}
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_api_route("/", lambda: RedirectResponse("/web/runs"), include_in_schema=False)
    app.add_api_route("/docs", api_docs, include_in_schema=False)
    add_error_answers(app)
    if settings.token:
        declare_bearer(app)
    return app


def declare_bearer(app: FastAPI) -> None:
    """The OpenAPI document says every API call takes 'Authorization: Bearer TOKEN' (so /docs has its Authorize button)."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
        return app.openapi_schema

    app.openapi = openapi


async def reap_forever(database: Database, indexer: Indexer, interval_s: float) -> None:
    """The reaper, on the server's clock: every few seconds, jobs whose agents stopped heartbeating go back to the queue.

    It also notices a SQLite file deleted under the server, and starts a new one (agents register again, runs are
    indexed again from the roots) instead of writing on into the unlinked file.
    """

    def reap_once() -> int:
        if database.file_deleted():
            database.reopen()
            migrate.upgrade(database.engine)
            log.warning(
                "utp_dist dashboard: the database file %s was deleted under the server: started a new one; agents register "
                "again and runs are indexed again from the roots (queued runs and configs of the old file are gone)",
                database.file,
            )
            indexer.refresh()
        with database.sessions() as session:
            return jobqueue.reap(session)

    while True:
        await asyncio.sleep(interval_s)
        try:
            await run_in_threadpool(reap_once)
        except Exception:  # a locked or unreachable database must not end the reaper; the next round tries again
            log.exception("reaping expired leases failed; trying again in %.1f s", interval_s)


async def control_searches_forever(database: Database, settings: Settings, interval_s: float) -> None:
    """The searches submitted with --executor dashboard, stepped on the server (utp_dist.dashboard.searches)."""

    def step_once() -> None:
        with database.sessions() as session:
            searches.step_all(session, settings.roots, settings.allow_import)

    while True:
        await asyncio.sleep(interval_s)
        try:
            await run_in_threadpool(step_once)
        except Exception:  # as the reaper: the next round tries again
            log.exception("stepping the searches failed; trying again in %.1f s", interval_s)


def api_docs() -> HTMLResponse:
    """The OpenAPI docs (Swagger UI) from the vendored files, so they work on a machine without internet.

    Swagger UI starts from an inline script and styles its parts inline: this page alone allows its own inline
    script (by a nonce fresh per answer), inline styles and data: images.
    """
    vendor, nonce = "/static/vendor/swagger-ui", secrets.token_urlsafe(16)
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="utp_dist dashboard API",
        swagger_js_url=f"{vendor}/swagger-ui-bundle.js",
        swagger_css_url=f"{vendor}/swagger-ui.css",
        swagger_favicon_url=f"{vendor}/favicon-32x32.png",
    )
    html = page.body.decode().replace("<script>", f'<script nonce="{nonce}">')
    policy = f"{CSP}; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"
    return HTMLResponse(html, headers={"Content-Security-Policy": policy})


def add_error_answers(app: FastAPI) -> None:
    """404 unknown ids, 409 with the current state, 422 with the one line the CLI prints or the line of bad JSON."""

    def answer(request: Request, status: int, detail: str, **extra) -> object:
        """JSON for the API, an error page for /web."""
        if request.url.path.startswith("/web/"):
            return pages.error_page(request, status, detail)
        return JSONResponse({"detail": detail, **extra}, status_code=status)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, err: NotFound):
        return answer(request, 404, str(err))

    @app.exception_handler(Conflict)
    async def conflict(request: Request, err: Conflict):
        return answer(request, 409, str(err), state=err.state)

    @app.exception_handler(Invalid)
    async def invalid(request: Request, err: Invalid):
        return answer(request, 422, str(err))

    # the safety net under the schemas' bounds: what the database itself refuses is the client's input, not a server fault
    @app.exception_handler(DataError)
    async def unstorable(request: Request, err: DataError):
        return answer(request, 422, f"the database cannot store this value: {one_line(err.orig or err)}")

    @app.exception_handler(OverflowError)
    async def overflow(request: Request, err: OverflowError):
        return answer(request, 422, f"a number is out of range: {one_line(err)}")

    @app.exception_handler(IntegrityError)
    async def integrity(request: Request, err: IntegrityError):
        return answer(request, 409, "this conflicts with what is stored (a name or index already used, or a row that is gone)")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError):
        broken = [e for e in err.errors() if e.get("type") == "json_invalid"]
        if broken:
            body = (await request.body()).decode("utf-8", errors="replace")
            try:
                json.loads(body)
            except json.JSONDecodeError as decode:
                return JSONResponse(
                    {"detail": f"request body: invalid JSON at line {decode.lineno}, column {decode.colno}: {decode.msg}"}, status_code=422
                )
        # one line to print, and every error with its location for programs
        return JSONResponse({"detail": problem(err.errors()), "errors": jsonable(err.errors())}, status_code=422)


def jsonable(errors) -> list:
    """Validation errors with their context made printable (pydantic puts exception objects there), without the input
    they refused (a NaN there would break the JSON answer, and a big body need not travel back)."""
    return json.loads(json.dumps([{k: v for k, v in e.items() if k != "input"} for e in errors], default=str))
