"""The registry: the only way a graph document reaches code."""

from __future__ import annotations

import pathlib
import sys
import textwrap
from typing import Any

import pytest
import trio
from pydantic import BaseModel

from trioflow import GraphValidationError, JsonState, Registry, RegistryError, compile_graph
from trioflow.builtin_tools import ToolFailure

HERE = pathlib.Path(__file__).resolve().parent


# --- registering tools --------------------------------------------------------------


def test_tool_decorator_registers_with_options() -> None:
    registry = Registry()

    @registry.tool("review.lint", inline=True)
    def lint(state: Any) -> dict[str, Any]:
        """Count the lint issues.

        More text that is not part of the description.
        """
        return {"issues_open": 0}

    tool = registry.get_tool("review.lint")
    assert tool is not None
    assert tool.func is lint  # the decorator returns the function unchanged
    assert (tool.name, tool.inline, tool.is_async, tool.arity) == ("review.lint", True, False, 1)
    assert tool.description == "Count the lint issues."
    assert lint({}) == {"issues_open": 0}
    assert set(registry.tools()) == {"review.lint"}


def test_bare_tool_decorator_uses_the_qualified_name() -> None:
    registry = Registry()

    @registry.tool
    def summarise(state: Any) -> None:
        return None

    name = f"{__name__}.test_bare_tool_decorator_uses_the_qualified_name.<locals>.summarise"
    tool = registry.get_tool(name)
    assert tool is not None and tool.func is summarise
    assert tool.inline is False


def test_async_tool_is_detected() -> None:
    registry = Registry()

    @registry.tool("review.fetch")
    async def fetch(state: Any, ctx: Any) -> None:
        return None

    tool = registry.get_tool("review.fetch")
    assert tool is not None
    assert (tool.is_async, tool.inline, tool.arity) == (True, False, 2)


def test_object_with_async_call_is_an_async_tool() -> None:
    class Fetcher:
        async def __call__(self, state: Any) -> None:
            return None

    tool = Registry().add_tool("fetch", Fetcher())
    assert tool.is_async is True
    assert tool.arity == 1


def test_explicit_description_wins_over_docstring() -> None:
    def f(state: Any) -> None:
        """Docstring."""

    assert Registry().add_tool("f", f, description="Explicit").description == "Explicit"


def test_listing_is_a_copy() -> None:
    registry = Registry()
    registry.add_tool("a", lambda state: None)
    listing = registry.tools()
    listing.pop("a")  # type: ignore[attr-defined]
    assert registry.get_tool("a") is not None


def test_model_decorator_registers_a_model() -> None:
    registry = Registry()

    @registry.model("Review")
    class Review(BaseModel):
        issues_open: int = 0

    assert registry.get_model("Review") is Review
    assert registry.models() == {"Review": Review}
    registry.add_model("Review", Review)  # the same class again is fine
    with pytest.raises(RegistryError):
        registry.add_model("Review", type("Review", (BaseModel,), {}))
    with pytest.raises(RegistryError):
        registry.add_model("NotAModel", dict)  # type: ignore[arg-type]
    assert registry.get_model("Missing") is None


@pytest.mark.parametrize("thing", [None, 42, "tools.noop", object()], ids=repr)
def test_add_tool_rejects_non_callables(thing: Any) -> None:
    registry = Registry()
    with pytest.raises(RegistryError, match="not callable"):
        registry.add_tool("bad", thing)
    assert registry.get_tool("bad") is None


@pytest.mark.parametrize("name", ["", None, 3])
def test_add_tool_rejects_bad_names(name: Any) -> None:
    with pytest.raises(RegistryError):
        Registry().add_tool(name, lambda state: None)


def test_add_tool_rejects_more_than_two_required_arguments() -> None:
    def three(state: Any, ctx: Any, extra: Any) -> None:
        return None

    registry = Registry()
    with pytest.raises(RegistryError, match="3 required arguments"):
        registry.add_tool("three", three)
    assert registry.get_tool("three") is None


def test_duplicate_name_with_a_different_function_is_rejected() -> None:
    registry = Registry()

    def first(state: Any) -> None:
        return None

    def second(state: Any) -> None:
        return None

    registry.add_tool("x", first)
    with pytest.raises(RegistryError, match="already registered"):
        registry.add_tool("x", second)
    tool = registry.get_tool("x")
    assert tool is not None and tool.func is first  # never silently replaced


def test_same_function_twice_is_fine() -> None:
    registry = Registry()

    def f(state: Any) -> None:
        return None

    one = registry.add_tool("x", f)
    two = registry.add_tool("x", f)
    assert one is two
    assert list(registry.tools()) == ["x"]


def test_inline_async_tool_is_rejected() -> None:
    async def slow(state: Any) -> None:
        await trio.sleep(1)

    registry = Registry()
    with pytest.raises(RegistryError, match="inline"):
        registry.add_tool("slow", slow, inline=True)
    with pytest.raises(RegistryError, match="inline"):
        registry.tool("slow", inline=True)(slow)
    assert registry.get_tool("slow") is None


def _zero() -> None:
    return None


def _one(state: Any) -> None:
    return None


def _two(state: Any, ctx: Any) -> None:
    return None


def _one_with_default(state: Any, ctx: Any = None) -> None:
    return None


def _varargs(*args: Any) -> None:
    return None


def _keyword_only(state: Any, *, flag: bool = False) -> None:
    return None


class _Method:
    def run(self, state: Any, ctx: Any) -> None:
        return None


@pytest.mark.parametrize(
    ("func", "arity"),
    [
        (_zero, 0),
        (_one, 1),
        (_two, 2),
        (_one_with_default, 1),
        (_varargs, 2),
        (_keyword_only, 1),
        (_Method().run, 2),  # bound: self is not an argument
        (lambda: None, 0),
        (lambda s, c: None, 2),
    ],
    ids=["zero", "one", "two", "default", "varargs", "kwonly", "bound", "lambda0", "lambda2"],
)
def test_arity_detection(func: Any, arity: int) -> None:
    assert Registry().add_tool("t", func).arity == arity


# --- loading modules -----------------------------------------------------------------


def test_load_module_calls_register(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.delitem(sys.modules, "tools_fixture_module", raising=False)
    registry = Registry()
    registry.load_module("tools_fixture_module")
    module = sys.modules["tools_fixture_module"]
    assert module.CALLS == ["register"]
    triage = registry.get_tool("fixture.triage")
    notify = registry.get_tool("fixture.notify")
    assert triage is not None and triage.inline and triage.arity == 1
    assert notify is not None and notify.is_async and notify.arity == 2
    assert registry.get_model("Ticket") is module.Ticket

    # And a graph can now name them.
    graph = compile_graph(
        {
            "id": "t",
            "start_node": "a",
            "state_model": "Ticket",
            "nodes": [{"id": "a", "callable": "fixture.triage"}],
        },
        registry,
    )
    assert graph.state_model is module.Ticket


def test_load_modules_loads_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    registry = Registry()
    registry.load_modules(["tools_fixture_module", "trioflow.builtin_tools"])
    assert registry.get_tool("fixture.triage") is not None
    assert registry.get_tool("tools.noop") is not None


def test_load_missing_module_is_a_registry_error() -> None:
    registry = Registry()
    with pytest.raises(RegistryError, match="cannot import"):
        registry.load_module("trioflow_tests_no_such_module")
    with pytest.raises(RegistryError, match="cannot import"):
        registry.load_module("trioflow.no_such_submodule")
    assert registry.tools() == {}


def _write_module(tmp_path: pathlib.Path, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))


def test_load_module_without_register_is_a_registry_error(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_module(tmp_path, "tf_no_register", "def tool(state):\n    return None\n")
    _write_module(tmp_path, "tf_register_not_callable", "register = 'nope'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry()
    for name in ["tf_no_register", "tf_register_not_callable"]:
        with pytest.raises(RegistryError, match="register"):
            registry.load_module(name)
    assert registry.tools() == {}


def test_load_entry_points_finds_the_builtin_tools() -> None:
    registry = Registry()
    loaded = registry.load_entry_points("trioflow.tools")
    assert "builtin" in loaded
    assert {"tools.noop", "tools.approve", "tools.sleep", "tools.fail"} <= set(registry.tools())
    # Loading again registers the same functions: not an error.
    assert "builtin" in registry.load_entry_points()


def test_load_entry_points_of_an_empty_group() -> None:
    registry = Registry()
    assert registry.load_entry_points("trioflow.tests.no_such_group") == []
    assert registry.tools() == {}


# --- nothing named in a graph is imported --------------------------------------------------


def test_unregistered_callables_are_rejected_and_never_imported(
    registry: Registry, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A canary module that would record being imported.
    canary = """
        import sys
        sys.tf_canary_imported = True
        def register(registry):
            pass
        def run(state):
            return None
    """
    _write_module(tmp_path, "tf_canary", canary)
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = {
        "id": "evil",
        "start_node": "a",
        "state_model": "tf_canary.Model",
        "nodes": [
            {"id": "a", "callable": "os.system"},
            {"id": "b", "callable": "tf_canary.run"},
            {"id": "c", "callable": "this.s"},
        ],
        "edges": [
            {
                "from": "a",
                "to": "b",
                "type": "branch",
                "condition": {"callable": "tf_canary.register"},
            },
            {"from": "a", "to": "c", "type": "sequential"},
        ],
    }
    before = set(sys.modules)
    with pytest.raises(GraphValidationError) as info:
        compile_graph(doc, registry)
    assert set(sys.modules) - before == set()
    assert not hasattr(sys, "tf_canary_imported")
    assert {(p.code, p.path) for p in info.value.problems} == {
        ("unknown_state_model", "$.state_model"),
        ("unknown_callable", "$.nodes[0].callable"),
        ("unknown_callable", "$.nodes[1].callable"),
        ("unknown_callable", "$.nodes[2].callable"),
        ("unknown_condition_callable", "$.edges[0].condition.callable"),
    }


async def test_engine_rejects_a_graph_naming_os_system(engine: Any) -> None:
    before = set(sys.modules)
    doc = {"id": "evil", "start_node": "a", "nodes": [{"id": "a", "callable": "os.system"}]}
    with pytest.raises(GraphValidationError) as info:
        await engine.register_graph(doc)
    assert [(p.code, p.path) for p in info.value.problems] == [
        ("unknown_callable", "$.nodes[0].callable")
    ]
    assert set(sys.modules) - before == set()


# --- built-in tools -----------------------------------------------------------------------


def test_builtin_tools_are_registered(registry: Registry) -> None:
    tools = registry.tools()
    assert {name: (t.is_async, t.inline) for name, t in tools.items()} == {
        "tools.noop": (False, True),
        "tools.approve": (False, True),
        "tools.sleep": (True, False),
        "tools.fail": (False, True),
    }


def test_noop_returns_none(registry: Registry) -> None:
    noop = registry.get_tool("tools.noop")
    assert noop is not None
    assert noop.func(JsonState(issues_open=1)) is None


def test_approve_sets_approved(registry: Registry) -> None:
    approve = registry.get_tool("tools.approve")
    assert approve is not None
    assert approve.func(JsonState(approved=False)) == {"approved": True}


async def test_sleep_sleeps_sleep_s(registry: Registry, autojump_clock: trio.abc.Clock) -> None:
    sleep = registry.get_tool("tools.sleep")
    assert sleep is not None and sleep.is_async
    start = trio.current_time()
    assert await sleep.func(JsonState(sleep_s=42.5)) is None
    assert trio.current_time() - start == pytest.approx(42.5)


async def test_sleep_defaults_to_one_second(
    registry: Registry, autojump_clock: trio.abc.Clock
) -> None:
    sleep = registry.get_tool("tools.sleep")
    assert sleep is not None
    start = trio.current_time()
    await sleep.func(JsonState())
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_sleep_is_cancellable(registry: Registry, autojump_clock: trio.abc.Clock) -> None:
    sleep = registry.get_tool("tools.sleep")
    assert sleep is not None
    start = trio.current_time()
    with trio.move_on_after(5) as scope:
        await sleep.func(JsonState(sleep_s=3600))
    assert scope.cancelled_caught
    assert trio.current_time() - start == pytest.approx(5)


def test_fail_raises(registry: Registry) -> None:
    fail = registry.get_tool("tools.fail")
    assert fail is not None
    with pytest.raises(ToolFailure, match="disk on fire"):
        fail.func(JsonState(fail_message="disk on fire"))
    with pytest.raises(ToolFailure, match=r"tools\.fail was called"):
        fail.func(JsonState())


def test_the_same_bound_method_may_be_registered_twice() -> None:
    class Counter:
        def bump(self, state: object) -> dict[str, int]:
            return {"n": 1}

    registry = Registry()
    counter = Counter()
    first = registry.add_tool("c.bump", counter.bump)
    assert registry.add_tool("c.bump", counter.bump) is first
    with pytest.raises(RegistryError):
        registry.add_tool("c.bump", Counter().bump)
