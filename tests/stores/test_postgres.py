"""The PostgreSQL store itself: leases, claims, and a database that misbehaves.

The store contract (every backend) is in test_contract.py; several engines
on one database in tests/test_nodes.py.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import trio
from pgtest import fresh_schema, pg_url

from trioflow.errors import LeaseHeldError, StoreConflictError, StoreError
from trioflow.logs import Level, LogEntry
from trioflow.runs import RunRecord, RunStatus
from trioflow.stores import postgres as pgm
from trioflow.stores.postgres import PostgresStore


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    with fresh_schema() as name:
        yield name


async def opened(schema: str, node: str = "a", **options: Any) -> PostgresStore:
    store = PostgresStore(pg_url(), schema=schema, node_id=node, **options)
    await store.open()
    return store


def run(run_id: str = "r1", **fields: Any) -> RunRecord:
    fields.setdefault("epoch", 1)
    fields.setdefault("status", RunStatus.RUNNING)
    return RunRecord(
        run_id=run_id,
        graph_id="g",
        state={"x": 1},
        current_node="a",
        created_at=1.0,
        updated_at=time.time(),
        **fields,
    )


def entry(seq: int) -> LogEntry:
    return LogEntry(seq, 1.0, Level.INFO, "node_started", "a", f"entry {seq}", {"seq": seq})


class LostAnswers:
    """Make the writer commit a batch and then lose the answer, ``times`` times."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, times: int = 1) -> None:
        self.left = times
        original = pgm._Writer._write

        def write(writer: Any, jobs: Any) -> None:
            original(writer, jobs)
            if self.left:
                self.left -= 1
                raise psycopg.OperationalError("the connection was lost after the commit")

        monkeypatch.setattr(pgm._Writer, "_write", write)


async def test_a_commit_whose_answer_was_lost_is_settled_at_once(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await opened(schema)
    try:
        first = run(last_seq=1)
        await store.create_run(first, [entry(1)])
        LostAnswers(monkeypatch)
        step = first.evolve(last_seq=2, step=1)
        await store.save_run(step, [entry(2)])  # written: it says so
        assert await store.get_run("r1") == step
        assert [e.seq for e in await store.read_log("r1")] == [1, 2]
    finally:
        await store.aclose()


async def test_a_retry_recognises_its_own_earlier_commit_but_nothing_else(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await opened(schema)
    try:
        first = run(last_seq=1)
        await store.create_run(first, [entry(1)])
        LostAnswers(monkeypatch)
        # The database does not answer the question "was it written?" either.
        monkeypatch.setattr(pgm._Writer, "_settle", _cannot_settle)
        step = first.evolve(last_seq=2, step=1)
        with pytest.raises(StoreError) as info:
            await store.save_run(step, [entry(2)])
        assert info.value.transient
        # Another checkpoint on the same stored record is not taken for it...
        other = first.evolve(last_seq=2, step=7, updated_at=step.updated_at + 1)
        with pytest.raises(StoreConflictError):
            await store.save_run(other, [entry(2)])
        # ...the retry of the same one is: it was written.
        await store.save_run(step, [entry(2)])
        assert await store.get_run("r1") == step
        assert [e.seq for e in await store.read_log("r1")] == [1, 2]
    finally:
        await store.aclose()


def _cannot_settle(writer: Any, jobs: Any, error: Any) -> None:
    for job in jobs:
        job.error_out = error
        job.ambiguous = True


async def test_a_row_locked_by_another_session_fails_the_write_instead_of_hanging(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pgm, "LOCK_TIMEOUT_MS", 300)
    store = await opened(schema)
    locker = await trio.to_thread.run_sync(
        lambda: psycopg.connect(pg_url(), options=f"-c search_path={schema}")
    )
    try:
        first = run(last_seq=1)
        await store.create_run(first, [entry(1)])
        await trio.to_thread.run_sync(
            lambda: locker.execute("SELECT 1 FROM runs WHERE run_id = 'r1' FOR UPDATE")
        )
        with trio.fail_after(10), pytest.raises(StoreError) as info:
            await store.save_run(first.evolve(last_seq=2), [entry(2)])
        assert info.value.transient  # the engine retries it
        await trio.to_thread.run_sync(locker.rollback)
        await store.save_run(first.evolve(last_seq=2), [entry(2)])
    finally:
        await trio.to_thread.run_sync(locker.close)
        await store.aclose()


async def test_claims_take_unheld_runs_once_and_count_a_takeover_as_a_crash(schema: str) -> None:
    a = await opened(schema, "a", lease_ttl=60.0)
    b = await opened(schema, "b", lease_ttl=60.0)
    try:
        await a.begin_session()
        await b.begin_session()
        queued = run("queued", epoch=0, status=RunStatus.PENDING)
        held = run("held")
        await a.create_run(queued, [])
        await a.create_run(held, [])
        # Two nodes scanning at once never claim the same run.
        async with trio.open_nursery() as nursery:
            results: dict[str, list[Any]] = {}

            async def claim(store: PostgresStore) -> None:
                results[store.node_id] = await store.claim_runs(10)

            nursery.start_soon(claim, a)
            nursery.start_soon(claim, b)
        claimed = [c.record.run_id for got in results.values() for c in got]
        assert claimed == ["queued"]
        [item] = [c for got in results.values() for c in got]
        assert item.record.epoch == 1 and not item.taken_over and item.record.crashes == 0
        # A held run is not claimable; once its lease expires, it is, as a crash.
        with pytest.raises(LeaseHeldError):
            await b.save_run(held.evolve(epoch=2, last_seq=1), [entry(1)], claim=True)
        import psycopg as pg

        with pg.connect(pg_url(), autocommit=True, options=f"-c search_path={schema}") as conn:
            conn.execute(
                "UPDATE runs SET lease_until = now() - interval '1 s' WHERE run_id = 'held'"
            )
        [taken] = await b.claim_runs(10)
        assert taken.record.run_id == "held" and taken.taken_over
        assert (taken.record.epoch, taken.record.crashes) == (2, 1)
        renewal = await b.renew_leases({"held": 2}, timeout_s=5)
        assert renewal.held == {"held"}
        assert (await a.renew_leases({"held": 1}, timeout_s=5)).held == frozenset()  # a lost it
    finally:
        await a.aclose()
        await b.aclose()


async def test_two_stores_migrating_one_new_schema_at_once_both_open(schema: str) -> None:
    stores = [PostgresStore(pg_url(), schema=schema, node_id=f"n{i}") for i in range(4)]
    async with trio.open_nursery() as nursery:
        for store in stores:
            nursery.start_soon(store.open)
    for store in stores:
        assert await store.get_run("nothing") is None
        await store.aclose()


async def test_a_schema_from_a_newer_trioflow_is_refused_untouched(schema: str) -> None:
    store = await opened(schema)
    await store.aclose()
    with psycopg.connect(pg_url(), autocommit=True, options=f"-c search_path={schema}") as conn:
        conn.execute("UPDATE trioflow_schema SET version = 99")
    with pytest.raises(StoreError, match="version 99"):
        await opened(schema)


async def test_heartbeats_and_checkpoints_of_many_runs_never_deadlock(schema: str) -> None:
    """A renewal and a batch of checkpoints lock the same rows: both in run id order."""
    store = await opened(schema, "a", lease_ttl=60.0)
    rng = random.Random(7)
    ids = [f"run-{i:03d}" for i in range(80)]
    try:
        records = {i: run(i, last_seq=0) for i in ids}
        for record in records.values():
            await store.create_run(record, [])

        async def checkpoint(run_id: str) -> None:
            record = records[run_id]
            seq = record.last_seq + 1
            records[run_id] = saved = record.evolve(last_seq=seq, step=seq)
            await store.save_run(saved, [entry(seq)])

        for _ in range(40):
            order = ids[:]
            rng.shuffle(order)
            held = {i: 1 for i in reversed(order)}
            renewals: list[Any] = []
            async with trio.open_nursery() as nursery:
                for run_id in order:
                    nursery.start_soon(checkpoint, run_id)

                async def renew(
                    held: dict[str, int] = held, renewals: list[Any] = renewals
                ) -> None:
                    renewals.append(await store.renew_leases(held, timeout_s=10))

                for _ in range(3):
                    nursery.start_soon(renew)
            assert all(r.held == frozenset(ids) for r in renewals)
        assert (await store.get_run(ids[0])).last_seq == 40  # type: ignore[union-attr]
    finally:
        await store.aclose()
