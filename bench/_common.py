"""What every benchmark shares: result rows, summary statistics, small helpers."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SPEC_GRAPH = ROOT / "samples" / "code_review.json"
SPEC_INITIAL_STATE = {"issues_open": 1}
#: Node executions of the spec's graph from ``{"issues_open": 1}``:
#: submit, then review/fix four times (the loop fires three times, then is exhausted).
SPEC_STEPS = 9


@dataclass
class Row:
    """One line of the table. ``median``/``lo``/``hi`` are over repeated samples.

    ``note`` carries the ratios and anything a reader needs to interpret the figure.
    """

    bench: str
    case: str
    metric: str
    unit: str
    median: float | None = None
    lo: float | None = None
    hi: float | None = None
    samples: int = 0
    target: str = ""
    met: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> Row:
        return cls(**json.loads(raw))


def summarize(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def row(bench: str, case: str, metric: str, unit: str, values: Sequence[float], **kw: Any) -> Row:
    med, lo, hi = summarize(values)
    return Row(bench, case, metric, unit, med, lo, hi, len(values), **kw)


def skipped(bench: str, case: str, why: str) -> Row:
    return Row(bench, case, "-", "-", note=f"skipped: {why}")


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), nearest-rank on sorted data."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def rss_bytes() -> int:
    """This process's resident set size, from /proc/self/status (VmRSS)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def load_spec_graph() -> dict[str, Any]:
    return json.loads(SPEC_GRAPH.read_text())


def chain_graph(n: int, graph_id: str = "bench-chain") -> dict[str, Any]:
    """A linear chain of ``n`` ``tools.noop`` nodes."""
    nodes = [{"id": f"n{i}", "callable": "tools.noop"} for i in range(n)]
    edges = [{"from": f"n{i}", "to": f"n{i + 1}", "type": "sequential"} for i in range(n - 1)]
    return {
        "id": graph_id,
        "name": f"{n}-node chain",
        "start_node": "n0",
        "max_steps": n + 10,
        "nodes": nodes,
        "edges": edges,
    }


def web_available() -> bool:
    """Whether the web package (app factory and Hypercorn serving) has landed."""
    return (ROOT / "web" / "app.py").exists() and (ROOT / "web" / "serve.py").exists()


def sqlite_available() -> bool:
    return (ROOT / "core" / "stores" / "sqlite.py").exists()


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "n/a"
    r = a / b
    return f"{r:.3g}x"


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    mag = abs(value)
    if mag >= 1000:
        return f"{value:,.0f}"
    if mag >= 100:
        return f"{value:.0f}"
    if mag >= 10:
        return f"{value:.1f}"
    if mag >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def cpu_count() -> int:
    return os.cpu_count() or 1


def emit_rows(rows: Iterable[Row]) -> None:
    """For child processes: one JSON row per line on stdout, prefixed to be findable."""
    for r in rows:
        print("ROW " + r.to_json(), flush=True)


def parse_rows(stdout: str) -> list[Row]:
    return [Row.from_json(line[4:]) for line in stdout.splitlines() if line.startswith("ROW ")]
