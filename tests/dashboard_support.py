"""Real parts for the dashboard tests: a uvicorn server process, a PostgreSQL cluster from Debian's package, trained runs."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml
from conftest import REPO, make_image_folder, run_here, tiny_config

READY_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s\n{tail}")


class Server:
    """`python -m utp_dist.dashboard` as a real process on a free port, with a home of its own.

    Its XDG_CONFIG_HOME and XDG_DATA_HOME lie in a folder of its own (`home`), so the token it generates on its
    first start (or `token`, given through UTP_DASHBOARD_TOKEN) and its default files never touch the user's;
    `xdg_env()` points agents and `submit` there, so they find the token as the same user's processes do.
    """

    def __init__(
        self,
        roots: list[Path],
        db_url: str | None,
        log: Path,
        host: str = "127.0.0.1",
        token: str | None = None,
        flags: tuple[str, ...] = (),
        home: Path | None = None,
    ):
        """`db_url` None: the default database; `flags`: more command-line flags; `home`: another server's, to share its token."""
        self.roots, self.db_url, self.log, self.host, self.given_token, self.flags = roots, db_url, log, host, token, flags
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = home or log.parent / f"home-{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def token_file(self) -> Path:
        return self.home / "config" / "utp_dist" / "dashboard.token"

    @property
    def token(self) -> str | None:
        """The token clients send: the one given, else the one the server wrote on its first start."""
        if self.given_token:
            return self.given_token
        return self.token_file.read_text().strip() if self.token_file.exists() else None

    def xdg_env(self) -> dict[str, str]:
        """The server's config and data folders, for a process of the same user (it finds the token file there)."""
        return {"XDG_CONFIG_HOME": str(self.home / "config"), "XDG_DATA_HOME": str(self.home / "data")}

    def command(self) -> list[str]:
        roots = [arg for root in self.roots for arg in ("--root", str(root))]
        cmd = [sys.executable, "-m", "utp_dist.dashboard", "--host", self.host, "--port", str(self.port), *roots]
        return cmd + (["--db", self.db_url] if self.db_url else []) + ["--index-interval", "1", *self.flags]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "UTP_DASHBOARD_TOKEN"}
        env.update(self.xdg_env(), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
        if self.given_token:
            env["UTP_DASHBOARD_TOKEN"] = self.given_token
        return env

    def start(self) -> Server:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command(), env=self.env(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        wait_until(self._ready, READY_TIMEOUT_S, f"dashboard on port {self.port}", self.log)
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"dashboard exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{self.url}/static/app.css", timeout=2).status_code != 200:
                return False
            # the server indexes the roots in the background: tests start from a complete index
            token = self.token
            index = httpx.get(f"{self.url}/api/v1/index", headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=2)
            return index.status_code != 200 or not index.json()["indexing"]
        except httpx.HTTPError:
            return False

    def client(self, authed: bool = True, **kwargs) -> httpx.Client:
        """An HTTP client of this server; `authed` sends the token as a Bearer header."""
        token = self.token if authed else None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, timeout=60, headers=headers, **kwargs)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Postgres:
    """A throw-away PostgreSQL cluster from Debian's `postgresql` package: free port, unix socket in a temp dir."""

    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (tests/run.sh does)")
        self.bin = Path(bins[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="utp-pg-"))  # not under pytest's 0700 root-owned folder: postgres must reach it
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        # the server refuses to run as root: as root (CI), run it as the package's postgres user
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://utp@/dashboard?host={self.dir}&port={self.port}"

    def start(self) -> Postgres:
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        init = [*self.as_user, str(self.bin / "initdb"), "-D", str(data), "-U", "utp", "--auth=trust", "-E", "UTF8", "--no-sync"]
        subprocess.run(init, check=True, capture_output=True, timeout=120)
        log = open(self.dir / "postgres.log", "ab")
        server = [str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.dir), "-c", "listen_addresses="]
        self.proc = subprocess.Popen([*self.as_user, *server, "-c", "fsync=off"], stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._ready, READY_TIMEOUT_S, "postgres", self.dir / "postgres.log")
        import psycopg

        with psycopg.connect(host=str(self.dir), port=self.port, user="utp", dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE dashboard")
        return self

    def _ready(self) -> bool:
        import psycopg

        if self.proc.poll() is not None:
            raise RuntimeError(f"postgres exited: {(self.dir / 'postgres.log').read_text()[-2000:]}")
        try:
            psycopg.connect(host=str(self.dir), port=self.port, user="utp", dbname="postgres", connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # as root the server runs under runuser, which does not pass SIGINT on (30 s of waiting): pg_ctl stops it at once
            pg_ctl = [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "stop", "-m", "fast"]
            subprocess.run(pg_ctl, capture_output=True, timeout=60)
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def trained_root(basetemp: Path) -> Path:
    """An output root, built once per test session: a 4-task sweep (2 seeds x a good and a missing data root) = 2 finished
    runs, 2 failed tasks. Parallel workers (pytest-xdist) share one: the first builds it under a lock, the others wait."""
    from filelock import FileLock

    shared = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp  # the session's folder above the workers'
    root = shared / "dashboard-root"
    with FileLock(str(shared / "dashboard-root.lock")):
        if (root / "READY").exists():
            return root
        images = make_image_folder(shared / "dashboard-images" / "shapes")
        base = tiny_config(images, root)
        grid = {"name": "seeds", "base": base, "sweep": {"train.seed": [1, 2], "data.root": [str(images), str(shared / "missing-images")]}}
        grid_file = shared / "dashboard-grid.yaml"
        grid_file.write_text(yaml.safe_dump(grid))
        done = run_here(str(grid_file), "--executor", "debug", module="utp_dist.submit")
        assert "succeeded" in done.stdout, done.stdout + done.stderr
        (root / "READY").write_text("")
    return root


def generated_root(folder: Path, runs: int) -> Path:
    """An output root of `runs` finished run folders without weights, as benchmarks/dashboard_runs_list.py writes them
    (seconds for hundreds, where trained runs take minutes)."""
    root = folder / "experiments"
    benchmark("dashboard_runs_list").generate(root, runs)
    return root


def benchmark(name: str):
    """The module benchmarks/NAME.py, for what a test measures or builds the same way."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_root(source: Path, target: Path) -> Path:
    """A private copy of an output root (symlinks kept as links) for tests that change it; its sweep ledgers name the
    copy as their tasks' output root (the dashboard reads no run outside its roots)."""
    shutil.copytree(source, target, symlinks=True)
    for ledger in target.glob("sweeps/*/sweep.json"):
        data = json.loads(ledger.read_text())
        for task in data["tasks"]:
            if Path(task["output_root"]).resolve() == source.resolve():
                task["output_root"] = str(target.resolve())
        ledger.write_text(json.dumps(data, indent=1))
    return target


def private_root(tmp_path_factory, name: str) -> Path:
    """A copy of the session's trained root that one test module may change."""
    return copy_root(trained_root(tmp_path_factory.getbasetemp()), tmp_path_factory.mktemp(name) / "root")


@contextmanager
def serving(root: Path, tmp_path_factory, name: str, **options) -> Iterator[Server]:
    """A dashboard over `root` with its own SQLite database, stopped on exit."""
    folder = tmp_path_factory.mktemp(name)
    server = Server([root], f"sqlite:///{folder / 'db.sqlite'}", folder / "server.log", **options).start()
    try:
        yield server
    finally:
        server.stop()


CHROMIUM = "/usr/bin/chromium"  # Debian's, driven by Playwright
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def logged_in_page(server: Server) -> Iterator:
    """A headless Chromium page logged in to `server` through the login URL the dashboard prints on its first start;
    `page.errors` collects script errors and what the Content-Security-Policy blocked (only a console message)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(base_url=server.url, viewport={"width": 1360, "height": 1000}).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.on("console", lambda message: errors.append(message.text) if "Content Security Policy" in message.text else None)
        page.errors = errors
        page.goto(f"/web/login?token={server.token}")
        try:
            yield page
        finally:
            browser.close()
