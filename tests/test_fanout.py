"""Parallel and map nodes through the embedding API: each rule of docs/semantics.md
("Fan-out: parallel and map") pinned by a test."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Sequence
from contextlib import aclosing
from typing import Any

import pytest
import trio
import trio.testing
from pydantic import BaseModel, Field

from trioflow import (
    Engine,
    GraphValidationError,
    LogEntry,
    Registry,
    RunStatus,
    default_registry,
    open_engine,
)
from trioflow.fanout import MergeConflictError, merge
from trioflow.stores.memory import MemoryStore
from trioflow.stores.sqlite import SQLiteStore


def node(node_id: str, tool: str) -> dict[str, Any]:
    return {"id": node_id, "callable": tool}


def branch(
    branch_id: str | None, *nodes: dict[str, Any], edges: Sequence[Any] = ()
) -> dict[str, Any]:
    out: dict[str, Any] = {"start_node": nodes[0]["id"], "nodes": list(nodes), "edges": list(edges)}
    if branch_id is not None:
        out["id"] = branch_id
    return out


def parallel_graph(*branches: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {
        "id": "par",
        "start_node": "fan",
        "nodes": [
            {"id": "fan", "parallel": {"branches": list(branches), **options}},
            node("end", "tools.noop"),
        ],
        "edges": [{"from": "fan", "to": "end"}],
    }


def map_graph(*nodes: dict[str, Any], edges: Sequence[Any] = (), **options: Any) -> dict[str, Any]:
    spec = {"items": "state['items']", "as": "item", "branch": branch(None, *nodes, edges=edges)}
    return {
        "id": "map",
        "start_node": "each",
        "nodes": [{"id": "each", "map": {**spec, **options}}],
    }


class Calls:
    """What the test tools saw: calls per key, the most at once, cancellations."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.running = 0
        self.most = 0
        self.cancelled: list[str] = []
        self.finished: list[str] = []


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def registry(calls: Calls) -> Registry:
    reg = default_registry()

    def count(key: str) -> None:
        calls.calls[key] = calls.calls.get(key, 0) + 1

    async def work(state: BaseModel) -> dict[str, Any]:
        """Sleeps ``delay[name]`` (virtual) seconds, then sets ``out`` and appends to ``seen``."""
        data = state.model_dump()
        name = str(data.get("name", data.get("item")))
        count(name)
        calls.running += 1
        calls.most = max(calls.most, calls.running)
        try:
            await trio.sleep(float(data.get("delays", {}).get(name, 1)))
        except trio.Cancelled:
            calls.cancelled.append(name)
            raise
        finally:
            calls.running -= 1
        calls.finished.append(name)
        return {"out": f"done:{name}", "seen": [*data.get("seen", []), name]}

    def named(name: str, score: int) -> Any:
        def set_name(state: BaseModel) -> dict[str, Any]:
            return {"name": name, "score": state.model_dump().get("score", 0) + score}

        return set_name

    def boom(state: BaseModel) -> None:
        raise RuntimeError("boom")

    def fail_odd(state: BaseModel) -> dict[str, Any]:
        item = state.model_dump()["item"]
        if item % 2:
            raise ValueError(f"odd item {item}")
        return {"verdict": item * 10}

    def bump(state: BaseModel) -> dict[str, Any]:
        return {"n": state.model_dump().get("n", 0) + 1}

    async def hold(state: BaseModel) -> None:
        count("hold")
        await trio.sleep_forever()

    def concat(base: Any, values: list[Any]) -> str:
        return "+".join([str(base), *map(str, values)])

    reg.add_tool("t.work", work)
    for name, score in (("a", 1), ("b", 10), ("c", 100)):
        reg.add_tool(f"t.name_{name}", named(name, score), inline=True)
    reg.add_tool("t.boom", boom, inline=True)
    reg.add_tool("t.fail_odd", fail_odd, inline=True)
    reg.add_tool("t.bump", bump, inline=True)
    reg.add_tool("t.hold", hold)
    reg.add_tool("t.concat", concat, inline=True)
    return reg


@pytest.fixture
async def engine(registry: Registry) -> Any:
    async with open_engine(registry=registry) as e:
        yield e


async def run(engine: Engine, document: dict[str, Any], state: dict[str, Any]) -> Any:
    await engine.register_graph(document)
    started = await engine.start_run(document["id"], state)
    return await engine.wait(started.run_id)


def three(**options: Any) -> dict[str, Any]:
    """Branches a, b, c: each names itself, adds to score, then works (sleeps)."""
    return parallel_graph(
        *(
            branch(
                n,
                node(f"{n}1", f"t.name_{n}"),
                node(f"{n}2", "t.work"),
                edges=[{"from": f"{n}1", "to": f"{n}2"}],
            )
            for n in "abc"
        ),
        **options,
    )


# -- start and merge -------------------------------------------------------------------


async def test_branches_start_from_a_copy_and_merge_in_declaration_order(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    # c finishes first and a last: the merged list is still a, b, c.
    document = three(
        merge={"keys": {"seen": "extend", "score": "sum", "name": "append", "out": "replace"}}
    )
    final = await run(
        engine, document, {"delays": {"a": 3, "b": 2, "c": 1}, "seen": ["start"], "score": 5}
    )
    assert final.status == RunStatus.COMPLETED, final.error
    assert final.state["seen"] == ["start", "a", "b", "c"]  # each branch's additions, in order
    assert final.state["score"] == 5 + 1 + 10 + 100  # sum of each branch's change
    assert final.state["name"] == ["a", "b", "c"]
    assert final.state["out"] == "done:c"  # replace: the last in declaration order


async def test_a_key_two_branches_change_without_a_reducer_is_a_merge_conflict(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    final = await run(
        engine, three(merge={"keys": {"seen": "extend", "score": "sum", "out": "replace"}}), {}
    )
    assert final.status == RunStatus.FAILED
    assert final.error["code"] == "merge_conflict"
    assert final.error["details"] == {"key": "name", "branches": ["a", "b", "c"]}


def test_reducers_fold_in_the_order_given() -> None:
    base = {"l": [1], "n": 10, "d": {"x": 1}, "s": "b"}
    contributions = [
        ("one", {"l": [1, 2], "n": 12, "d": {"x": 1, "y": 2}, "s": "z"}),
        ("two", {"l": [1, 3], "n": 7, "d": {"x": 5}, "s": "a"}),
    ]
    reducers = {"l": "extend", "n": "sum", "d": "merge", "s": "max"}
    out = merge(base, contributions, reducers, "conflict")
    assert out == {"l": [1, 2, 3], "n": 10 + 2 - 3, "d": {"x": 5, "y": 2}, "s": "z"}
    assert merge(base, contributions, {**reducers, "s": "min"}, "conflict")["s"] == "a"
    assert merge(base, contributions, {**reducers, "l": "append"}, "conflict")["l"] == [
        1,
        [1, 2],
        [1, 3],
    ]
    with pytest.raises(MergeConflictError):
        merge(base, contributions, {}, "conflict")
    assert merge(base, contributions, {}, "replace")["n"] == 7
    assert merge(base, contributions, {}, "keep") == base


async def test_a_registered_tool_can_be_a_reducer(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    document = three(merge={"default": "replace", "keys": {"name": "t.concat"}})
    final = await run(engine, document, {"name": "start"})
    assert final.state["name"] == "start+a+b+c"


async def test_map_items_under_as_and_collect_in_item_order(
    autojump_clock: trio.testing.MockClock, engine: Engine, calls: Calls
) -> None:
    document = map_graph(
        node("w", "t.work"),
        collect={"from": "out", "into": "outs"},
        merge={"keys": {"seen": "extend"}},
    )
    items = [3, 1, 2]
    final = await run(
        engine, document, {"items": items, "delays": {"3": 3, "1": 1, "2": 2}, "seen": []}
    )
    assert final.status == RunStatus.COMPLETED, final.error
    assert calls.finished == ["1", "2", "3"]  # completion order
    assert final.state["outs"] == ["done:3", "done:1", "done:2"]  # item order
    assert final.state["seen"] == ["3", "1", "2"]
    assert "item" not in final.state and "out" not in final.state  # not merged back


async def test_a_map_over_max_items_fails_the_run(engine: Engine) -> None:
    final = await run(engine, map_graph(node("w", "t.bump"), max_items=2), {"items": [1, 2, 3]})
    assert final.status == RunStatus.FAILED
    assert final.error["code"] == "map_too_large"
    final = await run(engine, {**map_graph(node("w", "t.bump")), "id": "map2"}, {"items": 7})
    assert final.error["code"] == "map_items_invalid"


class Typed(BaseModel):
    items: list[int] = Field(default_factory=list)
    item: int = 0
    n: int = Field(default=0, le=1)
    verdicts: list[int | None] = Field(default_factory=list)
    verdict: int = 0


async def test_the_state_model_validates_the_merged_state(registry: Registry) -> None:
    registry.add_model("test.Typed", Typed)
    document = {
        **map_graph(node("w", "t.bump"), merge={"keys": {"n": "sum"}}),
        "state_model": "test.Typed",
    }
    async with open_engine(registry=registry) as engine:
        final = await run(engine, document, {"items": [1, 2]})
    assert final.status == RunStatus.FAILED
    assert final.error["code"] == "state_invalid"  # n = 2 > 1


# -- failure ----------------------------------------------------------------------------


async def test_fail_fast_cancels_the_siblings_and_names_the_branch(
    autojump_clock: trio.testing.MockClock, engine: Engine, calls: Calls
) -> None:
    document = parallel_graph(
        branch(
            "slow", node("s1", "t.name_a"), node("s2", "t.work"), edges=[{"from": "s1", "to": "s2"}]
        ),
        branch(
            "bad", node("b0", "t.work"), node("b1", "t.boom"), edges=[{"from": "b0", "to": "b1"}]
        ),
        merge={"default": "replace"},
    )
    # bad works 1 s, then fails; slow is 99 s from done: it is cancelled.
    final = await run(engine, document, {"delays": {"a": 100, "None": 1}})
    assert final.status == RunStatus.FAILED
    assert final.error["code"] == "branch_failed"
    assert final.error["details"]["branch"] == "bad"
    assert calls.cancelled == ["a"]  # the sibling saw Cancelled
    assert calls.running == 0


async def test_tolerated_failures_let_the_run_go_on_within_the_threshold(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    document = map_graph(
        node("w", "t.fail_odd"),
        collect={"from": "verdict", "into": "verdicts"},
        failure={"tolerated_failures": 2},
    )
    final = await run(engine, document, {"items": [0, 1, 2, 3]})
    assert final.status == RunStatus.COMPLETED, final.error
    assert final.state["verdicts"] == [0, None, 20, None]
    log = await engine.read_log(final.run_id, limit=10_000)
    done = next(e for e in log if e.event == "fanout_completed")
    assert done.data["failed"] == ["each[1]", "each[3]"]

    over = {**document, "id": "map-over"}
    final = await run(engine, over, {"items": [1, 3, 5, 0]})
    assert final.status == RunStatus.FAILED and final.error["code"] == "branch_failed"
    pct = {
        **map_graph(
            node("w", "t.fail_odd"),
            collect={"from": "verdict", "into": "verdicts"},
            failure={"tolerated_failure_pct": 50},
        ),
        "id": "map-pct",
    }
    assert (await run(engine, pct, {"items": [0, 1, 2, 3]})).status == RunStatus.COMPLETED
    pct_over = {**pct, "id": "map-pct-over"}
    assert (await run(engine, pct_over, {"items": [1, 1, 2, 3]})).status == RunStatus.FAILED


# -- concurrency and limits ------------------------------------------------------------


async def test_max_concurrency_bounds_the_branches_at_once(
    autojump_clock: trio.testing.MockClock, engine: Engine, calls: Calls
) -> None:
    document = map_graph(node("w", "t.work"), max_concurrency=3, merge={"default": "replace"})
    final = await run(engine, document, {"items": list(range(10))})
    assert final.status == RunStatus.COMPLETED, final.error
    assert calls.most == 3
    assert sum(calls.calls.values()) == 10


async def test_branch_steps_count_toward_max_steps_and_loops_count_per_branch(
    engine: Engine,
) -> None:
    looping = branch(
        None,
        node("inc", "t.bump"),
        edges=[{"from": "inc", "to": "inc", "type": "loop", "loop": {"max_iterations": 3}}],
    )
    document = {
        **map_graph(*looping["nodes"], edges=looping["edges"], merge={"keys": {"n": "max"}})
    }
    final = await run(engine, document, {"items": [1, 2]})
    assert final.status == RunStatus.COMPLETED, final.error
    assert final.state["n"] == 4  # each branch looped 3 times on its own counter
    assert final.step == 1 + 2 * 4  # the map's own step and every branch step
    small = {**document, "id": "small", "max_steps": 6}
    final = await run(engine, small, {"items": [1, 2]})
    assert final.status == RunStatus.FAILED and final.error["code"] == "branch_failed"
    assert final.error["details"]["error"]["code"] == "max_steps_exceeded"


async def test_a_map_inside_a_parallel_works(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    inner = {
        "id": "inner",
        "map": {
            "items": "state['items']",
            "branch": branch(None, node("w", "t.work")),
            "collect": {"from": "out", "into": "outs"},
            "merge": {"default": "replace"},
        },
    }
    document = parallel_graph(
        branch("mapped", inner),
        branch("plain", node("p", "t.name_a")),
        merge={"default": "replace"},
    )
    final = await run(engine, document, {"items": [1, 2]})
    assert final.status == RunStatus.COMPLETED, final.error
    assert final.state["outs"] == ["done:1", "done:2"]
    assert final.state["name"] == "a"


# -- cancellation ----------------------------------------------------------------------


async def test_cancelling_the_run_cancels_every_branch(
    autojump_clock: trio.testing.MockClock, engine: Engine, calls: Calls
) -> None:
    document = map_graph(node("w", "t.work"), merge={"default": "replace"})
    await engine.register_graph(document)
    started = await engine.start_run(
        "map", {"items": [1, 2, 3], "delays": {"1": 50, "2": 50, "3": 50}}
    )
    await trio.sleep(1)
    assert calls.running == 3
    cancelled = await engine.cancel(started.run_id)
    assert cancelled.status == RunStatus.CANCELLED
    assert sorted(calls.cancelled) == ["1", "2", "3"] and calls.running == 0


# -- validation ------------------------------------------------------------------------


def problems(registry: Registry, document: dict[str, Any]) -> list[tuple[str, str]]:
    from trioflow.graph import compile_graph

    with pytest.raises(GraphValidationError) as caught:
        compile_graph(document, registry)
    return [(p.code, p.path) for p in caught.value.problems]


def test_problems_in_branches_are_reported_at_their_nested_path(registry: Registry) -> None:
    document = parallel_graph(
        branch("ok", node("o", "tools.noop")),
        branch("bad", node("x", "nope.missing"), node("y", "tools.noop")),
        branch("ok", node("o", "tools.noop")),
    )
    found = problems(registry, document)
    assert ("unknown_callable", "$.nodes[0].parallel.branches[1].nodes[0].callable") in found
    assert ("unreachable_node", "$.nodes[0].parallel.branches[1].nodes[1]") in found
    assert ("duplicate_branch_id", "$.nodes[0].parallel.branches[2].id") in found


def test_a_wait_inside_a_branch_is_refused(registry: Registry) -> None:
    document = map_graph({"id": "ask", "wait": {"prompt": "?"}})
    assert problems(registry, document) == [
        ("wait_in_branch", "$.nodes[0].map.branch.nodes[0].wait")
    ]


def test_fan_outs_nest_to_a_bounded_depth(registry: Registry) -> None:
    leaf: dict[str, Any] = node("w", "tools.noop")
    for level in range(4):
        leaf = {"id": f"m{level}", "map": {"items": "[]", "branch": branch(None, leaf)}}
    found = problems(registry, {"id": "deep", "start_node": leaf["id"], "nodes": [leaf]})
    assert [code for code, _ in found] == ["fanout_too_deep"]


def test_merge_reducers_and_tolerance_are_checked(registry: Registry) -> None:
    document = three(
        merge={"keys": {"x": "nope"}}, failure={"tolerated_failures": 1, "tolerated_failure_pct": 5}
    )
    found = problems(registry, document)
    assert ("unknown_reducer", "$.nodes[0].parallel.merge.keys.x") in found
    assert ("invalid_failure", "$.nodes[0].parallel.failure") in found


# -- logs and checkpoints --------------------------------------------------------------


class SpyStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.saves: list[tuple[Any, list[LogEntry]]] = []

    async def save_run(self, run: Any, entries: Any, *, claim: bool = False) -> None:
        await super().save_run(run, entries, claim=claim)
        self.saves.append((run, list(entries)))


async def test_one_gapless_log_tagged_by_branch_and_the_join_in_one_checkpoint(
    autojump_clock: trio.testing.MockClock, registry: Registry
) -> None:
    store = SpyStore()
    document = map_graph(
        node("w", "t.work"), collect={"from": "out", "into": "outs"}, merge={"default": "replace"}
    )
    async with open_engine(store=store, registry=registry) as engine:
        final = await run(engine, document, {"items": [1, 2]})
        log = await engine.read_log(final.run_id)
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    tagged = [e for e in log if "branch" in e.data]
    assert {e.data["branch"] for e in tagged} == {"each[0]", "each[1]"}
    assert {e.data["item"] for e in tagged} == {0, 1}
    assert {e.event for e in tagged} >= {
        "branch_started",
        "node_started",
        "node_completed",
        "branch_completed",
    }
    # Each branch step was its own checkpoint, holding the branch's progress.
    progress = [run.fanout for run, _ in store.saves if run.fanout is not None]
    assert any(p["branches"].get("0", {}).get("status") == "running" for p in progress)
    join = [
        (run, entries)
        for run, entries in store.saves
        if any(e.event == "fanout_completed" for e in entries)
    ]
    assert len(join) == 1
    joined, entries = join[0]
    assert joined.state["outs"] == ["done:1", "done:2"] and joined.fanout is None
    assert [e.event for e in entries][:2] == ["fanout_completed", "node_completed"]


async def test_the_record_shows_each_branch_while_the_fan_out_runs(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    document = parallel_graph(
        branch("quick", node("q", "t.name_a")),
        branch("held", node("h", "t.hold")),
        merge={"default": "replace"},
    )
    await engine.register_graph(document)
    started = await engine.start_run("par", {})
    await trio.sleep(1)
    view = (await engine.get_run(started.run_id)).as_dict()["fanout"]
    assert view["node"] == "fan" and view["kind"] == "parallel" and view["not_started"] == 0
    statuses = {b["branch"]: (b["status"], b["node"]) for b in view["branches"]}
    assert statuses == {"quick": ("completed", "q"), "held": ("running", "h")}
    await engine.cancel(started.run_id)


# -- the durable stores ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_fan_out_on_each_durable_store(
    kind: str, tmp_path: pathlib.Path, registry: Registry
) -> None:
    from pgtest import fresh_schema, pg_url

    from trioflow.stores.postgres import PostgresStore

    document = map_graph(
        node("w", "t.bump"),
        edges=[{"from": "w", "to": "w", "type": "loop", "loop": {"max_iterations": 2}}],
        collect={"from": "n", "into": "ns"},
        max_concurrency=2,
    )
    with contextlib.ExitStack() as stack:
        if kind == "sqlite":
            store: Any = SQLiteStore(str(tmp_path / "fan.db"))
        else:
            schema = stack.enter_context(fresh_schema())
            store = PostgresStore(pg_url(), schema=schema, node_id="n1")
        with trio.fail_after(60):
            async with open_engine(store=store, registry=registry) as engine:
                final = await run(engine, document, {"items": list(range(5))})
                log = await engine.read_log(final.run_id, limit=10_000)
    assert final.status == RunStatus.COMPLETED, final.error
    assert final.state["ns"] == [3] * 5 and final.fanout is None
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    assert sum(e.event == "branch_completed" for e in log) == 5


# -- a crash in the middle of a fan-out -------------------------------------------------


async def until(
    engine: Engine,
    run_id: str,
    wanted: set[tuple[str, str | None]],
    node: str | None,
    *,
    after_resume: bool = False,
) -> None:
    """Follow the run's log until every (event, branch) of ``wanted`` is seen (a
    ``node_started`` counts only at ``node``)."""
    left = set(wanted)
    resumed = not after_resume
    async with aclosing(engine.follow(run_id)) as entries:
        async for entry in entries:
            resumed = resumed or entry.event == "fanout_resumed"
            if not resumed or (entry.event == "node_started" and entry.node != node):
                continue
            left.discard((entry.event, entry.data.get("branch")))
            if not left:
                return
    raise AssertionError(f"the run ended before {left}")


async def _leave_a_dirty_session(path: str) -> None:
    store = SQLiteStore(path)
    await store.open()
    await store.begin_session()
    await store.aclose()


async def test_after_a_crash_finished_branches_are_not_run_again(
    tmp_path: pathlib.Path, registry: Registry, calls: Calls
) -> None:
    path = str(tmp_path / "fan.db")
    document = parallel_graph(
        branch(
            "done", node("d1", "t.work"), node("d2", "t.name_a"), edges=[{"from": "d1", "to": "d2"}]
        ),
        branch(
            "stuck",
            node("s1", "t.name_b"),
            node("s2", "t.hold"),
            edges=[{"from": "s1", "to": "s2"}],
        ),
        merge={"default": "replace"},
    )
    with trio.fail_after(60):
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            await engine.register_graph(document)
            started = await engine.start_run("par", {"delays": {"None": 0.01}})
            await until(
                engine,
                started.run_id,
                {("branch_completed", "done"), ("node_started", "stuck")},
                "s2",
            )
            await trio.testing.wait_all_tasks_blocked()
            # A signal stored during the fan-out waits for its join, even across a crash.
            await engine.signal(started.run_id, "late", {"late": True})
        assert calls.calls == {"None": 1, "hold": 1}
        await _leave_a_dirty_session(path)
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            await until(engine, started.run_id, {("fanout_resumed", None)}, None)
            await until(
                engine, started.run_id, {("node_started", "stuck")}, "s2", after_resume=True
            )
            await trio.testing.wait_all_tasks_blocked()
            record = await engine.get_run(started.run_id)
            view = {
                b["branch"]: (b["status"], b["node"])
                for b in record.as_dict()["fanout"]["branches"]
            }
            assert view == {"done": ("completed", "d2"), "stuck": ("running", "s2")}
            log = await engine.read_log(started.run_id, limit=10_000)
            assert [e.seq for e in log] == list(range(1, len(log) + 1))
            resumed = next(e for e in log if e.event == "fanout_resumed")
            assert resumed.data["done"] == 1
            # After the resume, only the held branch's node starts again.
            after = [e for e in log if e.seq > resumed.seq and e.event == "node_started"]
            assert [(e.node, e.data.get("branch")) for e in after] == [("s2", "stuck")]
            assert not any(e.event == "signal_received" for e in log)
            assert "late" not in record.state
            await engine.cancel(started.run_id)
    # The finished branch's tool ran once; the held one resumed at its own node.
    assert calls.calls == {"None": 1, "hold": 2}


# -- found by an adversarial pass -------------------------------------------------------


async def test_a_reducer_that_raises_systemexit_fails_only_the_run(
    autojump_clock: trio.testing.MockClock, registry: Registry
) -> None:
    def leave(base: Any, values: list[Any]) -> Any:
        raise SystemExit(3)

    registry.add_tool("t.leave", leave, inline=True)
    async with open_engine(registry=registry) as engine:
        final = await run(
            engine, three(merge={"default": "replace", "keys": {"name": "t.leave"}}), {}
        )
    assert final.status == RunStatus.FAILED and final.error["code"] == "merge_failed"
    assert "SystemExit" in final.error["message"]


def test_reducers_refuse_values_of_the_wrong_type() -> None:
    from trioflow.fanout import ReducerError, changes

    with pytest.raises(ReducerError):
        merge({"n": True}, [("a", {"n": 2})], {"n": "sum"}, "conflict")
    with pytest.raises(ReducerError):
        merge({"l": "start"}, [("a", {"l": ["x"]})], {"l": "extend"}, "conflict")
    with pytest.raises(ReducerError):
        merge({"l": []}, [("a", {"l": "x"})], {"l": "extend"}, "conflict")
    # 1 -> True and 1 -> 1.0 are changes, though == says they are equal.
    assert changes({"a": 1, "b": 1, "c": 1}, {"a": True, "b": 1.0, "c": 1}) == {"a": True, "b": 1.0}


async def test_signals_wait_for_the_join(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    document = map_graph(node("w", "t.work"), merge={"keys": {"n": "sum"}, "default": "replace"})
    document["nodes"].append(node("end", "tools.noop"))
    document["edges"] = [{"from": "each", "to": "end"}]
    await engine.register_graph(document)
    started = await engine.start_run("map", {"items": [1, 2], "n": 0, "delays": {"1": 5, "2": 5}})
    await trio.sleep(1)
    await engine.signal(started.run_id, "bump", {"n": 100})
    final = await engine.wait(started.run_id)
    log = await engine.read_log(final.run_id)
    events = [e.event for e in log]
    assert events.index("signal_received") > events.index("fanout_completed")
    assert final.state["n"] == 100


async def test_nested_fan_out_steps_count_toward_max_steps(engine: Engine) -> None:
    inner = {
        "id": "inner",
        "map": {
            "items": "state['inner']",
            "branch": branch(
                None,
                node("b", "t.bump"),
                edges=[{"from": "b", "to": "b", "type": "loop", "loop": {"max_iterations": 1000}}],
            ),
            "merge": {"default": "replace"},
        },
    }
    document = {**map_graph(inner, merge={"default": "replace"}), "max_steps": 100}
    final = await run(engine, document, {"items": [0], "inner": list(range(30))})
    assert final.status == RunStatus.FAILED
    assert final.error["code"] == "branch_failed", final.error
    assert "max_steps=100" in str(final.error)
    assert final.step <= 100


async def test_a_tool_that_lets_cancelled_escape_does_not_drop_its_branch(
    autojump_clock: trio.testing.MockClock, registry: Registry
) -> None:
    async def leak(state: BaseModel) -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            try:
                await trio.sleep(1)
            except trio.Cancelled as exc:
                caught = exc
        raise caught

    registry.add_tool("t.leak", leak)
    document = parallel_graph(
        branch("ok", node("o", "t.name_a")), branch("leaky", node("l", "t.leak"))
    )
    async with open_engine(registry=registry) as engine:
        final = await run(engine, document, {})
    assert final.status == RunStatus.FAILED and final.error["code"] == "branch_failed"


async def test_a_fan_out_node_times_out_as_a_whole(
    autojump_clock: trio.testing.MockClock, engine: Engine, calls: Calls
) -> None:
    document = map_graph(node("w", "t.work"), merge={"default": "replace"})
    document["nodes"][0]["timeout_s"] = 3
    final = await run(engine, document, {"items": [1, 2], "delays": {"1": 1, "2": 100}})
    assert final.status == RunStatus.FAILED and final.error["code"] == "node_timeout"
    assert calls.cancelled == ["2"] and calls.running == 0


def test_a_fan_out_node_takes_no_retry(registry: Registry) -> None:
    document = map_graph(node("w", "tools.noop"))
    document["nodes"][0]["retry"] = {"max_attempts": 3}
    assert problems(registry, document) == [("invalid_fanout", "$.nodes[0].retry")]


async def test_the_branch_that_goes_over_the_tolerance_is_named(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    # Item 1 fails first (tolerated), item 0 later: it is the one over the tolerance.
    document = map_graph(
        node("w", "t.work"),
        node("f", "t.fail_odd"),
        edges=[{"from": "w", "to": "f"}],
        failure={"tolerated_failures": 1},
        merge={"default": "replace"},
    )
    final = await run(engine, document, {"items": [3, 1], "delays": {"3": 5, "1": 1}})
    assert final.status == RunStatus.FAILED
    assert final.error["details"]["branch"] == "each[0]"
    assert final.error["details"]["failed"] == ["each[0]", "each[1]"]


class Loose(BaseModel):
    items: list[Any] = Field(default_factory=list)
    item: int = 0
    n: int = 0


async def test_an_item_the_state_model_refuses_is_state_invalid(registry: Registry) -> None:
    registry.add_model("test.Loose", Loose)
    document = {**map_graph(node("w", "t.bump")), "state_model": "test.Loose"}
    async with open_engine(registry=registry) as engine:
        final = await run(engine, document, {"items": ["not an int"]})
    assert final.status == RunStatus.FAILED
    assert final.error["details"]["error"]["code"] == "state_invalid"
