"""Runs that wait for input, and signals: through the embedding API, on virtual time.

Over HTTP and WebSocket the same rules are tested in tests/web/test_web_waits.py.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, cast

import pytest
import trio
import trio.testing
from pydantic import BaseModel

from trioflow import (
    Engine,
    GraphValidationError,
    InputValidationError,
    LogEntry,
    Registry,
    RunStateError,
    RunStatus,
    StaleRequestError,
    StateValidationError,
    compile_graph,
    open_engine,
)
from trioflow.stores.sqlite import SQLiteStore

APPROVAL_SCHEMA = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}, "comment": {"type": "string", "maxLength": 50}},
    "required": ["approved"],
    "additionalProperties": False,
}


def review_graph(
    wait: dict[str, Any] | None = None, *, callable_: str | None = None
) -> dict[str, Any]:
    spec = {"prompt": "Approve the fixes?", "input_schema": APPROVAL_SCHEMA, **(wait or {})}
    human: dict[str, Any] = {"id": "human", "wait": spec}
    if callable_ is not None:
        human["callable"] = callable_
    return {
        "id": "review",
        "start_node": "check",
        "nodes": [
            {"id": "check", "callable": "tools.noop"},
            human,
            {"id": "merge", "callable": "tools.approve"},
            {"id": "reject", "callable": "tools.noop"},
        ],
        "edges": [
            {"from": "check", "to": "human"},
            {
                "from": "human",
                "to": "merge",
                "type": "branch",
                "condition": {"expression": "context.get('approved') == True"},
            },
            {"from": "human", "to": "reject"},
        ],
    }


def events(entries: list[LogEntry]) -> list[str]:
    return [e.event for e in entries]


def gapless(entries: list[LogEntry]) -> bool:
    return [e.seq for e in entries] == list(range(1, len(entries) + 1))


async def start_waiting(engine: Engine, graph: dict[str, Any], state: Any = None) -> str:
    await engine.register_graph(graph)
    run = await engine.start_run(graph["id"], state)
    stopped = await engine.wait_stop(run.run_id)
    assert stopped.status is RunStatus.WAITING
    return run.run_id


# -- waiting and resuming -------------------------------------------------------------


async def test_a_run_waits_then_a_resume_completes_it(engine: Engine) -> None:
    run_id = await start_waiting(engine, review_graph(), {"pr": 7})
    waiting = await engine.get_run(run_id)
    assert waiting.current_node == "human"
    assert waiting.waiting is not None
    assert waiting.waiting["prompt"] == "Approve the fixes?"
    assert waiting.waiting["input_schema"] == APPROVAL_SCHEMA
    assert waiting.waiting["deadline"] is None
    request_id = waiting.waiting["request_id"]
    assert engine.active_runs == 0  # it holds no task

    resumed = await engine.resume(
        run_id, {"approved": True, "comment": "ship it"}, request_id=request_id
    )
    assert resumed.status is RunStatus.RUNNING
    final = await engine.wait(run_id)
    assert final.status is RunStatus.COMPLETED
    assert final.state == {"pr": 7, "approved": True, "comment": "ship it"}
    assert final.waiting is None
    log = await engine.read_log(run_id)
    assert gapless(log)
    assert events(log) == [
        "run_started",
        "node_started",
        "node_completed",
        "edge_taken",
        "node_started",
        "run_waiting",
        "run_input",
        "node_completed",
        "edge_taken",
        "node_started",
        "node_completed",
        "run_completed",
    ]
    waited = log[5]
    assert waited.data["request_id"] == request_id
    assert waited.data["input_schema"] == APPROVAL_SCHEMA
    assert log[6].data == {
        "request_id": request_id,
        "input": {"approved": True, "comment": "ship it"},
    }


async def test_the_answer_decides_the_branch(engine: Engine) -> None:
    run_id = await start_waiting(engine, review_graph())
    await engine.resume(run_id, {"approved": False})
    final = await engine.wait(run_id)
    assert final.state == {"approved": False}
    log = await engine.read_log(run_id)
    assert [e.node for e in log if e.event == "node_started"] == ["check", "human", "reject"]


async def test_a_wait_nodes_callable_runs_after_the_input_and_sees_it(
    registry: Registry, engine: Engine
) -> None:
    seen: list[dict[str, Any]] = []

    def after(state: Any) -> dict[str, Any]:
        seen.append(state.model_dump())
        return {"reviewed_by": "callable"}

    registry.add_tool("test.after", after, inline=True)
    run_id = await start_waiting(engine, review_graph(callable_="test.after"))
    assert seen == []  # nothing ran before the input
    await engine.resume(run_id, {"approved": True})
    final = await engine.wait(run_id)
    assert seen == [{"approved": True}]
    assert final.state == {"approved": True, "reviewed_by": "callable"}


@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_a_run_that_ends_at_its_wait_node_waits_for_nothing(
    registry: Registry, engine: Engine, outcome: str
) -> None:
    def last(state: Any) -> None:
        if outcome == "failed":
            raise RuntimeError("no")

    registry.add_tool("test.last", last, inline=True)
    graph = {
        "id": "ask-last",
        "start_node": "ask",
        "nodes": [{"id": "ask", "callable": "test.last", "wait": {"prompt": "?"}}],
    }
    run_id = await start_waiting(engine, graph)
    await engine.resume(run_id, {"x": 1})
    final = await engine.wait(run_id)
    assert final.status.value == outcome
    assert final.waiting is None
    assert (await engine.get_run(run_id)).waiting is None


async def test_invalid_input_lists_every_problem_and_the_run_keeps_waiting(engine: Engine) -> None:
    run_id = await start_waiting(engine, review_graph())
    before = await engine.get_run(run_id)
    with pytest.raises(InputValidationError) as info:
        await engine.resume(run_id, {"approved": "yes", "comment": "x" * 60, "extra": 1})
    problems = {(p.path, p.code) for p in info.value.problems}
    assert problems == {
        ("$.approved", "bool_type"),
        ("$.comment", "string_too_long"),
        ("$.extra", "extra_forbidden"),
    }
    assert info.value.details["run_id"] == run_id
    with pytest.raises(InputValidationError) as missing:
        await engine.resume(run_id, {})
    assert [(p.path, p.code) for p in missing.value.problems] == [("$.approved", "missing")]
    with pytest.raises(InputValidationError):
        await engine.resume(run_id, ["not", "an", "object"])
    assert await engine.get_run(run_id) == before
    await engine.resume(run_id, {"approved": True})
    assert (await engine.wait(run_id)).status is RunStatus.COMPLETED


async def test_an_input_the_state_model_rejects_is_refused(registry: Registry) -> None:
    class Ticket(BaseModel):
        approved: bool = False
        score: int = 0

    registry.add_model("Ticket", Ticket)
    graph = review_graph({"input_schema": {"type": "object"}})
    graph["state_model"] = "Ticket"
    async with open_engine(registry=registry) as engine:
        run_id = await start_waiting(engine, graph)
        with pytest.raises(StateValidationError):
            await engine.resume(run_id, {"score": "high"})
        assert (await engine.get_run(run_id)).status is RunStatus.WAITING


async def test_of_two_concurrent_resumes_exactly_one_wins(engine: Engine) -> None:
    async def resume(run_id: str, answer: bool, outcomes: list[str]) -> None:
        try:
            await engine.resume(run_id, {"approved": answer})
            outcomes.append("won")
        except RunStateError:
            outcomes.append("409")

    for _ in range(5):
        run_id = await start_waiting(engine, review_graph())
        outcomes: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(resume, run_id, True, outcomes)
            nursery.start_soon(resume, run_id, False, outcomes)
        assert sorted(outcomes) == ["409", "won"]
        final = await engine.wait(run_id)
        log = await engine.read_log(run_id)
        assert events(log).count("run_input") == 1
        assert gapless(log)
        assert final.status is RunStatus.COMPLETED


async def test_a_stale_request_id_is_refused(engine: Engine) -> None:
    run_id = await start_waiting(engine, review_graph())
    with pytest.raises(StaleRequestError) as info:
        await engine.resume(run_id, {"approved": True}, request_id="an-old-question")
    assert info.value.code == "stale_request"
    assert (await engine.get_run(run_id)).status is RunStatus.WAITING


async def test_resuming_a_run_that_does_not_wait_is_a_conflict(engine: Engine) -> None:
    run_id = await start_waiting(engine, review_graph())
    await engine.resume(run_id, {"approved": True})
    await engine.wait(run_id)
    with pytest.raises(RunStateError):
        await engine.resume(run_id, {"approved": True})


async def test_cancelling_a_waiting_run_ends_it_at_once(engine: Engine) -> None:
    run_id = await start_waiting(engine, review_graph())
    final = await engine.cancel(run_id)
    assert final.status is RunStatus.CANCELLED
    assert final.waiting is None
    assert events(await engine.read_log(run_id))[-2:] == ["run_waiting", "run_cancelled"]
    with pytest.raises(RunStateError):
        await engine.resume(run_id, {"approved": True})


async def test_a_parked_run_holds_no_task(engine: Engine) -> None:
    run_id = await start_waiting(engine, review_graph())
    await trio.testing.wait_all_tasks_blocked()

    def names(task: trio.lowlevel.Task) -> list[str]:
        found = [task.name]
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                found += names(child)
        return found

    tasks = names(trio.lowlevel.current_root_task())
    assert not [n for n in tasks if run_id in n], tasks
    assert any("wait-deadlines" in n for n in tasks)


async def test_a_follower_stays_connected_through_a_wait(engine: Engine) -> None:
    run_id = await start_waiting(engine, review_graph())
    received: list[LogEntry] = []

    async def follow() -> None:
        async with aclosing(cast(AsyncGenerator[LogEntry, None], engine.follow(run_id))) as it:
            async for entry in it:
                received.append(entry)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        assert events(received)[-1] == "run_waiting"
        await engine.resume(run_id, {"approved": True})
    assert events(received)[-1] == "run_completed"
    assert received == await engine.read_log(run_id)


async def test_a_wait_with_no_schema_takes_any_object_and_a_model_takes_its_fields(
    registry: Registry,
) -> None:
    class Answer(BaseModel):
        approved: bool
        reviewer: str = "someone"

    registry.add_model("Answer", Answer)
    async with open_engine(registry=registry) as engine:
        free = review_graph()
        free["id"] = "free"
        free["nodes"][1]["wait"] = {"prompt": "anything"}
        run_id = await start_waiting(engine, free)
        await engine.resume(run_id, {"approved": True, "anything": [1, {"x": None}]})
        assert (await engine.wait(run_id)).state["anything"] == [1, {"x": None}]

        typed = review_graph()
        typed["id"] = "typed"
        typed["nodes"][1]["wait"] = {"input_model": "Answer"}
        run_id = await start_waiting(engine, typed)
        waiting = (await engine.get_run(run_id)).waiting
        assert waiting is not None and waiting["input_schema"] == Answer.model_json_schema()
        with pytest.raises(InputValidationError):
            await engine.resume(run_id, {"reviewer": "me"})
        await engine.resume(run_id, {"approved": True})
        assert (await engine.wait(run_id)).state == {"approved": True, "reviewer": "someone"}


# -- timeouts --------------------------------------------------------------------------


async def test_a_wait_that_times_out_fails_the_run(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    run_id = await start_waiting(engine, review_graph({"timeout_s": 3600}))
    waiting = (await engine.get_run(run_id)).waiting
    assert waiting is not None and waiting["deadline"] is not None
    start = trio.current_time()
    final = await engine.wait(run_id)
    assert trio.current_time() - start == pytest.approx(3600, abs=1)
    assert final.status is RunStatus.FAILED
    assert final.error is not None and final.error["code"] == "wait_timed_out"
    log = await engine.read_log(run_id)
    assert events(log)[-3:] == ["run_waiting", "wait_timed_out", "run_failed"]
    assert gapless(log)


async def test_a_wait_that_times_out_resumes_with_its_default_input(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    default = {"approved": False, "comment": "no answer"}
    graph = review_graph({"timeout_s": 60, "on_timeout": {"input": default}})
    run_id = await start_waiting(engine, graph)
    final = await engine.wait(run_id)
    assert final.status is RunStatus.COMPLETED
    assert final.state == {"approved": False, "comment": "no answer"}
    log = await engine.read_log(run_id)
    assert events(log)[5:8] == ["run_waiting", "wait_timed_out", "run_input"]
    assert [e.node for e in log if e.event == "node_started"][-1] == "reject"


async def test_a_resume_before_the_deadline_disarms_it(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    run_id = await start_waiting(engine, review_graph({"timeout_s": 60}))
    await trio.sleep(30)
    await engine.resume(run_id, {"approved": True})
    await engine.wait(run_id)
    await trio.sleep(120)
    assert (await engine.get_run(run_id)).status is RunStatus.COMPLETED
    assert "wait_timed_out" not in events(await engine.read_log(run_id))


@pytest.mark.parametrize("on_timeout", ["fail", "input"])
def test_waits_and_their_deadlines_survive_a_restart(
    tmp_path: pathlib.Path, registry: Registry, on_timeout: str
) -> None:
    path = str(tmp_path / "trioflow.db")
    clock = trio.testing.MockClock(autojump_threshold=0.05)
    wait: dict[str, Any] = {"timeout_s": 600}
    if on_timeout == "input":
        wait["on_timeout"] = {"input": {"approved": True}}

    async def scenario() -> None:
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            run_id = await start_waiting(engine, review_graph(wait))
            await trio.sleep(100)  # a restart long before the deadline
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            record = await engine.get_run(run_id)
            assert record.status is RunStatus.WAITING  # not re-executed
            assert engine.active_runs == 0
            final = await engine.wait(run_id)
            log = await engine.read_log(run_id)
        assert "run_resumed" not in events(log)  # a waiting run is never re-executed
        assert events(log).count("node_started") == (2 if on_timeout == "fail" else 3)
        assert gapless(log)
        if on_timeout == "fail":
            assert final.status is RunStatus.FAILED
            assert final.error is not None and final.error["code"] == "wait_timed_out"
        else:
            assert final.status is RunStatus.COMPLETED and final.state == {"approved": True}

    # Virtual time that jumps only after 50 ms of real idleness: the SQLite
    # store works in threads, during which the clock must not jump.
    trio.run(scenario, clock=clock)


# -- validation of wait blocks -----------------------------------------------------------


@pytest.mark.parametrize(
    ("wait", "code", "path"),
    [
        (
            {"input_schema": {"type": "object"}, "input_model": "Nope"},
            "invalid_wait",
            "$.nodes[1].wait",
        ),
        ({"input_model": "Nope"}, "unknown_input_model", "$.nodes[1].wait.input_model"),
        (
            {"input_schema": {"type": "object", "$ref": "#/x"}},
            "invalid_input_schema",
            "$.nodes[1].wait.input_schema.$ref",
        ),
        (
            {
                "input_schema": {
                    "type": "object",
                    "properties": {"a": {"type": "string", "format": "email"}},
                }
            },
            "invalid_input_schema",
            "$.nodes[1].wait.input_schema.properties.a.format",
        ),
        (
            {"input_schema": {"type": "string"}},
            "invalid_input_schema",
            "$.nodes[1].wait.input_schema",
        ),
        (
            {"input_schema": {"type": "object", "properties": {"a": {"type": "strange"}}}},
            "invalid_input_schema",
            "$.nodes[1].wait.input_schema.properties.a.type",
        ),
        (
            {
                "input_schema": {
                    "type": "object",
                    "properties": {"a": {"type": "string", "pattern": "(unclosed"}},
                }
            },
            "invalid_input_schema",
            "$.nodes[1].wait.input_schema.properties.a.pattern",
        ),
        (
            {"timeout_s": 5, "on_timeout": {"input": {"approved": "maybe"}}},
            "invalid_timeout_input",
            "$.nodes[1].wait.on_timeout.input.approved",
        ),
        (
            {"on_timeout": {"input": {"approved": True}}},
            "invalid_wait",
            "$.nodes[1].wait.on_timeout",
        ),
    ],
)
def test_problems_of_a_wait_block_are_reported_at_their_path(
    registry: Registry, wait: dict[str, Any], code: str, path: str
) -> None:
    graph = review_graph()
    graph["nodes"][1]["wait"] = (
        wait
        if "input_schema" in wait or "input_model" in wait
        else {"input_schema": APPROVAL_SCHEMA, **wait}
    )
    with pytest.raises(GraphValidationError) as info:
        compile_graph(graph, registry)
    assert [(p.code, p.path) for p in info.value.problems] == [(code, path)]


def test_a_node_needs_a_callable_or_a_wait(registry: Registry) -> None:
    graph = review_graph()
    del graph["nodes"][1]["wait"]
    with pytest.raises(GraphValidationError) as info:
        compile_graph(graph, registry)
    assert [(p.code, p.path) for p in info.value.problems] == [
        ("missing_key", "$.nodes[1].callable")
    ]


def test_patterns_cannot_backtrack(registry: Registry) -> None:
    # The classic catastrophic pattern, matched in linear time.
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}}
    graph = review_graph({"input_schema": schema})
    compiled = compile_graph(graph, registry)
    plan = compiled.nodes["human"].wait
    assert plan is not None
    with pytest.raises(InputValidationError):
        plan.check({"s": "a" * 100_000 + "!"})
