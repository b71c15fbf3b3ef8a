"""The guards: every operation of an expression whose cost depends on its operands.

:mod:`core.expressions` rewrites the checked tree so that these run instead
of the plain operations. Each guard charges the evaluation's budget
(:mod:`core.budget`) before it does the work, and refuses results over the
size caps. What is guarded (everything else is O(1) or bounded by the
expression's size):

* every binary operator (``+ - * / // % ** << >> & | ^``), including set
  operations on dict views;
* comparisons whose cost depends on the operands' size: deep ``==`` and
  ordering of containers, ``in``/``not in`` over a container or a string;
* slices, set and dict displays (they hash their elements);
* the builtins ``min max sum any all sorted str int float`` (``len abs bool
  round`` are O(1) on the values an expression can build) and ``key=``
  callbacks, charged per element;
* the string methods ``lower upper strip startswith endswith``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from functools import partial
from typing import Any

from .budget import (
    CASE_UNITS,
    CHARS_PER_UNIT,
    CMP_CHARS_PER_UNIT,
    CMP_UNITS,
    CONTAINER_TYPES,
    COPY_UNITS,
    GUARDED_KEY_CALL_UNITS,
    INT_CHARS_PER_UNIT,
    INT_DEC_SQ_PER_UNIT,
    INT_QUAD_PER_UNIT,
    INT_STR_SQ_PER_UNIT,
    ITEMS_VIEW,
    ITER_ALLOC_UNITS,
    ITER_UNITS,
    KEY_CALL_UNITS,
    KEYS_VIEW,
    LOCAL,
    MAX_UNITS,
    SEARCH_CHARS_PER_UNIT,
    SET_LIKE,
    SET_UNITS,
    SORT_UNITS,
    STRIP_PAIRS_PER_UNIT,
    VALUES_VIEW,
    charge,
    int_digits,
    scalar_cost,
    seq_bytes,
    str_bytes,
    weigh,
    weight_cost,
)

#: Largest integer result (in bits) any guarded operator or ``int()`` may produce.
MAX_INT_BITS = 4096
#: Largest string/list/tuple any guarded operator may produce (items, nested
#: items and string characters included).
MAX_SEQUENCE_LENGTH = 100_000
MAX_SHIFT = 1024
MAX_ROUND_DIGITS = 64


# --- arithmetic guards ----------------------------------------------------------


def _int_bits(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return value.bit_length()


def _is_seq(value: Any) -> bool:
    return isinstance(value, str | bytes | list | tuple)


def _charge_int_quad(left: Any, right: Any, what: str) -> None:
    work = int_digits(left) * int_digits(right)
    if work > 4 * INT_QUAD_PER_UNIT:
        charge(work // INT_QUAD_PER_UNIT, 0, what)


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
        digits = int_digits(base) * exp
        charge(digits * digits // INT_QUAD_PER_UNIT + 1, 4 * digits + 32, "**")
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
            if weigh(seq, "*", stop_size=stop).size > stop:
                raise OverflowError(f"repetition would exceed {MAX_SEQUENCE_LENGTH} items")
        if type(seq) is str:
            charge(length // CHARS_PER_UNIT + 1, str_bytes(length, seq), "*")
        else:
            charge(length * COPY_UNITS + 1, seq_bytes(length), "*")
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
            charge(length // CHARS_PER_UNIT + 1, str_bytes(length, left, right), "+")
        else:
            stop = MAX_SEQUENCE_LENGTH
            size = weigh(left, "+", stop_size=stop).size
            if size > stop or size + weigh(right, "+", stop_size=stop - size).size > stop:
                raise OverflowError(f"concatenation would exceed {MAX_SEQUENCE_LENGTH} items")
            charge(length * COPY_UNITS + 1, seq_bytes(length), "+")
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
    if kind is KEYS_VIEW:
        # Keys are hashed already (the dict stores their hashes).
        charge(len(value) * SET_UNITS + 1, 0, what)
        return len(value)
    if kind is str:
        charge(len(value) * SET_UNITS + 1, 0, what)
        return len(value)
    if kind in CONTAINER_TYPES:
        weight = weigh(value, what)
        charge(len(value) * SET_UNITS + weight.cost * CMP_UNITS, 0, what)
        return len(value)
    return 0


_VIEWS = (KEYS_VIEW, ITEMS_VIEW)


def _guard_set_op(op: Callable[[Any, Any], Any], symbol: str, left: Any, right: Any) -> Any:
    lt, rt = type(left), type(right)
    if lt in SET_LIKE or rt in SET_LIKE:
        # A dict view's |, ^ and (with the view on the right) - build a set
        # from the other operand. Inserting an arbitrary list into a set can
        # take quadratic time (ints and floats with equal hashes are easy to
        # build), so that operand must be a set or a dict view already.
        builds = (symbol in "|^" and (lt in _VIEWS or rt in _VIEWS)) or (
            symbol == "-" and rt in _VIEWS
        )
        if builds and not (lt in SET_LIKE and rt in SET_LIKE):
            other = rt if lt in SET_LIKE else lt
            raise TypeError(
                f"{symbol} with a dict view takes another dict view or a set, not {other.__name__}"
            )
        what = f"the set operation {symbol}"
        count = _charge_set_operand(left, what) + _charge_set_operand(right, what)
        # Entries of the new set, and a tuple per entry of an items view.
        per_item = 120 if ITEMS_VIEW in (lt, rt) else 48
        charge(0, 232 + per_item * count, what)
    else:
        digits = max(int_digits(left), int_digits(right))
        if digits > 64:
            charge(digits // 64, 4 * digits, symbol)
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


BINOP_GUARDS: dict[type[ast.operator], tuple[str, Callable[[Any, Any], Any]]] = {
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
CMP_OPS: dict[type[ast.cmpop], int] = {
    ast.Eq: _EQ,
    ast.NotEq: _NE,
    ast.Lt: _LT,
    ast.LtE: _LE,
    ast.Gt: _GT,
    ast.GtE: _GE,
    ast.In: _IN,
    ast.NotIn: _NOT_IN,
}
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
_CMP_WHAT = tuple(
    f"the comparison {name}" for name in ("==", "!=", "<", "<=", ">", ">=", "in", "not in")
)


def _charge_contains(item: Any, container: Any, what: str) -> None:
    """Charge ``item in container`` before it runs."""
    kind = type(container)
    if kind is str:
        if type(item) is str and len(item) <= len(container):
            charge((len(container) + len(item)) // SEARCH_CHARS_PER_UNIT + 1, 0, what)
        return
    if (kind is dict or kind is KEYS_VIEW) and type(item) is str and len(item) < 64:
        return  # the common case, and O(1): 'k' in context
    if kind in (list, tuple, VALUES_VIEW):
        # Each element is compared with the item: a comparison costs at most
        # the item's weight, and at most the element's, so the scan costs at
        # most n * weight(item) and at most weight(container).
        count = len(container)
        item_cost = scalar_cost(item)
        if item_cost is None:
            item_cost = weigh(item, what).cost
        scan = count * (1 + item_cost) * CMP_UNITS // 2
        if scan > MAX_UNITS - LOCAL.meter.units:
            scan = weigh(container, what).cost * CMP_UNITS
        charge(scan + 1, 0, what)
        return
    if kind in CONTAINER_TYPES:
        # A hash lookup: hashing the item (a tuple hashes all it holds) and
        # comparing it with an entry of equal hash.
        charge(weight_cost(item, what) * CMP_UNITS, 0, what)


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
                    charge(len(left) // (CMP_CHARS_PER_UNIT * 8) + 1, 0, what)
            elif min(len(left), len(right)) > 64:
                # Ordering compares character by character unless both are
                # ASCII (memcmp).
                chars = min(len(left), len(right))
                fast = left.isascii() and right.isascii()
                charge(chars // (CMP_CHARS_PER_UNIT * (8 if fast else 1)) + 1, 0, what)
            return
        if kind in (list, tuple) or (kind is dict and equality):
            if equality and len(left) != len(right):
                return  # decided by the lengths
            # Element by element up to the first difference: at most the
            # lighter operand's weight.
            first = weigh(left, what)
            second = weigh(right, what, stop_cost=first.cost)
            cost = min(first.cost, second.cost) if second.complete else first.cost
            charge(cost * CMP_UNITS + 1, 0, what)
            return
    if kind in SET_LIKE and type(right) in SET_LIKE:
        if equality and len(left) != len(right):
            return
        cost = weigh(left, what).cost + weigh(right, what).cost
        charge(cost * CMP_UNITS + 1, 0, what)


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
    slots = LOCAL.meter.slots
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
    if kind is ITEMS_VIEW or (kind is str and not iterable.isascii()):
        return count * ITER_ALLOC_UNITS + 1
    return count * ITER_UNITS + 1


def _sized(value: Any) -> bool:
    """Every iterable an expression can reach has a length (no generators, no ranges)."""
    return hasattr(type(value), "__len__")


def _materialize(iterable: Any, what: str) -> list[Any]:
    """A new list of the elements of a sized iterable, charged."""
    count = len(iterable)
    extra = 0
    if type(iterable) is ITEMS_VIEW:
        extra = 64 * count  # a tuple per entry
    elif type(iterable) is str and not iterable.isascii():
        extra = 80 * count  # a str per character
    charge(_iter_units(iterable), seq_bytes(count) + extra, what)
    return list(iterable)


def _element_cost(iterable: Any, what: str) -> int:
    """Weight units of comparing every element of ``iterable`` once."""
    if type(iterable) is str:
        return len(iterable) + 1  # one-character strings
    return weigh(iterable, what).cost


def _charge_keys(count: int, key: Any, what: str) -> None:
    """Charge ``count`` calls of a ``key=`` function (guarded keys also charge their work)."""
    per_call = GUARDED_KEY_CALL_UNITS if key in _GUARDED_KEYS else KEY_CALL_UNITS
    charge(count * per_call + 1, seq_bytes(count) + 32 * count, what)


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
        charge(_iter_units(iterable) + _element_cost(elements, what) * CMP_UNITS, 0, what)
        return func(iterable, **extra)
    _charge_keys(len(iterable), key, what)
    items = iterable if type(iterable) in (list, tuple) else _materialize(iterable, what)
    keys = list(map(key, items))
    charge(weigh(keys, what).cost * CMP_UNITS + 1, 0, what)
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
        charge(_element_cost(elements, what) * levels * SORT_UNITS + 1, 0, what)
        items = _materialize(iterable, what)
        items.sort(reverse=reverse)
        return items
    _charge_keys(count, key, what)
    items = _materialize(iterable, what)
    keys = list(map(key, items))
    charge(weigh(keys, what).cost * levels * SORT_UNITS + 1, 2 * seq_bytes(count), what)
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
        if type(iterable) in (list, tuple, VALUES_VIEW, set, frozenset):
            charge(weigh(iterable, "sum()").cost * CMP_UNITS + 1, 0, "sum()")
        else:  # str, dict, keys and items: the first element is no number
            charge(_iter_units(iterable), 0, "sum()")
    return sum(iterable, start)


def _guard_any(iterable: Any, /) -> bool:
    if _sized(iterable):
        charge(_iter_units(iterable), 0, "any()")
    return any(iterable)


def _guard_all(iterable: Any, /) -> bool:
    if _sized(iterable):
        charge(_iter_units(iterable), 0, "all()")
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
            f"str() in expressions takes a string, number, bool or None, not {type(value).__name__}"
        )
    if type(value) is int:
        digits = int_digits(value)
        if digits > 8:
            charge(digits * digits // INT_STR_SQ_PER_UNIT + 1, 49 + 10 * digits, "str()")
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
    charge(units + 1, nbytes + 64, what)


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
            raise ValueError(f"could not convert string to float: {short_repr(text)}") from None
    return float(*args)


GUARDED_BUILTINS: dict[str, Any] = {
    "min": _guard_min,
    "max": _guard_max,
    "sum": _guard_sum,
    "any": _guard_any,
    "all": _guard_all,
    "sorted": _guard_sorted,
    "str": _guard_str,
    "int": _guard_int,
    "float": _guard_float,
}
#: O(1) on every value an expression can build (ints are at most a few
#: thousand bits): called directly.
_PLAIN_BUILTINS: dict[str, Any] = {"len": len, "abs": abs, "bool": bool, "round": _safe_round}
BUILTINS: dict[str, Any] = {**_PLAIN_BUILTINS, **GUARDED_BUILTINS}
_GUARDED_KEYS = frozenset({*GUARDED_BUILTINS.values(), _safe_round})


# --- string methods, slices, displays -----------------------------------------------


def _str_case(method: Callable[[str], str], text: str) -> str:
    length = len(text)
    if text.isascii():
        charge(length // (CHARS_PER_UNIT * 4) + 1, 49 + length, "lower()/upper()")
    else:
        charge(length * CASE_UNITS + 1, 80 + 12 * length, "lower()/upper()")
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
    charge(units, str_bytes(length, text), "strip()")
    return text.strip(chars)


def _str_affix(method: Callable[..., bool], text: str, affix: Any, /, *args: Any) -> bool:
    what = "startswith()/endswith()"
    if type(affix) is tuple:
        charge(weigh(affix, what).cost + 1, 0, what)
    elif type(affix) is str and len(affix) > 1024:
        charge(len(affix) // (CMP_CHARS_PER_UNIT * 8) + 1, 0, what)
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
            charge(length // CHARS_PER_UNIT + 1, str_bytes(length, value), "a slice")
        else:
            charge(length * COPY_UNITS + 1, seq_bytes(length), "a slice")
    return value[index]


def _guard_set_display(*elements: Any) -> set[Any]:
    units = 1
    for element in elements:
        units += weight_cost(element, "a set display") * CMP_UNITS
    charge(units, 232 + 48 * len(elements), "a set display")
    return set(elements)


def _guard_dict_display(*pairs: Any) -> dict[Any, Any]:
    keys = pairs[::2]
    units = 1
    for key in keys:
        units += weight_cost(key, "a dict display") * CMP_UNITS
    charge(units, 232 + 64 * len(keys), "a dict display")
    return dict(zip(keys, pairs[1::2], strict=True))


GUARD_FUNCS: dict[str, Callable[..., Any]] = {
    **{name: func for name, func in BINOP_GUARDS.values()},
    **{f"_tf_cmp{op}": _make_compare(op) for op in range(len(_CMP_FUNCS))},
    "_tf_link": _guard_link,
    "_tf_method": _guard_method,
    "_tf_slice": _guard_slice,
    "_tf_set": _guard_set_display,
    "_tf_dict": _guard_dict_display,
}
#: Names in a rewritten tree that make its evaluation metered.
METERED_NAMES = frozenset(GUARD_FUNCS) | frozenset(GUARDED_BUILTINS)


def short_repr(value: Any, depth: int = 0) -> str:
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
        inner = ", ".join(short_repr(v, depth + 1) for v in value[:4])
        more = ", ..." if len(value) > 4 else ("," if len(value) == 1 else "")
        return f"({inner}{more})"
    return f"<{kind.__name__}>"
