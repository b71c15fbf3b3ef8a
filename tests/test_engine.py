"""The engine as an embedding program sees it: graphs, limits, shutdown and resume."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import aclosing
from typing import Any

import pytest
import trio
import trio.testing

from trioflow import (
    CapacityError,
    Engine,
    EngineLimits,
    GraphConflictError,
    GraphValidationError,
    LimitExceededError,
    LogEntry,
    MemoryStore,
    Registry,
    RunStatus,
    StateValidationError,
    UnknownGraphError,
    open_engine,
)


def _doc(graph_id: str, *callables: str, **extra: Any) -> dict[str, Any]:
    nodes = [{"id": f"n{i}", "callable": c} for i, c in enumerate(callables)]
    edges = [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(len(callables) - 1)]
    return {"id": graph_id, "start_node": "n0", "nodes": nodes, "edges": edges, **extra}


def _assert_gapless(entries: Sequence[LogEntry]) -> None:
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))


async def _wait_for_node(engine: Engine, run_id: str, node_id: str) -> None:
    async with aclosing(engine.follow(run_id)) as entries:
        async for entry in entries:
            if entry.event == "node_started" and entry.node == node_id:
                return
    raise AssertionError(f"run ended before {node_id} started")


# -- graphs --------------------------------------------------------------------------


async def test_register_graph_is_idempotent_for_the_same_document(engine: Engine) -> None:
    first = await engine.register_graph(_doc("g", "tools.noop", "tools.approve"))
    again = await engine.register_graph(_doc("g", "tools.noop", "tools.approve"))
    assert again.id == first.id == "g"
    assert again.digest == first.digest
    page = await engine.list_graphs()
    assert [g.graph_id for g in page.items] == ["g"]


async def test_register_graph_refuses_a_different_document_under_a_taken_id(
    engine: Engine,
) -> None:
    await engine.register_graph(_doc("g", "tools.noop", "tools.approve"))
    with pytest.raises(GraphConflictError) as info:
        await engine.register_graph(_doc("g", "tools.noop"))
    assert info.value.graph_id == "g"
    # The original is untouched and still runs as registered.
    run = await engine.start_run("g")
    final = await engine.wait(run.run_id)
    assert final.state == {"approved": True}
    stored = await engine.get_graph_document("g")
    assert len(stored.document["nodes"]) == 2


async def test_an_invalid_graph_is_not_stored(engine: Engine) -> None:
    with pytest.raises(GraphValidationError) as info:
        await engine.register_graph(_doc("bad", "tools.nope"))
    assert [p.code for p in info.value.problems] == ["unknown_callable"]
    assert (await engine.list_graphs()).items == []
    with pytest.raises(UnknownGraphError):
        await engine.start_run("bad")


async def test_unknown_graph(engine: Engine) -> None:
    with pytest.raises(UnknownGraphError) as info:
        await engine.start_run("missing", {})
    assert info.value.graph_id == "missing"
    with pytest.raises(UnknownGraphError):
        await engine.get_graph("missing")
    assert (await engine.list_runs()).items == []


async def test_list_graphs_paginates_in_id_order(engine: Engine) -> None:
    ids = [f"graph-{i:02d}" for i in range(23)]
    for graph_id in reversed(ids):
        await engine.register_graph(_doc(graph_id, "tools.noop"))
    seen: list[str] = []
    cursor = None
    while True:
        page = await engine.list_graphs(cursor=cursor, limit=5)
        assert len(page.items) <= 5
        seen.extend(g.graph_id for g in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == ids
    exact = await engine.list_graphs(limit=23)
    assert len(exact.items) == 23
    assert exact.next_cursor is None


# -- limits ----------------------------------------------------------------------------


async def test_capacity_error_when_max_active_runs_is_reached(
    autojump_clock: trio.testing.MockClock, registry: Registry
) -> None:
    async with open_engine(registry=registry, limits=EngineLimits(max_active_runs=2)) as engine:
        await engine.register_graph(_doc("slow", "tools.sleep"))
        first = await engine.start_run("slow", {"sleep_s": 10})
        await engine.start_run("slow", {"sleep_s": 100})
        with pytest.raises(CapacityError):
            await engine.start_run("slow", {"sleep_s": 1})
        assert len((await engine.list_runs()).items) == 2  # the refused run does not exist
        # A slot frees when a run ends.
        await engine.wait(first.run_id)
        third = await engine.start_run("slow", {"sleep_s": 1})
        assert (await engine.wait(third.run_id)).status is RunStatus.COMPLETED


async def test_pending_runs_wait_for_a_running_slot(
    autojump_clock: trio.testing.MockClock, registry: Registry
) -> None:
    async with open_engine(registry=registry, limits=EngineLimits(max_running=2)) as engine:
        await engine.register_graph(_doc("slow", "tools.sleep"))
        start = trio.current_time()
        runs = [await engine.start_run("slow", {"sleep_s": 10}) for _ in range(5)]
        await trio.sleep(1)
        statuses = [(await engine.get_run(r.run_id)).status for r in runs]
        assert statuses.count(RunStatus.RUNNING) == 2
        assert statuses.count(RunStatus.PENDING) == 3
        for run in runs:
            assert (await engine.wait(run.run_id)).status is RunStatus.COMPLETED
        assert trio.current_time() - start == pytest.approx(30)  # three waves of 10 s


async def test_pending_runs_start_in_creation_order(
    registry: Registry, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_engine(registry=registry, limits=EngineLimits(max_running=1)) as engine:
        await engine.register_graph(_doc("slow", "tools.sleep"))
        runs = [await engine.start_run("slow", {"sleep_s": 1}) for _ in range(8)]
        # Cancelling a queued run must not disturb the order of the others.
        await engine.cancel(runs[3].run_id)
        finals = [await engine.wait(r.run_id) for r in runs]
        started = [f for f in finals if f.status is RunStatus.COMPLETED]
        assert [f.run_id for f in started] == [r.run_id for i, r in enumerate(runs) if i != 3]
        starts = [f.started_at for f in started]
        assert starts == sorted(starts)
        assert finals[3].status is RunStatus.CANCELLED and finals[3].started_at is None


async def test_a_non_json_initial_state_is_a_state_error(engine: Engine) -> None:
    await engine.register_graph(_doc("g", "tools.noop"))
    with pytest.raises(StateValidationError):
        await engine.start_run("g", {"when": object()})
    assert (await engine.list_runs()).items == []


async def test_initial_state_over_max_state_bytes_is_refused(registry: Registry) -> None:
    limit = 100
    async with open_engine(registry=registry, limits=EngineLimits(max_state_bytes=limit)) as engine:
        await engine.register_graph(_doc("g", "tools.noop"))
        fits = {"s": "x" * (limit - len('{"s":""}'))}  # exactly the limit as compact JSON
        run = await engine.start_run("g", fits)
        assert (await engine.wait(run.run_id)).status is RunStatus.COMPLETED
        with pytest.raises(LimitExceededError) as info:
            await engine.start_run("g", {"s": "x" * limit})
        assert info.value.details["maximum"] == limit
        assert info.value.details["value"] > limit
        assert len((await engine.list_runs()).items) == 1


async def test_a_graph_whose_tool_disappeared_fails_only_its_resumed_runs() -> None:
    # The memory store outlives engines; the second engine lacks the tool.
    store = MemoryStore()
    first_registry = Registry()
    gate = trio.Event()

    async def gated(state: Any) -> None:
        await gate.wait()

    first_registry.add_tool("tests.gated", gated)
    first_registry.add_tool("tests.noop", lambda state: None, inline=True)
    async with open_engine(store=store, registry=first_registry) as engine:
        await engine.register_graph(_doc("orphan", "tests.gated"))
        await engine.register_graph(_doc("fine", "tests.noop"))
        orphan = await engine.start_run("orphan")
        await _wait_for_node(engine, orphan.run_id, "n0")
    second_registry = Registry()
    second_registry.add_tool("tests.noop", lambda state: None, inline=True)
    async with open_engine(store=store, registry=second_registry) as engine:
        final = await engine.get_run(orphan.run_id)
        assert final.status is RunStatus.FAILED
        assert final.error is not None
        assert final.error["code"] == "graph_unavailable"
        entries = await engine.read_log(orphan.run_id)
        _assert_gapless(entries)
        assert entries[-1].event == "run_failed"
        run = await engine.start_run("fine")
        assert (await engine.wait(run.run_id)).status is RunStatus.COMPLETED


# -- shutdown and resume -------------------------------------------------------------------


async def test_leaving_the_engine_leaves_in_flight_runs_resumable(
    autojump_clock: trio.testing.MockClock, registry: Registry
) -> None:
    store = MemoryStore()
    document = _doc("flight", "tools.approve", "tools.sleep", "tools.noop")
    async with open_engine(store=store, registry=registry) as engine:
        await engine.register_graph(document)
        run = await engine.start_run("flight", {"sleep_s": 60})
        await _wait_for_node(engine, run.run_id, "n1")
        await trio.sleep(30)
    left = await store.get_run(run.run_id)
    assert left is not None
    assert left.status is RunStatus.RUNNING
    assert (left.current_node, left.step) == ("n1", 2)
    assert left.state == {"sleep_s": 60, "approved": True}
    assert left.finished_at is None
    log_before = await store.read_log(run.run_id)
    assert not any(e.is_terminal for e in log_before)

    async with open_engine(store=store, registry=registry, resume=True) as engine:
        assert engine.active_runs == 1
        start = trio.current_time()
        with trio.fail_after(600):
            final = await engine.wait(run.run_id)
        assert trio.current_time() - start == pytest.approx(60)  # n1 runs again in full
        assert final.status is RunStatus.COMPLETED
        assert final.state == {"sleep_s": 60, "approved": True}
        assert final.attempt == 2
        entries = await engine.read_log(run.run_id)
        _assert_gapless(entries)
        assert entries[: len(log_before)] == log_before
        events = [e.event for e in entries]
        assert events.count("run_started") == 1
        assert events.count("run_resumed") == 1
        resumed = entries[events.index("run_resumed")]
        assert resumed.node == "n1"
        assert resumed.seq == len(log_before) + 1
        # n0 is not run again: the run continues from its last checkpoint.
        started = [e.node for e in entries if e.event == "node_started"]
        assert started == ["n0", "n1", "n1", "n2"]
        assert events[-1] == "run_completed"


async def test_resume_false_leaves_unfinished_runs_alone(
    autojump_clock: trio.testing.MockClock, registry: Registry
) -> None:
    store = MemoryStore()
    async with open_engine(store=store, registry=registry) as engine:
        await engine.register_graph(_doc("slow", "tools.sleep"))
        run = await engine.start_run("slow", {"sleep_s": 60})
        await _wait_for_node(engine, run.run_id, "n0")
    async with open_engine(store=store, registry=registry, resume=False) as engine:
        assert engine.active_runs == 0
        await trio.sleep(120)
        assert (await engine.get_run(run.run_id)).status is RunStatus.RUNNING
    async with open_engine(store=store, registry=registry) as engine:
        assert (await engine.wait(run.run_id)).status is RunStatus.COMPLETED


async def test_a_pending_run_left_behind_starts_normally_on_resume(
    autojump_clock: trio.testing.MockClock, registry: Registry
) -> None:
    store = MemoryStore()
    async with open_engine(
        store=store, registry=registry, limits=EngineLimits(max_running=1)
    ) as engine:
        await engine.register_graph(_doc("slow", "tools.sleep"))
        holder = await engine.start_run("slow", {"sleep_s": 60})
        await _wait_for_node(engine, holder.run_id, "n0")
        queued = await engine.start_run("slow", {"sleep_s": 1})
        await trio.testing.wait_all_tasks_blocked()
    left = await store.get_run(queued.run_id)
    assert left is not None and left.status is RunStatus.PENDING
    assert (await store.read_log(queued.run_id)) == []
    async with open_engine(store=store, registry=registry) as engine:
        for run in (holder, queued):
            assert (await engine.wait(run.run_id)).status is RunStatus.COMPLETED
        entries = await engine.read_log(queued.run_id)
        _assert_gapless(entries)
        assert entries[0].event == "run_started"
        assert "run_resumed" not in [e.event for e in entries]


async def test_wait_and_follow_work_for_runs_finished_by_an_earlier_engine(
    registry: Registry,
) -> None:
    store = MemoryStore()
    async with open_engine(store=store, registry=registry) as engine:
        await engine.register_graph(_doc("g", "tools.noop", "tools.approve"))
        run = await engine.start_run("g")
        first = await engine.wait(run.run_id)
    async with open_engine(store=store, registry=registry) as engine:
        again = await engine.wait(run.run_id)
        assert again.status is RunStatus.COMPLETED
        assert again.last_seq == first.last_seq
        entries = [e async for e in engine.follow(run.run_id)]
        _assert_gapless(entries)
        assert len(entries) == first.last_seq


async def test_cancel_many_cancels_every_active_run_and_skips_the_rest(
    registry: Registry, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_engine(registry=registry, limits=EngineLimits(max_running=3)) as engine:
        await engine.register_graph(_doc("slow", "tools.sleep"))
        await engine.register_graph(_doc("quick", "tools.noop"))
        done = await engine.start_run("quick")
        await engine.wait(done.run_id)
        parked = [await engine.start_run("slow", {"sleep_s": 3600}) for _ in range(5)]
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        finals = await engine.cancel_many([done.run_id, "nope", *(r.run_id for r in parked)])
        assert trio.current_time() == start  # no virtual time passes
        assert [f.run_id for f in finals] == [r.run_id for r in parked]
        assert all(f.status is RunStatus.CANCELLED for f in finals)
        for run in parked:  # running and pending ones alike, recorded in the store
            stored = await engine.get_run(run.run_id)
            assert stored.status is RunStatus.CANCELLED
        assert (await engine.get_run(done.run_id)).status is RunStatus.COMPLETED
        assert engine.active_runs == 0
