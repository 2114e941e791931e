"""Archive, unarchive and delete from the pages: projects, configs (and a config's new version), agents, runs (their
folders only when asked and confirmed); every form checks its CSRF token and answers junk with a 4xx."""

from __future__ import annotations

import re

import pytest
from conftest import REPO
from dashboard_support import generated_root, serving

QUICKSTART = (REPO / "configs" / "quickstart.yaml").read_text()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generated_root(tmp_path_factory.mktemp("manage"), 4)


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    with serving(root, tmp_path_factory, "manage-db") as running:
        yield running


@pytest.fixture
def web(server):
    with server.client(follow_redirects=False) as client:
        yield client


def csrf(web, path: str = "/web/projects") -> str:
    return re.search(r'name="csrf" value="([^"]+)"', web.get(path).text).group(1)


def test_projects_and_configs_archive_unarchive_version_and_delete(web):
    project = web.post("/api/v1/projects", json={"name": "tidy"}).json()
    config = web.post("/api/v1/configs", json={"project_id": project["id"], "name": "qs", "yaml": QUICKSTART}).json()
    token = csrf(web)

    archived = web.post(f"/web/projects/{project['id']}/archive", data={"archived": "true", "csrf": token})
    assert (archived.status_code, archived.headers["location"]) == (303, "/web/projects")
    assert 'data-project="tidy"' not in web.get("/web/projects").text
    assert 'data-project="tidy"' in web.get("/web/projects", params={"archived": "true"}).text
    back = web.post(f"/web/projects/{project['id']}/archive", data={"archived": "false", "csrf": token})
    assert back.headers["location"] == "/web/projects?archived=true" and 'data-project="tidy"' in web.get("/web/projects").text

    configs = f"/web/projects/{project['id']}/configs"
    assert web.post(f"/web/configs/{config['id']}/archive", data={"archived": "true", "csrf": token}).headers["location"] == configs
    assert 'data-config="qs"' not in web.get(configs).text and 'data-config="qs"' in web.get(configs, params={"archived": "true"}).text
    assert "/web/configs/" not in web.get(f"/web/projects/{project['id']}/runs").text  # no queue button for an archived config
    web.post(f"/web/configs/{config['id']}/archive", data={"archived": "false", "csrf": token})

    page = web.get(f"/web/configs/{config['id']}")
    assert page.status_code == 200 and "optim:" in page.text and 'id="new-version"' in page.text
    bad = web.post(f"/web/configs/{config['id']}/versions", data={"text": "optim:\n  lr: [1\n", "csrf": token})
    assert bad.status_code == 422 and "invalid YAML" in bad.text and 'id="config-error"' in bad.text
    unknown = web.post(f"/web/configs/{config['id']}/versions", data={"text": "optim:\n  lrr: 1\n", "csrf": token})
    assert unknown.status_code == 422 and "optim.lrr" in unknown.text
    edited = QUICKSTART.replace("epochs:", "epochs: 7 #", 1)
    made = web.post(f"/web/configs/{config['id']}/versions", data={"text": edited, "description": "seven epochs", "csrf": token})
    assert made.status_code == 303
    version = web.get(made.headers["location"])
    assert "qs v2" in version.text and "seven epochs" in version.text
    assert [c["name"] for c in web.get(f"/api/v1/configs/project/{project['id']}").json()] == ["qs", "qs v2"]

    unticked = web.post(f"/web/configs/{config['id']}/delete", data={"csrf": token})
    assert unticked.status_code == 422 and web.get(f"/api/v1/configs/{config['id']}").status_code == 200
    gone = web.post(f"/web/configs/{config['id']}/delete", data={"confirm": "yes", "csrf": token})
    assert gone.headers["location"] == configs and web.get(f"/api/v1/configs/{config['id']}").status_code == 404
    assert web.post(f"/web/projects/{project['id']}/delete", data={"csrf": token}).status_code == 422
    assert web.post(f"/web/projects/{project['id']}/delete", data={"confirm": "yes", "csrf": token}).status_code == 303
    assert web.get(f"/api/v1/projects/{project['id']}").status_code == 404


def test_an_archived_agent_is_hidden_and_claims_nothing(web):
    project = web.post("/api/v1/projects", json={"name": "agents-work"}).json()
    config = web.post("/api/v1/configs", json={"project_id": project["id"], "name": "qs", "yaml": QUICKSTART}).json()
    run = web.post(f"/api/v1/runs/from-config/{config['id']}", json={"gpus": 0}).json()
    agent = web.post("/api/v1/agents/register", json={"name": "old-box", "host": "h"}).json()["agent_id"]
    token = csrf(web, "/web/agents")

    assert web.post(f"/web/agents/{agent}/archive", data={"archived": "true", "csrf": token}).headers["location"] == "/web/agents"
    assert 'data-agent="old-box"' not in web.get("/web/agents").text
    assert 'data-agent="old-box"' in web.get("/web/agents", params={"archived": "true"}).text
    assert web.get(f"/api/v1/agents/{agent}").json()["archived"] is True
    assert web.post("/api/v1/jobs/claim", json={"agent_id": agent}).json()["job"] is None
    assert web.post(f"/api/v1/agents/{agent}/heartbeat", json={}).json()["drain"] is True  # the agent stops asking

    web.post(f"/web/agents/{agent}/archive", data={"archived": "false", "csrf": token})
    assert web.post("/api/v1/jobs/claim", json={"agent_id": agent}).json()["job"]["run_id"] == run["run_id"]
    assert web.patch(f"/api/v1/agents/{agent}", json={"archived": True}).json()["archived"] is True  # the API's way


def test_deleting_a_run_removes_its_folders_only_when_asked_and_confirmed(web, root):
    runs = sorted(web.get("/api/v1/runs", params={"limit": 10}).json(), key=lambda r: r["id"])
    kept, gone = runs[0], runs[1]
    logs, checkpoints = (root / kind / gone["dataset"] / gone["name"] for kind in ("logs", "checkpoints"))
    confirm_page = web.get(f"/web/runs/{gone['id']}/delete")
    assert confirm_page.status_code == 200 and str(logs) in confirm_page.text and gone["name"] in confirm_page.text
    token = csrf(web, f"/web/runs/{gone['id']}/delete")

    wrong = web.post(f"/web/runs/{gone['id']}/delete", data={"delete_files": "yes", "confirm_name": "nope", "csrf": token})
    assert wrong.status_code == 422 and "nothing was deleted" in wrong.text
    assert logs.is_dir() and web.get(f"/api/v1/runs/{gone['id']}").status_code == 200
    done = web.post(f"/web/runs/{gone['id']}/delete", data={"delete_files": "yes", "confirm_name": gone["name"], "csrf": token})
    assert (done.status_code, done.headers["location"]) == (303, "/web/runs")
    assert not logs.exists() and not checkpoints.exists() and web.get(f"/api/v1/runs/{gone['id']}").status_code == 404

    # without the box ticked only the row goes (a name typed or not): the folders stay and the next index finds the run again
    row_only = web.post(f"/web/runs/{kept['id']}/delete", data={"confirm_name": kept["name"], "csrf": token})
    assert row_only.status_code == 303 and (root / "logs" / kept["dataset"] / kept["name"]).is_dir()
    web.post("/api/v1/index/refresh")
    names = [r["name"] for r in web.get("/api/v1/runs", params={"limit": 10}).json()]
    assert kept["name"] in names and gone["name"] not in names


@pytest.mark.parametrize(
    "path",
    [
        "/web/projects/1/archive",
        "/web/configs/1/archive",
        "/web/agents/1/archive",
        "/web/projects/1/delete",
        "/web/configs/1/delete",
        "/web/configs/1/versions",
        "/web/runs/1/delete",
    ],
)
def test_junk_is_answered_with_4xx(web, path):
    token = csrf(web)
    assert web.post(path, data={"archived": "true", "confirm": "yes"}).status_code == 403  # no CSRF token: nothing happens
    for ident in ("0", "-1", str(2**40), "abc", "1.5"):
        assert web.post(path.replace("/1/", f"/{ident}/"), data={"csrf": token}).status_code in (404, 422)
    assert web.post(path.replace("/1/", "/999999/"), data={"csrf": token, "archived": "true", "confirm": "yes"}).status_code in (404, 422)
    junk = {"csrf": token, "archived": "\x00maybe", "confirm": "y" * 5000, "text": "\x00", "delete_files": "yes", "confirm_name": "\x00"}
    assert 400 <= web.post(path, data=junk).status_code < 500
