"""Crash safety, end to end: SIGKILL a real ``trioflow serve`` on SQLite and start it again.

Everything written before the kill must be there after it, and runs that were
in flight must be resumed and complete. This runs real processes on real
time (bounded by ``fail_after``); it cannot use a virtual clock.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent

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


def _serve_command(db: pathlib.Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trioflow.web.cli",
        "serve",
        "--port",
        "0",
        "--store",
        f"sqlite:///{db}",
        *extra,
    ]


@asynccontextmanager
async def serving(db: pathlib.Path, *extra: str) -> AsyncIterator[tuple[trio.Process, str]]:
    """Start ``trioflow serve`` on ``db``; yield the process and its base URL."""
    cmd = _serve_command(db, *extra)
    proc = await trio.lowlevel.open_process(
        cmd,
        cwd=ROOT,
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
                assert chunk, f"server exited before listening: {buffer.decode(errors='replace')}"
                buffer += chunk
        yield proc, match.group(1).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(10):
            await proc.wait()


async def _state(client: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    response = await client.get(f"/graph/state/{run_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _until(client: httpx.AsyncClient, run_id: str, predicate: Any) -> dict[str, Any]:
    while True:
        state = await _state(client, run_id)
        if predicate(state):
            return state
        await trio.sleep(0.05)


def _comparable(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "updated_at"}


async def test_sigkill_loses_nothing_and_in_flight_runs_complete(tmp_path: pathlib.Path) -> None:
    db = tmp_path / "trioflow.db"
    spec = json.loads((ROOT / "samples" / "code_review.json").read_text())
    with trio.fail_after(120):
        async with serving(db) as (proc, url):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                for doc in (spec, SLOW):
                    assert (await client.post("/graph/create", json=doc)).status_code == 201
                finished = []
                for issues in (0, 1, 2):
                    r = await client.post(
                        "/graph/run",
                        json={
                            "graph_id": "code-review-a",
                            "initial_state": {"issues_open": issues},
                            "background": False,
                        },
                    )
                    assert r.status_code == 200 and r.json()["status"] == "completed"
                    finished.append(r.json()["run_id"])
                in_flight = []
                for _ in range(3):
                    r = await client.post(
                        "/graph/run",
                        json={
                            "graph_id": "slow",
                            "initial_state": {"sleep_s": 1.5},
                            "background": True,
                        },
                    )
                    assert r.status_code == 202
                    in_flight.append(r.json()["run_id"])
                for run_id in in_flight:
                    await _until(client, run_id, lambda s: s["current_node"] == "b")
                cancelled = in_flight.pop()
                r = await client.post(f"/graph/cancel/{cancelled}")
                assert r.status_code == 200 and r.json()["status"] == "cancelled"
                before = {
                    run_id: await _state(client, run_id)
                    for run_id in [*finished, *in_flight, cancelled]
                }
                graphs_before = (await client.get("/graphs")).json()["items"]

            proc.send_signal(signal.SIGKILL)
            await proc.wait()

        async with serving(db) as (proc, url):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                assert (await client.get("/graphs")).json()["items"] == graphs_before
                for doc in (spec, SLOW):
                    stored = (await client.get(f"/graph/{doc['id']}")).json()
                    assert stored["start_node"] == doc["start_node"]
                # Finished and cancelled runs are exactly as they were.
                for run_id in [*finished, cancelled]:
                    assert _comparable(await _state(client, run_id)) == _comparable(before[run_id])
                # In-flight runs complete; their log before the kill is kept as is,
                # then run_resumed, and node b ran again (at-least-once).
                for run_id in in_flight:
                    after = await _until(client, run_id, lambda s: s["status"] == "completed")
                    old, new = before[run_id]["logs"], after["logs"]
                    assert new[: len(old)] == old
                    assert [e["seq"] for e in new] == list(range(1, len(new) + 1))
                    events = [(e["event"], e["node"]) for e in new[len(old) :]]
                    assert events[0] == ("run_resumed", "b")
                    assert ("node_started", "b") in events[1:]
                    assert after["state"]["approved"] is True
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await proc.wait() == 0


DEADLY = {
    "id": "deadly",
    "start_node": "a",
    "nodes": [
        {"id": "a", "callable": "tools.noop"},
        {"id": "die", "callable": "crash.die"},
        {"id": "c", "callable": "tools.approve"},
    ],
    "edges": [{"from": "a", "to": "die"}, {"from": "die", "to": "c"}],
}
TOOLS = ("--tools", "tests.crash_tool_module")


async def _dies_by_itself(db: pathlib.Path) -> bytes:
    """Start a server that resumes a deadly run: it must die without being asked."""
    proc = await trio.lowlevel.open_process(
        _serve_command(db, *TOOLS),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    output = b""
    try:
        with trio.fail_after(30):
            while chunk := await proc.stdout.receive_some(4096):
                output += chunk
            assert await proc.wait() == 70, output.decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return output


async def test_a_run_that_kills_its_process_twice_is_not_resumed_a_third_time(
    tmp_path: pathlib.Path,
) -> None:
    db = tmp_path / "trioflow.db"
    with trio.fail_after(120):
        # The run kills the server that started it...
        async with serving(db, *TOOLS) as (proc, url):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                assert (await client.post("/graph/create", json=DEADLY)).status_code == 201
                r = await client.post("/graph/run", json={"graph_id": "deadly", "background": True})
                assert r.status_code == 202
                run_id = r.json()["run_id"]
            assert await proc.wait() == 70
        # ... and the next one, which resumed it.
        await _dies_by_itself(db)
        # The third server does not resume it: it records a crash loop and serves.
        async with serving(db, *TOOLS) as (proc, url):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                state = await _until(client, run_id, lambda s: s["status"] == "failed")
                assert state["error"]["code"] == "crash_loop"
                assert state["error"]["node"] == "die"
                events = [e["event"] for e in state["logs"]]
                assert events.count("run_resumed") == 1
                assert events[-1] == "run_failed"
                assert [e["seq"] for e in state["logs"]] == list(range(1, len(events) + 1))
                # It serves other runs as usual.
                quick = {
                    "id": "quick",
                    "start_node": "q",
                    "nodes": [{"id": "q", "callable": "tools.approve"}],
                }
                assert (await client.post("/graph/create", json=quick)).status_code == 201
                r = await client.post("/graph/run", json={"graph_id": "quick"})
                assert r.status_code == 200 and r.json()["status"] == "completed"
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await proc.wait() == 0


async def test_a_tool_raising_system_exit_or_keyboard_interrupt_fails_only_its_run(
    tmp_path: pathlib.Path,
) -> None:
    # These used to kill the server (and answer the synchronous request 200
    # "running" on the way out). Now they fail their run; the server serves on.
    db = tmp_path / "trioflow.db"
    graphs = [
        {"id": "exits", "start_node": "x", "nodes": [{"id": "x", "callable": "crash.exit"}]},
        {
            "id": "interrupts",
            "start_node": "k",
            "nodes": [{"id": "k", "callable": "crash.interrupt"}],
        },
    ]
    with trio.fail_after(60):
        async with serving(db, *TOOLS) as (proc, url):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                for graph, kind in zip(graphs, ("SystemExit", "KeyboardInterrupt"), strict=True):
                    assert (await client.post("/graph/create", json=graph)).status_code == 201
                    r = await client.post("/graph/run", json={"graph_id": graph["id"]})
                    assert r.status_code == 200, r.text
                    body = r.json()
                    assert body["status"] == "failed"
                    assert body["error"]["code"] == "node_failed"
                    assert body["error"]["type"] == kind
                    assert "traceback" in body["error"]["details"]
                    assert (await client.get("/healthz")).status_code == 200
                assert proc.returncode is None
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
        # Nothing is left to resume: a restart finds both runs failed.
        async with serving(db, *TOOLS) as (proc, url):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                runs = (await client.get("/runs")).json()["items"]
                assert sorted(r["status"] for r in runs) == ["failed", "failed"]
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0


async def test_one_server_per_store_file_and_a_killed_one_leaves_no_stale_lock(
    tmp_path: pathlib.Path,
) -> None:
    db = tmp_path / "trioflow.db"
    with trio.fail_after(60):
        async with serving(db) as (first, url):
            second = await trio.run_process(
                _serve_command(db), cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
            )
            assert second.returncode == 3
            assert second.stdout == b""  # it never listened
            lines = second.stderr.decode().splitlines()
            assert len(lines) == 1, lines
            assert str(db) in lines[0] and f"process {first.pid}" in lines[0]
            # prune may run beside the server: it only deletes finished runs.
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                quick = {
                    "id": "quick",
                    "start_node": "q",
                    "nodes": [{"id": "q", "callable": "tools.approve"}],
                }
                assert (await client.post("/graph/create", json=quick)).status_code == 201
                run = (await client.post("/graph/run", json={"graph_id": "quick"})).json()
                assert run["status"] == "completed"
                pruned = await trio.run_process(
                    [
                        sys.executable,
                        "-m",
                        "trioflow.web.cli",
                        "prune",
                        "--store",
                        f"sqlite:///{db}",
                        "--older-than",
                        "0s",
                    ],
                    cwd=ROOT,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                assert pruned.returncode == 0, pruned.stderr
                assert b"deleted 1 " in pruned.stdout
                r = await client.get(f"/graph/state/{run['run_id']}")
                assert r.status_code == 404
                assert (await client.get("/healthz")).status_code == 200
            first.kill()  # SIGKILL: the OS drops the lock with the process
            await first.wait()
        async with serving(db) as (proc, url):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                assert (await client.get("/graph/quick")).status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0


TWO_NAPS = {
    "id": "two-naps",
    "start_node": "a",
    "nodes": [
        {"id": "a", "callable": "tools.noop"},
        {"id": "b", "callable": "tools.sleep"},
        {"id": "c", "callable": "tools.sleep"},
        {"id": "d", "callable": "tools.approve"},
    ],
    "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}, {"from": "c", "to": "d"}],
}


def _signals_applied(state: dict[str, Any]) -> list[int]:
    return [e["data"]["signal_id"] for e in state["logs"] if e["event"] == "signal_received"]


async def test_a_signal_takes_effect_exactly_once_across_a_sigkill(tmp_path: pathlib.Path) -> None:
    """One signal applied before the kill, one stored (202) but not applied yet.

    After the restart the first is not applied again (its checkpoint moved
    the run's signal cursor) and the second is applied once, in order.
    """
    db = tmp_path / "trioflow.db"
    with trio.fail_after(120):
        async with serving(db) as (proc, url):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                assert (await client.post("/graph/create", json=TWO_NAPS)).status_code == 201
                r = await client.post(
                    "/graph/run",
                    json={
                        "graph_id": "two-naps",
                        "initial_state": {"sleep_s": 2.0},
                        "background": True,
                    },
                )
                run_id = r.json()["run_id"]
                await _until(client, run_id, lambda s: s["current_node"] == "b")
                first = await client.post(
                    f"/graph/signal/{run_id}", json={"name": "note", "updates": {"note": "one"}}
                )
                assert first.status_code == 202, first.text
                # Applied between b and c: its own checkpoint, after the one that starts c.
                applied = await _until(
                    client,
                    run_id,
                    lambda s: s["current_node"] == "c" and _signals_applied(s) != [],
                )
                assert applied["state"]["note"] == "one"
                assert _signals_applied(applied) == [first.json()["signal_id"]]
                second = await client.post(
                    f"/graph/signal/{run_id}", json={"name": "extra", "updates": {"extra": "two"}}
                )
                assert second.status_code == 202, second.text
                before = await _state(client, run_id)
                assert before["current_node"] == "c" and "extra" not in before["state"]
            proc.send_signal(signal.SIGKILL)
            await proc.wait()

        async with serving(db) as (proc, url):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                final = await _until(client, run_id, lambda s: s["status"] == "completed")
                assert _signals_applied(final) == [
                    first.json()["signal_id"],
                    second.json()["signal_id"],
                ]
                assert final["state"]["note"] == "one"
                assert final["state"]["extra"] == "two"
                assert final["state"]["approved"] is True
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await proc.wait() == 0


ASK = {
    "id": "ask",
    "start_node": "a",
    "nodes": [
        {"id": "a", "callable": "tools.noop"},
        {
            "id": "ask",
            "wait": {
                "prompt": "Go on?",
                "input_schema": {
                    "type": "object",
                    "properties": {"go": {"type": "boolean"}},
                    "required": ["go"],
                },
                "timeout_s": 3600,
            },
        },
        {"id": "d", "callable": "tools.approve"},
    ],
    "edges": [{"from": "a", "to": "ask"}, {"from": "ask", "to": "d"}],
}


async def test_a_waiting_run_survives_a_sigkill_untouched(tmp_path: pathlib.Path) -> None:
    db = tmp_path / "trioflow.db"
    with trio.fail_after(60):
        async with serving(db) as (proc, url):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                assert (await client.post("/graph/create", json=ASK)).status_code == 201
                r = await client.post("/graph/run", json={"graph_id": "ask", "initial_state": {}})
                assert r.status_code == 200 and r.json()["status"] == "waiting", r.text
                run_id = r.json()["run_id"]
                before = await _state(client, run_id)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()

        async with serving(db) as (proc, url):
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                # Not re-executed: the same record, the same question, the same deadline.
                assert _comparable(await _state(client, run_id)) == _comparable(before)
                waiting = before["waiting"]
                r = await client.post(
                    f"/graph/resume/{run_id}",
                    json={"input": {"go": True}, "request_id": waiting["request_id"]},
                )
                assert r.status_code == 200, r.text
                assert r.json()["status"] == "completed"
                assert r.json()["state"]["go"] is True
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await proc.wait() == 0
