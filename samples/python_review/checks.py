"""The pure :mod:`ast` analysis behind the Python review sample, and its fixers.

:func:`analyse` parses a source (raising :class:`SyntaxError` if it does not
parse) and returns one :class:`Finding` per problem, sorted by line, each with
an :class:`Issue` using ruff's codes:

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
that code).

Fixes are text edits, not a re-printed tree: a fixable finding carries the
:class:`Edit` values that fix it (``str`` offsets, mapped from ast's line and
UTF-8 byte columns by :class:`_Source`), so comments and formatting elsewhere
survive.
A fixer emits edits only when the rewrite is clearly safe (a statement that
shares its line with another, a one-line function or an unusual annotation is
reported as not fixable). :func:`apply_fixes` applies each finding whole or not
at all, skipping one whose edits overlap edits already accepted; the caller
re-analyses the result, which proves it parses, and fixes the rest next round.

Nothing here knows about the engine: the tools in :mod:`samples.python_review`
wrap these functions.
"""

from __future__ import annotations

import ast
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

__all__ = ["Edit", "Finding", "Issue", "analyse", "apply_fixes"]


class Issue(BaseModel):
    """One finding: a ruff-style ``code``, the 1-based ``line`` and whether autofix can fix it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str
    line: int
    message: str
    fixable: bool = False


# -- source positions and edits ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Edit:
    """Replace ``text[start:end]`` (``str`` offsets) with ``new``; ``start == end`` inserts."""

    start: int
    end: int
    new: str

    def overlaps(self, other: Edit) -> bool:
        if max(self.start, other.start) < min(self.end, other.end):
            return True
        # An insertion strictly inside a replaced range conflicts with it.
        return any(
            a.start == a.end and b.start < a.start < b.end
            for a, b in ((self, other), (other, self))
        )


class _Source:
    """Source text that maps ast positions (line, UTF-8 byte column) to ``str`` offsets."""

    def __init__(self, text: str) -> None:
        self.text = text
        # newline="" splits on \n, \r\n and \r like the tokenizer, and keeps them.
        self.lines = io.StringIO(text, newline="").readlines()
        self.starts: list[int] = []
        pos = 0
        for line in self.lines:
            self.starts.append(pos)
            pos += len(line)

    def line_start(self, lineno: int) -> int:
        return self.starts[lineno - 1] if lineno <= len(self.lines) else len(self.text)

    def line_end(self, lineno: int) -> int:
        """The offset just after the line's newline."""
        return self.line_start(lineno) + len(self.lines[lineno - 1])

    def offset(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1] if lineno <= len(self.lines) else ""
        return self.line_start(lineno) + len(line.encode()[:col].decode())

    def start(self, node: ast.expr | ast.stmt | ast.excepthandler) -> int:
        return self.offset(node.lineno, node.col_offset)

    def end(self, node: ast.expr | ast.stmt) -> int:
        return self.offset(node.end_lineno or node.lineno, node.end_col_offset or 0)

    def indent(self, node: ast.stmt) -> str | None:
        """The text before ``node`` on its first line, if it is only whitespace."""
        before = self.text[self.line_start(node.lineno) : self.start(node)]
        return before if before.strip() == "" else None

    def own_lines(self, node: ast.stmt) -> bool:
        """``node`` shares no line with other code (a trailing comment is fine)."""
        after = self.text[self.end(node) : self.line_end(node.end_lineno or node.lineno)].strip()
        return self.indent(node) is not None and (after == "" or after.startswith("#"))


@dataclass(frozen=True, slots=True)
class Finding:
    """An issue and the edits that fix it (none: not fixable)."""

    issue: Issue
    edits: tuple[Edit, ...] = ()
    fix: str = ""


def _finding(
    code: str, line: int, message: str, edits: Sequence[Edit] = (), fix: str = ""
) -> Finding:
    issue = Issue(code=code, line=line, message=message, fixable=bool(edits))
    return Finding(issue, tuple(edits), fix if edits else "")


# -- checks ----------------------------------------------------------------------


def _bodies(tree: ast.AST) -> Iterator[tuple[ast.AST, list[ast.stmt]]]:
    """Every statement list in the tree with the node that owns it."""
    for node in ast.walk(tree):
        for _field, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                yield node, value


def _used_names(tree: ast.AST) -> set[str]:
    """Names read anywhere, in string annotations, or listed in ``__all__`` (scopes ignored)."""
    used: set[str] = set()
    annotations: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Store):
            used.add(node.id)
        elif isinstance(node, ast.arg) and node.annotation is not None:
            annotations.append(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns:
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        elif isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            if "__all__" in names and isinstance(node.value, ast.List | ast.Tuple):
                for elt in node.value.elts:
                    if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                        used.add(elt.value)
    for annotation in annotations:
        for sub in ast.walk(annotation):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                try:
                    parsed = ast.parse(sub.value, mode="eval")
                except SyntaxError:
                    continue
                used.update(n.id for n in ast.walk(parsed) if isinstance(n, ast.Name))
    return used


def _bound_name(alias: ast.alias) -> str | None:
    if alias.name == "*" or alias.asname == alias.name:  # ``import x as x``: a deliberate re-export
        return None
    return alias.asname or alias.name.split(".")[0]


def _unused_imports(tree: ast.Module, src: _Source, filename: str) -> list[Finding]:
    if Path(filename).name == "__init__.py":  # a package's imports are its public surface
        return []
    used = _used_names(tree)
    findings = []
    for parent, body in _bodies(tree):
        plans: list[tuple[ast.Import | ast.ImportFrom, list[ast.alias]]] = []
        for stmt in body:
            if isinstance(stmt, ast.Import | ast.ImportFrom) and not (
                isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"
            ):
                unused = [a for a in stmt.names if (name := _bound_name(a)) and name not in used]
                if unused:
                    plans.append((stmt, unused))
        removed = [s for s, unused in plans if len(unused) == len(s.names) and src.own_lines(s)]
        # Removing every statement of a block would leave it empty: keep one ``pass``.
        needs_pass = not isinstance(parent, ast.Module) and len(removed) == len(body)
        for stmt, unused in plans:
            edits: list[Edit] = []
            if src.own_lines(stmt):
                kept = [a for a in stmt.names if a not in unused]
                if kept:
                    smaller: ast.stmt = (
                        ast.Import(names=kept)
                        if isinstance(stmt, ast.Import)
                        else ast.ImportFrom(module=stmt.module, names=kept, level=stmt.level)
                    )
                    edits.append(Edit(src.start(stmt), src.end(stmt), ast.unparse(smaller)))
                elif needs_pass and stmt is removed[0]:
                    edits.append(Edit(src.start(stmt), src.end(stmt), "pass"))
                else:
                    end_line = stmt.end_lineno or stmt.lineno
                    edits.append(Edit(src.line_start(stmt.lineno), src.line_end(end_line), ""))
            findings += [
                _finding(
                    "F401",
                    stmt.lineno,
                    f"{alias.name!r} imported but unused",
                    edits,
                    f"removed unused import {alias.name!r}",
                )
                for alias in unused
            ]
    return findings


def _bare_excepts(tree: ast.Module, src: _Source) -> list[Finding]:
    findings = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is None:
            at = src.start(node)
            edits = []
            if src.text.startswith("except", at) and src.text[at + 6 : at + 7] in {":", " ", "\t"}:
                edits.append(Edit(at, at + len("except"), "except Exception"))
            findings.append(
                _finding(
                    "E722",
                    node.lineno,
                    "bare 'except:' also catches KeyboardInterrupt, SystemExit and cancellation",
                    edits,
                    "'except:' -> 'except Exception:'",
                )
            )
    return findings


_MUTABLE_CALLS = frozenset({"list", "dict", "set", "bytearray"})
Function = ast.FunctionDef | ast.AsyncFunctionDef


def _is_mutable(node: ast.expr) -> bool:
    if isinstance(node, ast.List | ast.Dict | ast.Set | ast.ListComp | ast.DictComp | ast.SetComp):
        return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _MUTABLE_CALLS
    )


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _guard_point(func: Function, src: _Source) -> tuple[int, str] | None:
    """Where ``if arg is None:`` guards go (after the docstring) and their indentation."""
    body = func.body
    if _is_docstring(body[0]) and len(body) == 1:
        doc = body[0]
        indent = src.indent(doc)
        if indent is None or not src.own_lines(doc):
            return None
        return src.line_end(doc.end_lineno or doc.lineno), indent
    target = body[1] if _is_docstring(body[0]) else body[0]
    indent = src.indent(target)  # None for ``def f(x=[]): return x``
    if indent is None:
        return None
    # A decorated statement starts at its first decorator, not at its ``def`` line.
    decorators = getattr(target, "decorator_list", [])
    return src.line_start(min([target.lineno, *(d.lineno for d in decorators)])), indent


def _allows_none(annotation: ast.expr) -> bool:
    for node in ast.walk(annotation):
        if isinstance(node, ast.Constant) and node.value is None:
            return True
        if isinstance(node, ast.Name | ast.Attribute) and (
            (node.id if isinstance(node, ast.Name) else node.attr) in {"Optional", "Any"}
        ):
            return True
    return False


def _default_fix(
    arg: ast.arg, default: ast.expr, point: tuple[int, str] | None, src: _Source
) -> list[Edit]:
    """Edits for ``arg=[]`` -> ``arg=None`` plus a guard; none when that is not clearly safe."""
    if point is None:
        return []
    edits = [Edit(src.start(default), src.end(default), "None")]
    annotation = arg.annotation
    if annotation is not None and not _allows_none(annotation):
        simple = isinstance(annotation, ast.Name | ast.Attribute | ast.Subscript) or (
            isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr)
        )
        if not simple:  # e.g. a string annotation: rewriting it needs a human
            return []
        edits.append(Edit(src.end(annotation), src.end(annotation), " | None"))
    offset, indent = point
    prefix = "" if src.text[:offset].endswith(("\n", "\r")) or offset == 0 else "\n"
    unit = "\t" if "\t" in indent else "    "
    guard = (
        f"{prefix}{indent}if {arg.arg} is None:\n{indent}{unit}{arg.arg} = {ast.unparse(default)}\n"
    )
    edits.append(Edit(offset, offset, guard))
    return edits


def _function_checks(tree: ast.Module, src: _Source, max_statements: int) -> list[Finding]:
    findings = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        count = sum(isinstance(n, ast.stmt) for s in func.body for n in ast.walk(s))
        count -= _is_docstring(func.body[0])
        if count > max_statements:
            findings.append(
                _finding(
                    "PLR0915",
                    func.lineno,
                    f"function {func.name!r} has {count} statements "
                    f"(more than {max_statements}); split it",
                )
            )
        args = func.args
        positional = [*args.posonlyargs, *args.args]
        pairs = list(
            zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True)
        )
        pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d]
        point = _guard_point(func, src)
        for arg, default in pairs:
            if _is_mutable(default):
                findings.append(
                    _finding(
                        "B006",
                        default.lineno,
                        f"mutable default for {arg.arg!r} in {func.name!r} is shared between calls",
                        _default_fix(arg, default, point, src),
                        f"default of {arg.arg!r} in {func.name!r} -> None with an 'is None' guard",
                    )
                )
    return findings


def _prints(tree: ast.Module) -> list[Finding]:
    return [
        _finding("T201", node.lineno, "print() call; use logging or return the value")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    ]


def analyse(
    source: str,
    *,
    filename: str = "snippet.py",
    max_statements: int = 30,
    allow_print: bool = False,
) -> list[Finding]:
    """Review ``source``; findings are sorted by line.

    Raises:
        SyntaxError: ``source`` does not parse.
    """
    tree = ast.parse(source, filename)
    src = _Source(source)
    findings = [
        *_unused_imports(tree, src, filename),
        *_bare_excepts(tree, src),
        *_function_checks(tree, src, max_statements),
        *([] if allow_print else _prints(tree)),
    ]
    kept = [f for f in findings if not _suppressed(f.issue, src)]
    return sorted(kept, key=lambda f: (f.issue.line, f.issue.code))


def _suppressed(issue: Issue, src: _Source) -> bool:
    """``# noqa`` on the issue's line silences every code; ``# noqa: F401, T201`` only those."""
    line = src.lines[issue.line - 1] if issue.line <= len(src.lines) else ""
    _, marker, rest = line.partition("# noqa")
    if not marker:
        return False
    rest = rest.strip()
    if not rest.startswith(":"):
        return True
    return issue.code in {code.strip() for code in rest[1:].split(",")}


def apply_fixes(source: str, findings: Sequence[Finding]) -> tuple[str, list[Finding]]:
    """Apply the edits of every fixable finding whose edits do not conflict with earlier ones.

    A finding is applied whole or not at all; one left out is fixed by the
    next round, after the source was re-reviewed.

    Returns:
        The new source and the findings that were applied.
    """
    accepted: list[Edit] = []
    applied: list[Finding] = []
    for finding in findings:
        new = [e for e in finding.edits if e not in accepted]  # one import line fixes many F401s
        if not finding.edits or any(e.overlaps(a) for e in new for a in accepted):
            continue
        accepted.extend(new)
        applied.append(finding)
    parts, pos = [], 0
    for edit in sorted(accepted, key=lambda e: (e.start, e.end)):  # stable: guards keep arg order
        parts += [source[pos : edit.start], edit.new]
        pos = edit.end
    parts.append(source[pos:])
    return "".join(parts), applied
