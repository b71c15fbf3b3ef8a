"""PostgreSQL: per step beside the bare-psycopg floor, steps/s, takeover, cross-node latency.

Needs a PostgreSQL server: ``TRIOFLOW_TEST_PG`` (default
``postgresql://postgres@127.0.0.1:5432/test``); every case works in a schema
of its own, dropped afterwards. Rows:

* **per step, one run at a time**: a chain of ``noop`` nodes on the
  PostgreSQL store (each step's checkpoint is an UPDATE of the run and 3 log
  rows, one commit), beside the same SQL written inline through
  ``trio.to_thread`` (one statement at a time, and pipelined), and
  LangGraph's ``PostgresSaver`` on the same chain. Rounds alternate.
* **aggregate durable steps/s**: 1, 10 and 100 concurrent runs on one node,
  and on two nodes (each a process of its own).
* **takeover**: a node process with 20 runs in flight is SIGKILLed; the time
  until another node has resumed them all (lease 3 s, claim scan every 0.5 s).
* **cross-node cancel**: ``Engine.cancel`` on node b of a run executing on
  node a, until it answers ``cancelled`` (both nodes in this process).
* **cross-node follower lag**: a follower on node b of a run on node a that
  logs 2,000 entries; lag = receipt time - the entry's ``ts``.

Run alone: ``python -m bench.postgres [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypedDict

import trio

from ._common import ROOT, Row, percentile, row, skipped

URL = os.environ.get("TRIOFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _chain(n: int, graph_id: str = "pg-chain") -> dict[str, Any]:
    nodes = [{"id": f"n{i}", "callable": "tools.noop"} for i in range(n)]
    edges = [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(n - 1)]
    return {"id": graph_id, "start_node": "n0", "nodes": nodes, "edges": edges}


@contextmanager
def _schema() -> Iterator[str]:
    import psycopg

    name = "bench_" + secrets.token_hex(5)
    try:
        yield name
    finally:
        with psycopg.connect(URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')  # type: ignore[arg-type]


def _store(schema: str, node: str, **options: Any) -> Any:
    from trioflow.stores.postgres import PostgresStore

    options.setdefault("notifications", os.environ.get("BENCH_NOTIFY", "1") == "1")
    return PostgresStore(URL, schema=schema, node_id=node, **options)


# -- per step --------------------------------------------------------------------


_FLOOR_SCHEMA = """
CREATE TABLE runs (run_id text PRIMARY KEY, status text NOT NULL, current_node text,
  state text NOT NULL, step integer NOT NULL, updated_at double precision NOT NULL,
  last_seq integer NOT NULL) WITH (fillfactor = 70);
CREATE TABLE logs (run_id text NOT NULL, seq integer NOT NULL, ts double precision NOT NULL,
  level text NOT NULL, event text NOT NULL, node text, message text NOT NULL,
  data text NOT NULL, PRIMARY KEY (run_id, seq));
"""


async def _floor(schema: str, steps: int, *, pipelined: bool) -> float:
    """µs per step: the UPDATE and 3 INSERTs of a step and one COMMIT, via trio.to_thread."""
    import psycopg

    conn = psycopg.connect(URL, autocommit=False, options=f"-c search_path={schema}")
    try:
        with conn.transaction():
            conn.execute("CREATE SCHEMA IF NOT EXISTS " + schema)  # type: ignore[arg-type]
            exists = conn.execute(
                "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'runs'", (schema,)
            ).fetchone()
            if exists is None:
                for statement in _FLOOR_SCHEMA.strip().split(";\n"):
                    conn.execute(statement)  # type: ignore[arg-type]
        run_id = secrets.token_hex(16)
        conn.execute("INSERT INTO runs VALUES (%s, 'running', 'n0', '{}', 0, 0, 0)", (run_id,))
        conn.commit()
        state = json.dumps({"x": 1})

        def step(i: int) -> None:
            seq = 3 * i
            rows = [
                (
                    run_id,
                    seq + 1,
                    time.time(),
                    "info",
                    "node_completed",
                    "n",
                    "node n completed",
                    '{"step":1}',
                ),
                (
                    run_id,
                    seq + 2,
                    time.time(),
                    "info",
                    "edge_taken",
                    "n",
                    "n -> m",
                    '{"edge":"n->m"}',
                ),
                (
                    run_id,
                    seq + 3,
                    time.time(),
                    "info",
                    "node_started",
                    "m",
                    "node m started",
                    '{"step":2}',
                ),
            ]
            update = (
                "UPDATE runs SET status = 'running', current_node = 'm', state = %s, step = %s, "
                "updated_at = %s, last_seq = %s WHERE run_id = %s AND last_seq = %s"
            )
            insert = (
                "INSERT INTO logs (run_id, seq, ts, level, event, node, message, data) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            )
            if pipelined:
                with conn.pipeline():
                    conn.execute(update, (state, i, time.time(), seq + 3, run_id, seq))
                    for r in rows:
                        conn.execute(insert, r)
                    conn.commit()
            else:
                conn.execute(update, (state, i, time.time(), seq + 3, run_id, seq))
                for r in rows:
                    conn.execute(insert, r)
                conn.commit()

        t0 = time.perf_counter()
        for i in range(steps):
            await trio.to_thread.run_sync(step, i)
        return (time.perf_counter() - t0) / steps * 1e6
    finally:
        conn.close()


async def _trioflow_one(schema: str, steps: int) -> float:
    """µs per step of one run of a ``steps``-node chain on the PostgreSQL store."""
    from trioflow import open_engine

    async with open_engine(store=_store(schema, "bench-one")) as engine:
        await engine.register_graph(_chain(steps))
        warm = await engine.start_run("pg-chain", {})
        await engine.wait(warm.run_id)
        await trio.sleep(0.5)  # the node's start-up work (listener, first scans) is done
        t0 = time.perf_counter()
        run = await engine.start_run("pg-chain", {})
        final = await engine.wait(run.run_id)
        elapsed = time.perf_counter() - t0
        if final.status.value != "completed":
            raise RuntimeError(f"run ended {final.status}")
        return elapsed / steps * 1e6


def _langgraph_one(schema: str, steps: int) -> float:
    """µs per step: LangGraph with PostgresSaver, the same chain (synchronous invoke)."""
    import psycopg
    from langgraph.checkpoint.postgres import PostgresSaver
    from langgraph.graph import END, START, StateGraph

    class S(TypedDict, total=False):
        x: int

    def noop(state: S) -> dict[str, Any]:
        return {}

    builder = StateGraph(S)
    for i in range(steps):
        builder.add_node(f"n{i}", noop)
    builder.add_edge(START, "n0")
    for i in range(steps - 1):
        builder.add_edge(f"n{i}", f"n{i + 1}")
    builder.add_edge(f"n{steps - 1}", END)
    with psycopg.connect(
        URL, autocommit=True, prepare_threshold=0, options=f"-c search_path={schema}"
    ) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')  # type: ignore[arg-type]
        saver = PostgresSaver(conn)  # type: ignore[arg-type]
        saver.setup()
        graph = builder.compile(checkpointer=saver)
        config = {
            "configurable": {"thread_id": secrets.token_hex(8)},
            "recursion_limit": steps + 10,
        }
        graph.invoke({"x": 1}, config)  # type: ignore[arg-type]
        config = {
            "configurable": {"thread_id": secrets.token_hex(8)},
            "recursion_limit": steps + 10,
        }
        t0 = time.perf_counter()
        graph.invoke({"x": 1}, config)  # type: ignore[arg-type]
        return (time.perf_counter() - t0) / steps * 1e6


def _per_step(quick: bool) -> list[Row]:
    steps = 100 if quick else 300
    rounds = 3 if quick else 7
    results: dict[str, list[float]] = {
        "floor": [],
        "floor_pipelined": [],
        "trioflow": [],
        "langgraph": [],
    }
    have_langgraph = True
    with _schema() as floor_schema, _schema() as tf_schema, _schema() as lg_schema:
        for _ in range(rounds):
            results["floor"].append(trio.run(lambda: _floor(floor_schema, steps, pipelined=False)))
            results["floor_pipelined"].append(
                trio.run(lambda: _floor(floor_schema, steps, pipelined=True))
            )
            results["trioflow"].append(trio.run(_trioflow_one, tf_schema, steps))
            if have_langgraph:
                try:
                    results["langgraph"].append(_langgraph_one(lg_schema, steps))
                except ImportError:
                    have_langgraph = False
    floor = statistics.median(results["floor_pipelined"])
    tf = statistics.median(results["trioflow"])
    rows = [
        row(
            "postgres",
            "per step, one run: trioflow",
            "per step",
            "µs",
            results["trioflow"],
            target="<= 1.5x pipelined floor",
            met=tf <= 1.5 * floor,
            note=f"{tf / floor:.2f}x pipelined floor; "
            f"{tf / statistics.median(results['floor']):.2f}x unpipelined",
        ),
        row(
            "postgres",
            "per step, one run: floor, inline SQL via to_thread",
            "per step",
            "µs",
            results["floor"],
            note="UPDATE + 3 INSERT + COMMIT, one round trip each",
        ),
        row(
            "postgres",
            "per step, one run: floor, pipelined",
            "per step",
            "µs",
            results["floor_pipelined"],
            note="the same statements pipelined: one round trip",
        ),
    ]
    if results["langgraph"]:
        lg = statistics.median(results["langgraph"])
        rows.append(
            row(
                "postgres",
                "per step, one run: LangGraph PostgresSaver",
                "per step",
                "µs",
                results["langgraph"],
                note=f"trioflow is {tf / lg:.3f}x of it",
            )
        )
    else:
        rows.append(
            skipped("postgres", "LangGraph PostgresSaver", "langgraph-checkpoint-postgres missing")
        )
    return rows


# -- aggregate --------------------------------------------------------------------


async def _aggregate_node(schema: str, node: str, runs: int, steps: int) -> dict[str, float]:
    from trioflow import EngineLimits, open_engine

    limits = EngineLimits(max_running=max(runs, 1), max_active_runs=max(runs, 1) * 2)
    async with open_engine(store=_store(schema, node), limits=limits) as engine:
        graph = f"pg-agg-{steps}"
        await engine.register_graph(_chain(steps, graph))
        warm = await engine.start_run(graph, {})
        await engine.wait(warm.run_id)

        async def one() -> None:
            run = await engine.start_run(graph, {})
            await engine.wait(run.run_id)

        # Started together, so their creates share commits as their steps do.
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(runs):
                nursery.start_soon(one)
        elapsed = time.perf_counter() - t0
        return {"steps": runs * steps, "seconds": elapsed}


def _aggregate_child(schema: str, node: str, runs: int, steps: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.postgres",
            "--child",
            "aggregate",
            schema,
            node,
            str(runs),
            str(steps),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def _aggregate(quick: bool) -> list[Row]:
    rows: list[Row] = []
    steps = 30 if quick else 100
    for concurrent, nodes in ((1, 1), (10, 1), (10, 2), (100, 1), (100, 2)):
        if True:
            per_node = concurrent // nodes
            samples = []
            for _ in range(1 if quick else 3):
                with _schema() as schema:
                    # The schema exists before the nodes race to create it.
                    trio.run(_aggregate_node, schema, "warm", 1, 2)
                    children = [
                        _aggregate_child(schema, f"n{i}", per_node, steps) for i in range(nodes)
                    ]
                    outs = [
                        json.loads(c.communicate(timeout=600)[0].strip().splitlines()[-1])
                        for c in children
                    ]
                    total = sum(o["steps"] for o in outs)
                    samples.append(total / max(o["seconds"] for o in outs))
            target = ">= 10,000" if (concurrent, nodes) == (100, 1) else ""
            rows.append(
                row(
                    "postgres",
                    f"{concurrent} concurrent runs, {nodes} node{'s' if nodes > 1 else ''}",
                    "durable steps/s",
                    "steps/s",
                    samples,
                    target=target,
                    met=(statistics.median(samples) >= 10_000) if target else None,
                    note=f"{steps}-node chains, {per_node} runs per node; each node a process "
                    "(2 cores: the nodes and PostgreSQL share them)",
                )
            )
    return rows


# -- takeover, cross-node cancel and follower lag -------------------------------------


async def _takeover_child(schema: str) -> None:
    from trioflow import open_engine

    async with open_engine(
        store=_store(schema, "doomed", lease_ttl=3.0, claim_interval=0.5)
    ) as engine:
        await engine.register_graph(
            {"id": "nap", "start_node": "nap", "nodes": [{"id": "nap", "callable": "tools.sleep"}]}
        )
        ids = [(await engine.start_run("nap", {"sleep_s": 3600})).run_id for _ in range(20)]
        for run_id in ids:
            await _until_running(engine, run_id)
        print(json.dumps(ids), flush=True)
        await trio.sleep_forever()


async def _until_running(engine: Any, run_id: str) -> None:
    while True:
        if (await engine.get_run(run_id)).status.value == "running":
            return
        await trio.sleep(0.005)


async def _takeover_once(schema: str) -> float:
    from trioflow import open_engine

    child = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited in a loop
        [sys.executable, "-m", "bench.postgres", "--child", "takeover", schema],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    ids = json.loads(await trio.to_thread.run_sync(child.stdout.readline))
    async with open_engine(
        store=_store(schema, "survivor", lease_ttl=3.0, claim_interval=0.5)
    ) as engine:
        child.send_signal(signal.SIGKILL)
        child.wait()
        killed = time.perf_counter()
        pending = set(ids)
        while pending:
            for run_id in list(pending):
                log = await engine.read_log(run_id)
                if any(e.event == "run_resumed" for e in log):
                    pending.discard(run_id)
            await trio.sleep(0.02)
        took = time.perf_counter() - killed
        await engine.cancel_many(ids)
        for run_id in ids:
            await engine.cancel(run_id)
        return took


async def _two_nodes(
    schema: str, work: Callable[[Any, Any], Awaitable[list[float]]]
) -> list[float]:
    from trioflow import open_engine

    async with (
        open_engine(store=_store(schema, "a", lease_ttl=3.0)) as a,
        open_engine(store=_store(schema, "b", lease_ttl=3.0)) as b,
    ):
        return await work(a, b)


async def _cancels(a: Any, b: Any, n: int) -> list[float]:
    await a.register_graph(
        {"id": "nap", "start_node": "nap", "nodes": [{"id": "nap", "callable": "tools.sleep"}]}
    )
    out = []
    for _ in range(n):
        run = await a.start_run("nap", {"sleep_s": 3600})
        await _until_running(b, run.run_id)
        t0 = time.perf_counter()
        final = await b.cancel(run.run_id)
        out.append((time.perf_counter() - t0) * 1000)
        if final.status.value != "cancelled":
            raise RuntimeError("not cancelled")
    return out


async def _lags(a: Any, b: Any, entries: int) -> list[float]:
    from trioflow import RunContext

    def chatty(state: Any, ctx: RunContext) -> None:
        for i in range(20):
            ctx.log(f"line {i}")

    a.registry.add_tool("bench.chatty", chatty, inline=True)
    b.registry.add_tool("bench.chatty", chatty, inline=True)
    loops = entries // 20
    await a.register_graph(
        {
            "id": "chatty",
            "nodes": [
                {"id": "talk", "callable": "bench.chatty"},
                {"id": "gate", "callable": "tools.sleep"},
            ],
            "edges": [
                {"from": "gate", "to": "talk"},
                {"from": "talk", "to": "talk", "type": "loop", "loop": {"max_iterations": loops}},
            ],
            "start_node": "gate",
        }
    )
    run = await a.start_run("chatty", {"sleep_s": 0.5})
    lags: list[float] = []
    async for entry in b.follow(run.run_id):
        if entry.event == "custom":
            lags.append((time.time() - entry.ts) * 1000)
    return lags


def _cross_node(quick: bool) -> list[Row]:
    rows = []
    takeovers = []
    for _ in range(1 if quick else 3):
        with _schema() as schema:
            trio.run(_aggregate_node, schema, "warm", 1, 2)
            takeovers.append(trio.run(_takeover_once, schema))
    rows.append(
        row(
            "postgres",
            "takeover after SIGKILL, 20 runs",
            "until all resumed",
            "s",
            takeovers,
            target="<= ttl + claim = 3.5",
            met=statistics.median(takeovers) <= 3.5,
            note="lease 3 s, claim scan 0.5 s; another node resumes every run",
        )
    )
    with _schema() as schema:
        cancels = trio.run(_two_nodes, schema, lambda a, b: _cancels(a, b, 30 if quick else 200))
    p99 = percentile(cancels, 99)
    rows.append(
        row(
            "postgres",
            "cross-node cancel",
            "latency",
            "ms",
            cancels,
            target="p99 <= 100",
            met=p99 <= 100,
            note=f"p50 {percentile(cancels, 50):.1f} ms, p99 {p99:.1f} ms; "
            "both nodes in one process",
        )
    )
    with _schema() as schema:
        lags = trio.run(_two_nodes, schema, lambda a, b: _lags(a, b, 2000))
    rows.append(
        row(
            "postgres",
            "cross-node follower, 2,000 entries",
            "lag",
            "ms",
            lags,
            note=f"p50 {percentile(lags, 50):.1f} ms, p99 {percentile(lags, 99):.1f} ms; "
            "entry ts to receipt on the other node",
        )
    )
    return rows


def _available() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        with psycopg.connect(URL, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL at {URL} is unreachable: {exc}"


def run(quick: bool = False) -> list[Row]:
    why = _available()
    if why is not None:
        return [skipped("postgres", "all", why)]
    return [*_per_step(quick), *_aggregate(quick), *_cross_node(quick)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "aggregate":
            schema, node, runs, steps = rest
            print(json.dumps(trio.run(_aggregate_node, schema, node, int(runs), int(steps))))
        elif kind == "takeover":
            trio.run(_takeover_child, rest[0])
        return
    from .__main__ import print_table

    print_table(run(quick=args.quick))


if __name__ == "__main__":
    main()
