"""Bounded request bodies: an ASGI middleware that answers 413 before a large body is read."""

from __future__ import annotations

import contextlib

import pydantic_core
import trio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body


class _BodyTooLarge(Exception):
    """Internal: a streamed body went over the limit while the app was reading it."""


class BodyLimitMiddleware:
    """Rejects HTTP request bodies over ``max_bytes`` with 413.

    A declared ``Content-Length`` over the limit is refused before the app
    runs (and one within it needs no counting: the HTTP server delivers
    exactly that many bytes). A body without one (chunked) is counted as it
    streams in, and the read that crosses the limit aborts the request, so no
    handler ever holds more than ``max_bytes`` of body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    break  # the HTTP server rejects malformed lengths itself
                if declared > limit:
                    await self._refuse(send, declared)
                else:
                    # The HTTP server delivers exactly the declared length: nothing to count.
                    await self.app(scope, receive, send)
                return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send, received)

    async def _refuse(self, send: Send, size: int) -> None:
        body = pydantic_core.to_json(error_body(
            "body_too_large",
            f"request body is over the limit of {self.max_bytes} bytes",
            {"limit": "max_body_bytes", "value": size, "maximum": self.max_bytes},
        ))  # fmt: skip
        await send({
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        })  # fmt: skip
        # The client may hang up as soon as it has the answer, and Hypercorn's
        # connection teardown can race this last write; nothing is lost then.
        with contextlib.suppress(trio.BusyResourceError):
            await send({"type": "http.response.body", "body": body})
