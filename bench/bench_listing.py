"""How fast listing pages are with 100,000 stored runs: SQLite vs memory.

Prints figures; asserts nothing. Run: ``python -m bench.bench_listing [--runs N]``.
The SQLite database lives in a temporary directory and is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from trioflow.logs import Event, Level, LogEntry
from trioflow.runs import RunRecord, RunStatus
from trioflow.stores.base import Store, StoredGraph
from trioflow.stores.memory import MemoryStore
from trioflow.stores.sqlite import SQLiteStore

from ._common import Row, row

GRAPHS = 200
WRITERS = 32
STATUSES = [RunStatus.COMPLETED] * 7 + [RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.RUNNING]


async def _fill(store: Store, runs: int) -> float:
    """Store ``GRAPHS`` graphs and ``runs`` runs (3 log entries each); returns seconds taken."""
    start = time.perf_counter()
    for g in range(GRAPHS):
        await store.put_graph(StoredGraph(f"graph-{g:04d}", {"id": f"graph-{g:04d}"}, "d", 0.0))
    base = 1_700_000_000.0

    async def writer(first: int) -> None:
        # Several writers at once, as several runs checkpoint at once in a
        # server: the SQLite store commits what queues up together.
        for i in range(first, runs, WRITERS):
            status = STATUSES[i % len(STATUSES)]
            created = base + i * 0.01
            run = RunRecord(
                run_id=f"{i:08x}",
                graph_id=f"graph-{i % GRAPHS:04d}",
                status=status,
                state={"issues_open": i % 3, "approved": True},
                current_node="approve",
                step=9,
                created_at=created,
                updated_at=created + 1,
                finished_at=created + 1 if status.is_terminal else None,
                last_seq=3,
            )
            entries = [
                LogEntry(s, created, Level.INFO, Event.CUSTOM, "approve", "x", {"s": s})
                for s in (1, 2, 3)
            ]
            await store.create_run(run, entries)

    async with trio.open_nursery() as nursery:
        for first in range(WRITERS):
            nursery.start_soon(writer, first)
    return time.perf_counter() - start


async def _time(
    label: str, fn: Callable[[], Awaitable[Any]], repeat: int = 50
) -> tuple[str, list[float]]:
    """Milliseconds per call, one sample per call."""
    await fn()  # warm caches
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - start) * 1e3)
    print(f"  {label:<44} {sorted(samples)[len(samples) // 2]:9.3f} ms/page")
    return label, samples


async def _bench(name: str, store: Store, runs: int) -> list[Row]:
    await store.open()
    try:
        fill = await _fill(store, runs)
        print(f"{name}: {runs:,} runs stored in {fill:.1f}s ({fill / runs * 1e6:.0f} us/run)")
        deep_cursor: str | None = None
        for _ in range(100):  # 100 pages of 50 in: a cursor 5,000 runs deep
            deep_cursor = (await store.list_runs(cursor=deep_cursor)).next_cursor
        graphs_cursor = (await store.list_graphs(limit=100)).next_cursor

        timings = [
            await _time("list_runs first page (50)", lambda: store.list_runs()),
            await _time("list_runs page 101 (cursor)", lambda: store.list_runs(cursor=deep_cursor)),
            await _time(
                "list_runs graph_id=... (50)", lambda: store.list_runs(graph_id="graph-0007")
            ),
            await _time(
                "list_runs status=failed (50)", lambda: store.list_runs(status=RunStatus.FAILED)
            ),
            await _time(
                "list_runs status=running + graph_id (50)",
                lambda: store.list_runs(status=RunStatus.RUNNING, graph_id="graph-0009"),
            ),
            await _time(
                "list_graphs second page (cursor)", lambda: store.list_graphs(cursor=graphs_cursor)
            ),
        ]
    finally:
        await store.aclose()
    case = f"{name}, {runs:,} runs"
    target = "fast at 100k" if name == "sqlite" and runs >= 100_000 else ""
    return [row("listing", case, label, "ms", samples, target=target) for label, samples in timings]


async def main(runs: int) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        rows = await _bench("sqlite", SQLiteStore(os.path.join(tmp, "bench.db")), runs)
    return rows + await _bench("memory", MemoryStore(), runs)


def run(quick: bool = False) -> list[Row]:
    """Rows for ``python -m bench`` (the table)."""
    return trio.run(main, 10_000 if quick else 100_000)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    trio.run(main, parser.parse_args().runs)
