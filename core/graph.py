"""Validated, frozen, precompiled graphs.

:func:`compile_graph` turns a raw document into a :class:`Graph` or raises
:class:`~core.errors.GraphValidationError` listing every problem it found.
A :class:`Graph` holds resolved tools and parsed expressions, so running it
never parses or looks anything up by name again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from .document import EdgeSpec, GraphDocument, RetrySpec
from .errors import ExpressionError, GraphValidationError, Problem
from .expressions import Evaluator, Expression, compile_expression
from .registry import Registry, Tool
from .state import JsonState, StateAdapter
from .waits import WaitPlan, compile_wait

if TYPE_CHECKING:
    from .runs import RunRecord

MAX_NODES = 1000
MAX_EDGES = 4000
_MAX_ITERATIONS = 1_000_000
#: Graph ids that are fixed paths of the HTTP API (GET /graph/{id} could not read them).
RESERVED_IDS = frozenset({"create", "run"})


@dataclass(frozen=True, slots=True)
class GraphLimits:
    """Server-wide ceilings for the counts a graph document declares.

    The document schema has absolute maxima; an engine may allow less
    (``EngineLimits``), and a document over its ceilings is invalid
    (``over_limit``), so no graph can ask for more work than the server grants.
    """

    max_steps: int = 1_000_000
    max_iterations: int = 1_000_000
    max_attempts: int = 100


@dataclass(frozen=True, slots=True)
class Node:
    """A compiled node: its tool (``None`` for a node that only waits) and its wait."""

    id: str
    tool: Tool | None
    timeout_s: float | None
    retry: RetrySpec
    wait: WaitPlan | None = None
    # Log messages, built once here rather than on every step.
    started_message: str = field(init=False, repr=False, compare=False)
    completed_message: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "started_message", f"node {self.id} started")
        object.__setattr__(self, "completed_message", f"node {self.id} completed")


@dataclass(frozen=True, slots=True)
class Edge:
    """A compiled edge. ``key`` (``"from->to"``) names its loop counter."""

    index: int
    source: str
    target: str
    type: str
    key: str
    expression: Expression | None = None
    condition_tool: Tool | None = None
    max_iterations: int = 0
    until: Expression | None = None
    #: The ``edge_taken`` log message, built once.
    taken_message: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "taken_message", f"{self.source} -> {self.target} ({self.type})")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A node's outgoing edges: conditional ones in declaration order, then the default."""

    conditional: tuple[Edge, ...]
    sequential: Edge | None
    #: Some condition here is metered: its evaluation may take milliseconds.
    metered: bool = False


@dataclass(frozen=True, slots=True)
class Graph:
    """A validated graph. Immutable; build it with :func:`compile_graph`."""

    id: str
    name: str | None
    start_node: str
    max_steps: int
    nodes: Mapping[str, Node]
    outgoing: Mapping[str, Outgoing]
    state: StateAdapter
    state_model_name: str | None
    document: Mapping[str, Any]
    digest: str

    @property
    def state_model(self) -> type[BaseModel]:
        return self.state.model

    def to_mermaid(self, run: RunRecord | None = None, visited: Iterable[str] = ()) -> str:
        """This graph as a Mermaid ``flowchart`` (see :mod:`trioflow.mermaid`); with
        ``run`` and ``visited`` (node ids completed), its progress marked."""
        from .mermaid import to_mermaid

        return to_mermaid(self, run, visited)


def document_digest(document: Mapping[str, Any]) -> str:
    """A stable digest of a document: equal JSON gives an equal digest."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _json_path(loc: tuple[int | str, ...]) -> str:
    path = "$"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


_PYDANTIC_CODES = {
    "extra_forbidden": "unknown_key",
    "missing": "missing_key",
}


def _schema_problems(exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple("from" if p == "source" else p for p in err["loc"])
        code = _PYDANTIC_CODES.get(err["type"], "invalid_value")
        problems.append(Problem(code, _json_path(loc), err["msg"]))
    return problems


class _Checker:
    """Collects every problem of one document."""

    def __init__(
        self, doc: GraphDocument, registry: Registry, evaluator: Evaluator, limits: GraphLimits
    ) -> None:
        self.doc = doc
        self.registry = registry
        self.evaluator = evaluator
        self.limits = limits
        self.problems: list[Problem] = []

    def add(self, code: str, path: str, message: str) -> None:
        self.problems.append(Problem(code, path, message))

    def expression(self, source: str, path: str) -> Expression | None:
        try:
            return compile_expression(source, evaluator=self.evaluator)
        except ExpressionError as exc:
            code = {"syntax": "expression_syntax", "too_long": "expression_too_long"}.get(
                exc.reason, "expression_forbidden"
            )
            self.add(code, path, exc.message)
            return None

    def run(self) -> Graph | None:
        doc = self.doc
        if len(doc.nodes) > MAX_NODES:
            self.add("graph_too_large", "$.nodes", f"{len(doc.nodes)} nodes; limit {MAX_NODES}")
        if len(doc.edges) > MAX_EDGES:
            self.add("graph_too_large", "$.edges", f"{len(doc.edges)} edges; limit {MAX_EDGES}")
        if self.problems:
            return None
        if doc.id in RESERVED_IDS:
            self.add(
                "reserved_id",
                "$.id",
                f"graph id {doc.id!r} is the name of an API path (/graph/{doc.id}); choose another",
            )
        self.ceilings()

        model: type[BaseModel] = JsonState
        if doc.state_model is not None:
            found = self.registry.get_model(doc.state_model)
            if found is None:
                self.add(
                    "unknown_state_model",
                    "$.state_model",
                    f"state model {doc.state_model!r} is not registered",
                )
            else:
                model = found

        nodes: dict[str, Node] = {}
        seen_ids: set[str] = set()
        for i, spec in enumerate(doc.nodes):
            if spec.id in seen_ids:
                self.add("duplicate_node_id", f"$.nodes[{i}].id", f"node id {spec.id!r} repeats")
                continue
            seen_ids.add(spec.id)
            path = f"$.nodes[{i}]"
            if spec.callable is None and spec.wait is None:
                self.add(
                    "missing_key",
                    f"{path}.callable",
                    "a node needs a callable, a wait block, or both",
                )
                continue
            tool = None
            if spec.callable is not None:
                tool = self.registry.get_tool(spec.callable)
                if tool is None:
                    self.add(
                        "unknown_callable",
                        f"{path}.callable",
                        f"callable {spec.callable!r} is not registered",
                    )
            wait = None
            if spec.wait is not None:
                wait, problems = compile_wait(spec.wait, self.registry.models(), f"{path}.wait")
                self.problems.extend(problems)
            if (spec.callable is not None and tool is None) or (spec.wait and wait is None):
                continue
            nodes[spec.id] = Node(spec.id, tool, spec.timeout_s, spec.retry or RetrySpec(), wait)
        node_ids = {spec.id for spec in doc.nodes}

        if doc.start_node not in node_ids:
            self.add(
                "unknown_start_node", "$.start_node", f"start_node {doc.start_node!r} is not a node"
            )

        edges: list[Edge] = []
        seen: set[tuple[str, str, str]] = set()
        sequential_from: dict[str, int] = {}
        for i, espec in enumerate(doc.edges):
            edge = self.edge(i, espec, node_ids)
            ident = (espec.source, espec.to, espec.type)
            if ident in seen:
                self.add(
                    "duplicate_edge",
                    f"$.edges[{i}]",
                    f"edge {espec.source}->{espec.to} ({espec.type}) repeats",
                )
            seen.add(ident)
            if espec.type == "sequential":
                if espec.source in sequential_from:
                    self.add(
                        "multiple_sequential_edges",
                        f"$.edges[{i}]",
                        f"node {espec.source!r} already has a sequential edge "
                        f"($.edges[{sequential_from[espec.source]}])",
                    )
                else:
                    sequential_from[espec.source] = i
            if edge is not None:
                edges.append(edge)

        self.structure(node_ids, doc)
        if self.problems:
            return None

        by_source: dict[str, list[Edge]] = {node_id: [] for node_id in nodes}
        for e in edges:
            by_source[e.source].append(e)
        outgoing: dict[str, Outgoing] = {}
        for node_id, mine in by_source.items():
            conditional = tuple(e for e in mine if e.type != "sequential")
            outgoing[node_id] = Outgoing(
                conditional=conditional,
                sequential=next((e for e in mine if e.type == "sequential"), None),
                metered=any(
                    x is not None and x.metered
                    for e in conditional
                    for x in (e.expression, e.until)
                ),
            )
        raw = doc.model_dump(mode="json", by_alias=True, exclude_none=True)
        return Graph(
            id=doc.id,
            name=doc.name,
            start_node=doc.start_node,
            max_steps=doc.max_steps,
            nodes=MappingProxyType(nodes),
            outgoing=MappingProxyType(outgoing),
            state=StateAdapter(model),
            state_model_name=doc.state_model,
            document=MappingProxyType(raw),
            digest=document_digest(raw),
        )

    def ceilings(self) -> None:
        """Counts the document declares that are over this server's ceilings."""
        doc, limits = self.doc, self.limits

        def over(path: str, what: str, value: int, maximum: int) -> None:
            if value > maximum:
                self.add(
                    "over_limit", path, f"{what} is {value}; this server allows at most {maximum}"
                )

        over("$.max_steps", "max_steps", doc.max_steps, limits.max_steps)
        for i, node in enumerate(doc.nodes):
            if node.retry is not None:
                over(
                    f"$.nodes[{i}].retry.max_attempts",
                    "retry.max_attempts",
                    node.retry.max_attempts,
                    limits.max_attempts,
                )
        for i, edge in enumerate(doc.edges):
            iterations = edge.loop.max_iterations if edge.loop is not None else None
            # Values outside 1..1,000,000 are invalid_loop (see edge()).
            if iterations is not None and 1 <= iterations <= _MAX_ITERATIONS:
                path = f"$.edges[{i}].loop.max_iterations"
                over(path, "loop.max_iterations", iterations, limits.max_iterations)

    def edge(self, i: int, spec: EdgeSpec, node_ids: set[str]) -> Edge | None:
        path = f"$.edges[{i}]"
        ok = True
        if spec.source not in node_ids:
            self.add(
                "unknown_edge_source", f"{path}.from", f"edge source {spec.source!r} is not a node"
            )
            ok = False
        if spec.to not in node_ids:
            self.add("unknown_edge_target", f"{path}.to", f"edge target {spec.to!r} is not a node")
            ok = False
        key = f"{spec.source}->{spec.to}"
        if spec.type == "branch":
            if spec.loop is not None:
                self.add("unexpected_loop", f"{path}.loop", "a branch edge takes no loop block")
                ok = False
            cond = spec.condition
            if cond is None or (cond.expression is None) == (cond.callable is None):
                self.add(
                    "invalid_branch_condition",
                    f"{path}.condition",
                    "a branch edge needs a condition with exactly one of "
                    "'expression' or 'callable'",
                )
                return None
            if cond.expression is not None:
                expr = self.expression(cond.expression, f"{path}.condition.expression")
                if expr is None or not ok:
                    return None
                return Edge(i, spec.source, spec.to, "branch", key, expression=expr)
            tool = self.registry.get_tool(cond.callable or "")
            if tool is None:
                self.add(
                    "unknown_condition_callable",
                    f"{path}.condition.callable",
                    f"condition callable {cond.callable!r} is not registered",
                )
                return None
            if tool.is_async:
                # Choosing an edge is a pure, synchronous decision (planning.decide).
                self.add(
                    "async_condition_callable",
                    f"{path}.condition.callable",
                    f"condition callable {cond.callable!r} is async; conditions "
                    "must be synchronous functions of the state",
                )
                return None
            return Edge(i, spec.source, spec.to, "branch", key, condition_tool=tool) if ok else None
        if spec.condition is not None:
            self.add(
                "unexpected_condition",
                f"{path}.condition",
                f"a {spec.type} edge takes no condition; use a branch edge",
            )
            ok = False
        if spec.type == "loop":
            loop = spec.loop
            if loop is None or loop.max_iterations is None or loop.max_iterations < 1:
                self.add(
                    "invalid_loop",
                    f"{path}.loop.max_iterations",
                    "a loop edge needs loop.max_iterations >= 1",
                )
                return None
            if loop.max_iterations > _MAX_ITERATIONS:
                self.add(
                    "invalid_loop",
                    f"{path}.loop.max_iterations",
                    "loop.max_iterations is at most 1000000",
                )
                return None
            until = None
            if loop.until_expression is not None:
                until = self.expression(loop.until_expression, f"{path}.loop.until_expression")
                if until is None:
                    return None
            if not ok:
                return None
            return Edge(
                i,
                spec.source,
                spec.to,
                "loop",
                key,
                max_iterations=loop.max_iterations,
                until=until,
            )
        if spec.loop is not None:
            self.add("unexpected_loop", f"{path}.loop", "a sequential edge takes no loop block")
            ok = False
        return Edge(i, spec.source, spec.to, "sequential", key) if ok else None

    def structure(self, node_ids: set[str], doc: GraphDocument) -> None:
        """Reachability from the start, and cycles that avoid every loop edge."""
        adj: dict[str, list[str]] = {n: [] for n in node_ids}
        adj_no_loop: dict[str, list[str]] = {n: [] for n in node_ids}
        for e in doc.edges:
            if e.source in node_ids and e.to in node_ids:
                adj[e.source].append(e.to)
                if e.type != "loop":
                    adj_no_loop[e.source].append(e.to)
        if doc.start_node in node_ids:
            reached = {doc.start_node}
            stack = [doc.start_node]
            while stack:
                for nxt in adj[stack.pop()]:
                    if nxt not in reached:
                        reached.add(nxt)
                        stack.append(nxt)
            for i, spec in enumerate(doc.nodes):
                if spec.id not in reached:
                    self.add(
                        "unreachable_node",
                        f"$.nodes[{i}]",
                        f"node {spec.id!r} cannot be reached from {doc.start_node!r}",
                    )
        for cycle in _cycles(adj_no_loop):
            self.add(
                "unbounded_cycle",
                "$.edges",
                "cycle without a loop edge (it could run forever): "
                + " -> ".join([*cycle, cycle[0]]),
            )


def _cycles(adj: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components that contain a cycle (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(adj):
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, child_i = work.pop()
            if child_i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            children = adj[node]
            if child_i < len(children):
                work.append((node, child_i + 1))
                child = children[child_i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in adj[node]:
                    found.append(sorted(component))
    return found


def compile_graph(
    document: Mapping[str, Any] | GraphDocument,
    registry: Registry,
    *,
    evaluator: Evaluator = "compiled",
    limits: GraphLimits | None = None,
) -> Graph:
    """Validate a graph document and compile it.

    Args:
        document: the parsed JSON document (or an already-parsed model).
        registry: where callables and state models are looked up.
        evaluator: which expression evaluator conditions use.
        limits: ceilings for ``max_steps``, loop and retry counts (default:
            the document schema's own maxima).

    Raises:
        GraphValidationError: with every problem found, each with code, path and message.
    """
    if isinstance(document, GraphDocument):
        doc = document
    else:
        if not isinstance(document, Mapping):
            raise GraphValidationError([Problem("invalid_value", "$", "a graph must be an object")])
        try:
            doc = GraphDocument.model_validate(document)
        except ValidationError as exc:
            graph_id = document.get("id") if isinstance(document.get("id"), str) else None
            raise GraphValidationError(_schema_problems(exc), graph_id) from None
    checker = _Checker(doc, registry, evaluator, limits or GraphLimits())
    graph = checker.run()
    if graph is None:
        raise GraphValidationError(checker.problems, doc.id)
    return graph
