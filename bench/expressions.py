"""Condition expressions: the evaluation budget's calibration and its worst cases.

Conditions run on the event loop, so each evaluation has a budget of
``MAX_UNITS`` work units and ``MAX_BYTES`` of new objects (see
``core/budget.py`` and the Conditions section of ``docs/semantics.md``).
A work unit is meant to be about 10 ns of CPU here, so that the budget is
about 10 ms whatever the expression and the state.

Two parts, both on the ``compiled`` evaluator (``--asteval`` adds the
reference one):

* **calibration**: every class of guarded operation on adversarial inputs,
  each sized up to the largest input that still fits the budget (so the
  operation really runs). A row gives the wall time divided by the units the
  evaluation charged: ns per unit. No class should be far above 10;
* **worst cases**: the most expensive hostile conditions we know, over
  hostile states of at most 1 MiB of JSON, with their wall time and
  tracemalloc peak (measured in a second, separate evaluation). Each must
  finish or be stopped in about the budget.

The garbage collector is off while timing: a collection's pause depends on
everything else the process holds, not on the expression.

Run alone: ``python -m bench.expressions [--quick] [--asteval]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic_core

from ._common import Row, row

#: What a unit should cost here; a class above this makes the budget longer than 10 ms.
TARGET_NS_PER_UNIT = 10.0
#: The state-size limit (EngineLimits.max_state_bytes).
MAX_STATE_BYTES = 1 << 20
#: Input sizes tried, smallest first, doubling until the budget stops the case.
SIZES = [2**k for k in range(6, 23)]

State = dict[str, Any]


@dataclass
class Case:
    kind: str
    label: str
    source: str
    state: Callable[[int], State]


def _rng() -> random.Random:
    return random.Random(1234)


def _ints(n: int) -> list[int]:
    values = list(range(n))
    _rng().shuffle(values)
    return values


def _text(n: int, alphabet: str) -> str:
    rng = _rng()
    return "".join(rng.choice(alphabet) for _ in range(n))


def _shuffled(values: list[Any]) -> list[Any]:
    """The same objects in another order: walking them misses the CPU caches."""
    _rng().shuffle(values)
    return values


def _nested(n: int) -> list[Any]:
    return [{"k": i, "v": [i, "s"]} for i in range(n)]


def _two(make: Callable[[int], Any]) -> Callable[[int], State]:
    return lambda n: {"a": make(n), "b": make(n)}


def _one(make: Callable[[int], Any]) -> Callable[[int], State]:
    return lambda n: {"x": make(n)}


CALIBRATION: list[Case] = [
    # The walk alone: sum() of a list whose first element is not a number
    # weighs the whole list, then fails at once.
    Case("walk", "flat ints", "sum(context['x'])", _one(lambda n: [None, *range(n)])),
    Case("walk", "flat ints, shuffled", "sum(context['x'])", _one(lambda n: [None, *_ints(n)])),
    Case(
        "walk",
        "flat short strs",
        "sum(context['x'])",
        _one(lambda n: [None, *(f"s{i}" for i in range(n))]),
    ),
    Case(
        "walk",
        "flat short strs, shuffled",
        "sum(context['x'])",
        _one(lambda n: [None, *_shuffled([f"s{i}" for i in range(n)])]),
    ),
    Case("walk", "nested dicts", "sum(context['x'])", _one(lambda n: [None, *_nested(n)])),
    Case(
        "walk",
        "nested dicts, shuffled",
        "sum(context['x'])",
        _one(lambda n: [None, *_shuffled(_nested(n))]),
    ),
    Case(
        "walk",
        "dicts of one key",
        "sum(context['x'])",
        _one(lambda n: [None, *({"k": None} for _ in range(n))]),
    ),
    Case(
        "walk",
        "lists of []",
        "sum(context['x'])",
        _one(lambda n: [None, *([[]] for _ in range(n))]),
    ),
    Case(
        "walk",
        "deep lists",
        "sum(context['x'])",
        _one(lambda n: [None, *([[[[[i]]]]] for i in range(n))]),
    ),
    # deep comparisons: the walk of both operands plus the comparison
    Case("compare", "== equal int lists", "context['a'] == context['b']", _two(_ints)),
    Case("compare", "== equal nested dicts", "context['a'] == context['b']", _two(_nested)),
    Case(
        "compare",
        "== equal nested dicts, shuffled",
        "context['a'] == context['b']",
        lambda n: {"a": _shuffled(_nested(n)), "b": _shuffled(_nested(n))},
    ),
    Case(
        "compare",
        "== equal lists of []",
        "context['a'] == context['b']",
        _two(lambda n: [[] for _ in range(n)]),
    ),
    Case(
        "compare",
        "== equal lists of short strs",
        "context['a'] == context['b']",
        _two(lambda n: _shuffled([f"s{i}" for i in range(n)])),
    ),
    Case(
        "compare",
        "< UCS-4 strings",
        "context['a'] < context['b'] + 'a'",
        _two(lambda n: "\U0001f600" * min(n, 99_000)),
    ),
    Case(
        "compare",
        "< strs, common prefix",
        "context['a'] < context['b']",
        lambda n: {
            "a": ["p" * 40 + str(i) for i in range(n)],
            "b": ["p" * 40 + str(i) for i in range(n)] + [""],
        },
    ),
    Case(
        "compare",
        "== dict views",
        "context['a'].items() == context['b'].items()",
        _two(lambda n: {f"k{i}": i for i in range(n)}),
    ),
    # sorting
    Case("sorted", "shuffled ints", "len(sorted(context['x']))", _one(_ints)),
    Case(
        "sorted",
        "random ASCII str",
        "len(sorted(context['x']))",
        _one(lambda n: _text(n, "abcdefghijklmnopqrstuvwxyz")),
    ),
    Case(
        "sorted",
        "random non-Latin-1 str",
        "len(sorted(context['x']))",
        _one(lambda n: _text(n, "αβγδεζηθικλμνξοπρστυφχψω€")),
    ),
    Case(
        "sorted",
        "shuffled pairs",
        "len(sorted(context['x']))",
        _one(lambda n: [[i % 7, i] for i in _ints(n)]),
    ),
    Case(
        "sorted",
        "strs, common prefix",
        "len(sorted(context['x']))",
        _one(lambda n: ["p" * 60 + str(i) for i in _ints(n)]),
    ),
    Case(
        "sorted",
        "key=len",
        "len(sorted(context['x'], key=len))",
        _one(lambda n: [str(i) for i in _ints(n)]),
    ),
    Case("sorted", "key=str", "len(sorted(context['x'], key=str))", _one(_ints)),
    Case(
        "sorted",
        "key=sorted",
        "len(sorted(context['x'], key=sorted))",
        _one(lambda n: [[i % 3, 1, 2] for i in range(n)]),
    ),
    Case(
        "sorted",
        "key=int",
        "len(sorted(context['x'], key=int))",
        _one(lambda n: [str(i) for i in _ints(n)]),
    ),
    Case(
        "sorted",
        "key=float",
        "len(sorted(context['x'], key=float))",
        _one(lambda n: [str(i) for i in _ints(n)]),
    ),
    Case(
        "sorted",
        "key=sum",
        "len(sorted(context['x'], key=sum))",
        _one(lambda n: [[i % 3, 1] for i in range(n)]),
    ),
    Case(
        "sorted",
        "key=any",
        "len(sorted(context['x'], key=any))",
        _one(lambda n: [[i % 3, 1] for i in range(n)]),
    ),
    Case(
        "sorted",
        "dict keys",
        "len(sorted(context['x']))",
        _one(lambda n: {f"k{i}": i for i in _ints(n)}),
    ),
    Case(
        "sorted",
        "items view",
        "len(sorted(context['x'].items()))",
        _one(lambda n: {f"k{i}": i for i in _ints(n)}),
    ),
    # min, max, sum
    Case("min/max", "ints", "min(context['x'])", _one(_ints)),
    Case("min/max", "pairs", "max(context['x'])", _one(lambda n: [[7, i] for i in _ints(n)])),
    Case(
        "min/max",
        "distinct 4000-bit ints",
        "max(context['x'])",
        _one(lambda n: [2**4000 + i for i in range(n)]),
    ),
    Case("min/max", "non-Latin-1 str", "max(context['x'])", _one(lambda n: "€" * n)),
    Case("min/max", "key=abs", "min(context['x'], key=abs)", _one(_ints)),
    Case("min/max", "key=sorted", "max(context['x'], key=sorted)", _one(lambda n: [[3, 1, 2]] * n)),
    Case("min/max", "key=min", "max(context['x'], key=min)", _one(lambda n: [[3, 1, 2]] * n)),
    Case(
        "min/max",
        "key=round",
        "max(context['x'], key=round)",
        _one(lambda n: [i / 7 for i in range(n)]),
    ),
    Case("sum", "ints", "sum(context['x'])", _one(_ints)),
    Case("sum", "floats", "sum(context['x'])", _one(lambda n: [i / 3 for i in range(n)])),
    Case(
        "sum", "4000-bit ints", "sum(context['x'])", _one(lambda n: [2**4000 + i for i in range(n)])
    ),
    Case("any/all", "all(list)", "all(context['x'])", _one(lambda n: [1] * n)),
    Case("any/all", "all(non-Latin-1 str)", "all(context['x'])", _one(lambda n: "€" * n)),
    Case(
        "any/all",
        "all(items)",
        "all(context['x'].items())",
        _one(lambda n: {f"k{i}": i for i in range(n)}),
    ),
    # membership
    Case(
        "in",
        "substring, worst case",
        "context['b'] in context['a']",
        lambda n: {"a": "a" * n, "b": "a" * min(n // 2, 1000) + "b"},
    ),
    Case(
        "in",
        "substring, periodic",
        "context['b'] in context['a']",
        lambda n: {"a": "ab" * (n // 2), "b": "ab" * min(n // 4, 500) + "b"},
    ),
    Case("in", "int in int list", "-1 in context['a']", lambda n: {"a": _ints(n)}),
    Case(
        "in",
        "pair in list of pairs",
        "[-1, -1] in context['a']",
        lambda n: {"a": [[i, i] for i in range(n)]},
    ),
    Case(
        "in",
        "str in values()",
        "'zz' in context['a'].values()",
        lambda n: {"a": {f"k{i}": "zy" for i in range(n)}},
    ),
    # slices, string methods, conversions
    Case("slice", "str[::-1]", "len(context['x'][::-1])", _one(lambda n: "ab" * (n // 2))),
    Case("slice", "list[1:]", "len(context['x'][1:])", _one(_ints)),
    Case("slice", "list[::-1]", "len(context['x'][::-1])", _one(_ints)),
    Case("str method", "upper() ASCII", "len(context['x'].upper())", _one(lambda n: "a" * n)),
    Case(
        "str method", "upper() of ß (expands)", "len(context['x'].upper())", _one(lambda n: "ß" * n)
    ),
    Case(
        "str method",
        "upper() of ﬃ (expands x3)",
        "len(context['x'].upper())",
        _one(lambda n: "\ufb03" * n),
    ),
    Case("str method", "lower() of İ", "len(context['x'].lower())", _one(lambda n: "İ" * n)),
    Case(
        "str method",
        "lower() mixed",
        "len(context['x'].lower())",
        _one(lambda n: _text(n, "AbCd\u03a3\u03c3\u0393€ßİ")),
    ),
    Case(
        "str method",
        "strip(chars) worst",
        "len(context['x'].strip(context['c']))",
        lambda n: {"x": "a" * n, "c": "b" * 999 + "a"},
    ),
    Case(
        "str method",
        "startswith(tuple)",
        "context['x'].startswith(context['t'])",
        lambda n: {"x": "a" * 1000, "t": tuple("a" * (i % 900) for i in range(min(n, 20_000)))},
    ),
    Case("conversion", "int(4300 digits)", "int(context['x']) > 0", _one(lambda n: "9" * 4300)),
    Case("conversion", "int(hex)", "int(context['x'], 16) > 0", _one(lambda n: "f" * n)),
    Case("conversion", "int(padded)", "int(context['x']) > 0", _one(lambda n: " " * n + "7")),
    Case("conversion", "float(long)", "float(context['x']) > 0", _one(lambda n: "1" * n)),
    Case(
        "conversion",
        "float() error, control chars",
        "float(context['x']) > 0",
        _one(lambda n: "\x00" * n),
    ),
    Case(
        "conversion",
        "float() error, astral chars",
        "float(context['x']) > 0",
        _one(lambda n: "\U000e0001" * n),
    ),
    Case(
        "conversion",
        "int() error, astral chars",
        "int(context['x']) > 0",
        _one(lambda n: "\U000e0001" * n),
    ),
    Case(
        "conversion", "str(4000-digit int)", "len(str(context['x']))", _one(lambda n: 10**3999 + 7)
    ),
    # arithmetic
    Case(
        "arithmetic",
        "big // big",
        "context['a'] // context['b']",
        lambda n: {"a": 10**4299 + 1, "b": 10**2100 + 3},
    ),
    Case(
        "arithmetic",
        "big % big",
        "context['a'] % context['b']",
        lambda n: {"a": 10**4299 + 1, "b": 10**2100 + 3},
    ),
    Case("arithmetic", "** to 4096 bits", "context['a'] ** 2", lambda n: {"a": 2**2040 + 1}),
    Case(
        "arithmetic",
        "list + list",
        "len(context['a'] + context['b'])",
        _two(lambda n: list(range(min(n, 50_000)))),
    ),
    Case("arithmetic", "str * n", "len(context['a'] * 99)", lambda n: {"a": "x" * 1000}),
    Case("arithmetic", "list * n", "len(context['a'] * 99)", lambda n: {"a": [1] * 1000}),
    # set operations and displays
    Case(
        "set op",
        "keys | keys",
        "len(context['a'].keys() | context['b'].keys())",
        _two(lambda n: {f"k{i}": i for i in range(n)}),
    ),
    Case(
        "set op",
        "items | items",
        "len(context['a'].items() | context['b'].items())",
        _two(lambda n: {f"k{i}": i for i in range(n)}),
    ),
    Case(
        "set op",
        "keys & list",
        "len(context['a'].keys() & context['b'])",
        lambda n: {"a": {f"k{i}": i for i in range(n)}, "b": [f"k{i}" for i in range(n)]},
    ),
    Case(
        "set op",
        "keys - list",
        "len(context['a'].keys() - context['b'])",
        lambda n: {"a": {f"k{i}": i for i in range(n)}, "b": [f"k{i}" for i in range(n)]},
    ),
    Case(
        "display",
        "set of big tuples",
        "len({context['a'] * 1, context['a'] * 1})",
        lambda n: {"a": tuple(range(min(n, 99_999)))},
    ),
]


def _json_size(state: State) -> int:
    try:
        return len(pydantic_core.to_json(state))
    except pydantic_core.PydanticSerializationError:
        return -1


def _time(expr: Any, state: State, reps: int) -> tuple[list[float], str]:
    from trioflow.errors import ExpressionBudgetError, ExpressionEvaluationError

    times = []
    outcome = "ok"
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            try:
                expr.evaluate(state)
                outcome = "ok"
            except ExpressionBudgetError:
                outcome = "budget"
            except ExpressionEvaluationError as exc:
                outcome = str(exc.details.get("type", "error"))
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times, outcome


def _peak(expr: Any, state: State) -> int:
    from trioflow.errors import ExpressionEvaluationError

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with contextlib.suppress(ExpressionEvaluationError):
            expr.evaluate(state)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def calibrate(case: Case, evaluator: str, reps: int) -> Row:
    """The largest size of ``case`` that fits the budget, timed; ns per unit charged."""
    from trioflow.expressions import compile_expression, spent

    expr = compile_expression(case.source, evaluator=evaluator)  # type: ignore[arg-type]
    fitting: tuple[int, State] | None = None
    for size in SIZES:
        state = case.state(size)
        if _time(expr, state, 1)[1] == "budget":
            break
        fitting = (size, state)
    if fitting is not None:
        size, state = fitting
        times, outcome = _time(expr, state, reps)
        units, nbytes = spent()
        per_unit = [t * 1e9 / max(units, 1) for t in times]
        med = statistics.median(per_unit)
        note = (
            f"n={size:,}; {units:,} units, {nbytes / 2**20:.2f} MiB charged; "
            f"{statistics.median(times) * 1e3:.2f} ms; {outcome}"
        )
        return Row(
            "expressions",
            f"{evaluator}: {case.kind}: {case.label}",
            "per unit",
            "ns",
            med,
            min(per_unit),
            max(per_unit),
            len(per_unit),
            target=f"<= {TARGET_NS_PER_UNIT:.0f}",
            met=med <= TARGET_NS_PER_UNIT * 1.5,
            note=note,
        )
    return Row(
        "expressions",
        f"{evaluator}: {case.kind}: {case.label}",
        "-",
        "-",
        note="stopped by the budget at every size",
    )


# -- worst cases ---------------------------------------------------------------------


def _hostile_states() -> dict[str, State]:
    """States of at most 1 MiB of JSON chosen to make conditions expensive."""
    states = {
        "900k-char str": {"x": "a" * 900_000, "y": "a" * 100},
        "300k-char non-Latin-1 str": {"x": "€" * 300_000, "y": "\U0001f600" * 1000},
        "150k ints": {"x": _ints(150_000), "y": list(range(1000))},
        "nested ~1 MiB": {"x": _nested(36_000), "y": _nested(10)},
        "two equal int lists": {"x": list(range(80_000)), "y": list(range(80_000))},
        "two equal nested": {"x": _nested(18_000), "y": _nested(18_000)},
        "240 4300-digit ints": {"x": [10**4299 + i for i in range(240)], "y": 10**4299},
        "many keys": {"x": {f"key{i:06d}": i for i in range(55_000)}, "y": {"a": 1}},
    }
    for name, state in states.items():
        size = _json_size(state)
        if size > MAX_STATE_BYTES:
            raise RuntimeError(f"hostile state {name!r} is {size} bytes of JSON")
    return states


#: Conditions that pass validation and are as expensive as we could make them.
WORST: list[str] = [
    "len(sorted(str(sorted(str(sorted(str(sorted(str(context))))))))) > 0",
    "len(sorted(context['x'])) > 0",
    "len(sorted(context['x'], key=str)) > 0",
    "len(sorted(context['x'], key=sorted)) > 0",
    "sorted(context['x']) == sorted(context['y'])",
    "context['x'] == context['y']",
    "context['x'] < context['y']",
    "[context['x'], context['x'], context['x']] == [context['y'], context['y'], context['y']]",
    "min(context['x']) < max(context['x']) < sum(context['x'])",
    "max(context['x'], key=str) != min(context['x'], key=str)",
    "context['y'] in context['x'] and context['y'] in context['x'] "
    "and context['y'] in context['x']",
    "[context['x']] * 50 == [context['x']] * 50",
    "len(context['x'][::-1][::-1][::-1][::-1][::-1][::-1][::-1][::-1]) > 0",
    "len(context['x'].upper().lower().upper().lower().upper().lower()) > 0",
    "context['x'].strip(context['x']) == ''",
    "len(context['x'] + context['x']) > 0",
    "len(context['x'].keys() | context['x'].keys()) > 0",
    "len(context['x'].items() | context['y'].items() | context['x'].items()) > 0",
    "len(context.items() | context.items()) > 0",
    "len({context['x'][1:], context['x'][2:], context['x'][3:], context['x'][4:]}) > 0",
    "any([context['x'] == context['y'], context['y'] == context['x'], "
    "context['x'] == context['y'], context['y'] == context['x']])",
    "int(str(context['y'])) > 0",
    "float(context['x']) > 0",
    "sum([context['y']] * 20) > 0",
    "context['x'] // context['y'] > 0",
    "len([str(context['y'])] * 20) > 0",
    "all(context['x'].items()) and all(context['x'].items()) and all(context['x'])",
    "len(sorted(context.items())) + len(sorted(context.items())) > 0",
    "(context['x'] < context['y']) < (context['y'] < context['x']) < context['x']",
]


def worst_cases(evaluator: str, reps: int) -> list[Row]:
    """One row per hostile condition, on the state where it is slowest (median time)."""
    from trioflow.errors import ExpressionError
    from trioflow.expressions import compile_expression, spent

    rows = []
    states = _hostile_states()
    overall: list[tuple[float, float, float, str]] = []
    for source in WORST:
        try:
            expr = compile_expression(source, evaluator=evaluator)  # type: ignore[arg-type]
        except ExpressionError as exc:
            rows.append(
                Row(
                    "expressions",
                    f"{evaluator}: worst: {source[:70]}",
                    "-",
                    "-",
                    note=f"rejected: {exc.reason}",
                )
            )
            continue
        results = []
        for name, state in states.items():
            times, outcome = _time(expr, state, reps)
            units, _ = spent()
            ms = [t * 1e3 for t in times]
            results.append(
                (
                    statistics.median(ms),
                    ms,
                    _peak(expr, state) / 2**20,
                    f"{name}: {outcome}, {units:,} units",
                )
            )
        slowest = max(results, key=lambda r: r[0])
        peak = max(r[2] for r in results)
        overall.append((slowest[0], max(slowest[1]), peak, source))
        rows.append(
            row(
                "expressions",
                f"{evaluator}: worst: {source[:70]}",
                "wall time",
                "ms",
                slowest[1],
                target="<= ~10",
                met=slowest[0] <= 12,
                note=f"slowest on {slowest[3]}; peak {peak:.2f} MiB",
            )
        )
    if overall:
        slow = max(overall)
        spike = max(overall, key=lambda r: r[1])
        heavy = max(overall, key=lambda r: r[2])
        label = f"{evaluator}: worst of {len(WORST)} conditions x {len(states)} states"
        rows.append(
            Row(
                "expressions",
                label,
                "wall time",
                "ms",
                slow[0],
                hi=spike[1],
                target="<= ~10",
                met=slow[0] <= 12,
                note=f"median {slow[3][:60]}; max {spike[3][:60]}",
            )
        )
        rows.append(
            Row(
                "expressions",
                label,
                "tracemalloc peak",
                "MiB",
                heavy[2],
                target="<= 16",
                met=heavy[2] <= 16.5,
                note=heavy[3][:90],
            )
        )
    return rows


def run(quick: bool = False, evaluators: tuple[str, ...] = ("compiled",)) -> list[Row]:
    reps = 3 if quick else 7
    rows: list[Row] = []
    for evaluator in evaluators:
        rows += [calibrate(case, evaluator, reps) for case in CALIBRATION]
        rows += worst_cases(evaluator, 2 if quick else 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--asteval", action="store_true", help="also the asteval evaluator")
    args = parser.parse_args()
    from .__main__ import print_table

    evaluators = ("compiled", "asteval") if args.asteval else ("compiled",)
    print_table(run(args.quick, evaluators))


if __name__ == "__main__":
    main()
