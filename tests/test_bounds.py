"""Bounded logs, bounded states and bounded graphs: no input makes a run's footprint unbounded.

Through the embedding API; the HTTP answers built from these (413/422, the
truncated state answer) are tested in tests/web.
"""

from __future__ import annotations

import math
from typing import Any

import pydantic_core
import pytest
import trio
import trio.testing

from trioflow import (
    Engine,
    EngineLimits,
    GraphValidationError,
    Registry,
    RunContext,
    RunStatus,
    StateValidationError,
    open_engine,
)
from trioflow.logs import TRUNCATION_MARK


def _graph(
    graph_id: str,
    nodes: list[dict[str, Any]],
    edges: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": graph_id,
        "start_node": nodes[0]["id"],
        "nodes": nodes,
        "edges": edges or [],
        **extra,
    }


def _gapless(entries: list[Any]) -> bool:
    return [e.seq for e in entries] == list(range(1, len(entries) + 1))


async def _log(engine: Engine, run_id: str) -> list[Any]:
    return await engine.read_log(run_id, limit=1_000_000)


# -- one entry's size ------------------------------------------------------------------


async def test_a_huge_failure_message_retried_many_times_stays_small(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    # The attack: tools.fail with a 1 MB message and many retries made a 204 MB log.
    message = "x" * 1_000_000
    await engine.register_graph(
        _graph("fails", [{"id": "f", "callable": "tools.fail", "retry": {"max_attempts": 20}}])
    )
    run = await engine.start_run("fails", {"fail_message": message})
    final = await engine.wait(run.run_id)
    assert final.status is RunStatus.FAILED
    entries = await _log(engine, run.run_id)
    assert _gapless(entries)
    assert [e.event for e in entries].count("node_retrying") == 19
    limit = engine.limits.max_log_message_chars + len(TRUNCATION_MARK)
    for entry in entries:
        assert len(entry.message) <= limit
        assert len(pydantic_core.to_json(entry.data)) <= engine.limits.max_log_data_bytes + 1024
    total = sum(len(e.message) + len(pydantic_core.to_json(e.data)) for e in entries)
    assert total < 1_000_000  # it was 20 MB of messages alone
    assert final.error is not None
    assert len(final.error["message"]) <= limit
    retrying = next(e for e in entries if e.event == "node_retrying")
    assert retrying.data["truncated"] is True


async def test_custom_lines_are_cut_and_marked(registry: Registry, engine: Engine) -> None:
    def chatty(state: Any, ctx: RunContext) -> None:
        ctx.log("m" * 100_000, blob="b" * 100_000)
        ctx.log("small", values={1, 2}, when=object())  # not JSON: written as JSON encoders do
        ctx.log("fine", n=1)

    registry.add_tool("test.chatty", chatty, inline=True)
    await engine.register_graph(_graph("chatty", [{"id": "c", "callable": "test.chatty"}]))
    final = await engine.wait((await engine.start_run("chatty")).run_id)
    assert final.status is RunStatus.COMPLETED
    custom = [e for e in await _log(engine, final.run_id) if e.event == "custom"]
    big, odd, fine = custom
    assert big.message.endswith(TRUNCATION_MARK)
    assert len(big.message) == engine.limits.max_log_message_chars + len(TRUNCATION_MARK)
    assert big.data["truncated"] is True
    assert big.data["bytes"] > engine.limits.max_log_data_bytes
    assert len(big.data["preview"]) <= 1024
    assert odd.data["values"] == [1, 2]
    assert isinstance(odd.data["when"], str)
    assert fine.data == {"n": 1}


async def test_lines_per_node_execution_are_capped(registry: Registry) -> None:
    def flood(state: Any, ctx: RunContext) -> None:
        for i in range(50_000):
            ctx.log(f"line {i}")

    registry.add_tool("test.flood", flood, inline=True)
    limits = EngineLimits(max_log_lines_per_step=100)
    async with open_engine(registry=registry, limits=limits) as engine:
        await engine.register_graph(_graph("flood", [{"id": "f", "callable": "test.flood"}]))
        final = await engine.wait((await engine.start_run("flood")).run_id)
        entries = await _log(engine, final.run_id)
    custom = [e for e in entries if e.event == "custom"]
    assert len(custom) == 101
    assert custom[99].message == "line 99"
    assert custom[100].data == {"dropped": 49_900, "truncated": True}
    assert final.status is RunStatus.COMPLETED
    assert _gapless(entries)


# -- entries per run ---------------------------------------------------------------------


@pytest.mark.parametrize("max_entries", [25, 26, 27, 100])
async def test_a_run_over_max_log_entries_fails_with_the_failure_as_its_last_entry(
    autojump_clock: trio.testing.MockClock, registry: Registry, max_entries: int
) -> None:
    limits = EngineLimits(max_log_entries=max_entries)
    loop = {"from": "b", "to": "a", "type": "loop", "loop": {"max_iterations": 10_000}}
    document = _graph(
        "spin",
        [{"id": "a", "callable": "tools.noop"}, {"id": "b", "callable": "tools.noop"}],
        [{"from": "a", "to": "b"}, loop],
        max_steps=100_000,
    )
    async with open_engine(registry=registry, limits=limits) as engine:
        await engine.register_graph(document)
        final = await engine.wait((await engine.start_run("spin")).run_id)
        entries = await _log(engine, final.run_id)
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert final.error["code"] == "log_limit_exceeded"
    assert _gapless(entries)
    assert len(entries) <= max_entries
    assert entries[-1].event == "run_failed"
    assert final.last_seq == entries[-1].seq


async def test_a_failure_that_logs_more_than_fits_keeps_only_its_end(registry: Registry) -> None:
    def chatty_failure(state: Any, ctx: RunContext) -> None:
        for i in range(40):
            ctx.log(f"line {i}")
        raise RuntimeError("and then it failed")

    registry.add_tool("test.chatty_failure", chatty_failure, inline=True)
    async with open_engine(registry=registry, limits=EngineLimits(max_log_entries=10)) as engine:
        await engine.register_graph(_graph("cf", [{"id": "c", "callable": "test.chatty_failure"}]))
        final = await engine.wait((await engine.start_run("cf")).run_id)
        entries = await _log(engine, final.run_id)
    assert final.status is RunStatus.FAILED
    assert _gapless(entries)
    assert len(entries) <= 10
    assert entries[-1].event == "run_failed"


# -- ceilings for graph documents --------------------------------------------------------


async def test_a_graph_over_the_servers_ceilings_is_invalid(registry: Registry) -> None:
    limits = EngineLimits(max_graph_steps=1000, max_loop_iterations=50, max_node_attempts=5)
    document = _graph(
        "greedy",
        [
            {"id": "a", "callable": "tools.noop", "retry": {"max_attempts": 6}},
            {"id": "b", "callable": "tools.noop"},
        ],
        [
            {"from": "a", "to": "b"},
            {"from": "b", "to": "a", "type": "loop", "loop": {"max_iterations": 51}},
        ],
        max_steps=1001,
    )
    async with open_engine(registry=registry, limits=limits) as engine:
        with pytest.raises(GraphValidationError) as info:
            await engine.register_graph(document)
        problems = {(p.code, p.path) for p in info.value.problems}
        assert problems == {
            ("over_limit", "$.max_steps"),
            ("over_limit", "$.nodes[0].retry.max_attempts"),
            ("over_limit", "$.edges[1].loop.max_iterations"),
        }
        # At the ceilings exactly, the same graph is fine.
        document["max_steps"] = 1000
        document["nodes"][0]["retry"]["max_attempts"] = 5
        document["edges"][1]["loop"]["max_iterations"] = 50
        await engine.register_graph(document)


async def test_the_default_ceilings_refuse_the_million_step_loop(engine: Engine) -> None:
    # The attack: max_steps 1e6 with a 1e6-iteration loop wrote 2.76M entries in 8 s.
    document = _graph(
        "million",
        [{"id": "a", "callable": "tools.noop"}, {"id": "b", "callable": "tools.noop"}],
        [
            {"from": "a", "to": "b"},
            {"from": "b", "to": "a", "type": "loop", "loop": {"max_iterations": 1_000_000}},
        ],
        max_steps=1_000_000,
    )
    with pytest.raises(GraphValidationError) as info:
        await engine.register_graph(document)
    assert {p.code for p in info.value.problems} == {"over_limit"}


# -- the state -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "field", "reason"),
    [
        ({"score": math.nan}, "score", "NaN"),
        ({"score": math.inf}, "score", "infinities"),
        ({"tags": {"a", "b"}}, "tags", "set"),
        ({"big": 10**5000}, "big", "4300 digits"),
        ({"deep": {"list": [1, {"x": -math.inf}]}}, "deep.list[1].x", "infinities"),
        ({"keys": {1: "one"}}, "keys", "not a string"),
        ({"raw": b"bytes"}, "raw", "bytes"),
    ],
)
async def test_a_state_update_that_is_not_plain_json_fails_naming_node_and_field(
    registry: Registry, engine: Engine, update: dict[str, Any], field: str, reason: str
) -> None:
    registry.add_tool("test.update", lambda state: update, inline=True)
    await engine.register_graph(_graph("odd", [{"id": "writer", "callable": "test.update"}]))
    final = await engine.wait((await engine.start_run("odd", {"keep": 1})).run_id)
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert final.error["code"] == "state_invalid"
    assert final.error["node"] == "writer"
    assert f"{field}:" in final.error["message"]
    assert reason in final.error["message"]
    assert final.error["details"]["errors"][0]["field"] == field
    # What is stored is still the last good state, and it reads back as JSON.
    assert final.state == {"keep": 1}
    pydantic_core.from_json(pydantic_core.to_json(final.state), allow_inf_nan=False)


async def test_tuples_are_json_arrays(registry: Registry, engine: Engine) -> None:
    registry.add_tool("test.pair", lambda state: {"pair": (1, "a")}, inline=True)
    await engine.register_graph(_graph("pair", [{"id": "p", "callable": "test.pair"}]))
    final = await engine.wait((await engine.start_run("pair")).run_id)
    assert final.status is RunStatus.COMPLETED
    assert final.state == {"pair": [1, "a"]}


@pytest.mark.parametrize("state", [{"x": math.nan}, {"x": [math.inf]}, {"x": {1, 2}}])
async def test_an_initial_state_that_is_not_plain_json_is_refused(
    engine: Engine, spec_graph: dict[str, Any], state: dict[str, Any]
) -> None:
    await engine.register_graph(spec_graph)
    with pytest.raises(StateValidationError) as info:
        await engine.start_run("code-review-a", state)
    assert info.value.errors[0]["field"].startswith("x")
    assert engine.active_runs == 0


async def test_a_node_cannot_grow_the_state_past_max_state_bytes(registry: Registry) -> None:
    def grow(state: Any) -> dict[str, Any]:
        return {f"k{len(state.model_extra or {})}": "y" * 3000}

    registry.add_tool("test.grow", grow, inline=True)
    document = _graph(
        "grow",
        [{"id": "g", "callable": "test.grow"}],
        [{"from": "g", "to": "g", "type": "loop", "loop": {"max_iterations": 1000}}],
    )
    async with open_engine(registry=registry, limits=EngineLimits(max_state_bytes=20_000)) as eng:
        await eng.register_graph(document)
        final = await eng.wait((await eng.start_run("grow")).run_id)
    assert final.status is RunStatus.FAILED
    assert final.error is not None
    assert final.error["code"] == "state_too_large"
    assert final.error["node"] == "g"
    assert len(pydantic_core.to_json(final.state)) <= 20_000
