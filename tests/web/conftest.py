"""End-to-end fixtures: a real Hypercorn server on 127.0.0.1:0 serving an engine the test owns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from browser_support import require_browser
from pydantic import BaseModel
from web_support import Server, start_server

from trioflow import Engine, EngineLimits, Registry, RunContext, default_registry, open_engine
from trioflow.web import Settings, create_app


@dataclass
class Gates:
    """Lets a test hold runs of ``test.gate`` at that node until it opens the gate."""

    opened: trio.Event = field(default_factory=trio.Event)
    reached: trio.Event = field(default_factory=trio.Event)
    entered: int = 0


@pytest.fixture(scope="module")
def browser_available() -> None:
    """Chromium and Playwright are here (see ``browser_support``), else skip or fail."""
    require_browser()


@pytest.fixture
def gates() -> Gates:
    return Gates()


@pytest.fixture
def web_registry(gates: Gates) -> Registry:
    registry = default_registry()

    async def gate(state: BaseModel) -> None:
        gates.entered += 1
        gates.reached.set()
        await gates.opened.wait()

    def chatty(state: BaseModel, ctx: RunContext) -> None:
        lines = int(getattr(state, "lines", 10))
        size = int(getattr(state, "line_bytes", 100))
        for i in range(lines):
            ctx.log(f"line {i}", payload="x" * size)

    registry.add_tool("test.gate", gate)
    registry.add_tool("test.chatty", chatty, inline=True)
    return registry


@pytest.fixture
def limits() -> EngineLimits:
    return EngineLimits()


@pytest.fixture
async def web_engine(web_registry: Registry, limits: EngineLimits) -> AsyncIterator[Engine]:
    async with open_engine(registry=web_registry, limits=limits) as engine:
        yield engine


@pytest.fixture
def settings() -> Settings:
    return Settings(max_body_bytes=64 * 1024, heartbeat_s=15.0)


@pytest.fixture
async def server(web_engine: Engine, settings: Settings) -> AsyncIterator[Server]:
    app = create_app(web_engine, settings)
    async with trio.open_nursery() as nursery:
        srv = await start_server(nursery, app, web_engine)
        async with srv.client:
            yield srv
        srv.stop.set()


@pytest.fixture
def sleep_graph() -> dict[str, Any]:
    return {
        "id": "sleepy",
        "start_node": "nap",
        "nodes": [{"id": "nap", "callable": "tools.sleep"}],
    }


@pytest.fixture
def gate_graph() -> dict[str, Any]:
    return {
        "id": "gated",
        "start_node": "wait",
        "nodes": [
            {"id": "wait", "callable": "test.gate"},
            {"id": "done", "callable": "tools.noop"},
        ],
        "edges": [{"from": "wait", "to": "done"}],
    }
