"""What a condition at its evaluation budget costs everyone else: ``/healthz`` latency.

Conditions run on the event loop, so while one evaluates no request is
served. The budget (about 10 ms) bounds that stall. This benchmark serves
the memory store from a child process (as ``bench.service`` does), and
measures the latency of ``GET /healthz`` requests sent one after another:

* idle: nothing else runs;
* busy: one, then four runs loop on a node whose ``until_expression`` costs
  just under the budget on a large state (``sorted()`` of a list of ints
  sized so that one evaluation charges 90-99% of ``MAX_UNITS``), so the loop
  is evaluating such a condition nearly all the time.

The rows give p50, p99 and max latency of each, from the same run.

Run alone: ``python -m bench.condition_stall [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import trio

from ._common import Row, percentile, row, skipped, web_available

CONDITION = "sorted(context['xs'])[0] < -1"


def _heavy_state() -> dict[str, Any]:
    """A state on which :data:`CONDITION` charges just under the budget."""
    import random

    from trioflow.budget import MAX_UNITS, spent
    from trioflow.errors import ExpressionBudgetError
    from trioflow.expressions import compile_expression

    expression = compile_expression(CONDITION)
    rng = random.Random(7)
    best: dict[str, Any] = {"xs": [0]}
    size = 1024
    while True:
        state = {"xs": [rng.randrange(10**6) for _ in range(size)]}
        try:
            expression.evaluate(state)
        except ExpressionBudgetError:
            return best
        if spent()[0] > MAX_UNITS * 0.99:
            return best
        best = state
        size = int(size * 1.1)


def _graph() -> dict[str, Any]:
    return {
        "id": "heavy",
        "start_node": "spin",
        "max_steps": 100_000,
        "nodes": [{"id": "spin", "callable": "tools.noop"}],
        "edges": [
            {
                "from": "spin",
                "to": "spin",
                "type": "loop",
                "loop": {"max_iterations": 50_000, "until_expression": CONDITION},
            }
        ],
    }


async def _serve(state_file: str) -> None:
    from trioflow import open_engine
    from trioflow.web.app import create_app
    from trioflow.web.serve import serve

    state = _heavy_state()
    async with open_engine() as engine:
        await engine.register_graph(_graph())
        app = create_app(engine)
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve(
                    app, host="127.0.0.1", port=0, graceful_timeout=2.0, task_status=task_status
                )
            )
            await trio.Path(state_file).write_text(json.dumps(state))
            print(f"LISTENING {binds[0]}", flush=True)


async def _latencies(client: Any, seconds: float) -> list[float]:
    out: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        response = await client.get("/healthz")
        out.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    return out


async def _measure(
    url: str, state_file: str, seconds: float, levels: tuple[int, ...]
) -> dict[str, Any]:
    import httpx

    state = json.loads(await trio.Path(state_file).read_text())
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        out["idle"] = (await _latencies(client, seconds), 0.0)
        for busy in levels:
            runs = []
            for _ in range(busy):
                r = await client.post(
                    "/graph/run",
                    json={"graph_id": "heavy", "initial_state": state, "background": True},
                )
                r.raise_for_status()
                runs.append(r.json()["run_id"])
            await trio.sleep(0.5)
            before = sum([(await client.get(f"/graph/state/{r}")).json()["step"] for r in runs])
            started = time.perf_counter()
            latencies = await _latencies(client, seconds)
            after = sum([(await client.get(f"/graph/state/{r}")).json()["step"] for r in runs])
            per_step_ms = (time.perf_counter() - started) * 1000 / max(after - before, 1)
            for run_id in runs:
                await client.post(f"/graph/cancel/{run_id}")
            out[f"{busy} busy run{'s' if busy > 1 else ''}"] = (latencies, per_step_ms)
    return out


def run(quick: bool = False) -> list[Row]:
    if not web_available():
        return [skipped("condition_stall", "-", "the web extra is not installed")]
    import tempfile

    from .service import Server

    seconds = 3.0 if quick else 10.0
    with tempfile.TemporaryDirectory() as tmp:
        state_file = f"{tmp}/state.json"
        with Server("bench.condition_stall", ("--state-file", state_file)) as server:
            figures = trio.run(_measure, server.url, state_file, seconds, (1, 4))
    rows = []
    for case, (values, per_step_ms) in figures.items():
        note = f"{len(values)} requests one after another"
        if per_step_ms:
            note += (
                f"; runs looping on a condition at 90-99% of its budget, "
                f"{per_step_ms:.1f} ms of wall time per step"
            )
        for label, q in (("p50", 50.0), ("p99", 99.0), ("max", 100.0)):
            value = percentile(values, q) if q < 100 else max(values)
            rows.append(
                row(
                    "condition_stall",
                    f"GET /healthz, {case}",
                    f"{label} latency",
                    "ms",
                    [value],
                    note=note if label == "p50" else "",
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--state-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(_serve, args.state_file)
        return
    from .__main__ import print_table

    print_table(run(quick=args.quick))


if __name__ == "__main__":
    sys.exit(main())
