"""Real failures of a real SQLite file: a full disk, a file turned read-only, a lock held elsewhere.

The disk is a small tmpfs the test mounts itself; that needs
root with CAP_SYS_ADMIN (the CI machines have it), and the tests skip, saying
so, where it is missing.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from contextlib import aclosing
from typing import Any

import pytest
import trio
import trio.testing
from faults import until

from trioflow import Engine, EngineLimits, Registry, RunContext, RunStatus, open_engine
from trioflow.errors import RunStalledError
from trioflow.stores.sqlite import SQLiteStore

CHATTY = {
    "id": "chatty",
    "start_node": "talk",
    "nodes": [{"id": "talk", "callable": "test.talk"}, {"id": "done", "callable": "tools.approve"}],
    "edges": [
        {"from": "talk", "to": "talk", "type": "loop", "loop": {"max_iterations": 10_000}},
        {"from": "talk", "to": "done"},
    ],
    "max_steps": 100_000,
}


HELD = {
    "id": "held",
    "start_node": "h",
    "nodes": [{"id": "h", "callable": "test.hold"}, {"id": "x", "callable": "tools.approve"}],
    "edges": [{"from": "h", "to": "x"}],
}


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.05)


def _mount(target: pathlib.Path, size: str) -> None:
    target.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {result.stderr.strip()}"
        )


@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 4 MiB filesystem of its own."""
    target = tmp_path / "disk"
    _mount(target, "4m")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


async def _is_running(engine: Engine, run_id: str) -> bool:
    return (await engine.get_run(run_id)).status is RunStatus.RUNNING


def _registry(registry: Registry) -> Registry:
    def talk(state: Any, ctx: RunContext) -> None:
        for i in range(20):
            ctx.log(f"line {i}", blob="z" * 2000)

    registry.add_tool("test.talk", talk, inline=True)
    return registry


def _fill(disk: pathlib.Path, leave: int) -> pathlib.Path:
    """Fill ``disk`` with a file until about ``leave`` bytes are free."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with filler.open("wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


async def test_a_full_disk_fails_a_run_cleanly_when_its_failure_still_fits(
    clock: trio.testing.MockClock, small_disk: pathlib.Path, registry: Registry
) -> None:
    path = str(small_disk / "trioflow.db")
    limits = EngineLimits(store_retry_s=5.0)
    async with open_engine(
        store=SQLiteStore(path), registry=_registry(registry), limits=limits
    ) as engine:
        await engine.register_graph(CHATTY)
        # Room for a few steps of 40 KB of log lines, not for many.
        _fill(small_disk, leave=256 * 1024)
        run = await engine.start_run("chatty")
        seen: list[Any] = []
        with trio.fail_after(300):
            async with aclosing(engine.follow(run.run_id)) as entries:
                async for entry in entries:
                    seen.append(entry)
        final = await engine.get_run(run.run_id)
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert final.error["code"] == "store_unavailable"
    assert "full" in final.error["message"]
    # The follower saw every entry, ending with the failure.
    assert [e.seq for e in seen] == list(range(1, final.last_seq + 1))
    assert seen[-1].event == "run_failed"


async def test_a_disk_without_room_for_anything_leaves_runs_resumable(
    clock: trio.testing.MockClock, small_disk: pathlib.Path, registry: Registry
) -> None:
    path = str(small_disk / "trioflow.db")
    limits = EngineLimits(store_retry_s=3.0)
    registry = _registry(registry)
    gate = trio.Event()

    async def hold(state: Any) -> None:
        await gate.wait()

    registry.add_tool("test.hold", hold)
    async with open_engine(store=SQLiteStore(path), registry=registry, limits=limits) as engine:
        await engine.register_graph(HELD)
        run = await engine.start_run("held")
        with trio.fail_after(60):
            await until(lambda: _is_running(engine, run.run_id))
        filler = _fill(small_disk, leave=0)
        gate.set()
        seen: list[Any] = []
        with trio.fail_after(300):
            with pytest.raises(RunStalledError):
                async with aclosing(engine.follow(run.run_id)) as entries:
                    async for entry in entries:
                        seen.append(entry)
            health = engine.store_health()
            assert not health.ok
            assert health.error is not None and "full" in health.error
            stored = await engine.get_run(run.run_id)
            assert stored.status is RunStatus.RUNNING
            assert [e.seq for e in seen] == list(range(1, stored.last_seq + 1))
            # Space comes back: the probe notices without any run writing.
            filler.unlink()
            await until(lambda: engine.store_health().ok, 0.5)
    # The next engine resumes the run from its last checkpoint.
    async with open_engine(store=SQLiteStore(path), registry=registry, limits=limits) as engine:
        with trio.fail_after(60):
            final = await engine.wait(run.run_id)
        entries = await engine.read_log(run.run_id)
    assert final.status is RunStatus.COMPLETED
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert [e.event for e in entries].count("run_resumed") == 1


def _immutable(paths: list[pathlib.Path], on: bool) -> None:
    flag = "+i" if on else "-i"
    result = subprocess.run(
        ["chattr", flag, *map(str, paths)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        if on:
            pytest.skip(
                f"cannot make a file immutable here (needs chattr, root and a "
                f"filesystem that supports it): {result.stderr.strip()}"
            )
        raise RuntimeError(result.stderr)


async def test_a_database_file_that_turns_read_only_is_waited_out(
    clock: trio.testing.MockClock, tmp_path: pathlib.Path, registry: Registry
) -> None:
    # The files become immutable while the store is open, so even root's
    # writes through open descriptors fail (EPERM), as on a read-only volume.
    path = tmp_path / "trioflow.db"
    gate = trio.Event()

    async def hold(state: Any) -> None:
        await gate.wait()

    registry.add_tool("test.hold", hold)
    async with open_engine(
        store=SQLiteStore(str(path)), registry=registry, limits=EngineLimits(store_retry_s=60)
    ) as engine:
        await engine.register_graph(HELD)
        run = await engine.start_run("held")
        with trio.fail_after(60):
            await until(lambda: _is_running(engine, run.run_id))
        files = [path, path.with_name(path.name + "-wal")]
        _immutable(files, True)
        try:
            gate.set()
            with trio.fail_after(60):
                await until(lambda: not engine.store_health().ok)
            error = engine.store_health().error
            assert error is not None
            assert (await engine.get_run(run.run_id)).step == 1  # nothing written meanwhile
        finally:
            _immutable(files, False)
        with trio.fail_after(120):
            final = await engine.wait(run.run_id)
        entries = await engine.read_log(run.run_id)
    assert final.status is RunStatus.COMPLETED
    assert final.state == {"approved": True}
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))


HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


async def test_a_lock_held_by_another_process_is_waited_out(
    tmp_path: pathlib.Path, registry: Registry
) -> None:
    # Real time: another process holds the database's write lock for 2.5 s,
    # far longer than this store's busy timeout. The run's next checkpoint
    # is retried until the lock is gone, and the run completes.
    path = str(tmp_path / "trioflow.db")
    gate = trio.Event()

    async def hold(state: Any) -> None:
        await gate.wait()

    registry.add_tool("test.hold", hold)
    store = SQLiteStore(path, busy_timeout_ms=100)
    async with open_engine(
        store=store, registry=registry, limits=EngineLimits(store_retry_s=20)
    ) as engine:
        await engine.register_graph(HELD)
        run = await engine.start_run("held")
        degraded = False
        with trio.fail_after(60):
            await until(lambda: _is_running(engine, run.run_id), 0.05)
            holder = await trio.lowlevel.open_process(
                [sys.executable, "-c", HOLD_LOCK, path, "2.5"], stdout=subprocess.PIPE
            )
            try:
                assert holder.stdout is not None
                assert b"locked" in await holder.stdout.receive_some(100)
                started = trio.current_time()
                gate.set()
                async with trio.open_nursery() as nursery:

                    async def watch() -> None:
                        nonlocal degraded
                        while True:
                            degraded = degraded or not engine.store_health().ok
                            await trio.sleep(0.05)

                    nursery.start_soon(watch)
                    final = await engine.wait(run.run_id)
                    nursery.cancel_scope.cancel()
                took = trio.current_time() - started
            finally:
                holder.kill()
                await holder.wait()
        assert final.status is RunStatus.COMPLETED
        assert final.state == {"approved": True}
        assert degraded
        assert took >= 2.0
        entries = await engine.read_log(run.run_id)
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
        assert engine.store_health().ok
