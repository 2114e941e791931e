"""The dashboard's JSON API over plain HTTP (the standard library only, so an agent machine needs no web packages)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from utp_dist import credentials
from utp_dist.credentials import TOKEN_ENV
from utp_dist.errors import UserError


class Unreachable(Exception):
    """The server did not answer (down, restarting, a 5xx, or 429 while it slows down wrong tokens): try again later; running children keep running."""


class Gone(UserError):
    """404: the server does not know the agent (deleted, or its database was reset) or the job; an agent registers again."""


class Conflict(Exception):
    """409: the state changed under the caller; for an agent, it no longer holds the job at this attempt and its process must die."""


class Client:
    """Calls to one dashboard, with its token as a Bearer header: --token, $UTP_DASHBOARD_TOKEN, or the token file of this user."""

    def __init__(self, server: str, token: str | None = None, timeout_s: float = 30.0):
        if not server.startswith(("http://", "https://")):
            raise UserError(f"--server {server!r}: give the dashboard's URL, e.g. http://127.0.0.1:8000")
        self.server, self.timeout_s = server.rstrip("/"), timeout_s
        self.token, self.token_source = credentials.find(token)

    def call(self, method: str, path: str, body: dict | None = None) -> dict | list | None:
        """One request; the JSON answer (None for 204). 409 -> Conflict, 404 -> Gone, no answer or 5xx -> Unreachable, 401/4xx -> UserError."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read()
        except urllib.error.HTTPError as err:
            detail = _detail(err)
            if err.code == 409:
                raise Conflict(detail) from None
            if err.code == 404:
                raise Gone(f"{method} {path}: {detail}") from None
            if err.code >= 500 or err.code == 429:
                raise Unreachable(f"{method} {path}: HTTP {err.code}: {detail}") from None
            if err.code == 401 and self.token is None:
                raise UserError(
                    f"{self.server} needs its token: pass --token, set {TOKEN_ENV}, or run as the user whose "
                    f"{credentials.token_file()} holds it"
                ) from None
            if err.code == 401:
                raise UserError(
                    f"{self.server} refused the token from {self.token_source}: pass its own with --token or {TOKEN_ENV}"
                ) from None
            raise UserError(f"{method} {self.server}{path}: HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise Unreachable(f"{self.server}: {getattr(err, 'reason', err)}") from None
        return json.loads(text) if text else None

    def post(self, path: str, body: dict) -> dict | list | None:
        """POST a JSON body."""
        return self.call("POST", path, body)

    def get(self, path: str) -> dict | list | None:
        """GET a JSON answer."""
        return self.call("GET", path)


def _detail(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read()).get("detail"))
    except (ValueError, AttributeError, OSError):
        return err.reason
