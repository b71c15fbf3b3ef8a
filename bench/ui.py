"""The dashboard with 100,000 runs stored: server time per page, and page weight.

A SQLite file is filled with ``--runs`` runs over 200 graphs (as
``bench.bench_listing`` does), then served by a real Hypercorn in a child
process (``python -m bench.ui --serve DB``, so client and server do not share
a core). Each round, in turn, sends the same number of requests, one at a
time, to:

* ``GET /healthz``: the HTTP floor (no store, no template);
* ``GET /runs?limit=50``: the JSON listing of the same page;
* ``GET /ui``, ``/ui?live=1`` (what the page polls), ``/ui?status=failed``,
  ``/ui?graph_id=...`` and one run's page;
* the same ``/ui`` pages on a second server (a copy of the file) whose status counts
  are never shared between requests: what a first view costs (the first
  server shares a filter's counts for 1.5 s, as between polling tabs);

and, in this process, the same SQL the first ``/ui`` page runs (the status
counts, the first page of runs, the graph ids), written inline with sqlite3
on the same file: the store's floor. The table gives the median latency
over rounds; the page weight rows give the bytes of each page and of the
assets it loads (gzipped as served).

Run alone: ``python -m bench.ui [--runs N] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time

import trio

from ._common import Row, row, skipped, web_available

CASES = (
    ("healthz (HTTP floor)", "/healthz"),
    ("GET /runs?limit=50 (JSON)", "/runs?limit=50"),
    ("GET /ui", "/ui"),
    ("GET /ui?live=1 (the poll)", "/ui?live=1"),
    ("GET /ui?status=failed", "/ui?status=failed"),
    ("GET /ui?graph_id=graph-0007", "/ui?graph_id=graph-0007"),
    ("GET /ui/runs/{id}", "/ui/runs/{run}"),
)
UNCACHED = ("GET /ui", "GET /ui?live=1 (the poll)", "GET /ui?graph_id=graph-0007")
"""Pages also measured on a second server whose status counts are never shared
(every request counts), as a first view is."""


async def _serve(db: str, share_counts: bool) -> None:
    from trioflow import open_engine, open_store_from_url
    from trioflow.web import Settings
    from trioflow.web.app import create_app
    from trioflow.web.serve import serve

    if not share_counts:
        from trioflow.web import ui

        ui.COUNTS_TTL_S = 0.0
    store = open_store_from_url(f"sqlite:///{db}")
    async with open_engine(store=store) as engine:
        app = create_app(engine, Settings(access_log=False))
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve(
                    app, host="127.0.0.1", port=0, graceful_timeout=2.0, task_status=task_status
                )
            )
            print(f"LISTENING {binds[0]}", flush=True)


def _inline(db: str) -> None:
    """The SQL of the first /ui page, written inline (the store's floor)."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        conn.execute("SELECT * FROM runs ORDER BY created_at DESC, run_id DESC LIMIT 51").fetchall()
        conn.execute("SELECT graph_id FROM graphs ORDER BY graph_id LIMIT 201").fetchall()
    finally:
        conn.close()


async def _measure(db: str, url: str, uncached_url: str, quick: bool) -> list[Row]:
    import httpx

    rounds = 5 if quick else 15
    per_round = 5 if quick else 10
    samples: dict[str, list[float]] = {label: [] for label, _ in CASES}
    for label in UNCACHED:
        samples[f"{label}, counts not shared"] = []
    samples["inline SQL of GET /ui (sqlite3)"] = []
    weights: dict[str, tuple[int, int]] = {}
    async with (
        httpx.AsyncClient(base_url=url, timeout=60) as client,
        httpx.AsyncClient(base_url=uncached_url, timeout=60) as uncached,
    ):
        first = (await client.get("/runs?limit=1")).json()["items"][0]["run_id"]
        for label, path in CASES:  # warm: templates compiled, assets read, caches filled
            response = await client.get(path.format(run=first))
            assert response.status_code == 200, (path, response.status_code)
            wire = int(response.headers.get("content-length", len(response.content)))
            weights[label] = (len(response.content), wire)
            await uncached.get(path.format(run=first))
        for _ in range(rounds):
            for label, path in CASES:
                times = []
                for _ in range(per_round):
                    start = time.perf_counter()
                    response = await client.get(path.format(run=first))
                    times.append(time.perf_counter() - start)
                    assert response.status_code == 200
                samples[label].append(statistics.median(times) * 1e3)
                if label not in UNCACHED:
                    continue
                times = []
                for _ in range(per_round):
                    start = time.perf_counter()
                    response = await uncached.get(path.format(run=first))
                    times.append(time.perf_counter() - start)
                    assert response.status_code == 200
                samples[f"{label}, counts not shared"].append(statistics.median(times) * 1e3)
            times = []
            for _ in range(per_round):
                start = time.perf_counter()
                _inline(db)
                times.append(time.perf_counter() - start)
            samples["inline SQL of GET /ui (sqlite3)"].append(statistics.median(times) * 1e3)
        page = (await client.get("/ui")).text
        assets = {}
        for marker in ('href="/static/ui.css', 'src="/static/ui.js'):
            start = page.index(marker) + len(marker.split('"')[0]) + 2
            link = page[start - 1 : page.index('"', start)]
            response = await client.get(link, headers={"Accept-Encoding": "gzip"})
            assets[link.split("?")[0]] = int(response.headers["content-length"])
    rows: list[Row] = []
    case = f"sqlite, {RUNS_LABEL}"
    floor = statistics.median(samples["inline SQL of GET /ui (sqlite3)"])
    for label, values in samples.items():
        target = "fast at 100k" if label.startswith("GET /ui") and "?" not in label else ""
        note = ""
        if label.startswith("GET /ui") and "runs/" not in label:
            note = f"{statistics.median(values) / floor:.2f}x the inline SQL of /ui"
        rows.append(row("ui", case, label, "ms", values, target=target, note=note))
    for label, (size, wire) in weights.items():
        if label.startswith("GET /ui"):
            rows.append(
                row(
                    "ui",
                    case,
                    f"{label}: HTML",
                    "bytes",
                    [float(size)],
                    note=f"{wire:,} bytes gzipped on the wire",
                )
            )
    for path, size in assets.items():
        rows.append(row("ui", case, f"{path} (gzip)", "bytes", [float(size)]))
    return rows


RUNS_LABEL = ""


async def _fill(db: str, runs: int) -> None:
    from trioflow.stores.sqlite import SQLiteStore

    from .bench_listing import _fill as fill

    store = SQLiteStore(db)
    await store.open()
    try:
        took = await fill(store, runs)
    finally:
        await store.aclose()
    print(f"  {runs:,} runs stored in {took:.1f}s", file=sys.stderr)


def _run(runs: int, quick: bool) -> list[Row]:
    global RUNS_LABEL
    RUNS_LABEL = f"{runs:,} runs"
    from .service import Server

    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "ui.db")
        trio.run(_fill, db, runs)
        # One engine owns a store file: the second server gets a copy.
        copy = os.path.join(tmp, "ui-copy.db")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                shutil.copyfile(db + suffix, copy + suffix)
        with (
            Server("bench.ui", (db,)) as server,
            Server("bench.ui", (copy, "--no-shared-counts")) as uncached,
        ):
            return trio.run(_measure, db, server.url, uncached.url, quick)


def run(quick: bool = False) -> list[Row]:
    """Rows for ``python -m bench`` (the table)."""
    if not web_available():
        return [skipped("ui", "-", "the web extra is not installed")]
    return _run(10_000 if quick else 100_000, quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="DB", help=argparse.SUPPRESS)
    parser.add_argument("--no-shared-counts", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.serve:
        trio.run(_serve, args.serve, not args.no_shared_counts)
        return
    from .__main__ import print_table

    print_table(_run(args.runs, args.quick))


if __name__ == "__main__":
    main()
