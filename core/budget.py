"""The evaluation budget of condition expressions: the meter and the weighing of values.

Conditions run on the event loop, so while one evaluates nothing else is
served. Every evaluation of an expression that contains a guard (see
:mod:`core.guards`) gets a fixed budget of work and memory,
:data:`MAX_UNITS` and :data:`MAX_BYTES`, that no expression and no state can
exceed.

Metering is deterministic, not a wall-clock check: a guard estimates the
cost of the operation it is about to perform from cheap facts (lengths
first, a capped walk of the operands only where the cost depends on their
contents), charges the per-thread meter *before* doing the work, and raises
:class:`~core.errors.ExpressionBudgetError` when the charge would pass a
limit. One work unit is about 10 ns of CPU on the reference machine
(``python -m bench.expressions`` prints the calibration). The same
expression over the same state always charges the same, so a run never
fails at random on a loaded machine.
"""

from __future__ import annotations

import threading
from itertools import chain, compress, islice
from typing import Any, NoReturn

from .errors import ExpressionBudgetError

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

# --- the meter ----------------------------------------------------------------


class Meter:
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
        self.meter = Meter()


LOCAL = _Local()


def spent() -> tuple[int, int]:
    """Work units and bytes charged by the last metered evaluation on this thread.

    An expression that contains no guard is not metered and leaves this
    reading alone. For tests and benchmarks.
    """
    meter = LOCAL.meter
    return meter.units, meter.bytes


def _exceeded(meter: Meter, what: str, units: int, nbytes: int) -> NoReturn:
    if meter.over is not None:
        reason = meter.over
    elif units > MAX_UNITS - meter.units:
        reason = (
            f"{what} needs {units:,} work units with {meter.units:,} of {MAX_UNITS:,} already spent"
        )
    else:
        reason = (
            f"{what} needs {nbytes:,} bytes of new objects with {meter.bytes:,} of "
            f"{MAX_BYTES:,} already spent"
        )
    meter.over = reason
    raise ExpressionBudgetError(f"evaluation budget exceeded: {reason}")


def charge(units: int, nbytes: int = 0, what: str = "an operation") -> None:
    """Spend ``units`` of work and ``nbytes`` of memory, or raise before the work."""
    meter = LOCAL.meter
    total = meter.units + units
    total_bytes = meter.bytes + nbytes
    if total > MAX_UNITS or total_bytes > MAX_BYTES or meter.over is not None:
        _exceeded(meter, what, units, nbytes)
    meter.units = total
    meter.bytes = total_bytes


# --- weighing values ------------------------------------------------------------

KEYS_VIEW: type[Any] = type({}.keys())
VALUES_VIEW: type[Any] = type({}.values())
ITEMS_VIEW: type[Any] = type({}.items())
SEQ_TYPES = frozenset({list, tuple, set, frozenset, KEYS_VIEW, VALUES_VIEW, ITEMS_VIEW})
_DICT_TYPES = frozenset({dict})
CONTAINER_TYPES = SEQ_TYPES | _DICT_TYPES
SET_LIKE = frozenset({set, frozenset, KEYS_VIEW, ITEMS_VIEW})
_STR_TYPES = frozenset({str})
_ITEMS_TYPES = frozenset({ITEMS_VIEW})
_INT_TYPES = frozenset({int})
SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})
_WALK_BATCH = 2048
#: Values of at most this many objects are weighed by a Python loop.
_SMALL_WALK = 48


class Weight:
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


def weigh(
    value: Any, what: str, *, stop_size: int | None = None, stop_cost: int | None = None
) -> Weight:
    """Walk ``value`` (nested containers, shared ones once per reference).

    Charges the walk's own cost before each step, so the walk can never pass
    the budget. Stops early, with a partial weight, once ``size`` passes
    ``stop_size`` or ``cost`` passes ``stop_cost``.
    """
    kind = type(value)
    if kind not in CONTAINER_TYPES:
        charge(SMALL_WALK_UNITS, 0, what)
        if kind is str:
            return Weight(1, len(value), 0, True)
        return Weight(1, 0, value.bit_length() if kind is int else 0, True)
    if len(value) <= _SMALL_WALK:
        small = _weigh_small(value, what)
        if small is not None:
            return small
    return _weigh_batches(value, what, stop_size, stop_cost)


def _weigh_small(value: Any, what: str) -> Weight | None:
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
        elif kind in CONTAINER_TYPES:
            if items + len(stack) + len(obj) * (2 if kind is dict else 1) > _SMALL_WALK:
                charge(items * SMALL_WALK_UNITS, 0, what)
                return None
            extend(obj)
            if kind is dict:
                extend(obj.values())
    charge(items * SMALL_WALK_UNITS, 0, what)
    return Weight(items, chars, bits, True)


def _weigh_batches(value: Any, what: str, stop_size: int | None, stop_cost: int | None) -> Weight:
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
        charge(count * WALK_UNITS + WALK_BATCH_UNITS, 0, what)
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
            return Weight(items, chars, bits, False)
        if kinds.isdisjoint(CONTAINER_TYPES):
            continue
        if dict in kinds:
            dicts = batch if single else list(compress(batch, map(_DICT_TYPES.__contains__, types)))
            charge(len(dicts) * (CONTAINER_WALK_UNITS + DICT_WALK_UNITS), 0, what)
            stack.append(chain.from_iterable(map(dict.values, dicts)))
            stack.append(chain.from_iterable(dicts))
            if single:
                continue
        if not kinds.isdisjoint(SEQ_TYPES):
            seqs = batch if single else list(compress(batch, map(SEQ_TYPES.__contains__, types)))
            charge(len(seqs) * CONTAINER_WALK_UNITS, 0, what)
            if ITEMS_VIEW in kinds:  # iterating makes a tuple per entry
                views = compress(batch, map(_ITEMS_TYPES.__contains__, types))
                charge(sum(map(len, views)) * ITER_ALLOC_UNITS, 0, what)
            stack.append(chain.from_iterable(seqs))
    return Weight(items, chars, bits, True)


def scalar_cost(value: Any) -> int | None:
    """Weight units of a scalar without walking, or ``None`` for a container."""
    kind = type(value)
    if kind is str:
        return 1 + len(value) // CMP_CHARS_PER_UNIT
    if kind is int:
        return 1 + int(value.bit_length()) // INT_BITS_PER_UNIT
    if kind in SCALAR_TYPES:
        return 1
    if kind in CONTAINER_TYPES:
        return None
    return 1  # complex and the like: O(1)


def weight_cost(value: Any, what: str) -> int:
    """Weight units of ``value``, walking it only if it is a container."""
    cost = scalar_cost(value)
    return weigh(value, what).cost if cost is None else cost


def str_bytes(length: int, *sources: str) -> int:
    """Estimated size of a new string of ``length`` characters built from ``sources``."""
    if all(map(str.isascii, sources)):
        return 49 + length
    return 80 + 4 * length


def seq_bytes(length: int) -> int:
    return 64 + 8 * length


def int_digits(value: Any) -> int:
    """30-bit digits of an int (0 for anything else)."""
    if type(value) is int:
        return value.bit_length() // 30 + 1
    return 0
