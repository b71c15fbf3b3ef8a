"""Sandboxed condition expressions with a hard evaluation budget.

An expression is parsed once, checked against a whitelist of AST node types,
names and method names, then rewritten so that every operation whose cost or
result size depends on its operands calls a guard (:mod:`core.guards`).
The guards give each evaluation a fixed budget of work and memory
(:mod:`core.budget`) that no expression and no state can exceed.

Two evaluators run the same checked, rewritten tree:

* ``asteval``: a hardened asteval interpreter (minimal symbol table, no
  numpy, read-only builtins), the reference evaluator;
* ``compiled``: the tree compiled with :func:`compile` and evaluated with an
  empty ``__builtins__`` and only the guards and whitelisted builtins in
  scope. It is about two orders of magnitude faster and is the default.
  It is safe only because of the whitelist, which is why the test corpus of
  escapes and bombs runs through both evaluators.

An expression whose rewritten tree contains no guard (``context.get('n', 0)
== 0``) is evaluated without touching the meter at all.
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from asteval import Interpreter

from .budget import LOCAL, MAX_BYTES, MAX_UNITS, spent
from .errors import ExpressionBudgetError, ExpressionError, ExpressionEvaluationError
from .guards import BINOP_GUARDS, BUILTINS, CMP_OPS, GUARD_FUNCS, METERED_NAMES, short_repr

Evaluator = Literal["compiled", "asteval"]

MAX_EXPRESSION_LENGTH = 1000
MAX_AST_NODES = 200

# One line per kind of syntax: a table that reads better aligned than formatted.
# fmt: off
_ALLOWED_NODES: frozenset[type[ast.AST]] = frozenset(
    {
        ast.Expression,
        ast.BoolOp, ast.And, ast.Or,
        ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
        ast.LShift, ast.RShift, ast.BitAnd, ast.BitOr, ast.BitXor,
        ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.Invert,
        ast.Compare, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
        ast.In, ast.NotIn, ast.Is, ast.IsNot,
        ast.IfExp, ast.Call, ast.keyword,
        ast.Constant, ast.Name, ast.Load,
        ast.Subscript, ast.Slice,
        ast.List, ast.Tuple, ast.Dict, ast.Set,
        ast.Attribute,
    }
)
# fmt: on

_ROOT_NAMES = frozenset({"context", "state"})

#: Methods an expression may call: read-only methods of dict and str.
_ALLOWED_METHODS = frozenset(
    {"get", "keys", "values", "items", "lower", "upper", "strip", "startswith", "endswith"}
)
#: The string methods whose cost depends on the string: rewritten into guards.
_STR_METHODS = frozenset({"lower", "upper", "strip", "startswith", "endswith"})


# --- static check -----------------------------------------------------------


def _reject(reason: str, message: str, source: str) -> ExpressionError:
    return ExpressionError(message, reason=reason, expression=source)


def check_expression(source: str) -> ast.Expression:
    """Parse ``source`` and check it against the whitelist.

    Returns:
        The parsed tree, unmodified.

    Raises:
        ExpressionError: ``reason`` is ``too_long``, ``syntax`` or ``forbidden``.
    """
    if not isinstance(source, str):
        raise _reject("syntax", "expression must be a string", str(source))
    if len(source) > MAX_EXPRESSION_LENGTH:
        raise _reject(
            "too_long",
            f"expression is {len(source)} characters; the limit is {MAX_EXPRESSION_LENGTH}",
            source[:100],
        )
    if not source.strip():
        raise _reject("syntax", "expression is empty", source)
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise _reject("syntax", f"syntax error: {exc.msg}", source) from None
    except (ValueError, MemoryError, RecursionError) as exc:
        raise _reject("syntax", f"cannot parse expression: {exc}", source) from None

    for count, node in enumerate(ast.walk(tree), start=1):
        if count > MAX_AST_NODES:
            raise _reject("too_long", f"expression has more than {MAX_AST_NODES} nodes", source)
        kind = type(node)
        if kind not in _ALLOWED_NODES:
            raise _reject("forbidden", f"{kind.__name__} is not allowed in expressions", source)
        if isinstance(node, ast.Name):
            if node.id not in _ROOT_NAMES and node.id not in BUILTINS:
                raise _reject(
                    "forbidden",
                    f"name {node.id!r} is not available (use context, state or a "
                    f"whitelisted builtin: {', '.join(sorted(BUILTINS))})",
                    source,
                )
        elif isinstance(node, ast.Attribute):
            if node.attr not in _ALLOWED_METHODS:
                raise _reject("forbidden", f"attribute {node.attr!r} is not allowed", source)
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                if func.id not in BUILTINS:
                    raise _reject("forbidden", f"{func.id!r} cannot be called", source)
            elif not isinstance(func, ast.Attribute):
                raise _reject("forbidden", "only builtins and methods can be called", source)
            if any(kw.arg is None for kw in node.keywords):
                raise _reject("forbidden", "**kwargs is not allowed", source)
        elif isinstance(node, ast.Dict) and any(key is None for key in node.keys):
            raise _reject("forbidden", "** in a dict display is not allowed", source)
        elif isinstance(node, ast.Constant) and not isinstance(
            node.value, int | float | str | bool | type(None)
        ):
            kind_name = type(node.value).__name__
            raise _reject("forbidden", f"{kind_name} literals are not allowed", source)
    # Attributes may only appear as the callee of a call (``context.get(...)``),
    # never as a value, so no bound method or attribute value can escape.
    # Builtins may only be called or passed as ``key=``: so a key function is
    # always one of the (guarded) builtins. Slices only appear in subscripts.
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            allowed.add(id(node.func))
            allowed.update(id(kw.value) for kw in node.keywords if kw.arg == "key")
        elif isinstance(node, ast.Subscript):
            allowed.add(id(node.slice))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in allowed:
            raise _reject("forbidden", "attribute access is only allowed for method calls", source)
        if isinstance(node, ast.Name) and node.id in BUILTINS and id(node) not in allowed:
            raise _reject(
                "forbidden",
                f"builtin {node.id!r} can only be called or passed as key=",
                source,
            )
        if isinstance(node, ast.Slice) and id(node) not in allowed:
            raise _reject("forbidden", "slices are only allowed as a subscript", source)
    return tree


def _constant_like(node: ast.AST) -> bool:
    """A literal whose size is bounded by the expression's own size."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp):
        return _constant_like(node.operand)
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        return all(map(_constant_like, node.elts))
    return False


def _needs_guard(left: ast.expr, op: ast.cmpop, right: ast.expr) -> bool:
    """Whether a comparison's cost can depend on the state or on built values."""
    if isinstance(op, ast.Is | ast.IsNot):
        return False
    if isinstance(op, ast.In | ast.NotIn):
        # x in 'abc' costs at most the constant's size; 'a' in x scans x,
        # unless x is the state itself: a dict, so one hash of the constant.
        if isinstance(right, ast.Name) and right.id in _ROOT_NAMES:
            return not _constant_like(left)
        return not _constant_like(right)
    return not (_constant_like(left) or _constant_like(right))


def _call(
    name: str, args: list[ast.expr], node: ast.AST, keywords: list[ast.keyword] | None = None
) -> ast.Call:
    call = ast.Call(func=ast.Name(id=name, ctx=ast.Load()), args=args, keywords=keywords or [])
    return ast.copy_location(call, node)


def _const(value: Any) -> ast.Constant:
    return ast.Constant(value=value)


class _Guarder(ast.NodeTransformer):
    """Rewrites every operation whose cost depends on its operands into a guard call."""

    def __init__(self) -> None:
        self.slots = 0

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        name = BINOP_GUARDS[type(node.op)][0]
        return _call(name, [node.left, node.right], node)

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        operands = [node.left, *node.comparators]
        guarded = [_needs_guard(operands[i], op, operands[i + 1]) for i, op in enumerate(node.ops)]
        if not any(guarded):
            return node
        if len(node.ops) == 1:
            op = CMP_OPS[type(node.ops[0])]
            return _call(f"_tf_cmp{op}", [node.left, node.comparators[0]], node)
        # A chain: wrap the operands, keeping evaluation order and short-circuit.
        slot = self.slots
        self.slots += 1
        wrapped: list[ast.expr] = []
        for i, operand in enumerate(operands):
            before = i > 0 and guarded[i - 1]
            after = i < len(node.ops) and guarded[i]
            if not (before or after):
                wrapped.append(operand)
                continue
            op = CMP_OPS[type(node.ops[i - 1])] if before else -1
            wrapped.append(_call("_tf_link", [operand, _const(slot), _const(op)], operand))
        return ast.copy_location(
            ast.Compare(left=wrapped[0], ops=node.ops, comparators=wrapped[1:]), node
        )

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        self.generic_visit(node)
        part = node.slice
        if not isinstance(part, ast.Slice):
            return node
        bounds = [p if p is not None else _const(None) for p in (part.lower, part.upper, part.step)]
        return _call("_tf_slice", [node.value, *bounds], node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in _STR_METHODS:
            method = _call("_tf_method", [func.value, _const(func.attr)], func)
            return ast.copy_location(
                ast.Call(func=method, args=node.args, keywords=node.keywords), node
            )
        return node

    def visit_Set(self, node: ast.Set) -> ast.AST:
        self.generic_visit(node)
        return _call("_tf_set", list(node.elts), node)

    def visit_Dict(self, node: ast.Dict) -> ast.AST:
        self.generic_visit(node)
        args: list[ast.expr] = []
        for key, value in zip(node.keys, node.values, strict=True):
            if key is None:  # pragma: no cover - rejected by check_expression
                raise TypeError("internal error: ** in a dict display")
            args += [key, value]
        return _call("_tf_dict", args, node)


def _is_metered(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id in METERED_NAMES for n in ast.walk(tree))


# --- compiled expressions ----------------------------------------------------

_EVAL_ERRORS = (
    ArithmeticError,
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    RecursionError,
    MemoryError,
    RuntimeError,
    NameError,
)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        return short_repr(exc.args[0])
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."


class Expression:
    """A checked, precompiled expression. Immutable once built.

    Use :func:`compile_expression` to build one.
    """

    __slots__ = ("_asteval", "_code", "_evaluator", "_globals", "_metered", "_tree", "source")

    def __init__(self, source: str, tree: ast.Expression, evaluator: Evaluator) -> None:
        self.source = source
        self._evaluator = evaluator
        self._tree = tree
        self._metered = _is_metered(tree)
        with warnings.catch_warnings():
            # "x is 1" compiles with a SyntaxWarning (identity of a literal):
            # the whitelist admits it, and the warning is no use to anyone here.
            warnings.simplefilter("ignore", SyntaxWarning)
            self._code = compile(tree, "<expression>", "eval")
        self._globals: dict[str, Any] = {"__builtins__": {}, **BUILTINS, **GUARD_FUNCS}
        self._asteval: _SafeInterpreter | None = None

    @property
    def metered(self) -> bool:
        """Whether evaluating this expression charges the budget (it contains a guard)."""
        return self._metered

    def evaluate(self, state: Mapping[str, Any]) -> Any:
        """Evaluate against a JSON-like state; visible as ``context`` and ``state``.

        Raises:
            ExpressionBudgetError: the evaluation would pass its budget.
            ExpressionEvaluationError: the expression raised while evaluating.
        """
        if self._metered:
            return self._evaluate_metered(state)
        # The fast path: no guard in the tree, nothing to meter.
        if self._evaluator == "asteval":
            return self._evaluate_asteval(state)
        try:
            return eval(self._code, self._globals, {"context": state, "state": state})
        except _EVAL_ERRORS as exc:
            raise self._failure(type(exc).__name__, _describe(exc)) from None

    def _evaluate_metered(self, state: Mapping[str, Any]) -> Any:
        meter = LOCAL.meter
        meter.units = 0
        meter.bytes = 0
        meter.over = None
        try:
            if self._evaluator == "asteval":
                return self._evaluate_asteval(state)
            try:
                # The tree passed the whitelist.
                return eval(self._code, self._globals, {"context": state, "state": state})
            except ExpressionBudgetError:
                raise self._budget_error() from None
            except _EVAL_ERRORS as exc:
                raise self._failure(type(exc).__name__, _describe(exc)) from None
        finally:
            meter.slots.clear()

    def _failure(self, kind: str, message: str) -> ExpressionEvaluationError:
        if self._metered and LOCAL.meter.over is not None:
            return self._budget_error()
        return ExpressionEvaluationError(
            f"expression {self.source!r} failed: {kind}: {message}",
            details={"expression": self.source, "type": kind},
        )

    def _budget_error(self) -> ExpressionBudgetError:
        meter = LOCAL.meter
        return ExpressionBudgetError(
            f"expression {self.source!r} exceeded its evaluation budget: {meter.over}",
            details={
                "expression": self.source,
                "type": "ExpressionBudgetError",
                "units": meter.units,
                "max_units": MAX_UNITS,
                "bytes": meter.bytes,
                "max_bytes": MAX_BYTES,
            },
        )

    def _evaluate_asteval(self, state: Mapping[str, Any]) -> Any:
        interp = self._asteval
        if interp is None:
            interp = _make_interpreter()
            self._asteval = interp
        interp.symtable["context"] = state
        interp.symtable["state"] = state
        # Reset what a previous failed evaluation leaves behind.
        interp.error = []
        interp.error_msg = None
        interp.retval = None
        interp._interrupt = None
        interp.code_text = []
        try:
            result = interp.run(self._tree.body, expr=self.source, with_raise=True)
            if interp.error:
                err = interp.error[0]
                kind = err.exc if isinstance(err.exc, type) else RuntimeError
                raise self._failure(kind.__name__, str(err.msg)[:300])
            if self._metered and LOCAL.meter.over is not None:
                raise self._budget_error()
            return result
        except ExpressionBudgetError:
            # asteval re-raises what a call raised as a new exception of the
            # same type; the meter knows what happened.
            raise self._budget_error() from None
        except _EVAL_ERRORS as exc:
            # ... and without its message: the first error it recorded has it.
            message = str(interp.error[0].msg)[:300] if interp.error else _describe(exc)
            raise self._failure(type(exc).__name__, message) from None
        finally:
            interp.symtable["context"] = None
            interp.symtable["state"] = None
            # The recorded errors hold tracebacks, and so the values in them.
            interp.error = []

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


class _SafeInterpreter(Interpreter):  # type: ignore[misc]
    """asteval, minus the error paths that repr whole values.

    asteval's own call handler puts ``repr(args)`` in its error message, and
    its exception holder takes ``str()`` of a KeyError (the key's repr):
    either can be a repr of the whole state, outside any budget.
    """

    def on_call(self, node: ast.Call) -> Any:
        func = self.run(node.func)
        args = [self.run(arg) for arg in node.args]
        keywords: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None:  # pragma: no cover - rejected by check_expression
                raise TypeError("**kwargs is not allowed")
            keywords[kw.arg] = self.run(kw.value)
        return func(*args, **keywords)

    def on_subscript(self, node: ast.Subscript) -> Any:
        value = self.run(node.value)
        index = self.run(node.slice)
        try:
            return value[index]
        except KeyError:
            raise KeyError(short_repr(index)) from None


def _make_interpreter() -> _SafeInterpreter:
    interp = _SafeInterpreter(
        minimal=True,
        use_numpy=False,
        builtins_readonly=True,
        max_statement_length=MAX_EXPRESSION_LENGTH,
        # minimal=True turns off conditional expressions, which the whitelist
        # admits; without this the two evaluators disagree on "a if c else b".
        with_ifexp=True,
    )
    # Start from an empty symbol table: only what the whitelist admits.
    for name in list(interp.symtable):
        del interp.symtable[name]
    interp.symtable.update(BUILTINS)
    interp.symtable.update(GUARD_FUNCS)
    interp.symtable.update({"True": True, "False": False, "None": None})
    return interp


def compile_expression(source: str, *, evaluator: Evaluator = "compiled") -> Expression:
    """Check, rewrite and compile an expression.

    Args:
        source: the expression text, for example ``context.get('n', 0) > 1``.
        evaluator: ``"compiled"`` (default, fast) or ``"asteval"`` (reference).

    Raises:
        ExpressionError: the expression is too long, does not parse or uses
            something outside the whitelist.
    """
    tree = check_expression(source)
    guarded = ast.fix_missing_locations(_Guarder().visit(tree))
    if not isinstance(guarded, ast.Expression):  # NodeTransformer keeps the root type
        raise TypeError("internal error: rewritten expression lost its root")
    return Expression(source, guarded, evaluator)


def truthy(value: Any) -> bool:
    """Truthiness as the engine uses it for conditions (NaN counts as false)."""
    if isinstance(value, float) and math.isnan(value):
        return False
    return bool(value)


__all__ = [
    "MAX_BYTES",
    "MAX_UNITS",
    "Expression",
    "check_expression",
    "compile_expression",
    "spent",
    "truthy",
]
