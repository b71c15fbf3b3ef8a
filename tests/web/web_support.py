"""Helpers shared by the web tests (importable as ``web_support``; fixtures are in conftest)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import trio
from starlette.applications import Starlette

from core import Engine
from web import serve


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
