"""Several engines (nodes) on one PostgreSQL database, through the embedding API.

Each test gets its own schema. Leases are short (3 s) so that takeovers
happen within the test; time is real (the lease clock is the database's).
The same over HTTP with real ``trioflow serve`` processes is in
tests/web/test_web_nodes.py.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from pgtest import fresh_schema, pg_url

from trioflow import (
    Engine,
    EngineLimits,
    LogEntry,
    Registry,
    RunStatus,
    StoreError,
    default_registry,
    open_engine,
)
from trioflow.stores.postgres import PostgresStore

TTL = 3.0
CLAIM = 0.3


@pytest.fixture
def schema() -> Iterator[str]:
    with fresh_schema() as name:
        yield name


def node_store(schema: str, node_id: str, **options: Any) -> PostgresStore:
    options.setdefault("lease_ttl", TTL)
    options.setdefault("claim_interval", CLAIM)
    return PostgresStore(pg_url(), schema=schema, node_id=node_id, **options)


@asynccontextmanager
async def nodes(
    schema: str, registry: Registry, *names: str, limits: EngineLimits | None = None, **options: Any
) -> AsyncIterator[list[Engine]]:
    async with AsyncExitStack() as stack:
        engines = [
            await stack.enter_async_context(
                open_engine(
                    store=node_store(schema, name, **options), registry=registry, limits=limits
                )
            )
            for name in names
        ]
        yield engines


async def until(check: Callable[[], Awaitable[bool] | bool], interval: float = 0.02) -> None:
    """Poll ``check`` until it is true (callers bound it with ``fail_after``)."""
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await trio.sleep(interval)


def gapless(entries: list[LogEntry]) -> bool:
    return [e.seq for e in entries] == list(range(1, len(entries) + 1))


async def sql(schema: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg

    def run() -> list[tuple[Any, ...]]:
        with psycopg.connect(pg_url(), autocommit=True, options=f"-c search_path={schema}") as conn:
            cur = conn.execute(statement, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    return await trio.to_thread.run_sync(run)


CHAIN = {
    "id": "chain",
    "start_node": "a",
    "nodes": [
        {"id": "a", "callable": "count.step"},
        {"id": "b", "callable": "count.step"},
        {"id": "c", "callable": "count.step"},
    ],
    "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}],
}


class Counter:
    """A tool that counts its executions per (run, node) and yields a little."""

    def __init__(self) -> None:
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()

    def register(self, registry: Registry) -> None:
        from trioflow import RunContext

        async def step(state: Any, ctx: RunContext) -> dict[str, Any]:
            self.calls[(ctx.run_id, ctx.node_id)] += 1
            await trio.sleep(state.get("nap", 0.001))
            return {ctx.node_id: True}

        registry.add_tool("count.step", step)


async def test_two_nodes_and_200_runs_execute_every_step_exactly_once(schema: str) -> None:
    counter = Counter()
    registry = default_registry()
    counter.register(registry)
    # Node a has 4 running slots: most of what it is given is queued in the
    # database and taken by whichever node has a free slot first.
    with trio.fail_after(90):
        async with (
            nodes(schema, registry, "a", limits=EngineLimits(max_running=4)) as (a,),
            nodes(schema, registry, "b") as (b,),
        ):
            await a.register_graph(CHAIN)
            runs = []
            for i in range(200):
                engine = a if i % 2 else b
                state = {"nap": 0.05} if engine is a else {}
                runs.append((await engine.start_run("chain", state)).run_id)
            finals = [await b.wait(run_id) for run_id in runs]
            assert all(f.status is RunStatus.COMPLETED for f in finals)
            for run_id in runs:
                assert gapless(await a.read_log(run_id, limit=100))
            assert set(counter.calls.values()) == {1}
            assert len(counter.calls) == 600
            executed_by = collections.Counter()
            for i, run_id in enumerate(runs):
                (started,) = await a.read_log(run_id, limit=1)
                executed_by[("a" if i % 2 else "b", started.data["node"])] += 1
            # Queued by a, executed by both; b never had to queue.
            assert executed_by[("a", "a")] > 0 and executed_by[("a", "b")] > 0
            assert executed_by[("b", "b")] == 100
            owners = await sql(schema, "SELECT count(*) FROM runs WHERE owner IS NOT NULL")
            assert owners == [(0,)]  # finished runs belong to no node


async def test_a_node_id_in_use_is_refused(schema: str) -> None:
    with trio.fail_after(30):
        async with nodes(schema, default_registry(), "same"):
            with pytest.raises(StoreError, match="in use by a live node"):
                async with nodes(schema, default_registry(), "same"):
                    pass  # pragma: no cover


SLEEPY = {
    "id": "sleepy",
    "start_node": "nap",
    "nodes": [
        {"id": "nap", "callable": "tools.sleep"},
        {"id": "done", "callable": "tools.approve"},
    ],
    "edges": [{"from": "nap", "to": "done"}],
}


async def until_running(engine: Engine, run_id: str, node: str) -> None:
    while True:
        record = await engine.get_run(run_id)
        if record.status is RunStatus.RUNNING and record.current_node == node:
            return
        await trio.sleep(0.02)


@pytest.mark.parametrize("notifications", [True, False])
async def test_a_cancel_sent_to_another_node_lands_within_a_second(
    schema: str, notifications: bool
) -> None:
    # Without notifications, the owner's heartbeat (every 0.75 s at most) sees the flag.
    with trio.fail_after(30):
        async with nodes(schema, default_registry(), "a", "b", notifications=notifications) as (
            a,
            b,
        ):
            await a.register_graph(SLEEPY)
            run = await a.start_run("sleepy", {"sleep_s": 60})
            await until_running(b, run.run_id, "nap")
            started = trio.current_time()
            final = await b.cancel(run.run_id)
            took = trio.current_time() - started
            assert final.status is RunStatus.CANCELLED
            assert took < 1.0, took
            log = await b.read_log(run.run_id)
            assert gapless(log) and log[-1].event == "run_cancelled"
            assert a.active_runs == 0


async def test_a_zombie_node_can_write_nothing_after_its_run_was_taken_over(schema: str) -> None:
    """Node a is stopped inside a node; its lease is expired by hand; b takes the run.

    When a wakes and finishes the node, every write it tries is refused: the
    log shows b's execution only.
    """
    gate = trio.Event()
    entered = trio.Event()
    calls: list[str] = []
    registry = default_registry()

    async def block(state: Any) -> dict[str, Any]:
        calls.append("call")
        if len(calls) == 1:  # the first execution: node a's
            entered.set()
            await gate.wait()
            return {"by": "zombie"}
        return {"by": "b"}

    registry.add_tool("zombie.block", block)
    graph = {
        "id": "zombie",
        "start_node": "block",
        "nodes": [
            {"id": "block", "callable": "zombie.block"},
            {"id": "end", "callable": "tools.noop"},
        ],
        "edges": [{"from": "block", "to": "end"}],
    }
    # Long leases: neither node renews or claims on its own during the test.
    with trio.fail_after(60):
        async with nodes(schema, registry, "a", "b", lease_ttl=60.0, claim_interval=60.0) as (a, b):
            await a.register_graph(graph)
            run = await a.start_run("zombie", {})
            await entered.wait()
            await sql(
                schema,
                "UPDATE runs SET lease_until = now() - interval '1 second' WHERE run_id = %s",
                run.run_id,
            )
            assert b.cluster is not None
            b.cluster.wake()
            final = await b.wait(run.run_id)
            assert final.status is RunStatus.COMPLETED and final.state == {"by": "b"}
            assert final.epoch == 2
            gate.set()  # the zombie finishes its node and tries to write
            await until(lambda: a.active_runs == 0)
            log = await b.read_log(run.run_id)
            assert gapless(log)
            assert await b.get_run(run.run_id) == final
            events = [(e.event, e.node) for e in log]
            assert events == [
                ("run_started", None),
                ("node_started", "block"),
                ("run_resumed", "block"),
                ("node_started", "block"),
                ("node_completed", "block"),
                ("edge_taken", "block"),
                ("node_started", "end"),
                ("node_completed", "end"),
                ("run_completed", None),
            ]
            assert log[0].data["node"] == "a" and log[2].data["node"] == "b"
            assert log[2].data["crashes"] == 1  # a lease that expired counts as a crash
            assert len(calls) == 2


async def test_a_follower_on_another_node_sees_every_entry_once_across_a_lost_listener(
    schema: str,
) -> None:
    graph = {
        "id": "ticks",
        "start_node": "tick",
        "nodes": [{"id": "tick", "callable": "tools.sleep"}],
        "edges": [{"from": "tick", "to": "tick", "type": "loop", "loop": {"max_iterations": 30}}],
    }
    with trio.fail_after(60):
        async with nodes(schema, default_registry(), "a", "b") as (a, b):
            await a.register_graph(graph)
            run = await a.start_run("ticks", {"sleep_s": 0.05})
            seen: list[LogEntry] = []

            async def follow() -> None:
                async for entry in b.follow(run.run_id):
                    seen.append(entry)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                await until(lambda: len(seen) >= 10)
                # Cut b's listener off: it reconnects, and b's followers read
                # what they missed.
                killed = await sql(
                    schema,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'trioflow-listener:b'",
                )
                assert killed == [(True,)]
            stored = await a.read_log(run.run_id, limit=1000)
            assert seen == stored
            assert seen[-1].event == "run_completed"


async def test_a_run_waiting_on_one_node_is_answered_on_another(schema: str) -> None:
    graph = {
        "id": "ask",
        "start_node": "ask",
        "nodes": [
            {"id": "ask", "wait": {"prompt": "go?"}},
            {"id": "done", "callable": "tools.approve"},
        ],
        "edges": [{"from": "ask", "to": "done"}],
    }
    with trio.fail_after(30):
        async with nodes(schema, default_registry(), "a", "b") as (a, b):
            await a.register_graph(graph)
            run = await a.start_run("ask", {})
            waiting = await a.wait_stop(run.run_id)
            assert waiting.status is RunStatus.WAITING
            owners = await sql(schema, "SELECT owner FROM runs WHERE run_id = %s", run.run_id)
            assert owners == [(None,)]  # a waiting run belongs to no node
            await a.signal(run.run_id, "note", {"note": "from a"})
            resumed = await b.resume(run.run_id, {"go": True})
            assert resumed.epoch == waiting.epoch + 1
            final = await a.wait(run.run_id)
            assert final.status is RunStatus.COMPLETED
            assert final.state == {"note": "from a", "go": True, "approved": True}
            log = await a.read_log(run.run_id)
            assert gapless(log)


async def test_a_signal_sent_to_another_node_reaches_the_run(schema: str) -> None:
    graph = {
        "id": "two",
        "start_node": "nap",
        "nodes": [
            {"id": "nap", "callable": "tools.sleep"},
            {"id": "done", "callable": "tools.noop"},
        ],
        "edges": [{"from": "nap", "to": "done"}],
    }
    with trio.fail_after(30):
        async with nodes(schema, default_registry(), "a", "b") as (a, b):
            await a.register_graph(graph)
            run = await a.start_run("two", {"sleep_s": 0.5})
            await until_running(b, run.run_id, "nap")
            await b.signal(run.run_id, "hello", {"greeting": "from b"})
            final = await b.wait(run.run_id)
            assert final.state["greeting"] == "from b"
            assert [e.event for e in await b.read_log(run.run_id)].count("signal_received") == 1


async def test_a_stopping_node_drains_and_hands_its_runs_over_at_once(schema: str) -> None:
    with trio.fail_after(30):
        async with nodes(schema, default_registry(), "b") as (b,):
            async with open_engine(
                store=node_store(schema, "a", lease_ttl=30.0),
                registry=default_registry(),
                drain_timeout=5.0,
            ) as a:
                await a.register_graph(SLEEPY)
                short = await a.start_run("sleepy", {"sleep_s": 0.3})
                long = await a.start_run("sleepy", {"sleep_s": 3600})
                await until_running(a, long.run_id, "nap")
                stopping = trio.current_time()
            # a let the short node finish; the long one held the stop for the
            # whole grace period and was then cut off. a gave both runs up.
            drained = trio.current_time() - stopping
            assert 0.3 <= drained < 6.0
            done = await b.wait(short.run_id)
            assert done.status is RunStatus.COMPLETED
            short_log = [(e.event, e.node) for e in await b.read_log(short.run_id)]
            # The short run stopped at its step boundary and b went on from there.
            assert ("run_resumed", "done") in short_log
            assert short_log.count(("node_completed", "nap")) == 1
            # The long one is taken by b well before a's 30 s lease would expire.
            await until_running(b, long.run_id, "nap")
            resumed = [e for e in await b.read_log(long.run_id) if e.event == "run_resumed"]
            assert resumed and resumed[-1].data["node"] == "b"
            assert "crashes" not in resumed[-1].data  # handed over, not taken from a dead node
            await b.cancel(long.run_id)


async def test_a_run_whose_node_dies_twice_at_one_step_fails_with_crash_loop(schema: str) -> None:
    with trio.fail_after(60):
        async with nodes(schema, default_registry(), "a", lease_ttl=60.0, claim_interval=60.0) as (
            a,
        ):
            await a.register_graph(SLEEPY)
            run = await a.start_run("sleepy", {"sleep_s": 3600})
            await until_running(a, run.run_id, "nap")
            for expected_crashes in (1, 2):
                # The node holding it "dies": its lease expires and a node claims it.
                await sql(
                    schema,
                    "UPDATE runs SET lease_until = now() - interval '1 second' WHERE run_id = %s",
                    run.run_id,
                )
                assert a.cluster is not None
                a.cluster.wake()

                async def counted(n: int = expected_crashes) -> bool:
                    return (await a.get_run(run.run_id)).crashes >= n

                await until(counted)
                if expected_crashes == 1:
                    await until_running(a, run.run_id, "nap")
            final = await a.wait(run.run_id)
            assert final.status is RunStatus.FAILED
            assert final.error is not None and final.error["code"] == "crash_loop"


async def test_a_cancel_for_a_run_that_stops_at_a_wait_meanwhile_still_lands(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cancel goes to the row of a run that node a executes; before it gets
    # there, the run parks at a wait and belongs to no node. The node that
    # asked cancels it itself.
    graph = {
        "id": "park",
        "start_node": "nap",
        "nodes": [{"id": "nap", "callable": "tools.sleep"}, {"id": "ask", "wait": {}}],
        "edges": [{"from": "nap", "to": "ask"}],
    }
    with trio.fail_after(30):
        async with nodes(schema, default_registry(), "a", "b") as (a, b):
            await a.register_graph(graph)
            run = await a.start_run("park", {"sleep_s": 0.3})
            await until_running(b, run.run_id, "nap")
            assert isinstance(b.store, PostgresStore)
            request = b.store.request_cancel

            async def late_request(run_id: str) -> None:
                await a.wait_stop(run_id)  # the run parks first
                await request(run_id)

            monkeypatch.setattr(b.store, "request_cancel", late_request)
            final = await b.cancel(run.run_id)
            assert final.status is RunStatus.CANCELLED
            assert [e.event for e in await b.read_log(run.run_id)][-2:] == [
                "run_waiting",
                "run_cancelled",
            ]


async def test_a_store_error_while_starting_a_claimed_run_does_not_stop_the_node(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(60):
        async with nodes(schema, default_registry(), "a") as (a,):
            await a.register_graph(SLEEPY)
        async with nodes(schema, default_registry(), "b") as (b,):
            failures = [StoreError("the database blinked", transient=True)]
            get_graph = b.get_graph

            async def flaky(graph_id: str) -> Any:
                if failures:
                    raise failures.pop()
                return await get_graph(graph_id)

            monkeypatch.setattr(b, "get_graph", flaky)
            # Queued for any node: b claims it, cannot start it, and claims it
            # again once its lease has expired.
            await sql(
                schema,
                "INSERT INTO runs (run_id, graph_id, status, current_node, state, step, "
                "loop_counters, created_at, updated_at, last_seq, attempt) VALUES "
                "('queued', 'sleepy', 'pending', 'nap', '{\"sleep_s\": 0.01}', 0, '{}', "
                "1, 1, 0, 1)",
            )
            assert b.cluster is not None
            b.cluster.wake()
            final = await b.wait("queued")
            assert final.status is RunStatus.COMPLETED
            assert not failures


async def test_a_slow_heartbeat_is_not_a_lost_one(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # lease 6 s: heartbeats every 0.75 s, and each may take up to 2 s.
    with trio.fail_after(60):
        async with nodes(schema, default_registry(), "a", lease_ttl=6.0) as (a,):
            assert a.cluster is not None
            assert isinstance(a.store, PostgresStore)
            renew = a.store.renew_leases
            slow: list[float] = []

            async def sluggish(held: Any, *, timeout_s: float) -> Any:
                slow.append(timeout_s)
                await trio.sleep(1.2)  # longer than a heartbeat, well within the timeout
                return await renew(held, timeout_s=timeout_s)

            monkeypatch.setattr(a.store, "renew_leases", sluggish)
            await a.register_graph(SLEEPY)
            run = await a.start_run("sleepy", {"sleep_s": 8.0})  # more than a lease
            final = await a.wait(run.run_id)
            assert final.status is RunStatus.COMPLETED
            assert len(slow) >= 3 and all(t == 2.0 for t in slow), slow
            assert not a.cluster.cut_off
            events = [e.event for e in await a.read_log(run.run_id)]
            assert "run_resumed" not in events  # never given up, never taken over
            assert a.store_health().ok
