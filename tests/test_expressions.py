"""The expression sandbox: escapes and bombs are stopped, ordinary conditions work.

Every case runs through both evaluators: the fast ``compiled`` one is safe
only because of the whitelist and the guards, so it must stop exactly what
the reference ``asteval`` one stops. Bombs run over a small state and over
hostile states at the state-size limit, and must be stopped within the
evaluation budget (tests/test_expression_budget.py checks the budget itself
on random expressions).
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from hostile_states import HOSTILE_STATE_NAMES, SAFETY_S, hostile_states, run_bounded

from trioflow.errors import ExpressionError, ExpressionEvaluationError
from trioflow.expressions import MAX_EXPRESSION_LENGTH, compile_expression, truthy

EVALUATORS = ["compiled", "asteval"]

# Seeds: values an expression builds from literals, each within the result caps.
_S = "('a'*99999)"
_U = "('€'*99999)"
_L = "([0]*99999)"
_LL = "([[0]*300]*300)"

#: Sandbox escapes and resource bombs. Each must be rejected at compile time or
#: fail fast at evaluation time.
HOSTILE = [
    # walks through dunders to object.__subclasses__ and friends
    "().__class__.__bases__[0].__subclasses__()",
    "context.__class__",
    "''.__class__.__mro__",
    "(1).__class__.__base__",
    "context.get.__self__",
    "state.get('x').__class__.__init__.__globals__",
    "context['__class__'].__base__",
    # str.format and f-strings
    "'{0.__class__}'.format(context)",
    "'{:>999999999}'.format(1)",
    "f'{context}'",
    "f'{1:>999999999}'",
    "'%0999999999d' % 1",
    "'%s' % context",
    # builtins that are not whitelisted
    "open('/etc/passwd')",
    "getattr(context, 'get')",
    "__import__('os')",
    "__import__('os').system('true')",
    "eval('1')",
    "exec('1')",
    "compile('1', 'x', 'eval')",
    "globals()",
    "vars()",
    "locals()",
    "dir()",
    "type(1)",
    "__builtins__",
    "__builtins__['open']",
    "breakpoint()",
    "help()",
    "input()",
    "print(1)",
    "iter([1])",
    "range(10)",
    # arithmetic bombs
    "9**9**9**9",
    "(10**9999)**9999",
    "10**10**10",
    "-(10**1000)**10",
    "2**-10**10",
    "1.5**10**10",
    "10**4000*10**4000",
    "1<<10**10",
    "abs(-10**10**10)",
    "str(10**4000)",
    "int('9'*5000)",
    "round(1, -10**9)",
    "round(1.5, 10**10)",
    "[9**9**9**9]",
    "[0, 9**9**9]",
    "{'k': 9**9**9}",
    # sequence bombs
    "'a'*10**10",
    "[0]*10**10",
    "'a'*99999*99999",
    "'a'*99999 + 'b'*99999",
    "[1]*99999 + [1]*99999",
    "max([1]*10**9)",
    "sum(range(10**11))",
    "sorted([[1]*99999]*99999)",
    "max([[1]*99999]*99999)",
    "str(['a'*99999]*99999)",
    "[1]*99998 + [2] in [[1]*99999]*99999",
    "sum([[1]*99999]*99999, [])",
    "sum([[1], [2]], [])",
    "[{'k': [1]*99999}]*99999",
    "str([context.values()]*99999)",
    # comprehensions, generators, lambdas, assignment
    "[x for x in context]",
    "{x for x in context}",
    "{x: 1 for x in context}",
    "sum(x for x in [1, 2])",
    "(lambda: 1)()",
    "(lambda f: f(f))(lambda f: f(f))",
    "(x := 1)",
    "[*context]",
    "max(**context)",
    # attribute access outside method calls, and mutating or unlisted methods
    "context.get",
    "context.keys",
    "context.pop('x')",
    "context.update({})",
    "context.clear()",
    "context.setdefault('x', 1)",
    "[].append(1)",
    "'x'.join(['a'])",
    "'x'.format()",
    # size limits and parser stress
    "1 + " * 300 + "1",
    "+".join(["1"] * 150),
    "(" * 500 + "1" + ")" * 500,
    "(" * 300 + "1" + ")" * 300,
    "[" * 300 + "]" * 300,
    "-" * 900 + "1",
    "not " * 240 + "1",
    "context.get('a'," * 60 + "1" + ")" * 60,
    "",
    "   ",
    "1; 2",
    "import os",
    "yield 1",
    "await context",
    "b'bytes'",
    "1j",
    "...",
    # str() of a container is the repr amplifier: refused. The reported attacks:
    "len(sorted(str(sorted(str(sorted(str(sorted(str(context))))))))) > 0",
    "len(str(sorted(str(sorted(str(sorted(str(sorted(str(sorted(str(['a'*99999]))))))))))))",
    "len(str(sorted(str(sorted(str(context)))))) > 0",
    "str(context)",
    "str(context.items())",
    f"str({_L})",
    f"str({{'k': {_L}}})",
    "str((context, context))",
    # sorted(): n log n comparisons, each up to the elements' size
    f"sorted({_S})",
    f"sorted({_U})",
    f"len(sorted({_L})) > 0",
    f"sorted({_LL})",
    f"sorted({_L}, reverse=True)",
    f"sorted({_L}, key=str)",
    f"sorted({_L}, key=abs)",
    f"sorted({_L}, key=round)",
    f"sorted({_L}, key=bool)",
    f"sorted({_L}, key=sorted)",
    "sorted([[0]]*99999, key=sorted)",
    f"sorted(sorted(sorted({_S})))",
    f"sorted({_S}.upper())",
    f"sorted({_U}.lower())",
    f"sorted({_S}[::-1])",
    "sorted(['a'*999]*99, key=sorted)",
    f"sorted({_L} + {_L})",
    f"sorted({_L}) == sorted({_L})",
    "sorted([0.5]*99999)",
    "sorted([None]*99999)",
    "sorted([[0]*30]*3000)",
    "sorted([(0, 'a')]*99999)",
    "sorted([{'k': 0}]*99999, key=len)",
    "sorted(['1.5']*99999, key=float)",
    f"sorted({_L}[::2] + {_L}[1::2])",
    f"sorted(sorted({_L}) + sorted({_L}))",
    f"max([sorted({_L}), sorted({_L})])",
    f"sum(sorted({_L}))",
    f"len(sorted({_S})) + len(sorted({_S}))",
    "sorted([[[0]*300]*300], key=sorted)",
    "max(['a'*300]*300, key=sorted)",
    # min(), max(), sum(), any(), all() over large inputs, and key= callbacks
    f"max({_L}, key=str)",
    f"min({_L}, key=str)",
    f"max({_LL}, key=sorted)",
    f"max({_L}, key=sorted)",
    f"min({_U}, key=str)",
    f"max([{_S}], key=sorted)",
    f"max({_L}, default=0, key=str)",
    f"max({_S}) <= min({_S}) <= max({_U}) <= min({_U})",
    f"min({_L}) + max({_L}) + min({_L}) + max({_L})",
    f"max({_LL}) < min({_LL}) < max({_LL})",
    f"max([{_LL}, {_LL}], key=max)",
    "min([10**1200]*99999)",
    f"sum({_L}) + sum({_L}) + sum({_L}) + sum({_L})",
    "sum([10**1200]*99999)",
    f"sum({_LL}, 0)",
    "sum([0.5]*99999) + sum([0.5]*99999) + sum([0.5]*99999)",
    f"any({_L}) or any({_L}) or any({_L}) or any({_L}) or any({_L}) or any({_L})",
    f"all({_S}) and all({_S}) and all({_U}) and all({_U}) and all({_U})",
    f"any([{_S}]) and all({_U}) and all({_U}) and all({_U}) and all({_U})",
    # deep comparisons: == and ordering walk both operands
    f"{_L} == {_L}",
    f"{_LL} == {_LL}",
    f"{_LL} < {_LL}",
    f"{_L} < {_L} < {_L}",
    f"{_L} <= {_L} >= {_L} != 0",
    f"[{_L}] == [{_L}]",
    f"{{'k': {_L}}} == {{'k': {_L}}}",
    f"({_L}, 1) == ({_L}, 1)",
    "[[0]*300]*300 == [[0]*300]*300 == [[0]*300]*300",
    f"({_L}) in {{1: 2}} or {_L} == {_L}",
    f"{_L}[1:] == {_L}[:-1] == {_L}[1:]",
    f"({_S} < {_S} + 'b') + ({_LL} < {_LL})",
    # in over large containers
    f"{_L} in [{_L}, {_L}]",
    f"[0]*99998 + [1] in {_LL}",
    f"-1 in {_L} or -1 in {_L} or -1 in {_L} or -1 in {_L} or -1 in {_L} or -1 in {_L}",
    "(1,) * 99999 in {(1,) * 99999: 1}",
    f"{_L} not in [{_LL}, {_L}, {_L}]",
    # slices copy
    f"len({_L}[::-1][::-1][::-1][::-1][::-1][::-1][::-1][::-1][::-1][::-1]) > 0",
    # string methods: case mappings can triple a string; strip(chars) is n*m
    f"{_U}.upper().lower().upper().lower().upper().lower().upper().lower() == 1",
    "('ß'*99999).upper() + ('ß'*99999).upper()",
    "('\\ufb03'*99999).upper().lower() == ('\\ufb03'*99999).upper()",
    "('İ'*99999).lower() + ('İ'*99999).lower()",
    f"{_S}.strip({_S}[:90000] + 'b') == 1",
    f"{_S}.startswith(({_S}, {_S}, {_S})) and 1/0",
    "'a'.strip(chars='a')",
    # conversions of long strings and big ints
    "int('f'*99999, 16)",
    "int(' '*99999 + 'x')",
    "float('x'*99999)",
    "float(' '*99999 + 'x')",
    "int('9'*4300) + int('9'*4300)",
    "int('1'*5000, 2) * 2",
    "str(10**1000)*100",
    "len(str(10**1200) * 99)",
    "int(str(10**1200)) ** 2",
    # arithmetic on big values
    "10**1200 * 10**1200 * 10**1200",
    "(10**1200) ** 4",
    "2 ** 4097",
    "1 << 5000",
    "(1 << 1000) << 5000",
    f"{_L} * 2",
    f"{_S} + {_S}",
    f"{_LL} + {_LL}",
    "[[0]*99999]*2",
    "[context]*99999",
    "(context,) * 99999",
    "[context, context] * 99999",
    "'%s' % ([0]*99999,)",
    "'%d' % 1",
    "[0]*99999 - [0]",
    "(10**1200) // 1 // 1 // 1 // 0",
    "[0] * 10**9 * 0",
    # set operations on dict views: a set is only built from another set
    f"context.keys() | {_L}",
    f"{_L} | context.keys()",
    f"context.keys() ^ {_L}",
    f"{_L} - context.keys()",
    f"context.items() | {_L}",
    # set and dict displays hash what they hold
    f"{{{_S}, {_S}[1:], {_S}[2:], {_S}[3:], {_S}[4:], {_S}[5:], {_S}[6:], {_S}[7:]}} and 1/0",
    "{(1,) * 99999, (2,) * 99999, (3,) * 99999, (4,) * 99999, (5,) * 99999, (6,) * 99999}",
    "{(1,) * 99999: 1, (2,) * 99999: 2, (3,) * 99999: 3, (4,) * 99999: 4, (5,) * 99999: 5}",
    "{[0]: 1}",
    f"{{{_L}}}",
    "{**context}",
    # builtins only as callees or key=; attributes only as method callees; no ExtSlice
    "len",
    "[len, min]",
    "(sorted if context else min)([1])",
    "max([1], key=len if context else abs)",
    "context.get('x', sorted)",
    "{'f': str}",
    "str == str",
    "sorted is sorted",
    "context[1:2, 3]",
    "context.values",
    "'a'.upper",
    "min(*[[0]*99999])",
    f"sorted({_S}, key=ord)",
]

STATE = {"x": 1, "a": "b", "n": [1, 2, 3]}


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize("source", HOSTILE, ids=lambda s: s[:40])
def test_hostile_expression_is_stopped(evaluator: Any, source: str) -> None:
    try:
        expression = compile_expression(source, evaluator=evaluator)
    except ExpressionError as exc:
        assert exc.reason in {"syntax", "forbidden", "too_long"}
        assert exc.code == "expression_invalid"
        return
    started = time.perf_counter()
    with pytest.raises(ExpressionEvaluationError):
        expression.evaluate(dict(STATE))
    elapsed = time.perf_counter() - started
    assert elapsed < SAFETY_S, f"{source[:60]!r} took {elapsed:.3f}s to fail"


def test_corpus_is_large_enough() -> None:
    assert len(HOSTILE) >= 150
    assert len(set(HOSTILE)) == len(HOSTILE)


#: Self-seeded bombs do not need the state; these big states are in scope anyway.
LARGE_FOR_CORPUS = ["900k-char str", "nested 1 MiB", "non-ASCII str"]


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize("source", HOSTILE, ids=lambda s: s[:40])
def test_hostile_expression_is_stopped_on_large_states(evaluator: Any, source: str) -> None:
    try:
        expression = compile_expression(source, evaluator=evaluator)
    except ExpressionError:
        return
    for name in LARGE_FOR_CORPUS:
        outcome = run_bounded(expression, hostile_states()[name])
        assert isinstance(outcome, ExpressionEvaluationError), f"not stopped on {name}"


#: Conditions that are cheap on a small state and expensive on a large one,
#: with the hostile states they must be stopped on.
STATE_ATTACKS: list[tuple[str, list[str]]] = [
    (
        "len(sorted(context['x'])) > 0",
        [
            "900k-char str",
            "non-ASCII str",
            "150k ints",
            "nested 1 MiB",
            "two equal int lists",
            "55k keys",
        ],
    ),
    (
        "sorted(context['x'], key=str)",
        ["900k-char str", "non-ASCII str", "150k ints", "nested 1 MiB", "4300-digit ints"],
    ),
    ("max(context['x'], key=sorted)", ["900k-char str", "nested 1 MiB", "55k keys"]),
    ("min(context['x']) == max(context['x'])", ["900k-char str", "non-ASCII str", "150k ints"]),
    ("all(context['x']) and all(context['x'])", ["900k-char str", "non-ASCII str"]),
    ("sum(context['x']) + sum(context['x']) > 0", ["150k ints", "two equal int lists"]),
    ("context['x'] == context['y']", ["two equal int lists", "two equal nested"]),
    ("context['x'] < context['y']", ["two equal int lists", "two equal nested"]),
    ("context['x'] == context['x'][:]", ["150k ints", "nested 1 MiB", "two equal nested"]),
    (
        "[context['x'], context['x']] == [context['y'], context['y']]",
        ["two equal int lists", "two equal nested"],
    ),
    ("context['x'][::-1] < context['x'] < context['y']", ["150k ints", "two equal nested"]),
    (
        "context['y'] + 'b' in context['x'] or context['y'] + 'b' in context['x'] "
        "or context['y'] + 'b' in context['x']",
        ["900k-char str"],
    ),
    ("context['y'] in context['x'] and context['y'] in context['x']", ["nested 1 MiB"]),
    (
        "-1 in context['x'] or -1 in context['x'] or -1 in context['x'] or -1 in context['x']",
        ["150k ints"],
    ),
    ("context['x'].strip(context['x'][:1000] + 'b') == ''", ["900k-char str"]),
    ("context['x'].upper() == context['x'].lower()", ["non-ASCII str"]),
    ("context[context['x']]", ["900k-char str"]),
    ("float(context['x']) > 0", ["900k-char str", "non-ASCII str"]),
    ("int(context['x']) > 0", ["900k-char str", "non-ASCII str"]),
    ("context['x'] + context['x']", ["900k-char str", "150k ints", "nested 1 MiB"]),
    ("context['x'] * 2", ["900k-char str", "150k ints", "nested 1 MiB"]),
    (
        "len({context['x'][1:], context['x'][2:], context['x'][3:], context['x'][4:], "
        "context['x'][5:], context['x'][6:], context['x'][7:], context['x'][8:]}) > 0",
        ["900k-char str"],
    ),
    ("len(context['x'].keys() | context['x'].keys()) > 0", ["55k keys"]),
    ("len(context['x'].items() - context['x'].items()) > 0", ["55k keys"]),
    ("sorted(context['x'].items()) == sorted(context['x'].items())", ["55k keys"]),
    ("context['x'] == context['x']", ["55k keys", "150k ints", "nested 1 MiB"]),
    ("context.keys() - context['x']", ["900k-char str"]),
    ("len(context.items() | context.items()) > 0", ["nested 1 MiB"]),
    ("len(sorted(context.items())) > 0", ["nested 1 MiB", "two equal nested"]),
    ("str(context['x'])", ["150k ints", "nested 1 MiB", "55k keys"]),
    ("str(context['y']) * 30", ["4300-digit ints"]),
    ("sorted(context['x'][::-1] + context['y'])", ["150k ints"]),
    (
        "any([context['x'] == context['y'], context['y'] == context['x']])",
        ["two equal int lists", "two equal nested"],
    ),
]


def _attack_cases(targets_only: bool) -> list[tuple[str, str]]:
    return [
        (source, name)
        for source, targets in STATE_ATTACKS
        for name in (targets if targets_only else HOSTILE_STATE_NAMES)
    ]


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize(
    ("source", "state_name"), _attack_cases(targets_only=True), ids=lambda v: v[:40]
)
def test_state_attack_is_stopped(evaluator: Any, source: str, state_name: str) -> None:
    expression = compile_expression(source, evaluator=evaluator)
    outcome = run_bounded(expression, hostile_states()[state_name])
    assert isinstance(outcome, ExpressionEvaluationError)


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize(
    ("source", "state_name"), _attack_cases(targets_only=False), ids=lambda v: v[:40]
)
def test_state_attack_stays_within_the_budget(evaluator: Any, source: str, state_name: str) -> None:
    # Wherever it is not stopped, it finishes within the budget.
    run_bounded(compile_expression(source, evaluator=evaluator), hostile_states()[state_name])


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize("source", [source for source, _ in STATE_ATTACKS], ids=lambda s: s[:40])
def test_state_attack_on_a_small_state(evaluator: Any, source: str) -> None:
    state = {"x": [3, 1, 2], "y": [1, 2], "k": "v"}
    run_bounded(compile_expression(source, evaluator=evaluator), state)


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("context.__class__", "forbidden"),
        ("open('/etc/passwd')", "forbidden"),
        ("[x for x in context]", "forbidden"),
        ("context.get", "forbidden"),
        ("context.get('x' ==", "syntax"),
        ("x" * (MAX_EXPRESSION_LENGTH + 1), "too_long"),
        ("(" * 500 + "1" + ")" * 500, "too_long"),
        ("(" * 300 + "1" + ")" * 300, "syntax"),
    ],
)
def test_rejections_carry_a_reason(evaluator: Any, source: str, reason: str) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression(source, evaluator=evaluator)
    assert info.value.reason == reason
    assert info.value.details["reason"] == reason


def test_expression_at_the_length_limit_is_accepted() -> None:
    source = "1" + " " * (MAX_EXPRESSION_LENGTH - 1)
    assert len(source) == MAX_EXPRESSION_LENGTH
    assert compile_expression(source).evaluate({}) == 1


def test_non_string_source_is_rejected() -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression(123)  # type: ignore[arg-type]
    assert info.value.reason == "syntax"


# --- ordinary expressions -------------------------------------------------------------

SPEC_CASES = [
    ("context.get('issues_open', 0) == 0", {"issues_open": 0}, True),
    ("context.get('issues_open', 0) == 0", {}, True),
    ("context.get('issues_open', 0) == 0", {"issues_open": 2}, False),
    ("context.get('issues_open', 0) > 0", {"issues_open": 2}, True),
    ("context.get('issues_open', 0) > 0", {"issues_open": 0}, False),
    ("context.get('issues_open', 0) > 0", {}, False),
]


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize(("source", "state", "expected"), SPEC_CASES)
def test_spec_expressions(
    evaluator: Any, source: str, state: dict[str, Any], expected: bool
) -> None:
    assert compile_expression(source, evaluator=evaluator).evaluate(state) is expected


WHITELIST_CASES = [
    ("len(context.get('items'))", 3),
    ("min(context.get('items'))", 1),
    ("max(context.get('items'))", 5),
    ("min(4, 2, 8)", 2),
    ("abs(-context.get('n'))", 7),
    ("any([0, context.get('n')])", True),
    ("all([1, 0])", False),
    ("int('42') + int(3.9)", 45),
    ("int('ff', 16)", 255),
    ("float('1.5') * 2", 3.0),
    ("str(context.get('n')) + '!'", "7!"),
    ("bool(context.get('missing'))", False),
    ("round(2.675, 2)", 2.67),
    ("round(7.5)", 8),
    ("sum(context.get('items'))", 9),
    ("sum([1.5, 2], 1)", 4.5),
    ("sorted(context.get('items'))", [1, 3, 5]),
    ("sorted(context.get('items'), reverse=True)", [5, 3, 1]),
    ("sorted(context.keys())", ["items", "n", "name", "nested"]),
    ("sorted(context.get('nested').items())", [("a", 1), ("b", 2)]),
    ("sum(context.get('nested').values())", 3),
    ("context.get('name').lower()", "review"),
    ("context.get('name').upper()", "REVIEW"),
    ("context.get('name').startswith('Rev')", True),
    ("context.get('name').endswith('x')", False),
    ("'  pad '.strip()", "pad"),
    ("context.get('nested').get('a')", 1),
    ("context['nested']['b']", 2),
    ("context.get('items')[-1]", 5),
    ("context.get('name')[:3]", "Rev"),
    ("'ev' in context.get('name')", True),
    ("3 in context.get('items')", True),
    ("context.get('missing') is None", True),
    ("1 if context.get('n') > 5 else 2", 1),
    ("[1, 2] + [3]", [1, 2, 3]),
    ("'ab' * 3", "ababab"),
    ("2 ** 10", 1024),
    ("1 << 10", 1024),
    ("7 % 3", 1),
    ("[[0] * 3] * 2", [[0, 0, 0], [0, 0, 0]]),
]


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize(("source", "expected"), WHITELIST_CASES)
def test_whitelisted_builtins_and_methods(evaluator: Any, source: str, expected: Any) -> None:
    state = {"items": [3, 1, 5], "n": 7, "name": "Review", "nested": {"a": 1, "b": 2}}
    result = compile_expression(source, evaluator=evaluator).evaluate(state)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_state_is_an_alias_of_context(evaluator: Any) -> None:
    state = {"k": "v"}
    expression = compile_expression("state.get('k') == context.get('k')", evaluator=evaluator)
    assert expression.evaluate(state) is True
    assert compile_expression("state is context", evaluator=evaluator).evaluate(state) is True
    assert compile_expression("state['k']", evaluator=evaluator).evaluate(state) == "v"


AGREEMENT = [
    "1 + 2 * 3",
    "7 // 2",
    "7 / 2",
    "-7 % 3",
    "2 ** -1",
    "~5 & 0xff | 2 ^ 1",
    "1 << 3 >> 1",
    "1 < 2 <= 2 != 3",
    "not context.get('flag')",
    "context.get('flag') or 'default'",
    "context.get('n', 0) and context.get('n') * 2",
    "context.get('n') if context.get('flag') else -1",
    "context.get('tags', []) + ['new']",
    "'urgent' in context.get('tags', [])",
    "'x' not in context",
    "len(context) > 2",
    "context.get('score', 0.0) >= 0.5",
    "(context.get('n'), context.get('score'))",
    "{'a': context.get('n'), 'b': [1, 2]}",
    "{1, 2, 2, 3}",
    "context.get('tags')[0:1]",
    "str(context.get('score')) + '%'",
    "max(context.get('n'), 3, key=abs)",
    "None is None",
    "-context.get('n')",
]


@pytest.mark.parametrize("source", AGREEMENT)
def test_evaluators_agree(source: str) -> None:
    state = {"n": 4, "flag": False, "tags": ["urgent", "ui"], "score": 0.75}
    compiled = compile_expression(source, evaluator="compiled").evaluate(state)
    reference = compile_expression(source, evaluator="asteval").evaluate(state)
    assert compiled == reference
    assert type(compiled) is type(reference)
    # And both agree with plain Python on these harmless expressions.
    assert compiled == eval(source, {}, {"context": state, "state": state})


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize(
    ("source", "error_type"),
    [
        ("context['missing']", "KeyError"),
        ("context.get('n') / 0", "ZeroDivisionError"),
        ("context.get('n') // 0", "ZeroDivisionError"),
        ("context.get('n') % 0", "ZeroDivisionError"),
        ("context.get('n') + 'a'", "TypeError"),
        ("context.get('missing') > 1", "TypeError"),
        ("len(context.get('n'))", "TypeError"),
        ("int('not a number')", "ValueError"),
        ("min([])", "ValueError"),
        ("context.get('items')[10]", "IndexError"),
        ("context.get('n').get('x')", "AttributeError"),
    ],
)
def test_evaluation_errors_surface_as_expression_errors(
    evaluator: Any, source: str, error_type: str
) -> None:
    expression = compile_expression(source, evaluator=evaluator)
    with pytest.raises(ExpressionEvaluationError) as info:
        expression.evaluate({"n": 1, "items": [1]})
    assert info.value.details["type"] == error_type
    assert info.value.details["expression"] == source
    assert source in info.value.message
    assert info.value.code == "expression_failed"


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_an_expression_is_reusable_after_a_failure(evaluator: Any) -> None:
    expression = compile_expression("context['k'] > 1", evaluator=evaluator)
    with pytest.raises(ExpressionEvaluationError):
        expression.evaluate({})
    assert expression.evaluate({"k": 2}) is True
    assert expression.evaluate({"k": 0}) is False


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_an_evaluation_does_not_see_the_previous_state(evaluator: Any) -> None:
    expression = compile_expression("context.get('secret')", evaluator=evaluator)
    assert expression.evaluate({"secret": "s3cr3t"}) == "s3cr3t"
    assert expression.evaluate({}) is None


# --- state values are data ------------------------------------------------------------


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_large_state_values_can_be_read(evaluator: Any) -> None:
    big = "a" * 1_000_000
    state = {"x": big, "items": list(range(200_000))}
    assert compile_expression("context.get('x')", evaluator=evaluator).evaluate(state) is big
    assert compile_expression("len(context.get('x'))", evaluator=evaluator).evaluate(state) == (
        1_000_000
    )
    assert compile_expression("len(context['items'])", evaluator=evaluator).evaluate(state) == (
        200_000
    )
    assert (
        compile_expression("context.get('x').startswith('aaa')", evaluator=evaluator).evaluate(
            state
        )
        is True
    )
    # ... but a large state value is no seed for a bomb.
    for bomb in ["context.get('x') * 2", "context['items'] + context['items']"]:
        with pytest.raises(ExpressionEvaluationError):
            compile_expression(bomb, evaluator=evaluator).evaluate(state)


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_malicious_state_values_are_just_data(evaluator: Any) -> None:
    state = {
        "__class__": "evil",
        "__builtins__": {"open": "nope"},
        "nested": {"__class__": {"__subclasses__": 1}, "__globals__": 2},
        "fmt": "{0.__class__.__mro__}",
    }

    def run(source: str) -> Any:
        return compile_expression(source, evaluator=evaluator).evaluate(state)

    assert run("context.get('__class__')") == "evil"
    assert run("context['nested']['__class__']") == {"__subclasses__": 1}
    assert run("sorted(context['nested'].keys())") == ["__class__", "__globals__"]
    assert run("context['__builtins__']['open']") == "nope"
    # A format string in the state cannot be applied: there is no format method.
    with pytest.raises(ExpressionError):
        compile_expression("context.get('fmt').format(context)", evaluator=evaluator)
    # The state's '__builtins__' key does not become the expression's builtins.
    with pytest.raises(ExpressionError):
        compile_expression("open('/etc/passwd')", evaluator=evaluator)
    assert run("len(context)") == 4


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_evaluation_does_not_mutate_the_state(evaluator: Any) -> None:
    state = {"items": [3, 1, 2], "d": {"k": 1}}
    compile_expression("sorted(context['items'])", evaluator=evaluator).evaluate(state)
    compile_expression("context['items'] + [4]", evaluator=evaluator).evaluate(state)
    compile_expression("context.get('d').get('k')", evaluator=evaluator).evaluate(state)
    assert state == {"items": [3, 1, 2], "d": {"k": 1}}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (math.nan, False),
        (0, False),
        (0.0, False),
        ("", False),
        ([], False),
        (None, False),
        (1, True),
        ("no", True),
        ([0], True),
        (math.inf, True),
    ],
)
def test_truthy(value: Any, expected: bool) -> None:
    assert truthy(value) is expected


def test_expression_repr_names_its_source() -> None:
    assert repr(compile_expression("1 == 1")) == "Expression('1 == 1')"
