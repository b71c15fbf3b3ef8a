"""A Python code review that does real work with :mod:`ast`: review, autofix, decide.

The graph is ``samples/python_review.json``; its state model is :class:`State`
(registered as ``"python_review.State"``). The flow::

    parse --syntax error--> reject
      |
      v
    review --no issues--> approve
      |    --fixable issues--> autofix --loop (at most 3, until no issues)--> review
      |                          |  --no issues left--> approve
      |                          '- otherwise (loop exhausted) --> needs_human
      '- otherwise (only unfixable issues) --> needs_human --> human_review (waits)

``parse`` checks that the source compiles; a syntax error becomes an ``E999``
issue and the run ends at ``reject`` (``verdict == "rejected"``): there is
nothing to review or fix. ``review`` reports, with ruff's codes:

==========  ====================================  ==================================
code        finding                               autofix
==========  ====================================  ==================================
F401        unused import                         removes it (not in ``__init__.py``)
E722        bare ``except:``                      ``except Exception:``
B006        mutable default argument              ``None`` plus an ``is None`` guard
PLR0915     function with too many statements     none: a human splits it
T201        ``print()`` call (unless allowed)     none: a human picks a logger
==========  ====================================  ==================================

A ``# noqa`` comment on the reported line silences it (``# noqa: T201`` only
that code), e.g. for an import kept for its side effects.

``autofix`` rewrites only what it can rewrite safely (a statement that shares
its line with another, a one-line function or an unusual annotation is left
alone and reported as not fixable), parses the result again to prove it is
valid Python, and re-reviews it; the loop edge sends it back to ``review``
until nothing is open. When only issues a machine cannot fix remain,
``needs_human`` logs them (``verdict == "needs_human"``) and the run waits at
``human_review`` for a reviewer's answer, ``{"approved": bool, "comment":
str}`` (``POST /graph/resume/{run_id}``, or ``Engine.resume``); ``decide``
then turns it into the verdict (``approved`` or ``rejected``, with
``decided_by == "human"``). Nobody answering within seven days counts as a
rejection (the wait's ``on_timeout`` input).

The tools show the three ways a node can run: ``parse`` is async (it hands the
parse to a worker thread itself, so the event loop never blocks); ``review``
and ``autofix`` are plain sync functions, which the engine runs in worker
threads; the verdict tools only set fields and are registered ``inline``.
Every tool logs what it found through its :class:`~trioflow.RunContext`.

The checks and fixers are plain :mod:`ast` code with no engine dependency, in
:mod:`samples.python_review.checks`; this module holds the state model, the
tools that wrap them and :func:`register`.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field

from trioflow import Registry, RunContext

from .checks import Edit as Edit
from .checks import Finding as Finding
from .checks import Issue as Issue
from .checks import analyse as analyse
from .checks import apply_fixes as apply_fixes

GRAPH_PATH = Path(__file__).resolve().parent.parent / "python_review.json"
"""The graph document that runs these tools."""

MAX_SOURCE_CHARS = 200_000


class ReviewError(RuntimeError):
    """A tool refused to continue: autofix produced invalid Python, or approve saw open issues."""


class State(BaseModel):
    """The state of a review run. Only ``source`` is required.

    ``issues_open`` and ``issues_fixable`` are the counts the graph's
    conditions read; the tools keep them equal to the counts of ``issues``.
    """

    model_config = ConfigDict(extra="forbid")

    source: Annotated[str, Field(max_length=MAX_SOURCE_CHARS)]
    filename: str = "snippet.py"
    max_statements: Annotated[int, Field(ge=1)] = 30
    allow_print: bool = False
    parsed: bool = False
    issues: list[Issue] = Field(default_factory=list)
    issues_open: int = 0
    issues_fixable: int = 0
    fixes_applied: list[str] = Field(default_factory=list)
    rounds: int = 0
    approved: bool = False
    verdict: Literal["pending", "approved", "needs_human", "rejected"] = "pending"
    #: Who decided the verdict: the checks, or a reviewer at ``human_review``.
    decided_by: Literal["machine", "human"] = "machine"
    #: The reviewer's comment, from the answer to ``human_review``.
    comment: Annotated[str, Field(max_length=2000)] = ""


# -- tools -----------------------------------------------------------------------


def _counts(issues: Sequence[Issue]) -> dict[str, Any]:
    return {
        "issues": [issue.model_dump() for issue in issues],
        "issues_open": len(issues),
        "issues_fixable": sum(issue.fixable for issue in issues),
    }


def _review(state: State, source: str) -> list[Finding]:
    return analyse(
        source,
        filename=state.filename,
        max_statements=state.max_statements,
        allow_print=state.allow_print,
    )


def _syntax_error(source: str, filename: str) -> Issue | None:
    try:
        ast.parse(source, filename)
    except SyntaxError as exc:
        return Issue(code="E999", line=exc.lineno or 1, message=f"syntax error: {exc.msg}")
    except ValueError as exc:  # e.g. a NUL byte in the source
        return Issue(code="E999", line=1, message=f"cannot parse: {exc}")
    return None


async def parse(state: State, ctx: RunContext) -> dict[str, Any]:
    """Check that the source parses; a syntax error becomes an ``E999`` issue."""
    error = await trio.to_thread.run_sync(
        _syntax_error, state.source, state.filename, abandon_on_cancel=True
    )
    if error is None:
        ctx.log(f"{state.filename} parses ({len(state.source.splitlines())} lines)")
        return {"parsed": True}
    ctx.log(f"{state.filename}:{error.line}: {error.message}", level="error", line=error.line)
    return {"parsed": False, **_counts([error])}


def review(state: State, ctx: RunContext) -> dict[str, Any]:
    """Find unused imports, bare excepts, long functions, mutable defaults and prints."""
    issues = [finding.issue for finding in _review(state, state.source)]
    for issue in issues:
        ctx.log(
            f"{state.filename}:{issue.line}: {issue.code} {issue.message}",
            level="warning",
            code=issue.code,
            line=issue.line,
            fixable=issue.fixable,
        )
    fixable = sum(issue.fixable for issue in issues)
    ctx.log(
        f"review found {len(issues)} issues, {fixable} fixable",
        issues_open=len(issues),
        issues_fixable=fixable,
    )
    return _counts(issues)


def autofix(state: State, ctx: RunContext) -> dict[str, Any]:
    """Rewrite the source to fix what is safely fixable, prove it parses, and re-review it.

    Raises:
        ReviewError: the rewritten source does not parse (a bug in a fixer).
    """
    fixed, applied = apply_fixes(state.source, _review(state, state.source))
    try:
        remaining = [finding.issue for finding in _review(state, fixed)]
    except SyntaxError as exc:
        raise ReviewError(
            f"autofix produced invalid Python at line {exc.lineno}: {exc.msg}; "
            "the source was left unchanged"
        ) from None
    done = [f"{f.issue.code} line {f.issue.line}: {f.fix}" for f in applied]
    for line in done:
        ctx.log(f"fixed {line}")
    ctx.log(
        f"round {state.rounds + 1}: applied {len(done)} fixes; the result parses; "
        f"{len(remaining)} issues remain",
        fixes=len(done),
        issues_open=len(remaining),
    )
    return {
        "source": fixed,
        "fixes_applied": [*state.fixes_applied, *done],
        "rounds": state.rounds + 1,
        **_counts(remaining),
    }


def approve(state: State, ctx: RunContext) -> dict[str, Any]:
    """Approve the (possibly fixed) source.

    Raises:
        ReviewError: issues are still open; approving them would be a lie.
    """
    if state.issues_open:
        raise ReviewError(f"refusing to approve with {state.issues_open} open issues")
    ctx.log(
        f"approved {state.filename} after {state.rounds} autofix rounds",
        fixes=len(state.fixes_applied),
    )
    return {"approved": True, "verdict": "approved"}


def reject(state: State, ctx: RunContext) -> dict[str, Any]:
    """Reject a source that cannot be reviewed (it does not parse)."""
    ctx.log(f"rejected {state.filename}: it does not parse", level="warning")
    return {"approved": False, "verdict": "rejected"}


def escalate(state: State, ctx: RunContext) -> dict[str, Any]:
    """Log the remaining, unfixable issues for the reviewer the run is about to wait for."""
    codes = sorted({issue.code for issue in state.issues})
    ctx.log(
        f"{state.issues_open} issues need a human: {', '.join(codes)}", level="warning", codes=codes
    )
    return {"approved": False, "verdict": "needs_human"}


def decide(state: State, ctx: RunContext) -> dict[str, Any]:
    """Turn a reviewer's answer (``approved``, ``comment``, in the state) into the verdict."""
    verdict = "approved" if state.approved else "rejected"
    comment = f": {state.comment}" if state.comment else ""
    level = "info" if state.approved else "warning"
    ctx.log(
        f"a reviewer {verdict} {state.filename}{comment}",
        level=level,
        issues_open=state.issues_open,
    )
    return {"verdict": verdict, "decided_by": "human"}


def graph_document() -> dict[str, Any]:
    """The parsed ``samples/python_review.json``."""
    document: dict[str, Any] = json.loads(GRAPH_PATH.read_text(encoding="utf-8"))
    return document


def register(registry: Registry) -> None:
    """Register the state model and tools into ``registry``; calling it twice is harmless."""
    registry.add_model("python_review.State", State)
    registry.add_tool("python_review.parse", parse)
    registry.add_tool("python_review.review", review)
    registry.add_tool("python_review.autofix", autofix)
    registry.add_tool("python_review.approve", approve, inline=True)
    registry.add_tool("python_review.reject", reject, inline=True)
    registry.add_tool("python_review.escalate", escalate, inline=True)
    registry.add_tool("python_review.decide", decide, inline=True)
