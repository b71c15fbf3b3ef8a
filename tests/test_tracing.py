"""OpenTelemetry spans of runs and steps (trioflow.tracing), and the service's switch.

Spans go to an in-memory exporter on a private TracerProvider: the global
provider is never set here.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, Sampler, SamplingResult
from opentelemetry.trace import StatusCode

import trioflow
from trioflow import (
    Engine,
    LogEntry,
    MemoryStore,
    Registry,
    RunRecord,
    RunStalledError,
    RunStatus,
    StoreError,
    open_engine,
)
from trioflow.tracing import Tracing, available
from trioflow.web.settings import tracing_configured, tracing_enabled

ROOT = pathlib.Path(__file__).resolve().parent.parent
OTEL_MODULES = ("opentelemetry", "opentelemetry.trace", "opentelemetry.context")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
async def traced(registry: Registry, provider: TracerProvider) -> AsyncIterator[Engine]:
    async with open_engine(registry=registry) as engine:
        engine.trace(provider)
        yield engine


def chain(graph_id: str, *callables: str, **extra: Any) -> dict[str, Any]:
    nodes = [{"id": f"n{i}", "callable": c} for i, c in enumerate(callables)]
    edges = [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(len(callables) - 1)]
    return {"id": graph_id, "start_node": "n0", "nodes": nodes, "edges": edges, **extra}


def runs(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith("run ")]


def steps(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    """The step spans whose parent is ``parent``, in the order they started."""
    children = [
        s
        for s in exporter.get_finished_spans()
        if s.name.startswith("step ")
        and s.parent is not None
        and s.parent.span_id == parent.context.span_id
    ]
    return sorted(children, key=lambda s: s.start_time or 0)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def wait_for_node(engine: Engine, run_id: str, node_id: str) -> None:
    async with aclosing(engine.follow(run_id)) as entries:
        async for entry in entries:
            if entry.event == "node_started" and entry.node == node_id:
                return
    raise AssertionError(f"run ended before {node_id} started")


# -- spans of a run ----------------------------------------------------------------


async def test_a_run_is_one_span_with_a_child_span_per_step(
    traced: Engine, exporter: InMemorySpanExporter
) -> None:
    await traced.register_graph(chain("g", "tools.noop", "tools.approve", "tools.noop"))
    run = await traced.start_run("g")
    final = await traced.wait(run.run_id)
    assert final.status is RunStatus.COMPLETED

    (span,) = runs(exporter)
    assert span.name == "run g"
    assert span.parent is None  # nothing was current where it started
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "trioflow"
    assert span.instrumentation_scope.version == trioflow.__version__
    assert attrs(span) == {
        "trioflow.run_id": run.run_id,
        "trioflow.graph_id": "g",
        "trioflow.status": "completed",
        "trioflow.step": 3,
        "trioflow.attempt": 1,
    }
    assert span.status.status_code is StatusCode.UNSET

    children = steps(exporter, span)
    assert [s.name for s in children] == ["step n0", "step n1", "step n2"]
    assert len(exporter.get_finished_spans()) == 4
    for number, step in enumerate(children, start=1):
        assert step.context.trace_id == span.context.trace_id
        assert attrs(step) == {
            "trioflow.run_id": run.run_id,
            "trioflow.graph_id": "g",
            "trioflow.node": f"n{number - 1}",
            "trioflow.step": number,
            "trioflow.attempt": 1,
        }
        assert step.status.status_code is StatusCode.UNSET
        assert span.start_time is not None and span.end_time is not None
        assert step.start_time is not None and step.end_time is not None
        assert span.start_time <= step.start_time <= step.end_time <= span.end_time


async def test_the_step_span_is_current_while_the_tool_runs(
    registry: Registry, traced: Engine, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = provider.get_tracer("tools")

    def inner(state: Any) -> None:
        tracer.start_span("inner").end()

    async def inner_async(state: Any) -> None:
        await trio.lowlevel.checkpoint()
        tracer.start_span("inner").end()

    registry.add_tool("test.inline", inner, inline=True)
    registry.add_tool("test.thread", inner)  # in a worker thread
    registry.add_tool("test.async", inner_async)
    await traced.register_graph(chain("g", "test.inline", "test.thread", "test.async"))
    run = await traced.start_run("g")
    await traced.wait(run.run_id)

    (span,) = runs(exporter)
    children = steps(exporter, span)
    made_inside = [s for s in exporter.get_finished_spans() if s.name == "inner"]
    made_inside.sort(key=lambda s: s.start_time or 0)
    assert len(made_inside) == 3
    for step, made in zip(children, made_inside, strict=True):
        assert made.parent is not None
        assert made.parent.span_id == step.context.span_id
    # Nothing of the run is left current where it was started.
    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_a_run_span_is_a_child_of_the_span_current_where_the_run_started(
    traced: Engine, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    await traced.register_graph(chain("g", "tools.noop"))
    with provider.get_tracer("caller").start_as_current_span("request") as request:
        run = await traced.start_run("g")
    await traced.wait(run.run_id)
    (span,) = runs(exporter)
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id


async def test_a_tracer_can_be_given_instead_of_a_provider(
    registry: Registry, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with open_engine(registry=registry) as engine:
        engine.trace(provider.get_tracer("mine"))
        await engine.register_graph(chain("g", "tools.noop"))
        await engine.wait((await engine.start_run("g")).run_id)
    (span,) = runs(exporter)
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "mine"


# -- outcomes ------------------------------------------------------------------------


async def test_a_failing_tool_fails_its_step_span_and_its_run_span(
    autojump_clock: trio.testing.MockClock,
    traced: Engine,
    exporter: InMemorySpanExporter,
) -> None:
    graph = chain("g", "tools.noop", "tools.fail")
    graph["nodes"][1]["retry"] = {"max_attempts": 2, "backoff_s": 1}
    await traced.register_graph(graph)
    run = await traced.start_run("g", {"fail_message": "boom"})
    final = await traced.wait(run.run_id)
    assert final.status is RunStatus.FAILED
    assert final.error is not None

    (span,) = runs(exporter)
    ok, failed = steps(exporter, span)
    assert ok.status.status_code is StatusCode.UNSET
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == final.error["message"]
    assert "boom" in final.error["message"]
    assert attrs(failed)["trioflow.error.code"] == "node_failed"
    assert attrs(failed)["error.type"] == "ToolFailure"
    # One exception event per failed attempt; the first says when it retried.
    events = [e for e in failed.events if e.name == "exception"]
    assert [dict(e.attributes or {}).get("trioflow.node_attempt") for e in events] == [1, 2]
    first = dict(events[0].attributes or {})
    assert first["exception.type"] == "trioflow.builtin_tools.ToolFailure"
    assert first["exception.message"] == "boom"
    assert 0.5 <= first["trioflow.retry_in_s"] <= 1  # jittered: 1 s drawn in [0.5, 1]
    assert "trioflow.retry_in_s" not in dict(events[1].attributes or {})

    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == final.error["message"]
    assert attrs(span)["trioflow.status"] == "failed"
    assert attrs(span)["trioflow.error.code"] == "node_failed"
    assert attrs(span)["error.type"] == "ToolFailure"


async def test_a_run_failing_after_its_tool_fails_only_the_run_span(
    registry: Registry, traced: Engine, exporter: InMemorySpanExporter
) -> None:
    registry.add_tool("test.huge", lambda state: {"blob": "x" * 2_000_000}, inline=True)
    await traced.register_graph(chain("g", "test.huge"))
    final = await traced.wait((await traced.start_run("g")).run_id)
    assert final.status is RunStatus.FAILED
    (span,) = runs(exporter)
    (step,) = steps(exporter, span)
    assert step.status.status_code is StatusCode.UNSET  # the tool returned
    assert span.status.status_code is StatusCode.ERROR
    assert attrs(span)["trioflow.error.code"] == "state_too_large"


async def test_a_cancelled_run_ends_its_span_cancelled(
    autojump_clock: trio.testing.MockClock, traced: Engine, exporter: InMemorySpanExporter
) -> None:
    await traced.register_graph(chain("g", "tools.noop", "tools.sleep"))
    run = await traced.start_run("g", {"sleep_s": 300})
    await wait_for_node(traced, run.run_id, "n1")
    await trio.sleep(1)
    await traced.cancel(run.run_id)
    final = await traced.wait(run.run_id)
    assert final.status is RunStatus.CANCELLED

    (span,) = runs(exporter)
    assert attrs(span)["trioflow.status"] == "cancelled"
    assert "trioflow.stopped" not in attrs(span)
    assert span.status.status_code is StatusCode.UNSET  # a cancel is not an error
    _, sleeping = steps(exporter, span)
    assert attrs(sleeping)["trioflow.stopped"] == "cancelled"
    assert sleeping.status.status_code is StatusCode.UNSET


async def test_a_waiting_run_ends_its_span_and_its_resume_opens_a_new_one(
    traced: Engine, exporter: InMemorySpanExporter
) -> None:
    graph = {
        "id": "review",
        "start_node": "check",
        "nodes": [
            {"id": "check", "callable": "tools.noop"},
            {"id": "human", "wait": {"prompt": "Approve?"}},
            {"id": "merge", "callable": "tools.approve"},
        ],
        "edges": [{"from": "check", "to": "human"}, {"from": "human", "to": "merge"}],
    }
    await traced.register_graph(graph)
    run = await traced.start_run("review")
    waiting = await traced.wait_stop(run.run_id)
    assert waiting.status is RunStatus.WAITING

    (first,) = runs(exporter)
    assert attrs(first)["trioflow.status"] == "waiting"
    assert attrs(first)["trioflow.step"] == 2  # it waits at its second node
    assert [s.name for s in steps(exporter, first)] == ["step check"]
    assert first.status.status_code is StatusCode.UNSET

    await traced.resume(run.run_id, {"approved": True})
    final = await traced.wait(run.run_id)
    assert final.status is RunStatus.COMPLETED
    first_again, second = sorted(runs(exporter), key=lambda s: s.start_time or 0)
    assert first_again.context.span_id == first.context.span_id
    assert second.context.span_id != first.context.span_id
    assert attrs(second)["trioflow.run_id"] == run.run_id
    assert attrs(second)["trioflow.status"] == "completed"
    assert attrs(second)["trioflow.attempt"] == 1  # an answered wait is no new attempt
    resumed = steps(exporter, second)
    assert [s.name for s in resumed] == ["step human", "step merge"]
    assert [attrs(s)["trioflow.step"] for s in resumed] == [2, 3]


async def test_runs_resumed_on_open_are_traced_and_an_engine_stop_ends_the_span(
    autojump_clock: trio.testing.MockClock,
    registry: Registry,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    store = MemoryStore()  # it outlives the engines
    async with open_engine(store=store, registry=registry, tracer=provider) as engine:
        await engine.register_graph(chain("g", "tools.sleep", "tools.noop"))
        run = await engine.start_run("g", {"sleep_s": 10})
        await wait_for_node(engine, run.run_id, "n0")
    (stopped,) = runs(exporter)
    assert attrs(stopped)["trioflow.status"] == "running"
    assert attrs(stopped)["trioflow.stopped"] == "interrupted"
    (cut,) = steps(exporter, stopped)
    assert attrs(cut)["trioflow.stopped"] == "interrupted"

    exporter.clear()
    async with open_engine(store=store, registry=registry, tracer=provider) as engine:
        final = await engine.wait(run.run_id)
    assert final.status is RunStatus.COMPLETED
    (resumed,) = runs(exporter)
    assert attrs(resumed)["trioflow.status"] == "completed"
    assert attrs(resumed)["trioflow.attempt"] == 2
    assert [attrs(s)["trioflow.attempt"] for s in steps(exporter, resumed)] == [2, 2]


async def test_a_drained_run_ends_its_span_drained(
    autojump_clock: trio.testing.MockClock,
    registry: Registry,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    async with open_engine(registry=registry, tracer=provider, drain_timeout=60) as engine:
        await engine.register_graph(chain("g", "tools.sleep", "tools.sleep"))
        run = await engine.start_run("g", {"sleep_s": 10})
        await wait_for_node(engine, run.run_id, "n0")
    (span,) = runs(exporter)
    assert attrs(span)["trioflow.status"] == "running"
    assert attrs(span)["trioflow.stopped"] == "drained"
    (step,) = steps(exporter, span)  # the step in flight finished
    assert "trioflow.stopped" not in attrs(step)


class RefusingStore(MemoryStore):
    """Refuses every write from the second step on, the run's failure included."""

    async def save_run(self, run: RunRecord, entries: Sequence[LogEntry], **kw: Any) -> None:
        if run.step >= 2 or run.status is RunStatus.FAILED:
            raise StoreError("refused")
        await super().save_run(run, entries, **kw)


async def test_a_run_whose_store_refuses_its_end_ends_its_span_stalled(
    registry: Registry, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with open_engine(store=RefusingStore(), registry=registry, tracer=provider) as engine:
        await engine.register_graph(chain("g", "tools.noop", "tools.noop"))
        run = await engine.start_run("g")
        with pytest.raises(RunStalledError):
            await engine.wait(run.run_id)
    (span,) = runs(exporter)
    assert attrs(span)["trioflow.status"] == "running"
    assert attrs(span)["trioflow.stopped"] == "stalled"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "its checkpoint could not be written (refused)"


# -- off, and with the metrics observer ------------------------------------------------------


class Counting:
    """An Observer that counts."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.ended: list[tuple[str, str]] = []
        self.steps: list[str] = []
        self.commits = 0

    def run_started(self, graph_id: str) -> None:
        self.started.append(graph_id)

    def run_ended(self, graph_id: str, status: str) -> None:
        self.ended.append((graph_id, status))

    def step(self, graph_id: str, node_id: str, seconds: float) -> None:
        self.steps.append(node_id)

    def commit(self, seconds: float) -> None:
        self.commits += 1


async def test_tracing_off_makes_no_spans(
    engine: Engine, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    await engine.register_graph(chain("g", "tools.noop", "tools.fail"))
    await engine.wait((await engine.start_run("g")).run_id)
    engine.trace(provider)
    engine.trace(None)
    await engine.wait((await engine.start_run("g")).run_id)
    assert exporter.get_finished_spans() == ()


async def test_the_observer_and_the_spans_both_see_every_step(
    traced: Engine, exporter: InMemorySpanExporter
) -> None:
    observer = Counting()
    traced.observe(observer)
    await traced.register_graph(chain("g", "tools.noop", "tools.approve", "tools.fail"))
    run = await traced.start_run("g")
    assert (await traced.wait(run.run_id)).status is RunStatus.FAILED
    assert observer.started == ["g"]
    assert observer.ended == [("g", "failed")]
    assert observer.steps == ["n0", "n1", "n2"]
    assert observer.commits >= 3
    (span,) = runs(exporter)
    assert [s.name for s in steps(exporter, span)] == ["step n0", "step n1", "step n2"]


async def test_a_sampled_out_run_records_nothing_and_still_runs(
    registry: Registry, exporter: InMemorySpanExporter
) -> None:
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with open_engine(registry=registry, tracer=provider) as engine:
        await engine.register_graph(chain("g", "tools.noop", "tools.fail"))
        final = await engine.wait((await engine.start_run("g")).run_id)
    assert final.status is RunStatus.FAILED
    assert exporter.get_finished_spans() == ()


class NoSteps(Sampler):
    """Records run spans (and anything else), drops step spans."""

    def should_sample(self, parent_context: Any, trace_id: int, name: str, *args: Any) -> Any:
        decision = Decision.DROP if name.startswith("step ") else Decision.RECORD_AND_SAMPLE
        return SamplingResult(decision)

    def get_description(self) -> str:
        return "NoSteps"


async def test_spans_a_tool_makes_under_a_dropped_step_span_are_children_of_the_run_span(
    registry: Registry, exporter: InMemorySpanExporter
) -> None:
    provider = TracerProvider(sampler=NoSteps())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tools")
    registry.add_tool("test.inner", lambda state: tracer.start_span("inner").end(), inline=True)
    async with open_engine(registry=registry, tracer=provider) as engine:
        await engine.register_graph(chain("g", "test.inner"))
        await engine.wait((await engine.start_run("g")).run_id)
    (span,) = runs(exporter)
    assert steps(exporter, span) == []
    (inner,) = [s for s in exporter.get_finished_spans() if s.name == "inner"]
    assert inner.parent is not None
    assert inner.parent.span_id == span.context.span_id


def test_the_engine_imports_opentelemetry_only_when_tracing_is_on() -> None:
    code = (
        "import sys, trio, trioflow\n"
        "async def main():\n"
        "    async with trioflow.open_engine() as engine:\n"
        "        doc = {'id': 'g', 'start_node': 'a', 'nodes': [{'id': 'a', 'callable': "
        "'tools.noop'}]}\n"
        "        await engine.register_graph(doc)\n"
        "        await engine.wait((await engine.start_run('g')).run_id)\n"
        "trio.run(main)\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_turning_tracing_on_without_opentelemetry_is_an_import_error(
    monkeypatch: pytest.MonkeyPatch, provider: TracerProvider
) -> None:
    for name in OTEL_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    assert not available()
    with pytest.raises(ImportError, match=r"trioflow\[otel\]"):
        Tracing(provider)


# -- the service's switch ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "configured"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": ""}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
        # An explicit "none" wins over an endpoint (meant for metrics or logs, say).
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_tracing_is_configured_by_the_standard_variables(
    environ: dict[str, str], configured: bool
) -> None:
    assert tracing_configured(environ) is configured


def test_the_tracing_modes() -> None:
    exporting = {"OTEL_TRACES_EXPORTER": "otlp"}
    assert tracing_enabled("auto", exporting) is True
    assert tracing_enabled("auto", {}) is False
    assert tracing_enabled("on", {}) is True
    assert tracing_enabled("off", exporting) is False
    with pytest.raises(ValueError, match="--tracing"):
        tracing_enabled("sometimes", {})


def test_tracing_on_without_opentelemetry_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ValueError, match="--tracing on: OpenTelemetry is not installed"):
        tracing_enabled("on", {})
    # auto is off without it, even when the environment asks for traces.
    assert tracing_enabled("auto", {"OTEL_TRACES_EXPORTER": "otlp"}) is False
    assert tracing_enabled("off", {}) is False


# -- trioflow serve, in a subprocess ----------------------------------------------------------

TRIOFLOW = [sys.executable, "-c", "import sys; from trioflow.web.cli import main; sys.exit(main())"]

#: What opentelemetry-instrument would do: set the global tracer provider,
#: here with an exporter that writes each span as a JSON line.
SITECUSTOMIZE = """\
import json, os
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

class Lines(SpanExporter):
    def __init__(self, path):
        self.out = open(path, "a", buffering=1)
    def export(self, spans):
        for span in spans:
            self.out.write(span.to_json(indent=None) + "\\n")
        return SpanExportResult.SUCCESS

provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(Lines(os.environ["TEST_SPANS_FILE"])))
trace.set_tracer_provider(provider)
"""

#: Python without opentelemetry, as far as imports go.
NO_OTEL = """\
import sys
for name in ("opentelemetry", "opentelemetry.trace", "opentelemetry.context"):
    sys.modules[name] = None
"""


def _environment(site: pathlib.Path, **extra: str) -> dict[str, str]:
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRIOFLOW_", "PYTHON"))
    }
    return {**environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1", **extra}


@asynccontextmanager
async def serving(env: dict[str, str], *args: str) -> AsyncIterator[str]:
    process = await trio.lowlevel.open_process(
        [*TRIOFLOW, "serve", "--port", "0", "--store", "memory://", "--quiet", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=str(ROOT),
    )
    try:
        assert process.stdout is not None
        out = b""
        while b"\n" not in out:
            chunk = await process.stdout.receive_some()
            assert chunk, "serve exited before listening"
            out += chunk
        yield out.decode().split()[3]
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def test_serve_traces_runs_when_the_environment_asks_for_it(tmp_path: pathlib.Path) -> None:
    import httpx

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    spans_file = tmp_path / "spans.jsonl"
    env = _environment(site, OTEL_TRACES_EXPORTER="console", TEST_SPANS_FILE=str(spans_file))
    with trio.fail_after(60):
        async with serving(env, "--samples") as url, httpx.AsyncClient(base_url=url) as client:
            ran = await client.post(
                "/graph/run",
                json={"graph_id": "code-review-a", "initial_state": {"issues_open": 1}},
            )
            assert ran.status_code == 200
            run = ran.json()
            assert run["status"] == "completed"
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    (span,) = [s for s in spans if s["name"] == "run code-review-a"]
    assert span["attributes"]["trioflow.run_id"] == run["run_id"]
    assert span["attributes"]["trioflow.status"] == "completed"
    children = [s for s in spans if s["parent_id"] == span["context"]["span_id"]]
    assert len(children) == run["step"] == 9
    assert {s["attributes"]["trioflow.node"] for s in children} == {"submit", "review", "fix"}


async def test_serve_tracing_on_without_opentelemetry_does_not_start(
    tmp_path: pathlib.Path,
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_OTEL)
    with trio.fail_after(30):
        refused = await trio.run_process(
            [*TRIOFLOW, "serve", "--port", "0", "--store", "memory://", "--tracing", "on"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=_environment(site),
            cwd=str(tmp_path),
        )
    assert refused.returncode == 3
    assert b"--tracing on: OpenTelemetry is not installed" in refused.stderr
    assert refused.stdout == b""
