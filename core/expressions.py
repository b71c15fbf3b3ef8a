"""Sandboxed condition expressions.

An expression is parsed once, checked against a whitelist of AST node types,
names and method names, then rewritten so that every operator that can make
a value grow (``**``, ``*``, ``+``, ``<<``, ``%``) goes through a guard that
bounds the size of its result. Because the language has no loops,
comprehensions, lambdas or assignment, evaluation time is bounded by the
expression's size and the (bounded) size of the state.

Two evaluators run the same checked, rewritten tree:

* ``asteval``: a hardened asteval interpreter (minimal symbol table, no
  numpy, read-only builtins), the reference evaluator;
* ``compiled``: the tree compiled with :func:`compile` and evaluated with an
  empty ``__builtins__`` and only the guards and whitelisted builtins in
  scope. It is about two orders of magnitude faster and is the default.
  It is safe only because of the whitelist, which is why the test corpus of
  escapes and bombs runs through both evaluators.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from itertools import chain, compress
from operator import not_
from typing import Any, Literal

from asteval import Interpreter

from .errors import ExpressionError, ExpressionEvaluationError

Evaluator = Literal["compiled", "asteval"]

MAX_EXPRESSION_LENGTH = 1000
MAX_AST_NODES = 200
#: Largest integer result (in bits) any guarded operator may produce.
MAX_INT_BITS = 4096
#: Largest string/list/tuple any guarded operator may produce.
MAX_SEQUENCE_LENGTH = 100_000
MAX_SHIFT = 1024
MAX_ROUND_DIGITS = 64

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
)  # fmt: skip

_ROOT_NAMES = frozenset({"context", "state"})

#: Methods an expression may call: read-only methods of dict, str and list.
_ALLOWED_METHODS = frozenset(
    {"get", "keys", "values", "items", "lower", "upper", "strip", "startswith", "endswith"}
)


def _safe_round(number: Any, ndigits: Any = None) -> Any:
    if ndigits is not None and (not isinstance(ndigits, int) or abs(ndigits) > MAX_ROUND_DIGITS):
        raise ValueError(f"round() ndigits must be an int within +-{MAX_ROUND_DIGITS}")
    return round(number, ndigits)


def _safe_sum(iterable: Any, start: Any = 0) -> Any:
    # sum(xs, []) concatenates without going through the '+' guard, in
    # quadratic time: only numbers may be summed.
    if isinstance(start, bool) or not isinstance(start, int | float):
        raise TypeError("sum() start must be a number")
    return sum(iterable, start)


_BUILTINS: dict[str, Any] = {
    "len": len, "min": min, "max": max, "abs": abs, "any": any, "all": all,
    "int": int, "float": float, "str": str, "bool": bool, "round": _safe_round,
    "sum": _safe_sum, "sorted": sorted,
}  # fmt: skip


# --- guards -----------------------------------------------------------------

def _int_bits(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return value.bit_length()


def _is_seq(value: Any) -> bool:
    return isinstance(value, str | bytes | list | tuple)


_NESTED = frozenset(
    {list, tuple, dict, set, frozenset, type({}.keys()), type({}.values()), type({}.items())}
)
_SIZED = _NESTED | {str, bytes}
_DICT = frozenset({dict})


def _weight(value: Any, budget: int = MAX_SEQUENCE_LENGTH) -> int:
    """Items in ``value``, nested containers and string characters included.

    Stops counting once over ``budget``. Counting only the outer length would
    let ``[[1]*99999]*99999`` through: small to build, but ``str()``, sorting
    or comparing it walks 10**10 items. The walk goes one nesting level at a
    time with C-level iteration (map/compress/chain), so it stays cheap even
    at the budget.
    """
    total = 0
    level: list[Any] = [value]
    while level:
        if _SIZED.isdisjoint(map(type, level)):  # only scalars left
            return total
        sized = list(compress(level, map(_SIZED.__contains__, map(type, level))))
        total += sum(map(len, sized))
        if total > budget:
            return total
        nested = list(compress(sized, map(_NESTED.__contains__, map(type, sized))))
        is_dict = list(map(_DICT.__contains__, map(type, nested)))
        dicts = list(compress(nested, is_dict))
        others = compress(nested, map(not_, is_dict))
        level = list(
            chain(
                chain.from_iterable(others),
                chain.from_iterable(dicts),
                chain.from_iterable(map(dict.values, dicts)),
            )
        )
    return total


def _guard_pow(base: Any, exp: Any) -> Any:
    # |base ** exp| has about bit_length(base) * exp bits.
    if (
        isinstance(base, int)
        and isinstance(exp, int)
        and exp > 0
        and abs(base) > 1
        and max(_int_bits(base), 1) * exp > MAX_INT_BITS
    ):
        raise OverflowError(f"power result would exceed {MAX_INT_BITS} bits")
    if (
        isinstance(exp, int | float)
        and isinstance(base, int | float)
        and abs(exp) > 10_000
        and abs(base) not in (0, 1)
    ):
        raise OverflowError("exponent too large")
    return base**exp


def _guard_mult(left: Any, right: Any) -> Any:
    seq, times = (left, right) if _is_seq(left) else (right, left)
    # The outer length first: it is free and rejects the common bombs. A
    # repetition by 1 or less makes nothing bigger than its operand.
    if (
        _is_seq(seq)
        and isinstance(times, int)
        and times > 0
        and (
            len(seq) * times > MAX_SEQUENCE_LENGTH
            or (times > 1 and _weight(seq) * times > MAX_SEQUENCE_LENGTH)
        )
    ):
        raise OverflowError(f"repetition would exceed {MAX_SEQUENCE_LENGTH} items")
    if _int_bits(left) + _int_bits(right) > MAX_INT_BITS:
        raise OverflowError(f"product would exceed {MAX_INT_BITS} bits")
    return left * right


def _guard_add(left: Any, right: Any) -> Any:
    if (
        _is_seq(left)
        and _is_seq(right)
        and (
            len(left) + len(right) > MAX_SEQUENCE_LENGTH
            or _weight(left) + _weight(right) > MAX_SEQUENCE_LENGTH
        )
    ):
        raise OverflowError(f"concatenation would exceed {MAX_SEQUENCE_LENGTH} items")
    return left + right


def _guard_lshift(left: Any, right: Any) -> Any:
    if isinstance(right, int) and right > MAX_SHIFT:
        raise OverflowError(f"left shift by more than {MAX_SHIFT}")
    if _int_bits(left) + max(right, 0) > MAX_INT_BITS:
        raise OverflowError(f"shift result would exceed {MAX_INT_BITS} bits")
    return left << right


def _guard_mod(left: Any, right: Any) -> Any:
    # '%' on strings is printf-style formatting, which can pad to any width.
    if isinstance(left, str | bytes):
        raise TypeError("string formatting with % is not allowed in expressions")
    return left % right


_GUARDS: dict[type[ast.operator], tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Pow: ("_tf_pow", _guard_pow),
    ast.Mult: ("_tf_mult", _guard_mult),
    ast.Add: ("_tf_add", _guard_add),
    ast.LShift: ("_tf_lshift", _guard_lshift),
    ast.Mod: ("_tf_mod", _guard_mod),
}
_GUARD_FUNCS: dict[str, Callable[[Any, Any], Any]] = {name: f for name, f in _GUARDS.values()}


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
            if node.id not in _ROOT_NAMES and node.id not in _BUILTINS:
                raise _reject(
                    "forbidden",
                    f"name {node.id!r} is not available (use context, state or a "
                    f"whitelisted builtin: {', '.join(sorted(_BUILTINS))})",
                    source,
                )
        elif isinstance(node, ast.Attribute):
            if node.attr not in _ALLOWED_METHODS:
                raise _reject("forbidden", f"attribute {node.attr!r} is not allowed", source)
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                if func.id not in _BUILTINS:
                    raise _reject("forbidden", f"{func.id!r} cannot be called", source)
            elif not isinstance(func, ast.Attribute):
                raise _reject("forbidden", "only builtins and methods can be called", source)
            if any(kw.arg is None for kw in node.keywords):
                raise _reject("forbidden", "**kwargs is not allowed", source)
        elif isinstance(node, ast.Constant) and not isinstance(
            node.value, int | float | str | bool | type(None)
        ):
            kind_name = type(node.value).__name__
            raise _reject("forbidden", f"{kind_name} literals are not allowed", source)
    # Attributes may only appear as the callee of a call (``context.get(...)``),
    # never as a value, so no bound method or attribute value can escape.
    callees = {
        id(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in callees:
            raise _reject("forbidden", "attribute access is only allowed for method calls", source)
    return tree


class _Guarder(ast.NodeTransformer):
    """Rewrites size-growing binary operators into calls of their guards."""

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        guard = _GUARDS.get(type(node.op))
        if guard is None:
            return node
        call = ast.Call(func=ast.Name(id=guard[0], ctx=ast.Load()), args=[node.left, node.right],
                        keywords=[])  # fmt: skip
        return ast.copy_location(call, node)


# --- compiled expressions ----------------------------------------------------

_EVAL_ERRORS = (
    ArithmeticError, TypeError, ValueError, KeyError, IndexError, AttributeError,
    RecursionError, MemoryError, RuntimeError, NameError,
)  # fmt: skip


class Expression:
    """A checked, precompiled expression. Immutable once built.

    Use :func:`compile_expression` to build one.
    """

    __slots__ = ("_asteval", "_code", "_evaluator", "_globals", "_tree", "source")

    def __init__(self, source: str, tree: ast.Expression, evaluator: Evaluator) -> None:
        self.source = source
        self._evaluator = evaluator
        self._tree = tree
        self._code = compile(tree, "<expression>", "eval")
        self._globals: dict[str, Any] = {"__builtins__": {}, **_BUILTINS, **_GUARD_FUNCS}
        self._asteval: Interpreter | None = None

    def evaluate(self, state: Mapping[str, Any]) -> Any:
        """Evaluate against a JSON-like state; visible as ``context`` and ``state``.

        Raises:
            ExpressionEvaluationError: the expression raised while evaluating.
        """
        if self._evaluator == "asteval":
            return self._evaluate_asteval(state)
        scope = {"context": state, "state": state}
        try:
            return eval(self._code, self._globals, scope)  # the tree passed the whitelist
        except _EVAL_ERRORS as exc:
            raise ExpressionEvaluationError(
                f"expression {self.source!r} failed: {type(exc).__name__}: {exc}",
                details={"expression": self.source, "type": type(exc).__name__},
            ) from None

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
                raise ExpressionEvaluationError(
                    f"expression {self.source!r} failed: {kind.__name__}: {err.msg}",
                    details={"expression": self.source, "type": kind.__name__},
                )
            return result
        except _EVAL_ERRORS as exc:
            raise ExpressionEvaluationError(
                f"expression {self.source!r} failed: {type(exc).__name__}: {exc}",
                details={"expression": self.source, "type": type(exc).__name__},
            ) from None
        finally:
            interp.symtable["context"] = None
            interp.symtable["state"] = None

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def _make_interpreter() -> Interpreter:
    interp = Interpreter(
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
    interp.symtable.update(_BUILTINS)
    interp.symtable.update(_GUARD_FUNCS)
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


__all__ = ["Expression", "check_expression", "compile_expression", "truthy"]
