"""What the metrics observer and OpenTelemetry tracing cost per step: a 1,000-node chain
on the memory store, with each hook off and on, rounds interleaved.

Cases: no hook; the service's Prometheus observer; tracing turned on then
off again (the same code path as no hook: its difference is the noise);
tracing on with OpenTelemetry's no-op tracer, with the SDK sampling every
run out (a run span that is not recorded gets no step spans), and with the
SDK recording every span into an in-memory exporter.

Run alone: ``python -m bench.observe [--quick]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from typing import Any

import trio

from ._common import Row, chain_graph, row, skipped

STEPS = 1000

#: (case, label) in the order they run in every round.
CASES = (
    ("none", "no observer, tracing off"),
    ("prometheus", "Prometheus observer"),
    ("off", "tracing turned on, then off"),
    ("noop", "tracing on, OpenTelemetry no-op tracer"),
    ("sampled_out", "tracing on, SDK sampling every span out"),
    ("recording", "tracing on, SDK recording into memory"),
)
TRACING = {"off", "noop", "sampled_out", "recording"}


def _otel_available() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.sdk.trace") is not None
    except ImportError:
        return False


def _tracer(case: str) -> tuple[Any, Any]:
    """(the tracer provider for ``case``, its in-memory exporter or None)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    if case == "noop":
        return trace.NoOpTracerProvider(), None
    # (not shut down at exit: the atexit hook would keep every provider alive)
    if case == "sampled_out":
        return TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False), None
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def _per_step(case: str, runs: int) -> float:
    from trioflow import open_engine
    from trioflow.web.metrics import Metrics

    async with open_engine() as engine:
        graph = chain_graph(STEPS)
        await engine.register_graph(graph)
        exporter = None
        if case == "prometheus":
            engine.observe(Metrics(engine))
        elif case in TRACING:
            provider, exporter = _tracer("recording" if case == "off" else case)
            engine.trace(provider)
            if case == "off":
                engine.trace(None)
        await engine.wait((await engine.start_run(graph["id"])).run_id)  # warm
        elapsed = 0.0
        for _ in range(runs):
            if exporter is not None:
                exporter.clear()  # (outside the timing) memory stays bounded
            t0 = time.perf_counter()
            await engine.wait((await engine.start_run(graph["id"])).run_id)
            elapsed += time.perf_counter() - t0
        if exporter is not None and case == "recording":
            # One run span and one step span per step: the spans were made.
            assert len(exporter.get_finished_spans()) == STEPS + 1
            exporter.clear()
        return elapsed / (runs * STEPS) * 1e6


def run(quick: bool = False) -> list[Row]:
    rounds = 3 if quick else 9
    runs = 2 if quick else 10
    cases = [c for c, _ in CASES if c not in TRACING or _otel_available()]
    samples: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            samples[case].append(trio.run(_per_step, case, runs))
    base = statistics.median(samples["none"])

    def delta(case: str) -> str:
        d = statistics.median(samples[case]) - base
        return f"{d:+.2f} µs per step ({d / base * 100:+.0f}%)"

    notes = {
        "none": "the baseline: one attribute test per step for each hook",
        "prometheus": f"{delta('prometheus')}: a step histogram and a commit histogram "
        "observed per step",
        "off": f"{delta('off')}: the baseline's code path again (noise)",
        "noop": f"{delta('noop')}: the run span is not recorded, so its steps get no spans",
        "sampled_out": f"{delta('sampled_out')}: the sampler drops the run span, so its "
        "steps get no spans",
        "recording": f"{delta('recording')}: every span recorded and exported "
        "(SimpleSpanProcessor, in-memory exporter)",
    }
    rows = [
        row("observe", f"chain, memory store, {label}", "per step", "µs", samples[case])
        for case, label in CASES
        if case in samples
    ]
    for r, case in zip(rows, [c for c, _ in CASES if c in samples], strict=True):
        r.note = notes[case]
    if not _otel_available():
        rows.append(skipped("observe", "chain, memory store, tracing", "opentelemetry-sdk"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from .__main__ import print_table

    print_table(run(args.quick))


if __name__ == "__main__":
    main()
