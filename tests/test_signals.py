"""Signals: state updates from outside, applied between steps in arrival order, exactly once."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import pytest
import trio
import trio.testing

from trioflow import (
    Engine,
    EngineLimits,
    LimitExceededError,
    Registry,
    RunStateError,
    RunStatus,
    StateValidationError,
    UnknownRunError,
    open_engine,
)
from trioflow.stores.sqlite import SQLiteStore


class Gate:
    def __init__(self) -> None:
        self.reached = trio.Event()
        self.opened = trio.Event()

    async def __call__(self, state: Any) -> None:
        self.reached.set()
        await self.opened.wait()


def gated_graph() -> dict[str, Any]:
    return {
        "id": "gated",
        "start_node": "first",
        "nodes": [
            {"id": "first", "callable": "test.gate"},
            {"id": "second", "callable": "test.record"},
            {"id": "third", "callable": "tools.noop"},
        ],
        "edges": [{"from": "first", "to": "second"}, {"from": "second", "to": "third"}],
    }


@pytest.fixture
def gate(registry: Registry) -> Gate:
    gate = Gate()
    registry.add_tool("test.gate", gate)
    seen: list[dict[str, Any]] = []

    def record(state: Any) -> None:
        seen.append(state.model_dump())

    registry.add_tool("test.record", record, inline=True)
    gate.seen = seen  # type: ignore[attr-defined]
    return gate


def events(entries: list[Any]) -> list[str]:
    return [e.event for e in entries]


async def test_signals_apply_between_steps_in_arrival_order(engine: Engine, gate: Gate) -> None:
    await engine.register_graph(gated_graph())
    run = await engine.start_run("gated", {"log": []})
    await gate.reached.wait()
    ids = []
    for i, name in enumerate(["first", "second", "third"]):
        stored = await engine.signal(run.run_id, name, {"last": name, f"k{i}": i})
        ids.append(stored.signal_id)
    assert ids == [1, 2, 3]
    # Stored, not applied while the node runs.
    assert (await engine.get_run(run.run_id)).state == {"log": []}
    gate.opened.set()
    final = await engine.wait(run.run_id)
    assert final.state == {"log": [], "last": "third", "k0": 0, "k1": 1, "k2": 2}
    assert final.signal_cursor == 3
    # The next node saw all three.
    assert gate.seen == [final.state]  # type: ignore[attr-defined]
    log = await engine.read_log(run.run_id)
    received = [e for e in log if e.event == "signal_received"]
    assert [e.data["name"] for e in received] == ["first", "second", "third"]
    assert [e.data["signal_id"] for e in received] == [1, 2, 3]
    # Between the step of first and the node second: after second's node_started.
    assert events(log).index("signal_received") > events(log).index("edge_taken")
    assert [e.seq for e in log] == list(range(1, len(log) + 1))


async def test_a_signal_to_a_waiting_run_is_applied_and_it_keeps_waiting(engine: Engine) -> None:
    await engine.register_graph(
        {
            "id": "asks",
            "start_node": "ask",
            "nodes": [
                {"id": "ask", "wait": {"prompt": "go?"}},
                {"id": "done", "callable": "tools.noop"},
            ],
            "edges": [{"from": "ask", "to": "done"}],
        }
    )
    run = await engine.start_run("asks", {})
    assert (await engine.wait_stop(run.run_id)).status is RunStatus.WAITING
    await engine.signal(run.run_id, "note", {"note": "from outside"})
    waiting = await engine.get_run(run.run_id)
    assert waiting.status is RunStatus.WAITING
    assert waiting.state == {"note": "from outside"}
    assert waiting.signal_cursor == 1
    assert events(await engine.read_log(run.run_id))[-2:] == ["run_waiting", "signal_received"]
    await engine.resume(run.run_id, {"go": True})
    final = await engine.wait(run.run_id)
    assert final.state == {"note": "from outside", "go": True}
    assert events(await engine.read_log(run.run_id)).count("signal_received") == 1


async def test_a_signal_to_an_ended_or_unknown_run_is_refused(
    engine: Engine, spec_graph: dict[str, Any]
) -> None:
    await engine.register_graph(spec_graph)
    run = await engine.start_run("code-review-a", {"issues_open": 0})
    await engine.wait(run.run_id)
    with pytest.raises(RunStateError):
        await engine.signal(run.run_id, "late", {"x": 1})
    with pytest.raises(UnknownRunError):
        await engine.signal("no-such-run", "late", {"x": 1})


@pytest.mark.parametrize(
    ("name", "updates", "error"),
    [
        ("", {"x": 1}, StateValidationError),
        ("n" * 201, {"x": 1}, StateValidationError),
        ("a\x00b", {"x": 1}, StateValidationError),
        ("line\nbreak", {"x": 1}, StateValidationError),
        ("ok", ["not", "an", "object"], StateValidationError),
        ("ok", {"x": math.nan}, StateValidationError),
        ("ok", {"x": {1, 2}}, StateValidationError),
        ("ok", {"x": "y" * 2_000_000}, LimitExceededError),
    ],
)
async def test_a_malformed_signal_is_refused_before_it_is_stored(
    engine: Engine, gate: Gate, name: str, updates: Any, error: type[Exception]
) -> None:
    await engine.register_graph(gated_graph())
    run = await engine.start_run("gated", {})
    await gate.reached.wait()
    with pytest.raises(error):
        await engine.signal(run.run_id, name, updates)
    assert await engine.store.signals_after(run.run_id, 0) == []
    gate.opened.set()
    assert (await engine.wait(run.run_id)).signal_cursor == 0


async def test_a_signal_the_state_cannot_take_any_more_is_rejected_and_the_run_goes_on(
    registry: Registry, gate: Gate
) -> None:
    async with open_engine(registry=registry, limits=EngineLimits(max_state_bytes=3000)) as engine:
        await engine.register_graph(gated_graph())
        run = await engine.start_run("gated", {})
        await gate.reached.wait()
        await engine.signal(run.run_id, "big", {"a": "x" * 2000})
        await engine.signal(run.run_id, "bigger", {"b": "x" * 2000})  # fits alone, not together
        await engine.signal(run.run_id, "small", {"c": 1})
        gate.opened.set()
        final = await engine.wait(run.run_id)
        log = await engine.read_log(run.run_id)
    assert final.status is RunStatus.COMPLETED
    assert set(final.state) == {"a", "c"}
    assert [e.event for e in log if e.event.startswith("signal_")] == [
        "signal_received",
        "signal_rejected",
        "signal_received",
    ]
    assert final.signal_cursor == 3


def test_a_stored_signal_takes_effect_once_across_restarts(
    tmp_path: pathlib.Path, registry: Registry
) -> None:
    # The signal is stored (the sender was answered), then the process stops
    # before the run applies it: the next engine applies it, once.
    path = str(tmp_path / "trioflow.db")
    gate = Gate()
    registry.add_tool("test.gate", gate)
    registry.add_tool("test.record", lambda state: None, inline=True)

    async def scenario() -> None:
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            await engine.register_graph(gated_graph())
            run = await engine.start_run("gated", {"n": 0})
            await gate.reached.wait()
            await engine.signal(run.run_id, "bump", {"n": 1})
        gate.opened.set()
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            final = await engine.wait(run.run_id)
        async with open_engine(store=SQLiteStore(path), registry=registry) as engine:
            again = await engine.get_run(run.run_id)
            log = await engine.read_log(run.run_id)
        assert final.status is RunStatus.COMPLETED
        assert final.state == {"n": 1}
        assert again == final
        assert events(log).count("signal_received") == 1
        assert events(log).count("run_resumed") == 1
        assert [e.seq for e in log] == list(range(1, len(log) + 1))

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0.05))
