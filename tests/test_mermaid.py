"""Graphs as Mermaid flowcharts: golden files for the samples, escaping, a run's progress."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
from typing import Any

from samples import python_review
from trioflow import Engine, Registry, RunRecord, RunStatus, compile_graph, default_registry
from trioflow.mermaid import to_mermaid

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"


def test_the_samples_match_their_golden_files() -> None:
    code_review = json.loads((ROOT / "samples" / "code_review.json").read_text())
    assert (
        compile_graph(code_review, default_registry()).to_mermaid()
        == (GOLDEN / "code_review.mmd").read_text()
    )
    registry = default_registry()
    python_review.register(registry)
    graph = compile_graph(python_review.graph_document(), registry)
    assert graph.to_mermaid() == (GOLDEN / "python_review.mmd").read_text()


def test_the_command_line_prints_the_same_text() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trioflow.web.cli", "graph", "mermaid", "samples/code_review.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (GOLDEN / "code_review.mmd").read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "trioflow.web.cli", "graph", "mermaid", "/nonexistent.json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 3 and "cannot read" in bad.stderr


HOSTILE = 'x"]; click n0 call alert(1) %%<script>alert(1)</script>#&|`\\\n:::cls'


def test_labels_cannot_break_out_of_the_chart() -> None:
    document = {
        "id": "hostile",
        "start_node": HOSTILE[:-10],
        "nodes": [
            {"id": HOSTILE[:-10], "callable": "tools.noop"},
            {"id": "b<img src=x onerror=alert(1)>", "callable": "tools.noop"},
        ],
        "edges": [
            {
                "from": HOSTILE[:-10],
                "to": "b<img src=x onerror=alert(1)>",
                "type": "branch",
                "condition": {"expression": "'\"]; click n0 call evil()' == context.get('a')"},
            },
            {"from": HOSTILE[:-10], "to": "b<img src=x onerror=alert(1)>"},
        ],
    }
    text = compile_graph(document, default_registry()).to_mermaid()
    for line in text.splitlines()[2:]:  # after the header and the escaped title comment
        # Quotes only open and close labels; no raw markup but the chart's own tags.
        assert line.count('"') in (0, 2), line
        stripped = line.replace("<br/>", "").replace("<small>", "").replace("</small>", "")
        assert "<" not in stripped and ">" not in stripped.replace("-->", "").replace(
            "-.->", ""
        ).replace("==>", ""), line
    assert "<script>" not in text and "onerror=alert(1)>" not in text
    assert "click" not in re.sub(r'"[^"]*"', "", text)  # only inside labels, as text


def test_no_directive_can_be_smuggled_in() -> None:
    """``%%{init: ...}%%`` sets a theme or CSS anywhere in the text, comments included."""
    directive = "%%{init: {'themeCSS': '*{fill:red}'}}%%"
    document = {
        "id": "directives",
        "name": directive,
        "start_node": directive,
        "nodes": [
            {"id": directive, "callable": "tools.noop"},
            {"id": "Promo 100%%{x", "callable": "tools.noop"},
        ],
        "edges": [
            {
                "from": directive,
                "to": "Promo 100%%{x",
                "type": "branch",
                "condition": {"expression": f"context.get('a') == {directive!r}"},
            }
        ],
    }
    text = compile_graph(document, default_registry()).to_mermaid()
    assert "{" not in text.replace("{{", "").replace("}}", "")  # only the wait hexagon's
    assert text.count("%%") == 1 and text.splitlines()[1].startswith("    %% graph ")
    assert "#37;#37;#123;init: #123;" in text


async def test_a_run_marks_visited_current_failed_and_waiting_nodes(
    engine: Engine, registry: Registry
) -> None:
    def boom() -> None:
        raise RuntimeError("no")

    registry.add_tool("test.boom", boom)
    await engine.register_graph(
        {
            "id": "marks",
            "start_node": "a",
            "nodes": [
                {"id": "a", "callable": "tools.noop"},
                {"id": "b", "callable": "test.boom"},
                {"id": "c", "callable": "tools.noop"},
            ],
            "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}],
        }
    )
    failed = await engine.wait((await engine.start_run("marks")).run_id)
    assert failed.status is RunStatus.FAILED
    text = await engine.graph_mermaid("marks", failed.run_id)
    assert "    class n0 visited\n" in text and "    class n1 failed\n" in text
    assert "class n2" not in text
    plain = await engine.graph_mermaid("marks")
    assert "visited" not in plain.split("classDef visited")[1].split("\n", 1)[1]
    await engine.register_graph(
        {
            "id": "asks",
            "start_node": "a",
            "nodes": [
                {"id": "a", "callable": "tools.noop"},
                {"id": "ask", "wait": {"prompt": "ok?"}},
            ],
            "edges": [{"from": "a", "to": "ask"}],
        }
    )
    run = await engine.start_run("asks")
    waiting = await engine.wait_stop(run.run_id)
    assert waiting.status is RunStatus.WAITING
    text = await engine.graph_mermaid("asks", run.run_id)
    assert '    n1{{"ask<br/><small>wait for input</small>"}}\n' in text
    assert "    class n1 wait\n" in text and "    class n1 waiting\n" in text
    assert "    class n0 visited\n" in text


# -- fan-outs ---------------------------------------------------------------------------

FANOUT = json.loads((GOLDEN / "fanout.json").read_text())
#: Every statement of a chart starts with one of these (never with a graph's text).
STATEMENT = re.compile(
    r"(flowchart TD|%% graph |subgraph n[0-9_bn]+ \[\"|end$|n[0-9_bn]+[\[({ ]|class)"
)


def test_fanouts_are_subgraphs_matching_their_golden_file() -> None:
    """A parallel node (two branches, one with a loop) and a map whose branch holds a
    parallel node, drawn as nested subgraphs (tests/golden/fanout.mmd, inspected by eye)."""
    text = compile_graph(FANOUT, default_registry()).to_mermaid()
    assert text == (GOLDEN / "fanout.mmd").read_text()
    lines = text.splitlines()
    assert sum(line.lstrip().startswith("subgraph ") for line in lines) == 7
    assert sum(line.strip() == "end" for line in lines) == 7
    assert "    n0 --> n1\n    n1 --> n2\n    n2 --> n3\n" in text  # to the subgraphs
    # The fan-out looks come before the marks' classes, so a mark wins over them.
    assert text.index("classDef fanout_branch") < text.index("classDef start")


def _hostile_fanout(text: str) -> dict[str, Any]:
    expression = f"context.get({text!r}, [])"
    return {
        "id": "hostile-fanout",
        "start_node": text,
        "nodes": [
            {
                "id": text,
                "parallel": {
                    "branches": [
                        {
                            "id": text,
                            "start_node": text,
                            "nodes": [{"id": text, "callable": "tools.noop"}],
                        },
                        {
                            "id": text + " end",
                            "start_node": "first",
                            "nodes": [
                                {"id": "first", "callable": "tools.noop"},
                                {"id": text + "2", "callable": "tools.noop"},
                            ],
                            "edges": [
                                {
                                    "from": "first",
                                    "to": text + "2",
                                    "type": "branch",
                                    "condition": {"expression": f"{expression} == []"},
                                }
                            ],
                        },
                    ],
                    "merge": {"default": "replace"},
                },
            },
            {
                "id": "each",
                "map": {
                    "items": expression,
                    "as": text,
                    "branch": {
                        "start_node": text,
                        "nodes": [{"id": text, "callable": "tools.noop"}],
                    },
                },
            },
        ],
        "edges": [{"from": text, "to": "each"}],
    }


def test_fanout_titles_and_branch_labels_cannot_break_out() -> None:
    """Branch ids, node ids, a map's items expression and ``as``: text in quoted titles
    and labels only, escaped; no statement, ``end``, directive or markup of their own."""
    hostile = "end ; subgraph x %%{init: {'theme': 'dark'}}%% " + HOSTILE.replace("\n", " ")
    for text in (hostile, "end", 'x"] ; end ; subgraph evil ["'):
        document = _hostile_fanout(text)
        document["nodes"][1]["map"]["as"] = text + "\nend\nsubgraph y\n"  # no pattern
        chart = compile_graph(document, default_registry()).to_mermaid()
        lines = chart.splitlines()
        for line in lines:
            assert STATEMENT.match(line.lstrip()), line
            assert line.count('"') in (0, 2), line
            if line.lstrip().startswith(("subgraph", "n")):
                stripped = re.sub(r"</?small>|<br/>", "", line)
                for arrow in ("-->", "-.->", "==>"):
                    stripped = stripped.replace(arrow, "")
                assert "<" not in stripped and ">" not in stripped, line
        subgraphs = [line for line in lines if line.lstrip().startswith("subgraph ")]
        assert len(subgraphs) == 4  # the parallel, its two branches, the map
        assert sum(line.strip() == "end" for line in lines) == 4
        assert "click" not in re.sub(r'"[^"]*"', "", chart)
        assert "%%" not in chart.split("\n", 2)[2]  # after the title comment, none
        assert "{" not in chart.replace("{{", "").replace("}}", "")
    assert "map over context.get(" in chart


def test_a_run_inside_a_fanout_marks_its_branches() -> None:
    graph = compile_graph(FANOUT, default_registry())

    def record(status: RunStatus, node: str, fanout: dict[str, Any] | None) -> RunRecord:
        return RunRecord("r", graph.id, status, {}, node, fanout=fanout)

    inside = {
        "node": "checks",
        "kind": "parallel",
        "size": 2,
        "branches": {
            "lint": {"status": "running", "node": "fix", "step": 3, "state": {}},
            "tests": {"status": "completed", "node": "test", "step": 1, "changes": {}},
        },
    }
    text = graph.to_mermaid(record(RunStatus.RUNNING, "checks", inside), ["prepare"])
    assert text.endswith(
        " start\n"
        "    class n0 visited\n"
        "    class n1 current\n"  # the run's node: the parallel node
        "    class n1_b1_n0 visited\n"  # the tests branch completed at test
        "    class n1_b0_n1 current\n"  # the lint branch runs fix
    )
    # Completed branch nodes in the log (branch_visited) add to the visited ones.
    text = to_mermaid(
        graph,
        record(RunStatus.RUNNING, "checks", inside),
        ["prepare"],
        branch_visited=[("checks", "lint", "lint"), ("checks", "tests", "lint")],
    )
    assert "    class n0,n1_b0_n0 visited\n" in text  # not lint's lint in tests

    # A map's template is drawn once: a node is current while any item is at it.
    items = {
        "node": "each_file",
        "kind": "map",
        "size": 7,
        "branches": {
            "0": {"status": "running", "node": "review", "step": 1},
            "1": {"status": "running", "node": "review", "step": 1},
            "2": {"status": "failed", "node": "opinions", "step": 2, "error": {}},
            "3": {"status": "completed", "node": "verdict", "step": 3},
            "4": {"status": "cancelled", "node": "verdict", "step": 3},
            "5": {"status": "running", "node": "approve", "step": 1},  # not in the branch
            "6": "junk",
        },
    }
    text = to_mermaid(
        graph,
        record(RunStatus.RUNNING, "each_file", items),
        ["prepare", "checks"],
        branch_visited=[("each_file", "each_file[3]", "review")],
    )
    assert text.endswith(
        " start\n"
        "    class n0,n1,n2_b0_n0 visited\n"
        "    class n2 current\n"
        "    class n2_b0_n2 visited\n"  # item 3 completed there
        "    class n2_b0_n0 current\n"  # items 0 and 1 are there
        "    class n2_b0_n1 failed\n"  # item 2 failed in the nested parallel
    )
    # A failed run keeps its fan-out's progress: no branch is current any more.
    text = graph.to_mermaid(record(RunStatus.FAILED, "each_file", items))
    assert text.endswith(
        " start\n    class n2 failed\n    class n2_b0_n2 visited\n    class n2_b0_n1 failed\n"
    )
    # Progress of no fan-out of the graph, or of another kind, marks nothing.
    for fanout in (
        {**inside, "node": "prepare"},
        {**inside, "node": "nope"},
        {**items, "node": "checks", "kind": "parallel"},
        {"node": "checks", "branches": ["lint"]},
    ):
        text = graph.to_mermaid(record(RunStatus.RUNNING, "checks", fanout))
        assert text.endswith(" start\n    class n1 current\n"), fanout


async def test_branch_log_entries_mark_branch_nodes_only(engine: Engine) -> None:
    """A branch's ``node_completed`` marks the branch's node (a map's: the template's),
    never the graph's node of the same id."""
    await engine.register_graph(
        {
            "id": "same-ids",
            "start_node": "fan",
            "nodes": [
                {
                    "id": "fan",
                    "parallel": {
                        "branches": [
                            {
                                "id": "a",
                                "start_node": "x",
                                "nodes": [{"id": "x", "callable": "tools.noop"}],
                            },
                            {
                                "id": "b",
                                "start_node": "y",
                                "nodes": [{"id": "y", "callable": "tools.fail"}],
                            },
                        ],
                        "failure": {"tolerated_failures": 1},
                    },
                },
                {
                    "id": "each",
                    "map": {
                        "items": "context.get('items', [])",
                        "branch": {
                            "start_node": "x",
                            "nodes": [{"id": "x", "callable": "tools.noop"}],
                        },
                    },
                },
                {"id": "stop", "callable": "tools.fail"},
                {"id": "x", "callable": "tools.noop"},
            ],
            "edges": [
                {"from": "fan", "to": "each"},
                {"from": "each", "to": "stop"},
                {"from": "stop", "to": "x"},
            ],
        }
    )
    run = await engine.wait((await engine.start_run("same-ids", {"items": [1, 2]})).run_id)
    assert run.status is RunStatus.FAILED and run.current_node == "stop"
    text = await engine.graph_mermaid("same-ids", run.run_id)
    assert text.endswith("    class n0,n0_b0_n0,n1,n1_b0_n0 visited\n    class n2 failed\n")
