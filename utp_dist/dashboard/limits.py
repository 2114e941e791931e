"""The request body limit: a body above `max_bytes` is answered 413 before any route reads it into memory."""

from __future__ import annotations

import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised while a body streams in without a Content-Length; an HTTPException so FastAPI's body parsing passes it on."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body larger than {max_bytes:,} bytes (the dashboard's --max-body)")


class BodyLimit:
    """ASGI middleware: 413 for a Content-Length above the limit at once, and for a chunked body once it passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            await self.refuse(send, HTTPException(400, "Content-Length is not a number"))
            return
        if int(length) > self.max_bytes:
            await self.refuse(send, BodyTooLarge(self.max_bytes))
            return
        received, started = 0, False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, sending)
        except BodyTooLarge as err:  # read outside a route (a middleware): answer here unless an answer began
            if started:
                raise
            await self.refuse(send, err)

    @staticmethod
    async def refuse(send: Send, err: HTTPException) -> None:
        """Answer with the error's line and close the connection (the rest of the body is never read)."""
        body = json.dumps({"detail": err.detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": err.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
