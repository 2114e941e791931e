"""Safe by default: the token off localhost, files only from inside the output roots, CSRF and cross-site writes refused."""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO
from dashboard_support import Server, private_root, serving

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return private_root(tmp_path_factory, "security")


@pytest.fixture(scope="module")
def local(root, tmp_path_factory):
    """A dashboard on 127.0.0.1 without a token."""
    with serving(root, tmp_path_factory, "local") as server:
        yield server


@pytest.fixture(scope="module")
def exposed(root, tmp_path_factory):
    """A dashboard bound to every address, so it needs its token."""
    with serving(root, tmp_path_factory, "exposed", host="0.0.0.0", token=TOKEN) as server:
        yield server


def raw_get(server: Server, path: str) -> int:
    """GET a path exactly as written (no client-side normalisation of '..' or '//')."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", path)
    status = conn.getresponse().status
    conn.close()
    return status


def form_token(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def test_binding_off_localhost_without_a_token_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "UTP_DASHBOARD_TOKEN"} | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "utp_dist.dashboard", "--host", "0.0.0.0", "--root", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "utp_dist: error: --host 0.0.0.0 is reachable from other machines: set UTP_DASHBOARD_TOKEN to a secret token first"
    ]


def test_api_needs_the_token_off_localhost(exposed):
    with exposed.client() as authed, exposed.client(authed=False) as anonymous:
        assert anonymous.get("/api/v1/projects").status_code == 401
        assert anonymous.get("/api/v1/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anonymous.post("/api/v1/agents", json={"name": "intruder"}).status_code == 401
        assert anonymous.get("/openapi.json").status_code == 401
        assert authed.get("/api/v1/projects").status_code == 200
        assert authed.post("/api/v1/agents", json={"name": "node-b", "host": "h"}).status_code == 201
        run = authed.get("/api/v1/runs", params={"state": "succeeded"}).json()[0]
        figure = authed.get(f"/api/v1/runs/{run['id']}").json()["paths"]["confusion_matrix_url"]
        assert anonymous.get(figure).status_code == 401 and authed.get(figure).status_code == 200


def test_pages_need_a_login_off_localhost(exposed):
    with exposed.client(authed=False, follow_redirects=False) as browser:
        page = browser.get("/web/runs")
        assert page.status_code == 303 and page.headers["location"].startswith("/web/login")
        login = browser.get("/web/login")
        wrong = browser.post("/web/login", data={"csrf": form_token(login.text), "token": "guess", "next": "/web/runs"})
        assert wrong.status_code == 401 and "Wrong token" in wrong.text
        right = browser.post("/web/login", data={"csrf": form_token(login.text), "token": TOKEN, "next": "/web/runs"})
        assert right.status_code == 303 and right.headers["location"] == "/web/runs"
        assert TOKEN not in right.headers.get("set-cookie", "")  # the cookie holds an HMAC, never the token
        assert browser.get("/web/runs").status_code == 200
        assert browser.get("/api/v1/runs").status_code == 200  # the pages' own polling reads with the cookie
        assert browser.post("/api/v1/projects", json={"name": "cookie-only"}).status_code == 401  # writes need the token itself


@pytest.mark.parametrize(
    "path",
    [
        "/files/0/../../../../etc/passwd",
        "/files/0/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/files/0/logs/%2E%2E/%2E%2E/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
        "/files/0//etc/passwd",
        "/files/0/%2Fetc%2Fpasswd",
        "/files/0/link-out/etc/passwd",
        "/files/0/logs/passwd.png",
        "/files/7/etc/passwd",
    ],
)
def test_files_outside_the_roots_are_refused(local, root, path):
    (root / "link-out").unlink(missing_ok=True)
    (root / "link-out").symlink_to("/")
    (root / "logs" / "passwd.png").unlink(missing_ok=True)
    (root / "logs" / "passwd.png").symlink_to("/etc/passwd")
    assert raw_get(local, path) == 403


def test_files_inside_the_roots_are_served(local, root):
    config = next((root / "logs").glob("*/*/config.yaml")).relative_to(root)
    assert raw_get(local, f"/files/0/{config.as_posix()}") == 200
    assert raw_get(local, "/files/0/../../../../etc/passwd") == 403


def test_forms_without_the_csrf_token_are_refused(local):
    with local.client(follow_redirects=False) as browser:
        page = browser.get("/web/projects")
        assert page.status_code == 200
        token = form_token(page.text)
        missing = browser.post("/web/projects", data={"name": "no-csrf"})
        assert missing.status_code == 403 and "CSRF" in missing.text
        forged = browser.post("/web/projects", data={"name": "forged", "csrf": "x" * 32})
        assert forged.status_code == 403
        ok = browser.post("/web/projects", data={"name": "with-csrf", "csrf": token})
        assert ok.status_code == 303
        names = [p["name"] for p in browser.get("/api/v1/projects").json()]
        assert "with-csrf" in names and "no-csrf" not in names and "forged" not in names


def test_cross_site_writes_are_refused(local):
    with local.client() as client:
        evil = client.post("/api/v1/projects", json={"name": "from-evil"}, headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403 and evil.json()["detail"] == "cross-site request refused"
        fetch = client.post("/api/v1/projects", json={"name": "from-evil2"}, headers={"Sec-Fetch-Site": "cross-site"})
        assert fetch.status_code == 403
        same = client.post("/api/v1/projects", json={"name": "same-site"}, headers={"Origin": local.url})
        assert same.status_code == 201
