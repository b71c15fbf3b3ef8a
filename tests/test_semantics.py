"""The execution semantics of docs/semantics.md (rules 1-7, the log), via the embedding API."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import aclosing
from typing import Any

import pytest
import trio
import trio.testing
from pydantic import BaseModel

from trioflow import (
    Engine,
    EngineLimits,
    LogEntry,
    MemoryStore,
    Registry,
    RunContext,
    RunRecord,
    RunStateError,
    RunStatus,
    StateValidationError,
    StoreError,
    UnknownRunError,
    open_engine,
)

# -- helpers -------------------------------------------------------------------


def node(node_id: str, callable_: str = "tools.noop", **extra: Any) -> dict[str, Any]:
    return {"id": node_id, "callable": callable_, **extra}


def seq(src: str, dst: str) -> dict[str, Any]:
    return {"from": src, "to": dst, "type": "sequential"}


def branch(
    src: str, dst: str, expression: str | None = None, callable_: str | None = None
) -> dict[str, Any]:
    cond = {"expression": expression} if expression is not None else {"callable": callable_}
    return {"from": src, "to": dst, "type": "branch", "condition": cond}


def loop(src: str, dst: str, max_iterations: int, until: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"max_iterations": max_iterations}
    if until is not None:
        spec["until_expression"] = until
    return {"from": src, "to": dst, "type": "loop", "loop": spec}


def doc(
    graph_id: str, nodes: list[dict[str, Any]], edges: Sequence[dict[str, Any]] = (), **extra: Any
) -> dict[str, Any]:
    return {
        "id": graph_id,
        "start_node": nodes[0]["id"],
        "nodes": nodes,
        "edges": list(edges),
        **extra,
    }


async def run_to_end(
    engine: Engine,
    document: dict[str, Any],
    state: Any = None,
) -> tuple[RunRecord, list[LogEntry]]:
    graph = await engine.register_graph(document)
    run = await engine.start_run(graph.id, state)
    with trio.fail_after(60):
        final = await engine.wait(run.run_id)
    entries = await engine.read_log(run.run_id, limit=100_000)
    assert_gapless(entries)
    return final, entries


def assert_gapless(entries: Sequence[LogEntry]) -> None:
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))


def events(entries: Sequence[LogEntry]) -> list[str]:
    return [str(e.event) for e in entries]


def started(entries: Sequence[LogEntry]) -> list[str | None]:
    return [e.node for e in entries if e.event == "node_started"]


async def wait_for(
    engine: Engine,
    run_id: str,
    event: str,
    node_id: str | None = None,
) -> LogEntry:
    async with aclosing(engine.follow(run_id)) as entries:
        async for entry in entries:
            if entry.event == event and (node_id is None or entry.node == node_id):
                return entry
    raise AssertionError(f"run ended without {event} {node_id}")


SLEEPER = doc(
    "sleeper",
    [node("start"), node("nap", "tools.sleep"), node("after")],
    [seq("start", "nap"), seq("nap", "after")],
)


# -- the specification's sample ------------------------------------------------


async def test_spec_sample_with_open_issues_loops_three_times_then_completes(
    engine: Engine, spec_graph: dict[str, Any]
) -> None:
    final, entries = await run_to_end(engine, spec_graph, {"issues_open": 1})
    assert started(entries) == [
        "submit",
        "review",
        "fix",
        "review",
        "fix",
        "review",
        "fix",
        "review",
        "fix",
    ]
    exhausted = [e for e in entries if e.event == "loop_exhausted"]
    assert len(exhausted) == 1
    assert exhausted[0].level == "warning"
    assert exhausted[0].node == "fix"
    assert exhausted[0].data["edge"] == "fix->review"
    assert final.status is RunStatus.COMPLETED
    assert final.loop_counters == {"fix->review": 3}
    assert final.state == {"issues_open": 1}
    assert final.error is None
    assert events(entries)[0] == "run_started"
    assert events(entries)[-1] == "run_completed"
    assert events(entries).index("loop_exhausted") < events(entries).index("run_completed")


async def test_spec_sample_without_issues_approves(
    engine: Engine, spec_graph: dict[str, Any]
) -> None:
    final, entries = await run_to_end(engine, spec_graph, {"issues_open": 0})
    assert started(entries) == ["submit", "review", "approve"]
    assert final.status is RunStatus.COMPLETED
    assert final.state == {"issues_open": 0, "approved": True}
    assert final.loop_counters == {}
    assert "loop_exhausted" not in events(entries)
    taken = [e.data["edge"] for e in entries if e.event == "edge_taken"]
    assert taken == ["submit->review", "review->approve"]


async def test_design_sample_with_a_callable_condition(registry: Registry, engine: Engine) -> None:
    # A variant of the sample that routes review->fix through a callable.
    registry.add_tool(
        "tests.has_open_issues", lambda state: state.get("issues_open", 0) > 0, inline=True
    )
    document = doc(
        "code-review-callable",
        [node("submit"), node("review"), node("fix"), node("approve", "tools.approve")],
        [
            seq("submit", "review"),
            branch("review", "approve", "context.get('issues_open', 0) == 0"),
            branch("review", "fix", callable_="tests.has_open_issues"),
            loop("fix", "review", 3, until="context.get('issues_open', 0) == 0"),
        ],
    )
    final, entries = await run_to_end(engine, document, {"issues_open": 2})
    assert started(entries) == ["submit"] + ["review", "fix"] * 4
    assert final.loop_counters == {"fix->review": 3}
    final, entries = await run_to_end(engine, document, {"issues_open": 0})
    assert started(entries) == ["submit", "review", "approve"]


# -- rule 1: the initial state -------------------------------------------------


class Ticket(BaseModel):
    title: str
    priority: int = 3
    tags: list[str] = []


def typed_doc(graph_id: str = "typed", tool: str = "tools.noop") -> dict[str, Any]:
    return doc(graph_id, [node("only", tool)], state_model="tests.Ticket")


async def test_initial_state_is_validated_and_normalised_by_the_state_model(
    registry: Registry, engine: Engine
) -> None:
    registry.add_model("tests.Ticket", Ticket)
    final, _ = await run_to_end(engine, typed_doc(), {"title": "bug", "priority": "1"})
    assert final.status is RunStatus.COMPLETED
    assert final.state == {"title": "bug", "priority": 1, "tags": []}


async def test_rejected_initial_state_raises_before_any_run_exists(
    registry: Registry, engine: Engine
) -> None:
    registry.add_model("tests.Ticket", Ticket)
    graph = await engine.register_graph(typed_doc())
    with pytest.raises(StateValidationError) as info:
        await engine.start_run(graph.id, {"priority": "high"})
    fields = {e["field"] for e in info.value.errors}
    assert fields == {"title", "priority"}
    assert info.value.node is None
    page = await engine.list_runs()
    assert page.items == []
    assert engine.active_runs == 0


async def test_default_model_accepts_any_json_object(engine: Engine) -> None:
    state = {
        "n": 1,
        "f": 1.5,
        "s": "x",
        "b": False,
        "none": None,
        "nested": {"list": [1, {"deep": ["a"]}]},
    }
    final, _ = await run_to_end(engine, doc("plain", [node("only")]), state)
    assert final.state == state
    run = await engine.start_run("plain")  # no initial state: an empty object
    assert run.state == {}


@pytest.mark.parametrize("bad", [[1, 2], "text", 3])
async def test_default_model_rejects_a_state_that_is_not_an_object(
    engine: Engine, bad: Any
) -> None:
    await engine.register_graph(doc("plain", [node("only")]))
    with pytest.raises(StateValidationError):
        await engine.start_run("plain", bad)
    assert (await engine.list_runs()).items == []


# -- rule 2: what a node returns ---------------------------------------------


async def test_node_returning_none_changes_nothing_even_if_it_mutated_its_argument(
    registry: Registry, engine: Engine
) -> None:
    def meddle(state: Any) -> None:
        state.sneaky = True  # not an update: only the return value counts

    registry.add_tool("tests.meddle", meddle)
    final, _ = await run_to_end(
        engine, doc("none", [node("m", "tests.meddle"), node("n")], [seq("m", "n")]), {"a": 1}
    )
    assert final.state == {"a": 1}


async def test_node_returning_a_mapping_merges_it_into_the_state(
    registry: Registry, engine: Engine
) -> None:
    registry.add_tool(
        "tests.bump", lambda state: {"n": state.get("n", 0) + 1, "seen": True}, inline=True
    )
    document = doc("merge", [node("a", "tests.bump"), node("b", "tests.bump")], [seq("a", "b")])
    final, _ = await run_to_end(engine, document, {"n": 5, "keep": "me"})
    assert final.state == {"n": 7, "keep": "me", "seen": True}


async def test_node_returning_a_whole_model_replaces_the_state(
    registry: Registry, engine: Engine
) -> None:
    registry.add_model("tests.Ticket", Ticket)

    async def rewrite(state: Ticket) -> Ticket:
        return Ticket(title=state.title.upper(), tags=["done"])

    registry.add_tool("tests.rewrite", rewrite)
    final, _ = await run_to_end(
        engine, typed_doc(tool="tests.rewrite"), {"title": "bug", "priority": 1}
    )
    assert final.state == {"title": "BUG", "priority": 3, "tags": ["done"]}


async def test_node_gets_its_state_model_instance(registry: Registry, engine: Engine) -> None:
    registry.add_model("tests.Ticket", Ticket)
    got: list[Any] = []
    registry.add_tool("tests.capture", got.append, inline=True)
    await run_to_end(engine, typed_doc(tool="tests.capture"), {"title": "t"})
    assert len(got) == 1
    assert isinstance(got[0], Ticket)
    assert got[0].title == "t"


async def test_run_context_carries_ids_and_its_log_lines_precede_node_completed(
    registry: Registry, engine: Engine
) -> None:
    contexts: list[RunContext] = []

    async def with_ctx(state: Any, ctx: RunContext) -> dict[str, Any]:
        contexts.append(ctx)
        ctx.log("first line", level="warning", answer=42)
        ctx.log("second line")
        return {"done": ctx.node_id}

    def sync_with_ctx(state: Any, ctx: RunContext) -> None:
        contexts.append(ctx)
        ctx.log("from a worker thread")

    registry.add_tool("tests.with_ctx", with_ctx)
    registry.add_tool("tests.sync_with_ctx", sync_with_ctx)
    document = doc(
        "ctx",
        [node("a"), node("b", "tests.with_ctx"), node("c", "tests.sync_with_ctx")],
        [seq("a", "b"), seq("b", "c")],
    )
    graph = await engine.register_graph(document)
    run = await engine.start_run(graph.id)
    final = await engine.wait(run.run_id)
    entries = await engine.read_log(run.run_id)
    assert_gapless(entries)
    assert final.state == {"done": "b"}
    assert [(c.run_id, c.graph_id, c.node_id, c.step) for c in contexts] == [
        (run.run_id, "ctx", "b", 2),
        (run.run_id, "ctx", "c", 3),
    ]
    b_events = [(e.event, e.message) for e in entries if e.node == "b"]
    assert b_events == [
        ("node_started", b_events[0][1]),
        ("custom", "first line"),
        ("custom", "second line"),
        ("node_completed", b_events[3][1]),
        ("edge_taken", b_events[4][1]),
    ]
    first = next(e for e in entries if e.message == "first line")
    assert first.level == "warning"
    assert first.data == {"answer": 42}
    c_events = [(e.event, e.message) for e in entries if e.node == "c"]
    assert ("custom", "from a worker thread") in c_events
    assert [ev for ev, _ in c_events].index("custom") < [ev for ev, _ in c_events].index(
        "node_completed"
    )


class Counter(BaseModel):
    count: int = 0


async def test_update_that_breaks_the_model_fails_the_run_naming_node_and_field(
    registry: Registry, engine: Engine
) -> None:
    registry.add_model("tests.Counter", Counter)
    registry.add_tool("tests.corrupt", lambda state: {"count": "many"}, inline=True)
    document = doc(
        "corrupt",
        [node("ok"), node("bad", "tests.corrupt"), node("never")],
        [seq("ok", "bad"), seq("bad", "never")],
        state_model="tests.Counter",
    )
    final, entries = await run_to_end(engine, document, {"count": 1})
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert final.error["code"] == "state_invalid"
    assert final.error["node"] == "bad"
    assert "count" in final.error["message"]
    assert [e["field"] for e in final.error["details"]["errors"]] == ["count"]
    assert final.state == {"count": 1}  # the bad update was not applied
    assert "never" not in started(entries)
    assert events(entries)[-1] == "run_failed"


@pytest.mark.parametrize("returned", [42, "text", [("a", 1)], Counter(count=2)])
async def test_node_returning_something_else_fails_with_state_invalid(
    registry: Registry, engine: Engine, returned: Any
) -> None:
    # The default model is JsonState, so even a (foreign) model instance is refused.
    registry.add_tool("tests.odd", lambda state: returned, inline=True)
    final, _ = await run_to_end(engine, doc("odd", [node("x", "tests.odd")]), {"a": 1})
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert (final.error["code"], final.error["node"]) == ("state_invalid", "x")
    assert final.state == {"a": 1}


# -- rule 3: where callables run ----------------------------------------------


async def test_async_and_inline_tools_run_on_the_loop_sync_tools_in_a_thread(
    registry: Registry, engine: Engine
) -> None:
    idents: dict[str, int] = {}

    async def on_loop(state: Any) -> None:
        idents["async"] = threading.get_ident()
        trio.lowlevel.current_task()  # raises outside Trio

    def inline(state: Any) -> None:
        idents["inline"] = threading.get_ident()

    def threaded(state: Any) -> None:
        idents["thread"] = threading.get_ident()

    registry.add_tool("tests.on_loop", on_loop)
    registry.add_tool("tests.inline", inline, inline=True)
    registry.add_tool("tests.threaded", threaded)
    document = doc(
        "where",
        [node("a", "tests.on_loop"), node("b", "tests.inline"), node("c", "tests.threaded")],
        [seq("a", "b"), seq("b", "c")],
    )
    final, _ = await run_to_end(engine, document)
    assert final.status is RunStatus.COMPLETED
    main = threading.get_ident()
    assert idents["async"] == main
    assert idents["inline"] == main
    assert idents["thread"] != main


async def test_an_object_with_an_async_call_is_an_async_tool(
    registry: Registry, engine: Engine
) -> None:
    class Reviewer:
        async def __call__(self, state: Any, ctx: RunContext) -> dict[str, Any]:
            await trio.lowlevel.checkpoint()
            return {"thread": threading.get_ident(), "node": ctx.node_id}

    registry.add_tool("tests.reviewer", Reviewer())
    final, _ = await run_to_end(engine, doc("obj", [node("r", "tests.reviewer")]))
    assert final.status is RunStatus.COMPLETED
    assert final.state == {"thread": threading.get_ident(), "node": "r"}


async def test_a_blocking_sync_tool_does_not_block_other_runs(
    registry: Registry, engine: Engine
) -> None:
    release = threading.Event()

    def block(state: Any) -> dict[str, Any]:
        release.wait(10)
        return {"blocked": True}

    registry.add_tool("tests.block", block)
    await engine.register_graph(doc("blocker", [node("b", "tests.block")]))
    blocked = await engine.start_run("blocker")
    try:
        with trio.fail_after(10):
            final, _ = await run_to_end(engine, doc("quick", [node("q")]))
        assert final.status is RunStatus.COMPLETED
        assert (await engine.get_run(blocked.run_id)).status is RunStatus.RUNNING
    finally:
        release.set()
    with trio.fail_after(10):
        assert (await engine.wait(blocked.run_id)).state == {"blocked": True}


# -- rule 4: choosing the next edge, in a real run ------------------------------


async def test_loop_counters_never_reset_across_outer_iterations(engine: Engine) -> None:
    # inner's self-loop may fire 2 times in the whole run, not 2 times per outer pass.
    document = doc(
        "nested",
        [node("start"), node("inner"), node("outer")],
        [
            seq("start", "inner"),
            loop("inner", "inner", 2),
            seq("inner", "outer"),
            loop("outer", "start", 2),
        ],
    )
    final, entries = await run_to_end(engine, document)
    assert started(entries) == [
        "start",
        "inner",
        "inner",
        "inner",
        "outer",
        "start",
        "inner",
        "outer",
        "start",
        "inner",
        "outer",
    ]
    assert final.loop_counters == {"inner->inner": 2, "outer->start": 2}
    exhausted = [e.data["edge"] for e in entries if e.event == "loop_exhausted"]
    assert exhausted == ["inner->inner", "inner->inner", "inner->inner", "outer->start"]
    iterations = [
        e.data.get("iteration")
        for e in entries
        if e.event == "edge_taken" and e.data["type"] == "loop"
    ]
    assert iterations == [1, 2, 1, 2]


async def test_conditions_see_the_state_the_node_just_returned(
    registry: Registry, engine: Engine
) -> None:
    registry.add_tool("tests.resolve", lambda state: {"issues_open": 0}, inline=True)
    document = doc(
        "resolve",
        [node("fix", "tests.resolve"), node("ok"), node("again")],
        [branch("fix", "ok", "context['issues_open'] == 0"), seq("fix", "again")],
    )
    final, entries = await run_to_end(engine, document, {"issues_open": 5})
    assert started(entries) == ["fix", "ok"]
    assert final.state == {"issues_open": 0}


async def test_until_expression_ends_a_loop_early(registry: Registry, engine: Engine) -> None:
    registry.add_tool("tests.work", lambda state: {"left": state.get("left") - 1}, inline=True)
    document = doc(
        "until",
        [node("work", "tests.work"), node("done")],
        [loop("work", "work", 100, until="context['left'] <= 0"), seq("work", "done")],
    )
    final, entries = await run_to_end(engine, document, {"left": 3})
    assert started(entries) == ["work", "work", "work", "done"]
    assert final.loop_counters == {"work->work": 2}
    assert "loop_exhausted" not in events(entries)


async def test_max_steps_fails_the_run(engine: Engine) -> None:
    document = doc(
        "capped", [node("a"), node("b")], [seq("a", "b"), loop("b", "a", 100)], max_steps=5
    )
    final, entries = await run_to_end(engine, document)
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert final.error["code"] == "max_steps_exceeded"
    assert final.error["node"] == "b"  # the node that would have been step 6
    assert len(started(entries)) == 5
    assert events(entries)[-1] == "run_failed"


async def test_max_steps_equal_to_the_path_length_is_enough(engine: Engine) -> None:
    document = doc(
        "exact", [node("a"), node("b"), node("c")], [seq("a", "b"), seq("b", "c")], max_steps=3
    )
    final, _ = await run_to_end(engine, document)
    assert final.status is RunStatus.COMPLETED
    assert final.step == 3


# -- rule 5: failures, timeouts and retries -------------------------------------


async def test_a_raising_node_fails_the_run(engine: Engine) -> None:
    document = doc(
        "fails",
        [node("ok", "tools.approve"), node("boom", "tools.fail"), node("never")],
        [seq("ok", "boom"), seq("boom", "never")],
    )
    final, entries = await run_to_end(engine, document, {"fail_message": "kaput"})
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert final.error["code"] == "node_failed"
    assert final.error["node"] == "boom"
    assert final.error["type"] == "ToolFailure"
    assert "kaput" in final.error["message"]
    assert final.state == {"fail_message": "kaput", "approved": True}
    assert final.finished_at is not None
    failed = [e for e in entries if e.event == "node_failed"]
    assert len(failed) == 1
    assert (failed[0].node, failed[0].level) == ("boom", "error")
    assert failed[0].data["type"] == "ToolFailure"
    assert events(entries)[-1] == "run_failed"
    assert entries[-1].data["error"]["node"] == "boom"
    assert "never" not in started(entries)


async def test_a_raising_condition_fails_the_run_naming_node_and_edge(
    registry: Registry, engine: Engine
) -> None:
    def broken(state: Any) -> bool:
        raise ValueError("cannot decide")

    registry.add_tool("tests.broken", broken, inline=True)
    document = doc(
        "badcond",
        [node("a", "tools.approve"), node("b"), node("c")],
        [branch("a", "b", callable_="tests.broken"), seq("a", "c")],
    )
    final, entries = await run_to_end(engine, document)
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert final.error["code"] == "condition_failed"
    assert (final.error["node"], final.error["edge"]) == ("a", "a->b")
    assert "cannot decide" in final.error["message"]
    # The node itself completed; its update is kept.
    assert final.state == {"approved": True}
    assert events(entries)[-3:] == ["node_started", "node_completed", "run_failed"]


async def test_a_failing_expression_fails_the_run_naming_node_and_edge(engine: Engine) -> None:
    document = doc(
        "badexpr",
        [node("a"), node("b"), node("c")],
        [branch("a", "b", "context['missing'] > 0"), seq("a", "c")],
    )
    final, _ = await run_to_end(engine, document)
    assert final.error is not None
    assert (final.error["code"], final.error["node"], final.error["edge"]) == (
        "condition_failed",
        "a",
        "a->b",
    )


async def test_node_timeout_fails_the_run_in_virtual_time(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    document = doc("slow", [node("nap", "tools.sleep", timeout_s=2)])
    start = trio.current_time()
    final, entries = await run_to_end(engine, document, {"sleep_s": 3600})
    assert trio.current_time() - start == pytest.approx(2)
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert (final.error["code"], final.error["node"]) == ("node_timeout", "nap")
    assert events(entries)[-2:] == ["node_failed", "run_failed"]


async def test_node_timeout_abandons_a_blocking_sync_tool(
    autojump_clock: trio.testing.MockClock, registry: Registry, engine: Engine
) -> None:
    release = threading.Event()

    def stuck(state: Any) -> dict[str, Any]:
        release.wait(10)
        return {"late": True}

    registry.add_tool("tests.stuck", stuck)
    try:
        final, _ = await run_to_end(engine, doc("stuck", [node("s", "tests.stuck", timeout_s=1)]))
    finally:
        release.set()
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert final.error["code"] == "node_timeout"
    assert "late" not in final.state


class Flaky:
    """Fails ``failures`` times, then returns the attempt it succeeded on."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: list[int] = []

    async def __call__(self, state: Any, ctx: RunContext) -> dict[str, Any]:
        self.attempts.append(ctx.attempt)
        if len(self.attempts) <= self.failures:
            raise ConnectionError(f"failure {len(self.attempts)}")
        return {"succeeded_on": ctx.attempt}


def retry_doc(max_attempts: int, **retry: Any) -> dict[str, Any]:
    spec = {"max_attempts": max_attempts, "backoff_s": 1, "jitter": False, **retry}
    return doc("flaky", [node("f", "tests.flaky", retry=spec), node("next")], [seq("f", "next")])


async def test_retry_succeeds_after_failures_with_exponential_backoff(
    autojump_clock: trio.testing.MockClock, registry: Registry, engine: Engine
) -> None:
    flaky = Flaky(failures=3)
    registry.add_tool("tests.flaky", flaky)
    start = trio.current_time()
    final, entries = await run_to_end(engine, retry_doc(4, multiplier=2))
    assert trio.current_time() - start == pytest.approx(1 + 2 + 4)
    assert final.status is RunStatus.COMPLETED
    assert final.state == {"succeeded_on": 4}
    assert flaky.attempts == [1, 2, 3, 4]
    retrying = [e for e in entries if e.event == "node_retrying"]
    assert [(e.data["attempt"], e.data["delay_s"]) for e in retrying] == [(1, 1), (2, 2), (3, 4)]
    assert all(e.node == "f" and e.level == "warning" for e in retrying)
    assert retrying[0].data["type"] == "ConnectionError"
    assert "node_failed" not in events(entries)
    assert started(entries) == ["f", "next"]  # one step, several attempts


async def test_retry_backoff_is_capped_by_max_backoff(
    autojump_clock: trio.testing.MockClock, registry: Registry, engine: Engine
) -> None:
    registry.add_tool("tests.flaky", Flaky(failures=3))
    start = trio.current_time()
    final, _ = await run_to_end(engine, retry_doc(4, multiplier=10, max_backoff_s=5))
    assert trio.current_time() - start == pytest.approx(1 + 5 + 5)
    assert final.status is RunStatus.COMPLETED


async def test_retry_exhaustion_fails_the_run(
    autojump_clock: trio.testing.MockClock, registry: Registry, engine: Engine
) -> None:
    flaky = Flaky(failures=100)
    registry.add_tool("tests.flaky", flaky)
    start = trio.current_time()
    final, entries = await run_to_end(engine, retry_doc(3, multiplier=3))
    assert trio.current_time() - start == pytest.approx(1 + 3)
    assert flaky.attempts == [1, 2, 3]
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert (final.error["code"], final.error["node"], final.error["type"]) == (
        "node_failed",
        "f",
        "ConnectionError",
    )
    assert final.error["details"]["attempts"] == 3
    assert events(entries)[-4:] == ["node_retrying", "node_retrying", "node_failed", "run_failed"]
    assert "failure 3" in final.error["message"]


async def test_timeouts_are_retried_per_attempt(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    document = doc(
        "slow-retry",
        [
            node(
                "nap",
                "tools.sleep",
                timeout_s=2,
                retry={"max_attempts": 3, "backoff_s": 0.5, "multiplier": 1, "jitter": False},
            )
        ],
    )
    start = trio.current_time()
    final, entries = await run_to_end(engine, document, {"sleep_s": 3600})
    assert trio.current_time() - start == pytest.approx(3 * 2 + 2 * 0.5)
    assert final.error is not None
    assert final.error["code"] == "node_timeout"
    assert events(entries).count("node_retrying") == 2


# -- rule 7: cancellation ----------------------------------------------------------


async def test_cancel_an_async_node_is_immediate(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    await engine.register_graph(SLEEPER)
    run = await engine.start_run("sleeper", {"sleep_s": 3600})
    await wait_for(engine, run.run_id, "node_started", "nap")
    start = trio.current_time()
    with trio.fail_after(1):
        final = await engine.cancel(run.run_id)
    assert trio.current_time() - start < 0.01
    assert final.status is RunStatus.CANCELLED
    assert final.finished_at is not None
    entries = await engine.read_log(run.run_id)
    assert_gapless(entries)
    assert entries[-1].event == "run_cancelled"
    assert entries[-1].node == "nap"
    assert "after" not in started(entries)
    assert (await engine.get_run(run.run_id)).status is RunStatus.CANCELLED
    assert engine.active_runs == 0
    # The engine is still fully usable.
    again, _ = await run_to_end(engine, SLEEPER, {"sleep_s": 1})
    assert again.status is RunStatus.COMPLETED


async def test_cancel_a_blocking_sync_node_abandons_its_thread_and_discards_the_result(
    registry: Registry, engine: Engine
) -> None:
    entered = trio.Event()
    release = threading.Event()
    returned = threading.Event()

    def block(state: Any) -> dict[str, Any]:
        trio.from_thread.run_sync(entered.set)
        release.wait(10)
        returned.set()
        return {"result": "should be discarded"}

    registry.add_tool("tests.block", block)
    await engine.register_graph(
        doc("blocking", [node("b", "tests.block"), node("after")], [seq("b", "after")])
    )
    run = await engine.start_run("blocking", {"x": 1})
    try:
        with trio.fail_after(10):
            await entered.wait()
        start = trio.current_time()
        with trio.fail_after(5):
            final = await engine.cancel(run.run_id)
        assert trio.current_time() - start < 1  # did not wait for the thread
        assert final.status is RunStatus.CANCELLED
        assert engine.active_runs == 0
        before = await engine.read_log(run.run_id)
    finally:
        release.set()
    with trio.fail_after(10):
        await trio.to_thread.run_sync(returned.wait)
    await trio.testing.wait_all_tasks_blocked()
    after_thread = await engine.get_run(run.run_id)
    assert after_thread.status is RunStatus.CANCELLED
    assert after_thread.state == {"x": 1}
    assert await engine.read_log(run.run_id) == before
    assert before[-1].event == "run_cancelled"
    assert "after" not in started(before)


async def test_cancel_a_finished_run_is_a_conflict(engine: Engine) -> None:
    done, _ = await run_to_end(engine, doc("quick", [node("q")]))
    with pytest.raises(RunStateError) as info:
        await engine.cancel(done.run_id)
    assert info.value.status == "completed"
    failed, _ = await run_to_end(engine, doc("fails", [node("f", "tools.fail")]))
    with pytest.raises(RunStateError):
        await engine.cancel(failed.run_id)
    assert (await engine.get_run(done.run_id)).status is RunStatus.COMPLETED
    assert (await engine.get_run(failed.run_id)).status is RunStatus.FAILED


async def test_cancel_an_unknown_run(engine: Engine) -> None:
    with pytest.raises(UnknownRunError):
        await engine.cancel("no-such-run")


async def test_cancel_is_idempotent(autojump_clock: trio.testing.MockClock, engine: Engine) -> None:
    await engine.register_graph(SLEEPER)
    run = await engine.start_run("sleeper", {"sleep_s": 3600})
    await wait_for(engine, run.run_id, "node_started", "nap")
    results: list[RunRecord] = []

    async def cancel() -> None:
        results.append(await engine.cancel(run.run_id))

    async with trio.open_nursery() as nursery:  # two at once
        nursery.start_soon(cancel)
        nursery.start_soon(cancel)
    results.append(await engine.cancel(run.run_id))  # and once more afterwards
    assert [r.status for r in results] == [RunStatus.CANCELLED] * 3
    entries = await engine.read_log(run.run_id)
    assert_gapless(entries)
    assert events(entries).count("run_cancelled") == 1


async def test_cancel_a_pending_run(
    autojump_clock: trio.testing.MockClock, registry: Registry
) -> None:
    async with open_engine(registry=registry, limits=EngineLimits(max_running=1)) as engine:
        await engine.register_graph(SLEEPER)
        holder = await engine.start_run("sleeper", {"sleep_s": 3600})
        await wait_for(engine, holder.run_id, "node_started", "nap")
        queued = await engine.start_run("sleeper", {"sleep_s": 1})
        await trio.testing.wait_all_tasks_blocked()
        assert (await engine.get_run(queued.run_id)).status is RunStatus.PENDING
        final = await engine.cancel(queued.run_id)
        assert final.status is RunStatus.CANCELLED
        assert final.started_at is None
        entries = await engine.read_log(queued.run_id)
        assert events(entries) == ["run_cancelled"]
        assert_gapless(entries)
        # The slot holder was not disturbed; once it is cancelled, the slot is free.
        assert (await engine.get_run(holder.run_id)).status is RunStatus.RUNNING
        await engine.cancel(holder.run_id)
        assert engine.active_runs == 0
        again, _ = await run_to_end(engine, SLEEPER, {"sleep_s": 1})
        assert again.status is RunStatus.COMPLETED


async def test_cancel_during_retry_backoff(
    autojump_clock: trio.testing.MockClock, registry: Registry, engine: Engine
) -> None:
    registry.add_tool("tests.flaky", Flaky(failures=100))
    await engine.register_graph(retry_doc(5, backoff_s=1000))
    run = await engine.start_run("flaky")
    await wait_for(engine, run.run_id, "node_retrying")
    start = trio.current_time()
    final = await engine.cancel(run.run_id)
    assert trio.current_time() - start < 1
    assert final.status is RunStatus.CANCELLED
    entries = await engine.read_log(run.run_id)
    assert_gapless(entries)
    assert entries[-1].event == "run_cancelled"


class CheckpointingStore(MemoryStore):
    """A memory store that yields to the scheduler on every write, as real I/O does."""

    async def save_run(self, run: RunRecord, entries: Sequence[LogEntry]) -> None:
        await trio.lowlevel.checkpoint()
        await super().save_run(run, entries)


async def test_cancel_while_a_checkpoint_is_being_written_keeps_the_log_gapless(
    registry: Registry,
) -> None:
    store = CheckpointingStore()
    document = doc(
        "busy", [node("a"), node("b")], [seq("a", "b"), loop("b", "a", 10_000)], max_steps=100_000
    )
    async with open_engine(store=store, registry=registry) as engine:
        await engine.register_graph(document)
        for _ in range(5):
            run = await engine.start_run("busy")
            with trio.fail_after(10):
                async with aclosing(engine.follow(run.run_id)) as entries:
                    async for entry in entries:
                        if entry.seq >= 20:
                            break
                final = await engine.cancel(run.run_id)
            assert final.status is RunStatus.CANCELLED
            log = await engine.read_log(run.run_id, limit=100_000)
            assert_gapless(log)
            assert log[-1].event == "run_cancelled"
            assert final.last_seq == log[-1].seq


class GatedStore(MemoryStore):
    """Holds the write of a completed record until ``gate`` is set, as slow I/O would."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = trio.Event()
        self.gate = trio.Event()

    async def save_run(self, run: RunRecord, entries: Sequence[LogEntry]) -> None:
        if run.status is RunStatus.COMPLETED and not self.gate.is_set():
            self.reached.set()
            await self.gate.wait()
        await super().save_run(run, entries)


async def test_cancel_that_interrupts_the_final_write_ends_the_run_cancelled(
    registry: Registry,
) -> None:
    store = GatedStore()
    async with open_engine(store=store, registry=registry) as engine:
        await engine.register_graph(doc("one", [node("only")]))
        run = await engine.start_run("one")
        with trio.fail_after(10):
            await store.reached.wait()
            final = await engine.cancel(run.run_id)
        # The completion was never stored, so the cancel won; nothing is left running.
        assert final.status is RunStatus.CANCELLED
        entries = await engine.read_log(run.run_id)
        assert_gapless(entries)
        assert events(entries)[-1] == "run_cancelled"
        assert "run_completed" not in events(entries)
        assert engine.active_runs == 0


class FailingStore(MemoryStore):
    """Refuses the checkpoint of one step for good (not a transient error)."""

    async def save_run(self, run: RunRecord, entries: Sequence[LogEntry]) -> None:
        if run.step == 2 and run.status is RunStatus.RUNNING:
            raise StoreError("refused")
        await super().save_run(run, entries)


async def test_a_store_failure_fails_the_run_not_the_engine(registry: Registry) -> None:
    async with open_engine(store=FailingStore(), registry=registry) as engine:
        await engine.register_graph(
            doc("three", [node("a"), node("b"), node("c")], [seq("a", "b"), seq("b", "c")])
        )
        run = await engine.start_run("three")
        with trio.fail_after(10):
            final = await engine.wait(run.run_id)
        assert final.status is RunStatus.FAILED
        assert final.error is not None
        assert final.error["code"] == "store_unavailable"
        assert "refused" in final.error["message"]
        entries = await engine.read_log(run.run_id)
        assert_gapless(entries)
        assert events(entries) == ["run_started", "node_started", "run_failed"]
        assert engine.active_runs == 0


# -- logs -----------------------------------------------------------------------


async def test_follow_after_replays_from_the_next_entry(engine: Engine) -> None:
    final, entries = await run_to_end(
        engine, doc("three", [node("a"), node("b"), node("c")], [seq("a", "b"), seq("b", "c")])
    )
    assert final.last_seq == len(entries)
    for k in (0, 1, 5, len(entries) - 1):
        replay = [e async for e in engine.follow(final.run_id, after=k)]
        assert replay == entries[k:]
    assert [e async for e in engine.follow(final.run_id, after=len(entries))] == []


async def test_follow_started_before_the_run_gets_everything_live(
    registry: Registry, engine: Engine
) -> None:
    gate = trio.Event()

    async def gated(state: Any) -> None:
        await gate.wait()

    registry.add_tool("tests.gated", gated)
    await engine.register_graph(
        doc("gated", [node("g", "tests.gated"), node("x")], [seq("g", "x")])
    )
    run = await engine.start_run("gated")
    received: list[tuple[LogEntry, bool]] = []

    async def follow() -> None:
        async for entry in engine.follow(run.run_id):
            received.append((entry, gate.is_set()))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await trio.testing.wait_all_tasks_blocked()
            # The run is parked in g; the follower has what exists so far and waits.
            assert [e.event for e, _ in received] == ["run_started", "node_started"]
            gate.set()
        # The follower ended by itself after the terminal entry.
    entries = await engine.read_log(run.run_id)
    assert [e for e, _ in received] == entries
    assert entries[-1].event == "run_completed"
    assert all(live for _, live in received[2:])


async def test_fifty_followers_each_get_every_entry_once_in_order(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    document = doc(
        "naps",
        [node("a", "tools.sleep"), node("b", "tools.sleep")],
        [seq("a", "b"), loop("b", "a", 5)],
    )
    await engine.register_graph(document)
    run = await engine.start_run("naps", {"sleep_s": 0.25})
    got: list[list[int]] = [[] for _ in range(50)]

    async def follow(i: int) -> None:
        if i % 2:
            await trio.sleep(i * 0.1)  # late joiners replay what they missed
        async for entry in engine.follow(run.run_id):
            got[i].append(entry.seq)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(follow, i)
    final = await engine.get_run(run.run_id)
    assert final.status is RunStatus.COMPLETED
    expected = list(range(1, final.last_seq + 1))
    assert all(seqs == expected for seqs in got)


async def test_a_stalled_follower_delays_neither_the_run_nor_other_followers(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    document = doc(
        "naps",
        [node("a", "tools.sleep"), node("b", "tools.sleep")],
        [seq("a", "b"), loop("b", "a", 20)],
    )
    await engine.register_graph(document)
    run = await engine.start_run("naps", {"sleep_s": 0.5})
    stalled_got: list[int] = []
    healthy_got: list[int] = []

    async def stalled() -> None:
        async with aclosing(engine.follow(run.run_id)) as entries:
            async for entry in entries:
                stalled_got.append(entry.seq)
                await trio.sleep_forever()

    async def healthy() -> None:
        async for entry in engine.follow(run.run_id):
            healthy_got.append(entry.seq)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stalled)
        nursery.start_soon(healthy)
        start = trio.current_time()
        with trio.fail_after(100):
            final = await engine.wait(run.run_id)
        # 42 naps of 0.5 s: the run took exactly its own time.
        assert trio.current_time() - start == pytest.approx(42 * 0.5)
        assert final.status is RunStatus.COMPLETED
        await trio.testing.wait_all_tasks_blocked()
        assert healthy_got == list(range(1, final.last_seq + 1))
        assert stalled_got == [1]
        nursery.cancel_scope.cancel()


async def test_follow_an_unknown_run(engine: Engine) -> None:
    with pytest.raises(UnknownRunError):
        async for _ in engine.follow("no-such-run"):
            pass  # pragma: no cover


async def test_every_run_has_a_gapless_log_whatever_its_outcome(
    autojump_clock: trio.testing.MockClock,
    registry: Registry,
    engine: Engine,
    spec_graph: dict[str, Any],
) -> None:
    await engine.register_graph(spec_graph)
    await engine.register_graph(SLEEPER)
    await engine.register_graph(doc("fails", [node("a"), node("f", "tools.fail")], [seq("a", "f")]))
    runs = []
    for i in range(10):
        runs.append(await engine.start_run("code-review-a", {"issues_open": i % 2}))
        runs.append(await engine.start_run("fails"))
        runs.append(await engine.start_run("sleeper", {"sleep_s": 100}))
    await trio.sleep(10)
    for run in runs[2::3]:
        await engine.cancel(run.run_id)
    statuses = set()
    for run in runs:
        final = await engine.wait(run.run_id)
        statuses.add(final.status)
        entries = await engine.read_log(run.run_id)
        assert_gapless(entries)
        assert final.last_seq == len(entries)
        assert entries[-1].is_terminal
        assert sum(e.is_terminal for e in entries) == 1
    assert statuses == {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED}


# -- isolation: a failing run never fails the engine --------------------------------


async def test_failing_runs_do_not_disturb_other_runs(
    autojump_clock: trio.testing.MockClock, registry: Registry, engine: Engine
) -> None:
    async def explode(state: Any) -> None:
        await trio.sleep(1)
        raise RuntimeError("boom")

    registry.add_tool("tests.explode", explode)
    await engine.register_graph(doc("explodes", [node("e", "tests.explode")]))
    await engine.register_graph(SLEEPER)
    bad = [await engine.start_run("explodes") for _ in range(5)]
    good = [await engine.start_run("sleeper", {"sleep_s": 2}) for _ in range(5)]
    for run in bad:
        assert (await engine.wait(run.run_id)).status is RunStatus.FAILED
    for run in good:
        assert (await engine.wait(run.run_id)).status is RunStatus.COMPLETED
    later, _ = await run_to_end(engine, SLEEPER, {"sleep_s": 1})
    assert later.status is RunStatus.COMPLETED
    assert engine.active_runs == 0
