"""The store contract: the same tests against every backend (see conftest.BACKENDS)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import trio
import trio.testing

from trioflow.errors import (
    LeaseLostError,
    RunStateError,
    StoreConflictError,
    StoreError,
    UnknownRunError,
)
from trioflow.logs import Event, Level, LogEntry
from trioflow.runs import RunRecord, RunStatus
from trioflow.stores.base import Cursor, InvalidCursorError, Store, StoredGraph


def _graph(graph_id: str, digest: str = "d1") -> StoredGraph:
    return StoredGraph(graph_id, {"id": graph_id, "nodes": [{"id": "a"}], "n": 1.5}, digest, 10.0)


def _run(
    run_id: str,
    *,
    created_at: float = 100.0,
    graph_id: str = "g",
    status: RunStatus = RunStatus.PENDING,
    **fields: Any,
) -> RunRecord:
    # Epoch 1: created by the engine that executes it (as Engine.start_run does).
    fields.setdefault("epoch", 1)
    return RunRecord(
        run_id=run_id,
        graph_id=graph_id,
        status=status,
        state={"x": 1},
        current_node="a",
        created_at=created_at,
        updated_at=created_at,
        **fields,
    )


def _entries(first: int, last: int, node: str | None = "a") -> list[LogEntry]:
    return [
        LogEntry(seq, 1000.0 + seq, Level.INFO, Event.CUSTOM, node, f"line {seq}", {"seq": seq})
        for seq in range(first, last + 1)
    ]


async def _all_pages(store: Store, **filters: Any) -> tuple[list[RunRecord], int]:
    items: list[RunRecord] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await store.list_runs(cursor=cursor, **filters)
        items.extend(page.items)
        pages += 1
        if page.next_cursor is None:
            return items, pages
        cursor = page.next_cursor


# -- graphs ----------------------------------------------------------------------


async def test_put_graph_then_get_returns_the_document(store: Store) -> None:
    graph = _graph("g1")
    assert await store.put_graph(graph) == "created"
    assert await store.get_graph("g1") == graph
    assert await store.get_graph("missing") is None


async def test_put_graph_again_is_exists_or_conflict_and_keeps_the_first(store: Store) -> None:
    first = _graph("g1", digest="d1")
    await store.put_graph(first)
    assert await store.put_graph(_graph("g1", digest="d1")) == "exists"
    assert await store.put_graph(_graph("g1", digest="other")) == "conflict"
    assert await store.get_graph("g1") == first


async def test_list_graphs_pages_in_id_order(store: Store) -> None:
    ids = [f"g{i:03d}" for i in range(23)]
    for graph_id in reversed(ids):
        await store.put_graph(_graph(graph_id))
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await store.list_graphs(cursor=cursor, limit=5)
        assert len(page.items) <= 5
        seen.extend(g.graph_id for g in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == ids


async def test_list_graphs_exact_fit_has_no_next_cursor(store: Store) -> None:
    for i in range(4):
        await store.put_graph(_graph(f"g{i}"))
    page = await store.list_graphs(limit=4)
    assert len(page.items) == 4
    assert page.next_cursor is None
    assert (await store.list_graphs()).items == page.items


async def test_list_graphs_rejects_a_garbage_cursor(store: Store) -> None:
    with pytest.raises(InvalidCursorError):
        await store.list_graphs(cursor="not-a-cursor!")


# -- runs and checkpoints ------------------------------------------------------------


async def test_create_run_roundtrips_every_field(store: Store) -> None:
    run = RunRecord(
        run_id="r1",
        graph_id="g",
        status=RunStatus.WAITING,
        state={"nested": {"list": [1, 2.5, None, True]}, "text": "héllo ✓"},
        current_node="review",
        step=7,
        loop_counters={"fix->review": 2},
        error={"code": "x", "message": "m"},
        created_at=1700000000.123456,
        started_at=1700000001.5,
        finished_at=None,
        updated_at=1700000002.25,
        last_seq=3,
        attempt=2,
    )
    await store.create_run(run, _entries(1, 3))
    assert await store.get_run("r1") == run
    assert await store.read_log("r1") == _entries(1, 3)
    assert await store.get_run("missing") is None


async def test_create_run_twice_is_an_error(store: Store) -> None:
    await store.create_run(_run("r1"))
    with pytest.raises(StoreError):
        await store.create_run(_run("r1"))


async def test_save_run_replaces_the_record_and_appends_entries(store: Store) -> None:
    run = _run("r1", last_seq=2)
    await store.create_run(run, _entries(1, 2))
    saved = run.evolve(
        status=RunStatus.FAILED,
        state={"x": 2, "y": [1]},
        current_node="b",
        step=4,
        loop_counters={"a->b": 3},
        error={"code": "node_failed", "node": "b"},
        started_at=101.0,
        finished_at=102.5,
        updated_at=102.5,
        last_seq=5,
        attempt=3,
    )
    await store.save_run(saved, _entries(3, 5))
    assert await store.get_run("r1") == saved
    assert await store.read_log("r1") == _entries(1, 5)


async def test_save_run_with_no_entries_updates_only_the_record(store: Store) -> None:
    run = _run("r1", last_seq=1)
    await store.create_run(run, _entries(1, 1))
    saved = run.evolve(status=RunStatus.RUNNING, step=1)
    await store.save_run(saved, [])
    assert await store.get_run("r1") == saved
    assert [e.seq for e in await store.read_log("r1")] == [1]


async def test_a_fan_outs_progress_is_kept_with_the_record(store: Store) -> None:
    await store.create_run(_run("r1", status=RunStatus.RUNNING))
    fanout = {
        "node": "fan",
        "kind": "map",
        "size": 2,
        "branches": {"0": {"status": "running", "node": "w", "step": 1, "state": {"é": "\u2028"}}},
    }
    await store.save_run(
        _run("r1", status=RunStatus.RUNNING, last_seq=1, fanout=fanout), _entries(1, 1)
    )
    assert (await store.get_run("r1")).fanout == fanout  # type: ignore[union-attr]
    await store.save_run(_run("r1", status=RunStatus.RUNNING, last_seq=1), [])
    assert (await store.get_run("r1")).fanout is None  # type: ignore[union-attr]


async def test_a_checkpoint_must_continue_the_stored_log(store: Store) -> None:
    # Two writers built checkpoints on the same stored record: the second
    # one finds the log moved on and writes nothing (no gap, no rewrite).
    run = _run("r1", last_seq=2)
    await store.create_run(run, _entries(1, 2))
    first = run.evolve(step=1, last_seq=4, state={"by": "first"})
    await store.save_run(first, _entries(3, 4))
    stale = run.evolve(step=1, last_seq=3, state={"by": "second"})
    with pytest.raises(StoreConflictError) as info:
        await store.save_run(stale, _entries(3, 3, node="other"))
    assert info.value.transient is False
    assert await store.get_run("r1") == first
    assert await store.read_log("r1") == _entries(1, 4)
    # A checkpoint that skips seqs is refused too.
    with pytest.raises(StoreConflictError):
        await store.save_run(first.evolve(last_seq=9), _entries(7, 9))
    # One that continues is written.
    second = first.evolve(last_seq=5)
    await store.save_run(second, _entries(5, 5))
    assert [e.seq for e in await store.read_log("r1")] == [1, 2, 3, 4, 5]


async def test_a_record_only_checkpoint_must_match_the_stored_seq(store: Store) -> None:
    run = _run("r1", last_seq=2)
    await store.create_run(run, _entries(1, 2))
    with pytest.raises(StoreConflictError):
        await store.save_run(run.evolve(last_seq=3, step=9), [])
    assert await store.get_run("r1") == run


async def test_a_checkpoint_of_a_stale_epoch_is_fenced_off(store: Store) -> None:
    # A writer whose run was claimed since (the epoch went up) writes nothing,
    # even when its entries would continue the log, and learns it lost the run.
    waiting = _run("r1", last_seq=2, status=RunStatus.WAITING)
    await store.create_run(waiting, _entries(1, 2))
    claimed = waiting.evolve(status=RunStatus.RUNNING, epoch=2, last_seq=3)
    await store.save_run(claimed, _entries(3, 3), claim=True)
    assert (await store.get_run("r1")) == claimed
    zombie = waiting.evolve(status=RunStatus.RUNNING, last_seq=3, state={"by": "zombie"})
    with pytest.raises(LeaseLostError):
        await store.save_run(zombie, _entries(3, 3, node="zombie"))
    with pytest.raises(LeaseLostError):
        await store.save_run(waiting.evolve(last_seq=4), _entries(4, 4, node="zombie"))
    assert await store.get_run("r1") == claimed
    assert await store.read_log("r1") == _entries(1, 3)
    # The new holder goes on.
    await store.save_run(claimed.evolve(last_seq=4), _entries(4, 4))
    assert (await store.get_run("r1")).last_seq == 4  # type: ignore[union-attr]


async def test_of_two_claims_on_one_epoch_only_the_first_is_written(store: Store) -> None:
    waiting = _run("r1", last_seq=1, status=RunStatus.WAITING)
    await store.create_run(waiting, _entries(1, 1))
    mine = waiting.evolve(status=RunStatus.RUNNING, epoch=2, last_seq=2, state={"by": "a"})
    theirs = waiting.evolve(status=RunStatus.CANCELLED, epoch=2, last_seq=2, state={"by": "b"})
    await store.save_run(mine, _entries(2, 2), claim=True)
    with pytest.raises(StoreConflictError) as info:
        await store.save_run(theirs, _entries(2, 2, node="b"), claim=True)
    assert not isinstance(info.value, LeaseLostError)  # a claim lost a race; it held nothing
    assert await store.get_run("r1") == mine
    assert (await store.get_run("r1")).epoch == 2  # type: ignore[union-attr]


async def test_sessions_report_whether_the_last_one_ended_cleanly(store: Store) -> None:
    assert await store.begin_session() is True  # a new store: nothing crashed
    await store.end_session()
    assert await store.begin_session() is True
    await store.probe()


async def test_save_run_of_an_unknown_run_is_an_error(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.save_run(_run("ghost"), _entries(1, 1))
    assert await store.get_run("ghost") is None


# -- logs ----------------------------------------------------------------------------


async def test_read_log_by_cursor(store: Store) -> None:
    await store.create_run(_run("r1", last_seq=4), _entries(1, 4))
    await store.save_run(_run("r1", last_seq=10), _entries(5, 10))
    assert [e.seq for e in await store.read_log("r1")] == list(range(1, 11))
    assert [e.seq for e in await store.read_log("r1", after=3)] == list(range(4, 11))
    assert [e.seq for e in await store.read_log("r1", after=3, limit=2)] == [4, 5]
    assert await store.read_log("r1", after=10) == []
    assert await store.read_log("missing") == []


async def test_read_log_keeps_every_entry_field(store: Store) -> None:
    entries = [
        LogEntry(
            1,
            5.5,
            Level.WARNING,
            Event.LOOP_EXHAUSTED,
            "fix",
            "loop done",
            {"edge": "fix->review", "max_iterations": 3},
        ),
        LogEntry(2, 6.25, Level.ERROR, "my_event", None, "", {}),
    ]
    await store.create_run(_run("r1"), entries)
    got = await store.read_log("r1")
    assert got == entries
    assert [e.level for e in got] == [Level.WARNING, Level.ERROR]


async def test_logs_of_runs_do_not_mix(store: Store) -> None:
    await store.create_run(_run("r1"), _entries(1, 3, node="one"))
    await store.create_run(_run("r2"), _entries(1, 2, node="two"))
    assert {e.node for e in await store.read_log("r1")} == {"one"}
    assert [e.seq for e in await store.read_log("r2")] == [1, 2]


# -- listing -------------------------------------------------------------------------


async def test_list_runs_is_newest_first_with_id_as_tiebreak(store: Store) -> None:
    await store.create_run(_run("b", created_at=1.0))
    await store.create_run(_run("a", created_at=2.0))
    await store.create_run(_run("c", created_at=2.0))
    page = await store.list_runs()
    assert [r.run_id for r in page.items] == ["c", "a", "b"]
    assert page.next_cursor is None


async def test_list_runs_pages_without_duplicates_or_gaps(store: Store) -> None:
    # Many runs sharing timestamps, so pages split inside groups of ties.
    expected: list[tuple[float, str]] = []
    for i in range(137):
        created = float(i // 4)
        run_id = f"run-{(i * 37) % 137:03d}"
        await store.create_run(_run(run_id, created_at=created))
        expected.append((created, run_id))
    expected.sort(reverse=True)
    items, pages = await _all_pages(store, limit=10)
    assert [(r.created_at, r.run_id) for r in items] == expected
    assert pages == 14


async def test_list_runs_filters_by_graph_and_status(store: Store) -> None:
    statuses = [RunStatus.PENDING, RunStatus.RUNNING, RunStatus.COMPLETED]
    for i in range(30):
        await store.create_run(
            _run(f"r{i:02d}", created_at=float(i), graph_id=f"g{i % 2}", status=statuses[i % 3])
        )
    items, _ = await _all_pages(store, graph_id="g1", limit=4)
    assert [r.run_id for r in items] == [f"r{i:02d}" for i in range(29, -1, -1) if i % 2 == 1]
    items, _ = await _all_pages(store, status=RunStatus.COMPLETED, limit=3)
    assert [r.run_id for r in items] == [f"r{i:02d}" for i in range(29, -1, -1) if i % 3 == 2]
    items, _ = await _all_pages(store, graph_id="g0", status=RunStatus.PENDING, limit=2)
    assert [r.run_id for r in items] == [f"r{i:02d}" for i in range(29, -1, -1) if i % 6 == 0]
    assert (await store.list_runs(graph_id="nope")).items == []


async def test_count_runs_by_status_filtered_by_graph_and_patterns(store: Store) -> None:
    statuses = [RunStatus.PENDING, RunStatus.RUNNING, RunStatus.COMPLETED]
    for i in range(30):
        await store.create_run(
            _run(f"r{i:02d}", created_at=float(i), graph_id=f"g{i % 2}", status=statuses[i % 3])
        )
    assert await store.count_runs() == {s: 10 for s in statuses}
    assert await store.count_runs(graph_id="g1") == {s: 5 for s in statuses}
    assert await store.count_runs(graphs=["g?"]) == {s: 10 for s in statuses}
    assert await store.count_runs(graphs=["g1", "x*"]) == {s: 5 for s in statuses}
    assert await store.count_runs(graphs=[]) == {}
    assert await store.count_runs(graph_id="nope") == {}
    assert await store.count_runs(graph_id="nul\x00") == {}
    assert await store.count_runs(statuses=[RunStatus.PENDING, RunStatus.WAITING]) == {
        RunStatus.PENDING: 10
    }
    assert await store.count_runs(graph_id="g0", statuses=[RunStatus.RUNNING]) == {
        RunStatus.RUNNING: 5
    }
    assert await store.count_runs(statuses=[]) == {}


async def test_list_runs_cursor_from_a_deleted_run_still_continues(store: Store) -> None:
    for i in range(6):
        await store.create_run(_run(f"r{i}", created_at=float(i)))
    page = await store.list_runs(limit=2)
    assert [r.run_id for r in page.items] == ["r5", "r4"]
    assert page.next_cursor == Cursor.encode(4.0, "r4")
    rest = await store.list_runs(cursor=page.next_cursor, limit=10)
    assert [r.run_id for r in rest.items] == ["r3", "r2", "r1", "r0"]


_HUGE_KEY = base64.urlsafe_b64encode(json.dumps([10**400, "x"]).encode()).decode()


@pytest.mark.parametrize(
    "cursor", ["garbage!", "", Cursor.encode(1.0, "x")[:-3] + "@@@", _HUGE_KEY]
)
async def test_list_runs_rejects_an_invalid_cursor(store: Store, cursor: str) -> None:
    await store.create_run(_run("r1"))
    with pytest.raises(InvalidCursorError):
        await store.list_runs(cursor=cursor)


# -- resume and retention -------------------------------------------------------------


async def test_unfinished_runs_are_the_pending_and_running_ones(store: Store) -> None:
    # A waiting run stays parked (it holds no task); it is not resumed at start.
    for i, status in enumerate(RunStatus):
        await store.create_run(_run(f"r-{status.value}", created_at=float(i), status=status))
    unfinished = await store.unfinished_runs()
    assert sorted(r.run_id for r in unfinished) == ["r-pending", "r-running"]


def _waiting(run_id: str, deadline: float | None, *, answered: bool = False) -> RunRecord:
    return _run(
        run_id,
        status=RunStatus.WAITING,
        waiting={
            "node": "a",
            "prompt": "ok?",
            "input_schema": None,
            "request_id": f"q-{run_id}",
            "deadline": deadline,
            "answered": answered,
        },
    )


async def test_deadlines_of_waiting_runs(store: Store) -> None:
    assert await store.next_deadline() is None
    await store.create_run(_waiting("later", 300.0))
    await store.create_run(_waiting("sooner", 200.0))
    await store.create_run(_waiting("never", None))
    await store.create_run(_waiting("answered", 100.0, answered=True))
    await store.create_run(_run("running", status=RunStatus.RUNNING))
    assert await store.next_deadline() == 200.0
    assert await store.due_waits(199.0) == []
    assert [r.run_id for r in await store.due_waits(250.0)] == ["sooner"]
    assert [r.run_id for r in await store.due_waits(1e9)] == ["sooner", "later"]
    assert [r.run_id for r in await store.due_waits(1e9, limit=1)] == ["sooner"]
    # A wait that ends (resumed, cancelled) leaves the timer's view.
    sooner = await store.get_run("sooner")
    assert sooner is not None and sooner.waiting is not None
    assert sooner.waiting["request_id"] == "q-sooner"
    await store.save_run(sooner.evolve(status=RunStatus.CANCELLED, waiting=None), [])
    assert await store.next_deadline() == 300.0


async def test_signals_get_ids_in_arrival_order_per_run(store: Store) -> None:
    await store.create_run(_run("r1", status=RunStatus.RUNNING))
    await store.create_run(_run("r2", status=RunStatus.WAITING))
    first = await store.add_signal("r1", "poke", {"n": 1}, 5.0)
    second = await store.add_signal("r1", "poke", {"n": 2, "nested": {"x": [1, "é"]}}, 6.0)
    other = await store.add_signal("r2", "other", {}, 7.0)
    assert (first.signal_id, second.signal_id, other.signal_id) == (1, 2, 1)
    assert await store.signals_after("r1", 0) == [first, second]
    assert await store.signals_after("r1", 1) == [second]
    assert await store.signals_after("r1", 2) == []
    assert await store.signals_after("r1", 0, limit=1) == [first]
    assert await store.signals_after("missing", 0) == []


async def test_a_signal_to_an_ended_or_unknown_run_is_refused(store: Store) -> None:
    await store.create_run(_run("done", status=RunStatus.COMPLETED))
    with pytest.raises(RunStateError):
        await store.add_signal("done", "late", {}, 1.0)
    with pytest.raises(UnknownRunError):
        await store.add_signal("missing", "late", {}, 1.0)
    assert await store.signals_after("done", 0) == []


async def test_delete_runs_removes_only_terminal_runs_finished_before(store: Store) -> None:
    await store.create_run(
        _run("old-done", status=RunStatus.COMPLETED, finished_at=10.0), _entries(1, 3)
    )
    await store.create_run(
        _run("old-failed", status=RunStatus.FAILED, finished_at=19.0), _entries(1, 2)
    )
    await store.create_run(
        _run("new-done", status=RunStatus.CANCELLED, finished_at=20.0), _entries(1, 2)
    )
    await store.create_run(_run("running", status=RunStatus.RUNNING), _entries(1, 2))
    await store.create_run(_run("pending-odd", finished_at=1.0), _entries(1, 1))
    assert await store.delete_runs(finished_before=20.0) == 2
    assert await store.get_run("old-done") is None
    assert await store.get_run("old-failed") is None
    assert await store.read_log("old-done") == []
    assert await store.read_log("old-failed") == []
    for kept in ("new-done", "running", "pending-odd"):
        assert await store.get_run(kept) is not None
        assert await store.read_log(kept) != []
    items, _ = await _all_pages(store)
    assert sorted(r.run_id for r in items) == ["new-done", "pending-odd", "running"]
    assert await store.delete_runs(finished_before=20.0) == 0


# -- notification ----------------------------------------------------------------------


async def test_save_run_wakes_a_follower(store: Store) -> None:
    await store.create_run(_run("r1", last_seq=1), _entries(1, 1))
    event = store.notifier.watch("r1")
    other = store.notifier.watch("r2")
    assert not event.is_set()
    await store.save_run(_run("r1", last_seq=2), _entries(2, 2))
    assert event.is_set()
    assert not other.is_set()


async def test_create_run_wakes_a_follower_and_the_waiter_sees_the_entries(store: Store) -> None:
    seen: list[int] = []

    async def follower() -> None:
        event = store.notifier.watch("r1")
        if not await store.read_log("r1"):
            await event.wait()
        seen.extend(e.seq for e in await store.read_log("r1"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower)
            await trio.testing.wait_all_tasks_blocked()
            await store.create_run(_run("r1"), _entries(1, 2))
    assert seen == [1, 2]


async def test_ids_no_store_can_hold_are_simply_not_found(store: Store) -> None:
    # PostgreSQL text cannot hold NUL: such an id was never stored, so it is
    # unknown (not a server error), on every backend alike.
    odd = "r\x001"
    assert await store.get_run(odd) is None
    assert await store.get_graph("g\x00") is None
    assert await store.read_log(odd) == []
    assert await store.signals_after(odd, 0) == []
    with pytest.raises(UnknownRunError):
        await store.add_signal(odd, "s", {}, 1.0)
    page = await store.list_runs(graph_id="g\x00")
    assert page.items == []


async def test_a_cancelled_checkpoint_returns_if_and_only_if_it_was_written(store: Store) -> None:
    # An actor keeps its log's seqs only for checkpoints that returned: one
    # that raised must have written nothing, one that was written must return
    # (the cancel then comes at the caller's next checkpoint).
    for i in range(30):
        await store.create_run(_run(f"r{i:02d}", last_seq=1), _entries(1, 1))
    returned: set[str] = set()

    async def save(run_id: str) -> None:
        await store.save_run(_run(run_id, step=2, last_seq=2), _entries(2, 2))
        returned.add(run_id)
        await trio.lowlevel.checkpoint()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(save, f"r{i:02d}")
            # Let some reach the writer, then cancel them all mid-flight.
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
    for i in range(30):
        run = await store.get_run(f"r{i:02d}")
        assert run is not None
        written = run.step == 2
        assert [e.seq for e in await store.read_log(run.run_id)] == ([1, 2] if written else [1])
        assert written == (run.run_id in returned), run.run_id


# -- graph scopes in listings ----------------------------------------------------------


async def test_listings_filter_by_graph_scope_patterns_inside_the_query(store: Store) -> None:
    ids = ["team-a.x", "team-a.y", "team_a.z", "team-b.x", "teamXa.q", "other"]
    for i, graph_id in enumerate(ids):
        await store.put_graph(_graph(graph_id))
        await store.create_run(_run(f"r{i}", graph_id=graph_id, created_at=100.0 + i))
    # "_" and "." are literal: team_a.z and teamXa.q do not match team-a.*
    runs, pages = await _all_pages(store, graphs=["team-a.*", "oth?r"], limit=1)
    assert sorted(r.graph_id for r in runs) == ["other", "team-a.x", "team-a.y"]
    assert pages == 3  # every page full: the filter is in the query
    runs, _ = await _all_pages(store, graphs=["team_a.*"])
    assert [r.graph_id for r in runs] == ["team_a.z"]
    runs, _ = await _all_pages(store, graphs=[])
    assert runs == []
    runs, _ = await _all_pages(store, graphs=["team-a.*"], graph_id="team-b.x")
    assert runs == []
    page = await store.list_graphs(graphs=["team-?.x"], limit=1)
    assert [g.graph_id for g in page.items] == ["team-a.x"]
    page = await store.list_graphs(graphs=["team-?.x"], cursor=page.next_cursor, limit=1)
    assert [g.graph_id for g in page.items] == ["team-b.x"] and page.next_cursor is None


# -- API tokens, tickets and the audit log -------------------------------------------------


async def test_tokens_tickets_and_audit(store: Store) -> None:
    from trioflow.stores.base import AuditEntry, StoredToken

    token = StoredToken("0123456789abcdef", "ops", "admin", ("*",), "h" * 64, False, 10.0)
    await store.put_token(token)
    with pytest.raises(StoreError):
        await store.put_token(token)
    assert await store.get_token("0123456789abcdef") == token
    assert await store.get_token("nope") is None
    short = StoredToken(
        "fedcba9876543210", "ci", "runner", ("a.*", "b"), "k" * 64, True, 20.0, 50.0
    )
    await store.put_token(short)
    assert [t.token_id for t in await store.list_tokens()] == [token.token_id, short.token_id]
    assert await store.count_tokens(active_at=40.0) == 2
    assert await store.count_tokens(active_at=50.0) == 1  # expired at 50
    revoked = await store.revoke_token(token.token_id, 60.0)
    assert revoked is not None and revoked.revoked_at == 60.0
    again = await store.revoke_token(token.token_id, 70.0)
    assert again is not None and again.revoked_at == 60.0  # the first revocation stands
    assert await store.revoke_token("nope", 70.0) is None
    assert await store.count_tokens(active_at=40.0) == 1
    assert await store.count_tokens() == 2  # revoked and expired ones too
    await store.touch_tokens({short.token_id: 30.0})
    await store.touch_tokens({short.token_id: 25.0})  # never moves back
    got = await store.get_token(short.token_id)
    assert got is not None and got.last_used_at == 30.0 and got.graphs == ("a.*", "b")
    assert got.peppered and got.expires_at == 50.0
    # Tickets: taken once, and not after they expire.
    await store.put_ticket("t1", short.token_id, 100.0, now=90.0)
    await store.put_ticket("t2", short.token_id, 100.0, now=90.0)
    assert await store.take_ticket("t1", 99.0) == short.token_id
    assert await store.take_ticket("t1", 99.0) is None
    assert await store.take_ticket("t2", 100.0) is None
    # Expired tickets are cleared whenever one is issued: they never pile up.
    await store.put_ticket("t3", short.token_id, 110.0, now=100.0)
    await store.put_ticket("t4", short.token_id, 200.0, now=150.0)
    assert await store.take_ticket("t3", 105.0) is None  # gone with the put at 150
    assert await store.take_ticket("t4", 150.0) == short.token_id
    # The audit log: seqs from 1, read after a seq.
    await store.add_audit(
        [AuditEntry(0, 1.0, "a", "x", "t", 200), AuditEntry(0, 2.0, "b", "y", "u", 403, "no")]
    )
    await store.add_audit([AuditEntry(0, 3.0, "c", "z", "v", 201)])
    entries = await store.read_audit()
    assert [(e.seq, e.actor, e.status) for e in entries] == [
        (1, "a", 200),
        (2, "b", 403),
        (3, "c", 201),
    ]
    assert [e.seq for e in await store.read_audit(after=1, limit=1)] == [2]
    assert entries[1].detail == "no"
