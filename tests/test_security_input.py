"""Hostile input against a real dashboard on SQLite and PostgreSQL: symlinks out of the roots, database and token
files, junk ids, numbers, strings and bodies, and a fuzz pass over every route of the OpenAPI document. Never a 500."""

from __future__ import annotations

import http.server
import json
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from dashboard_support import Postgres, Server, private_root, serving, trained_root

MAX_BODY = 65_536
QUICKSTART = (REPO / "configs" / "quickstart.yaml").read_text()
SECRET = "TOP SECRET from outside the roots"
FUZZ_EXAMPLES = 6  # per route and mode (broken and valid input): ~400 calls, 15-25 s a database on the 2-core test machine


class LimitedServer(Server):
    """The dashboard with a small --max-body, so the limit is tested without megabytes of upload."""

    def command(self) -> list[str]:
        return [*super().command(), "--max-body", str(MAX_BODY)]


def hostile_root(folder: Path) -> tuple[Path, Path]:
    """An output root with one real run and links planted out of it, and a folder outside it with tempting files."""
    root, outside = folder / "root", folder / "outside"
    good = root / "logs" / "shapes" / "good"
    good.mkdir(parents=True)
    (good / "train.log").write_text("epoch 1 hello from the good run\n")
    (outside / "figures").mkdir(parents=True)
    (outside / "secret.log").write_text(SECRET + "\n")
    (outside / "metrics.jsonl").write_text(json.dumps({"split": "val", "epoch": 1, "step": 5, "val_acc@1": 0.99}) + "\n")
    (outside / "figures" / "confusion_matrix_test.png").write_bytes(b"\x89PNG secret")
    (outside / "run").mkdir()
    (outside / "run" / "train.log").write_text(SECRET + "\n")
    later = time.time() + 3600  # newer than the run's own log: a tail reader that follows the link would pick it
    os.utime(outside / "secret.log", (later, later))
    (good / "stolen.log").symlink_to(outside / "secret.log")
    (good / "metrics.jsonl").symlink_to(outside / "metrics.jsonl")
    (good / "figures").symlink_to(outside / "figures")
    (root / "logs" / "x").symlink_to("/etc")  # every folder of /etc would be a run
    (root / "logs" / "shapes" / "linked").symlink_to(outside / "run")
    # files that must never be served: an old database, its journal, the token, a database under an innocent name
    with sqlite3.connect(root / "old.sqlite3") as db:
        db.execute("CREATE TABLE t (x)")
    (root / "old.sqlite3-journal").write_bytes(b"journal")
    (root / "notes.txt").write_bytes((root / "old.sqlite3").read_bytes())
    (root / "dashboard.token").write_text("a-token-that-must-stay-private")
    (root / "figure.png").symlink_to(root / "old.sqlite3")
    (outside / "dataset").mkdir()
    (outside / "dataset" / "logs" / "ds" / "run").mkdir(parents=True)
    (outside / "dataset" / "logs" / "ds" / "run" / "train.log").write_text(SECRET + "\n")
    return root, outside


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """A dashboard over a hostile root; on SQLite its database lies in the root, as the old default had it."""
    folder = tmp_path_factory.mktemp(f"input-{request.param}")
    root, outside = hostile_root(folder)
    postgres = Postgres().start() if request.param == "postgresql" else None
    url = postgres.url if postgres else f"sqlite:///{root / 'dashboard.db'}"
    running = LimitedServer([root], url, folder / "server.log").start()
    running.root, running.outside = root, outside
    yield running
    running.stop()
    if postgres:
        postgres.stop()


@pytest.fixture(scope="module")
def made(server) -> dict:
    """A project, a config and an agent to aim junk at."""
    with server.client() as api:
        project = api.post("/api/v1/projects", json={"name": "junk"}).json()["id"]
        config = api.post("/api/v1/configs", json={"project_id": project, "name": "qs", "yaml": QUICKSTART}).json()["id"]
        agent = api.post("/api/v1/agents/register", json={"name": "junk-agent", "gpus": [{"index": 0}]}).json()["agent_id"]
    return {"project": project, "config": config, "agent": agent}


def form_token(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def one_line(response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail, response.text
    return detail


# --- symlinks out of the roots


def test_links_out_of_the_roots_index_nothing_and_show_nothing(server):
    with server.client() as api:
        api.post("/api/v1/index/refresh")
        runs = api.get("/api/v1/runs", params={"limit": 500}).json()
        assert [(r["dataset"], r["name"]) for r in runs if r["source"] == "disk"] == [("shapes", "good")]
        good = next(r for r in runs if r["name"] == "good")
        detail = api.get(f"/api/v1/runs/{good['id']}").json()
        assert detail["paths"]["log"].endswith("train.log")
        assert detail["paths"]["confusion_matrix_url"] is None and detail["best"] is None
        series = api.get(f"/api/v1/runs/{good['id']}/series", params={"log": True}).json()
        assert "hello from the good run" in series["log"] and SECRET not in series["log"]
        assert series["val"] == {}
        page = api.get(f"/web/runs/{good['id']}")
        assert page.status_code == 200 and SECRET not in page.text


def test_a_run_folder_reported_outside_the_roots_is_not_read(server, made):
    """An agent may report any run folder; the server reads it only inside its roots."""
    with server.client() as api:
        queued = api.post(f"/api/v1/runs/from-config/{made['config']}").json()
        job = api.post("/api/v1/jobs/claim", json={"agent_id": made["agent"], "free_gpus": 1}).json()["job"]
        assert job["job_id"] == queued["job_id"]
        folder = {"root": str(server.outside / "dataset"), "dataset": "ds", "name": "run"}
        call = {"agent_id": made["agent"], "attempt": job["attempt"]}
        assert api.post(f"/api/v1/jobs/{job['job_id']}/progress", json={**call, "run_folder": folder}).status_code == 204
        detail = api.get(f"/api/v1/runs/{queued['run_id']}").json()
        assert not any(detail["paths"].values()) and detail["root"] == folder["root"]  # no file of it named or linked
        assert SECRET not in json.dumps(detail)
        series = api.get(f"/api/v1/runs/{queued['run_id']}/series", params={"log": True}).json()
        assert SECRET not in json.dumps(series)
        api.post(f"/api/v1/jobs/{job['job_id']}/finish", json={**call, "exit_code": 1})


@pytest.mark.parametrize(
    "path",
    [
        "logs/shapes/good/stolen.log",
        "logs/shapes/good/figures/confusion_matrix_test.png",
        "logs/x/passwd",
        "logs/shapes/linked/train.log",
        "..%2Foutside%2Fsecret.log",
    ],
)
def test_files_through_links_out_are_refused_without_naming_server_paths(server, path):
    with server.client() as api:
        response = api.get(f"/files/0/{path}")
    assert response.status_code == 403
    detail = one_line(response)
    assert str(server.root.parent) not in detail and "/etc" not in detail


@pytest.mark.parametrize(
    "path",
    [
        "dashboard.db",
        "dashboard.db-wal",
        "old.sqlite3",
        "old.sqlite3-journal",
        "notes.txt",
        "dashboard.token",
        "figure.png",
        "DASHBOARD.TOKEN",
    ],
)
def test_database_and_token_files_are_never_served(server, path):
    if path.startswith("dashboard.db") and not (server.root / path).exists():
        pytest.skip("this server's database is not in the root")
    with server.client() as api:
        response = api.get(f"/files/0/{path}")
        assert response.status_code in (403, 404) and "SQLite" not in response.text and "must-stay-private" not in response.text
        one_line(response)
        assert api.get("/files/0/logs/shapes/good/train.log").text.startswith("epoch 1")


# --- junk input: 404/409/413/422 with one line, never a 500

BIG = 2**63
JUNK = [
    ("id above 2^63 in a path", "GET", "/api/v1/runs/{big}", None, {422}),
    ("id above 2^31 in a path", "GET", "/api/v1/projects/2147483648", None, {422}),
    ("negative id in a path", "DELETE", "/api/v1/agents/-1", None, {422}),
    ("id above 2^63 in a body", "POST", "/api/v1/configs", {"project_id": BIG, "name": "x", "yaml": "train: 1"}, {422}),
    ("id above 2^31 in a body", "POST", "/api/v1/jobs/claim", {"agent_id": 2**31}, {422}),
    ("huge ids in a refused list", "POST", "/api/v1/jobs/claim", {"agent_id": "{agent}", "refused": [BIG]}, {422}),
    ("huge job id", "POST", "/api/v1/jobs/{big}/start", {"agent_id": "{agent}", "attempt": 1, "pid": 1}, {422}),
    ("priority 2**70", "POST", "/api/v1/runs/from-config/{config}", {"priority": 2**70}, {422}),
    ("priority 2**40", "POST", "/api/v1/runs/from-config/{config}", {"priority": 2**40}, {422}),
    ("memory_mb 2**70", "POST", "/api/v1/agents/gpus", {"agent_id": "{agent}", "index": 3, "memory_mb": 2**70}, {422}),
    (
        "memory_mb 2**70 at registration",
        "POST",
        "/api/v1/agents/register",
        {"name": "m", "gpus": [{"index": 0, "memory_mb": 2**70}]},
        {422},
    ),
    ("a duplicate GPU index", "POST", "/api/v1/agents/register", {"name": "d", "gpus": [{"index": 1}, {"index": 1}]}, {422}),
    ("10,000 GPUs", "POST", "/api/v1/agents/register", {"name": "many", "gpus": [{"index": i} for i in range(10_000)]}, {413, 422}),
    ("65 GPUs", "POST", "/api/v1/agents/register", {"name": "many", "gpus": [{"index": i} for i in range(65)]}, {422}),
    ("a GPU added twice", "POST", "/api/v1/agents/gpus", {"agent_id": "{agent}", "index": 0}, {409}),
    ("NUL in a name", "POST", "/api/v1/projects", {"name": "a\x00b"}, {422}),
    ("NUL in a description", "PATCH", "/api/v1/projects/{project}", {"description": "a\x00b"}, {422}),
    ("NUL in config text", "POST", "/api/v1/configs", {"project_id": "{project}", "name": "nul", "yaml": "train:\n  epochs: 1\x00"}, {422}),
    ("NUL in a config key", "POST", "/api/v1/configs", {"project_id": "{project}", "name": "nul", "config": {"train\x00": {}}}, {422}),
    (
        "NUL in an agent's log tail",
        "POST",
        "/api/v1/jobs/1/finish",
        {"agent_id": 1, "attempt": 1, "exit_code": 1, "log_tail": "\x00"},
        {422},
    ),
    ("NUL in a query", "GET", "/api/v1/runs?q=%00", None, {200, 422}),
    ("NUL in a file path", "GET", "/files/0/a%00b", None, {404, 422}),
    ("a name of spaces", "POST", "/api/v1/projects", {"name": "   "}, {422}),
    ("a rename to spaces", "PATCH", "/api/v1/projects/{project}", {"name": " \t "}, {422}),
    ("an agent name of spaces", "POST", "/api/v1/agents/register", {"name": "  "}, {422}),
    ("a config name taken in the project", "POST", "/api/v1/configs", {"project_id": "{project}", "name": "qs", "yaml": QUICKSTART}, {409}),
    ("a host longer than its column", "POST", "/api/v1/agents", {"name": "long-host", "host": "h" * 300}, {422}),
    ("offset 2**70", "GET", "/api/v1/projects?offset=1180591620717411303424", None, {422}),
    ("project filter 2**70", "GET", "/api/v1/runs?project_id=1180591620717411303424", None, {422}),
    ("huge ids to look up", "GET", "/api/v1/jobs/by-run?ids=1180591620717411303424", None, {200, 422}),
    ("a huge id on a page", "GET", "/web/runs/1180591620717411303424", None, {404, 422}),
    ("huge ids to compare", "GET", "/web/compare?ids=1180591620717411303424&ids=1", None, {404, 422}),
]


def expand(value, made: dict):
    """Fill "{project}", "{config}", "{agent}" and "{big}" in a URL or body with this server's ids."""
    if isinstance(value, str):
        ids = {"big": BIG, **made}
        if value[1:-1] in ids and value[0] == "{":  # a whole value: the id as a number
            return ids[value[1:-1]]
        return re.sub(r"\{(big|project|config|agent)\}", lambda m: str(ids[m.group(1)]), value)
    if isinstance(value, dict):
        return {expand(k, made): expand(v, made) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, made) for v in value]
    return value


@pytest.mark.parametrize("what, method, url, body, expected", JUNK, ids=[case[0] for case in JUNK])
def test_junk_input_is_a_4xx_with_one_line(server, made, what, method, url, body, expected):
    with server.client() as api:
        response = api.request(method, expand(url, made), json=expand(body, made) if body is not None else None)
    assert response.status_code in expected, f"{what}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400 and not url.startswith("/web/"):
        one_line(response)


def test_nan_and_infinity_are_422(server, made):
    """JSON has no NaN, but Python's parser takes it: stored, it would break every later answer with the run."""
    with server.client() as api:
        headers = {"content-type": "application/json"}
        body = json.dumps({"project_id": made["project"], "name": "nan", "config": {"optim": {"lr": float("nan")}}})
        assert api.post("/api/v1/configs", content=body, headers=headers).status_code == 422
        body = json.dumps({"agent_id": made["agent"], "attempt": 1, "best": float("inf")})  # Python writes Infinity
        response = api.post("/api/v1/jobs/1/progress", content=body, headers=headers)
        assert response.status_code == 422 and "finite" in one_line(response)


def test_validation_errors_name_the_field_in_one_line(server, made):
    with server.client() as api:
        response = api.post(f"/api/v1/runs/from-config/{made['config']}", json={"priority": 2**70})
        assert one_line(response).startswith("body.priority: Input should be less than or equal to 2147483647")
        assert response.json()["errors"][0]["loc"] == ["body", "priority"]
        duplicate = api.post("/api/v1/agents/register", json={"name": "d", "gpus": [{"index": 1}, {"index": 1}]})
        assert "GPU index 1 is listed twice" in one_line(duplicate)


def test_bodies_above_the_limit_are_413(server):
    with server.client() as api:
        fits = api.post("/api/v1/projects", json={"name": "big-enough", "description": "d" * (MAX_BODY - 100)})
        assert fits.status_code == 201
        too_big = api.post("/api/v1/projects", json={"name": "too-big", "description": "d" * MAX_BODY})
        assert (
            too_big.status_code == 413 and one_line(too_big) == f"request body larger than {MAX_BODY:,} bytes (the dashboard's --max-body)"
        )

        def chunks():  # no Content-Length: the limit counts the bytes as they arrive
            yield b'{"name": "chunked", "description": "'
            for _ in range(MAX_BODY // 4096 + 1):
                yield b"d" * 4096
            yield b'"}'

        chunked = api.post("/api/v1/projects", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        names = [p["name"] for p in api.get("/api/v1/projects").json()]
        assert "too-big" not in names and "chunked" not in names


def test_the_queue_form_checks_the_gpu_count_as_the_api_does(server, made):
    with server.client(follow_redirects=False) as browser:
        page = browser.get(f"/web/projects/{made['project']}/runs")
        token = form_token(page.text)
        for gpus in ("abc", "-1", "65", "1e400"):
            response = browser.post(f"/web/configs/{made['config']}/queue", data={"csrf": token, "gpus": gpus})
            assert response.status_code == 422, (gpus, response.text[:300])
            assert "gpus: Input should" in response.text
        assert browser.post(f"/web/configs/{made['config']}/queue", data={"csrf": token, "gpus": "2"}).status_code == 303


def test_a_config_name_taken_in_the_form_is_shown_as_409(server, made):
    with server.client(follow_redirects=False) as browser:
        page = browser.get(f"/web/projects/{made['project']}/configs")
        response = browser.post(
            f"/web/projects/{made['project']}/configs", data={"csrf": form_token(page.text), "name": "qs", "text": QUICKSTART}
        )
        assert response.status_code == 409 and "already has a config named" in response.text


def test_the_dashboard_executor_reuses_a_stored_config_or_takes_the_next_name(server, made):
    """Config names are unique in a project: a resubmission finds its config again; another config gets NAME-v1."""
    from utp_dist.agent.client import Client
    from utp_dist.config import from_dict, parse_yaml
    from utp_dist.sweep.executors import DashboardExecutor
    from utp_dist.sweep.resources import Resources

    executor, client = DashboardExecutor(Resources(), server=server.url), Client(server.url, token=server.token)
    same = parse_yaml(QUICKSTART, "qs")
    assert (
        executor._config(client, made["project"], {"name": "qs", "config_hash": from_dict(same, "qs").fingerprint()}, same)
        == made["config"]
    )
    other = {**same, "train": {**same.get("train", {}), "epochs": 7}}
    renamed = executor._config(client, made["project"], {"name": "qs", "config_hash": from_dict(other, "qs").fingerprint()}, other)
    with server.client() as api:
        assert api.get(f"/api/v1/configs/{renamed}").json()["name"] == "qs-v1"


def test_a_sweep_board_reads_no_run_outside_the_roots(tmp_path_factory):
    """A ledger names any output root; the board shows progress only of runs inside the dashboard's roots."""
    root = private_root(tmp_path_factory, "sweep-outside")
    ledger_file = root / "sweeps" / "seeds" / "sweep.json"
    with serving(root, tmp_path_factory, "sweep-outside") as server, server.client() as api:
        sweep = api.get("/api/v1/sweeps").json()[0]["id"]
        assert api.get(f"/api/v1/sweeps/{sweep}").json()["rows"][0]["step"] == 18
        ledger = json.loads(ledger_file.read_text())
        for task in ledger["tasks"]:  # the session's trained root: the same runs, outside this server's root
            task["output_root"] = str(trained_root(tmp_path_factory.getbasetemp()))
        ledger_file.write_text(json.dumps(ledger))
        board = api.get(f"/api/v1/sweeps/{sweep}").json()
        assert [row["step"] for row in board["rows"]] == [None] * 4 and [row["best"] for row in board["rows"]] == [None] * 4


def test_a_planted_sweep_folder_neither_sends_the_token_away_nor_runs_code(tmp_path_factory):
    """Anyone who may write into an output root can plant a sweep folder: its ledger names the server the board asks
    (with the dashboard's token) and its task configs are what "Resubmit failed" trains. Neither is taken on trust."""
    root = private_root(tmp_path_factory, "sweep-planted")
    ledger_file = root / "sweeps" / "seeds" / "sweep.json"
    heard: list[dict] = []

    class Listener(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the standard library's name)
            heard.append(dict(self.headers))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    listener = http.server.HTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    original = ledger_file.read_text()
    with serving(root, tmp_path_factory, "sweep-planted") as server, server.client() as api:
        sweep = api.get("/api/v1/sweeps").json()[0]["id"]
        ledger = json.loads(original)
        ledger["executor"] = "dashboard"
        for task in ledger["tasks"]:
            task["jobs"] = [f"http://127.0.0.1:{listener.server_port}/web/runs/{task['index'] + 1}"]
        ledger_file.write_text(json.dumps(ledger))
        board = api.get(f"/api/v1/sweeps/{sweep}").json()
        assert "not on this dashboard; it is not contacted from here" in board["error"] and board["rows"] == []
        resubmit = api.post(f"/api/v1/sweeps/{sweep}/resubmit-failed").json()
        assert resubmit["exit_code"] == 2 and "not contacted from here" in resubmit["message"]
        assert heard == []  # no request, so no token, left for the planted server

        ledger = json.loads(original)  # its own executor again, and a task config that names a shell command as its loss
        marker = root / "PLANTED"
        planted = yaml.safe_load(Path(ledger["tasks"][0]["config"]).read_text())
        planted["train"].update(loss="os:system", loss_options={"command": f"touch {marker}"})
        (root / "planted.yaml").write_text(yaml.safe_dump(planted))
        ledger["tasks"][0]["config"] = str(root / "planted.yaml")
        ledger_file.write_text(json.dumps(ledger))
        resubmit = api.post(f"/api/v1/sweeps/{sweep}/resubmit-failed").json()
        assert resubmit["exit_code"] == 2
        assert "task 0: train.loss: 'os:system' is not a registered loss" in resubmit["message"], resubmit
        time.sleep(1)
        assert not marker.exists()
    listener.shutdown()


# --- the fuzz pass: last, as it deletes what the tests above made


def test_no_route_of_the_openapi_document_answers_500(server, made):
    """Every operation, with bodies, parameters and ids generated from its schema (valid ones and broken ones)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    with server.client() as api:
        headers = dict(api.headers)
        document = api.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    failures, calls, started = [], 0, time.monotonic()
    for operation in (result.ok() for result in schema.get_all_operations()):
        for mode in (schemathesis.GenerationMode.NEGATIVE, schemathesis.GenerationMode.POSITIVE):

            @given(operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=FUZZ_EXAMPLES, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)
            )
            def call(case):
                nonlocal calls
                calls += 1
                response = case.call(base_url=server.url, headers=headers, timeout=60)
                if response.status_code >= 500:
                    failures.append(
                        f"{case.operation.label} {case.path_parameters} {case.query} {str(case.body)[:200]}: {response.status_code}"
                    )

            try:
                call()
            except Unsatisfiable:  # an operation without parameters has no broken form
                pass
    elapsed = time.monotonic() - started
    print(f"fuzz: {calls} calls over {len(document['paths'])} paths in {elapsed:.1f} s")
    assert not failures, "\n".join(failures[:20])
    assert calls > 100 and elapsed < 120
