"""Hostile states for the expression tests, and a bounded evaluation.

States a client can send (JSON, at most the 1 MiB state-size limit) chosen to
make conditions expensive: one huge string, a non-ASCII one, a long list of
ints, nested data, two keys holding equal big structures (so == is deep),
ints at JSON's 4300-digit limit, a dict with many keys.
"""

from __future__ import annotations

import functools
import gc
import random
import time
from typing import Any

import pydantic_core

from trioflow.errors import ExpressionEvaluationError
from trioflow.expressions import MAX_BYTES, MAX_UNITS, Expression, spent

#: A runaway guard, not a speed check: the budget itself is checked exactly,
#: through the meter (units and bytes). An operation the guards forgot would
#: run for seconds (the unguarded attacks took 7 to 59 s); a loaded CI machine
#: can stretch a 10 ms evaluation several times over, so the bound is 0.5 s.
SAFETY_S = 0.5
#: The state-size limit (EngineLimits.max_state_bytes).
MAX_STATE_BYTES = 1 << 20

HOSTILE_STATE_NAMES = [
    "900k-char str",
    "non-ASCII str",
    "150k ints",
    "nested 1 MiB",
    "two equal int lists",
    "two equal nested",
    "4300-digit ints",
    "55k keys",
]


def _shuffled(values: list[Any]) -> list[Any]:
    # The same objects in another order: walking them misses the CPU caches,
    # as walking the result of sorted() does.
    random.Random(7).shuffle(values)
    return values


def _nested(n: int) -> list[Any]:
    return [{"k": i, "v": [i, "s"]} for i in range(n)]


@functools.cache
def hostile_states() -> dict[str, dict[str, Any]]:
    """Built once per test session; keys ``x`` and ``y`` in each."""
    states: dict[str, dict[str, Any]] = {
        "900k-char str": {"x": "a" * 900_000, "y": "a" * 100},
        "non-ASCII str": {"x": "€" * 300_000, "y": "\U0001f600" * 1000},
        "150k ints": {"x": _shuffled(list(range(150_000))), "y": list(range(1000))},
        "nested 1 MiB": {"x": _shuffled(_nested(36_000)), "y": _nested(10)},
        "two equal int lists": {"x": list(range(80_000)), "y": list(range(80_000))},
        "two equal nested": {"x": _nested(18_000), "y": _nested(18_000)},
        "4300-digit ints": {"x": [10**4299 + i for i in range(240)], "y": 10**4299},
        "55k keys": {"x": {f"key{i:06d}": i for i in range(55_000)}, "y": {"a": 1}},
    }
    assert list(states) == HOSTILE_STATE_NAMES
    for name, state in states.items():
        size = len(pydantic_core.to_json(state))
        assert size <= MAX_STATE_BYTES, f"{name} is {size} bytes of JSON"
    return states


def run_bounded(expression: Expression, state: dict[str, Any]) -> Any:
    """Evaluate; return the result or the ExpressionEvaluationError, asserting the budget.

    The garbage collector is off while timing: a collection's pause depends on
    everything the process holds, not on the expression.
    """
    gc.disable()
    started = time.perf_counter()
    try:
        outcome: Any = expression.evaluate(state)
    except ExpressionEvaluationError as exc:
        outcome = exc
    finally:
        elapsed = time.perf_counter() - started
        gc.enable()
    assert elapsed < SAFETY_S, f"{expression.source[:60]!r} took {elapsed * 1000:.1f} ms"
    if expression.metered:
        units, nbytes = spent()
        assert units <= MAX_UNITS
        assert nbytes <= MAX_BYTES
    return outcome
