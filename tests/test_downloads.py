"""Downloads from the run page: folders as streamed zips holding only what lies inside the roots, configs as YAML."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from dashboard_support import private_root, serving


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return private_root(tmp_path_factory, "downloads")


@pytest.fixture(scope="module")
def web(root, tmp_path_factory):
    with serving(root, tmp_path_factory, "downloads-db") as server:
        with server.client(follow_redirects=False) as client:
            yield client


@pytest.fixture(scope="module")
def run(web) -> dict:
    return next(r for r in web.get("/api/v1/runs", params={"state": "succeeded"}).json() if r["source"] == "disk")


def unzip(response) -> zipfile.ZipFile:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip" and "content-length" not in response.headers  # streamed
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.testzip() is None
    return archive


def test_the_best_export_downloads_as_one_zip_with_its_exact_files(web, run):
    detail = web.get(f"/api/v1/runs/{run['id']}").json()
    best = Path(detail["paths"]["best_export"])
    response = web.get(f"/api/v1/runs/{run['id']}/download/best")
    assert response.headers["content-disposition"] == f'attachment; filename="{run["name"]}-best.zip"'
    archive = unzip(response)
    expected = sorted(p.relative_to(best).as_posix() for p in best.rglob("*") if p.is_file())
    assert sorted(n.split("/", 1)[1] for n in archive.namelist()) == expected and "model.safetensors" in expected
    assert archive.read(f"{run['name']}-best/model.safetensors") == (best / "model.safetensors").read_bytes()


def test_a_zip_leaves_out_what_leads_outside_the_roots_and_secrets(web, run, root, tmp_path):
    logs = Path(web.get(f"/api/v1/runs/{run['id']}").json()["paths"]["logs"])
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "inner.txt").write_text("not yours either")
    (logs / "escape.txt").symlink_to(outside)
    (logs / "escape-folder").symlink_to(tmp_path / "folder")
    (logs / "dashboard.token").write_text("token")
    (logs / "index.sqlite").write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    names = unzip(web.get(f"/api/v1/runs/{run['id']}/download/logs")).namelist()
    prefix = f"{run['name']}-logs/"
    assert {prefix + "config.yaml", prefix + "metrics.jsonl", prefix + "system.jsonl"} <= set(names)
    assert any(n.startswith(prefix + "predictions/images/") for n in names)
    assert not [n for n in names if "escape" in n or "token" in n or "sqlite" in n]


def test_junk_is_refused_with_4xx(web, run):
    assert web.get(f"/api/v1/runs/{run['id']}/download/etc").status_code == 422
    assert web.get(f"/api/v1/runs/{run['id']}/download/..%2F..%2Fetc").status_code in (404, 422)
    assert web.get("/api/v1/runs/999999/download/best").status_code == 404
    assert web.get("/api/v1/runs/abc/download/best").status_code == 422
    assert web.get("/api/v1/configs/999999/config.yaml").status_code == 404
    project = web.post("/api/v1/projects", json={"name": "downloads"}).json()
    text = (REPO / "configs" / "quickstart.yaml").read_text()
    config = web.post("/api/v1/configs", json={"project_id": project["id"], "name": "qs", "yaml": text}).json()
    queued = web.post(f"/api/v1/runs/from-config/{config['id']}").json()["run_id"]
    missing = web.get(f"/api/v1/runs/{queued}/download/best")
    assert missing.status_code == 404 and "no run folder" in missing.json()["detail"]
    # a queued run's config and a stored config download as YAML that train takes
    for url in (f"/api/v1/runs/{queued}/config.yaml", f"/api/v1/configs/{config['id']}/config.yaml"):
        answer = web.get(url)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/yaml")
        model = yaml.safe_load(answer.text)["model"]  # resolved: every default filled in
        assert model | yaml.safe_load(text)["model"] == model


def test_every_path_on_the_run_page_is_a_link_and_the_config_is_yaml(web, run, root):
    html = web.get(f"/web/runs/{run['id']}").text
    for what in ("logs", "checkpoints", "best"):
        assert f'id="download-{what}" href="/api/v1/runs/{run["id"]}/download/{what}"' in html
    logs = web.get(f"/api/v1/runs/{run['id']}").json()["paths"]["logs"]
    saved = yaml.safe_load(Path(logs, "config.yaml").read_text())
    answer = web.get(re.search(r'id="download-config" href="([^"]+)"', html).group(1))
    assert answer.headers["content-disposition"] == f'attachment; filename="{run["name"]}.yaml"'
    assert yaml.safe_load(answer.text) == saved
