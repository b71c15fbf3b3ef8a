"""Over HTTP and WebSocket: a failing store is reported, never met with silence or a 500.

A real Hypercorn server serves an engine whose store refuses writes on
demand (tests/stores/faults.py).
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from web_support import Server, open_ws, start_server, ws_collect

from trioflow import EngineLimits, MemoryStore, Registry, RunStalledError, open_engine
from trioflow.web import Settings, create_app

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "stores"))
from faults import FaultyStore, until

THREE = {
    "id": "three",
    "start_node": "a",
    "nodes": [
        {"id": "a", "callable": "tools.noop"},
        {"id": "b", "callable": "test.gate"},
        {"id": "c", "callable": "tools.approve"},
    ],
    "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}],
}


@pytest.fixture
def faulty() -> FaultyStore:
    return FaultyStore(MemoryStore())


@pytest.fixture
async def failing_server(
    faulty: FaultyStore, web_registry: Registry, settings: Settings
) -> AsyncIterator[Server]:
    limits = EngineLimits(store_retry_s=0.5)
    async with open_engine(store=faulty, registry=web_registry, limits=limits) as engine:
        app = create_app(engine, settings)
        async with trio.open_nursery() as nursery:
            srv = await start_server(nursery, app, engine)
            async with srv.client:
                yield srv
            srv.stop.set()


async def _healthz_is(server: Server, status: int) -> bool:
    return (await server.client.get("/healthz")).status_code == status


async def _stall_a_run(server: Server, faulty: FaultyStore, gates: Any) -> str:
    await server.create(THREE)
    run_id = await server.start("three")
    with trio.fail_after(10):
        await gates.reached.wait()
    faulty.fail(lambda run: run.last_seq > 5)  # everything after the run reached b
    gates.opened.set()
    with trio.fail_after(10), pytest.raises(RunStalledError):
        await server.engine.wait(run_id)
    return run_id


async def test_healthz_is_503_degraded_while_writes_fail_and_200_after(
    failing_server: Server, faulty: FaultyStore, gates: Any
) -> None:
    assert (await failing_server.client.get("/healthz")).json()["status"] == "ok"
    run_id = await _stall_a_run(failing_server, faulty, gates)
    with trio.fail_after(10):
        await until(lambda: _healthz_is(failing_server, 503), 0.05)
    r = await failing_server.client.get("/healthz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "degraded"
    assert body["store"]["ok"] is False
    assert "disk full" in body["store"]["error"]
    # Not ready for traffic either, and it says why.
    r = await failing_server.client.get("/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False
    assert any("disk full" in reason for reason in r.json()["reasons"])
    # The stalled run is where it stood, and says so to a synchronous waiter.
    state = (await failing_server.client.get(f"/graph/state/{run_id}")).json()
    assert state["status"] == "running"
    faulty.heal()
    with trio.fail_after(10):
        await until(lambda: _healthz_is(failing_server, 200), 0.25)
    assert (await failing_server.client.get("/readyz")).json() == {"ready": True, "reasons": []}
    # Once writes work, the run can be cancelled (no other process owns it).
    r = await failing_server.client.post(f"/graph/cancel/{run_id}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"


async def test_a_follower_of_a_stalled_run_gets_an_error_not_silence(
    failing_server: Server, faulty: FaultyStore, gates: Any
) -> None:
    run_id = await _stall_a_run(failing_server, faulty, gates)
    with trio.fail_after(10):
        async with open_ws(f"{failing_server.ws_url}/ws/logs/{run_id}") as ws:
            messages, code = await ws_collect(ws)
    assert code == 4503
    assert [m["type"] for m in messages[:-1]] == ["log"] * (len(messages) - 1)
    assert messages[-1]["type"] == "error"
    assert messages[-1]["error"]["code"] == "run_stalled"
    # SSE says the same as an error event.
    with trio.fail_after(10):
        r = await failing_server.client.get(f"/sse/logs/{run_id}")
    assert "event: error" in r.text
    assert "run_stalled" in r.text


async def test_a_synchronous_run_that_stalls_answers_503(
    failing_server: Server, faulty: FaultyStore, gates: Any
) -> None:
    # It used to wait for ever: nothing would ever end the run.
    await failing_server.create(THREE)
    faulty.fail(lambda run: run.last_seq > 2)  # the run stalls after its first checkpoint
    with trio.fail_after(10):
        r = await failing_server.client.post("/graph/run", json={"graph_id": "three"})
    assert gates.entered == 0
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "run_stalled"
    # The error names the run, so the client can cancel it or come back to it.
    run_id = r.headers["x-run-id"]
    assert r.headers["location"] == f"/graph/state/{run_id}"
    assert (await failing_server.client.get(r.headers["location"])).json()["status"] == "running"


async def test_a_graph_over_the_servers_ceilings_is_422(server: Server) -> None:
    document = {
        "id": "greedy",
        "start_node": "a",
        "max_steps": 1_000_000,
        "nodes": [{"id": "a", "callable": "tools.fail", "retry": {"max_attempts": 100}}],
    }
    r = await server.client.post("/graph/create", json=document)
    assert r.status_code == 422
    problems = {(p["code"], p["path"]) for p in r.json()["error"]["details"]["problems"]}
    assert problems == {
        ("over_limit", "$.max_steps"),
        ("over_limit", "$.nodes[0].retry.max_attempts"),
    }
