"""What the metrics observer costs per step: a 1,000-node chain on the memory store,
without an observer and with the service's Prometheus one, rounds interleaved.

Run alone: ``python -m bench.observe [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from ._common import Row, chain_graph, row

STEPS = 1000


async def _per_step(observed: bool, runs: int) -> float:
    from trioflow import open_engine
    from trioflow.web.metrics import Metrics

    async with open_engine() as engine:
        graph = chain_graph(STEPS)
        await engine.register_graph(graph)
        if observed:
            engine.observe(Metrics(engine))
        await engine.wait((await engine.start_run(graph["id"])).run_id)  # warm
        t0 = time.perf_counter()
        for _ in range(runs):
            await engine.wait((await engine.start_run(graph["id"])).run_id)
        return (time.perf_counter() - t0) / (runs * STEPS) * 1e6


def run(quick: bool = False) -> list[Row]:
    rounds = 3 if quick else 9
    runs = 2 if quick else 5
    samples: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for observed in (False, True):
            samples[observed].append(trio.run(_per_step, observed, runs))
    off, on = statistics.median(samples[False]), statistics.median(samples[True])
    return [
        row("observe", "chain, memory store, no observer", "per step", "µs", samples[False]),
        row(
            "observe",
            "chain, memory store, Prometheus observer",
            "per step",
            "µs",
            samples[True],
            note=f"{on - off:+.2f} µs per step ({(on - off) / off * 100:+.0f}%): a step "
            "histogram and a commit histogram observed per step",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from .__main__ import print_table

    print_table(run(args.quick))


if __name__ == "__main__":
    main()
