"""OpenTelemetry spans of run executions and their steps, when tracing is on.

:meth:`trioflow.Engine.trace` turns it on with an OpenTelemetry
``TracerProvider`` (or a ``Tracer``). Each execution of a run by an actor
(from its start or resume until it ends, waits for input, or the actor
stops) is one span, ``run GRAPH_ID``; each step in it (a node's tool call,
retries included) is a child span, ``step NODE_ID``. Their attributes:

* ``trioflow.run_id``, ``trioflow.graph_id``: both spans;
* ``trioflow.node``, ``trioflow.step``, ``trioflow.attempt`` (the run's
  execution attempt: 1, then one more on every resume from a checkpoint
  after a restart or a crash; not after a wait): step spans;
* at the run span's end: ``trioflow.status`` (``completed``, ``failed``,
  ``cancelled``, ``waiting``, or ``running`` when the actor stopped without
  an end), ``trioflow.step`` and ``trioflow.attempt``, and
  ``trioflow.stopped`` (``drained``, ``interrupted``, ``abandoned``,
  ``stalled``) when it stopped without an end or a wait;
* a failed step or run: span status ERROR with the failure's message, and
  ``trioflow.error.code`` and ``error.type``; a tool's exceptions are
  recorded on its step span (one ``exception`` event per failed attempt);
* a step cut off by a cancel: ``trioflow.stopped`` (``cancelled``, or
  ``interrupted`` when the engine stopped).

A run span's parent is the span current where the run was started or
resumed (an instrumented request, say), otherwise it is a root. While a step
runs its span is the current one, so spans a tool makes are its children.
A run span that is not recorded (sampled out, or a no-op tracer) gets no
step spans: with the SDK's usual parent-based sampling they would not be
recorded either, and the run pays almost nothing per step.

opentelemetry is optional: this module imports it only when tracing is
turned on, and ``import trioflow`` never does. With tracing off the engine
pays one attribute test per step.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .runs import RunStatus

if TYPE_CHECKING:
    from .errors import RunFailure
    from .runs import RunRecord

#: The instrumentation scope of the spans (``Tracer`` name).
SCOPE = "trioflow"

AttributeValue = str | bool | int | float
Attributes = Mapping[str, AttributeValue]


class Span(Protocol):
    """What the engine uses of an OpenTelemetry ``Span``."""

    def set_attribute(self, key: str, value: AttributeValue) -> None: ...

    def set_status(self, status: Any, description: str | None = None) -> None: ...

    def record_exception(
        self, exception: BaseException, attributes: Attributes | None = None
    ) -> None: ...

    def end(self) -> None: ...

    def is_recording(self) -> bool: ...


class Tracer(Protocol):
    """What the engine uses of an OpenTelemetry ``Tracer``."""

    def start_span(
        self, name: str, context: Any = None, *, attributes: Attributes | None = None
    ) -> Span: ...


@runtime_checkable
class TracerProvider(Protocol):
    """What the engine uses of an OpenTelemetry ``TracerProvider``."""

    def get_tracer(
        self, instrumenting_module_name: str, instrumenting_library_version: str | None = None
    ) -> Tracer: ...


def _otel(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(
            "tracing needs OpenTelemetry, which is not installed: "
            "pip install 'trioflow[otel]' (opentelemetry-api and opentelemetry-sdk)"
        ) from None


def available() -> bool:
    """Whether opentelemetry (its API) can be imported."""
    try:
        _otel("opentelemetry.trace")
    except ImportError:
        return False
    return True


def global_tracer_provider() -> TracerProvider:
    """OpenTelemetry's global tracer provider (``opentelemetry.trace.get_tracer_provider()``).

    Until a program sets one (``opentelemetry-instrument`` does, from the
    ``OTEL_*`` environment variables), it is a proxy whose spans are dropped;
    tracers taken from it follow the provider set later.

    Raises:
        ImportError: opentelemetry is not installed.
    """
    provider: TracerProvider = _otel("opentelemetry.trace").get_tracer_provider()
    return provider


def global_tracer_provider_set() -> bool:
    """Whether a program has set OpenTelemetry's global tracer provider (spans go somewhere).

    Raises:
        ImportError: opentelemetry is not installed.
    """
    api = _otel("opentelemetry.trace")
    return not isinstance(api.get_tracer_provider(), api.ProxyTracerProvider)


class Tracing:
    """Makes the spans of one engine's runs. Made by :meth:`trioflow.Engine.trace`."""

    def __init__(self, tracer: TracerProvider | Tracer) -> None:
        """Raises ImportError when opentelemetry is not installed."""
        api = _otel("opentelemetry.trace")
        context_api = _otel("opentelemetry.context")
        if isinstance(tracer, TracerProvider):
            import trioflow

            tracer = tracer.get_tracer(SCOPE, trioflow.__version__)
        self.tracer: Tracer = tracer
        self.error_status: Any = api.StatusCode.ERROR
        self.in_context: Callable[[Span], Any] = api.set_span_in_context
        self.attach: Callable[[Any], object] = context_api.attach
        self.detach: Callable[[object], None] = context_api.detach

    def run(self, run_id: str, graph_id: str) -> RunSpan:
        """Start the span of a run's execution and make it the current span (of this task)."""
        span = self.tracer.start_span(
            "run " + graph_id,
            attributes={"trioflow.run_id": run_id, "trioflow.graph_id": graph_id},
        )
        return RunSpan(self, span, run_id, graph_id)


class RunSpan:
    """The span of one execution of a run; its steps' spans are its children.

    Started and ended in the actor's task, which it is the current span of.
    """

    __slots__ = ("_context", "_graph_id", "_run_id", "_span", "_token", "_tracing", "recording")

    def __init__(self, tracing: Tracing, span: Span, run_id: str, graph_id: str) -> None:
        self._tracing = tracing
        self._span = span
        self._run_id = run_id
        self._graph_id = graph_id
        #: The span is recorded. When it is not (sampled out, a no-op tracer),
        #: the engine makes no step spans: they would not be either.
        self.recording = span.is_recording()
        self._context = tracing.in_context(span)
        self._token = tracing.attach(self._context)

    def step(self, node_id: str, step: int, attempt: int) -> StepSpan:
        """Start a step's span, the current one (if it is recorded) until :meth:`StepSpan.end`."""
        tracing = self._tracing
        span = tracing.tracer.start_span(
            "step " + node_id,
            self._context,
            attributes={
                "trioflow.run_id": self._run_id,
                "trioflow.graph_id": self._graph_id,
                "trioflow.node": node_id,
                "trioflow.step": step,
                "trioflow.attempt": attempt,
            },
        )
        token = tracing.attach(tracing.in_context(span)) if span.is_recording() else None
        return StepSpan(tracing, span, token)

    def end(
        self, record: RunRecord, stopped: str | None = None, problem: str | None = None
    ) -> None:
        """End the span with the run's record as the execution left it.

        Args:
            record: the run's last checkpoint.
            stopped: why the execution stopped without an end or a wait.
            problem: what went wrong when it stopped on an error (status ERROR).
        """
        span = self._span
        span.set_attribute("trioflow.status", record.status.value)
        span.set_attribute("trioflow.step", record.step)
        span.set_attribute("trioflow.attempt", record.attempt)
        if stopped is not None:
            span.set_attribute("trioflow.stopped", stopped)
        error = record.error
        if record.status is RunStatus.FAILED and error is not None:
            code = str(error.get("code", "failed"))
            span.set_attribute("trioflow.error.code", code)
            span.set_attribute("error.type", str(error.get("type", code)))
            span.set_status(self._tracing.error_status, str(error.get("message", code)))
        elif problem is not None:
            span.set_status(self._tracing.error_status, problem)
        self._tracing.detach(self._token)
        span.end()


class StepSpan:
    """The span of one step; see :meth:`RunSpan.step`."""

    __slots__ = ("_span", "_token", "_tracing")

    def __init__(self, tracing: Tracing, span: Span, token: object | None) -> None:
        self._tracing = tracing
        self._span = span
        self._token = token

    def attempt_failed(
        self, error: BaseException, attempt: int, retry_in: float | None = None
    ) -> None:
        """Record a failed attempt of the tool (an ``exception`` event)."""
        attributes: dict[str, AttributeValue] = {"trioflow.node_attempt": attempt}
        if retry_in is not None:
            attributes["trioflow.retry_in_s"] = retry_in
        self._span.record_exception(error, attributes)

    def failed(self, failure: RunFailure) -> None:
        """The step failed its run: status ERROR."""
        span = self._span
        span.set_attribute("trioflow.error.code", failure.code)
        span.set_attribute("error.type", failure.error_type or failure.code)
        span.set_status(self._tracing.error_status, failure.message)

    def stopped(self, why: str) -> None:
        """The step was cut off (``cancelled``, ``interrupted``)."""
        self._span.set_attribute("trioflow.stopped", why)

    def end(self) -> None:
        if self._token is not None:
            self._tracing.detach(self._token)
        self._span.end()
