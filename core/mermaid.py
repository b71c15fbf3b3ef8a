"""A graph as a Mermaid ``flowchart``, optionally marked with a run's progress.

Each kind of edge has its own look: a sequential edge is a plain arrow, a
branch a dotted arrow labelled with its condition, a loop a thick arrow
labelled ``loop ≤ N`` and its until-condition. The start node is a rounded
box and a node that waits for input a hexagon. With a run, classes mark the
nodes it visited (completed at least once), its current node, and that node
as failed or waiting.

A fan-out node is a ``subgraph`` (edges into and out of it end at its
border): a ``parallel`` node holds one nested subgraph per branch, a ``map``
node its branch template once, each drawn like a graph; fan-outs in
branches nest. Inside the run's fan-out, each started branch's node is
marked too: ``current`` while the branch runs, ``failed``, or ``visited``
(its last node) once it completed; a map's template node is ``current``
while any item is at it.

Node ids may hold any printable character, so nodes are named ``n0``,
``n1``, ... in the chart (a branch's ``n3_b1_n0``, ...: the fan-out's name,
the branch's index, the node's) and every label is escaped with Mermaid's
entity codes (``%``, ``{`` and ``}`` included): nothing in a graph document
can close a label or a subgraph title or add a directive (``%%{init: ...}%%``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .runs import RunRecord, RunStatus

if TYPE_CHECKING:
    from .graph import Edge, FanOut, Graph, Node

#: Longest label text kept (conditions are cut with an ellipsis).
MAX_LABEL = 80

_ENTITIES = {
    "#": "#35;",
    '"': "#quot;",
    "<": "#lt;",
    ">": "#gt;",
    "&": "#amp;",
    "|": "#124;",
    "`": "#96;",
    "\\": "#92;",
    # Mermaid reads %%{...}%% as a directive (theme, CSS) anywhere in the text,
    # comments included.
    "%": "#37;",
    "{": "#123;",
    "}": "#125;",
}

CLASS_DEFS = (
    "classDef start stroke-width:3px",
    "classDef wait fill:#fff7e0,stroke:#b7791f",
    "classDef visited fill:#e6f4ea,stroke:#2f855a",
    "classDef current fill:#e0ecff,stroke:#2b6cb0,stroke-width:3px",
    "classDef failed fill:#fde8e8,stroke:#c53030,stroke-width:3px",
    "classDef waiting fill:#fff3c4,stroke:#b7791f,stroke-width:3px",
)

#: The looks of fan-out subgraphs, given before :data:`CLASS_DEFS` (only when the
#: graph has a fan-out) so that a run's marks win over them.
FANOUT_CLASS_DEFS = (
    "classDef fanout_parallel fill:#f4f0fd,stroke:#6b46c1,stroke-width:2px,stroke-dasharray:6 3",
    "classDef fanout_map fill:#e9f6f5,stroke:#2c7a7b,stroke-width:2px,stroke-dasharray:6 3",
    "classDef fanout_branch fill:#fcfcfd,stroke:#a0aec0",
)

#: How a branch's status in ``RunRecord.fanout`` marks its node.
_BRANCH_MARKS = {"running": "current", "failed": "failed", "completed": "visited"}


def escape(text: str) -> str:
    """``text`` safe inside a quoted Mermaid label."""
    if len(text) > MAX_LABEL:
        text = text[: MAX_LABEL - 1] + "…"
    text = "".join(_ENTITIES.get(c, c) for c in text)
    # Line breaks and other control characters would end the statement.
    return "".join(c if c >= " " else " " for c in text)


def _edge_label(edge: Edge) -> str:
    if edge.type == "loop":
        label = f"loop ≤ {edge.max_iterations}"
        if edge.until is not None:
            label += f" until {edge.until.source}"
        return label
    if edge.expression is not None:
        return edge.expression.source
    if edge.condition_tool is not None:
        return f"callable {edge.condition_tool.name}"
    return ""


def _fanout_detail(fan: FanOut) -> str:
    """The second line of a fan-out's title (escaped): its kind and policies, briefly."""
    if fan.fail_fast:
        failure = "fail fast"
    elif fan.max_failures is not None:
        failure = f"tolerate {_count(fan.max_failures, 'failure')}"
    else:
        failure = f"tolerate {fan.max_failure_pct:g}% failures"
    if fan.kind == "map":
        items = fan.items.source if fan.items is not None else "?"
        return (
            escape(f"map over {items}")
            + escape(f" as {fan.as_name or 'item'}")
            + escape(f" · {failure}")
        )
    default = fan.default if isinstance(fan.default, str) else fan.default.name
    merge = f"merge {default}"
    if fan.reducers:
        merge += f" (+{_count(len(fan.reducers), 'key')})"
    return escape(f"parallel · {failure} · {merge}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass
class _Chart:
    lines: list[str] = field(default_factory=list)
    #: Start nodes of branches (not the graph's own).
    starts: list[str] = field(default_factory=list)
    waits: list[str] = field(default_factory=list)
    #: Subgraph names by their class (fanout_parallel, fanout_map, fanout_branch).
    looks: dict[str, list[str]] = field(default_factory=dict)
    #: The graph's own fan-outs: node id -> (kind, branch key -> node id -> name).
    fanouts: dict[str, tuple[str, dict[str, dict[str, str]]]] = field(default_factory=dict)

    def draw(self, graph: Graph, prefix: str, depth: int) -> dict[str, str]:
        """``graph``'s nodes and edges at ``depth`` (0: the graph, else a branch)."""
        pad = "    " * (depth + 1)
        names = {node_id: f"{prefix}n{i}" for i, node_id in enumerate(graph.nodes)}
        for node_id, node in graph.nodes.items():
            name = names[node_id]
            if node.fanout is not None:
                self.fanout(node, node.fanout, name, depth)
                continue
            detail = node.tool.name if node.tool is not None else "wait for input"
            if node.wait is not None and node.tool is not None:
                detail += " · wait"
            label = f"{escape(node_id)}<br/><small>{escape(detail)}</small>"
            if node.wait is not None:
                self.lines.append(f'{pad}{name}{{{{"{label}"}}}}')
                self.waits.append(name)
            elif node_id == graph.start_node:
                self.lines.append(f'{pad}{name}(["{label}"])')
            else:
                self.lines.append(f'{pad}{name}["{label}"]')
        if depth > 0:
            self.starts.append(names[graph.start_node])
        for source, outgoing in graph.outgoing.items():
            edges = [*outgoing.conditional]
            if outgoing.sequential is not None:
                edges.append(outgoing.sequential)
            for edge in edges:
                a, b = names[source], names[edge.target]
                label = _edge_label(edge)
                arrow = {"loop": "==>", "branch": "-.->"}.get(edge.type, "-->")
                if label:
                    self.lines.append(f'{pad}{a} {arrow}|"{escape(label)}"| {b}')
                else:
                    self.lines.append(f"{pad}{a} {arrow} {b}")
        return names

    def fanout(self, node: Node, fan: FanOut, name: str, depth: int) -> None:
        """A fan-out node as a subgraph: a parallel's branches in subgraphs of their own,
        a map's template once."""
        pad = "    " * (depth + 1)
        title = f"{escape(node.id)}<br/><small>{_fanout_detail(fan)}</small>"
        self.lines.append(f'{pad}subgraph {name} ["{title}"]')
        self.looks.setdefault(f"fanout_{fan.kind}", []).append(name)
        branches: dict[str, dict[str, str]] = {}
        if fan.kind == "map":
            branches[""] = self.draw(fan.branches[0].graph, f"{name}_b0_", depth + 1)
        else:
            for j, branch in enumerate(fan.branches):
                sub = f"{name}_b{j}"
                self.lines.append(f'{pad}    subgraph {sub} ["{escape(branch.key)}"]')
                self.looks.setdefault("fanout_branch", []).append(sub)
                branches[branch.key] = self.draw(branch.graph, f"{sub}_", depth + 2)
                self.lines.append(f"{pad}    end")
        self.lines.append(f"{pad}end")
        if depth == 0:
            self.fanouts[node.id] = (fan.kind, branches)

    def branch_names(self, fan_node: Any, branch: Any) -> Mapping[str, str]:
        """Names of the nodes of one branch of the graph's fan-out ``fan_node`` (a map's
        template whatever ``branch``); empty if there is no such branch."""
        found = self.fanouts.get(fan_node) if isinstance(fan_node, str) else None
        if found is None:
            return {}
        kind, branches = found
        if kind == "map":
            return branches[""]
        return branches.get(branch, {}) if isinstance(branch, str) else {}


def _order(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def to_mermaid(
    graph: Graph,
    run: RunRecord | None = None,
    visited: Iterable[str] = (),
    *,
    branch_visited: Iterable[tuple[str, str, str]] = (),
) -> str:
    """The graph as a Mermaid ``flowchart TD`` (text ending with a newline).

    Args:
        run: mark this run's current node (``current``; ``failed`` or
            ``waiting`` by its status) and, while it is inside a fan-out
            (``run.fanout``), each started branch's node.
        visited: node ids of the graph the run completed at least once (``visited``).
        branch_visited: nodes of branches the run completed at least once
            (``visited``), as (fan-out node id, branch id, node id); a map's
            branch id is ignored (its template is drawn once).
    """
    chart = _Chart()
    lines = chart.lines
    lines.append("flowchart TD")
    title = graph.id + (f": {graph.name}" if graph.name else "")
    lines.append(f"    %% graph {escape(title)}")
    names = chart.draw(graph, "", 0)
    if chart.looks:
        lines.extend(f"    {d}" for d in FANOUT_CLASS_DEFS)
    lines.extend(f"    {d}" for d in CLASS_DEFS)
    for look in ("fanout_parallel", "fanout_map", "fanout_branch"):
        if look in chart.looks:
            lines.append(f"    class {','.join(chart.looks[look])} {look}")
    starts = sorted([names[graph.start_node], *chart.starts], key=_order)
    lines.append(f"    class {','.join(starts)} start")
    if chart.waits:
        lines.append(f"    class {','.join(chart.waits)} wait")
    done = {names[n] for n in visited if n in names}
    for fan_node, branch, node_id in branch_visited:
        name = chart.branch_names(fan_node, branch).get(node_id)
        if name is not None:
            done.add(name)
    if done:
        lines.append(f"    class {','.join(sorted(done, key=_order))} visited")
    if run is not None and run.current_node in names:
        current = names[run.current_node]
        kind = {
            RunStatus.FAILED: "failed",
            RunStatus.WAITING: "waiting",
        }.get(run.status, "current")
        if run.status is not RunStatus.COMPLETED and run.status is not RunStatus.CANCELLED:
            lines.append(f"    class {current} {kind}")
    if run is not None and isinstance(run.fanout, dict) and chart.fanouts:
        lines.extend(_branch_marks(chart, run))
    return "\n".join(lines) + "\n"


def _branch_marks(chart: _Chart, run: RunRecord) -> list[str]:
    """``class`` lines for the node of each started branch of ``run``'s fan-out."""
    fanout = run.fanout or {}
    branches = fanout.get("branches")
    if not isinstance(branches, dict):
        return []
    marks: dict[str, set[str]] = {"visited": set(), "current": set(), "failed": set()}
    for key, progress in branches.items():
        if not isinstance(progress, dict):
            continue
        status = progress.get("status")
        mark = _BRANCH_MARKS.get(status) if isinstance(status, str) else None
        if mark is None or (mark == "current" and run.status.is_terminal):
            continue  # a branch of an ended run runs no more
        node_id = progress.get("node")
        if not isinstance(node_id, str):
            continue
        name = chart.branch_names(fanout.get("node"), key).get(node_id)
        if name is not None:
            marks[mark].add(name)
    return [
        f"    class {','.join(sorted(found, key=_order))} {mark}"
        for mark, found in marks.items()
        if found
    ]
