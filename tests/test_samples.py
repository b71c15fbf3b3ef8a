"""The samples a newcomer runs first: the Python review graph, its tools, and samples/embed.py."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import trio
import trio.testing

from samples import python_review
from samples.python_review import analyse, apply_fixes
from trioflow import (
    Engine,
    GraphValidationError,
    LogEntry,
    Registry,
    RunRecord,
    RunStatus,
    StateValidationError,
    compile_graph,
    default_registry,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def review_registry(registry: Registry) -> Registry:
    python_review.register(registry)
    return registry


@pytest.fixture
async def review_engine(review_registry: Registry, engine: Engine) -> Engine:
    await engine.register_graph(python_review.graph_document())
    return engine


async def run_review(
    engine: Engine, source: str, **fields: Any
) -> tuple[RunRecord, list[LogEntry]]:
    """Until the run ends, or waits for a reviewer."""
    with trio.fail_after(20):
        run = await engine.start_run("python-review", {"source": textwrap.dedent(source), **fields})
        stopped = await engine.wait_stop(run.run_id)
        return stopped, await engine.read_log(run.run_id)


def nodes_run(log: list[LogEntry]) -> list[str | None]:
    return [entry.node for entry in log if entry.event == "node_started"]


def codes(record: RunRecord) -> set[str]:
    return {issue["code"] for issue in record.state["issues"]}


# -- the graph -------------------------------------------------------------------


def test_graph_validates_with_the_module_registered(review_registry: Registry) -> None:
    graph = compile_graph(python_review.graph_document(), review_registry)
    assert graph.state_model is python_review.State
    [loop] = [e for e in graph.outgoing["autofix"].conditional if e.type == "loop"]
    assert (loop.target, loop.max_iterations) == ("review", 3)


def test_graph_names_every_missing_tool_without_the_module() -> None:
    with pytest.raises(GraphValidationError) as info:
        compile_graph(python_review.graph_document(), default_registry())
    problems = {(p.code, p.path) for p in info.value.problems}
    assert ("unknown_state_model", "$.state_model") in problems
    assert sum(code == "unknown_callable" for code, _ in problems) == 7


def test_register_twice_is_harmless(review_registry: Registry) -> None:
    python_review.register(review_registry)
    assert review_registry.get_model("python_review.State") is python_review.State


# -- runs through the engine ---------------------------------------------------------


async def test_fixable_issues_are_fixed_then_approved(review_engine: Engine) -> None:
    final, log = await run_review(
        review_engine,
        """\
        import os
        import json


        def load(path):
            try:
                return json.loads(path)
            except:
                return None
        """,
    )
    assert final.status is RunStatus.COMPLETED
    assert nodes_run(log) == ["parse", "review", "autofix", "approve"]
    state = final.state
    assert (state["verdict"], state["approved"], state["issues_open"], state["rounds"]) == (
        "approved",
        True,
        0,
        1,
    )
    tree = ast.parse(state["source"])
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported == {"json"}
    handlers = [n for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler)]
    assert [ast.unparse(h.type) for h in handlers if h.type is not None] == ["Exception"]
    assert len(handlers) == 1
    assert {fix.split()[0] for fix in state["fixes_applied"]} == {"F401", "E722"}
    autofix_lines = [e.message for e in log if e.event == "custom" and e.node == "autofix"]
    assert any("removed unused import 'os'" in line for line in autofix_lines)
    assert any("the result parses" in line for line in autofix_lines)


async def test_clean_source_goes_straight_to_approve(review_engine: Engine) -> None:
    source = "def add(a, b):\n    return a + b\n"
    final, log = await run_review(review_engine, source)
    assert nodes_run(log) == ["parse", "review", "approve"]
    assert final.state["verdict"] == "approved"
    assert (final.state["source"], final.state["rounds"], final.state["fixes_applied"]) == (
        source,
        0,
        [],
    )


UNFIXABLE = """\
    def report(rows):
        total = 0
        for row in rows:
            total += row
            print(row)
        return total
    """


async def test_unfixable_issues_wait_for_a_human(review_engine: Engine) -> None:
    waiting, log = await run_review(review_engine, UNFIXABLE, max_statements=3)
    assert waiting.status is RunStatus.WAITING
    assert nodes_run(log) == ["parse", "review", "needs_human", "human_review"]
    assert log[-1].event == "run_waiting"
    assert waiting.waiting is not None
    assert waiting.waiting["input_schema"]["required"] == ["approved"]
    state = waiting.state
    assert (state["verdict"], state["approved"]) == ("needs_human", False)
    assert codes(waiting) == {"T201", "PLR0915"}
    assert state["issues_fixable"] == 0
    assert state["source"] == textwrap.dedent(UNFIXABLE)


@pytest.mark.parametrize("approved", [True, False])
async def test_the_reviewers_answer_decides_the_verdict(
    review_engine: Engine, approved: bool
) -> None:
    waiting, _ = await run_review(review_engine, UNFIXABLE, max_statements=3)
    await review_engine.resume(waiting.run_id, {"approved": approved, "comment": "looked at it"})
    final = await review_engine.wait(waiting.run_id)
    assert final.status is RunStatus.COMPLETED
    state = final.state
    assert (state["approved"], state["decided_by"], state["comment"]) == (
        approved,
        "human",
        "looked at it",
    )
    assert state["verdict"] == ("approved" if approved else "rejected")
    log = await review_engine.read_log(waiting.run_id)
    assert [e.event for e in log].count("run_input") == 1


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    # Virtual time, jumping only after 50 ms of real idleness: parse and
    # review run in worker threads, during which the clock must not jump
    # (it would jump to their 10 s timeout).
    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_nobody_answering_for_seven_days_rejects(
    patient_clock: trio.testing.MockClock, review_engine: Engine
) -> None:
    waiting, _ = await run_review(review_engine, UNFIXABLE, max_statements=3)
    assert waiting.status is RunStatus.WAITING
    start = trio.current_time()
    final = await review_engine.wait(waiting.run_id)
    assert trio.current_time() - start == pytest.approx(7 * 86400, abs=60)
    assert final.state["verdict"] == "rejected"
    assert final.state["comment"] == "no reviewer answered within 7 days"


async def test_allow_print_turns_the_print_check_off(review_engine: Engine) -> None:
    final, _ = await run_review(review_engine, "print('hello')\n", allow_print=True)
    assert final.state["verdict"] == "approved"


async def test_mixed_issues_fix_what_they_can_then_loop_to_a_human(review_engine: Engine) -> None:
    final, log = await run_review(review_engine, "import sys\nprint('hi')\n")
    assert nodes_run(log) == ["parse", "review", "autofix", "review", "needs_human", "human_review"]
    [loop] = [e for e in log if e.event == "edge_taken" and e.data["type"] == "loop"]
    assert loop.data == {"edge": "autofix->review", "type": "loop", "iteration": 1}
    assert final.state["source"] == "print('hi')\n"
    assert codes(final) == {"T201"}
    assert final.state["verdict"] == "needs_human"


async def test_syntax_error_is_recorded_and_rejected(review_engine: Engine) -> None:
    final, log = await run_review(review_engine, "def broken(:\n    pass\n")
    # Documented: the run completes (it is a verdict, not a crash) at ``reject``.
    assert final.status is RunStatus.COMPLETED
    assert nodes_run(log) == ["parse", "reject"]
    state = final.state
    assert (state["parsed"], state["verdict"], state["approved"]) == (False, "rejected", False)
    [issue] = state["issues"]
    assert (issue["code"], issue["line"], issue["fixable"]) == ("E999", 1, False)
    assert any(e.level == "error" and e.node == "parse" for e in log if e.event == "custom")


async def test_autofix_that_breaks_the_source_fails_the_run(
    review_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(python_review, "apply_fixes", lambda source, findings: ("def (:", []))
    final, _ = await run_review(review_engine, "import os\n")
    assert final.status is RunStatus.FAILED
    assert final.error is not None and final.error["node"] == "autofix"
    assert "autofix produced invalid Python" in final.error["message"]
    assert final.state["source"] == "import os\n"  # the broken rewrite was never stored


async def test_state_is_typed(review_engine: Engine) -> None:
    with pytest.raises(StateValidationError):
        await review_engine.start_run("python-review", {"filename": "no_source.py"})
    with pytest.raises(StateValidationError):
        await review_engine.start_run("python-review", {"source": "", "issue_count": 1})


# -- the fixers, without the engine ----------------------------------------------------


def fix(source: str, **options: Any) -> str:
    fixed, _ = apply_fixes(textwrap.dedent(source), analyse(textwrap.dedent(source), **options))
    ast.parse(fixed)
    return fixed


def test_mutable_default_becomes_none_with_a_guard() -> None:
    fixed = fix('''\
        def collect(item, seen: list[int] = [], *, index={}):
            """Doc."""
            seen.append(item)
            index[item] = len(seen)
            return seen
        ''')
    assert "seen: list[int] | None = None" in fixed
    assert "index=None" in fixed
    namespace: dict[str, Any] = {}
    exec(compile(fixed, "fixed.py", "exec"), namespace)  # our own fixed sample code
    assert namespace["collect"](1) == [1]
    assert namespace["collect"](2) == [2]  # no longer shared between calls
    assert ast.get_docstring(ast.parse(fixed).body[0]) == "Doc."  # type: ignore[arg-type]


def test_guard_goes_before_a_decorated_first_statement() -> None:
    fixed = fix("""\
        import functools


        def outer(cache=[]):
            @functools.wraps(print)
            def inner():
                return cache
            return inner
        """)
    assert "    if cache is None:\n        cache = []\n    @functools.wraps" in fixed


def test_fixes_keep_used_names_and_empty_blocks_valid() -> None:
    fixed = fix("""\
        import os, sys  # keep sys
        from collections import (
            OrderedDict,
            deque,
        )


        def f() -> "deque[int]":
            return sys.argv


        def g():
            import re
        """)
    assert "import sys  # keep sys" in fixed
    assert "from collections import deque" in fixed  # used in a string annotation
    assert "    pass\n" in fixed  # ``import re`` was the whole body
    assert analyse(fixed) == []


def test_unsafe_rewrites_are_reported_but_left_alone() -> None:
    source = "import os; x = 1\n\ndef f(items=[]): return items\n"
    findings = analyse(source)
    assert [(f.issue.code, f.issue.fixable) for f in findings] == [("F401", False), ("B006", False)]
    assert apply_fixes(source, findings) == (source, [])


def test_noqa_silences_a_line() -> None:
    source = "import readline  # noqa: F401\nimport os  # noqa\nprint(1)  # noqa: F401\n"
    assert [(f.issue.code, f.issue.line) for f in analyse(source)] == [("T201", 3)]


def test_package_init_imports_are_not_flagged() -> None:
    assert analyse("from .engine import Engine\n", filename="pkg/__init__.py") == []
    assert [f.issue.code for f in analyse("from .engine import Engine\n")] == ["F401"]


# -- samples/embed.py -------------------------------------------------------------------


def test_embed_sample_runs() -> None:
    result = subprocess.run(
        [sys.executable, "samples/embed.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "run_completed" in out
    assert "status: completed, verdict: approved" in out
    assert "except Exception:" in out
    assert "import os" not in out.split("fixed source:")[1]
