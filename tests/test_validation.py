"""Graph validation: every problem code, with its JSON path, reported all at once."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
from pydantic import BaseModel

from trioflow import Graph, GraphValidationError, Registry, compile_graph
from trioflow.expressions import Expression
from trioflow.graph import MAX_EDGES, MAX_NODES


def base() -> dict[str, Any]:
    """A valid two-node graph that each test breaks in exactly one way."""
    return {
        "id": "g",
        "start_node": "a",
        "nodes": [{"id": "a", "callable": "tools.noop"}, {"id": "b", "callable": "tools.noop"}],
        "edges": [{"from": "a", "to": "b", "type": "sequential"}],
    }


def problems(doc: Any, registry: Registry) -> list[tuple[str, str]]:
    with pytest.raises(GraphValidationError) as info:
        compile_graph(doc, registry)
    return [(p.code, p.path) for p in info.value.problems]


def branch(source: str, target: str, expression: str) -> dict[str, Any]:
    return {"from": source, "to": target, "type": "branch", "condition": {"expression": expression}}


# --- the spec's sample ----------------------------------------------------------


@pytest.mark.parametrize("evaluator", ["compiled", "asteval"])
def test_spec_sample_compiles_unchanged(
    spec_graph: dict[str, Any], registry: Registry, evaluator: Any
) -> None:
    original = copy.deepcopy(spec_graph)
    graph = compile_graph(spec_graph, registry, evaluator=evaluator)
    assert spec_graph == original  # compiling does not touch the caller's document
    assert graph.id == "code-review-a"
    assert graph.name == "Code Review Loop"
    assert graph.start_node == "submit"
    assert set(graph.nodes) == {"submit", "review", "fix", "approve"}
    assert graph.nodes["approve"].tool.name == "tools.approve"
    review = graph.outgoing["review"]
    assert [(e.target, e.type) for e in review.conditional] == [
        ("approve", "branch"),
        ("fix", "branch"),
    ]
    assert review.sequential is None
    submit_next = graph.outgoing["submit"].sequential
    assert submit_next is not None and submit_next.target == "review"
    (loop,) = graph.outgoing["fix"].conditional
    assert (loop.type, loop.max_iterations, loop.key) == ("loop", 3, "fix->review")
    assert graph.outgoing["approve"] == type(review)(conditional=(), sequential=None)


# --- schema problems (shape, types, unknown keys) -----------------------------------


def _with(mutate: Any) -> dict[str, Any]:
    doc = base()
    mutate(doc)
    return doc


SCHEMA_CASES = [
    ("unknown top-level key", lambda d: d.update(nmae="x"), ("unknown_key", "$.nmae")),
    (
        "unknown node key",
        lambda d: d["nodes"][1].update(calable="x"),
        ("unknown_key", "$.nodes[1].calable"),
    ),
    (
        "unknown edge key",
        lambda d: d["edges"][0].update(conditon={}),
        ("unknown_key", "$.edges[0].conditon"),
    ),
    (
        "unknown retry key",
        lambda d: d["nodes"][0].update(retry={"attempts": 3}),
        ("unknown_key", "$.nodes[0].retry.attempts"),
    ),
    ("missing start_node", lambda d: d.pop("start_node"), ("missing_key", "$.start_node")),
    ("missing nodes", lambda d: d.pop("nodes"), ("missing_key", "$.nodes")),
    (
        "missing node callable",
        lambda d: d["nodes"][1].pop("callable"),
        ("missing_key", "$.nodes[1].callable"),
    ),
    ("missing edge from", lambda d: d["edges"][0].pop("from"), ("missing_key", "$.edges[0].from")),
    ("missing edge to", lambda d: d["edges"][0].pop("to"), ("missing_key", "$.edges[0].to")),
    ("max_steps 0", lambda d: d.update(max_steps=0), ("invalid_value", "$.max_steps")),
    (
        "bad edge type",
        lambda d: d["edges"][0].update(type="parallel"),
        ("invalid_value", "$.edges[0].type"),
    ),
    ("bad id characters", lambda d: d.update(id="has space"), ("invalid_value", "$.id")),
    (
        "negative timeout",
        lambda d: d["nodes"][0].update(timeout_s=-1),
        ("invalid_value", "$.nodes[0].timeout_s"),
    ),
    ("nodes not a list", lambda d: d.update(nodes={"a": 1}), ("invalid_value", "$.nodes")),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [c[1:] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES]
)
def test_schema_problem(registry: Registry, mutate: Any, expected: tuple[str, str]) -> None:
    assert problems(_with(mutate), registry) == [expected]


def test_document_must_be_an_object(registry: Registry) -> None:
    assert problems(["not", "an", "object"], registry) == [("invalid_value", "$")]


def test_schema_problems_are_reported_together(registry: Registry) -> None:
    doc = base()
    doc["colour"] = "red"
    doc.pop("start_node")
    doc["max_steps"] = -5
    doc["edges"][0]["type"] = "teleport"
    with pytest.raises(GraphValidationError) as info:
        compile_graph(doc, registry)
    found = {(p.code, p.path) for p in info.value.problems}
    assert found == {
        ("unknown_key", "$.colour"),
        ("missing_key", "$.start_node"),
        ("invalid_value", "$.max_steps"),
        ("invalid_value", "$.edges[0].type"),
    }
    assert info.value.graph_id == "g"
    assert info.value.details["problems"][0].keys() == {"code", "path", "message"}


# --- graph problems -------------------------------------------------------------------


def test_duplicate_node_id(registry: Registry) -> None:
    doc = base()
    doc["nodes"].append({"id": "b", "callable": "tools.approve"})
    assert problems(doc, registry) == [("duplicate_node_id", "$.nodes[2].id")]


@pytest.mark.parametrize("node_id", ["a\x00b", "two\nlines", "tab\t", "del\x7f"])
def test_a_node_id_is_printable_text(registry: Registry, node_id: str) -> None:
    doc = base()
    doc["nodes"][1]["id"] = node_id
    assert ("invalid_value", "$.nodes[1].id") in problems(doc, registry)


def test_unknown_start_node(registry: Registry) -> None:
    doc = base()
    doc["start_node"] = "nowhere"
    assert problems(doc, registry) == [("unknown_start_node", "$.start_node")]


def test_unknown_edge_source(registry: Registry) -> None:
    doc = base()
    doc["edges"].append({"from": "ghost", "to": "b", "type": "sequential"})
    assert problems(doc, registry) == [("unknown_edge_source", "$.edges[1].from")]


def test_unknown_edge_target(registry: Registry) -> None:
    doc = base()
    doc["edges"].append({"from": "b", "to": "ghost", "type": "sequential"})
    assert problems(doc, registry) == [("unknown_edge_target", "$.edges[1].to")]


def test_unknown_callable(registry: Registry) -> None:
    doc = base()
    doc["nodes"][1]["callable"] = "tools.does_not_exist"
    assert problems(doc, registry) == [("unknown_callable", "$.nodes[1].callable")]


def test_unknown_condition_callable(registry: Registry) -> None:
    doc = base()
    doc["edges"].insert(
        0, {"from": "a", "to": "b", "type": "branch", "condition": {"callable": "tools.nope"}}
    )
    assert problems(doc, registry) == [
        ("unknown_condition_callable", "$.edges[0].condition.callable")
    ]


def test_unknown_state_model(registry: Registry) -> None:
    doc = base()
    doc["state_model"] = "NoSuchModel"
    assert problems(doc, registry) == [("unknown_state_model", "$.state_model")]


def test_registered_state_model_is_used(registry: Registry) -> None:
    @registry.model("Review")
    class Review(BaseModel):
        issues_open: int = 0

    doc = base()
    doc["state_model"] = "Review"
    graph = compile_graph(doc, registry)
    assert graph.state_model is Review
    assert graph.state_model_name == "Review"


@pytest.mark.parametrize(
    "condition",
    [
        None,
        {},
        {"expression": "True", "callable": "tools.noop"},
    ],
    ids=["no condition", "neither", "both"],
)
def test_invalid_branch_condition(registry: Registry, condition: dict[str, Any] | None) -> None:
    doc = base()
    edge: dict[str, Any] = {"from": "a", "to": "b", "type": "branch"}
    if condition is not None:
        edge["condition"] = condition
    doc["edges"].insert(0, edge)
    assert problems(doc, registry) == [("invalid_branch_condition", "$.edges[0].condition")]


@pytest.mark.parametrize("edge_type", ["sequential", "loop"])
def test_unexpected_condition(registry: Registry, edge_type: str) -> None:
    doc = base()
    doc["nodes"].append({"id": "c", "callable": "tools.noop"})
    edge: dict[str, Any] = {
        "from": "b",
        "to": "c",
        "type": edge_type,
        "condition": {"expression": "True"},
    }
    if edge_type == "loop":
        edge["loop"] = {"max_iterations": 2}
    doc["edges"].append(edge)
    assert problems(doc, registry) == [("unexpected_condition", "$.edges[1].condition")]


@pytest.mark.parametrize("edge_type", ["sequential", "branch"])
def test_unexpected_loop(registry: Registry, edge_type: str) -> None:
    doc = base()
    edge: dict[str, Any] = {
        "from": "a",
        "to": "b",
        "type": edge_type,
        "loop": {"max_iterations": 2},
    }
    if edge_type == "branch":
        edge["condition"] = {"expression": "True"}
        doc["edges"].insert(0, edge)
    else:
        doc["edges"] = [edge]
    assert problems(doc, registry) == [("unexpected_loop", "$.edges[0].loop")]


@pytest.mark.parametrize(
    "loop",
    [None, {}, {"max_iterations": 0}, {"max_iterations": -1}, {"max_iterations": 1_000_001}],
    ids=["no loop block", "no max_iterations", "zero", "negative", "over the cap"],
)
def test_invalid_loop(registry: Registry, loop: dict[str, Any] | None) -> None:
    doc = base()
    edge: dict[str, Any] = {"from": "b", "to": "a", "type": "loop"}
    if loop is not None:
        edge["loop"] = loop
    doc["edges"].append(edge)
    assert problems(doc, registry) == [("invalid_loop", "$.edges[1].loop.max_iterations")]


def test_multiple_sequential_edges(registry: Registry) -> None:
    doc = base()
    doc["nodes"].append({"id": "c", "callable": "tools.noop"})
    doc["edges"].append({"from": "a", "to": "c", "type": "sequential"})
    assert problems(doc, registry) == [("multiple_sequential_edges", "$.edges[1]")]


def test_duplicate_edge(registry: Registry) -> None:
    doc = base()
    doc["edges"] = [
        branch("a", "b", "context.get('x') == 1"),
        branch("a", "b", "context.get('x') == 2"),
    ]
    assert problems(doc, registry) == [("duplicate_edge", "$.edges[1]")]


EXPRESSION_CASES = [
    ("context.get('x' ==", "expression_syntax"),
    ("", "expression_syntax"),
    ("context.__class__", "expression_forbidden"),
    ("__import__('os').system('true')", "expression_forbidden"),
    ("[x for x in context]", "expression_forbidden"),
    ("1 or " * 250 + "1", "expression_too_long"),  # over 1000 characters
    ("+".join(["1"] * 150), "expression_too_long"),  # short text, too many AST nodes
]


@pytest.mark.parametrize(("source", "code"), EXPRESSION_CASES)
def test_branch_expression_problems(registry: Registry, source: str, code: str) -> None:
    doc = base()
    doc["nodes"].append({"id": "c", "callable": "tools.noop"})
    doc["edges"].append(branch("a", "c", source))
    assert problems(doc, registry) == [(code, "$.edges[1].condition.expression")]


@pytest.mark.parametrize(("source", "code"), EXPRESSION_CASES)
def test_until_expression_problems(registry: Registry, source: str, code: str) -> None:
    doc = base()
    loop = {"max_iterations": 3, "until_expression": source}
    doc["edges"].append({"from": "b", "to": "a", "type": "loop", "loop": loop})
    assert problems(doc, registry) == [(code, "$.edges[1].loop.until_expression")]


def test_unreachable_node(registry: Registry) -> None:
    doc = base()
    doc["nodes"].append({"id": "island", "callable": "tools.noop"})
    doc["nodes"].append({"id": "c", "callable": "tools.noop"})
    doc["edges"].append({"from": "b", "to": "c", "type": "sequential"})
    assert problems(doc, registry) == [("unreachable_node", "$.nodes[2]")]


def test_node_reachable_only_through_a_loop_edge_is_reachable(registry: Registry) -> None:
    doc = base()
    doc["nodes"].append({"id": "c", "callable": "tools.noop"})
    doc["edges"].append({"from": "b", "to": "c", "type": "loop", "loop": {"max_iterations": 1}})
    graph = compile_graph(doc, registry)
    assert "c" in graph.nodes
    assert [e.target for e in graph.outgoing["b"].conditional] == ["c"]


@pytest.mark.parametrize(
    "edges",
    [
        [{"from": "a", "to": "a", "type": "sequential"}],
        [branch("a", "a", "True")],
        [
            {"from": "a", "to": "b", "type": "sequential"},
            {"from": "b", "to": "a", "type": "sequential"},
        ],
        [branch("a", "b", "context.get('n', 0) < 3"), branch("b", "a", "True")],
        [{"from": "a", "to": "b", "type": "sequential"}, branch("b", "a", "True")],
    ],
    ids=[
        "sequential self-loop",
        "branch self-loop",
        "sequential cycle",
        "branch cycle",
        "mixed cycle",
    ],
)
def test_unbounded_cycle(registry: Registry, edges: list[dict[str, Any]]) -> None:
    doc = base()
    doc["edges"] = edges
    if not any(e["to"] == "b" for e in edges):
        doc["edges"] = [
            *edges,
            {"from": "a", "to": "b", "type": "loop", "loop": {"max_iterations": 1}},
        ]
    found = problems(doc, registry)
    assert found == [("unbounded_cycle", "$.edges")]


def test_unbounded_cycle_message_names_the_cycle(registry: Registry) -> None:
    doc = base()
    doc["edges"].append(branch("b", "a", "True"))
    with pytest.raises(GraphValidationError) as info:
        compile_graph(doc, registry)
    (problem,) = info.value.problems
    assert problem.code == "unbounded_cycle"
    assert "a -> b -> a" in problem.message


def test_cycle_through_a_loop_edge_is_accepted(registry: Registry) -> None:
    doc = base()
    doc["edges"].append({"from": "b", "to": "a", "type": "loop", "loop": {"max_iterations": 5}})
    graph = compile_graph(doc, registry)
    (loop,) = graph.outgoing["b"].conditional
    assert (loop.source, loop.target, loop.max_iterations) == ("b", "a", 5)


def test_self_loop_through_a_loop_edge_is_accepted(registry: Registry) -> None:
    doc = base()
    doc["edges"].append({"from": "b", "to": "b", "type": "loop", "loop": {"max_iterations": 2}})
    graph = compile_graph(doc, registry)
    (loop,) = graph.outgoing["b"].conditional
    assert (loop.source, loop.target, loop.type, loop.max_iterations) == ("b", "b", "loop", 2)


def test_cycle_with_a_loop_edge_and_a_loop_free_path_is_rejected(registry: Registry) -> None:
    doc = base()
    doc["edges"].append({"from": "b", "to": "a", "type": "loop", "loop": {"max_iterations": 5}})
    doc["edges"].append(branch("b", "a", "context.get('again')"))
    assert problems(doc, registry) == [("unbounded_cycle", "$.edges")]


def test_graph_too_large_nodes(registry: Registry) -> None:
    doc = base()
    doc["nodes"] = [{"id": f"n{i}", "callable": "tools.noop"} for i in range(MAX_NODES + 1)]
    doc["start_node"] = "n0"
    doc["edges"] = []
    assert problems(doc, registry) == [("graph_too_large", "$.nodes")]


def test_graph_too_large_edges(registry: Registry) -> None:
    doc = base()
    doc["edges"] = [branch("a", "b", f"context.get('k') == {i}") for i in range(MAX_EDGES + 1)]
    assert problems(doc, registry) == [("graph_too_large", "$.edges")]


def test_graph_at_the_node_limit_is_accepted(registry: Registry) -> None:
    doc = base()
    doc["nodes"] = [{"id": f"n{i}", "callable": "tools.noop"} for i in range(MAX_NODES)]
    doc["start_node"] = "n0"
    doc["edges"] = [
        {"from": f"n{i}", "to": f"n{i + 1}", "type": "sequential"} for i in range(MAX_NODES - 1)
    ]
    assert len(compile_graph(doc, registry).nodes) == MAX_NODES


def test_every_problem_is_reported_at_once(registry: Registry) -> None:
    doc = {
        "id": "many",
        "start_node": "a",
        "state_model": "Missing",
        "nodes": [
            {"id": "a", "callable": "tools.noop"},
            {"id": "a", "callable": "tools.noop"},
            {"id": "b", "callable": "os.system"},
            {"id": "island", "callable": "tools.noop"},
        ],
        "edges": [
            {"from": "a", "to": "b", "type": "sequential"},
            {"from": "a", "to": "ghost", "type": "sequential"},
            branch("b", "a", "context.__class__"),
            {"from": "b", "to": "a", "type": "loop", "loop": {"max_iterations": 0}},
            {"from": "b", "to": "b", "type": "branch"},
        ],
    }
    with pytest.raises(GraphValidationError) as info:
        compile_graph(doc, registry)
    found = [(p.code, p.path) for p in info.value.problems]
    assert sorted(found) == sorted(
        [
            ("unknown_state_model", "$.state_model"),
            ("duplicate_node_id", "$.nodes[1].id"),
            ("unknown_callable", "$.nodes[2].callable"),
            ("unknown_edge_target", "$.edges[1].to"),
            ("multiple_sequential_edges", "$.edges[1]"),
            ("expression_forbidden", "$.edges[2].condition.expression"),
            ("invalid_loop", "$.edges[3].loop.max_iterations"),
            ("invalid_branch_condition", "$.edges[4].condition"),
            ("unreachable_node", "$.nodes[3]"),
            ("unbounded_cycle", "$.edges"),
        ]
    )
    assert info.value.graph_id == "many"
    assert str(len(found)) in info.value.message
    assert all(p.message for p in info.value.problems)


# --- the compiled graph -----------------------------------------------------------------


@pytest.fixture
def graph(spec_graph: dict[str, Any], registry: Registry) -> Graph:
    return compile_graph(spec_graph, registry)


@pytest.mark.parametrize(
    ("attribute", "value"),
    [("id", "other"), ("start_node", "fix"), ("max_steps", 1), ("nodes", {}), ("digest", "x")],
)
def test_graph_attributes_cannot_be_assigned(graph: Graph, attribute: str, value: Any) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(graph, attribute, value)
    assert getattr(graph, attribute) != value


def test_graph_mappings_are_read_only(graph: Graph) -> None:
    with pytest.raises(TypeError):
        graph.nodes["evil"] = graph.nodes["submit"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del graph.nodes["submit"]  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        graph.outgoing["submit"] = graph.outgoing["fix"]  # type: ignore[index]
    with pytest.raises(TypeError):
        graph.document["start_node"] = "fix"  # type: ignore[index]
    assert "evil" not in graph.nodes
    assert graph.outgoing["submit"].sequential is not None


def test_nodes_and_edges_are_frozen(graph: Graph) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.nodes["submit"].tool = graph.nodes["approve"].tool  # type: ignore[misc]
    edge = graph.outgoing["review"].conditional[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        edge.target = "fix"  # type: ignore[misc]
    assert isinstance(graph.outgoing["review"].conditional, tuple)


def test_changing_the_source_document_does_not_change_the_graph(
    spec_graph: dict[str, Any], registry: Registry
) -> None:
    graph = compile_graph(spec_graph, registry)
    digest = graph.digest
    spec_graph["nodes"][3]["callable"] = "tools.fail"
    spec_graph["edges"].clear()
    assert graph.nodes["approve"].tool.name == "tools.approve"
    assert graph.document["nodes"][3]["callable"] == "tools.approve"
    assert len(graph.document["edges"]) == 4
    assert graph.digest == digest


def test_equal_documents_have_equal_digests(spec_graph: dict[str, Any], registry: Registry) -> None:
    one = compile_graph(spec_graph, registry)
    reordered = dict(reversed(list(copy.deepcopy(spec_graph).items())))
    assert compile_graph(reordered, registry).digest == one.digest
    spec_graph["name"] = "Renamed"
    assert compile_graph(spec_graph, registry).digest != one.digest


@pytest.mark.parametrize("evaluator", ["compiled", "asteval"])
def test_expressions_are_compiled_once(
    spec_graph: dict[str, Any], registry: Registry, evaluator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = compile_graph(spec_graph, registry, evaluator=evaluator)
    to_approve, to_fix = graph.outgoing["review"].conditional
    (loop,) = graph.outgoing["fix"].conditional
    assert isinstance(to_approve.expression, Expression)
    assert to_approve.expression.source == "context.get('issues_open', 0) == 0"
    assert isinstance(to_fix.expression, Expression)
    assert isinstance(loop.until, Expression)
    assert to_approve.condition_tool is None

    # Evaluating must not parse or check anything again.
    import ast

    import trioflow.expressions

    def no_parsing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("expression parsed again at evaluation time")

    monkeypatch.setattr(ast, "parse", no_parsing)
    monkeypatch.setattr(trioflow.expressions, "check_expression", no_parsing)
    monkeypatch.setattr(trioflow.expressions, "compile_expression", no_parsing)
    assert to_approve.expression.evaluate({"issues_open": 0}) is True
    assert to_fix.expression.evaluate({"issues_open": 2}) is True
    assert loop.until.evaluate({"issues_open": 1}) is False


def test_condition_callable_is_resolved_at_compile_time(registry: Registry) -> None:
    def has_issues(state: Any) -> bool:
        return bool(state.get("issues_open"))

    registry.add_tool("review.has_issues", has_issues)
    doc = base()
    doc["edges"].insert(
        0,
        {"from": "a", "to": "b", "type": "branch", "condition": {"callable": "review.has_issues"}},
    )
    graph = compile_graph(doc, registry)
    edge = graph.outgoing["a"].conditional[0]
    assert edge.condition_tool is not None and edge.condition_tool.func is has_issues
    assert edge.expression is None


def test_a_repeated_node_id_is_reported_even_when_the_first_has_an_unknown_callable(
    registry: Registry,
) -> None:
    doc = {
        "id": "g",
        "start_node": "a",
        "nodes": [{"id": "a", "callable": "nope.missing"}, {"id": "a", "callable": "tools.noop"}],
    }
    with pytest.raises(GraphValidationError) as info:
        compile_graph(doc, registry)
    found = {(p.code, p.path) for p in info.value.problems}
    assert ("unknown_callable", "$.nodes[0].callable") in found
    assert ("duplicate_node_id", "$.nodes[1].id") in found


@pytest.mark.parametrize("graph_id", ["create", "run"])
def test_ids_that_are_api_paths_are_refused(registry: Registry, graph_id: str) -> None:
    doc = base()
    doc["id"] = graph_id
    assert problems(doc, registry) == [("reserved_id", "$.id")]
