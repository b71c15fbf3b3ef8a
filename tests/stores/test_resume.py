"""Restart: a second engine on the same SQLite file resumes what the first left unfinished."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from typing import Any, cast

import pytest
import trio
import trio.testing

from trioflow import Engine, LogEntry, Registry, RunStatus, default_registry, open_engine
from trioflow.stores.sqlite import SQLiteStore

NAP = {
    "id": "nap",
    "start_node": "a",
    "nodes": [
        {"id": "a", "callable": "tools.noop"},
        {"id": "nap", "callable": "tools.sleep"},
        {"id": "b", "callable": "tools.approve"},
    ],
    "edges": [
        {"from": "a", "to": "nap", "type": "sequential"},
        {"from": "nap", "to": "b", "type": "sequential"},
    ],
}
QUICK = {
    "id": "quick",
    "start_node": "only",
    "nodes": [{"id": "only", "callable": "tools.noop"}],
    "edges": [],
}
CUSTOM = {
    "id": "custom",
    "start_node": "hold",
    "nodes": [{"id": "hold", "callable": "test.hold"}],
    "edges": [],
}


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # Virtual time, but jumping only after 500 ms of real idleness. SQLite
    # calls run in worker threads and a task waiting on a thread counts as
    # blocked, so with autojump_clock (threshold 0) the clock would jump to
    # the next deadline -- the parked tools.sleep, or a fail_after guard --
    # while a store call is still running. (50 ms was too little on a loaded
    # 2-core machine: opening a store took longer, and fail_after fired.)
    return trio.testing.MockClock(autojump_threshold=0.5)


async def _hold(state: Any) -> None:
    await trio.sleep_forever()


def _seqs(entries: Sequence[LogEntry]) -> list[int]:
    return [e.seq for e in entries]


def _started(entries: Sequence[LogEntry]) -> list[str | None]:
    return [e.node for e in entries if e.event == "node_started"]


async def _follow_until(engine: Engine, run_id: str, done: Callable[[LogEntry], bool]) -> None:
    follow = cast(AsyncGenerator[LogEntry, None], engine.follow(run_id))
    async with aclosing(follow) as entries:
        async for entry in entries:
            if done(entry):
                return
    raise AssertionError(f"run {run_id} ended before the entry waited for")


async def _until_node_started(engine: Engine, run_id: str, node: str) -> None:
    await _follow_until(engine, run_id, lambda e: e.event == "node_started" and e.node == node)


async def test_a_restart_resumes_unfinished_runs_and_leaves_the_rest(
    clock: trio.testing.MockClock, tmp_path: pathlib.Path
) -> None:
    path = str(tmp_path / "trioflow.db")
    first_registry: Registry = default_registry()
    first_registry.add_tool("test.hold", _hold)
    with trio.fail_after(5000):
        async with open_engine(store=SQLiteStore(path), registry=first_registry) as engine:
            for document in (NAP, QUICK, CUSTOM):
                await engine.register_graph(document)
            parked = await engine.start_run("nap", {"sleep_s": 1000})
            cancelled = await engine.start_run("nap", {"sleep_s": 1000})
            done = await engine.start_run("quick", {})
            orphan = await engine.start_run("custom", {})
            await _until_node_started(engine, parked.run_id, "nap")
            await _until_node_started(engine, orphan.run_id, "hold")
            await engine.cancel(cancelled.run_id)
            await engine.wait(done.run_id)
            before = {
                run.run_id: (await engine.get_run(run.run_id), await engine.read_log(run.run_id))
                for run in (parked, cancelled, done, orphan)
            }
        # Leaving the block stopped the engine with `parked` inside tools.sleep.
        parked_before, parked_log_before = before[parked.run_id]
        assert parked_before is not None
        assert parked_before.status is RunStatus.RUNNING
        assert parked_before.current_node == "nap"

        async with open_engine(store=SQLiteStore(path), registry=default_registry()) as engine:
            final = await engine.wait(parked.run_id)
            after = {
                run_id: (await engine.get_run(run_id), await engine.read_log(run_id))
                for run_id in before
            }

    # The parked run completed; the node in flight ran again (at-least-once).
    log = after[parked.run_id][1]
    assert final.status is RunStatus.COMPLETED
    assert final.state == {"sleep_s": 1000, "approved": True}
    assert final.attempt == 2
    assert _seqs(log) == list(range(1, len(log) + 1))
    assert log[: len(parked_log_before)] == parked_log_before
    assert [e.event for e in log].count("run_resumed") == 1
    assert _started(log) == ["a", "nap", "nap", "b"]
    assert log[-1].event == "run_completed"

    # Cancelled and completed runs are exactly as they were.
    for run in (cancelled, done):
        assert after[run.run_id] == before[run.run_id]
    assert before[cancelled.run_id][0].status is RunStatus.CANCELLED
    assert before[done.run_id][0].status is RunStatus.COMPLETED

    # A run whose tool is gone cannot resume: it fails, saying why.
    orphan_run, orphan_log = after[orphan.run_id]
    assert orphan_run is not None
    assert orphan_run.status is RunStatus.FAILED
    assert orphan_run.error is not None
    assert orphan_run.error["code"] == "graph_unavailable"
    assert orphan_log[-1].event == "run_failed"
    assert _seqs(orphan_log) == list(range(1, len(orphan_log) + 1))
    assert "run_resumed" not in [e.event for e in orphan_log]


async def test_a_restart_with_nothing_unfinished_changes_nothing(
    clock: trio.testing.MockClock, tmp_path: pathlib.Path
) -> None:
    path = str(tmp_path / "trioflow.db")
    with trio.fail_after(60):
        async with open_engine(store=SQLiteStore(path)) as engine:
            await engine.register_graph(QUICK)
            run = await engine.start_run("quick", {"k": "v"})
            first = await engine.wait(run.run_id)
            log = await engine.read_log(run.run_id)
        async with open_engine(store=SQLiteStore(path)) as engine:
            assert engine.active_runs == 0
            assert await engine.get_run(run.run_id) == first
            assert await engine.read_log(run.run_id) == log
            again = await engine.start_run("quick", {})
            assert (await engine.wait(again.run_id)).status is RunStatus.COMPLETED
    assert first.status is RunStatus.COMPLETED


async def _until_resumed(engine: Engine, run_id: str, times: int) -> None:
    """Until the run's log holds ``times`` run_resumed entries (and the node after it started)."""
    seen = 0

    def done(entry: LogEntry) -> bool:
        nonlocal seen
        seen += entry.event == "run_resumed"
        return seen == times and entry.event == "node_started"

    await _follow_until(engine, run_id, done)


async def _leave_a_dirty_session(path: str) -> None:
    """What a process that died while holding the store leaves behind."""
    store = SQLiteStore(path)
    await store.open()
    await store.begin_session()
    await store.aclose()  # no end_session: as if the process had died


async def test_a_run_whose_process_died_twice_at_one_step_is_failed_with_crash_loop(
    clock: trio.testing.MockClock, tmp_path: pathlib.Path
) -> None:
    path = str(tmp_path / "trioflow.db")
    registry: Registry = default_registry()
    registry.add_tool("test.hold", _hold)
    with trio.fail_after(5000):
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            await engine.register_graph(CUSTOM)
            await engine.register_graph(NAP)
            stuck = await engine.start_run("custom", {})
            moving = await engine.start_run("nap", {"sleep_s": 10})
            await _until_node_started(engine, stuck.run_id, "hold")
            await _until_node_started(engine, moving.run_id, "nap")

        # Crash 1: both runs are resumed, and the crash is counted.
        await _leave_a_dirty_session(path)
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            await _until_resumed(engine, stuck.run_id, 1)
            assert (await engine.get_run(stuck.run_id)).crashes == 1
            final_moving = await engine.wait(moving.run_id)  # this one makes progress
            resumed = [e for e in await engine.read_log(stuck.run_id) if e.event == "run_resumed"]
            assert resumed[-1].data["crashes"] == 1

        # A clean stop in between is not a crash.
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            await _until_resumed(engine, stuck.run_id, 2)
            assert (await engine.get_run(stuck.run_id)).crashes == 1

        # Crash 2 at the same step: not resumed a third time.
        await _leave_a_dirty_session(path)
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            final = await engine.wait(stuck.run_id)
            log = await engine.read_log(stuck.run_id)
            assert engine.active_runs == 0

    assert final_moving.status is RunStatus.COMPLETED
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert final.error["code"] == "crash_loop"
    assert final.error["node"] == "hold"
    assert final.error["details"] == {"crashes": 2}
    assert _seqs(log) == list(range(1, len(log) + 1))
    assert [e.event for e in log].count("run_resumed") == 2  # crash 1, then the clean restart
    assert log[-1].event == "run_failed"


async def test_progress_between_crashes_resets_the_count(
    clock: trio.testing.MockClock, tmp_path: pathlib.Path
) -> None:
    path = str(tmp_path / "trioflow.db")
    gate_a = trio.Event()
    registry: Registry = default_registry()

    async def first(state: Any) -> None:
        await gate_a.wait()

    registry.add_tool("test.first", first)
    registry.add_tool("test.hold", _hold)
    two_steps = {
        "id": "two",
        "start_node": "one",
        "nodes": [{"id": "one", "callable": "test.first"}, {"id": "two", "callable": "test.hold"}],
        "edges": [{"from": "one", "to": "two"}],
    }
    with trio.fail_after(5000):
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            await engine.register_graph(two_steps)
            run = await engine.start_run("two", {})
            await _until_node_started(engine, run.run_id, "one")
        await _leave_a_dirty_session(path)
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            await _until_resumed(engine, run.run_id, 1)
            gate_a.set()  # this time the step completes
            await _until_node_started(engine, run.run_id, "two")
            assert (await engine.get_run(run.run_id)).crashes == 0
        await _leave_a_dirty_session(path)
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            await _until_resumed(engine, run.run_id, 2)
            record = await engine.get_run(run.run_id)
            assert record.status is RunStatus.RUNNING
            assert record.crashes == 1
