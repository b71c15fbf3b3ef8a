"""Graphs as Mermaid flowcharts: golden files for the samples, escaping, a run's progress."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

from samples import python_review
from trioflow import Engine, Registry, RunStatus, compile_graph, default_registry

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
