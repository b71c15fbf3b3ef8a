"""Helpers shared by the web tests (importable as ``web_support``; fixtures are in conftest)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from starlette.applications import Starlette
from trio_websocket import WebSocketConnection, open_websocket_url

from trioflow import Engine
from trioflow.web import serve


@dataclass
class Server:
    """A running server: its URLs, a client, the engine behind it, and its off switch."""

    app: Starlette
    engine: Engine
    base_url: str
    client: httpx.AsyncClient
    stop: trio.Event
    stopped: trio.Event

    @property
    def ws_url(self) -> str:
        return "ws" + self.base_url[len("http") :]

    async def create(self, document: dict[str, Any]) -> dict[str, Any]:
        response = await self.client.post("/graph/create", json=document)
        assert response.status_code in (200, 201), response.text
        body: dict[str, Any] = response.json()
        return body

    async def start(self, graph_id: str, state: dict[str, Any] | None = None) -> str:
        response = await self.client.post(
            "/graph/run", json={"graph_id": graph_id, "initial_state": state, "background": True}
        )
        assert response.status_code == 202, response.text
        run_id: str = response.json()["run_id"]
        return run_id


async def start_server(nursery: trio.Nursery, app: Starlette, engine: Engine) -> Server:
    stop, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve(
                app,
                host="127.0.0.1",
                port=0,
                task_status=task_status,
                shutdown_trigger=stop.wait,
                handle_signals=False,
                graceful_timeout=2.0,
            )
        finally:
            stopped.set()

    binds: list[str] = await nursery.start(run)
    client = httpx.AsyncClient(base_url=binds[0], timeout=10.0)
    return Server(app, engine, binds[0], client, stop, stopped)


async def ws_collect(ws: Any) -> tuple[list[dict[str, Any]], int | None]:
    """Every message until the server closes, and the close code."""
    import json

    from trio_websocket import ConnectionClosed

    messages: list[dict[str, Any]] = []
    while True:
        try:
            messages.append(json.loads(await ws.get_message()))
        except ConnectionClosed as closed:
            code: int | None = closed.reason.code
            return messages, code


def parse_sse(text: str) -> list[dict[str, str]]:
    """Events of an SSE body: each a dict of its fields; comments under ``comment``."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                event["comment"] = line[1:].strip()
            else:
                name, _, value = line.partition(": ")
                event[name] = value
        events.append(event)
    return events


@asynccontextmanager
async def open_ws(url: str, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    """``open_websocket_url`` that also closes its TCP stream.

    trio-websocket 0.12 leaves the client's socket open when the server
    closes first (it waits for the server's TCP close, then never closes its
    own end), which the suite's ``filterwarnings = error`` turns into failures.
    """
    async with open_websocket_url(url, **kwargs) as ws:
        try:
            yield ws
        finally:
            stream = ws._stream
    await stream.aclose()


async def open_silent_ws(base_url: str, path: str) -> trio.SocketStream:
    """A WebSocket client that completes the handshake and then never reads.

    Returns the raw TCP stream; the caller closes it.
    """
    host, port = base_url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await stream.send_all(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(1)  # byte by byte: leave the frames unread
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """``response`` is the JSON error ``{"error": {code, message, details}}``; its details."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    details: dict[str, Any] = body["error"]["details"]
    return details
