"""Who may call what, checked before any route: the Host allow-list, the access token (Bearer header or session
cookie), a slow-down of wrong tokens, cross-site write refusal, CSRF tokens on forms, and the headers of every answer."""

from __future__ import annotations

import functools
import hmac
import math
import secrets
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import quote, urlsplit

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

from utp_dist.dashboard import tokens
from utp_dist.dashboard.settings import LOOPBACK_NAMES, Settings

SESSION_COOKIE, CSRF_COOKIE, CSRF_FIELD = "utp_session", "utp_csrf", "csrf"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
OPEN_PATHS = ("/web/login", "/static/")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")

# the pages load only their own vendored scripts and styles: nothing inline, nothing from elsewhere, never in a frame
CSP = "default-src 'self'; frame-ancestors 'none'; object-src 'none'; base-uri 'none'; form-action 'self'"
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


# --- the Host header (DNS rebinding: a foreign page whose name now resolves to 127.0.0.1 sends its own name)


@functools.cache  # per settings (frozen): a wildcard bind resolves this machine's names once, not per request
def allowed_hosts(settings: Settings) -> frozenset[str]:
    """Host names the dashboard answers to: loopback, the bound address, --allowed-host, and this machine's names on a wildcard bind."""
    names = {*LOOPBACK_NAMES, settings.host, *settings.allowed_hosts}
    if settings.host in WILDCARD_HOSTS:  # reachable from other machines: as they name this one
        names.add(socket.gethostname())
        try:
            name, aliases, addresses = socket.gethostbyname_ex(socket.gethostname())
            names.update([name, *aliases, *addresses])
        except OSError:
            pass
    return frozenset(name.lower().strip("[]") for name in names if name)


def own_server(settings: Settings) -> Callable[[str], bool]:
    """Whether a URL names this dashboard (a host it answers to, its port): the only server it contacts for a sweep file."""
    hosts = allowed_hosts(settings)

    def own(url: str) -> bool:
        try:
            parts = urlsplit(url)
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:  # a port that is no number
            return False
        return parts.scheme in ("http", "https") and (parts.hostname or "") in hosts and port == settings.port

    return own


def host_name(host_header: str) -> str:
    """The name of a Host header without its port: 'Example:80' -> 'example', '[::1]:8000' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# --- the token, the session cookie and the slow-down of wrong tokens


def token_ok(settings: Settings, given: str | None) -> bool:
    """Whether `given` is the dashboard's token (constant-time)."""
    return bool(settings.token) and isinstance(given, str) and hmac.compare_digest(given.encode(), settings.token.encode())


def bearer(request: Request) -> str | None:
    """The token of an 'Authorization: Bearer T' header, if any."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


class Sessions:
    """Login cookies 'ISSUED.HMAC': they expire after --session-hours, and a new token (the key derives from it) voids them all."""

    def __init__(self, settings: Settings):
        self.key = hmac.new((settings.token or "").encode(), b"utp-dashboard-session", "sha256").digest()
        self.max_age_s = settings.session_hours * 3600

    def _signature(self, issued: str) -> str:
        return hmac.new(self.key, issued.encode(), "sha256").hexdigest()

    def new(self) -> str:
        """A fresh cookie value (it never holds the token)."""
        issued = str(int(time.time()))
        return f"{issued}.{self._signature(issued)}"

    def valid(self, cookie: str | None) -> bool:
        """Whether `cookie` was signed with this token and is younger than the session lifetime."""
        issued, _, signature = (cookie or "").partition(".")
        if not issued.isdigit() or not hmac.compare_digest(signature, self._signature(issued)):
            return False
        return 0 <= time.time() - int(issued) < self.max_age_s

    def set(self, response: Response) -> Response:
        """Log the browser in."""
        response.set_cookie(SESSION_COOKIE, self.new(), max_age=int(self.max_age_s), httponly=True, samesite="strict")
        return response


class Throttle:
    """Wrong tokens per client address: after FREE_TRIES, the client waits 2, 4, 8 ... (at most 60) seconds between tries.

    While it waits, every try with a token is answered 429 unchecked (so waiting cannot be skipped by guessing);
    a right token afterwards clears the count.
    """

    FREE_TRIES, MAX_WAIT_S, MAX_CLIENTS = 5, 60.0, 10_000

    def __init__(self):
        self.clients: dict[str, tuple[int, float]] = {}  # address -> (wrong tries, blocked until)
        self.lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        """Seconds `client` must still wait before its next try (0: it may try now)."""
        with self.lock:
            return max(0.0, self.clients.get(client, (0, 0.0))[1] - time.monotonic())

    def failed(self, client: str) -> None:
        """Count a wrong token."""
        with self.lock:
            if len(self.clients) >= self.MAX_CLIENTS:  # a flood of addresses: forget the oldest
                self.clients.pop(next(iter(self.clients)))
            tries = self.clients.pop(client, (0, 0.0))[0] + 1
            wait = min(2.0 ** (tries - self.FREE_TRIES), self.MAX_WAIT_S) if tries > self.FREE_TRIES else 0.0
            self.clients[client] = (tries, time.monotonic() + wait)

    def succeeded(self, client: str) -> None:
        """A right token: start counting afresh."""
        with self.lock:
            self.clients.pop(client, None)


def client_address(request: Request) -> str:
    return request.client.host if request.client else "?"


def offered(request: Request, settings: Settings, throttle: Throttle, given: str | None) -> tuple[bool, float]:
    """Check a token a client offers, counting wrong ones: (right, seconds it must still wait, when it was not checked)."""
    client = client_address(request)
    wait = throttle.wait_s(client)
    if wait > 0:
        return False, wait
    right = token_ok(settings, given)
    (throttle.succeeded if right else throttle.failed)(client)
    return right, 0.0


def retry_after(wait_s: float) -> dict[str, str]:
    """The Retry-After header of a 429: whole seconds, rounded up."""
    return {"Retry-After": str(max(1, math.ceil(wait_s)))}


def too_many(wait_s: float) -> Response:
    """429 for a client that must wait before trying another token."""
    return JSONResponse(
        {"detail": f"too many wrong tokens from this address: try again in {math.ceil(wait_s)} s"},
        status_code=429,
        headers=retry_after(wait_s),
    )


# --- the checks, in order, before any route


def cross_site(request: Request) -> bool:
    """Whether a browser says the request comes from another site (Origin or Sec-Fetch-Site)."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return True
    origin = request.headers.get("origin")
    return bool(origin) and origin != "null" and urlsplit(origin).netloc != request.headers.get("host")


class AccessMiddleware(BaseHTTPMiddleware):
    """Host allow-list, cross-site writes, the token (API: Bearer header; pages: login cookie), then CSRF cookie and headers."""

    def __init__(self, app, settings: Settings, sessions: Sessions, throttle: Throttle):
        super().__init__(app)
        self.settings, self.sessions, self.throttle = settings, sessions, throttle
        self.hosts = allowed_hosts(settings)

    async def dispatch(self, request: Request, call_next) -> Response:
        """Refuse what must not reach a route; answer everything with the security headers."""
        response = await self.refusal(request) or await self.forward(request, call_next)
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)  # a page with its own policy (/docs) keeps it
        return response

    async def refusal(self, request: Request) -> Response | None:
        """The answer for a request that must not reach its route, or None."""
        if host_name(request.headers.get("host", "")) not in self.hosts:
            return PlainTextResponse("unknown Host header: start the dashboard with --allowed-host NAME to use this name", status_code=400)
        # Origin must be this server's own Host, which is on the allow-list: a rebinding page cannot pass both checks
        if request.method not in SAFE_METHODS and (cross_site(request) or request.headers.get("origin") == "null"):
            return JSONResponse({"detail": "cross-site request refused"}, status_code=403)
        if self.settings.token and not request.url.path.startswith(OPEN_PATHS):
            return await self.unauthorized(request)
        return None

    async def unauthorized(self, request: Request) -> Response | None:
        """Without the token (header) or a login (cookie): 401 for the API, the login page for pages; 429 while slowed down."""
        path, write, given = request.url.path, request.method not in SAFE_METHODS, bearer(request)
        # an agent token (tokens.py) passes for the agent endpoints only: 403 anywhere else, never the user's rights
        if given is not None and await tokens.is_agent(request, given):
            return None if tokens.agent_may(request.method, path) else JSONResponse({"detail": tokens.AGENT_ONLY}, status_code=403)
        header_ok, wait = offered(request, self.settings, self.throttle, given) if given is not None else (False, 0.0)
        if wait > 0:
            return too_many(wait)
        cookie_ok = self.sessions.valid(request.cookies.get(SESSION_COOKIE))
        if path.startswith("/web/") or path == "/":
            if not (cookie_ok or header_ok):
                return RedirectResponse(f"/web/login?next={quote(path)}", status_code=303)
        elif not (header_ok or (cookie_ok and not write)):
            # API writes and agent calls carry the token; a page's own reads (polling) may use the login cookie
            return JSONResponse(
                {"detail": "this dashboard needs its token: send 'Authorization: Bearer TOKEN'"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None

    async def forward(self, request: Request, call_next) -> Response:
        """Call the route, giving this browser a CSRF cookie if it has none."""
        csrf = request.cookies.get(CSRF_COOKIE)
        request.state.csrf = csrf or secrets.token_urlsafe(24)
        response = await call_next(request)
        if not csrf:
            response.set_cookie(CSRF_COOKIE, request.state.csrf, httponly=True, samesite="strict")
        return response


def csrf_ok(request: Request, form) -> bool:
    """Whether a posted form carries the CSRF token of this browser's cookie (double submit)."""
    cookie, field = request.cookies.get(CSRF_COOKIE), form.get(CSRF_FIELD)
    return bool(cookie) and isinstance(field, str) and hmac.compare_digest(cookie, field)


def safe_next(target: str | None) -> str:
    """A redirect target on this site only (never //other.host or an absolute URL)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/web/runs"
    return target
