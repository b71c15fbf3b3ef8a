"""Rule 4 as a pure function: ``trioflow.planning.decide`` without Trio or an engine."""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import BaseModel

from trioflow import ConditionError, Graph, Registry, compile_graph, default_registry
from trioflow.planning import Decision, decide


def _graph(
    edges: list[dict[str, Any]],
    registry: Registry | None = None,
    nodes: tuple[str, ...] = ("a", "b", "c", "d"),
) -> Graph:
    doc = {
        "id": "plan",
        "start_node": "a",
        "nodes": [{"id": n, "callable": "tools.noop"} for n in nodes],
        "edges": edges,
    }
    return compile_graph(doc, registry or default_registry())


def _decide(
    graph: Graph, node: str, state: Mapping[str, Any], counters: Mapping[str, int] | None = None
) -> Decision:
    model, dumped = graph.state.initial(state)
    return decide(graph, node, model, dumped, counters or {})


def _target(decision: Decision) -> str | None:
    return decision.edge.target if decision.edge is not None else None


def _branch(src: str, dst: str, expression: str) -> dict[str, Any]:
    return {"from": src, "to": dst, "type": "branch", "condition": {"expression": expression}}


def _loop(src: str, dst: str, max_iterations: int, until: str | None = None) -> dict[str, Any]:
    loop: dict[str, Any] = {"max_iterations": max_iterations}
    if until is not None:
        loop["until_expression"] = until
    return {"from": src, "to": dst, "type": "loop", "loop": loop}


def _seq(src: str, dst: str) -> dict[str, Any]:
    return {"from": src, "to": dst, "type": "sequential"}


# Nodes b, c, d must be reachable from a, so every graph below fans out from a.


def test_first_firing_branch_in_declaration_order_wins() -> None:
    graph = _graph([_branch("a", "c", "True"), _branch("a", "b", "True"), _seq("a", "d")])
    assert _target(_decide(graph, "a", {})) == "c"
    graph = _graph([_branch("a", "b", "True"), _branch("a", "c", "True"), _seq("a", "d")])
    assert _target(_decide(graph, "a", {})) == "b"


def test_a_branch_that_does_not_fire_is_skipped() -> None:
    graph = _graph(
        [
            _branch("a", "b", "context.get('x') == 1"),
            _branch("a", "c", "context.get('x') == 2"),
            _seq("a", "d"),
        ]
    )
    assert _target(_decide(graph, "a", {"x": 2})) == "c"
    assert _target(_decide(graph, "a", {"x": 1})) == "b"


def test_branch_beats_sequential_even_when_declared_after_it() -> None:
    graph = _graph([_seq("a", "b"), _branch("a", "c", "context.get('go', False)"), _seq("c", "d")])
    assert _target(_decide(graph, "a", {"go": True})) == "c"
    assert _target(_decide(graph, "a", {"go": False})) == "b"


def test_no_firing_edge_and_no_sequential_completes() -> None:
    graph = _graph([_branch("a", "b", "context.get('n', 0) > 0"), _seq("b", "c"), _seq("c", "d")])
    decision = _decide(graph, "a", {"n": 0})
    assert decision.edge is None
    assert decision.exhausted == ()
    # A node with no outgoing edges at all completes the run too.
    assert _decide(graph, "d", {}).edge is None


def test_conditions_see_the_state_they_are_given() -> None:
    graph = _graph(
        [
            _branch("a", "b", "state['score'] >= 0.5 and 'ok' in context['tags']"),
            _seq("a", "c"),
            _seq("b", "d"),
        ]
    )
    assert _target(_decide(graph, "a", {"score": 0.7, "tags": ["ok"]})) == "b"
    assert _target(_decide(graph, "a", {"score": 0.7, "tags": []})) == "c"
    assert _target(_decide(graph, "a", {"score": 0.1, "tags": ["ok"]})) == "c"


def test_loop_fires_until_its_cap_then_is_exhausted() -> None:
    graph = _graph([_seq("a", "b"), _loop("b", "a", 3), _seq("b", "c"), _seq("c", "d")])
    for fired in range(3):
        decision = _decide(graph, "b", {}, {"b->a": fired})
        assert _target(decision) == "a"
        assert decision.edge is not None and decision.edge.key == "b->a"
        assert decision.exhausted == ()
    decision = _decide(graph, "b", {}, {"b->a": 3})
    assert _target(decision) == "c"  # falls through to the sequential edge
    assert [e.key for e in decision.exhausted] == ["b->a"]


def test_loop_counters_are_the_only_memory_so_a_spent_loop_stays_spent() -> None:
    # Nothing in the state can revive a loop whose counter reached its cap.
    graph = _graph(
        [
            _seq("a", "b"),
            _loop("b", "a", 2, until="context.get('done', False)"),
            _seq("c", "d"),
            _branch("b", "c", "False"),
        ]
    )
    for state in ({}, {"done": False}, {"anything": 1}):
        decision = _decide(graph, "b", state, {"b->a": 2})
        assert decision.edge is None
        assert [e.key for e in decision.exhausted] == ["b->a"]
    # Counters of other loops do not interfere.
    assert _target(_decide(graph, "b", {}, {"x->y": 99})) == "a"


def test_truthy_until_expression_stops_the_loop_without_counting_as_exhausted() -> None:
    graph = _graph(
        [
            _seq("a", "b"),
            _loop("b", "a", 3, until="context.get('issues', 0) == 0"),
            _seq("b", "c"),
            _seq("c", "d"),
        ]
    )
    decision = _decide(graph, "b", {"issues": 0})
    assert _target(decision) == "c"
    assert decision.exhausted == ()
    # Even at the cap: until wins, so no loop_exhausted warning is due.
    decision = _decide(graph, "b", {"issues": 0}, {"b->a": 3})
    assert _target(decision) == "c"
    assert decision.exhausted == ()
    assert _target(_decide(graph, "b", {"issues": 2})) == "a"


def test_loop_and_branch_compete_in_declaration_order() -> None:
    loop_first = _graph(
        [_seq("a", "b"), _loop("b", "a", 1), _branch("b", "c", "True"), _seq("c", "d")]
    )
    assert _target(_decide(loop_first, "b", {})) == "a"
    branch_first = _graph(
        [_seq("a", "b"), _branch("b", "c", "True"), _loop("b", "a", 1), _seq("c", "d")]
    )
    assert _target(_decide(branch_first, "b", {})) == "c"


def test_exhausted_loop_before_a_firing_branch_is_reported_and_the_branch_taken() -> None:
    graph = _graph([_seq("a", "b"), _loop("b", "a", 1), _branch("b", "c", "True"), _seq("c", "d")])
    decision = _decide(graph, "b", {}, {"b->a": 1})
    assert _target(decision) == "c"
    assert [e.key for e in decision.exhausted] == ["b->a"]


def test_callable_condition_gets_the_state_model() -> None:
    registry = default_registry()
    seen: list[BaseModel] = []

    def has_open_issues(state: BaseModel) -> bool:
        seen.append(state)
        return bool(getattr(state, "issues_open", 0))

    registry.add_tool("tests.has_open_issues", has_open_issues, inline=True)
    graph = _graph(
        [
            {
                "from": "a",
                "to": "b",
                "type": "branch",
                "condition": {"callable": "tests.has_open_issues"},
            },
            _seq("a", "c"),
            _seq("b", "d"),
        ],
        registry,
    )
    assert _target(_decide(graph, "a", {"issues_open": 2})) == "b"
    assert _target(_decide(graph, "a", {"issues_open": 0})) == "c"
    assert [getattr(s, "issues_open", None) for s in seen] == [2, 0]


def test_raising_callable_condition_names_node_and_edge() -> None:
    registry = default_registry()

    def broken(state: BaseModel) -> bool:
        raise KeyError("nope")

    registry.add_tool("tests.broken", broken, inline=True)
    graph = _graph(
        [
            {"from": "a", "to": "b", "type": "branch", "condition": {"callable": "tests.broken"}},
            _seq("a", "c"),
            _seq("b", "d"),
        ],
        registry,
    )
    with pytest.raises(ConditionError) as info:
        _decide(graph, "a", {})
    assert info.value.node == "a"
    assert info.value.edge == "a->b"
    assert "KeyError" in info.value.message


def test_failing_expression_names_node_and_edge() -> None:
    graph = _graph([_seq("a", "b"), _branch("b", "c", "context['missing'] > 1"), _seq("b", "d")])
    with pytest.raises(ConditionError) as info:
        _decide(graph, "b", {})
    assert (info.value.node, info.value.edge) == ("b", "b->c")


def test_failing_until_expression_names_node_and_edge() -> None:
    graph = _graph(
        [
            _seq("a", "b"),
            _loop("b", "a", 3, until="context['missing'] == 0"),
            _seq("b", "c"),
            _seq("c", "d"),
        ]
    )
    with pytest.raises(ConditionError) as info:
        _decide(graph, "b", {})
    assert (info.value.node, info.value.edge) == ("b", "b->a")


def test_spec_sample_decisions(spec_graph: dict[str, Any]) -> None:
    graph = compile_graph(spec_graph, default_registry())
    assert _target(_decide(graph, "submit", {"issues_open": 1})) == "review"
    assert _target(_decide(graph, "review", {"issues_open": 1})) == "fix"
    assert _target(_decide(graph, "review", {"issues_open": 0})) == "approve"
    assert _target(_decide(graph, "fix", {"issues_open": 1}, {"fix->review": 2})) == "review"
    exhausted = _decide(graph, "fix", {"issues_open": 1}, {"fix->review": 3})
    assert exhausted.edge is None
    assert [e.key for e in exhausted.exhausted] == ["fix->review"]
    assert _decide(graph, "approve", {"issues_open": 0}).edge is None


def test_decide_is_pure() -> None:
    graph = _graph([_seq("a", "b"), _loop("b", "a", 2), _seq("b", "c"), _seq("c", "d")])
    counters = {"b->a": 1}
    state = {"x": [1, 2]}
    first = _decide(graph, "b", state, counters)
    second = _decide(graph, "b", state, counters)
    assert first == second
    assert counters == {"b->a": 1}  # the caller increments counters, not decide
    assert state == {"x": [1, 2]}


def test_condition_returning_an_awaitable_fails_cleanly() -> None:
    # Conditions are evaluated synchronously. A sync callable that hands back
    # a coroutine is a clear condition error, not a "never awaited" warning.
    registry = default_registry()

    async def really_async(state: BaseModel) -> bool:
        return True

    registry.add_tool("tests.sneaky_cond", lambda state: really_async(state), inline=True)
    graph = _graph(
        [
            {
                "from": "a",
                "to": "b",
                "type": "branch",
                "condition": {"callable": "tests.sneaky_cond"},
            },
            _seq("a", "c"),
            _seq("b", "d"),
        ],
        registry,
    )
    with pytest.raises(ConditionError) as info:
        _decide(graph, "a", {})
    error = info.value
    del info  # its traceback holds the coroutine; drop it so gc runs the check now
    assert (error.node, error.edge) == ("a", "a->b")
    assert "synchronous" in error.message
    error.__traceback__ = error.__cause__ = error.__context__ = None
    gc.collect()  # a leaked coroutine would warn here, and warnings are errors
