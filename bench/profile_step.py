"""Profile trioflow's per-step hot path with pyinstrument; a text report on stdout.

Runs the spec's code-review graph (``{"issues_open": 1}``, 9 steps) and the
1,000-node ``tools.noop`` chain back to back on the memory store (or the
SQLite store with ``--store sqlite``), the way ``bench.per_step`` does, under
pyinstrument's sampling profiler, and prints the call tree (library frames
collapsed). pyinstrument's flat view is not printed: with Trio's coroutines it
charges most time to the run loop's own frame, which misleads.

Run: ``python -m bench.profile_step [--quick] [--store memory|sqlite]``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from ._common import SPEC_INITIAL_STATE, chain_graph, load_spec_graph


async def _workload(
    spec_runs: int, chain_runs: int, store: str, tmp: Path, profiler: Any = None
) -> None:
    from trioflow import open_engine

    kwargs = {}
    if store == "sqlite":
        from trioflow.stores.sqlite import SQLiteStore

        kwargs["store"] = SQLiteStore(str(tmp / "profile.db"))
    async with open_engine(**kwargs) as engine:  # type: ignore[arg-type]
        spec = await engine.register_graph(load_spec_graph())
        chain = await engine.register_graph(chain_graph(1000))
        for graph_id in (spec.id, chain.id):  # warm up outside the profile
            await engine.wait((await engine.start_run(graph_id, SPEC_INITIAL_STATE)).run_id)
        if profiler is not None:
            profiler.start()
        for graph_id, runs in ((spec.id, spec_runs), (chain.id, chain_runs)):
            for _ in range(runs):
                record = await engine.start_run(graph_id, SPEC_INITIAL_STATE)
                await engine.wait(record.run_id)
        if profiler is not None:
            profiler.stop()


def main(argv: Sequence[str] | None = None) -> None:
    from pyinstrument import Profiler
    from pyinstrument.renderers import ConsoleRenderer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    args = parser.parse_args(argv)
    spec_runs, chain_runs = (500, 5) if args.quick else (3000, 30)
    if args.store == "sqlite":
        spec_runs, chain_runs = spec_runs // 10, max(1, chain_runs // 10)
    with tempfile.TemporaryDirectory(prefix="trioflow-profile-") as tmp:
        # Graph compilation and one run of each graph happen before the profile starts.
        profiler = Profiler(interval=0.0002, async_mode="disabled")
        trio.run(_workload, spec_runs, chain_runs, args.store, Path(tmp), profiler)
    steps = spec_runs * 9 + chain_runs * 1000
    print(
        f"# pyinstrument: {spec_runs} spec-graph runs + {chain_runs} 1,000-node chain runs "
        f"({steps:,} steps), {args.store} store\n"
    )
    print(
        profiler.output(
            ConsoleRenderer(
                unicode=True, color=False, show_all=False, short_mode=False, time="percent_of_total"
            )
        )
    )


if __name__ == "__main__":
    main()
