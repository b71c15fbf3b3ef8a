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

from .document import (
    BranchSpec,
    EdgeSpec,
    GraphDocument,
    MapSpec,
    MergeSpec,
    NodeSpec,
    ParallelSpec,
    RetrySpec,
    ToleranceSpec,
)
from .errors import ExpressionError, GraphValidationError, Problem
from .expressions import Evaluator, Expression, compile_expression
from .registry import Registry, Tool
from .state import JsonState, StateAdapter
from .waits import WaitPlan, compile_wait

if TYPE_CHECKING:
    from .runs import RunRecord

MAX_NODES = 1000
MAX_EDGES = 4000
#: Fan-outs (parallel, map) nested in the branches of fan-outs, at most.
MAX_FANOUT_DEPTH = 3
#: Branches of one parallel node, at most.
MAX_BRANCHES = 100
#: The reducers a merge may name (else: a registered tool).
REDUCERS = frozenset(
    {"conflict", "keep", "replace", "append", "extend", "sum", "min", "max", "merge"}
)
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
class Branch:
    """One branch of a fan-out: its key (a parallel branch's id; a map's node id) and
    its sub-graph, compiled like a graph."""

    key: str
    graph: Graph


@dataclass(frozen=True, slots=True)
class FanOut:
    """A ``parallel`` or ``map`` node, compiled (see docs/semantics.md, "Fan-out").

    ``reducers`` maps state keys to a reducer name or a registered tool;
    ``default`` applies to the other keys (``conflict``: two branches may
    not both change it). ``max_failures``/``max_failure_pct``: the failed
    branches tolerated (both None: fail fast).
    """

    kind: str
    branches: tuple[Branch, ...]
    reducers: Mapping[str, str | Tool]
    default: str | Tool
    max_concurrency: int
    max_failures: int | None = None
    max_failure_pct: float | None = None
    items: Expression | None = None
    as_name: str | None = None
    collect_from: str | None = None
    collect_into: str | None = None
    max_items: int = 0

    @property
    def fail_fast(self) -> bool:
        return self.max_failures is None and self.max_failure_pct is None


@dataclass(frozen=True, slots=True)
class Node:
    """A compiled node: its tool (``None`` for a node that only waits), its wait, or
    the fan-out it is."""

    id: str
    tool: Tool | None
    timeout_s: float | None
    retry: RetrySpec
    wait: WaitPlan | None = None
    fanout: FanOut | None = None
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
        self.state = StateAdapter(JsonState)

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
        self.state = StateAdapter(model)
        body = self.body(doc.id, doc.start_node, doc.nodes, doc.edges, "$", 0)
        if self.problems or body is None:
            return None
        nodes, outgoing = body
        raw = doc.model_dump(mode="json", by_alias=True, exclude_none=True)
        return Graph(
            id=doc.id,
            name=doc.name,
            start_node=doc.start_node,
            max_steps=doc.max_steps,
            nodes=MappingProxyType(nodes),
            outgoing=MappingProxyType(outgoing),
            state=self.state,
            state_model_name=doc.state_model,
            document=MappingProxyType(raw),
            digest=document_digest(raw),
        )

    def body(
        self,
        graph_id: str,
        start_node: str,
        specs: list[NodeSpec],
        edge_specs: list[EdgeSpec],
        prefix: str,
        depth: int,
    ) -> tuple[dict[str, Node], dict[str, Outgoing]] | None:
        """The nodes and edges of a graph or of a branch (problems at ``prefix``)."""
        nodes: dict[str, Node] = {}
        seen_ids: set[str] = set()
        for i, spec in enumerate(specs):
            if spec.id in seen_ids:
                self.add(
                    "duplicate_node_id", f"{prefix}.nodes[{i}].id", f"node id {spec.id!r} repeats"
                )
                continue
            seen_ids.add(spec.id)
            path = f"{prefix}.nodes[{i}]"
            if spec.retry is not None:
                self.over(
                    f"{path}.retry.max_attempts",
                    "retry.max_attempts",
                    spec.retry.max_attempts,
                    self.limits.max_attempts,
                )
            kinds = [k for k in ("parallel", "map") if getattr(spec, k) is not None]
            if kinds:
                # A fan-out retries nothing as a whole (its branches' nodes may).
                others = [k for k in ("callable", "wait", "retry", *kinds[1:]) if getattr(spec, k)]
                if others:
                    self.add(
                        "invalid_fanout",
                        f"{path}.{others[0]}",
                        f"a {kinds[0]} node takes no {others[0]}",
                    )
                    continue
                if depth >= MAX_FANOUT_DEPTH:
                    self.add(
                        "fanout_too_deep",
                        f"{path}.{kinds[0]}",
                        f"fan-outs nest at most {MAX_FANOUT_DEPTH} deep",
                    )
                    continue
                fanout = self.fanout(graph_id, spec, f"{path}.{kinds[0]}", depth + 1)
                if fanout is not None:
                    nodes[spec.id] = Node(
                        spec.id, None, spec.timeout_s, spec.retry or RetrySpec(), fanout=fanout
                    )
                continue
            if spec.callable is None and spec.wait is None:
                self.add(
                    "missing_key",
                    f"{path}.callable",
                    "a node needs a callable, a wait block, a parallel or a map block",
                )
                continue
            if spec.wait is not None and depth > 0:
                self.add(
                    "wait_in_branch",
                    f"{path}.wait",
                    "a node inside a parallel or map branch cannot wait for input (yet): "
                    "a run waits as a whole, and its branches would have to park and resume "
                    "one by one",
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
        node_ids = {spec.id for spec in specs}

        if start_node not in node_ids:
            self.add(
                "unknown_start_node",
                f"{prefix}.start_node",
                f"start_node {start_node!r} is not a node",
            )

        edges: list[Edge] = []
        seen: set[tuple[str, str, str]] = set()
        sequential_from: dict[str, int] = {}
        for i, espec in enumerate(edge_specs):
            iterations = espec.loop.max_iterations if espec.loop is not None else None
            # Values outside 1..1,000,000 are invalid_loop (see edge()).
            if iterations is not None and 1 <= iterations <= _MAX_ITERATIONS:
                path = f"{prefix}.edges[{i}].loop.max_iterations"
                self.over(path, "loop.max_iterations", iterations, self.limits.max_iterations)
            edge = self.edge(i, espec, node_ids, prefix)
            ident = (espec.source, espec.to, espec.type)
            if ident in seen:
                self.add(
                    "duplicate_edge",
                    f"{prefix}.edges[{i}]",
                    f"edge {espec.source}->{espec.to} ({espec.type}) repeats",
                )
            seen.add(ident)
            if espec.type == "sequential":
                if espec.source in sequential_from:
                    self.add(
                        "multiple_sequential_edges",
                        f"{prefix}.edges[{i}]",
                        f"node {espec.source!r} already has a sequential edge "
                        f"({prefix}.edges[{sequential_from[espec.source]}])",
                    )
                else:
                    sequential_from[espec.source] = i
            if edge is not None:
                edges.append(edge)

        self.structure(node_ids, start_node, specs, edge_specs, prefix)
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
        return nodes, outgoing

    def branch(
        self, graph_id: str, key: str, spec: BranchSpec, prefix: str, depth: int
    ) -> Branch | None:
        if len(spec.nodes) > MAX_NODES or len(spec.edges) > MAX_EDGES:
            self.add("graph_too_large", prefix, f"a branch holds at most {MAX_NODES} nodes")
            return None
        body = self.body(graph_id, spec.start_node, spec.nodes, spec.edges, prefix, depth)
        if body is None:
            return None
        nodes, outgoing = body
        sub = Graph(
            id=graph_id,
            name=None,
            start_node=spec.start_node,
            max_steps=self.doc.max_steps,
            nodes=MappingProxyType(nodes),
            outgoing=MappingProxyType(outgoing),
            state=self.state,
            state_model_name=self.doc.state_model,
            document=MappingProxyType({}),
            digest="",
        )
        return Branch(key, sub)

    def reducer(self, name: str, path: str) -> str | Tool | None:
        if name in REDUCERS:
            return name
        tool = self.registry.get_tool(name)
        if tool is None or tool.is_async:
            self.add(
                "unknown_reducer",
                path,
                f"reducer {name!r} is neither one of {', '.join(sorted(REDUCERS))} nor a "
                "registered synchronous tool",
            )
            return None
        return tool

    def merge(self, spec: MergeSpec, path: str) -> tuple[str | Tool, dict[str, str | Tool]] | None:
        ok = True
        default = self.reducer(spec.default, f"{path}.default")
        reducers: dict[str, str | Tool] = {}
        for key, name in spec.keys.items():
            found = self.reducer(name, f"{path}.keys.{key}")
            if found is None:
                ok = False
            else:
                reducers[key] = found
        if default is None or not ok:
            return None
        return default, reducers

    def has_field(self, name: str) -> bool:
        model = self.state.model
        return (
            model is JsonState
            or name in model.model_fields
            or (model.model_config.get("extra") == "allow")
        )

    def fanout(self, graph_id: str, spec: NodeSpec, path: str, depth: int) -> FanOut | None:
        fan: ParallelSpec | MapSpec | None = spec.parallel or spec.map
        if fan is None:  # pragma: no cover - called for fan-out nodes only
            return None
        merged = self.merge(fan.merge, f"{path}.merge")
        failure = fan.failure
        max_failures = max_pct = None
        if isinstance(failure, ToleranceSpec):
            if (failure.tolerated_failures is None) == (failure.tolerated_failure_pct is None):
                self.add(
                    "invalid_failure",
                    f"{path}.failure",
                    "give exactly one of tolerated_failures and tolerated_failure_pct "
                    '(or "fail_fast")',
                )
            max_failures, max_pct = failure.tolerated_failures, failure.tolerated_failure_pct
        if isinstance(fan, ParallelSpec):
            if len(fan.branches) > MAX_BRANCHES:
                self.add(
                    "graph_too_large",
                    f"{path}.branches",
                    f"{len(fan.branches)} branches; limit {MAX_BRANCHES}",
                )
                return None
            branches: list[Branch] = []
            keys: set[str] = set()
            for i, bspec in enumerate(fan.branches):
                bpath = f"{path}.branches[{i}]"
                if bspec.id is None:
                    self.add("missing_key", f"{bpath}.id", "a parallel branch needs an id")
                    continue
                if bspec.id in keys:
                    self.add("duplicate_branch_id", f"{bpath}.id", f"branch {bspec.id!r} repeats")
                    continue
                keys.add(bspec.id)
                branch = self.branch(
                    f"{graph_id}/{spec.id}/{bspec.id}", bspec.id, bspec, bpath, depth
                )
                if branch is not None:
                    branches.append(branch)
            if merged is None or len(branches) != len(fan.branches):
                return None
            return FanOut(
                "parallel",
                tuple(branches),
                MappingProxyType(merged[1]),
                merged[0],
                fan.max_concurrency or len(branches),
                max_failures,
                max_pct,
            )
        items = self.expression(fan.items, f"{path}.items")
        if fan.branch.id is not None:
            self.add("unexpected_key", f"{path}.branch.id", "a map's branch has no id")
        for name, where in (
            (fan.as_, "as"),
            *(((fan.collect.into, "collect.into"),) if fan.collect is not None else ()),
        ):
            if not self.has_field(name):
                self.add(
                    "unknown_state_key",
                    f"{path}.{where}",
                    f"{name!r} is not a field of the state model {self.doc.state_model!r}",
                )
        branch = self.branch(f"{graph_id}/{spec.id}", spec.id, fan.branch, f"{path}.branch", depth)
        if branch is None or items is None or merged is None:
            return None
        return FanOut(
            "map",
            (branch,),
            MappingProxyType(merged[1]),
            merged[0],
            fan.max_concurrency,
            max_failures,
            max_pct,
            items=items,
            as_name=fan.as_,
            collect_from=fan.collect.source if fan.collect is not None else None,
            collect_into=fan.collect.into if fan.collect is not None else None,
            max_items=fan.max_items,
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

    def over(self, path: str, what: str, value: int, maximum: int) -> None:
        if value > maximum:
            self.add("over_limit", path, f"{what} is {value}; this server allows at most {maximum}")

    def edge(self, i: int, spec: EdgeSpec, node_ids: set[str], prefix: str = "$") -> Edge | None:
        path = f"{prefix}.edges[{i}]"
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

    def structure(
        self,
        node_ids: set[str],
        start_node: str,
        specs: list[NodeSpec],
        edge_specs: list[EdgeSpec],
        prefix: str,
    ) -> None:
        """Reachability from the start, and cycles that avoid every loop edge."""
        adj: dict[str, list[str]] = {n: [] for n in node_ids}
        adj_no_loop: dict[str, list[str]] = {n: [] for n in node_ids}
        for e in edge_specs:
            if e.source in node_ids and e.to in node_ids:
                adj[e.source].append(e.to)
                if e.type != "loop":
                    adj_no_loop[e.source].append(e.to)
        if start_node in node_ids:
            reached = {start_node}
            stack = [start_node]
            while stack:
                for nxt in adj[stack.pop()]:
                    if nxt not in reached:
                        reached.add(nxt)
                        stack.append(nxt)
            for i, spec in enumerate(specs):
                if spec.id not in reached:
                    self.add(
                        "unreachable_node",
                        f"{prefix}.nodes[{i}]",
                        f"node {spec.id!r} cannot be reached from {start_node!r}",
                    )
        for cycle in _cycles(adj_no_loop):
            self.add(
                "unbounded_cycle",
                f"{prefix}.edges",
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
