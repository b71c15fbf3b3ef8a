"""Sandboxed condition expressions with a hard evaluation budget.

An expression is parsed once, checked against a whitelist of AST node types,
names and method names, then rewritten so that every operation whose cost or
result size depends on its operands goes through a guard. Conditions run on
the event loop, so while one evaluates nothing else is served: the guards
give each evaluation a fixed budget of work and memory (see
:data:`MAX_UNITS` and :data:`MAX_BYTES`) that no expression and no state can
exceed.

Metering is deterministic, not a wall-clock check: a guard estimates the cost
of the operation it is about to perform from cheap facts (lengths first, a
capped walk of the operands only where the cost depends on their contents),
charges a per-thread meter *before* doing the work, and raises
:class:`~core.errors.ExpressionBudgetError` when the charge would pass a
limit. The cost model is calibrated by ``python -m bench.expressions``: one
work unit is about 10 ns of CPU on the reference machine. The same expression
over the same state always charges the same, so a run never fails at random
on a loaded machine.

What is guarded (everything else is O(1) or bounded by the expression's
size, which is capped at :data:`MAX_AST_NODES` nodes):

* every binary operator (``+ - * / // % ** << >> & | ^``), including set
  operations on dict views;
* comparisons whose cost depends on the operands' size: deep ``==`` and
  ordering of containers, ``in``/``not in`` over a container or a string.
  ``is`` and comparisons with a constant on one side (other than ``in``
  with a non-constant right-hand side) are left alone;
* slices, set and dict displays (they hash their elements);
* the builtins ``min max sum any all sorted str int float`` (``len abs bool
  round`` are O(1) on the values an expression can build) and ``key=``
  callbacks, charged per element;
* the string methods ``lower upper strip startswith endswith``.

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
import threading
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from itertools import chain, compress, islice
from typing import Any, Literal, NoReturn

from asteval import Interpreter

from .errors import ExpressionBudgetError, ExpressionError, ExpressionEvaluationError

Evaluator = Literal["compiled", "asteval"]

MAX_EXPRESSION_LENGTH = 1000
MAX_AST_NODES = 200
#: Largest integer result (in bits) any guarded operator or ``int()`` may produce.
MAX_INT_BITS = 4096
#: Largest string/list/tuple any guarded operator may produce (items, nested
#: items and string characters included).
MAX_SEQUENCE_LENGTH = 100_000
MAX_SHIFT = 1024
MAX_ROUND_DIGITS = 64

# --- the budget ---------------------------------------------------------------

#: Work units one evaluation may spend. A unit is about 10 ns of CPU on the
#: reference machine (``python -m bench.expressions`` prints the calibration),
#: so the budget is about 10 ms.
MAX_UNITS = 1_000_000
#: Bytes of new objects one evaluation may create (estimated sizes of every
#: string, list, set, ... a guarded operation builds, summed whether or not
#: the object is still alive).
MAX_BYTES = 16 * 1024 * 1024

# Cost model, in work units. Each constant is the cost of one step of an
# operation class on adversarial inputs; bench/expressions.py measures the
# nanoseconds per unit of every class and the worst case.
#: Visiting one object while weighing a container (the walk's own cost),
#: more for a container (its children are queued) and more for a dict.
WALK_UNITS = 7
CONTAINER_WALK_UNITS = 6
DICT_WALK_UNITS = 8
#: Each batch of the walk of a large value.
WALK_BATCH_UNITS = 100
#: One object of the walk of a small value (a Python loop).
SMALL_WALK_UNITS = 10
#: One element of an iteration (any/all, materialising an iterable).
ITER_UNITS = 1
#: Iterating an items view (a tuple per entry) or a non-Latin-1 string (a
#: str object per character).
ITER_ALLOC_UNITS = 5
#: One element copied into a new list or tuple (slices, +, *); covers one
#: later hash of the result.
COPY_UNITS = 1
#: Characters of a new string per unit (copy plus one later hash).
CHARS_PER_UNIT = 8
#: Characters per weight unit when comparing or hashing strings.
CMP_CHARS_PER_UNIT = 16
#: Bits of an int per weight unit.
INT_BITS_PER_UNIT = 512
#: One weight unit of a comparison, min/max or sum.
CMP_UNITS = 2
#: One weight unit per merge level of a sort.
SORT_UNITS = 2
#: One call of a ``key=`` function, on top of what the function charges:
#: a C builtin (len, abs, bool), or one of the guards (Python code, whose own
#: fixed cost of a microsecond or two is not in what it charges).
KEY_CALL_UNITS = 8
GUARDED_KEY_CALL_UNITS = 200
#: One element inserted in a new set (view set operations, set displays).
SET_UNITS = 16
#: One element of a substring search, per unit (haystack plus needle).
SEARCH_CHARS_PER_UNIT = 2
#: One character of lower()/upper() on a non-ASCII string (case mappings can
#: expand one character to three).
CASE_UNITS = 6
#: Character pairs per unit of strip(chars): each stripped character is
#: looked up in ``chars``.
STRIP_PAIRS_PER_UNIT = 512
#: Product of 30-bit digit counts per unit of an int multiplication/division.
INT_QUAD_PER_UNIT = 12
#: Characters per unit of parsing int() (power-of-two bases are linear).
INT_CHARS_PER_UNIT = 6
#: Squared digit count per unit of a decimal int() conversion.
INT_DEC_SQ_PER_UNIT = 2000
#: Squared 30-bit digit count per unit of str(int).
INT_STR_SQ_PER_UNIT = 10

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

#: Methods an expression may call: read-only methods of dict and str.
_ALLOWED_METHODS = frozenset(
    {"get", "keys", "values", "items", "lower", "upper", "strip", "startswith", "endswith"}
)
#: The string methods whose cost depends on the string: rewritten into guards.
_STR_METHODS = frozenset({"lower", "upper", "strip", "startswith", "endswith"})


# --- the meter ----------------------------------------------------------------


class _Meter:
    """What the current evaluation on this thread has spent."""

    __slots__ = ("bytes", "over", "slots", "units")

    def __init__(self) -> None:
        self.units = 0
        self.bytes = 0
        #: Why the budget was exceeded, once it was (sticky until the next reset).
        self.over: str | None = None
        #: Left operands of chained comparisons, by comparison.
        self.slots: dict[int, Any] = {}


class _Local(threading.local):
    # One thread-local lookup per charge, then plain attribute accesses.
    def __init__(self) -> None:
        self.meter = _Meter()


_LOCAL = _Local()


def spent() -> tuple[int, int]:
    """Work units and bytes charged by the last metered evaluation on this thread.

    An expression that contains no guard is not metered and leaves this
    reading alone. For tests and benchmarks.
    """
    meter = _LOCAL.meter
    return meter.units, meter.bytes


def _exceeded(meter: _Meter, what: str, units: int, nbytes: int) -> NoReturn:
    if meter.over is not None:
        reason = meter.over
    elif units > MAX_UNITS - meter.units:
        reason = (f"{what} needs {units:,} work units with {meter.units:,} of "
                  f"{MAX_UNITS:,} already spent")  # fmt: skip
    else:
        reason = (f"{what} needs {nbytes:,} bytes of new objects with {meter.bytes:,} of "
                  f"{MAX_BYTES:,} already spent")  # fmt: skip
    meter.over = reason
    raise ExpressionBudgetError(f"evaluation budget exceeded: {reason}")


def _charge(units: int, nbytes: int = 0, what: str = "an operation") -> None:
    """Spend ``units`` of work and ``nbytes`` of memory, or raise before the work."""
    meter = _LOCAL.meter
    total = meter.units + units
    total_bytes = meter.bytes + nbytes
    if total > MAX_UNITS or total_bytes > MAX_BYTES or meter.over is not None:
        _exceeded(meter, what, units, nbytes)
    meter.units = total
    meter.bytes = total_bytes


# --- weighing values ------------------------------------------------------------

_KEYS_VIEW: type[Any] = type({}.keys())
_VALUES_VIEW: type[Any] = type({}.values())
_ITEMS_VIEW: type[Any] = type({}.items())
_SEQ_TYPES = frozenset({list, tuple, set, frozenset, _KEYS_VIEW, _VALUES_VIEW, _ITEMS_VIEW})
_DICT_TYPES = frozenset({dict})
_CONTAINER_TYPES = _SEQ_TYPES | _DICT_TYPES
_SET_LIKE = frozenset({set, frozenset, _KEYS_VIEW, _ITEMS_VIEW})
_STR_TYPES = frozenset({str})
_ITEMS_TYPES = frozenset({_ITEMS_VIEW})
_INT_TYPES = frozenset({int})
_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})
_WALK_BATCH = 2048
#: Values of at most this many objects are weighed by a Python loop.
_SMALL_WALK = 48


class _Weight:
    """What weighing a value found: objects, string characters and int bits.

    ``complete`` is false when the walk stopped early (at ``stop_size`` or
    ``stop_cost``): the figures are then a lower bound past that stop.
    """

    __slots__ = ("bits", "chars", "complete", "items")

    def __init__(self, items: int, chars: int, bits: int, complete: bool) -> None:
        self.items = items
        self.chars = chars
        self.bits = bits
        self.complete = complete

    @property
    def size(self) -> int:
        """Items below the root and characters: the measure the result caps use."""
        return self.items - 1 + self.chars

    @property
    def cost(self) -> int:
        """Weight units: one per object, per 16 characters, per 512 int bits."""
        return self.items + self.chars // CMP_CHARS_PER_UNIT + self.bits // INT_BITS_PER_UNIT


def _weigh(value: Any, what: str, *, stop_size: int | None = None,
           stop_cost: int | None = None) -> _Weight:  # fmt: skip
    """Walk ``value`` (nested containers, shared ones once per reference).

    Charges the walk's own cost before each step, so the walk can never pass
    the budget. Stops early, with a partial weight, once ``size`` passes
    ``stop_size`` or ``cost`` passes ``stop_cost``.
    """
    kind = type(value)
    if kind not in _CONTAINER_TYPES:
        _charge(SMALL_WALK_UNITS, 0, what)
        if kind is str:
            return _Weight(1, len(value), 0, True)
        return _Weight(1, 0, value.bit_length() if kind is int else 0, True)
    if len(value) <= _SMALL_WALK:
        small = _weigh_small(value, what)
        if small is not None:
            return small
    return _weigh_batches(value, what, stop_size, stop_cost)


def _weigh_small(value: Any, what: str) -> _Weight | None:
    """A Python loop for small values (``None`` past :data:`_SMALL_WALK` objects).

    The batch walk has a fixed cost of a few microseconds; this one costs
    per object. Charged when done, which is safe: it stops at a few dozen
    objects.
    """
    items = chars = bits = 0
    stack = [value]
    pop = stack.pop
    extend = stack.extend
    while stack:
        obj = pop()
        items += 1
        kind = type(obj)
        if kind is str:
            chars += len(obj)
        elif kind is int:
            bits += obj.bit_length()
        elif kind in _CONTAINER_TYPES:
            if items + len(stack) + len(obj) * (2 if kind is dict else 1) > _SMALL_WALK:
                _charge(items * SMALL_WALK_UNITS, 0, what)
                return None
            extend(obj)
            if kind is dict:
                extend(obj.values())
    _charge(items * SMALL_WALK_UNITS, 0, what)
    return _Weight(items, chars, bits, True)


def _weigh_batches(value: Any, what: str, stop_size: int | None,
                   stop_cost: int | None) -> _Weight:  # fmt: skip
    """The walk of large values: C-level passes over batches of objects.

    Memory stays small whatever the value: a stack of lazy iterators, one
    or two per nesting level, each over at most one batch of containers.
    """
    items = chars = bits = 0
    stack: list[Any] = [iter((value,))]
    while stack:
        batch = list(islice(stack[-1], _WALK_BATCH))
        if not batch:
            stack.pop()
            continue
        count = len(batch)
        _charge(count * WALK_UNITS + WALK_BATCH_UNITS, 0, what)
        items += count
        types = list(map(type, batch))
        kinds = set(types)
        single = len(kinds) == 1
        if str in kinds:
            strs = batch if single else compress(batch, map(_STR_TYPES.__contains__, types))
            chars += sum(map(len, strs))
        if int in kinds:
            ints = batch if single else compress(batch, map(_INT_TYPES.__contains__, types))
            bits += sum(map(int.bit_length, ints))
        if (stop_size is not None and items - 1 + chars > stop_size) or (
            stop_cost is not None
            and items + chars // CMP_CHARS_PER_UNIT + bits // INT_BITS_PER_UNIT > stop_cost
        ):
            return _Weight(items, chars, bits, False)
        if kinds.isdisjoint(_CONTAINER_TYPES):
            continue
        if dict in kinds:
            dicts = batch if single else list(compress(batch, map(_DICT_TYPES.__contains__, types)))
            _charge(len(dicts) * (CONTAINER_WALK_UNITS + DICT_WALK_UNITS), 0, what)
            stack.append(chain.from_iterable(map(dict.values, dicts)))
            stack.append(chain.from_iterable(dicts))
            if single:
                continue
        if not kinds.isdisjoint(_SEQ_TYPES):
            seqs = batch if single else list(compress(batch, map(_SEQ_TYPES.__contains__, types)))
            _charge(len(seqs) * CONTAINER_WALK_UNITS, 0, what)
            if _ITEMS_VIEW in kinds:  # iterating makes a tuple per entry
                views = compress(batch, map(_ITEMS_TYPES.__contains__, types))
                _charge(sum(map(len, views)) * ITER_ALLOC_UNITS, 0, what)
            stack.append(chain.from_iterable(seqs))
    return _Weight(items, chars, bits, True)


def _scalar_cost(value: Any) -> int | None:
    """Weight units of a scalar without walking, or ``None`` for a container."""
    kind = type(value)
    if kind is str:
        return 1 + len(value) // CMP_CHARS_PER_UNIT
    if kind is int:
        return 1 + int(value.bit_length()) // INT_BITS_PER_UNIT
    if kind in _SCALAR_TYPES:
        return 1
    if kind in _CONTAINER_TYPES:
        return None
    return 1  # complex and the like: O(1)


def _cost(value: Any, what: str) -> int:
    """Weight units of ``value``, walking it only if it is a container."""
    cost = _scalar_cost(value)
    return _weigh(value, what).cost if cost is None else cost


def _str_bytes(length: int, *sources: str) -> int:
    """Estimated size of a new string of ``length`` characters built from ``sources``."""
    if all(map(str.isascii, sources)):
        return 49 + length
    return 80 + 4 * length


def _seq_bytes(length: int) -> int:
    return 64 + 8 * length


def _int_digits(value: Any) -> int:
    """30-bit digits of an int (0 for anything else)."""
    if type(value) is int:
        return value.bit_length() // 30 + 1
    return 0


# --- arithmetic guards ----------------------------------------------------------


def _int_bits(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return value.bit_length()


def _is_seq(value: Any) -> bool:
    return isinstance(value, str | bytes | list | tuple)


def _charge_int_quad(left: Any, right: Any, what: str) -> None:
    work = _int_digits(left) * _int_digits(right)
    if work > 4 * INT_QUAD_PER_UNIT:
        _charge(work // INT_QUAD_PER_UNIT, 0, what)


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
    if type(base) is int and type(exp) is int and exp > 0:
        # Square-and-multiply of results up to MAX_INT_BITS.
        digits = _int_digits(base) * exp
        _charge(digits * digits // INT_QUAD_PER_UNIT + 1, 4 * digits + 32, "**")
    return base**exp


def _guard_mult(left: Any, right: Any) -> Any:
    seq, times = (left, right) if _is_seq(left) else (right, left)
    if _is_seq(seq) and isinstance(times, int) and times > 0:
        # The outer length first: it is free and rejects the common bombs.
        length = len(seq) * times
        if length > MAX_SEQUENCE_LENGTH:
            raise OverflowError(f"repetition would exceed {MAX_SEQUENCE_LENGTH} items")
        if times > 1 and type(seq) is not str:
            # Counting only the outer length would let [[1]*99999]*99999
            # through: small to build, but comparing or sorting it walks
            # 10**10 items.
            stop = MAX_SEQUENCE_LENGTH // times
            if _weigh(seq, "*", stop_size=stop).size > stop:
                raise OverflowError(f"repetition would exceed {MAX_SEQUENCE_LENGTH} items")
        if type(seq) is str:
            _charge(length // CHARS_PER_UNIT + 1, _str_bytes(length, seq), "*")
        else:
            _charge(length * COPY_UNITS + 1, _seq_bytes(length), "*")
        return left * right
    if _int_bits(left) + _int_bits(right) > MAX_INT_BITS:
        raise OverflowError(f"product would exceed {MAX_INT_BITS} bits")
    _charge_int_quad(left, right, "*")
    return left * right


def _guard_add(left: Any, right: Any) -> Any:
    kind = type(left)
    if kind is type(right) and kind in (str, list, tuple):
        length = len(left) + len(right)
        if length > MAX_SEQUENCE_LENGTH:
            raise OverflowError(f"concatenation would exceed {MAX_SEQUENCE_LENGTH} items")
        if kind is str:
            _charge(length // CHARS_PER_UNIT + 1, _str_bytes(length, left, right), "+")
        else:
            stop = MAX_SEQUENCE_LENGTH
            size = _weigh(left, "+", stop_size=stop).size
            if size > stop or size + _weigh(right, "+", stop_size=stop - size).size > stop:
                raise OverflowError(f"concatenation would exceed {MAX_SEQUENCE_LENGTH} items")
            _charge(length * COPY_UNITS + 1, _seq_bytes(length), "+")
    elif _is_seq(left) and _is_seq(right) and len(left) + len(right) > MAX_SEQUENCE_LENGTH:
        raise OverflowError(f"concatenation would exceed {MAX_SEQUENCE_LENGTH} items")
    return left + right


def _guard_lshift(left: Any, right: Any) -> Any:
    if isinstance(right, int) and right > MAX_SHIFT:
        raise OverflowError(f"left shift by more than {MAX_SHIFT}")
    if _int_bits(left) + max(right, 0) > MAX_INT_BITS:
        raise OverflowError(f"shift result would exceed {MAX_INT_BITS} bits")
    return left << right


def _guard_rshift(left: Any, right: Any) -> Any:
    return left >> right


def _guard_mod(left: Any, right: Any) -> Any:
    # '%' on strings is printf-style formatting, which can pad to any width.
    if isinstance(left, str | bytes):
        raise TypeError("string formatting with % is not allowed in expressions")
    _charge_int_quad(left, right, "%")
    return left % right


def _guard_floordiv(left: Any, right: Any) -> Any:
    _charge_int_quad(left, right, "//")
    return left // right


def _guard_truediv(left: Any, right: Any) -> Any:
    _charge_int_quad(left, right, "/")
    return left / right


def _charge_set_operand(value: Any, what: str) -> int:
    """Charge iterating and hashing one operand of a set operation; its length."""
    kind = type(value)
    if kind is _KEYS_VIEW:
        # Keys are hashed already (the dict stores their hashes).
        _charge(len(value) * SET_UNITS + 1, 0, what)
        return len(value)
    if kind is str:
        _charge(len(value) * SET_UNITS + 1, 0, what)
        return len(value)
    if kind in _CONTAINER_TYPES:
        weight = _weigh(value, what)
        _charge(len(value) * SET_UNITS + weight.cost * CMP_UNITS, 0, what)
        return len(value)
    return 0


_VIEWS = (_KEYS_VIEW, _ITEMS_VIEW)


def _guard_set_op(op: Callable[[Any, Any], Any], symbol: str, left: Any, right: Any) -> Any:
    lt, rt = type(left), type(right)
    if lt in _SET_LIKE or rt in _SET_LIKE:
        # A dict view's |, ^ and (with the view on the right) - build a set
        # from the other operand. Inserting an arbitrary list into a set can
        # take quadratic time (ints and floats with equal hashes are easy to
        # build), so that operand must be a set or a dict view already.
        builds = (symbol in "|^" and (lt in _VIEWS or rt in _VIEWS)) or (
            symbol == "-" and rt in _VIEWS
        )
        if builds and not (lt in _SET_LIKE and rt in _SET_LIKE):
            other = rt if lt in _SET_LIKE else lt
            raise TypeError(
                f"{symbol} with a dict view takes another dict view or a set, "
                f"not {other.__name__}"
            )
        what = f"the set operation {symbol}"
        count = _charge_set_operand(left, what) + _charge_set_operand(right, what)
        # Entries of the new set, and a tuple per entry of an items view.
        per_item = 120 if _ITEMS_VIEW in (lt, rt) else 48
        _charge(0, 232 + per_item * count, what)
    else:
        digits = max(_int_digits(left), _int_digits(right))
        if digits > 64:
            _charge(digits // 64, 4 * digits, symbol)
    return op(left, right)


def _guard_sub(left: Any, right: Any) -> Any:
    return _guard_set_op(_sub, "-", left, right)


def _guard_or(left: Any, right: Any) -> Any:
    return _guard_set_op(_or, "|", left, right)


def _guard_and(left: Any, right: Any) -> Any:
    return _guard_set_op(_and, "&", left, right)


def _guard_xor(left: Any, right: Any) -> Any:
    return _guard_set_op(_xor, "^", left, right)


def _sub(a: Any, b: Any) -> Any:
    return a - b


def _or(a: Any, b: Any) -> Any:
    return a | b


def _and(a: Any, b: Any) -> Any:
    return a & b


def _xor(a: Any, b: Any) -> Any:
    return a ^ b


_BINOP_GUARDS: dict[type[ast.operator], tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Pow: ("_tf_pow", _guard_pow),
    ast.Mult: ("_tf_mult", _guard_mult),
    ast.Add: ("_tf_add", _guard_add),
    ast.Sub: ("_tf_sub", _guard_sub),
    ast.LShift: ("_tf_lshift", _guard_lshift),
    ast.RShift: ("_tf_rshift", _guard_rshift),
    ast.Mod: ("_tf_mod", _guard_mod),
    ast.FloorDiv: ("_tf_floordiv", _guard_floordiv),
    ast.Div: ("_tf_truediv", _guard_truediv),
    ast.BitOr: ("_tf_or", _guard_or),
    ast.BitAnd: ("_tf_and", _guard_and),
    ast.BitXor: ("_tf_xor", _guard_xor),
}


# --- comparisons ------------------------------------------------------------------

_EQ, _NE, _LT, _LE, _GT, _GE, _IN, _NOT_IN = range(8)
_CMP_OPS: dict[type[ast.cmpop], int] = {
    ast.Eq: _EQ, ast.NotEq: _NE, ast.Lt: _LT, ast.LtE: _LE, ast.Gt: _GT, ast.GtE: _GE,
    ast.In: _IN, ast.NotIn: _NOT_IN,
}  # fmt: skip
_CMP_FUNCS: tuple[Callable[[Any, Any], Any], ...] = (
    lambda a, b: a == b,
    lambda a, b: a != b,
    lambda a, b: a < b,
    lambda a, b: a <= b,
    lambda a, b: a > b,
    lambda a, b: a >= b,
    lambda a, b: a in b,
    lambda a, b: a not in b,
)
_CMP_WHAT = tuple(f"the comparison {name}"
                  for name in ("==", "!=", "<", "<=", ">", ">=", "in", "not in"))  # fmt: skip


def _charge_contains(item: Any, container: Any, what: str) -> None:
    """Charge ``item in container`` before it runs."""
    kind = type(container)
    if kind is str:
        if type(item) is str and len(item) <= len(container):
            _charge((len(container) + len(item)) // SEARCH_CHARS_PER_UNIT + 1, 0, what)
        return
    if (kind is dict or kind is _KEYS_VIEW) and type(item) is str and len(item) < 64:
        return  # the common case, and O(1): 'k' in context
    if kind in (list, tuple, _VALUES_VIEW):
        # Each element is compared with the item: a comparison costs at most
        # the item's weight, and at most the element's, so the scan costs at
        # most n * weight(item) and at most weight(container).
        count = len(container)
        item_cost = _scalar_cost(item)
        if item_cost is None:
            item_cost = _weigh(item, what).cost
        scan = count * (1 + item_cost) * CMP_UNITS // 2
        if scan > MAX_UNITS - _LOCAL.meter.units:
            scan = _weigh(container, what).cost * CMP_UNITS
        _charge(scan + 1, 0, what)
        return
    if kind in _CONTAINER_TYPES:
        # A hash lookup: hashing the item (a tuple hashes all it holds) and
        # comparing it with an entry of equal hash.
        _charge(_cost(item, what) * CMP_UNITS, 0, what)


def _charge_compare(left: Any, right: Any, op: int) -> None:
    """Charge one comparison before it runs (``is`` never comes here)."""
    what = _CMP_WHAT[op]
    if op >= _IN:
        _charge_contains(left, right, what)
        return
    kind = type(left)
    equality = op <= _NE
    if kind is type(right):
        if kind is str:
            if equality:
                # Equal lengths and kinds, then one memcmp.
                if len(left) == len(right) and len(left) > 1024:
                    _charge(len(left) // (CMP_CHARS_PER_UNIT * 8) + 1, 0, what)
            elif min(len(left), len(right)) > 64:
                # Ordering compares character by character unless both are
                # ASCII (memcmp).
                chars = min(len(left), len(right))
                fast = left.isascii() and right.isascii()
                _charge(chars // (CMP_CHARS_PER_UNIT * (8 if fast else 1)) + 1, 0, what)
            return
        if kind in (list, tuple) or (kind is dict and equality):
            if equality and len(left) != len(right):
                return  # decided by the lengths
            # Element by element up to the first difference: at most the
            # lighter operand's weight.
            first = _weigh(left, what)
            second = _weigh(right, what, stop_cost=first.cost)
            cost = min(first.cost, second.cost) if second.complete else first.cost
            _charge(cost * CMP_UNITS + 1, 0, what)
            return
    if kind in _SET_LIKE and type(right) in _SET_LIKE:
        if equality and len(left) != len(right):
            return
        cost = _weigh(left, what).cost + _weigh(right, what).cost
        _charge(cost * CMP_UNITS + 1, 0, what)


def _make_compare(op: int) -> Callable[[Any, Any], Any]:
    func = _CMP_FUNCS[op]

    def guard(left: Any, right: Any) -> Any:
        _charge_compare(left, right, op)
        return func(left, right)

    guard.__name__ = f"_tf_cmp{op}"
    return guard


def _guard_link(value: Any, slot: int, op: int) -> Any:
    """One operand of a chained comparison ``a < b < c``.

    Each operand is wrapped in this identity function, which keeps Python's
    evaluation order and short-circuit exactly: the operand before is kept
    in the comparison's slot, and the comparison with it (``op``; -1 for the
    first operand) is charged before the interpreter performs it.
    """
    slots = _LOCAL.meter.slots
    if op >= 0:
        _charge_compare(slots[slot], value, op)
    slots[slot] = value
    return value


# --- builtins -------------------------------------------------------------------

_MISSING: Any = object()


def _safe_round(number: Any, ndigits: Any = None) -> Any:
    if ndigits is not None and (not isinstance(ndigits, int) or abs(ndigits) > MAX_ROUND_DIGITS):
        raise ValueError(f"round() ndigits must be an int within +-{MAX_ROUND_DIGITS}")
    return round(number, ndigits)


def _iter_units(iterable: Any) -> int:
    """Units to iterate a sized iterable once."""
    kind = type(iterable)
    count = len(iterable)
    # Iterating a string makes a str per character unless it is Latin-1;
    # only "ASCII" is known in O(1), so any other string counts as the
    # expensive kind.
    if kind is _ITEMS_VIEW or (kind is str and not iterable.isascii()):
        return count * ITER_ALLOC_UNITS + 1
    return count * ITER_UNITS + 1


def _sized(value: Any) -> bool:
    """Every iterable an expression can reach has a length (no generators, no ranges)."""
    return hasattr(type(value), "__len__")


def _materialize(iterable: Any, what: str) -> list[Any]:
    """A new list of the elements of a sized iterable, charged."""
    count = len(iterable)
    extra = 0
    if type(iterable) is _ITEMS_VIEW:
        extra = 64 * count  # a tuple per entry
    elif type(iterable) is str and not iterable.isascii():
        extra = 80 * count  # a str per character
    _charge(_iter_units(iterable), _seq_bytes(count) + extra, what)
    return list(iterable)


def _element_cost(iterable: Any, what: str) -> int:
    """Weight units of comparing every element of ``iterable`` once."""
    if type(iterable) is str:
        return len(iterable) + 1  # one-character strings
    return _weigh(iterable, what).cost


def _charge_keys(count: int, key: Any, what: str) -> None:
    """Charge ``count`` calls of a ``key=`` function (guarded keys also charge their work)."""
    per_call = GUARDED_KEY_CALL_UNITS if key in _GUARDED_KEYS else KEY_CALL_UNITS
    _charge(count * per_call + 1, _seq_bytes(count) + 32 * count, what)


def _minmax(func: Any, what: str, args: tuple[Any, ...], key: Any, default: Any) -> Any:
    extra = {} if default is _MISSING else {"default": default}
    if len(args) == 1 and _sized(args[0]):
        iterable = args[0]
    elif len(args) > 1 and not extra:
        iterable = args
    else:
        return func(*args, key=key, **extra)  # nothing to iterate: the builtin's own error
    if key is None:
        elements = iterable.keys() if type(iterable) is dict else iterable
        _charge(_iter_units(iterable) + _element_cost(elements, what) * CMP_UNITS, 0, what)
        return func(iterable, **extra)
    _charge_keys(len(iterable), key, what)
    items = iterable if type(iterable) in (list, tuple) else _materialize(iterable, what)
    keys = list(map(key, items))
    _charge(_weigh(keys, what).cost * CMP_UNITS + 1, 0, what)
    if not keys:
        return func((), **extra)
    # The first element with the smallest (largest) key, as min() and max() pick.
    return items[func(range(len(keys)), key=keys.__getitem__)]


def _guard_min(*args: Any, key: Any = None, default: Any = _MISSING) -> Any:
    return _minmax(min, "min()", args, key, default)


def _guard_max(*args: Any, key: Any = None, default: Any = _MISSING) -> Any:
    return _minmax(max, "max()", args, key, default)


def _sort_levels(count: int) -> int:
    return max(1, count.bit_length())


def _guard_sorted(iterable: Any, /, *, key: Any = None, reverse: Any = False) -> list[Any]:
    if not _sized(iterable):
        return sorted(iterable, key=key, reverse=reverse)  # the builtin's own error
    count = len(iterable)
    levels = _sort_levels(count)
    what = "sorted()"
    if key is None:
        # The sort's cost is known before anything is copied: a dict sorts
        # its keys.
        elements = iterable.keys() if type(iterable) is dict else iterable
        _charge(_element_cost(elements, what) * levels * SORT_UNITS + 1, 0, what)
        items = _materialize(iterable, what)
        items.sort(reverse=reverse)
        return items
    _charge_keys(count, key, what)
    items = _materialize(iterable, what)
    keys = list(map(key, items))
    _charge(_weigh(keys, what).cost * levels * SORT_UNITS + 1, 2 * _seq_bytes(count), what)
    # Sorting the positions by key is what sorted(key=) does: same order,
    # same stability, same reverse.
    order = sorted(range(count), key=keys.__getitem__, reverse=reverse)
    return list(map(items.__getitem__, order))


def _guard_sum(iterable: Any, /, start: Any = 0) -> Any:
    # sum(xs, []) concatenates without going through the '+' guard, in
    # quadratic time: only numbers may be summed.
    if isinstance(start, bool) or not isinstance(start, int | float):
        raise TypeError("sum() start must be a number")
    if _sized(iterable):
        if type(iterable) in (list, tuple, _VALUES_VIEW, set, frozenset):
            _charge(_weigh(iterable, "sum()").cost * CMP_UNITS + 1, 0, "sum()")
        else:  # str, dict, keys and items: the first element is no number
            _charge(_iter_units(iterable), 0, "sum()")
    return sum(iterable, start)


def _guard_any(iterable: Any, /) -> bool:
    if _sized(iterable):
        _charge(_iter_units(iterable), 0, "any()")
    return any(iterable)


def _guard_all(iterable: Any, /) -> bool:
    if _sized(iterable):
        _charge(_iter_units(iterable), 0, "all()")
    return all(iterable)


_STR_ARGUMENT_TYPES = (str, int, float, bool, type(None))


def _guard_str(*args: Any, **kwargs: Any) -> str:
    if kwargs or len(args) > 1:
        raise TypeError("str() in expressions takes one argument")
    if not args:
        return ""
    value = args[0]
    if type(value) not in _STR_ARGUMENT_TYPES:
        # str() of a container is its repr: escapes make it up to 10x larger
        # than the container's own size, and it has no use in a condition.
        raise TypeError(
            f"str() in expressions takes a string, number, bool or None, "
            f"not {type(value).__name__}"
        )
    if type(value) is int:
        digits = _int_digits(value)
        if digits > 8:
            _charge(digits * digits // INT_STR_SQ_PER_UNIT + 1, 49 + 10 * digits, "str()")
    return str(value)


def _charge_number_text(text: str, units: int, what: str) -> None:
    """Charge int() or float() of a string: ``units`` of parsing, and the error path.

    A string CPython rejects ends up repr'd in the error message (in full
    for float(), cut after it is built for int()): escapes make a repr up to
    4 characters per ASCII character and 10 per other character, at up to
    15 ns per character.
    """
    length = len(text)
    if text.isascii():
        units += length // 2
        nbytes = 8 * length
    else:
        units += length * 2
        nbytes = 20 * length
    _charge(units + 1, nbytes + 64, what)


def _guard_int(*args: Any, **kwargs: Any) -> int:
    text = args[0] if args else None
    if type(text) is str:
        length = len(text)
        base = args[1] if len(args) > 1 else kwargs.get("base", 10)
        units = length // INT_CHARS_PER_UNIT
        if base not in (2, 4, 8, 16, 32):  # decimal-like bases convert in quadratic time
            # CPython refuses more than 4300 digits before converting.
            digits = min(length, 4300)
            units += digits * digits // INT_DEC_SQ_PER_UNIT
        _charge_number_text(text, units, "int()")
    result = int(*args, **kwargs)
    if result.bit_length() > MAX_INT_BITS:
        raise OverflowError(f"int() result would exceed {MAX_INT_BITS} bits")
    return result


def _guard_float(*args: Any) -> float:
    text = args[0] if args else None
    if type(text) is str:
        _charge_number_text(text, len(text) // CHARS_PER_UNIT, "float()")
        try:
            return float(*args)
        except ValueError:
            # CPython's message holds the whole string's repr.
            raise ValueError(
                f"could not convert string to float: {_short_repr(text)}"
            ) from None
    return float(*args)


_GUARDED_BUILTINS: dict[str, Any] = {
    "min": _guard_min, "max": _guard_max, "sum": _guard_sum, "any": _guard_any,
    "all": _guard_all, "sorted": _guard_sorted, "str": _guard_str, "int": _guard_int,
    "float": _guard_float,
}  # fmt: skip
#: O(1) on every value an expression can build (ints are at most a few
#: thousand bits): called directly.
_PLAIN_BUILTINS: dict[str, Any] = {"len": len, "abs": abs, "bool": bool, "round": _safe_round}
_BUILTINS: dict[str, Any] = {**_PLAIN_BUILTINS, **_GUARDED_BUILTINS}
_GUARDED_KEYS = frozenset({*_GUARDED_BUILTINS.values(), _safe_round})


# --- string methods, slices, displays -----------------------------------------------


def _str_case(method: Callable[[str], str], text: str) -> str:
    length = len(text)
    if text.isascii():
        _charge(length // (CHARS_PER_UNIT * 4) + 1, 49 + length, "lower()/upper()")
    else:
        _charge(length * CASE_UNITS + 1, 80 + 12 * length, "lower()/upper()")
    return method(text)


def _str_lower(text: str, /) -> str:
    return _str_case(str.lower, text)


def _str_upper(text: str, /) -> str:
    return _str_case(str.upper, text)


def _str_strip(text: str, chars: Any = None, /) -> str:
    length = len(text)
    units = length // CHARS_PER_UNIT + 1
    if type(chars) is str:
        units += length * len(chars) // STRIP_PAIRS_PER_UNIT
    _charge(units, _str_bytes(length, text), "strip()")
    return text.strip(chars)


def _str_affix(method: Callable[..., bool], text: str, affix: Any, /, *args: Any) -> bool:
    what = "startswith()/endswith()"
    if type(affix) is tuple:
        _charge(_weigh(affix, what).cost + 1, 0, what)
    elif type(affix) is str and len(affix) > 1024:
        _charge(len(affix) // (CMP_CHARS_PER_UNIT * 8) + 1, 0, what)
    return method(text, affix, *args)


_STR_GUARDS: dict[str, Callable[..., Any]] = {
    "lower": _str_lower,
    "upper": _str_upper,
    "strip": _str_strip,
    "startswith": partial(_str_affix, str.startswith),
    "endswith": partial(_str_affix, str.endswith),
}


def _guard_method(obj: Any, name: str) -> Any:
    """``obj.name``, guarded when ``obj`` is a string.

    The call ``obj.name(args)`` is rewritten to ``_tf_method(obj, name)(args)``:
    the attribute is looked up before the arguments are evaluated, as in Python.
    """
    method = getattr(obj, name)
    if type(obj) is str:
        return partial(_STR_GUARDS[name], obj)
    return method


def _guard_slice(value: Any, lower: Any, upper: Any, step: Any) -> Any:
    kind = type(value)
    index = slice(lower, upper, step)
    if kind in (str, list, tuple):
        length = len(range(*index.indices(len(value))))
        if kind is str:
            _charge(length // CHARS_PER_UNIT + 1, _str_bytes(length, value), "a slice")
        else:
            _charge(length * COPY_UNITS + 1, _seq_bytes(length), "a slice")
    return value[index]


def _guard_set_display(*elements: Any) -> set[Any]:
    units = 1
    for element in elements:
        units += _cost(element, "a set display") * CMP_UNITS
    _charge(units, 232 + 48 * len(elements), "a set display")
    return set(elements)


def _guard_dict_display(*pairs: Any) -> dict[Any, Any]:
    keys = pairs[::2]
    units = 1
    for key in keys:
        units += _cost(key, "a dict display") * CMP_UNITS
    _charge(units, 232 + 64 * len(keys), "a dict display")
    return dict(zip(keys, pairs[1::2], strict=True))


_GUARD_FUNCS: dict[str, Callable[..., Any]] = {
    **{name: func for name, func in _BINOP_GUARDS.values()},
    **{f"_tf_cmp{op}": _make_compare(op) for op in range(len(_CMP_FUNCS))},
    "_tf_link": _guard_link,
    "_tf_method": _guard_method,
    "_tf_slice": _guard_slice,
    "_tf_set": _guard_set_display,
    "_tf_dict": _guard_dict_display,
}
#: Names in a rewritten tree that make its evaluation metered.
_METERED_NAMES = frozenset(_GUARD_FUNCS) | frozenset(_GUARDED_BUILTINS)


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
        if isinstance(node, ast.Name) and node.id in _BUILTINS and id(node) not in allowed:
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


def _call(name: str, args: list[ast.expr], node: ast.AST,
          keywords: list[ast.keyword] | None = None) -> ast.Call:  # fmt: skip
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
        name = _BINOP_GUARDS[type(node.op)][0]
        return _call(name, [node.left, node.right], node)

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        operands = [node.left, *node.comparators]
        guarded = [_needs_guard(operands[i], op, operands[i + 1])
                   for i, op in enumerate(node.ops)]  # fmt: skip
        if not any(guarded):
            return node
        if len(node.ops) == 1:
            op = _CMP_OPS[type(node.ops[0])]
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
            op = _CMP_OPS[type(node.ops[i - 1])] if before else -1
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
    return any(isinstance(n, ast.Name) and n.id in _METERED_NAMES for n in ast.walk(tree))


# --- compiled expressions ----------------------------------------------------

_EVAL_ERRORS = (
    ArithmeticError, TypeError, ValueError, KeyError, IndexError, AttributeError,
    RecursionError, MemoryError, RuntimeError, NameError,
)  # fmt: skip


def _short_repr(value: Any, depth: int = 0) -> str:
    """A repr of at most a few hundred characters, in time bounded the same way.

    Error messages must not repr a value in full: a KeyError's key or
    float()'s argument can be a megabyte string or a large tuple.
    """
    kind = type(value)
    if kind is str:
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if kind is int:
        return repr(value) if value.bit_length() <= 200 else f"<int of {value.bit_length()} bits>"
    if kind in (float, bool, type(None)):
        return repr(value)
    if kind is tuple and depth < 2:
        inner = ", ".join(_short_repr(v, depth + 1) for v in value[:4])
        more = ", ..." if len(value) > 4 else ("," if len(value) == 1 else "")
        return f"({inner}{more})"
    return f"<{kind.__name__}>"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        return _short_repr(exc.args[0])
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
        self._globals: dict[str, Any] = {"__builtins__": {}, **_BUILTINS, **_GUARD_FUNCS}
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
        meter = _LOCAL.meter
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
        if self._metered and _LOCAL.meter.over is not None:
            return self._budget_error()
        return ExpressionEvaluationError(
            f"expression {self.source!r} failed: {kind}: {message}",
            details={"expression": self.source, "type": kind},
        )

    def _budget_error(self) -> ExpressionBudgetError:
        meter = _LOCAL.meter
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
            if self._metered and _LOCAL.meter.over is not None:
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
            raise KeyError(_short_repr(index)) from None


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


__all__ = [
    "MAX_BYTES",
    "MAX_UNITS",
    "Expression",
    "check_expression",
    "compile_expression",
    "spent",
    "truthy",
]
