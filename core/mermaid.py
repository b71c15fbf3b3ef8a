"""A graph as a Mermaid ``flowchart``, optionally marked with a run's progress.

Each kind of edge has its own look: a sequential edge is a plain arrow, a
branch a dotted arrow labelled with its condition, a loop a thick arrow
labelled ``loop ≤ N`` and its until-condition. The start node is a rounded
box and a node that waits for input a hexagon. With a run, classes mark the
nodes it visited (completed at least once), its current node, and that node
as failed or waiting.

Node ids may hold any printable character, so nodes are named ``n0``,
``n1``, ... in the chart and every label is escaped with Mermaid's entity
codes (``%``, ``{`` and ``}`` included): nothing in a graph document can
close a label or add a directive (``%%{init: ...}%%``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .runs import RunRecord, RunStatus

if TYPE_CHECKING:
    from .graph import Edge, Graph

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


def to_mermaid(graph: Graph, run: RunRecord | None = None, visited: Iterable[str] = ()) -> str:
    """The graph as a Mermaid ``flowchart TD`` (text ending with a newline).

    Args:
        run: mark this run's current node (``current``; ``failed`` or
            ``waiting`` by its status).
        visited: node ids the run completed at least once (``visited``).
    """
    names = {node_id: f"n{i}" for i, node_id in enumerate(graph.nodes)}
    lines = ["flowchart TD"]
    title = graph.id + (f": {graph.name}" if graph.name else "")
    lines.append(f"    %% graph {escape(title)}")
    for node_id, node in graph.nodes.items():
        detail = node.tool.name if node.tool is not None else "wait for input"
        if node.wait is not None and node.tool is not None:
            detail += " · wait"
        label = f"{escape(node_id)}<br/><small>{escape(detail)}</small>"
        name = names[node_id]
        if node.wait is not None:
            lines.append(f'    {name}{{{{"{label}"}}}}')
        elif node_id == graph.start_node:
            lines.append(f'    {name}(["{label}"])')
        else:
            lines.append(f'    {name}["{label}"]')
    for source, outgoing in graph.outgoing.items():
        edges = [*outgoing.conditional]
        if outgoing.sequential is not None:
            edges.append(outgoing.sequential)
        for edge in edges:
            a, b = names[source], names[edge.target]
            label = _edge_label(edge)
            arrow = {"loop": "==>", "branch": "-.->"}.get(edge.type, "-->")
            if label:
                lines.append(f'    {a} {arrow}|"{escape(label)}"| {b}')
            else:
                lines.append(f"    {a} {arrow} {b}")
    lines.extend(f"    {d}" for d in CLASS_DEFS)
    lines.append(f"    class {names[graph.start_node]} start")
    waits = [names[n] for n, node in graph.nodes.items() if node.wait is not None]
    if waits:
        lines.append(f"    class {','.join(waits)} wait")
    done = sorted({names[n] for n in visited if n in names}, key=lambda n: int(n[1:]))
    if done:
        lines.append(f"    class {','.join(done)} visited")
    if run is not None and run.current_node in names:
        current = names[run.current_node]
        kind = {
            RunStatus.FAILED: "failed",
            RunStatus.WAITING: "waiting",
        }.get(run.status, "current")
        if run.status is not RunStatus.COMPLETED and run.status is not RunStatus.CANCELLED:
            lines.append(f"    class {current} {kind}")
    return "\n".join(lines) + "\n"
