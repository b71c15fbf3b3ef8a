"""Many parked runs in one process: memory per run, time to start and to cancel them all.

Each sample is a fresh child process (``python -m bench.concurrency --child N``)
so the RSS baseline is clean and the allocator holds nothing from a previous
sample. The child opens an engine on the memory store with
``EngineLimits(max_active_runs=200_000, max_running=200_000)``, registers a
one-node graph running ``tools.sleep`` and then:

* starts N runs with ``{"sleep_s": 3600}``, one ``await engine.start_run`` after
  another (as a program holding many runs would), then waits until every
  task is blocked, i.e. every run is parked in ``trio.sleep``: *start*;
* reads VmRSS before and after (after ``gc.collect()``): *memory per run* is
  the growth divided by N. It includes what the memory store keeps for each
  run (its record and its three log entries), the actor and its task;
* cancels them all with ``engine.cancel_many(ids)``, which signals every run
  and returns once each is recorded ``cancelled``: *cancel*.

Run alone: ``python -m bench.concurrency [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import trio
import trio.testing

from ._common import ROOT, Row, row, rss_bytes

PARK_GRAPH = {
    "id": "bench-park",
    "name": "one sleeping node",
    "start_node": "park",
    "nodes": [{"id": "park", "callable": "tools.sleep"}],
    "edges": [],
}


async def _child(n: int) -> dict[str, Any]:
    from trioflow import EngineLimits, RunStatus, open_engine

    limits = EngineLimits(max_active_runs=200_000, max_running=200_000)
    async with open_engine(limits=limits) as engine:
        await engine.register_graph(PARK_GRAPH)
        # Warm the code paths and the allocator's small-object pools once.
        warm = [await engine.start_run(PARK_GRAPH["id"], {"sleep_s": 3600}) for _ in range(200)]
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            for rec in warm:
                nursery.start_soon(engine.cancel, rec.run_id)
        await engine.delete_runs(older_than_s=-1)
        gc.collect()
        rss0 = rss_bytes()

        t0 = time.perf_counter()
        ids = []
        for _ in range(n):
            rec = await engine.start_run(PARK_GRAPH["id"], {"sleep_s": 3600})
            ids.append(rec.run_id)
        t_calls = time.perf_counter() - t0
        await trio.testing.wait_all_tasks_blocked()
        t_parked = time.perf_counter() - t0
        sample = await engine.get_run(ids[-1])
        if engine.active_runs != n or sample.status is not RunStatus.RUNNING:
            raise RuntimeError(f"{engine.active_runs} active, last run {sample.status}")
        gc.collect()
        rss1 = rss_bytes()

        t0 = time.perf_counter()
        finals = await engine.cancel_many(ids)
        t_cancel = time.perf_counter() - t0
        if len(finals) != n:
            raise RuntimeError(f"cancel_many returned {len(finals)} of {n} runs")
        last = await engine.get_run(ids[-1])
        if engine.active_runs != 0 or last.status is not RunStatus.CANCELLED:
            raise RuntimeError(f"{engine.active_runs} still active, last run {last.status}")
        return {
            "n": n,
            "start_calls_s": t_calls,
            "start_s": t_parked,
            "cancel_s": t_cancel,
            "rss_per_run_b": (rss1 - rss0) / n,
            "rss0_mb": rss0 / 2**20,
            "rss1_mb": rss1 / 2**20,
        }


def _sample(n: int, timeout_s: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.concurrency", "--child", str(n)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child for {n} runs failed:\n{proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def run(quick: bool = False) -> list[Row]:
    # A 100,000-run sample takes over a minute on a loaded 2-core machine:
    # one in a full run, none in a quick one.
    plan = [(10_000, 2)] if quick else [(10_000, 3), (100_000, 1)]
    rows: list[Row] = []
    for n, reps in plan:
        samples = [_sample(n, timeout_s=300) for _ in range(reps)]
        per_run_kb = [s["rss_per_run_b"] / 1024 for s in samples]
        start = [s["start_s"] for s in samples]
        cancel = [s["cancel_s"] for s in samples]
        label = f"{n:,} parked runs"
        calls = statistics.median(s["start_calls_s"] for s in samples)
        rss = f"RSS {samples[0]['rss0_mb']:.0f} -> {samples[0]['rss1_mb']:.0f} MB"
        rows.append(
            row(
                "concurrency",
                label,
                "memory per run",
                "KB",
                per_run_kb,
                target="<= 20",
                met=statistics.median(per_run_kb) <= 20,
                note=rss,
            )
        )
        rows.append(
            row(
                "concurrency",
                label,
                "start all",
                "s",
                start,
                note=f"{n / statistics.median(start):,.0f} runs/s; the start_run "
                f"calls alone {calls:.2f} s",
            )
        )
        cancel_target = n == 100_000
        rows.append(
            row(
                "concurrency",
                label,
                "cancel all",
                "s",
                cancel,
                target="< 10" if cancel_target else "",
                met=(sorted(cancel)[len(cancel) // 2] < 10) if cancel_target else None,
                note=f"{n / sorted(cancel)[len(cancel) // 2]:,.0f} cancels/s, "
                "engine.cancel_many over all runs",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(trio.run(_child, args.child)))
        return
    from .__main__ import print_table

    print_table(run(args.quick))


if __name__ == "__main__":
    main()
