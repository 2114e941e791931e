"""Nothing from the database runs as code, and agent tokens reach only the agent endpoints: a real server and real agents."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO, make_image_folder, tiny_config
from dashboard_support import Postgres, Server, wait_until

TOKEN = "user-token-of-the-refs-tests"
ALLOWED = "tests.allowed_ext"
ENV = {**{k: v for k, v in os.environ.items() if k != "UTP_DASHBOARD_TOKEN"}, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
HINT = "(an operator can allow a module with --allow-import)"


class AllowingServer(Server):
    """The dashboard with a token, importing the test extension module on --allow-import."""

    def command(self) -> list[str]:
        return super().command() + ["--allow-import", ALLOWED]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("refs")


@pytest.fixture(scope="module")
def images(folder) -> Path:
    return make_image_folder(folder / "shapes", per_class={"train": 4, "val": 2, "test": 1})


@pytest.fixture(scope="module")
def server(folder):
    db = folder / "db.sqlite"
    started = AllowingServer([folder / "root"], f"sqlite:///{db}", folder / "server.log", token=TOKEN).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as authed:
        yield authed


@pytest.fixture(scope="module")
def project(client) -> int:
    return client.post("/api/v1/projects", json={"name": "refs"}).json()["id"]


def poisoned(images: Path, root: Path, marker: Path) -> dict[str, dict]:
    """One config per registry that names os:system (the two with options would run `touch marker` if it were imported)."""
    touch = {"command": f"touch {marker}"}
    return {
        "train.loss": tiny_config(images, root, train={"loss": "os:system", "loss_options": touch}),
        "model.builder": tiny_config(images, root, model={"builder": "os:system"}),
        "data.dataset": tiny_config(images, root, data={"dataset": "os:system"}),
        "data.batch_transforms": tiny_config(
            images, root, data={"batch_transforms": ["os:system"], "batch_transform_options": {"os:system": touch}}
        ),
        "train.metrics": tiny_config(images, root, train={"metrics": ["os:system"]}),
        "train.callbacks": tiny_config(images, root, train={"callbacks": ["os:system"]}),
    }


def refused_line(key: str) -> re.Pattern:
    return re.compile(rf"{re.escape(key)}: 'os:system' is not a registered [a-z ]+; registered: [a-z_, ]+ {re.escape(HINT)}")


# --- item: a stored config may name only registered code


@pytest.mark.parametrize(
    "key", ["train.loss", "model.builder", "data.dataset", "data.batch_transforms", "train.metrics", "train.callbacks"]
)
def test_a_config_naming_os_system_is_422_naming_the_key(key, client, project, images, folder):
    config = poisoned(images, folder / "root", folder / "never")[key]
    made = client.post("/api/v1/configs", json={"project_id": project, "name": f"evil-{key}", "config": config})
    assert made.status_code == 422 and refused_line(key).fullmatch(made.json()["detail"]), made.text


def test_the_exact_line_options_cannot_smuggle_a_path_and_the_form_refuses_too(client, project, images, folder):
    config = poisoned(images, folder / "root", folder / "never")["train.loss"]
    made = client.post("/api/v1/configs", json={"project_id": project, "name": "evil", "config": config})
    assert made.json()["detail"] == (
        f"train.loss: 'os:system' is not a registered loss; registered: cross_entropy, focal, soft_cross_entropy {HINT}"
    )
    # the server imported tests.allowed_ext on --allow-import: its callback is listed
    callbacks = poisoned(images, folder / "root", folder / "never")["train.callbacks"]
    detail = client.post("/api/v1/configs", json={"project_id": project, "name": "evil", "config": callbacks}).json()["detail"]
    assert detail == f"train.callbacks: 'os:system' is not a registered callback; registered: allowed_quiet {HINT}"
    smuggled = tiny_config(images, folder / "root", data={"batch_transforms": ["mixup"], "batch_transform_options": {"os:system": {}}})
    made = client.post("/api/v1/configs", json={"project_id": project, "name": "smuggled", "config": smuggled})
    assert made.status_code == 422 and made.json()["detail"].startswith(
        "smuggled: data.batch_transform_options.os:system: 'os:system' is not configured"
    )
    page = f"/web/projects/{project}/configs"
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get(page).text).group(1)
    posted = client.post(page, data={"csrf": csrf, "name": "evil.yaml", "text": "train:\n  callbacks: ['os:system']\n"})
    assert posted.status_code == 422 and refused_line("train.callbacks").search(html.unescape(posted.text)), posted.text[-2000:]
    assert not [c for c in client.get(f"/api/v1/configs/project/{project}").json() if c["name"].startswith(("evil", "smuggled"))]


def test_allow_import_lets_the_modules_names_and_paths_through_and_nothing_beside_it(client, project, images, folder):
    def post(callbacks: list[str]):
        config = tiny_config(images, folder / "root", train={"callbacks": callbacks})
        return client.post("/api/v1/configs", json={"project_id": project, "name": f"cb-{time.monotonic_ns()}", "config": config})

    assert post(["allowed_quiet", f"{ALLOWED}:Unlisted"]).status_code == 201
    for outside in ("tests.hooks:SlowSteps", "tests.allowed_extra:Quiet", "tests:allowed_ext"):
        answer = post([outside])
        assert answer.status_code == 422 and answer.json()["detail"].startswith(f"train.callbacks: '{outside}' is not a registered"), (
            outside
        )


def test_the_agent_checks_again_and_its_training_process_imports_the_allowed_modules(tmp_path):
    """In fresh processes, so this test process never imports tests.allowed_ext (its registries keep their built-ins)."""
    job = "{'config_name': 'c', 'config': {'data': {'root': 'x'}, 'output': {'root': %r}, 'train': {'callbacks': %r}}}"
    check = (
        "from utp_dist.agent.runner import Runner; from utp_dist.registry import allow_imports\n"
        f"runner = Runner(__import__('pathlib').Path({str(tmp_path / 'work')!r}), allow_imports([{ALLOWED!r}]))\n"
        f"print(runner.cannot_run({job % (str(tmp_path / 'out'), ['allowed_quiet', ALLOWED + ':Unlisted'])}))\n"
        f"print(runner.cannot_run({job % (str(tmp_path / 'out'), ['tests.hooks:SlowSteps'])}))\n"
    )
    done = subprocess.run([sys.executable, "-c", check], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == [
        "None",
        "its config names code this agent does not run: train.callbacks: 'tests.hooks:SlowSteps' is not a registered callback; "
        f"registered: allowed_quiet {HINT}",
    ], done.stderr
    lookup = "from utp_dist.registry import CALLBACKS; print(CALLBACKS.get('allowed_quiet').__qualname__)"
    child = subprocess.run(
        [sys.executable, "-c", lookup], env={**ENV, "UTP_DIST_IMPORT": ALLOWED}, cwd=REPO, capture_output=True, text=True
    )
    assert child.stdout.strip() == "Quiet", child.stderr


def test_an_allowed_module_that_does_not_import_is_one_line_and_exit_2(tmp_path, capsys):
    from utp_dist.agent.__main__ import main as agent
    from utp_dist.dashboard.__main__ import main as dashboard

    assert dashboard(["--root", str(tmp_path), "--allow-import", "no_such_team"]) == 2
    assert agent(["--server", "http://127.0.0.1:1", "--workdir", str(tmp_path), "--allow-import", "os; rm"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "utp_dist: error: --allow-import no_such_team: cannot import it (No module named 'no_such_team'); is it installed or on PYTHONPATH?",
        "utp_dist: error: --allow-import 'os; rm': give a module name, e.g. my_team or my_team.losses",
    ]


@pytest.fixture(scope="module")
def postgres():
    cluster = Postgres().start()
    yield cluster
    cluster.stop()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_row_written_straight_into_the_database_is_refused_by_the_agent_never_run(database, request, server, images, tmp_path):
    from sqlalchemy import create_engine, update

    from utp_dist.dashboard.db import ConfigRow

    if database == "postgresql":
        db_url = request.getfixturevalue("postgres").url
        server = AllowingServer([tmp_path / "root"], db_url, tmp_path / "server.log", token=TOKEN).start()
        request.addfinalizer(server.stop)
    else:
        db_url = server.db_url
    marker = tmp_path / "marker"
    configs = poisoned(images, tmp_path / "root", marker)
    engine = create_engine(db_url)
    with server.client() as client:
        project = client.post("/api/v1/projects", json={"name": f"direct-{database}"}).json()["id"]
        runs = {}
        for key, config in configs.items():
            made = client.post(
                "/api/v1/configs", json={"project_id": project, "name": key, "config": tiny_config(images, tmp_path / "root")}
            )
            with engine.begin() as connection:  # what someone with the database's password could do
                connection.execute(update(ConfigRow).where(ConfigRow.id == made.json()["id"]).values(config=config))
            runs[key] = client.post(f"/api/v1/runs/from-config/{made.json()['id']}", json={}).json()["run_id"]
        engine.dispose()
        cmd = [sys.executable, "-m", "utp_dist.agent", "--server", server.url, "--token", TOKEN, "--name", "guard", "--gpus", "none"]
        cmd += ["--poll", "0.2", "--workdir", str(tmp_path / "work"), "--allow-import", ALLOWED]
        with open(tmp_path / "agent.log", "ab") as log:
            agent = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            jobs = {}

            def all_refused() -> bool:
                jobs.update({key: client.get(f"/api/v1/runs/{run}").json()["jobs"][-1] for key, run in runs.items()})
                return all(job["reason"] for job in jobs.values())

            wait_until(all_refused, 60, "six refusals", tmp_path / "agent.log")
            assert agent.poll() is None  # a refusal is no crash: the agent goes on serving
        finally:
            agent.kill()
            agent.wait()
        for key, job in jobs.items():
            prefix = "refused by agent guard: its config names code this agent does not run: "
            assert job["state"] == "queued" and job["reason"].startswith(prefix), job
            assert refused_line(key).fullmatch(job["reason"].removeprefix(prefix)), job["reason"]
            assert client.get(f"/api/v1/runs/{runs[key]}").json()["attempts"] == 0  # no training process ever started
            assert client.post(f"/api/v1/runs/{runs[key]}/cancel").json()["state"] == "cancelled"
        assert "allowed_quiet" in jobs["train.callbacks"]["reason"]  # the agent imported its --allow-import module
    assert not marker.exists() and not list((tmp_path / "work").glob("*.yaml"))  # nothing was written to run


# --- item: agent tokens reach only what an agent calls


def bearer(server: Server, token: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {token}"})


def test_an_agent_token_runs_a_job_end_to_end_and_can_do_nothing_else(server, client, project, images, folder, tmp_path):
    made = client.post("/api/v1/agent-tokens", json={"name": "node-a"})
    assert made.status_code == 201 and made.json()["token"].startswith("utpa_"), made.text
    secret, token_id = made.json()["token"], made.json()["id"]
    listed = client.get("/api/v1/agent-tokens")
    assert [t["name"] for t in listed.json()] == ["node-a"] and secret not in listed.text and "token" not in listed.json()[0]
    assert client.post("/api/v1/agent-tokens", json={"name": "node-a"}).status_code == 409
    config = client.post("/api/v1/configs", json={"project_id": project, "name": "plain", "config": tiny_config(images, folder / "root")})
    (run_id, config_id) = (
        client.post(f"/api/v1/runs/from-config/{config.json()['id']}", json={"priority": 10}).json()["run_id"],
        config.json()["id"],
    )
    claims = tmp_path / "claims.txt"
    cmd = [sys.executable, str(REPO / "tests" / "agent_noop.py"), "--server", server.url, "--token", secret, "--name", "tokened"]
    cmd += ["--gpus", "none", "--poll", "0.2", "--workdir", str(tmp_path / "work")]
    with open(tmp_path / "agent.log", "ab") as log:
        agent = subprocess.Popen(cmd, env={**ENV, "UTP_TEST_CLAIMS": str(claims)}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: client.get(f"/api/v1/runs/{run_id}").json()["state"] == "succeeded", 60, "the run", tmp_path / "agent.log")
    finally:
        agent.kill()
        agent.wait()
    assert claims.read_text().split()[0] == str(client.get(f"/api/v1/runs/{run_id}").json()["jobs"][-1]["id"])
    with bearer(server, secret) as stolen:
        refused = [
            stolen.post("/api/v1/projects", json={"name": "mine"}),
            stolen.post("/api/v1/configs", json={"project_id": project, "name": "x", "config": tiny_config(images, folder / "root")}),
            stolen.post(f"/api/v1/runs/from-config/{config_id}", json={}),
            stolen.get(f"/api/v1/configs/{config_id}"),
            stolen.get(f"/api/v1/configs/project/{project}"),
            stolen.get(f"/api/v1/runs/{run_id}"),
            stolen.post("/api/v1/agent-tokens", json={"name": "more"}),
            stolen.delete(f"/api/v1/agent-tokens/{token_id}"),
            stolen.get("/web/runs"),
        ]
        assert [r.status_code for r in refused] == [403] * len(refused)
        assert {r.json()["detail"] for r in refused} == {
            "an agent token may only register, heartbeat, claim and report jobs; this needs the dashboard's own token"
        }
        agent_id = stolen.post("/api/v1/agents/register", json={"name": "tokened-again", "host": "h", "gpus": []}).json()["agent_id"]
        assert stolen.post(f"/api/v1/agents/{agent_id}/heartbeat", json={"jobs": []}).status_code == 200
        assert client.delete(f"/api/v1/agent-tokens/{token_id}").status_code == 204
        revoked = stolen.post("/api/v1/jobs/claim", json={"agent_id": agent_id, "free_gpus": 0, "cpu": True, "refused": []})
        assert revoked.status_code == 401
    with bearer(server, "utpa_guessed") as guess:
        assert guess.post("/api/v1/agents/register", json={"name": "g", "host": "h", "gpus": []}).status_code == 401


def test_agent_tokens_are_made_shown_once_and_revoked_on_the_agents_page(server, client):
    page = client.get("/web/agents").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    made = client.post("/web/agents/tokens", data={"csrf": csrf, "name": "from-page"})
    secret = re.search(r'<code class="secret">(utpa_[^<]+)</code>', made.text)
    assert made.status_code == 201 and secret, made.text[-2000:]
    again = client.get("/web/agents").text
    assert "from-page" in again and secret.group(1) not in again
    with bearer(server, secret.group(1)) as agent:
        assert agent.post("/api/v1/agents/register", json={"name": "paged", "host": "h", "gpus": []}).status_code == 200
        (row,) = [t for t in client.get("/api/v1/agent-tokens").json() if t["name"] == "from-page"]
        assert client.post(f"/web/agents/tokens/{row['id']}/revoke", data={"csrf": csrf}, follow_redirects=False).status_code == 303
        assert agent.post("/api/v1/agents/register", json={"name": "paged", "host": "h", "gpus": []}).status_code == 401
    assert client.post("/web/agents/tokens", data={"csrf": csrf, "name": "   "}).status_code == 422
