"""A store failure never strands a run: retried, then failed cleanly, or left resumable.

Every test runs on every backend, through a wrapper that injects write
failures (tests/stores/faults.py). Real failures of a real SQLite file (a
full disk, a read-only mount, a lock held by another process) are in
test_sqlite_faults.py.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

import pytest
import trio
import trio.testing
from conftest import make_store
from faults import FaultyStore, until

from trioflow import Engine, EngineLimits, LogEntry, Registry, RunStatus, StoreError, open_engine
from trioflow.errors import RunStalledError

THREE = {
    "id": "three",
    "start_node": "a",
    "nodes": [
        {"id": "a", "callable": "tools.noop"},
        {"id": "b", "callable": "tools.noop"},
        {"id": "c", "callable": "tools.approve"},
    ],
    "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}],
}
UNDISTURBED = [
    "run_started",
    "node_started",
    "node_completed",
    "edge_taken",
    "node_started",
    "node_completed",
    "edge_taken",
    "node_started",
    "node_completed",
    "run_completed",
]
LIMITS = EngineLimits(store_retry_s=30.0)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # Virtual time that jumps only after 50 ms of real idleness: SQLite calls
    # run in worker threads, during which the clock must not jump.
    return trio.testing.MockClock(autojump_threshold=0.05)


# Faults are injected by a wrapper the engine sees as a single-process store;
# the PostgreSQL store's failures are tested with a real database that goes away.
@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> FaultyStore:
    return FaultyStore(make_store(request.param, tmp_path))


@asynccontextmanager
async def engine_on(store: FaultyStore, registry: Registry) -> AsyncIterator[Engine]:
    async with open_engine(store=store, registry=registry, limits=LIMITS) as engine:
        await engine.register_graph(THREE)
        yield engine


def _gapless(entries: list[LogEntry]) -> bool:
    return [e.seq for e in entries] == list(range(1, len(entries) + 1))


async def _collect(engine: Engine, run_id: str, into: list[LogEntry]) -> None:
    async with aclosing(engine.follow(run_id)) as entries:
        async for entry in entries:
            into.append(entry)


async def test_a_checkpoint_failing_for_a_while_is_retried_and_the_run_completes(
    clock: trio.testing.MockClock, store: FaultyStore, registry: Registry
) -> None:
    async with engine_on(store, registry) as engine:
        store.fail(lambda run: run.step == 2, times=5)
        run = await engine.start_run("three")
        with trio.fail_after(120):
            final = await engine.wait(run.run_id)
        entries = await engine.read_log(run.run_id)
        assert engine.store_health().ok
    assert store.refused == 5
    assert final.status is RunStatus.COMPLETED
    assert final.state == {"approved": True}
    assert _gapless(entries)
    assert [e.event for e in entries] == UNDISTURBED


async def test_a_checkpoint_failing_past_the_retry_window_fails_the_run_cleanly(
    clock: trio.testing.MockClock, store: FaultyStore, registry: Registry
) -> None:
    async with engine_on(store, registry) as engine:
        # Step checkpoints of step 2 fail for good; the failure record can be written.
        store.fail(lambda run: run.status is RunStatus.RUNNING and run.step == 2)
        run = await engine.start_run("three")
        seen: list[LogEntry] = []
        start = trio.current_time()
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_collect, engine, run.run_id, seen)
                final = await engine.wait(run.run_id)
        waited = trio.current_time() - start
        entries = await engine.read_log(run.run_id)
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert final.error["code"] == "store_unavailable"
    assert "disk full" in final.error["message"]
    assert LIMITS.store_retry_s - 3 <= waited <= LIMITS.store_retry_s + 3
    assert store.refused > 5  # retried with backoff, not once
    # Followers got the whole log, ending with the failure.
    assert seen == entries
    assert _gapless(entries)
    assert [e.event for e in entries] == ["run_started", "node_started", "run_failed"]


async def test_a_store_refusing_even_the_failure_leaves_the_run_resumable(
    clock: trio.testing.MockClock, store: FaultyStore, registry: Registry
) -> None:
    async with engine_on(store, registry) as engine:
        store.fail(lambda run: run.last_seq > 2)  # everything after the first checkpoint
        run = await engine.start_run("three")
        with trio.fail_after(120):
            with pytest.raises(RunStalledError) as info:
                await engine.wait(run.run_id)
        assert info.value.code == "run_stalled"
        assert "could not be written" in info.value.message
        assert engine.active_runs == 0  # the actor is gone...
        stored = await engine.get_run(run.run_id)
        assert stored.status is RunStatus.RUNNING  # ... and the run is where it stood
        assert stored.step == 1
        # A follower gets what exists, then a clear error instead of silence.
        seen: list[LogEntry] = []
        with trio.fail_after(10), pytest.raises(RunStalledError):
            await _collect(engine, run.run_id, seen)
        assert [e.event for e in seen] == ["run_started", "node_started"]
        assert not engine.store_health().ok
    # The engine stopped cleanly; the store works again; the next engine
    # resumes the run from its last checkpoint.
    store.heal()
    async with engine_on(store, registry) as engine:
        with trio.fail_after(120):
            final = await engine.wait(run.run_id)
        entries = await engine.read_log(run.run_id)
    assert final.status is RunStatus.COMPLETED
    assert _gapless(entries)
    assert [e.event for e in entries][:3] == ["run_started", "node_started", "run_resumed"]


async def test_a_stalled_run_can_be_cancelled_once_the_store_takes_writes(
    clock: trio.testing.MockClock, store: FaultyStore, registry: Registry
) -> None:
    async with engine_on(store, registry) as engine:
        store.fail(lambda run: run.last_seq > 2, transient=False)
        run = await engine.start_run("three")
        with trio.fail_after(120), pytest.raises(RunStalledError):
            await engine.wait(run.run_id)
        # While the store refuses writes, so does the cancel: a clear store error.
        with pytest.raises(StoreError):
            await engine.cancel(run.run_id)
        store.heal()
        final = await engine.cancel(run.run_id)
        assert final.status is RunStatus.CANCELLED
        assert (await engine.cancel(run.run_id)).status is RunStatus.CANCELLED  # idempotent
        entries = await engine.read_log(run.run_id)
        assert _gapless(entries)
        assert [e.event for e in entries] == ["run_started", "node_started", "run_cancelled"]
        assert (await engine.get_run(run.run_id)).status is RunStatus.CANCELLED


async def test_store_health_is_degraded_while_writes_fail_and_probes_notice_recovery(
    clock: trio.testing.MockClock, store: FaultyStore, registry: Registry
) -> None:
    async with engine_on(store, registry) as engine:
        assert engine.store_health().ok
        store.fail()
        run = await engine.start_run("three")
        with trio.fail_after(120), pytest.raises(RunStalledError):
            await engine.wait(run.run_id)
        health = engine.store_health()
        assert not health.ok
        assert health.error is not None and "disk full" in health.error
        assert health.since is not None
        # Nothing writes any more; asking again probes (at most once a second).
        store.heal()
        with trio.fail_after(10):
            await until(lambda: engine.store_health().ok, 0.25)


async def test_other_runs_are_not_held_up_by_one_runs_failing_checkpoints(
    clock: trio.testing.MockClock, store: FaultyStore, registry: Registry
) -> None:
    async with engine_on(store, registry) as engine:
        victim = await engine.start_run("three")
        store.fail(lambda run: run.run_id == victim.run_id and run.step == 2)
        others = [await engine.start_run("three") for _ in range(5)]
        with trio.fail_after(10):  # well inside the victim's 30 s retry window
            for other in others:
                assert (await engine.wait(other.run_id)).status is RunStatus.COMPLETED
        with trio.fail_after(120):
            final = await engine.wait(victim.run_id)
        assert final.status is RunStatus.FAILED
