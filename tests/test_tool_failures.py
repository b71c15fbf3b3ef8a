"""A tool can never take the engine down: whatever it raises fails its run, and only its run.

Through the embedding API. The server-level version (a real ``trioflow serve``
that keeps serving after a tool raised ``SystemExit``) is in tests/web.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import pytest
import trio
import trio.testing

from trioflow import Engine, Registry, RunStatus, open_engine
from trioflow.actor import TRACEBACK_CHARS

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _one_node(graph_id: str, callable_: str, **node: Any) -> dict[str, Any]:
    nodes = [{"id": "n", "callable": callable_, **node}]
    return {"id": graph_id, "start_node": "n", "nodes": nodes}


def _raiser(exc: BaseException) -> Any:
    def tool(state: Any) -> None:
        raise exc

    return tool


def _async_raiser(exc: BaseException) -> Any:
    async def tool(state: Any) -> None:
        await trio.lowlevel.checkpoint()
        raise exc

    return tool


BASE_EXCEPTIONS = [SystemExit(3), KeyboardInterrupt(), GeneratorExit(), SystemExit("bye")]


@pytest.mark.parametrize("kind", ["inline", "thread", "async"])
@pytest.mark.parametrize("exc", BASE_EXCEPTIONS, ids=lambda e: type(e).__name__)
async def test_a_base_exception_from_a_tool_fails_only_its_run(
    registry: Registry, kind: str, exc: BaseException
) -> None:
    if kind == "async":
        registry.add_tool("test.raise", _async_raiser(exc))
    else:
        registry.add_tool("test.raise", _raiser(exc), inline=kind == "inline")
    async with open_engine(registry=registry) as engine:
        await engine.register_graph(_one_node("bad", "test.raise"))
        await engine.register_graph(_one_node("good", "tools.approve"))
        with trio.fail_after(10):
            bad = await engine.wait((await engine.start_run("bad")).run_id)
            good = await engine.wait((await engine.start_run("good")).run_id)
        assert bad.status is RunStatus.FAILED
        assert bad.error is not None
        assert bad.error["code"] == "node_failed"
        assert bad.error["type"] == type(exc).__name__
        assert good.status is RunStatus.COMPLETED
        assert engine.active_runs == 0
    # Leaving the engine worked: nothing escaped into its nursery.


async def test_a_retried_system_exit_is_retried_like_any_error(
    autojump_clock: trio.testing.MockClock, registry: Registry, engine: Engine
) -> None:
    calls = []

    def flaky(state: Any) -> dict[str, Any]:
        calls.append(1)
        if len(calls) < 3:
            raise SystemExit("not yet")
        return {"done": True}

    registry.add_tool("test.flaky", flaky, inline=True)
    await engine.register_graph(_one_node("flaky", "test.flaky", retry={"max_attempts": 3}))
    final = await engine.wait((await engine.start_run("flaky")).run_id)
    assert final.status is RunStatus.COMPLETED
    assert final.state == {"done": True}
    assert len(calls) == 3


async def test_a_tools_own_too_slow_error_is_a_failure_not_a_timeout(
    autojump_clock: trio.testing.MockClock, registry: Registry, engine: Engine
) -> None:
    async def impatient(state: Any) -> None:
        with trio.fail_after(1):
            await trio.sleep(5)

    registry.add_tool("test.impatient", impatient)
    await engine.register_graph(_one_node("own", "test.impatient"))
    await engine.register_graph(_one_node("own-with-timeout", "test.impatient", timeout_s=30))
    for graph_id in ("own", "own-with-timeout"):
        final = await engine.wait((await engine.start_run(graph_id)).run_id)
        assert final.error is not None
        assert final.error["code"] == "node_failed"
        assert final.error["type"] == "TooSlowError"
        assert "None" not in final.error["message"]


async def test_the_engines_timeout_names_its_own_limit(
    autojump_clock: trio.testing.MockClock, engine: Engine
) -> None:
    await engine.register_graph(_one_node("slow", "tools.sleep", timeout_s=2.5))
    final = await engine.wait((await engine.start_run("slow", {"sleep_s": 60})).run_id)
    assert final.error is not None
    assert final.error["code"] == "node_timeout"
    assert final.error["message"] == "node n failed: TimeoutError: node timed out after 2.5s"
    assert "traceback" not in final.error.get("details", {})


def _deep(depth: int) -> None:
    if depth == 0:
        raise ValueError("at the bottom")
    _deep(depth - 1)


async def test_a_failing_tool_leaves_a_bounded_traceback(
    registry: Registry, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    def shallow_failure(state: Any) -> None:
        raise LookupError("no such ticket " + "x" * 50_000)

    def deep_failure(state: Any) -> None:
        _deep(200)

    registry.add_tool("test.shallow", shallow_failure, inline=True)
    registry.add_tool("test.deep", deep_failure, inline=True)
    await engine.register_graph(_one_node("shallow", "test.shallow"))
    await engine.register_graph(_one_node("deep", "test.deep"))
    with trio.fail_after(10):
        shallow = await engine.wait((await engine.start_run("shallow")).run_id)
        deep = await engine.wait((await engine.start_run("deep")).run_id)

    assert shallow.error is not None
    trace = shallow.error["details"]["traceback"]
    assert "shallow_failure" in trace
    assert "LookupError: no such ticket" in trace
    assert len(trace) <= TRACEBACK_CHARS
    # The message itself is bounded too, and says so.
    assert len(shallow.error["message"]) < 5000
    assert shallow.error["message"].endswith("[truncated]")

    assert deep.error is not None
    trace = deep.error["details"]["traceback"]
    # The last 20 frames are all _deep's: the engine's and the tool's own are cut.
    assert "deep_failure" not in trace
    assert "_invoke" not in trace
    assert "Previous line repeated 16 more times" in trace
    assert "ValueError: at the bottom" in trace
    # ... and the server log has it.
    assert any("test" in r.getMessage() and "_deep" in r.getMessage() for r in caplog.records)


CTRL_C_PROGRAM = """
import os, signal, sys, trio
from trioflow import default_registry, open_engine

def spin(state):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the tool runs
    for _ in range(100_000):
        pass
    return {"spun": True}

async def main():
    registry = default_registry()
    registry.add_tool("test.spin", spin, inline=True)
    async with open_engine(registry=registry) as engine:
        await engine.register_graph(
            {"id": "spin", "start_node": "n", "nodes": [{"id": "n", "callable": "test.spin"}]})
        final = await engine.wait((await engine.start_run("spin")).run_id)
        print("RUN", final.status, final.error, flush=True)
        await trio.sleep(5)
    print("NO INTERRUPT", flush=True)

try:
    trio.run(main)
except* KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
"""


async def test_ctrl_c_while_a_tool_runs_reaches_the_program_and_does_not_fail_the_run() -> None:
    # Only a KeyboardInterrupt a tool raises itself fails its run; a real
    # SIGINT is held back while the tool runs and reaches the program.
    result = await trio.run_process(
        [sys.executable, "-c", CTRL_C_PROGRAM],
        cwd=str(ROOT),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    out = result.stdout.decode()
    assert "INTERRUPTED" in out, (out, result.stderr.decode())
    assert "NO INTERRUPT" not in out
    assert "RUN completed None" in out


@pytest.mark.parametrize(
    "exc", [SystemExit(1), KeyboardInterrupt()], ids=lambda e: type(e).__name__
)
async def test_a_condition_callable_raising_a_base_exception_fails_only_its_run(
    registry: Registry, engine: Engine, exc: BaseException
) -> None:
    registry.add_tool("test.judge", _raiser(exc), inline=True)
    await engine.register_graph(
        {
            "id": "judged",
            "start_node": "a",
            "nodes": [{"id": "a", "callable": "tools.noop"}, {"id": "b", "callable": "tools.noop"}],
            "edges": [
                {"from": "a", "to": "b", "type": "branch", "condition": {"callable": "test.judge"}}
            ],
        }
    )
    await engine.register_graph(_one_node("good", "tools.approve"))
    with trio.fail_after(10):
        bad = await engine.wait((await engine.start_run("judged")).run_id)
        good = await engine.wait((await engine.start_run("good")).run_id)
    assert bad.error is not None
    assert bad.error["code"] == "condition_failed"
    assert bad.error["edge"] == "a->b"
    assert type(exc).__name__ in bad.error["message"]
    assert good.status is RunStatus.COMPLETED
