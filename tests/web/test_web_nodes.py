"""Several ``trioflow serve`` processes on one PostgreSQL database, over HTTP and WebSocket.

Real processes on real time (leases run on the database's clock), each
test in its own schema, leases of 3 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from pgtest import fresh_schema, store_url, throwaway_cluster
from web_support import open_ws

TTL = 3.0
CLAIM = 0.5

SLOW = {
    "id": "slow",
    "start_node": "a",
    "nodes": [
        {"id": "a", "callable": "tools.noop"},
        {"id": "b", "callable": "tools.sleep"},
        {"id": "c", "callable": "tools.approve"},
    ],
    "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}],
}


@pytest.fixture
def schema() -> Iterator[str]:
    with fresh_schema() as name:
        yield name


@asynccontextmanager
async def node(schema: str, name: str, *extra: str) -> AsyncIterator[tuple[trio.Process, str]]:
    """``trioflow serve`` as node ``name`` on ``schema``; yields the process and its base URL."""
    async with node_on(store_url(schema), name, *extra) as served:
        yield served


@asynccontextmanager
async def node_on(store: str, name: str, *extra: str) -> AsyncIterator[tuple[trio.Process, str]]:
    """``trioflow serve`` as node ``name`` on the store URL ``store``."""
    command = [
        sys.executable,
        "-m",
        "trioflow.web.cli",
        "serve",
        "--port",
        "0",
        "--store",
        store,
        "--node-id",
        name,
        "--lease-ttl",
        str(TTL),
        "--claim-interval",
        str(CLAIM),
        "--quiet",
        *extra,
    ]
    proc = await trio.lowlevel.open_process(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    buffer = b""
    try:
        with trio.fail_after(30):
            while (match := re.search(rb"listening on (http://\S+)", buffer)) is None:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, f"node {name} exited: {buffer.decode(errors='replace')}"
                buffer += chunk
        yield proc, match.group(1).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(10):
            await proc.wait()
        await proc.stdout.aclose()


async def until(check: Callable[[], Awaitable[bool]], interval: float = 0.05) -> None:
    while True:
        if await check():
            return
        await trio.sleep(interval)


async def state(client: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    r = await client.get(f"/graph/state/{run_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def gapless(logs: list[dict[str, Any]]) -> bool:
    return [e["seq"] for e in logs] == list(range(1, len(logs) + 1))


async def start(client: httpx.AsyncClient, graph: str, initial: dict[str, Any]) -> str:
    r = await client.post(
        "/graph/run", json={"graph_id": graph, "initial_state": initial, "background": True}
    )
    assert r.status_code == 202, r.text
    run_id: str = r.json()["run_id"]
    return run_id


async def test_a_node_killed_with_20_runs_in_flight_is_taken_over(schema: str) -> None:
    with trio.fail_after(120):
        async with (
            node(schema, "a") as (proc_a, url_a),
            node(schema, "b") as (_, url_b),
            httpx.AsyncClient(base_url=url_a, timeout=10) as a,
            httpx.AsyncClient(base_url=url_b, timeout=10) as b,
        ):
            assert (await a.post("/graph/create", json=SLOW)).status_code == 201
            sleeping = [await start(a, "slow", {"sleep_s": 2.0}) for _ in range(10)]
            quick = [await start(a, "slow", {"sleep_s": 0.01}) for _ in range(10)]

            async def all_in_node_b() -> bool:
                states = [await state(b, r) for r in sleeping]
                return all(s["current_node"] == "b" for s in states)

            await until(all_in_node_b)
            nodes = (await b.get("/nodes")).json()
            assert {n["node_id"] for n in nodes["items"]} == {"a", "b"}
            assert nodes["node_id"] == "b"
            proc_a.send_signal(signal.SIGKILL)
            await proc_a.wait()
            killed = trio.current_time()

            async def all_completed() -> bool:
                states = [await state(b, r) for r in sleeping + quick]
                return all(s["status"] == "completed" for s in states)

            await until(all_completed)
            # Taken over within a lease and a claim interval, then the 2 s
            # node ran again.
            took = trio.current_time() - killed
            assert took < TTL + CLAIM + 2.0 + 2.0, took
            for run_id in sleeping + quick:
                final = await state(b, run_id)
                assert gapless(final["logs"])
                assert final["state"]["approved"] is True
            for run_id in sleeping:
                events = [
                    (e["event"], e["data"].get("node")) for e in (await state(b, run_id))["logs"]
                ]
                assert ("run_resumed", "b") in events
            healthz = (await b.get("/healthz")).json()
            assert healthz["node"] == "b" and healthz["store"]["ok"] is True


async def test_cancel_and_follow_a_run_on_another_node(schema: str) -> None:
    ticking = {
        "id": "ticks",
        "start_node": "tick",
        "nodes": [{"id": "tick", "callable": "tools.sleep"}],
        "edges": [{"from": "tick", "to": "tick", "type": "loop", "loop": {"max_iterations": 1000}}],
    }
    with trio.fail_after(60):
        async with (
            node(schema, "a") as (_, url_a),
            node(schema, "b") as (_, url_b),
            httpx.AsyncClient(base_url=url_a, timeout=10) as a,
            httpx.AsyncClient(base_url=url_b, timeout=10) as b,
        ):
            assert (await a.post("/graph/create", json=ticking)).status_code == 201
            run_id = await start(a, "ticks", {"sleep_s": 0.02})
            ws_url = "ws" + url_b[len("http") :] + f"/ws/logs/{run_id}"
            received: list[dict[str, Any]] = []
            async with open_ws(ws_url) as ws:
                while len(received) < 20:
                    message = json.loads(await ws.get_message())
                    assert message["type"] == "log"
                    received.append(message["log"])
                # Cut node b's listener off: the follower keeps everything.
                import psycopg

                with psycopg.connect(store_url(schema).split("?")[0], autocommit=True) as conn:
                    killed = conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'trioflow-listener:b'"
                    ).fetchall()
                assert killed == [(True,)]
                while len(received) < 60:
                    message = json.loads(await ws.get_message())
                    received.append(message["log"])
                started = trio.current_time()
                r = await b.post(f"/graph/cancel/{run_id}")
                took = trio.current_time() - started
                assert r.status_code == 200, r.text
                assert r.json()["status"] == "cancelled"
                assert took < 1.0, took
                while True:
                    message = json.loads(await ws.get_message())
                    if message["type"] == "status":
                        assert message["status"] == "cancelled"
                        break
                    received.append(message["log"])
            stored = (await b.get(f"/runs/{run_id}/logs", params={"limit": 1000})).json()
            assert received == stored["entries"]
            assert received[-1]["event"] == "run_cancelled"


async def test_sigterm_drains_and_hands_the_runs_to_the_other_node(schema: str) -> None:
    with trio.fail_after(60):
        async with (
            node(schema, "a", "--lease-ttl", "30", "--drain-timeout", "5") as (proc_a, url_a),
            node(schema, "b") as (_, url_b),
            httpx.AsyncClient(base_url=url_a, timeout=10) as a,
            httpx.AsyncClient(base_url=url_b, timeout=10) as b,
        ):
            assert (await a.post("/graph/create", json=SLOW)).status_code == 201
            finishing = await start(a, "slow", {"sleep_s": 1.0})
            stuck = await start(a, "slow", {"sleep_s": 3600})

            async def both_sleeping() -> bool:
                nodes = [(await state(a, r))["current_node"] for r in (finishing, stuck)]
                return nodes == ["b", "b"]

            await until(both_sleeping)
            stopping = trio.current_time()
            proc_a.send_signal(signal.SIGTERM)
            assert await proc_a.wait() == 0
            stopped = trio.current_time() - stopping
            assert stopped < 5.0 + 3.0, stopped  # the drain's 5 s, and the rest of a stop

            # The node that was finishing finished on a: b only goes on after it.
            async def taken(run_id: str) -> bool:
                logs = (await state(b, run_id))["logs"]
                return any(e["event"] == "run_resumed" for e in logs)

            await until(lambda: taken(finishing))
            await until(lambda: taken(stuck))
            # Both were handed over long before a's 30 s leases would expire.
            assert trio.current_time() - stopping < 15
            done = await state(b, finishing)
            events = [(e["event"], e["node"]) for e in done["logs"]]
            assert events.count(("node_completed", "b")) == 1
            r = await b.post(f"/graph/cancel/{stuck}")
            assert r.json()["status"] == "cancelled"


async def test_runs_survive_a_restart_of_postgresql(tmp_path: Any) -> None:
    """Two nodes on a server of their own, restarted twice: briefly, then for longer than a lease.

    Every run completes, no entry stored before a restart is lost or
    changed, and no log has a gap.
    """
    ticking = {
        "id": "ticks",
        "start_node": "tick",
        "nodes": [{"id": "tick", "callable": "tools.sleep"}],
        "edges": [{"from": "tick", "to": "tick", "type": "loop", "loop": {"max_iterations": 150}}],
    }
    with throwaway_cluster() as cluster, trio.fail_after(150):
        store = f"{cluster.url}?schema=restart"
        async with (
            node_on(store, "a") as (_, url_a),
            node_on(store, "b") as (_, url_b),
            httpx.AsyncClient(base_url=url_a, timeout=30) as a,
            httpx.AsyncClient(base_url=url_b, timeout=30) as b,
        ):
            assert (await a.post("/graph/create", json=SLOW)).status_code == 201
            assert (await a.post("/graph/create", json=ticking)).status_code == 201
            runs = [await start(a, "ticks", {"sleep_s": 0.05}) for _ in range(3)]
            runs += [await start(b, "ticks", {"sleep_s": 0.05}) for _ in range(3)]
            runs += [await start(b, "slow", {"sleep_s": 4.0}) for _ in range(2)]
            for outage in (0.5, TTL + 2.0):
                await trio.sleep(1.0)
                before = {r: await state(a, r) for r in runs}
                await trio.to_thread.run_sync(cluster.stop, "fast")
                await trio.sleep(outage)
                await trio.to_thread.run_sync(cluster.start)

                async def grown(seen: dict[str, Any] = before) -> bool:
                    try:
                        now = [await state(b, r) for r in runs]
                    except httpx.HTTPError:
                        return False
                    return all(
                        n["last_seq"] > seen[n["run_id"]]["last_seq"] or n["status"] == "completed"
                        for n in now
                    )

                await until(grown, interval=0.2)
                for run_id, old in before.items():
                    new = await state(b, run_id)
                    assert new["logs"][: len(old["logs"])] == old["logs"]

            async def all_completed() -> bool:
                statuses = [(await state(a, r))["status"] for r in runs]
                return statuses == ["completed"] * len(runs)

            await until(all_completed, interval=0.2)
            for run_id in runs:
                final = await state(a, run_id)
                assert gapless(final["logs"]), run_id
            # The long outage cut the nodes off for more than a lease: they
            # stopped the ticking runs, which were then resumed.
            for run_id in runs[:6]:
                events = [e["event"] for e in (await state(a, run_id))["logs"]]
                assert "run_resumed" in events, run_id
