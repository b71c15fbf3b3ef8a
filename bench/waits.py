"""Runs waiting for input: what 100,000 of them cost a process, and the time to resume them all.

A waiting run holds no task: it is a row in the store. Each sample is a fresh
child process (``python -m bench.waits --child STORE N``) with a clean RSS
baseline. The child opens an engine (memory store, or SQLite in a temporary
directory), registers a two-node graph whose first node waits for input,
and then:

* starts N runs, 256 at a time, and waits until each is ``waiting``: *park*
  (time) and *memory per run*: the growth of VmRSS divided by N, after
  ``gc.collect()``. With SQLite this is what the engine keeps per waiting
  run (nothing but the store's page cache); with the memory store it
  includes the store itself (each run's record and its five log entries);
* resumes every run (``Engine.resume``, 256 at a time) and waits until all
  are completed: *resume all*.

Run alone: ``python -m bench.waits [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from typing import Any

import trio

from ._common import ROOT, Row, row, rss_bytes

WAIT_GRAPH = {
    "id": "bench-wait",
    "start_node": "ask",
    "nodes": [
        {
            "id": "ask",
            "wait": {
                "prompt": "go?",
                "input_schema": {
                    "type": "object",
                    "properties": {"go": {"type": "boolean"}},
                    "required": ["go"],
                },
            },
        },
        {"id": "done", "callable": "tools.noop"},
    ],
    "edges": [{"from": "ask", "to": "done"}],
}
BATCH = 256


async def _in_batches(items: list[Any], work: Any) -> None:
    for start in range(0, len(items), BATCH):
        async with trio.open_nursery() as nursery:
            for item in items[start : start + BATCH]:
                nursery.start_soon(work, item)


async def _child(store_kind: str, n: int) -> dict[str, Any]:
    from trioflow import EngineLimits, RunStatus, open_engine, open_store_from_url

    limits = EngineLimits(max_active_runs=200_000, max_running=200_000)
    with tempfile.TemporaryDirectory() as tmp:
        url = "memory://" if store_kind == "memory" else f"sqlite:///{tmp}/waits.db"
        async with open_engine(store=open_store_from_url(url), limits=limits) as engine:
            await engine.register_graph(WAIT_GRAPH)
            ids: list[str] = []

            async def park(_: int) -> None:
                record = await engine.start_run("bench-wait", {})
                await engine.wait_stop(record.run_id)
                ids.append(record.run_id)

            await _in_batches(list(range(200)), park)  # warm the code paths
            gc.collect()
            rss0 = rss_bytes()
            ids.clear()
            t0 = time.perf_counter()
            await _in_batches(list(range(n)), park)
            t_park = time.perf_counter() - t0
            if engine.active_runs != 0:
                raise RuntimeError(f"{engine.active_runs} runs still hold a task")
            gc.collect()
            rss1 = rss_bytes()

            async def resume(run_id: str) -> None:
                await engine.resume(run_id, {"go": True})
                final = await engine.wait(run_id)
                if final.status is not RunStatus.COMPLETED:
                    raise RuntimeError(f"run {run_id} ended {final.status}")

            t0 = time.perf_counter()
            await _in_batches(ids, resume)
            t_resume = time.perf_counter() - t0
        return {
            "n": n,
            "park_s": t_park,
            "resume_s": t_resume,
            "rss_per_run_b": (rss1 - rss0) / n,
            "rss0_mb": rss0 / 2**20,
            "rss1_mb": rss1 / 2**20,
        }


def _sample(store_kind: str, n: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.waits", "--child", store_kind, str(n)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child for {n} {store_kind} runs failed:\n{proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def run(quick: bool = False) -> list[Row]:
    n = 10_000 if quick else 100_000
    rows: list[Row] = []
    for store_kind in ("sqlite", "memory"):
        sample = _sample(store_kind, n)
        case = f"{n:,} waiting runs, {store_kind}"
        rows.append(
            row(
                "waits",
                case,
                "memory per run",
                "KB",
                [sample["rss_per_run_b"] / 1000],
                target="< 1" if store_kind == "sqlite" else "",
                met=sample["rss_per_run_b"] < 1000 if store_kind == "sqlite" else None,
                note=f"RSS {sample['rss0_mb']:.0f} -> {sample['rss1_mb']:.0f} MB; "
                "no task per waiting run",
            )
        )
        park_rate = n / sample["park_s"]
        rows.append(
            row(
                "waits",
                case,
                "park all",
                "s",
                [sample["park_s"]],
                note=f"{park_rate:,.0f} runs/s to start and reach the wait",
            )
        )
        resume_rate = n / sample["resume_s"]
        rows.append(
            row(
                "waits",
                case,
                "resume all",
                "s",
                [sample["resume_s"]],
                note=f"{resume_rate:,.0f} resumes/s, each run to completion",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("STORE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(trio.run(_child, args.child[0], int(args.child[1]))))
        return
    from .__main__ import print_table

    print_table(run(quick=args.quick))


if __name__ == "__main__":
    sys.exit(main())
