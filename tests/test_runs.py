"""Rule 6 (run statuses) and the run listing, lookup and retention API."""

from __future__ import annotations

import time as real_time
from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing

import trioflow.actor
import trioflow.engine
from trioflow import (
    TERMINAL,
    Engine,
    LogEntry,
    MemoryStore,
    Registry,
    RunRecord,
    RunStatus,
    UnknownRunError,
    open_engine,
)
from trioflow.errors import InvalidTransitionError
from trioflow.runs import check_transition

P, R, W, C, F, X = (
    RunStatus.PENDING,
    RunStatus.RUNNING,
    RunStatus.WAITING,
    RunStatus.COMPLETED,
    RunStatus.FAILED,
    RunStatus.CANCELLED,
)

LEGAL = {
    (P, R),
    (P, X),
    (P, F),
    (R, W),
    (R, C),
    (R, F),
    (R, X),
    (W, R),
    (W, F),
    (W, X),
}


def test_terminal_statuses() -> None:
    assert {C, F, X} == TERMINAL
    assert all(s.is_terminal for s in TERMINAL)
    assert not any(s.is_terminal for s in (P, R, W))


@pytest.mark.parametrize("current", list(RunStatus))
@pytest.mark.parametrize("new", list(RunStatus))
def test_transition_guard(current: RunStatus, new: RunStatus) -> None:
    if (current, new) in LEGAL:
        check_transition(current, new)
    else:
        with pytest.raises(InvalidTransitionError) as info:
            check_transition(current, new)
        assert str(current) in info.value.message
        assert str(new) in info.value.message


def _record(status: RunStatus) -> RunRecord:
    return RunRecord(run_id="r", graph_id="g", status=status, state={}, current_node="a")


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_a_terminal_record_never_changes_status(terminal: RunStatus) -> None:
    record = _record(terminal)
    for other in RunStatus:
        if other is not terminal:
            with pytest.raises(InvalidTransitionError):
                record.evolve(status=other)
    assert record.status is terminal


def test_evolve_goes_through_the_guard_and_leaves_the_original_alone() -> None:
    pending = _record(P)
    running = pending.evolve(status=R, step=1)
    assert (pending.status, pending.step) == (P, 0)
    assert (running.status, running.step) == (R, 1)
    with pytest.raises(InvalidTransitionError):
        running.evolve(status=P)  # no way back
    assert running.evolve(status=R, step=2).step == 2  # same status: not a transition


# -- statuses as a real run goes through them --------------------------------------


class SpyStore(MemoryStore):
    """Records the status of every write, per run."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: dict[str, list[RunStatus]] = {}

    async def create_run(self, run: RunRecord, entries: Sequence[LogEntry] = ()) -> None:
        self.statuses[run.run_id] = [run.status]
        await super().create_run(run, entries)

    async def save_run(self, run: RunRecord, entries: Sequence[LogEntry]) -> None:
        seen = self.statuses[run.run_id]
        if seen[-1] != run.status:
            seen.append(run.status)
        await super().save_run(run, entries)


def _doc(graph_id: str, *callables: str) -> dict[str, Any]:
    nodes = [{"id": f"n{i}", "callable": c} for i, c in enumerate(callables)]
    edges = [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(len(callables) - 1)]
    return {"id": graph_id, "start_node": "n0", "nodes": nodes, "edges": edges}


async def test_statuses_go_pending_running_then_terminal(
    autojump_clock: trio.testing.MockClock, registry: Registry
) -> None:
    store = SpyStore()
    async with open_engine(store=store, registry=registry) as engine:
        await engine.register_graph(_doc("ok", "tools.noop", "tools.sleep", "tools.noop"))
        await engine.register_graph(_doc("bad", "tools.noop", "tools.fail"))
        await engine.register_graph(_doc("slow", "tools.sleep"))

        ok = await engine.start_run("ok", {"sleep_s": 5})
        assert ok.status is P
        assert ok.started_at is None and ok.finished_at is None
        await trio.sleep(1)
        during = await engine.get_run(ok.run_id)
        assert during.status is R
        assert during.started_at is not None and during.finished_at is None
        final = await engine.wait(ok.run_id)
        assert final.status is C
        assert final.finished_at is not None and final.finished_at >= final.started_at
        assert store.statuses[ok.run_id] == [P, R, C]

        bad = await engine.start_run("bad")
        assert (await engine.wait(bad.run_id)).status is F
        assert store.statuses[bad.run_id] == [P, R, F]

        slow = await engine.start_run("slow", {"sleep_s": 100})
        await trio.sleep(1)
        assert (await engine.cancel(slow.run_id)).status is X
        assert store.statuses[slow.run_id] == [P, R, X]
        assert engine.active_runs == 0


# -- lookup and listing ----------------------------------------------------------------


async def test_unknown_runs(engine: Engine) -> None:
    with pytest.raises(UnknownRunError) as info:
        await engine.get_run("nope")
    assert info.value.run_id == "nope"
    with pytest.raises(UnknownRunError):
        await engine.wait("nope")


async def _all_pages(engine: Engine, limit: int, **filters: Any) -> list[RunRecord]:
    out: list[RunRecord] = []
    cursor = None
    for _ in range(100):
        page = await engine.list_runs(cursor=cursor, limit=limit, **filters)
        assert len(page.items) <= limit
        out.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return out
        assert len(page.items) == limit  # only full pages promise more
    raise AssertionError("pagination did not end")


async def test_list_runs_filters_and_paginates_without_gaps_or_duplicates(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    await engine.register_graph(_doc("g-ok", "tools.noop"))
    await engine.register_graph(_doc("g-mixed", "tools.fail"))
    await engine.register_graph(_doc("g-slow", "tools.sleep"))
    ids: dict[str, set[str]] = {"g-ok": set(), "g-mixed": set(), "g-slow": set()}
    for i in range(30):
        graph_id = ("g-ok", "g-mixed", "g-slow")[i % 3]
        run = await engine.start_run(graph_id, {"sleep_s": 1000})
        ids[graph_id].add(run.run_id)
    await trio.sleep(1)
    all_ids = set().union(*ids.values())

    everything = await _all_pages(engine, limit=7)
    one_page = await engine.list_runs(limit=100)
    assert [r.run_id for r in everything] == [r.run_id for r in one_page.items]
    assert len(everything) == 30
    assert {r.run_id for r in everything} == all_ids
    keys = [(r.created_at, r.run_id) for r in everything]
    assert keys == sorted(keys, reverse=True)  # newest first

    for graph_id, expected in ids.items():
        for limit in (1, 3, 10, 50):
            got = await _all_pages(engine, limit=limit, graph_id=graph_id)
            assert [r.run_id for r in got] == [
                r.run_id for r in everything if r.graph_id == graph_id
            ]
            assert {r.run_id for r in got} == expected

    assert {r.run_id for r in await _all_pages(engine, 4, status=C)} == ids["g-ok"]
    assert {r.run_id for r in await _all_pages(engine, 4, status=F)} == ids["g-mixed"]
    assert {r.run_id for r in await _all_pages(engine, 4, status=R)} == ids["g-slow"]
    assert await _all_pages(engine, 4, status=X) == []
    both = await _all_pages(engine, 2, graph_id="g-ok", status=F)
    assert both == []
    assert {r.run_id for r in await _all_pages(engine, 2, graph_id="g-slow", status=R)} == (
        ids["g-slow"]
    )

    # A cursor stays valid while new runs are created: they are newer than
    # it, so paging on neither repeats nor skips a run.
    first = await engine.list_runs(limit=5)
    await engine.start_run("g-ok")
    rest: list[RunRecord] = []
    cursor = first.next_cursor
    while cursor is not None:
        page = await engine.list_runs(limit=5, cursor=cursor)
        rest.extend(page.items)
        cursor = page.next_cursor
    assert [r.run_id for r in first.items + rest] == [r.run_id for r in everything]
    for run_id in ids["g-slow"]:
        await engine.cancel(run_id)


# -- retention ---------------------------------------------------------------------------


class WallClock:
    """Stands in for the ``time`` module where run timestamps are taken."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return real_time.perf_counter()


async def test_delete_runs_removes_only_terminal_runs_older_than_the_age(
    monkeypatch: pytest.MonkeyPatch, registry: Registry
) -> None:
    clock = WallClock(1_000.0)
    monkeypatch.setattr(trioflow.engine, "time", clock)
    monkeypatch.setattr(trioflow.actor, "time", clock)
    gate = trio.Event()

    async def gated(state: Any) -> None:
        await gate.wait()

    registry.add_tool("tests.gated", gated)
    async with open_engine(registry=registry) as engine:
        await engine.register_graph(_doc("quick", "tools.noop"))
        await engine.register_graph(_doc("fails", "tools.fail"))
        await engine.register_graph(_doc("gated", "tests.gated"))
        old = await engine.wait((await engine.start_run("quick")).run_id)
        old_failed = await engine.wait((await engine.start_run("fails")).run_id)
        assert old.finished_at == old_failed.finished_at == 1_000.0
        clock.now = 2_000.0
        recent = await engine.wait((await engine.start_run("quick")).run_id)
        live = await engine.start_run("gated")
        await trio.testing.wait_all_tasks_blocked()
        clock.now = 2_500.0

        assert await engine.delete_runs(older_than_s=2_000) == 0  # cutoff 500
        assert await engine.delete_runs(older_than_s=1_000) == 2  # cutoff 1500
        for gone in (old, old_failed):
            with pytest.raises(UnknownRunError):
                await engine.get_run(gone.run_id)
            assert await engine.read_log(gone.run_id) == []
        # Finished exactly at the cutoff is not older than it.
        assert await engine.delete_runs(older_than_s=500) == 0
        assert (await engine.get_run(recent.run_id)).status is C
        assert len(await engine.read_log(recent.run_id)) == recent.last_seq
        # A run that has not finished is never deleted, however old.
        assert await engine.delete_runs(older_than_s=-1e9) == 1
        assert (await engine.get_run(live.run_id)).status is R
        assert [r.run_id for r in (await engine.list_runs()).items] == [live.run_id]
        gate.set()
        assert (await engine.wait(live.run_id)).status is C
