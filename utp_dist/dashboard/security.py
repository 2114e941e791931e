"""Who may call what: the access token (API header or login cookie), cross-site request refusal and CSRF tokens on forms."""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import quote, urlsplit

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from utp_dist.dashboard import tokens
from utp_dist.dashboard.settings import Settings

SESSION_COOKIE, CSRF_COOKIE, CSRF_FIELD = "utp_session", "utp_csrf", "csrf"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
OPEN_PATHS = ("/web/login", "/static/")


def session_value(settings: Settings) -> str:
    """The login cookie's value: an HMAC of the token, so the cookie never holds the token itself."""
    return hmac.new(settings.secret, b"utp-dashboard-session", "sha256").hexdigest()


def token_ok(settings: Settings, given: str | None) -> bool:
    """Whether `given` is the dashboard's token (constant-time)."""
    return bool(settings.token) and given is not None and hmac.compare_digest(given.encode(), settings.token.encode())


def bearer(request: Request) -> str | None:
    """The token of an 'Authorization: Bearer T' header, if any."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def logged_in(request: Request, settings: Settings) -> bool:
    """Whether the request carries a valid login cookie."""
    cookie = request.cookies.get(SESSION_COOKIE)
    return cookie is not None and hmac.compare_digest(cookie, session_value(settings))


def cross_site(request: Request) -> bool:
    """Whether a browser says the request comes from another site (Origin or Sec-Fetch-Site)."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return True
    origin = request.headers.get("origin")
    return bool(origin) and origin != "null" and urlsplit(origin).netloc != request.headers.get("host")


class AccessMiddleware(BaseHTTPMiddleware):
    """Refuse cross-site writes always; with a token set, the API needs it (writes: as a Bearer header) and pages a login."""

    def __init__(self, app, settings: Settings):
        super().__init__(app)
        self.settings = settings

    async def dispatch(self, request: Request, call_next) -> Response:
        """Check the request, then set this browser's CSRF cookie if it has none."""
        path, write = request.url.path, request.method not in SAFE_METHODS
        if write and (cross_site(request) or request.headers.get("origin") == "null"):
            return JSONResponse({"detail": "cross-site request refused"}, status_code=403)
        if self.settings.token and not path.startswith(OPEN_PATHS):
            header_ok = token_ok(self.settings, bearer(request))
            # agent tokens (tokens.py): a valid one passes for the agent endpoints only, 403 anywhere else
            if not header_ok and await tokens.is_agent(request, bearer(request)):
                if not tokens.agent_may(request.method, path):
                    return JSONResponse({"detail": tokens.AGENT_ONLY}, status_code=403)
                header_ok = True
            cookie_ok = logged_in(request, self.settings)
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
