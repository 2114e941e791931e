"""The dashboard answers at once, whatever its roots hold: Alembic only when there is a migration to apply, the first
pass over the roots in the background."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest
from conftest import REPO
from dashboard_support import Server, benchmark, generated_root

from utp_dist.dashboard import migrate

RUNS = 250  # the first pass over them takes several seconds: longer than the start, so it is still under way at the first answer
BOUND_S = 15.0  # about 1 s on a quiet machine (docs/run-table.md), 5 s seen with 2 cores at load 8: a bound for a busy CI box


def test_the_head_revision_is_known_without_alembic():
    from alembic.script import ScriptDirectory

    assert migrate.head_revision() == ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()


def test_an_up_to_date_database_is_not_handed_to_alembic(tmp_path, monkeypatch):
    """An old database is migrated to the newest revision; one at the newest revision is left to the one query."""
    from alembic import command
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    config = migrate.alembic_config()
    with engine.begin() as connection:
        assert migrate.stamped(connection) is None
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    migrate.upgrade(engine)
    with engine.connect() as connection:
        assert migrate.stamped(connection) == migrate.head_revision()

    def refuse(*args, **kwargs):
        raise AssertionError("Alembic was asked to upgrade a database at the newest revision")

    monkeypatch.setattr(command, "upgrade", refuse)
    migrate.upgrade(engine)
    engine.dispose()


def first_answer(server: Server) -> tuple[float, int]:
    """Start the server's process; (seconds until its login page answers, that answer's status)."""
    login_page = benchmark("dashboard_start").login_page  # as the benchmark asks, without a client's own start-up
    started = time.perf_counter()
    with open(server.log, "ab") as out:
        server.proc = subprocess.Popen(server.command(), env=server.env(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    while time.perf_counter() - started < 60:
        if server.proc.poll() is not None:
            pytest.fail(f"the dashboard exited with {server.proc.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            status = login_page(server.port)
            return time.perf_counter() - started, status
        except OSError:
            time.sleep(0.005)
    pytest.fail(f"the dashboard did not answer in 60 s:\n{server.log.read_text()[-3000:]}")


def test_the_port_answers_before_the_roots_are_read(tmp_path):
    """On a database at the newest revision (as on every start but the first; a new one is migrated by every other
    server test), the port answers within the bound while the first pass over the runs is still under way."""
    from sqlalchemy import create_engine

    root, url = generated_root(tmp_path, RUNS), f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = create_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    server = Server([root], url, tmp_path / "server.log", flags=("--no-token",))
    try:
        seconds, status = first_answer(server)
        print(f"the port answered {seconds:.2f} s after the process started ({RUNS} runs in the root)")
        assert status == 200
        assert seconds < BOUND_S
        with httpx.Client(base_url=server.url) as api:
            assert api.get("/api/v1/index").json()["indexing"] is True
            assert api.get("/web/runs").status_code == 200
    finally:
        server.stop()
