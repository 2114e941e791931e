"""Safe by default: a token always (generated and stored 0600 on first start), Host and Origin checked, signed sessions that
expire, wrong tokens slowed down, files only from inside the output roots, CSRF, security headers, the database out of the roots."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import re
import stat
import time

import pytest
from dashboard_support import Server, private_root, serving

from utp_dist.dashboard import __main__ as dashboard_cli
from utp_dist.dashboard.security import CSP

TOKEN = "s3cret-token-for-tests"
HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return private_root(tmp_path_factory, "security")


@pytest.fixture(scope="module")
def local(root, tmp_path_factory):
    """A dashboard on 127.0.0.1 started without a token: it generates one."""
    with serving(root, tmp_path_factory, "local") as server:
        yield server


@pytest.fixture(scope="module")
def exposed(root, tmp_path_factory):
    """A dashboard bound to every address, with its token given in UTP_DASHBOARD_TOKEN."""
    with serving(root, tmp_path_factory, "exposed", host="0.0.0.0", token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def second(local, tmp_path_factory):
    """A second start of the same user (local's config folder): default database, 2-hour sessions, one more Host name.

    It also takes the slow-down test's wrong tokens, so the other servers never make this test client wait.
    """
    folder = tmp_path_factory.mktemp("second")
    flags = ("--session-hours", "2", "--allowed-host", "dash.example")
    server = Server([folder / "root"], None, folder / "server.log", flags=flags, home=local.home).start()
    yield server
    server.stop()


def raw(server: Server, method: str, path: str, headers: dict | None = None) -> int:
    """A request exactly as written (no client-side normalisation of '..' or '//', any Host header)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(method, path, headers={"Authorization": f"Bearer {server.token}", **(headers or {})})
    status = conn.getresponse().status
    conn.close()
    return status


def form_token(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def session_cookie(token: str, age_s: float) -> str:
    """A session cookie as the server signs it, issued `age_s` ago."""
    key = hmac.new(token.encode(), b"utp-dashboard-session", "sha256").digest()
    issued = str(int(time.time() - age_s))
    return f"{issued}.{hmac.new(key, issued.encode(), 'sha256').hexdigest()}"


# --- the token: generated once, stored 0600, found by the same user's clients


def test_first_start_generates_a_token_stored_0600_and_prints_the_login_url_once(local, second):
    token = local.token_file.read_text().strip()
    assert len(token) >= 43  # 256 random bits
    assert stat.S_IMODE(local.token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(local.token_file.parent.stat().st_mode) == 0o700
    assert f"log in once with {local.url}/web/login?token={token}" in local.log.read_text()
    again = second.log.read_text()  # the same user's second dashboard reuses it, and does not print it
    assert second.token == token and token not in again and f"token from {local.token_file}" in again
    with local.client(authed=False) as anonymous:
        assert anonymous.get("/api/v1/projects").status_code == 401


def test_the_login_url_logs_in_and_drops_the_token_from_the_url(local):
    with local.client(authed=False, follow_redirects=False) as browser:
        direct = browser.get("/web/login", params={"token": local.token, "next": "/web/agents"})
        assert direct.status_code == 303 and direct.headers["location"] == "/web/agents"
        assert browser.get("/web/agents").status_code == 200


def test_local_clients_find_the_token_file_and_flags_win(local, monkeypatch):
    from utp_dist.agent.client import Client
    from utp_dist.errors import UserError
    from utp_dist.sweep.executors import DashboardExecutor
    from utp_dist.sweep.resources import Resources

    for name, value in local.xdg_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("UTP_DASHBOARD_TOKEN", raising=False)
    assert isinstance(Client(local.url).get("/api/v1/projects"), list)  # an agent without --token
    DashboardExecutor(Resources(), server=local.url).check_available()  # submit --executor dashboard
    monkeypatch.setenv("UTP_DASHBOARD_TOKEN", "x" * 20)  # the environment comes before the file
    with pytest.raises(UserError, match="refused the token from UTP_DASHBOARD_TOKEN"):
        Client(local.url).get("/api/v1/projects")
    with pytest.raises(UserError, match="refused the token from --token"):
        Client(local.url, "y" * 20).get("/api/v1/projects")  # and --token before both


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["--token", "short"], {}, "--token: the token has 5 characters; use at least 16"),
        ([], {"UTP_DASHBOARD_TOKEN": "abc"}, "UTP_DASHBOARD_TOKEN: the token has 3 characters; use at least 16"),
        (["--host", "0.0.0.0", "--no-token"], {}, "--no-token: only with a loopback --host (127.0.0.1, localhost, ::1); 0.0.0.0 is"),
        (["--no-token", "--token", "x" * 16], {}, "--no-token and --token: give one of them"),
    ],
)
def test_bad_token_flags_are_one_line(argv, env, says, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert dashboard_cli.main([*argv, "--root", str(tmp_path / "root")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"utp_dist: error: {says}")
    assert not (tmp_path / "config").exists()  # nothing generated for a start that failed on its flags


def test_no_token_on_loopback_warns_and_needs_no_token(tmp_path, monkeypatch, capsys):
    from starlette.testclient import TestClient

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    answers = []

    def serve(app, **_):
        with TestClient(app, base_url="http://127.0.0.1:8000") as client:
            answers.append(client.post("/api/v1/projects", json={"name": "open"}).status_code)

    monkeypatch.setattr("uvicorn.run", serve)
    assert dashboard_cli.main(["--no-token", "--root", str(tmp_path / "root")]) == 0
    assert answers == [201] and not (tmp_path / "config").exists()
    assert "utp_dist: warning: --no-token: any user of this machine can queue jobs that run as you" in capsys.readouterr().err


# --- the Host allow-list and cross-site writes


def test_a_dns_rebinding_request_is_refused_before_any_route(local):
    port = local.port
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}", "Content-Type": "application/json"}
    assert raw(local, "POST", "/api/v1/projects", rebound) == 400
    assert raw(local, "GET", "/api/v1/projects", {"Host": f"evil.example:{port}"}) == 400
    assert raw(local, "GET", "/web/login", {"Host": "evil.example"}) == 400
    for name in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert raw(local, "GET", "/api/v1/projects", {"Host": name}) == 200, name


def test_allowed_host_adds_a_name(second):
    assert raw(second, "GET", "/api/v1/projects", {"Host": f"dash.example:{second.port}"}) == 200
    assert raw(second, "GET", "/api/v1/projects", {"Host": f"other.example:{second.port}"}) == 400


def test_cross_site_writes_are_refused(local):
    with local.client() as client:
        evil = client.post("/api/v1/projects", json={"name": "from-evil"}, headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403 and evil.json()["detail"] == "cross-site request refused"
        other_port = client.post("/api/v1/projects", json={"name": "from-evil1"}, headers={"Origin": "http://127.0.0.1:1"})
        assert other_port.status_code == 403
        fetch = client.post("/api/v1/projects", json={"name": "from-evil2"}, headers={"Sec-Fetch-Site": "cross-site"})
        assert fetch.status_code == 403
        same = client.post("/api/v1/projects", json={"name": "same-site"}, headers={"Origin": local.url})
        assert same.status_code == 201


# --- the API and the pages need the token; sessions


def test_api_needs_the_token(exposed):
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


def test_pages_need_a_login(exposed):
    with exposed.client(authed=False, follow_redirects=False) as browser:
        page = browser.get("/web/runs")
        assert page.status_code == 303 and page.headers["location"].startswith("/web/login")
        login = browser.get("/web/login")
        wrong = browser.post("/web/login", data={"csrf": form_token(login.text), "token": "guess", "next": "/web/runs"})
        assert wrong.status_code == 401 and "Wrong token" in wrong.text
        right = browser.post("/web/login", data={"csrf": form_token(login.text), "token": TOKEN, "next": "/web/runs"})
        assert right.status_code == 303 and right.headers["location"] == "/web/runs"
        assert TOKEN not in right.headers.get("set-cookie", "")  # signed and dated, never the token
        assert "Max-Age=43200" in right.headers["set-cookie"]  # 12 hours by default
        assert browser.get("/web/runs").status_code == 200
        assert browser.get("/api/v1/runs").status_code == 200  # the pages' own polling reads with the cookie
        assert browser.post("/api/v1/projects", json={"name": "cookie-only"}).status_code == 401  # writes need the token itself


def test_sessions_expire_and_a_new_token_voids_them(local, exposed, second):
    def page_with(server: Server, cookie: str) -> int:
        with server.client(authed=False, follow_redirects=False, cookies={"utp_session": cookie}) as browser:
            return browser.get("/web/runs").status_code

    assert page_with(local, session_cookie(local.token, age_s=11 * 3600)) == 200
    assert page_with(local, session_cookie(local.token, age_s=12 * 3600 + 5)) == 303  # older than the default 12 hours
    assert page_with(second, session_cookie(local.token, age_s=3 * 3600)) == 303  # --session-hours 2
    assert page_with(local, session_cookie(TOKEN, age_s=0)) == 303  # signed with another token: rotated away
    real = session_cookie(local.token, age_s=0)
    assert page_with(local, real[:-1] + ("1" if real.endswith("0") else "0")) == 303  # forged: one digit of its signature changed


def test_logout_ends_the_session(local):
    with local.client(authed=False, follow_redirects=False) as browser:
        browser.get("/web/login", params={"token": local.token})
        page = browser.get("/web/runs")
        assert page.status_code == 200 and 'action="/web/logout"' in page.text
        assert browser.post("/web/logout").status_code == 403  # without the form's CSRF token
        out = browser.post("/web/logout", data={"csrf": form_token(page.text)})
        assert out.status_code == 303 and out.headers["location"] == "/web/login"
        assert browser.get("/web/runs").status_code == 303


def test_wrong_tokens_are_slowed_down_after_five(second):
    right_token = {"Authorization": f"Bearer {second.token}"}
    with second.client(authed=False, follow_redirects=False) as browser:
        csrf = form_token(browser.get("/web/login").text)
        start = time.monotonic()
        answers = [browser.post("/web/login", data={"csrf": csrf, "token": f"guess-{i}"}).status_code for i in range(300)]
        elapsed = time.monotonic() - start
        # 6 checked, then 429 unchecked; a wait that ran out mid-flood lets one more through (waits of 2, 4, 8 ... s)
        assert answers[:7] == [401] * 6 + [429] and answers.count(401) <= 8, answers
        locked = browser.get("/api/v1/runs", headers=right_token)
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) >= 1  # even the right token waits
        time.sleep(int(locked.headers["retry-after"]) + 0.5)  # the header rounds up to whole seconds; the clocks need not agree to the ms
        assert browser.post("/web/login", data={"csrf": csrf, "token": second.token}).status_code == 303
        assert browser.post("/web/login", data={"csrf": csrf, "token": "guess-again"}).status_code == 401  # counted afresh
    print(f"300 wrong tokens in {elapsed:.2f} s: {answers.count(401)} checked, {answers.count(429)} answered 429")


# --- headers, OpenAPI, files, CSRF


@pytest.mark.parametrize("path", ["/web/runs", "/api/v1/projects", "/static/app.css", "/api/v1/runs/999999", "/web/login"])
def test_every_answer_has_the_security_headers(local, path):
    with local.client() as client:
        answer = client.get(path)
    assert {name: answer.headers.get(name) for name in HEADERS} == HEADERS


def test_openapi_declares_the_bearer_scheme_and_docs_allow_only_their_own_script(local):
    with local.client() as client:
        spec = client.get("/openapi.json").json()
        docs = client.get("/docs")
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert spec["security"] == [{"bearer": []}]
    nonce = re.search(r'<script nonce="([^"]+)">', docs.text).group(1)
    policy = docs.headers["content-security-policy"]
    assert policy.startswith(CSP) and f"script-src 'self' 'nonce-{nonce}'" in policy
    assert docs.headers["x-frame-options"] == "DENY"


def test_pages_have_no_inline_script(local):
    with local.client() as client:
        run_id = client.get("/api/v1/runs", params={"state": "succeeded"}).json()[0]["id"]
        for path in ("/web/runs", f"/web/runs/{run_id}", "/web/sweeps/1", "/web/agents"):
            scripts = re.findall(r"<script([^>]*)>", client.get(path).text)
            assert all("src=" in attrs or 'type="application/json"' in attrs for attrs in scripts), (path, scripts)


def test_the_default_database_is_outside_the_roots(second):
    key = hashlib.sha256(str(second.roots[0].resolve()).encode()).hexdigest()[:12]
    assert (second.home / "data" / "utp_dist" / "dashboards" / key / "dashboard.db").is_file()
    assert not list(second.roots[0].parent.rglob("dashboard.db*"))


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
    assert raw(local, "GET", path) == 403


def test_files_inside_the_roots_are_served(local, root):
    config = next((root / "logs").glob("*/*/config.yaml")).relative_to(root)
    assert raw(local, "GET", f"/files/0/{config.as_posix()}") == 200
    assert raw(local, "GET", "/files/0/../../../../etc/passwd") == 403


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
