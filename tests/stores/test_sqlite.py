"""What only the SQLite store promises: schema migrations, WAL, atomic checkpoints, persistence."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sqlite3
from typing import Any

import pytest
import trio
import trio.lowlevel

from trioflow import open_engine
from trioflow.errors import StoreError, StoreLockedError
from trioflow.logs import Event, Level, LogEntry
from trioflow.runs import RunRecord, RunStatus
from trioflow.stores.base import StoredGraph
from trioflow.stores.sqlite import APPLICATION_ID, SCHEMA_VERSION, SQLiteStore
from trioflow.stores.url import open_store_from_url


def _pragma(path: pathlib.Path, name: str) -> object:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


def _run(run_id: str = "r1", **fields: Any) -> RunRecord:
    base = RunRecord(
        run_id=run_id,
        graph_id="g",
        status=RunStatus.RUNNING,
        state={"n": 0},
        current_node="a",
        created_at=1.0,
        updated_at=1.0,
    )
    return dataclasses.replace(base, **fields)


def _entry(seq: int) -> LogEntry:
    return LogEntry(seq, float(seq), Level.INFO, Event.NODE_STARTED, "a", f"entry {seq}", {})


def _seqs(entries: list[LogEntry]) -> list[int]:
    return [e.seq for e in entries]


@pytest.fixture
def db(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "trioflow.db"


async def test_a_fresh_database_gets_the_current_schema_in_wal_mode(db: pathlib.Path) -> None:
    store = SQLiteStore(str(db))
    await store.open()
    await store.aclose()
    assert _pragma(db, "user_version") == SCHEMA_VERSION
    assert _pragma(db, "application_id") == APPLICATION_ID
    assert _pragma(db, "journal_mode") == "wal"
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='index'")}
    assert {"graphs", "runs", "logs"} <= tables
    assert {"runs_by_created", "runs_by_graph", "runs_by_status", "runs_by_finished"} <= indexes


async def test_reopening_keeps_the_version_and_the_data(db: pathlib.Path) -> None:
    store = SQLiteStore(str(db))
    await store.open()
    graph = StoredGraph("g", {"id": "g"}, "digest", 5.0)
    await store.put_graph(graph)
    await store.create_run(_run(last_seq=1), [_entry(1)])
    await store.save_run(_run(step=2, last_seq=2), [_entry(2)])
    await store.aclose()

    again = SQLiteStore(str(db))
    await again.open()
    try:
        assert _pragma(db, "user_version") == SCHEMA_VERSION
        assert await again.get_graph("g") == graph
        assert await again.get_run("r1") == _run(step=2, last_seq=2)
        assert [e.seq for e in await again.read_log("r1")] == [1, 2]
        assert [r.run_id for r in await again.unfinished_runs()] == ["r1"]
    finally:
        await again.aclose()


async def test_a_newer_schema_is_refused_and_left_untouched(db: pathlib.Path) -> None:
    store = SQLiteStore(str(db))
    await store.open()
    await store.create_run(_run(), [_entry(1)])
    await store.aclose()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = await trio.Path(db).read_bytes()

    newer = SQLiteStore(str(db))
    with pytest.raises(StoreError, match=r"schema version .*upgrade trioflow"):
        await newer.open()
    assert await trio.Path(db).read_bytes() == before
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT run_id FROM runs").fetchall() == [("r1",)]


async def test_a_foreign_sqlite_database_is_refused(db: pathlib.Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE mine (x)")
    with pytest.raises(StoreError, match="not a trioflow"):
        await SQLiteStore(str(db)).open()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0


async def test_a_file_that_is_not_a_database_is_a_store_error(db: pathlib.Path) -> None:
    await trio.Path(db).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        await SQLiteStore(str(db)).open()


async def test_a_failed_checkpoint_writes_nothing(db: pathlib.Path) -> None:
    store = SQLiteStore(str(db))
    await store.open()
    try:
        first = _run(step=1, last_seq=2)
        await store.create_run(first, [_entry(1), _entry(2)])
        event = store.notifier.watch("r1")
        # seq 3 repeats: the entry insert fails after the run row was
        # updated and seqs 3 and 4 inserted in the same transaction.
        broken = _run(step=2, last_seq=5, state={"n": 99})
        with pytest.raises(StoreError, match="checkpoint was not written"):
            await store.save_run(broken, [_entry(3), _entry(4), _entry(3)])
        assert await store.get_run("r1") == first
        assert [e.message for e in await store.read_log("r1")] == ["entry 1", "entry 2"]
        assert not event.is_set()
        # The store is still usable after the rollback.
        ok = _run(step=2, last_seq=3)
        await store.save_run(ok, [_entry(3)])
        assert await store.get_run("r1") == ok
    finally:
        await store.aclose()


async def test_calls_after_close_are_store_errors(db: pathlib.Path) -> None:
    store = SQLiteStore(str(db))
    await store.open()
    await store.aclose()
    with pytest.raises(StoreError, match="not open"):
        await store.get_run("r1")
    with pytest.raises(StoreError, match="not open"):
        await store.create_run(_run())


def test_an_in_memory_path_is_refused() -> None:
    with pytest.raises(StoreError, match="MemoryStore"):
        SQLiteStore(":memory:")


def test_sqlite_urls_build_an_sqlite_store(tmp_path: pathlib.Path) -> None:
    store = open_store_from_url(f"sqlite:///{tmp_path}/x.db")
    assert isinstance(store, SQLiteStore)
    assert store.path == f"{tmp_path}/x.db"
    store = open_store_from_url(f"sqlite:///{tmp_path}/x.db?durability=async&synchronous=FULL")
    assert isinstance(store, SQLiteStore)
    assert (store.path, store.durability) == (f"{tmp_path}/x.db", "async")
    assert store._synchronous == "FULL"
    for bad, why in (("?durability=later", "one of sync, async"), ("?fsync=1", "unknown")):
        with pytest.raises(StoreError, match=why):
            open_store_from_url(f"sqlite:///{tmp_path}/x.db{bad}")


async def test_an_async_checkpoint_cancelled_after_it_was_handed_over_returns(
    db: pathlib.Path,
) -> None:
    """With durability=async, a checkpoint that reached the writer returns, cancel or not
    (the caller keeps its log's seqs only for checkpoints that returned)."""
    store = SQLiteStore(str(db), durability="async")
    await store.open()
    try:
        for i in range(30):
            await store.create_run(_run(f"r{i:02d}", last_seq=1), [_entry(1)])
        returned: set[str] = set()

        async def save(run_id: str) -> None:
            await store.save_run(
                _run(run_id, step=2, last_seq=2, status=RunStatus.RUNNING), [_entry(2)]
            )
            returned.add(run_id)
            await trio.lowlevel.checkpoint()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(save, f"r{i:02d}")
                await trio.lowlevel.checkpoint()
                nursery.cancel_scope.cancel()
            await store.probe()  # everything handed over is written by now
        for i in range(30):
            run = await store.get_run(f"r{i:02d}")
            assert run is not None
            written = run.step == 2
            assert written == (run.run_id in returned), run.run_id
    finally:
        await store.aclose()


async def test_concurrent_checkpoints_commit_together_but_fail_alone(db: pathlib.Path) -> None:
    store = SQLiteStore(str(db))
    await store.open()
    try:
        for i in range(20):
            await store.create_run(_run(f"r{i:02d}", last_seq=1), [_entry(1)])
        errors: dict[str, StoreError] = {}

        async def save(run_id: str, seq: int) -> None:
            try:
                await store.save_run(_run(run_id, step=2, last_seq=seq), [_entry(seq)])
            except StoreError as exc:
                errors[run_id] = exc

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    # Every fifth run repeats seq 1: that checkpoint must fail alone.
                    nursery.start_soon(save, f"r{i:02d}", 1 if i % 5 == 0 else 2)
        assert sorted(errors) == ["r00", "r05", "r10", "r15"]
        for i in range(20):
            run = await store.get_run(f"r{i:02d}")
            assert run is not None
            failed = i % 5 == 0
            assert run.step == (0 if failed else 2)
            assert _seqs(await store.read_log(f"r{i:02d}")) == ([1] if failed else [1, 2])
    finally:
        await store.aclose()


async def test_a_cancelled_checkpoint_is_either_written_whole_or_not_at_all(
    db: pathlib.Path,
) -> None:
    store = SQLiteStore(str(db))
    await store.open()
    try:
        for i in range(30):
            await store.create_run(_run(f"r{i:02d}", last_seq=1), [_entry(1)])
        returned: set[str] = set()

        async def save(run_id: str) -> None:
            await store.save_run(_run(run_id, step=2, last_seq=2), [_entry(2)])
            returned.add(run_id)

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
            seqs = _seqs(await store.read_log(f"r{i:02d}"))
            assert (run.step, seqs) in ((0, [1]), (2, [1, 2]))
            if f"r{i:02d}" in returned:
                assert run.step == 2
    finally:
        await store.aclose()


async def test_async_durability_hands_steps_over_and_keeps_the_log_whole(
    db: pathlib.Path,
) -> None:
    from trioflow import open_engine

    graph = {
        "id": "chain",
        "start_node": "n0",
        "nodes": [{"id": f"n{i}", "callable": "tools.noop"} for i in range(50)],
        "edges": [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(49)],
    }
    store = SQLiteStore(str(db), durability="async")
    async with open_engine(store=store) as engine:
        await engine.register_graph(graph)
        run = await engine.start_run("chain", {"k": 1})
        final = await engine.wait(run.run_id)
        assert final.status is RunStatus.COMPLETED and final.step == 50
    # The terminal checkpoint was waited for and aclose wrote the rest: a new
    # store on the file sees the whole run.
    reopened = SQLiteStore(str(db))
    await reopened.open()
    try:
        stored = await reopened.get_run(run.run_id)
        entries = await reopened.read_log(run.run_id)
    finally:
        await reopened.aclose()
    assert stored == final
    assert _seqs(entries) == list(range(1, final.last_seq + 1))
    assert entries[-1].event == Event.RUN_COMPLETED


async def test_a_failed_async_checkpoint_stops_later_ones_of_that_run(db: pathlib.Path) -> None:
    store = SQLiteStore(str(db), durability="async")
    await store.open()
    try:
        first = _run(step=1, last_seq=2)
        await store.create_run(first, [_entry(1), _entry(2)])
        await store.create_run(_run("r2", last_seq=1), [_entry(1)])
        # Queued without waiting: a broken step (seq 3 repeats), then a good
        # later step of the same run, and a step of another run.
        await store.save_run(_run(step=2, last_seq=4), [_entry(3), _entry(3)])
        await store.save_run(_run(step=3, last_seq=5), [_entry(5)])
        await store.save_run(_run("r2", step=2, last_seq=2), [_entry(2)])
        with pytest.raises(StoreError):
            # Written with a wait (terminal), so the earlier failure surfaces.
            await store.save_run(_run(step=4, last_seq=6, status=RunStatus.COMPLETED), [_entry(6)])
        # r1 stays at its last committed checkpoint, with no gap after it.
        assert await store.get_run("r1") == first
        assert _seqs(await store.read_log("r1")) == [1, 2]
        # The other run was not affected.
        other = await store.get_run("r2")
        assert other is not None and other.step == 2
        assert _seqs(await store.read_log("r2")) == [1, 2]
    finally:
        await store.aclose()


async def test_durability_must_be_sync_or_async(db: pathlib.Path) -> None:
    with pytest.raises(StoreError, match="durability"):
        SQLiteStore(str(db), durability="later")  # type: ignore[arg-type]


async def test_a_write_that_raises_fails_alone_and_the_writer_lives_on(db: pathlib.Path) -> None:
    store = SQLiteStore(str(db))
    await store.open()
    try:

        def broken(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO graphs VALUES ('x', '{}', 'd', 0)")
            raise ValueError("a bug in a write")

        with pytest.raises(StoreError, match="ValueError: a bug in a write"):
            await store._write(broken)
        # Rolled back, and the writer thread still serves writes.
        assert await store.get_graph("x") is None
        await store.create_run(_run(), [_entry(1)])
        assert await store.get_run("r1") == _run()
    finally:
        await store.aclose()


async def test_one_engine_at_a_time_owns_a_store_file(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "trioflow.db")
    async with open_engine(store=SQLiteStore(path)) as owner:
        await owner.register_graph(
            {"id": "g", "start_node": "a", "nodes": [{"id": "a", "callable": "tools.noop"}]}
        )
        with pytest.raises(StoreLockedError) as info:  # raised as itself, not in a group
            async with open_engine(store=SQLiteStore(path)):
                pass  # pragma: no cover
        assert info.value.path == path
        assert info.value.holder["pid"] == os.getpid()
        assert f"process {os.getpid()}" in info.value.message
        # A tool that only reads (or prunes) takes no lock.
        async with open_engine(store=SQLiteStore(path), resume=False) as reader:
            assert (await reader.get_graph("g")).id == "g"
    # Released when the owner stopped.
    async with open_engine(store=SQLiteStore(path)) as again:
        assert (await again.get_graph("g")).id == "g"
