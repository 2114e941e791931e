"""The dashboard's API over HTTP against a real uvicorn process, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from alembic import command
from alembic.script import ScriptDirectory
from conftest import REPO, run_cli
from dashboard_support import Postgres, Server, trained_root

QUICKSTART = (REPO / "configs" / "quickstart.yaml").read_text()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """A dashboard over the shared trained root, with its database in a SQLite file or a PostgreSQL cluster."""
    root = trained_root(tmp_path_factory.getbasetemp())
    folder = tmp_path_factory.mktemp(request.param)
    postgres = Postgres().start() if request.param == "postgresql" else None
    url = postgres.url if postgres else f"sqlite:///{folder / 'dashboard.db'}"
    running = Server([root], url, folder / "server.log").start()
    yield running
    running.stop()
    if postgres:
        postgres.stop()


# PostgreSQL runs what the database decides (stored types, constraints, cascades, races); a check of parsing, routing or
# static files says the same on either, so it runs on SQLite alone
sqlite_only = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


@pytest.fixture
def api(server):
    with server.client() as client:
        yield client


@pytest.fixture
def project(api, request) -> dict:
    response = api.post("/api/v1/projects", json={"name": request.node.name, "description": "test project"})
    assert response.status_code == 201, response.text
    return response.json()


def test_project_create_list_get_patch_delete(api):
    created = api.post("/api/v1/projects", json={"name": "cifar", "description": "small images"})
    assert created.status_code == 201
    body = created.json()
    assert body["name"] == "cifar" and body["description"] == "small images" and isinstance(body["id"], int)
    assert api.post("/api/v1/projects", json={"name": "cifar"}).status_code == 409
    listed = api.get("/api/v1/projects")
    assert listed.status_code == 200 and "cifar" in [p["name"] for p in listed.json()]
    assert api.get(f"/api/v1/projects/{body['id']}").json()["name"] == "cifar"
    patched = api.patch(f"/api/v1/projects/{body['id']}", json={"description": "renamed"})
    assert patched.status_code == 200 and patched.json()["description"] == "renamed"
    assert api.delete(f"/api/v1/projects/{body['id']}").status_code == 204
    assert api.get(f"/api/v1/projects/{body['id']}").status_code == 404


def test_config_as_sections_and_as_yaml_text(api, project):
    sections = yaml.safe_load(QUICKSTART)
    as_sections = api.post("/api/v1/configs", json={"project_id": project["id"], "name": "qs", "config": sections})
    assert as_sections.status_code == 201, as_sections.text
    as_text = api.post("/api/v1/configs", json={"project_id": project["id"], "name": "qs-text", "yaml": QUICKSTART})
    assert as_text.status_code == 201, as_text.text
    assert as_sections.json()["config_hash"] == as_text.json()["config_hash"]  # the same resolved config
    assert as_text.json()["config"]["train"]["epochs"] == 5
    listed = api.get(f"/api/v1/configs/project/{project['id']}").json()
    assert [c["name"] for c in listed] == ["qs", "qs-text"]
    assert api.get(f"/api/v1/configs/{as_text.json()['id']}").json()["name"] == "qs-text"


@sqlite_only
def test_bad_config_key_is_422_with_the_cli_line(api, project, tmp_path, capsys):
    from utp_dist.train_command import main

    bad = QUICKSTART.replace("epochs: 5", "epochz: 5")
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    capsys.readouterr()
    assert main([str(path)]) == 2  # the training command, in this process: its one line is all that is compared
    cli_line = capsys.readouterr().err.strip().splitlines()[-1].removeprefix("utp_dist: error: ")
    response = api.post("/api/v1/configs", json={"project_id": project["id"], "name": str(path), "yaml": bad})
    assert response.status_code == 422
    assert response.json()["detail"] == cli_line  # named like the file, the message is the CLI's, word for word
    assert "unknown key 'train.epochz'" in cli_line
    wrong_value = api.post("/api/v1/configs", json={"project_id": project["id"], "name": "v", "config": {"train": {"epochs": "many"}}})
    assert wrong_value.status_code == 422 and wrong_value.json()["detail"].startswith("v: train.epochs must be")
    assert api.get(f"/api/v1/configs/project/{project['id']}").json() == []  # nothing invalid was stored


@sqlite_only
def test_malformed_yaml_and_json_are_422_naming_the_line(api, project):
    text = "data:\n  batch_size: 8\ntrain: [epochs: 2\n"
    response = api.post("/api/v1/configs", json={"project_id": project["id"], "name": "broken.yaml", "yaml": text})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("broken.yaml: line 4, column 1: invalid YAML")
    body = b'{\n  "project_id": 1,\n  "name": "x",\n  "config": {oops}\n}'
    response = api.post("/api/v1/configs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("request body: invalid JSON at line 4, column 14")


def test_queue_a_run_then_cancel_and_resume_with_409s(api, project):
    config = api.post("/api/v1/configs", json={"project_id": project["id"], "name": "qs", "yaml": QUICKSTART}).json()
    queued = api.post(f"/api/v1/runs/from-config/{config['id']}")
    assert queued.status_code == 201
    body = queued.json()
    assert set(body) == {"run_id", "job_id", "state"} and body["state"] == "queued"
    run = api.get(f"/api/v1/runs/{body['run_id']}").json()
    assert run["state"] == "queued" and run["config_id"] == config["id"] and run["jobs"][0]["id"] == body["job_id"]
    assert run["config"]["train"]["epochs"] == 5  # the resolved config, defaults included
    assert run["config"]["train"]["monitor_mode"] == "max"
    resumed_early = api.post(f"/api/v1/runs/{body['run_id']}/resume")
    assert resumed_early.status_code == 409 and resumed_early.json()["state"] == "queued"
    cancelled = api.post(f"/api/v1/runs/{body['run_id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = api.post(f"/api/v1/runs/{body['run_id']}/cancel")
    assert again.status_code == 409 and again.json()["state"] == "cancelled"
    assert api.post(f"/api/v1/runs/{body['run_id']}/resume").json()["state"] == "queued"
    with_gpus = api.post(f"/api/v1/runs/from-config/{config['id']}", json={"gpus": 2, "priority": 5})
    assert with_gpus.status_code == 201
    job = api.get(f"/api/v1/runs/{with_gpus.json()['run_id']}").json()["jobs"][0]
    assert (job["gpus"], job["priority"], job["attempt"], job["max_attempts"]) == (2, 5, 0, 3)


def test_deleting_a_project_keeps_its_runs(api, project):
    config = api.post("/api/v1/configs", json={"project_id": project["id"], "name": "qs", "yaml": QUICKSTART}).json()
    run_id = api.post(f"/api/v1/runs/from-config/{config['id']}").json()["run_id"]
    assert api.delete(f"/api/v1/runs/{run_id}").status_code == 409  # queued: cancel it first
    assert api.delete(f"/api/v1/projects/{project['id']}").status_code == 204
    assert api.get(f"/api/v1/configs/{config['id']}").status_code == 404  # its configs went with it
    run = api.get(f"/api/v1/runs/{run_id}").json()
    assert (run["project_id"], run["config_id"], run["state"]) == (None, None, "queued")
    api.post(f"/api/v1/runs/{run_id}/cancel")
    assert api.delete(f"/api/v1/runs/{run_id}").status_code == 204
    assert api.get(f"/api/v1/runs/{run_id}").status_code == 404


def test_unknown_ids_are_404(api):
    assert api.get("/api/v1/projects/999999").status_code == 404
    assert api.get("/api/v1/configs/project/999999").status_code == 404
    assert api.post("/api/v1/configs", json={"project_id": 999999, "name": "x", "config": {}}).status_code == 404
    response = api.post("/api/v1/runs/from-config/999999")
    assert response.status_code == 404 and response.json()["detail"] == "no config with id 999999"
    assert api.get("/api/v1/runs/999999").status_code == 404
    assert api.post("/api/v1/runs/999999/cancel").status_code == 404
    assert api.post("/api/v1/agents/gpus", json={"agent_id": 999999, "index": 0}).status_code == 404


def test_agents_and_their_gpus(api):
    agent = api.post("/api/v1/agents", json={"name": "node-a", "host": "10.0.0.5"})
    assert agent.status_code == 201
    agent_id = agent.json()["id"]
    assert api.post("/api/v1/agents", json={"name": "node-a", "host": "x"}).status_code == 409
    gpu = api.post("/api/v1/agents/gpus", json={"agent_id": agent_id, "index": 0, "name": "NVIDIA H100", "memory_mb": 81559})
    assert gpu.status_code == 201 and gpu.json()["id"]
    assert api.post("/api/v1/agents/gpus", json={"agent_id": agent_id, "index": 0, "name": "dup"}).status_code == 409
    listed = {a["name"]: a for a in api.get("/api/v1/agents").json()}
    assert listed["node-a"]["gpus"][0]["memory_mb"] == 81559 and listed["node-a"]["drain"] is False
    assert api.patch(f"/api/v1/agents/{agent_id}", json={"drain": True}).json()["drain"] is True
    one = api.get(f"/api/v1/agents/{agent_id}").json()
    assert one["drain"] is True and [g["name"] for g in one["gpus"]] == ["NVIDIA H100"]
    assert api.delete(f"/api/v1/agents/{agent_id}").status_code == 204 and api.get(f"/api/v1/agents/{agent_id}").status_code == 404


def test_runs_on_disk_are_listed_with_progress(api):
    runs = api.get("/api/v1/runs", params={"state": "succeeded", "limit": 500}).json()
    seeds = [r for r in runs if r["source"] == "disk" and r["name"].endswith(("seed=1", "seed=2"))]
    assert len(seeds) == 2
    run = api.get(f"/api/v1/runs/{seeds[0]['id']}").json()
    assert run["epoch"] == 1 and run["step"] == 18 and run["best_metric"] == "val_acc@1" and run["best"] is not None
    assert run["summary"]["steps"] == 18 and run["progress"]["data_wait"] is not None
    assert Path(run["paths"]["best_export"]).is_dir()
    assert run["paths"]["confusion_matrix_url"].endswith("confusion_matrix_test.png")
    figure = api.get(run["paths"]["confusion_matrix_url"])
    assert figure.status_code == 200 and figure.content.startswith(b"\x89PNG")
    series = api.get(f"/api/v1/runs/{seeds[0]['id']}/series").json()
    assert series["train"]["train_loss"]["x"][:3] == [2, 4, 6] and len(series["val"]["val_acc@1"]["y"]) == 2
    task = run["sweep_task"]  # the sweep task that trained it: where it ran
    assert task["task"] in (0, 1) and task["job"].startswith("pid:") and task["attempts"] == 1 and task["sweep_id"]
    board = api.get(f"/api/v1/sweeps/{task['sweep_id']}").json()
    assert board["rows"][task["task"]]["logs"] == run["paths"]["logs"]
    in_sweep = api.get("/api/v1/runs", params={"sweep_id": task["sweep_id"]}).json()  # the index links runs to their sweep
    assert sorted(r["id"] for r in in_sweep) == sorted(r["id"] for r in seeds)
    disk_cancel = api.post(f"/api/v1/runs/{seeds[0]['id']}/cancel")
    assert disk_cancel.status_code == 409 and disk_cancel.json()["state"] == "succeeded"


@sqlite_only
def test_pagination_and_openapi(api):
    for i in range(3):
        api.post("/api/v1/projects", json={"name": f"page-{i}"})
    first = api.get("/api/v1/projects", params={"limit": 2, "offset": 0})
    second = api.get("/api/v1/projects", params={"limit": 2, "offset": 2})
    total = int(first.headers["x-total-count"])
    assert len(first.json()) == 2 and total >= 3 and {p["id"] for p in first.json()}.isdisjoint(p["id"] for p in second.json())
    assert api.get("/api/v1/projects", params={"limit": 0}).status_code == 422
    docs = api.get("/docs")
    assert docs.status_code == 200 and "/static/vendor/swagger-ui/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower() and "https://" not in docs.text  # works without internet
    assert api.get("/static/vendor/swagger-ui/swagger-ui-bundle.js").status_code == 200
    paths = api.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/projects", "/api/v1/configs", "/api/v1/configs/project/{project_id}", "/api/v1/runs/from-config/{config_id}"):
        assert path in paths
    assert "/api/v1/agents" in paths and "/api/v1/agents/gpus" in paths


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("nosuchdb://u:secret@x", "is not a usable database URL"),
        ("postgresql+psycopg://u:secret@/x?host=/nonexistent&port=1", "cannot connect"),
    ],
)
def test_a_wrong_database_url_is_one_line(tmp_path, url, says, capsys, monkeypatch):
    from utp_dist.dashboard.__main__ import main

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # the token file it writes first
    monkeypatch.delenv("DASHBOARD_DB_URL", raising=False)
    capsys.readouterr()
    codes = [main(["--root", str(tmp_path), "--db", url])]
    monkeypatch.setenv("DASHBOARD_DB_URL", url)  # the same from the environment
    codes.append(main(["--root", str(tmp_path)]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert codes == [2, 2] and len(lines) == 2, lines
    assert all(says in line and "secret" not in line for line in lines), lines
    if url.startswith("nosuchdb"):  # the real command, end to end: its exit code and its one line
        done = run_cli(
            "--root", str(tmp_path), "--db", url, module="utp_dist.dashboard", timeout=60, XDG_CONFIG_HOME=str(tmp_path / "config")
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and says in lines[0] and "secret" not in lines[0]


def test_concurrent_cancels_one_wins(server, project):
    """Eight clients cancel the same queued run at once: the compare-and-swap lets exactly one through."""
    with server.client() as api:
        config = api.post("/api/v1/configs", json={"project_id": project["id"], "name": "race", "yaml": QUICKSTART}).json()
        run_id = api.post(f"/api/v1/runs/from-config/{config['id']}").json()["run_id"]

    def cancel(_) -> int:
        with server.client() as client:
            return client.post(f"/api/v1/runs/{run_id}/cancel").status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = sorted(pool.map(cancel, range(8)))
    assert codes == [200] + [409] * 7
    with server.client() as api:
        assert api.get(f"/api/v1/runs/{run_id}").json()["state"] == "cancelled"


def test_an_old_database_is_migrated_at_start(tmp_path_factory):
    """A database made by the first migration, with a project in it, is brought to the newest schema at start, data kept."""
    from sqlalchemy import create_engine, text

    from utp_dist.dashboard.migrate import alembic_config

    folder = tmp_path_factory.mktemp("migrate")
    url = f"sqlite:///{folder / 'old.db'}"
    engine = create_engine(url)
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(text("INSERT INTO projects (name, description, created) VALUES ('kept', '', 0)"))
    engine.dispose()
    server = Server([trained_root(tmp_path_factory.getbasetemp())], url, folder / "server.log").start()
    try:
        with server.client() as api:
            assert [p["name"] for p in api.get("/api/v1/projects").json()][0] == "kept"  # then the runs' own, found on disk
            assert all("sweep_id" in r for r in api.get("/api/v1/runs").json())  # the column 0002 added
    finally:
        server.stop()
    with create_engine(url).connect() as connection:
        head = ScriptDirectory.from_config(config).get_current_head()  # the newest migration, whichever that is now
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
