"""The samples a newcomer runs first: the Python review graphs, their tools and embed.py."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
from typing import Any

import httpx
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
SCRIPT = str(pathlib.Path(sys.executable).parent / "trioflow")


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


# -- several files: samples/python_review_many.json ------------------------------------

CLEAN = "def add(a, b):\n    return a + b\n"
FIXABLE = """\
import os
import json


def load(path, cache={}):
    try:
        return json.loads(path)
    except:
        return cache
"""
BROKEN = "def broken(:\n    pass\n"
THREE = [
    {"filename": "add.py", "source": CLEAN},
    {"filename": "load.py", "source": FIXABLE},
    {"filename": "broken.py", "source": BROKEN},
]


@pytest.fixture
async def many_engine(review_registry: Registry, engine: Engine) -> Engine:
    await engine.register_graph(python_review.many_graph_document())
    return engine


async def run_many(
    engine: Engine, files: list[dict[str, str]], **fields: Any
) -> tuple[RunRecord, list[LogEntry]]:
    """Until the run ends, or waits for a reviewer."""
    with trio.fail_after(30):
        run = await engine.start_run("python-review-many", {"files": files, **fields})
        stopped = await engine.wait_stop(run.run_id)
        return stopped, await engine.read_log(run.run_id, limit=10_000)


def nodes_by_branch(log: list[LogEntry]) -> dict[str | None, list[str | None]]:
    """The nodes started, by branch (``None``: the top level)."""
    out: dict[str | None, list[str | None]] = {}
    for entry in log:
        if entry.event == "node_started":
            out.setdefault(entry.data.get("branch"), []).append(entry.node)
    return out


def test_many_files_graph_validates(review_registry: Registry) -> None:
    graph = compile_graph(python_review.many_graph_document(), review_registry)
    assert graph.state_model is python_review.ManyState
    survey = graph.nodes["survey"].fanout
    assert survey is not None and survey.kind == "parallel"
    assert [b.key for b in survey.branches] == ["issues", "lines"]
    assert dict(survey.reducers) == {"survey": "merge", "notes": "extend"}
    each = graph.nodes["review_each"].fanout
    assert each is not None and each.kind == "map"
    assert (each.as_name, each.collect_from, each.collect_into) == ("file", "report", "reports")
    assert (each.max_concurrency, each.max_failures, each.max_items) == (4, 1, 50)
    assert each.max_items == python_review.MAX_FILES
    [branch] = each.branches
    assert all(node.wait is None for node in branch.graph.nodes.values())
    [loop] = [e for e in branch.graph.outgoing["autofix"].conditional if e.type == "loop"]
    assert (loop.target, loop.max_iterations) == ("review", 3)
    assert graph.nodes["human_review"].wait is not None  # the one wait, after the map
    # Every field the single-file tools change stays in its branch, so files never clash.
    local = {key for key, r in each.reducers.items() if getattr(r, "name", r) != "conflict"}
    options = {"max_statements", "allow_print", "decided_by", "comment"}
    assert local == set(python_review.State.model_fields) - options
    assert set(each.reducers.values()) == {"keep"}


def test_many_files_state_is_typed(review_registry: Registry) -> None:
    model = review_registry.get_model("python_review.ManyState")
    assert model is python_review.ManyState
    with pytest.raises(ValueError, match=r"file names repeat: a\.py"):
        model.model_validate({"files": [{"filename": "a.py", "source": ""}] * 2})
    with pytest.raises(ValueError):
        model.model_validate({"files": []})
    with pytest.raises(ValueError):
        model.model_validate({"files": [{"filename": "a.py", "source": "", "lines": 1}]})


async def test_three_files_fan_out_then_join_in_file_order(many_engine: Engine) -> None:
    final, log = await run_many(many_engine, THREE)
    assert final.status is RunStatus.COMPLETED, final.error
    state = final.state
    # The map collected one report per file, in file order.
    reports = state["reports"]
    assert [(r["filename"], r["verdict"]) for r in reports] == [
        ("add.py", "approved"),
        ("load.py", "approved"),
        ("broken.py", "rejected"),
    ]
    clean, fixed, broken = reports
    assert (clean["fixed_source"], clean["rounds"], clean["issues"]) == (None, 0, [])
    assert fixed["rounds"] == 1
    assert {fix.split()[0] for fix in fixed["fixes_applied"]} == {"F401", "B006", "E722"}
    assert "except Exception:" in fixed["fixed_source"]
    assert analyse(fixed["fixed_source"]) == []
    assert [(i["code"], i["line"]) for i in broken["issues"]] == [("E999", 1)]
    # Both parallel passes, merged: one section of survey each, notes in declaration order.
    assert state["survey"] == {
        "issues": {"add.py": 0, "load.py": 3, "broken.py": 1},
        "lines": {"add.py": 2, "load.py": 9, "broken.py": 2},
    }
    assert state["notes"] == [
        "issues: 4 in 3 files before autofix, 3 fixable; does not parse: broken.py",
        "lines: 13 in 3 files, the longest load.py (9)",
    ]
    # The decision: a file that does not parse rejects the lot, without asking anyone.
    assert (state["verdict"], state["approved"], state["needs_human"]) == ("rejected", False, [])
    assert state["summary"] == "3 files: 2 approved (1 after autofix), 0 need a human, 1 rejected"
    # The branches' working fields did not leak into the top level.
    top = {k: state[k] for k in ("source", "filename", "issues", "rounds", "file", "report")}
    assert top == {
        "source": "",
        "filename": "snippet.py",
        "issues": [],
        "rounds": 0,
        "file": None,
        "report": None,
    }
    assert state["files"] == THREE  # the input, untouched
    assert nodes_by_branch(log) == {
        None: ["survey", "review_each", "summarise"],
        "issues": ["count_issues"],
        "lines": ["count_lines"],
        "review_each[0]": ["open", "parse", "review", "approve", "report"],
        "review_each[1]": ["open", "parse", "review", "autofix", "approve", "report"],
        "review_each[2]": ["open", "parse", "reject", "report"],
    }
    assert "run_waiting" not in [e.event for e in log]


async def test_files_that_need_a_human_make_the_run_wait_once(many_engine: Engine) -> None:
    files = [
        {"filename": "add.py", "source": CLEAN},
        {"filename": "hi.py", "source": "import sys\nprint('hi')\n"},
        {"filename": "report.py", "source": textwrap.dedent(UNFIXABLE)},
    ]
    waiting, log = await run_many(many_engine, files)
    assert waiting.status is RunStatus.WAITING
    assert waiting.waiting is not None and waiting.waiting["node"] == "human_review"
    assert [e.event for e in log].count("run_waiting") == 1
    state = waiting.state
    assert [r["verdict"] for r in state["reports"]] == ["approved", "needs_human", "needs_human"]
    assert (state["verdict"], state["needs_human"]) == ("needs_human", ["hi.py", "report.py"])
    hi = state["reports"][1]
    assert (hi["fixed_source"], [i["code"] for i in hi["issues"]]) == ("print('hi')\n", ["T201"])

    await many_engine.resume(waiting.run_id, {"approved": True, "comment": "scripts may print"})
    final = await many_engine.wait(waiting.run_id)
    assert final.status is RunStatus.COMPLETED
    assert (final.state["verdict"], final.state["approved"], final.state["decided_by"]) == (
        "approved",
        True,
        "human",
    )
    log = await many_engine.read_log(waiting.run_id, limit=10_000)
    decided = [e.message for e in log if e.event == "custom" and e.node == "human_review"]
    assert decided == ["a reviewer approved hi.py, report.py: scripts may print"]


async def test_one_failed_review_is_tolerated_and_two_fail_the_run(
    many_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(python_review, "apply_fixes", lambda source, findings: ("def (:", []))
    one = [{"filename": "add.py", "source": CLEAN}, {"filename": "os.py", "source": "import os\n"}]
    waiting, log = await run_many(many_engine, one)
    # The failed file's report is null; a human decides on it.
    assert waiting.status is RunStatus.WAITING, waiting.error
    assert [r and r["verdict"] for r in waiting.state["reports"]] == ["approved", None]
    assert waiting.state["needs_human"] == ["os.py"]
    [done] = [e for e in log if e.event == "fanout_completed" and e.node == "review_each"]
    assert done.data["failed"] == ["review_each[1]"]

    two = [*one, {"filename": "sys.py", "source": "import sys\n"}]
    final, _ = await run_many(many_engine, two)
    assert final.status is RunStatus.FAILED
    assert final.error is not None and final.error["code"] == "branch_failed"
    assert "autofix produced invalid Python" in final.error["details"]["error"]["message"]


async def test_serve_samples_registers_and_runs_the_many_files_graph() -> None:
    """``trioflow serve --samples`` (what ``make serve`` runs) loads the graph and its tools."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = await trio.lowlevel.open_process(
        [SCRIPT, "serve", "--port", "0", "--store", "memory://", "--samples", "--quiet"],
        cwd=ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(60):
            while (match := re.search(rb"trioflow listening on (\S+)\n", output)) is None:
                chunk = await process.stdout.receive_some()
                assert chunk, f"serve exited before listening: {output.decode()}"
                output += chunk
            async with httpx.AsyncClient(base_url=match.group(1).decode(), timeout=30) as client:
                graphs = (await client.get("/graphs")).json()["items"]
                tools = (await client.get("/tools", params={"limit": 500})).json()["items"]
                run = await client.post(
                    "/graph/run",
                    json={"graph_id": "python-review-many", "initial_state": {"files": THREE}},
                )
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.CancelScope(shield=True), trio.move_on_after(15):
            await process.wait()
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            await process.stdout.aclose()
    start = output.decode()
    assert "skipping" not in start, start
    assert "python-review-many" in [g["graph_id"] for g in graphs]
    assert {"python_review.count_lines", "python_review.summarise"} <= {t["name"] for t in tools}
    body = run.json()
    assert (run.status_code, body["status"]) == (200, "completed"), body
    assert [r["verdict"] for r in body["state"]["reports"]] == ["approved", "approved", "rejected"]


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
