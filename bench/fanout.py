"""Fan-out: map and parallel nodes beside the sequential chain and LangGraph's ``Send``.

Three workloads, all contenders in this one process and interleaved round by
round, so that a ratio compares figures taken under the same noise:

* ``map N items`` for N in 10, 100 (and 1,000 in the full run): a ``map``
  node over ``state['items']`` (N integers) whose branch is one ``tools.noop``
  node, ``max_concurrency`` left at its default (16). µs per branch step =
  the fan-out node's wall time (its ``fanout_started`` entry's ``ts`` to its
  ``fanout_completed`` entry's) / N; the run's wall time / N is in the notes.
  Beside it, in the same rounds: the same map with the items built by the
  expression (``[0] * state['n']``), so that the state each branch copies is
  small; a chain of N ``tools.noop`` nodes (``_common.chain_graph``, µs per
  step = run wall time / N, as in ``bench/per_step.py``); memory store and
  SQLite store (a file in a temporary directory, the shipped defaults; its
  1,000-item map, seconds a run, takes 3 samples).
* ``10x1000 parallel``: a ``parallel`` node of 10 branches, each one
  ``tools.noop`` node looping on itself (``max_iterations`` 999: 1,000
  steps), 10,000 branch steps in all (the graph's ``max_steps`` is 10,010;
  ``EngineLimits.max_graph_steps`` is 100,000 by default), memory store; beside
  it one ``tools.noop`` node looping on itself 10,000 times (the same steps
  in sequence). Its memory (RSS growth and tracemalloc peak) is taken in a
  fresh child process per contender.
* LangGraph 1.2 ``StateGraph``, synchronous ``invoke``, without a
  checkpointer and with ``InMemorySaver`` (a new ``thread_id`` per run, the
  thread deleted after it): a conditional edge from ``START`` returns one
  ``Send("work", {"item": i})`` per item, ``work`` returns ``{}``; for the
  parallel case 10 ``Send("step", {"n": 0, ...})`` and ``step`` returns
  ``Command(goto=Send("step", {"n": n + 1, ...}))`` until its 1,000th execution
  (LangGraph has no per-branch loop: a branch that goes on is a new ``Send``
  each superstep, and the 10 branches advance in lockstep, one superstep per
  step, with the recursion limit set above 1,000).

Run alone: ``python -m bench.fanout [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import trio

from ._common import (
    ROOT,
    Row,
    chain_graph,
    emit_rows,
    fmt,
    parse_rows,
    ratio,
    row,
    rss_bytes,
    skipped,
    sqlite_available,
)

BENCH = "fanout"
MAP_SIZES = (10, 100, 1000)
QUICK_MAP_SIZES = (10, 100)
#: Samples of the SQLite store's 1,000-item map (it takes seconds a run there).
SQLITE_ROUNDS_AT_1000 = 3
PAR_BRANCHES = 10
PAR_STEPS = 1000
PAR_TOTAL = PAR_BRANCHES * PAR_STEPS
#: Aim for samples of about this many seconds (several runs per sample when runs are short).
SAMPLE_S = 0.04
MEMORY_CONTENDERS = ("trioflow parallel", "trioflow loop", "LangGraph plain", "LangGraph saver")


# -- graphs ------------------------------------------------------------------------


def map_graph(n: int, small_state: bool = False) -> dict[str, Any]:
    """A map over ``n`` items whose branch is one ``tools.noop`` node."""
    return {
        "id": f"bench-map-{n}{'-small' if small_state else ''}",
        "name": f"{n}-item map of noop branches",
        "start_node": "each",
        "max_steps": n + 10,
        "nodes": [
            {
                "id": "each",
                "map": {
                    "items": "[0] * state['n']" if small_state else "state['items']",
                    "branch": {
                        "start_node": "work",
                        "nodes": [{"id": "work", "callable": "tools.noop"}],
                        "edges": [],
                    },
                },
            }
        ],
        "edges": [],
    }


def map_initial(n: int, small_state: bool = False) -> dict[str, Any]:
    return {"n": n} if small_state else {"items": list(range(n))}


def _self_loop(steps: int) -> dict[str, Any]:
    return {
        "start_node": "work",
        "nodes": [{"id": "work", "callable": "tools.noop"}],
        "edges": [
            {
                "from": "work",
                "to": "work",
                "type": "loop",
                "loop": {"max_iterations": steps - 1},
            }
        ],
    }


def parallel_graph(branches: int = PAR_BRANCHES, steps: int = PAR_STEPS) -> dict[str, Any]:
    """A parallel node of ``branches`` branches, each a noop looping ``steps`` times."""
    return {
        "id": f"bench-parallel-{branches}x{steps}",
        "name": f"{branches} parallel branches of {steps} noop steps",
        "start_node": "fan",
        "max_steps": branches * steps + 10,
        "nodes": [
            {
                "id": "fan",
                "parallel": {
                    "branches": [{"id": f"b{i}", **_self_loop(steps)} for i in range(branches)]
                },
            }
        ],
        "edges": [],
    }


def loop_graph(steps: int = PAR_TOTAL) -> dict[str, Any]:
    """One noop looping on itself: ``steps`` steps in sequence."""
    return {
        "id": f"bench-loop-{steps}",
        "name": f"{steps}-step noop loop",
        "max_steps": steps + 10,
        **_self_loop(steps),
    }


# -- LangGraph ---------------------------------------------------------------------


class MapState(TypedDict, total=False):
    items: list[int]


def _lg_fan(state: MapState) -> list[Any]:
    from langgraph.types import Send

    return [Send("work", {"item": i}) for i in state["items"]]


def _lg_work(arg: dict[str, Any]) -> dict[str, Any]:
    return {}


def langgraph_map(checkpointer: Any = None) -> Any:
    from langgraph.graph import END, START, StateGraph

    builder = StateGraph(MapState)
    builder.add_node("work", _lg_work)
    builder.add_conditional_edges(START, _lg_fan, ["work"])
    builder.add_edge("work", END)
    return builder.compile(checkpointer=checkpointer)


def _lg_fan_branches(state: MapState) -> list[Any]:
    from langgraph.types import Send

    steps = len(state["items"])
    return [Send("step", {"n": 0, "steps": steps}) for _ in range(PAR_BRANCHES)]


def _lg_step(arg: dict[str, Any]) -> Any:
    from langgraph.types import Command, Send

    n = arg["n"] + 1
    if n < arg["steps"]:
        return Command(goto=Send("step", {"n": n, "steps": arg["steps"]}))
    return {}


def langgraph_parallel(checkpointer: Any = None) -> Any:
    """10 branches of ``len(items)`` steps each (the steps ride in the input)."""
    from langgraph.graph import START, StateGraph

    builder = StateGraph(MapState)
    builder.add_node("step", _lg_step, destinations=("step",))
    builder.add_conditional_edges(START, _lg_fan_branches, ["step"])
    return builder.compile(checkpointer=checkpointer)


def _lg_runner(
    graph: Any, saver: Any, items: list[int], limit: int
) -> Callable[[], tuple[float, None]]:
    def once() -> tuple[float, None]:
        config: dict[str, Any] = {"recursion_limit": limit}
        thread = uuid.uuid4().hex
        if saver is not None:
            config["configurable"] = {"thread_id": thread}
        t0 = time.perf_counter()
        graph.invoke({"items": items}, config)
        wall = time.perf_counter() - t0
        if saver is not None:
            saver.delete_thread(thread)
        return wall, None

    return once


# -- trioflow ----------------------------------------------------------------------


async def _node_seconds(engine: Any, run_id: str, last_seq: int) -> float:
    """The fan-out node's wall time: its fanout_started entry to its fanout_completed entry."""
    head = await engine.read_log(run_id, after=0, limit=8)
    tail = await engine.read_log(run_id, after=max(0, last_seq - 8), limit=8)
    started = next(e.ts for e in head if e.event == "fanout_started")
    completed = next(e.ts for e in tail if e.event == "fanout_completed")
    return completed - started


def _trioflow_runner(
    engine: Any, graph_id: str, initial: dict[str, Any], steps: int, fanout: bool
) -> Callable[[], Awaitable[tuple[float, float | None]]]:
    async def once() -> tuple[float, float | None]:
        t0 = time.perf_counter()
        run = await engine.start_run(graph_id, initial)
        final = await engine.wait(run.run_id)
        wall = time.perf_counter() - t0
        if final.status != "completed" or final.step != steps:
            raise RuntimeError(f"bench run ended {final.status} after {final.step} steps")
        node = await _node_seconds(engine, run.run_id, final.last_seq) if fanout else None
        return wall, node

    return once


# -- the harness -------------------------------------------------------------------


@dataclass
class Contender:
    case: str
    name: str
    #: Steps a run takes: branch steps for a fan-out, node executions for a chain or loop.
    steps: int
    once: Callable[[], Any]  # -> (wall s, fan-out node s or None), maybe awaitable
    rounds: int
    tidy: Callable[[], Awaitable[None]] | None = None
    per_sample: int = 1
    wall: list[float] = field(default_factory=list)  # µs per step
    node: list[float] = field(default_factory=list)  # µs per branch step, the fan-out node
    run_s: list[float] = field(default_factory=list)  # s per run

    async def call(self) -> tuple[float, float | None]:
        result = self.once()
        if isinstance(result, Awaitable):
            result = await result
        return result  # type: ignore[no-any-return]

    async def calibrate(self) -> None:
        await self.call()  # warm caches, compile, open files
        gc.collect()
        wall, node = await self.call()
        self.per_sample = max(1, min(2000, int(SAMPLE_S / max(wall, 1e-7))))
        if self.per_sample == 1:  # a slow contender's timed warm-up run is already a sample
            self._record(wall, node or 0.0, 1)
        if self.tidy is not None:
            await self.tidy()

    def _record(self, walls: float, nodes: float, n: int) -> None:
        self.wall.append(walls / (n * self.steps) * 1e6)
        self.run_s.append(walls / n)
        if nodes:
            self.node.append(nodes / (n * self.steps) * 1e6)

    async def sample(self) -> None:
        gc.collect()
        walls = nodes = 0.0
        for _ in range(self.per_sample):
            wall, node = await self.call()
            walls += wall
            nodes += node or 0.0
        self._record(walls, nodes, self.per_sample)
        if self.tidy is not None:
            await self.tidy()


async def _measure(contenders: list[Contender]) -> None:
    for c in contenders:
        await c.calibrate()
    for _ in range(max(c.rounds for c in contenders)):
        for c in contenders:
            if len(c.wall) < c.rounds:
                await c.sample()


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


async def _run_all(quick: bool, tmp: Path) -> list[Row]:
    from langgraph.checkpoint.memory import InMemorySaver

    from trioflow import EngineLimits, open_engine

    have_sqlite = sqlite_available()
    if have_sqlite:
        from trioflow.stores.sqlite import SQLiteStore
    rounds = 3 if quick else 7
    sizes = QUICK_MAP_SIZES if quick else MAP_SIZES
    limits = EngineLimits()
    contenders: list[Contender] = []
    async with open_engine(limits=limits) as mem:
        sqlite_cm = (
            open_engine(store=SQLiteStore(str(tmp / "trioflow.db")), limits=limits)
            if have_sqlite
            else None
        )
        sql = await sqlite_cm.__aenter__() if sqlite_cm is not None else None
        try:
            engines = [("memory", mem)] + ([("sqlite", sql)] if sql is not None else [])

            def tidy(engine: Any) -> Callable[[], Awaitable[None]]:
                async def delete() -> None:
                    await engine.delete_runs(older_than_s=0)

                return delete

            for n in sizes:
                case = f"map {n} items"
                for store, engine in engines:
                    store_rounds = rounds
                    if store == "sqlite" and n >= 1000:
                        store_rounds = SQLITE_ROUNDS_AT_1000
                    variants = [False, True] if store == "memory" else [False]
                    for small in variants:
                        graph = await engine.register_graph(map_graph(n, small))
                        contenders.append(
                            Contender(
                                case,
                                f"trioflow {store}{', small state' if small else ''}",
                                n,
                                _trioflow_runner(
                                    engine, graph.id, map_initial(n, small), n + 1, True
                                ),
                                store_rounds,
                                tidy(engine),
                            )
                        )
                    graph = await engine.register_graph(chain_graph(n, f"bench-chain-{n}"))
                    contenders.append(
                        Contender(
                            case,
                            f"chain of {n}: trioflow {store}",
                            n,
                            _trioflow_runner(engine, graph.id, {}, n, False),
                            store_rounds,
                            tidy(engine),
                        )
                    )
                items = list(range(n))
                saver = InMemorySaver()
                contenders += [
                    Contender(
                        case,
                        "LangGraph Send plain",
                        n,
                        _lg_runner(langgraph_map(), None, items, 25),
                        rounds,
                    ),
                    Contender(
                        case,
                        "LangGraph Send InMemorySaver",
                        n,
                        _lg_runner(langgraph_map(saver), saver, items, 25),
                        rounds,
                    ),
                ]
            case = f"{PAR_BRANCHES}x{PAR_STEPS} parallel"
            graph = await mem.register_graph(parallel_graph())
            loop = await mem.register_graph(loop_graph())
            steps_in = list(range(PAR_STEPS))
            saver = InMemorySaver()
            limit = PAR_STEPS + 10
            contenders += [
                Contender(
                    case,
                    "trioflow memory",
                    PAR_TOTAL,
                    _trioflow_runner(mem, graph.id, {}, PAR_TOTAL + 1, True),
                    rounds,
                    tidy(mem),
                ),
                Contender(
                    case,
                    f"{PAR_TOTAL:,}-step loop: trioflow memory",
                    PAR_TOTAL,
                    _trioflow_runner(mem, loop.id, {}, PAR_TOTAL, False),
                    rounds,
                    tidy(mem),
                ),
                Contender(
                    case,
                    "LangGraph Send plain",
                    PAR_TOTAL,
                    _lg_runner(langgraph_parallel(), None, steps_in, limit),
                    rounds,
                ),
                Contender(
                    case,
                    "LangGraph Send InMemorySaver",
                    PAR_TOTAL,
                    _lg_runner(langgraph_parallel(saver), saver, steps_in, limit),
                    rounds,
                ),
            ]
            await _measure(contenders)
        finally:
            if sqlite_cm is not None:
                await sqlite_cm.__aexit__(None, None, None)
    rows = _rows(contenders, sizes)
    if not have_sqlite:
        rows.append(skipped(BENCH, "map: trioflow sqlite", "core/stores/sqlite.py not present"))
    return rows


def _rows(contenders: list[Contender], sizes: tuple[int, ...]) -> list[Row]:
    by = {(c.case, c.name): c for c in contenders}

    def wall(case: str, name: str) -> float | None:
        c = by.get((case, name))
        return _med(c.wall) if c is not None else None

    rows: list[Row] = []
    for c in contenders:
        label = f"{c.case}: {c.name}"
        is_map = c.case.startswith("map ")
        if c.node:  # a trioflow fan-out: the node's time per branch step
            store = "sqlite" if "sqlite" in c.name else "memory"
            node = _med(c.node)
            if is_map:
                n = c.steps
                chain = wall(c.case, f"chain of {n}: trioflow {store}")
                notes = [
                    f"{ratio(node, chain)} chain {store} per step",
                    f"run wall {fmt(_med(c.wall))} µs/step ({ratio(_med(c.wall), chain)} chain)",
                ]
                if store == "memory":
                    notes.append(f"{ratio(node, wall(c.case, 'LangGraph Send plain'))} Send plain")
            else:
                loop = wall(c.case, f"{PAR_TOTAL:,}-step loop: trioflow memory")
                notes = [
                    f"{ratio(node, loop)} the sequential loop per step",
                    f"{ratio(node, wall(c.case, 'LangGraph Send plain'))} Send plain",
                    f"{ratio(node, wall(c.case, 'LangGraph Send InMemorySaver'))} Send saver",
                ]
            rows.append(row(BENCH, label, "per branch step", "µs", c.node, note="; ".join(notes)))
        else:
            notes = []
            if "LangGraph" in c.name:
                what = "per item" if is_map else "per branch step"
            else:
                what = "per step"
            if "LangGraph" in c.name and "InMemorySaver" in c.name:
                notes.append(f"{ratio(_med(c.wall), wall(c.case, 'LangGraph Send plain'))} plain")
            if "LangGraph" in c.name:
                notes.append("invoke wall / " + ("items" if is_map else "branch steps"))
            else:
                notes.append("run wall / steps")
            rows.append(row(BENCH, label, what, "µs", c.wall, note="; ".join(notes)))
        if not is_map:
            rows.append(row(BENCH, label, "wall", "s", c.run_s, note="one run"))
    # How the map's per-step cost grows with its size, relative to the chain's.
    for name, store in (
        ("trioflow memory", "memory"),
        ("trioflow memory, small state", "memory"),
        ("trioflow sqlite", "sqlite"),
    ):
        growth = []
        for n in sizes:
            case = f"map {n} items"
            c = by.get((case, name))
            if c is not None and c.node:
                chain = wall(case, f"chain of {n}: trioflow {store}")
                growth.append(f"{n}: {fmt(_med(c.node))} ({ratio(_med(c.node), chain)} chain)")
        if growth:
            rows.append(
                Row(
                    BENCH,
                    f"map by size: {name}",
                    "-",
                    "-",
                    note="µs/branch step " + "; ".join(growth),
                )
            )
    return rows


# -- memory of the 10x1000 parallel case, one fresh process per contender -------------------


def _memory_child(name: str) -> list[Row]:
    """RSS growth and tracemalloc peak of one run, after a small warm-up run."""

    def measure(go: Callable[[], None], clear: Callable[[], None]) -> tuple[int, int, int]:
        gc.collect()
        before = rss_bytes()
        go()
        gc.collect()
        grown = rss_bytes() - before
        clear()
        gc.collect()
        tracemalloc.start()
        go()
        gc.collect()
        retained, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return grown, peak, retained

    if name.startswith("trioflow"):
        from trioflow import EngineLimits, open_engine

        doc, small, steps = (
            (parallel_graph(), parallel_graph(2, 10), PAR_TOTAL + 1)
            if name == "trioflow parallel"
            else (loop_graph(), loop_graph(20), PAR_TOTAL)
        )
        result: list[int] = []

        async def main() -> None:
            async with open_engine(limits=EngineLimits()) as engine:
                warm = await engine.register_graph(small)
                graph = await engine.register_graph(doc)
                await engine.wait((await engine.start_run(warm.id, {})).run_id)
                await engine.delete_runs(older_than_s=0)

                async def one() -> None:
                    final = await engine.wait((await engine.start_run(graph.id, {})).run_id)
                    if final.step != steps:
                        raise RuntimeError(f"{name}: {final.status} after {final.step} steps")

                gc.collect()
                before = rss_bytes()
                await one()
                gc.collect()
                result.append(rss_bytes() - before)
                await engine.delete_runs(older_than_s=0)
                gc.collect()
                tracemalloc.start()
                await one()
                gc.collect()
                retained, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                result.extend([peak, retained])

        trio.run(main)
        grown, peak, retained = result
        retained_note = "retained: the memory store keeps the run's record and its log"
    else:
        from langgraph.checkpoint.memory import InMemorySaver

        saver = InMemorySaver() if name == "LangGraph saver" else None
        graph = langgraph_parallel(saver)
        thread = uuid.uuid4().hex

        def go(steps: int = PAR_STEPS) -> None:
            config: dict[str, Any] = {"recursion_limit": steps + 10}
            if saver is not None:
                config["configurable"] = {"thread_id": thread}
            graph.invoke({"items": list(range(steps))}, config)

        def clear() -> None:
            if saver is not None:
                saver.delete_thread(thread)

        go(10)
        clear()
        grown, peak, retained = measure(go, clear)
        retained_note = (
            "retained: the saver's checkpoints of the thread"
            if saver is not None
            else "retained after the run"
        )
    what = {
        "trioflow parallel": "trioflow memory",
        "trioflow loop": f"{PAR_TOTAL:,}-step loop: trioflow memory",
        "LangGraph plain": "LangGraph Send plain",
        "LangGraph saver": "LangGraph Send InMemorySaver",
    }[name]
    case = f"{PAR_BRANCHES}x{PAR_STEPS} parallel: {what}"
    mb = 1 << 20
    transient = f"peak - retained {(peak - retained) / mb:.2f} MB"
    return [
        row(BENCH, case, "RSS growth", "MB", [grown / mb], note="fresh process, one run"),
        row(
            BENCH,
            case,
            "tracemalloc peak",
            "MB",
            [peak / mb],
            note=f"{retained_note}: {retained / mb:.1f} MB; {transient}",
        ),
    ]


def _memory_rows() -> list[Row]:
    rows: list[Row] = []
    for name in MEMORY_CONTENDERS:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.fanout", "--memory-child", name],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        found = parse_rows(proc.stdout)
        if proc.returncode != 0 or not found:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append(skipped(BENCH, f"memory: {name}", f"child failed: {tail}"))
        rows += found
    return rows


def run(quick: bool = False) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="trioflow-bench-") as tmp:
        rows = trio.run(_run_all, quick, Path(tmp))
    return rows + _memory_rows()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", choices=MEMORY_CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        emit_rows(_memory_child(args.memory_child))
        return
    from .__main__ import print_table

    print_table(run(args.quick))


if __name__ == "__main__":
    main()
