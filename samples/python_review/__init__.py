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
:mod:`samples.python_review.checks`; this module holds the state models, the
tools that wrap them and :func:`register`.

Several files at once: ``samples/python_review_many.json``, state model
:class:`ManyState` (``"python_review.ManyState"``, a :class:`State` with the
files and the results around it)::

    survey (parallel: count_issues | count_lines)
      -> review_each (map over files: open -> parse -> review -> autofix loop
                      -> approve | reject | needs_human -> report)
      -> summarise --some file needs a human--> human_review (waits, once)

``survey`` runs two independent passes over ``files``: ``count_issues``
(the review checks, before any autofix) and ``count_lines``. Both write
their own section of ``survey`` and a line of ``notes``; the join folds
them with the ``merge`` and ``extend`` reducers. ``review_each`` runs the
single-file nodes above on each file (``open_file`` copies the map's item,
``file``, into ``source`` and ``filename``); ``file_report`` makes the file's
:class:`FileReport`, which the map collects into ``reports`` in file order.
The single-file fields are each branch's working fields: the map merges
them with the ``keep`` reducer, which keeps their value at the fan-out, so
files never clash over them. ``summarise`` sets the run's ``verdict``:
``rejected`` if a file does not parse, else ``needs_human`` if a file has
issues no autofix handles (or its review failed), else ``approved``. Waits
are not allowed inside branches, so a file that needs a human ends its
branch with that verdict and the run waits once, after the map, at
``human_review``; ``decide_files`` applies the answer to those files.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field, field_validator

from trioflow import Registry, RunContext

from .checks import Edit as Edit
from .checks import Finding as Finding
from .checks import Issue as Issue
from .checks import analyse as analyse
from .checks import apply_fixes as apply_fixes

GRAPH_PATH = Path(__file__).resolve().parent.parent / "python_review.json"
"""The graph document that runs these tools."""

MANY_GRAPH_PATH = GRAPH_PATH.with_name("python_review_many.json")
"""The graph document that reviews several files (:class:`ManyState`)."""

MAX_SOURCE_CHARS = 200_000
MAX_FILES = 50
"""At most this many files in one :class:`ManyState` (the graph's ``max_items`` agrees)."""


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


class SourceFile(BaseModel):
    """One file to review: its name and its text."""

    model_config = ConfigDict(extra="forbid")

    filename: Annotated[str, Field(min_length=1, max_length=500)]
    source: Annotated[str, Field(max_length=MAX_SOURCE_CHARS)]


class FileReport(BaseModel):
    """One file's review, as its map branch ends it (``file_report``) and the map collects it."""

    model_config = ConfigDict(extra="forbid")

    filename: str
    verdict: Literal["approved", "needs_human", "rejected"]
    #: The issues still open (``E999`` for a file that does not parse).
    issues: list[Issue] = Field(default_factory=list)
    fixes_applied: list[str] = Field(default_factory=list)
    rounds: int = 0
    #: The source after autofix; ``None`` when autofix changed nothing.
    fixed_source: str | None = None


class ManyState(State):
    """The state of a review of several files (``samples/python_review_many.json``).

    Only ``files`` is required (``max_statements`` and ``allow_print`` apply
    to every file). The other fields inherited from :class:`State` are the
    map branches' working fields, one file at a time; at the top level they
    keep their defaults, except ``verdict``, ``approved``, ``decided_by`` and
    ``comment``, which hold the decision on all the files.
    """

    source: Annotated[str, Field(max_length=MAX_SOURCE_CHARS)] = ""
    files: Annotated[list[SourceFile], Field(min_length=1, max_length=MAX_FILES)]
    #: The map's item: the file a branch reviews (``None`` outside the map).
    file: SourceFile | None = None
    #: The parallel passes' results by pass, then by file name:
    #: ``{"issues": {name: count}, "lines": {name: count}}``.
    survey: dict[str, dict[str, int]] = Field(default_factory=dict)
    #: One line per parallel pass, in declaration order.
    notes: list[str] = Field(default_factory=list)
    #: A branch's result, collected by the map (``None`` outside the map).
    report: FileReport | None = None
    #: Each file's report in file order; ``None`` for a file whose review failed.
    reports: list[FileReport | None] = Field(default_factory=list)
    #: The files a reviewer decides on at ``human_review``.
    needs_human: list[str] = Field(default_factory=list)
    summary: str = ""

    @field_validator("files")
    @classmethod
    def _names_are_unique(cls, files: list[SourceFile]) -> list[SourceFile]:
        names = [f.filename for f in files]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"file names repeat: {', '.join(repeated)}")
        return files


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


# -- tools of the review of several files ------------------------------------------


def count_issues(state: ManyState, ctx: RunContext) -> dict[str, Any]:
    """A parallel pass: count each file's issues with the review checks, before any autofix."""
    counts: dict[str, int] = {}
    fixable = 0
    broken: list[str] = []
    for file in state.files:
        try:
            findings = analyse(
                file.source,
                filename=file.filename,
                max_statements=state.max_statements,
                allow_print=state.allow_print,
            )
        except (SyntaxError, ValueError):  # ValueError: e.g. a NUL byte
            counts[file.filename] = 1  # the E999 that parse will report
            broken.append(file.filename)
            continue
        counts[file.filename] = len(findings)
        fixable += sum(finding.issue.fixable for finding in findings)
    note = (
        f"issues: {sum(counts.values())} in {len(counts)} files before autofix, {fixable} fixable"
    )
    if broken:
        note += f"; does not parse: {', '.join(broken)}"
    ctx.log(note, issues=sum(counts.values()), fixable=fixable)
    return {"survey": {**state.survey, "issues": counts}, "notes": [*state.notes, note]}


def count_lines(state: ManyState, ctx: RunContext) -> dict[str, Any]:
    """A parallel pass: count each file's lines."""
    counts = {file.filename: len(file.source.splitlines()) for file in state.files}
    longest = max(counts, key=lambda name: counts[name])
    note = (
        f"lines: {sum(counts.values())} in {len(counts)} files, "
        f"the longest {longest} ({counts[longest]})"
    )
    ctx.log(note, lines=sum(counts.values()))
    return {"survey": {**state.survey, "lines": counts}, "notes": [*state.notes, note]}


def open_file(state: ManyState, ctx: RunContext) -> dict[str, Any]:
    """Put the map's item, ``file``, under review: its ``source`` and ``filename``.

    Raises:
        ReviewError: there is no ``file`` (the node runs outside the map).
    """
    if state.file is None:
        raise ReviewError("open_file reviews the map's item 'file', and there is none")
    ctx.log(f"reviewing {state.file.filename} ({len(state.file.source)} characters)")
    return {"source": state.file.source, "filename": state.file.filename}


def file_report(state: ManyState, ctx: RunContext) -> dict[str, Any]:
    """The file's verdict and findings as ``report``, which the map collects.

    Raises:
        ReviewError: no verdict yet, or no ``file`` (the node runs outside the map).
    """
    if state.file is None or state.verdict == "pending":
        raise ReviewError("file_report ends a file's review: it needs 'file' and a verdict")
    changed = state.source != state.file.source
    report = FileReport(
        filename=state.filename,
        verdict=state.verdict,
        issues=state.issues,
        fixes_applied=state.fixes_applied,
        rounds=state.rounds,
        fixed_source=state.source if changed else None,
    )
    ctx.log(f"{state.filename}: {state.verdict}", verdict=state.verdict)
    return {"report": report.model_dump()}


def summarise(state: ManyState, ctx: RunContext) -> dict[str, Any]:
    """Decide on all the files from their reports.

    ``rejected`` if a file does not parse; otherwise ``needs_human`` if a file
    has issues no autofix handles, or its review failed (no report);
    otherwise ``approved``.
    """
    approved: list[str] = []
    fixed: list[str] = []
    needs: list[str] = []
    rejected: list[str] = []
    for file, report in zip(state.files, state.reports, strict=True):
        if report is None:
            ctx.log(f"{file.filename}: its review failed (see the log)", level="warning")
            needs.append(file.filename)
        elif report.verdict == "approved":
            approved.append(file.filename)
            if report.fixes_applied:
                fixed.append(file.filename)
        elif report.verdict == "needs_human":
            needs.append(file.filename)
        else:
            rejected.append(file.filename)
    verdict = "rejected" if rejected else "needs_human" if needs else "approved"
    summary = (
        f"{len(state.files)} files: {len(approved)} approved ({len(fixed)} after autofix), "
        f"{len(needs)} need a human, {len(rejected)} rejected"
    )
    ctx.log(
        f"{summary}: {verdict}",
        level="info" if verdict == "approved" else "warning",
        verdict=verdict,
    )
    return {
        "verdict": verdict,
        "approved": verdict == "approved",
        "needs_human": needs,
        "summary": summary,
    }


def decide_files(state: ManyState, ctx: RunContext) -> dict[str, Any]:
    """Turn a reviewer's answer into the verdict on the files that needed a human."""
    verdict = "approved" if state.approved else "rejected"
    comment = f": {state.comment}" if state.comment else ""
    ctx.log(
        f"a reviewer {verdict} {', '.join(state.needs_human)}{comment}",
        level="info" if state.approved else "warning",
    )
    return {"verdict": verdict, "decided_by": "human"}


def graph_document() -> dict[str, Any]:
    """The parsed ``samples/python_review.json``."""
    document: dict[str, Any] = json.loads(GRAPH_PATH.read_text(encoding="utf-8"))
    return document


def many_graph_document() -> dict[str, Any]:
    """The parsed ``samples/python_review_many.json``."""
    document: dict[str, Any] = json.loads(MANY_GRAPH_PATH.read_text(encoding="utf-8"))
    return document


def register(registry: Registry) -> None:
    """Register the state models and tools into ``registry``; calling it twice is harmless."""
    registry.add_model("python_review.State", State)
    registry.add_tool("python_review.parse", parse)
    registry.add_tool("python_review.review", review)
    registry.add_tool("python_review.autofix", autofix)
    registry.add_tool("python_review.approve", approve, inline=True)
    registry.add_tool("python_review.reject", reject, inline=True)
    registry.add_tool("python_review.escalate", escalate, inline=True)
    registry.add_tool("python_review.decide", decide, inline=True)
    registry.add_model("python_review.ManyState", ManyState)
    registry.add_tool("python_review.count_issues", count_issues)
    registry.add_tool("python_review.count_lines", count_lines)
    registry.add_tool("python_review.open_file", open_file, inline=True)
    registry.add_tool("python_review.file_report", file_report, inline=True)
    registry.add_tool("python_review.summarise", summarise, inline=True)
    registry.add_tool("python_review.decide_files", decide_files, inline=True)
