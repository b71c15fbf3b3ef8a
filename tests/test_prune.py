"""Retention: ``trioflow prune`` deletes terminal runs older than an age, and nothing else."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time

import trio

from trioflow import LogEntry, RunRecord, RunStatus
from trioflow.logs import Event, Level
from trioflow.stores.sqlite import SQLiteStore

ROOT = pathlib.Path(__file__).resolve().parent.parent
DAY = 86400.0


def _record(run_id: str, status: RunStatus, finished_ago: float | None) -> RunRecord:
    now = time.time()
    return RunRecord(
        run_id=run_id,
        graph_id="g",
        status=status,
        state={},
        current_node="a",
        step=1,
        created_at=now - 10 * DAY,
        updated_at=now,
        last_seq=1,
        finished_at=None if finished_ago is None else now - finished_ago,
    )


async def _prune(db: pathlib.Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "trioflow.web.cli", "prune", "--store", f"sqlite:///{db}", *args],
        cwd=ROOT,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_prune_deletes_only_terminal_runs_older_than_the_age(tmp_path: pathlib.Path) -> None:
    db = tmp_path / "t.db"
    store = SQLiteStore(str(db))
    await store.open()
    runs = {
        "old-completed": _record("old-completed", RunStatus.COMPLETED, 3 * DAY),
        "old-failed": _record("old-failed", RunStatus.FAILED, 2 * DAY),
        "old-cancelled": _record("old-cancelled", RunStatus.CANCELLED, 40 * DAY),
        "recent-completed": _record("recent-completed", RunStatus.COMPLETED, 3600),
        "running": _record("running", RunStatus.RUNNING, None),
    }
    for record in runs.values():
        entry = LogEntry(1, time.time(), Level.INFO, Event.RUN_STARTED.value, None, "x", {})
        await store.create_run(record, [entry])
    await store.aclose()

    with trio.fail_after(60):
        result = await _prune(db, "--older-than", "1d")
    assert result.returncode == 0, result.stderr
    assert b"deleted 3 terminal run(s)" in result.stdout

    store = SQLiteStore(str(db))
    await store.open()
    try:
        left = {r.run_id for r in (await store.list_runs(limit=100)).items}
        assert left == {"recent-completed", "running"}
        assert await store.read_log("old-completed") == []
        assert len(await store.read_log("recent-completed")) == 1
        # The run left running by a stopped server was not resumed by prune.
        running = await store.get_run("running")
        assert running is not None and running.status is RunStatus.RUNNING
    finally:
        await store.aclose()


async def test_prune_refuses_a_bad_age(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(60):
        result = await _prune(tmp_path / "t.db", "--older-than", "soon")
    assert result.returncode == 3
    assert b"not an age" in result.stderr
    assert not (tmp_path / "t.db").exists()
