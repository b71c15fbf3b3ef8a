"""Per-step overhead: trioflow beside a plain Python loop and LangGraph.

Two workloads, each run to completion many times:

* ``spec``: the specification's code-review graph from ``{"issues_open": 1}``,
  9 node executions (submit, then review/fix four times; the loop edge fires
  three times and is then exhausted). µs per step = run wall time / 9,
  including ``start_run`` and ``wait``.
* ``chain``: 1,000 ``tools.noop`` nodes joined by sequential edges.

Contenders, all in this one process and interleaved round by round, so a
ratio compares figures taken under the same noise:

* trioflow with the memory store and with the SQLite store (a file in a
  temporary directory, WAL, ``synchronous=NORMAL``: the shipped default);
* a plain Python loop doing the same branching: the floor;
* LangGraph's ``StateGraph`` with the same nodes and conditional edges
  (TypedDict state; the loop cap is a counter the ``fix`` node increments),
  invoked synchronously, without a checkpointer, with ``InMemorySaver`` and
  with ``SqliteSaver`` (langgraph-checkpoint-sqlite).

Run alone: ``python -m bench.per_step [--quick]``.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import trio

from ._common import (
    SPEC_INITIAL_STATE,
    SPEC_STEPS,
    Row,
    chain_graph,
    load_spec_graph,
    ratio,
    row,
    skipped,
    sqlite_available,
)

CHAIN_NODES = 1000
#: Aim for samples of about this many seconds (several runs per sample when runs are short).
SAMPLE_S = 0.04


# -- the floor: a plain Python loop ----------------------------------------------


def _noop(state: dict[str, Any]) -> None:
    return None


def _approve(state: dict[str, Any]) -> dict[str, Any]:
    return {"approved": True}


def plain_spec(initial: dict[str, Any]) -> int:
    """The spec graph's branching by hand; returns the node executions."""
    state = dict(initial)
    loops = 0
    steps = 0
    node: str | None = "submit"
    while node is not None:
        steps += 1
        update = _approve(state) if node == "approve" else _noop(state)
        if update:
            state.update(update)
        if node == "submit":
            node = "review"
        elif node == "review":
            issues = state.get("issues_open", 0)
            node = "approve" if issues == 0 else "fix" if issues > 0 else None
        elif node == "fix":
            if state.get("issues_open", 0) != 0 and loops < 3:
                loops += 1
                node = "review"
            else:
                node = None
        else:
            node = None
    return steps


_CHAIN_FUNCS = [_noop] * CHAIN_NODES


def plain_chain(initial: dict[str, Any]) -> int:
    state = dict(initial)
    steps = 0
    for func in _CHAIN_FUNCS:
        steps += 1
        update = func(state)
        if update:
            state.update(update)
    return steps


# -- LangGraph -------------------------------------------------------------------


class SpecState(TypedDict, total=False):
    issues_open: int
    approved: bool
    loops: int


def _lg_noop(state: SpecState) -> dict[str, Any]:
    return {}


def _lg_fix(state: SpecState) -> dict[str, Any]:
    # trioflow counts loop-edge firings; LangGraph has no loop edge, so the
    # node that precedes it counts its own executions in the state.
    return {"loops": state.get("loops", 0) + 1}


def _lg_approve(state: SpecState) -> dict[str, Any]:
    return {"approved": True}


def _lg_after_review(state: SpecState) -> str:
    issues = state.get("issues_open", 0)
    if issues == 0:
        return "approve"
    if issues > 0:
        return "fix"
    return "__end__"


def _lg_after_fix(state: SpecState) -> str:
    # The loop fires while issues stay open, at most 3 times (4 fix executions).
    if state.get("issues_open", 0) != 0 and state.get("loops", 0) <= 3:
        return "review"
    return "__end__"


def langgraph_spec(checkpointer: Any = None) -> Any:
    from langgraph.graph import END, START, StateGraph

    builder = StateGraph(SpecState)
    builder.add_node("submit", _lg_noop)
    builder.add_node("review", _lg_noop)
    builder.add_node("fix", _lg_fix)
    builder.add_node("approve", _lg_approve)
    builder.add_edge(START, "submit")
    builder.add_edge("submit", "review")
    builder.add_conditional_edges(
        "review", _lg_after_review, {"approve": "approve", "fix": "fix", "__end__": END}
    )
    builder.add_conditional_edges("fix", _lg_after_fix, {"review": "review", "__end__": END})
    builder.add_edge("approve", END)
    return builder.compile(checkpointer=checkpointer)


class ChainState(TypedDict, total=False):
    issues_open: int


def langgraph_chain(checkpointer: Any = None) -> Any:
    from langgraph.graph import END, START, StateGraph

    builder = StateGraph(ChainState)
    for i in range(CHAIN_NODES):
        builder.add_node(f"n{i}", _lg_noop)
    builder.add_edge(START, "n0")
    for i in range(CHAIN_NODES - 1):
        builder.add_edge(f"n{i}", f"n{i + 1}")
    builder.add_edge(f"n{CHAIN_NODES - 1}", END)
    return builder.compile(checkpointer=checkpointer)


def _lg_runner(graph: Any, with_thread: bool, limit: int) -> Callable[[], None]:
    def once() -> None:
        config: dict[str, Any] = {"recursion_limit": limit}
        if with_thread:
            config["configurable"] = {"thread_id": uuid.uuid4().hex}
        graph.invoke(dict(SPEC_INITIAL_STATE), config)

    return once


# -- trioflow --------------------------------------------------------------------


def _trioflow_runner(engine: Any, graph_id: str, steps: int) -> Callable[[], Awaitable[None]]:
    async def once() -> None:
        run = await engine.start_run(graph_id, SPEC_INITIAL_STATE)
        final = await engine.wait(run.run_id)
        if final.status != "completed" or final.step != steps:
            raise RuntimeError(f"bench run ended {final.status} after {final.step} steps")

    return once


# -- the harness -----------------------------------------------------------------


@dataclass
class Contender:
    name: str
    once: Callable[[], Any]
    is_async: bool
    per_sample: int = 1
    samples: list[float] | None = None  # µs per step

    async def call(self) -> None:
        if self.is_async:
            await self.once()
        else:
            self.once()

    async def calibrate(self, steps: int) -> None:
        await self.call()  # warm caches, compile, open files
        t0 = time.perf_counter()
        await self.call()
        one = time.perf_counter() - t0
        self.per_sample = max(1, min(20000, int(SAMPLE_S / max(one, 1e-7))))
        # A slow contender's timed warm-up run is already a full sample.
        self.samples = [one / steps * 1e6] if self.per_sample == 1 else []

    async def sample(self, steps: int) -> None:
        n = self.per_sample
        t0 = time.perf_counter()
        for _ in range(n):
            await self.call()
        elapsed = time.perf_counter() - t0
        assert self.samples is not None
        self.samples.append(elapsed / (n * steps) * 1e6)


async def _measure(
    workload: str, contenders: list[Contender], steps: int, rounds: int
) -> dict[str, list[float]]:
    for c in contenders:
        await c.calibrate(steps)
    for _ in range(rounds):
        for c in contenders:
            if len(c.samples or ()) < rounds:
                await c.sample(steps)
    return {c.name: c.samples or [] for c in contenders}


async def _run_all(quick: bool, tmp: Path) -> list[Row]:
    from trioflow import EngineLimits, open_engine

    have_sqlite = sqlite_available()
    if have_sqlite:
        from trioflow.stores.sqlite import SQLiteStore
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.checkpoint.sqlite import SqliteSaver

    rows: list[Row] = []
    lg_conns: list[sqlite3.Connection] = []

    def lg_sqlite(name: str) -> Any:
        conn = sqlite3.connect(str(tmp / f"lg-{name}.db"), check_same_thread=False)
        lg_conns.append(conn)
        saver = SqliteSaver(conn)
        saver.setup()
        return saver

    limits = EngineLimits()
    async with open_engine(limits=limits) as mem_engine:
        sqlite_cm = (
            open_engine(store=SQLiteStore(str(tmp / "trioflow.db")), limits=limits)
            if have_sqlite
            else None
        )
        sql_engine = await sqlite_cm.__aenter__() if sqlite_cm is not None else None
        try:
            workloads = [
                (
                    "spec",
                    load_spec_graph(),
                    SPEC_STEPS,
                    plain_spec,
                    langgraph_spec,
                    6 if quick else 25,
                ),
                (
                    "chain",
                    chain_graph(CHAIN_NODES),
                    CHAIN_NODES,
                    plain_chain,
                    langgraph_chain,
                    2 if quick else 7,
                ),
            ]
            for name, doc, steps, plain, lg_build, rounds in workloads:
                graph = await mem_engine.register_graph(doc)
                contenders = [
                    Contender(
                        "trioflow memory", _trioflow_runner(mem_engine, graph.id, steps), True
                    ),
                ]
                if sql_engine is not None:
                    await sql_engine.register_graph(doc)
                    contenders.append(
                        Contender(
                            "trioflow sqlite", _trioflow_runner(sql_engine, graph.id, steps), True
                        )
                    )
                limit = steps * 2 + 10
                contenders += [
                    Contender("plain loop", lambda p=plain: p(SPEC_INITIAL_STATE), False),
                    Contender("LangGraph plain", _lg_runner(lg_build(), False, limit), False),
                    Contender(
                        "LangGraph InMemorySaver",
                        _lg_runner(lg_build(InMemorySaver()), True, limit),
                        False,
                    ),
                    Contender(
                        "LangGraph SqliteSaver",
                        _lg_runner(lg_build(lg_sqlite(name)), True, limit),
                        False,
                    ),
                ]
                if plain(SPEC_INITIAL_STATE) != steps:
                    raise RuntimeError("plain loop does not take the same path")
                results = await _measure(name, contenders, steps, rounds)
                rows += _rows(name, steps, results, have_sqlite)
        finally:
            if sqlite_cm is not None:
                await sqlite_cm.__aexit__(None, None, None)
            for conn in lg_conns:
                conn.close()
    return rows


def _rows(
    workload: str, steps: int, results: dict[str, list[float]], have_sqlite: bool
) -> list[Row]:
    import statistics

    med = {k: statistics.median(v) for k, v in results.items()}
    case_label = "spec graph, 9 steps" if workload == "spec" else f"{CHAIN_NODES}-node chain"
    targets = {"trioflow memory": (25.0, "<= 25"), "trioflow sqlite": (100.0, "<= 100")}
    refs = (
        {
            "plain loop": "ref ~0.25",
            "LangGraph plain": "ref ~290",
            "LangGraph InMemorySaver": "ref ~800",
        }
        if workload == "spec"
        else {}
    )
    compare = {
        "trioflow memory": ["LangGraph plain", "LangGraph InMemorySaver"],
        "trioflow sqlite": ["LangGraph SqliteSaver"],
    }
    rows = []
    for name, values in results.items():
        notes = [f"{ratio(med[name], med['plain loop'])} loop"] if name != "plain loop" else []
        for other in compare.get(name, []):
            notes.append(f"{ratio(med[name], med[other])} {other.removeprefix('LangGraph ')} LG")
        if name in refs:
            notes.append(refs[name])
        target, target_text = targets.get(name, (None, ""))
        rows.append(
            row(
                "per_step",
                f"{workload}: {name}",
                "per step",
                "µs",
                values,
                target=target_text,
                met=(med[name] <= target) if target is not None else None,
                note="; ".join(notes),
                extra={"case_label": case_label},
            )
        )
    if not have_sqlite:
        rows.append(
            skipped("per_step", f"{workload}: trioflow sqlite", "core/stores/sqlite.py not present")
        )
    return rows


def run(quick: bool = False) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="trioflow-bench-") as tmp:
        return trio.run(_run_all, quick, Path(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from .__main__ import print_table

    print_table(run(args.quick))


if __name__ == "__main__":
    main()
