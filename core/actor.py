"""A run as an actor: one task in the engine's nursery with its own cancel scope.

The actor is the only writer of its run. It executes node after node, and
after each node writes one checkpoint (the run record plus the step's log
entries) through the store. Commands reach it through :meth:`RunActor.send`;
a cancel cancels the execution scope at once, so an async node sees
``trio.Cancelled`` at its next checkpoint and a sync node's worker thread is
abandoned (its result discarded).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from pydantic import BaseModel

from .context import RunContext
from .errors import ConditionError, RunFailure, StateValidationError
from .graph import Graph, Node
from .logs import Event, Level, LogEntry
from .planning import decide
from .runs import RunRecord, RunStatus

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("trioflow.actor")

#: Longest a run executes steps without letting other tasks run.
YIELD_INTERVAL_S = 0.002

_INFO = Level.INFO
_NODE_COMPLETED = Event.NODE_COMPLETED.value
_EDGE_TAKEN = Event.EDGE_TAKEN.value
_NODE_STARTED = Event.NODE_STARTED.value


@dataclass(frozen=True, slots=True)
class Cancel:
    """Command: end the run ``cancelled`` now."""

    reason: str = "cancelled by request"


Command = Cancel


class _RunFailed(Exception):
    """Internal: carries the failure out of the step loop to one place that records it."""

    def __init__(self, failure: RunFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def _backoff(node: Node, attempt: int) -> float:
    retry = node.retry
    delay = min(retry.backoff_s * retry.multiplier ** (attempt - 1), retry.max_backoff_s)
    if retry.jitter and delay > 0:
        delay = random.uniform(delay / 2, delay)  # jitter, not crypto
    return delay


class RunActor:
    """Executes one run. Created and started by the engine; never shared."""

    def __init__(self, engine: Engine, graph: Graph, record: RunRecord) -> None:
        self.engine = engine
        self.graph = graph
        self.record = record
        self.run_id = record.run_id
        self.done = trio.Event()
        #: True once the engine gave this run a running slot (Engine._spawn,
        #: Engine._grant); a pending run waits on ``_granted``, made only then.
        self.has_slot = False
        self._granted: trio.Event | None = None
        self._scope = trio.CancelScope()
        self._cancel_reason: str | None = None
        self._seq = record.last_seq
        self._model: BaseModel | None = None
        self._last_yield = time.perf_counter()

    # -- commands --------------------------------------------------------------
    #
    # Cancel is the one command today. It must take effect while a node
    # blocks, so it is delivered as a signal: posting it cancels the run's
    # execution scope at once, and the actor records the outcome itself. No
    # reader task per run is needed, which halves the cost of starting a run
    # and the memory of a parked one (see docs/semantics.md, "Actors").

    def send(self, command: Command) -> None:
        """Post a command to the run. Posting to a finished run does nothing."""
        if self.done.is_set():
            return
        if self._cancel_reason is None:
            self._cancel_reason = command.reason
            self._scope.cancel()

    def grant_slot(self) -> None:
        """Called by the engine: this run may execute now."""
        self.has_slot = True
        if self._granted is not None:
            self._granted.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_reason is not None

    # -- lifetime --------------------------------------------------------------

    async def run(self) -> None:
        """The actor's whole life. Never raises except ``Cancelled`` (engine shutdown)."""
        try:
            await self._execute()
        except Exception:
            # A bug or a store failure: the run must not take the engine down.
            log.exception("run %s crashed", self.run_id)
            await self._record_crash()
        finally:
            self.done.set()
            self.engine._forget(self)

    async def _record_crash(self) -> None:
        if self.record.status.is_terminal:
            return
        failure = RunFailure("internal_error",
                             "run stopped on an internal error; see the server log")  # fmt: skip
        try:
            await self._finish(RunStatus.FAILED, Event.RUN_FAILED, Level.ERROR,
                               failure.message, error=failure.as_dict())  # fmt: skip
        except Exception:
            log.exception("could not record the failure of run %s", self.run_id)

    async def _execute(self) -> None:
        failure: RunFailure | None = None
        with self._scope:
            try:
                if not self.has_slot:  # pending: the engine grants slots in FIFO order
                    self._granted = trio.Event()
                    await self._granted.wait()
                await self._begin()
                await self._steps()
            except _RunFailed as exc:
                failure = exc.failure
            finally:
                self.engine._release_slot(self)
        # Terminal records are written outside the run's scope, so a cancel
        # arriving now cannot interrupt them; only engine shutdown can.
        if failure is not None:
            await self._fail(failure)
        elif self._scope.cancelled_caught and not self.record.status.is_terminal:
            await self._finish(
                RunStatus.CANCELLED, Event.RUN_CANCELLED, Level.WARNING,
                self._cancel_reason or "cancelled", node=self.record.current_node,
            )  # fmt: skip

    # -- log and checkpoint helpers ------------------------------------------

    def _entry(
        self,
        event: str,
        message: str,
        *,
        level: Level = Level.INFO,
        node: str | None = None,
        data: dict[str, Any] | None = None,
        ts: float | None = None,
    ) -> LogEntry:
        self._seq += 1
        # Plain str, not the Event member: entries are serialised many times.
        return LogEntry(self._seq, ts if ts is not None else time.time(), level, str(event),
                        node, message, data or {})  # fmt: skip

    async def _save(self, entries: Sequence[LogEntry], **changes: Any) -> None:
        record = self.record.evolve(last_seq=self._seq, updated_at=time.time(), **changes)
        await self._commit(record, entries)

    async def _commit(self, record: RunRecord, entries: Sequence[LogEntry]) -> None:
        """Write a checkpoint; on success it becomes ``self.record``."""
        try:
            await self.engine.store.save_run(record, entries)
        except BaseException:
            # Not written (a cancel landed in the store's I/O, or it failed):
            # the next entry reuses these seqs, so the stored log stays
            # gapless, and self.record keeps describing what is stored.
            self._seq = self.record.last_seq
            raise
        self.record = record

    async def _finish(
        self,
        status: RunStatus,
        event: Event,
        level: Level,
        message: str,
        *,
        entries: Sequence[LogEntry] = (),
        node: str | None = None,
        error: dict[str, Any] | None = None,
        **changes: Any,
    ) -> None:
        data: dict[str, Any] = {"steps": self.record.step}
        if error is not None:
            data["error"] = error
        final = self._entry(event, message, level=level, node=node, data=data)
        await self._save([*entries, final], status=status, error=error,
                         finished_at=time.time(), **changes)  # fmt: skip

    async def _fail(self, failure: RunFailure, entries: Sequence[LogEntry] = ()) -> None:
        await self._finish(RunStatus.FAILED, Event.RUN_FAILED, Level.ERROR, failure.message,
                           entries=entries, node=failure.node, error=failure.as_dict())  # fmt: skip

    def _custom(self, ctx: RunContext | None) -> list[LogEntry]:
        if ctx is None or not ctx._lines:
            return []
        return [
            self._entry(Event.CUSTOM, msg, level=level, node=ctx.node_id, data=data, ts=ts)
            for ts, level, msg, data in ctx.take_lines()
        ]

    # -- execution -----------------------------------------------------------

    async def _begin(self) -> None:
        record = self.record
        node = record.current_node or self.graph.start_node
        if record.status is RunStatus.PENDING:
            step = 1
            first = self._entry(Event.RUN_STARTED, f"run started on graph {self.graph.id}",
                                data={"graph_id": self.graph.id})  # fmt: skip
            status_changes: dict[str, Any] = {"started_at": time.time()}
        else:
            step = max(record.step, 1)
            first = self._entry(
                Event.RUN_RESUMED, f"run resumed at node {node} from its last checkpoint",
                node=node, data={"step": step, "attempt": record.attempt + 1},
            )  # fmt: skip
            status_changes = {"attempt": record.attempt + 1}
        if step > self.graph.max_steps:
            raise _RunFailed(self._max_steps_failure(node))
        started = self._entry(Event.NODE_STARTED, f"node {node} started", node=node,
                              data={"step": step})  # fmt: skip
        await self._save([first, started], status=RunStatus.RUNNING, current_node=node, step=step,
                         **status_changes)  # fmt: skip

    def _max_steps_failure(self, node: str) -> RunFailure:
        return RunFailure("max_steps_exceeded",
                          f"the run reached max_steps={self.graph.max_steps} before node {node}",
                          node=node)  # fmt: skip

    def _current_model(self) -> BaseModel:
        model = self._model
        if model is None:
            model = self.graph.state.load(self.record.state)
        # A node may mutate what it is given; it gets this instance once.
        self._model = None
        return model

    async def _steps(self) -> None:
        graph = self.graph
        while True:
            record = self.record
            node_id = record.current_node
            if node_id is None:  # pragma: no cover - _begin always sets it
                raise _RunFailed(RunFailure("internal_error", "run has no current node"))
            node = graph.nodes[node_id]
            # Only a tool that takes (state, ctx) can log custom lines.
            ctx = (RunContext(self.run_id, graph.id, node_id, record.step, 1)
                   if node.tool.arity == 2 else None)  # fmt: skip
            result = await self._call_node(node, ctx)
            entries = self._custom(ctx)
            try:
                applied = graph.state.apply(record.state, result, node_id)
            except StateValidationError as exc:
                raise _RunFailed(RunFailure("state_invalid", exc.message, node=node_id,
                                            extra={"errors": exc.errors})) from None  # fmt: skip
            model: BaseModel | None
            if applied is None:
                model, state = None, record.state
            else:
                model, state = applied
            try:
                source = model if model is not None else self._current_model
                decision = decide(graph, node_id, source, state,
                                  record.loop_counters)  # fmt: skip
            except ConditionError as exc:
                entries.append(self._completed(node_id, record.step))
                await self._save(entries, state=state)
                raise _RunFailed(RunFailure(exc.reason, exc.message, node=exc.node,
                                            edge=exc.edge)) from None  # fmt: skip
            self._model = model
            now = time.time()  # one timestamp for the step's bookkeeping entries
            self._seq += 1
            entries.append(LogEntry(self._seq, now, _INFO, _NODE_COMPLETED, node_id,
                                    node.completed_message, {"step": record.step}))  # fmt: skip
            for spent in decision.exhausted:
                entries.append(self._entry(
                    Event.LOOP_EXHAUSTED,
                    f"loop {spent.key} reached max_iterations={spent.max_iterations}",
                    level=Level.WARNING, node=node_id,
                    data={"edge": spent.key, "max_iterations": spent.max_iterations},
                ))  # fmt: skip
            edge = decision.edge
            if edge is None:
                await self._finish(RunStatus.COMPLETED, Event.RUN_COMPLETED, Level.INFO,
                                   "run completed", entries=entries, state=state)  # fmt: skip
                return
            counters = record.loop_counters
            data: dict[str, Any] = {"edge": edge.key, "type": edge.type}
            if edge.type == "loop":
                counters = {**counters, edge.key: counters.get(edge.key, 0) + 1}
                data["iteration"] = counters[edge.key]
            self._seq += 1
            entries.append(LogEntry(self._seq, now, _INFO, _EDGE_TAKEN, node_id,
                                    edge.taken_message, data))  # fmt: skip
            step = record.step + 1
            if step > graph.max_steps:
                await self._save(entries, state=state, loop_counters=counters)
                raise _RunFailed(self._max_steps_failure(edge.target))
            # The hot path: build the next record positionally (evolve() with
            # keyword changes costs several microseconds more per step).
            self._seq += 1
            entries.append(LogEntry(self._seq, now, _INFO, _NODE_STARTED, edge.target,
                                    graph.nodes[edge.target].started_message,
                                    {"step": step}))  # fmt: skip
            await self._commit(RunRecord(
                record.run_id, record.graph_id, RunStatus.RUNNING, state, edge.target, step,
                counters, None, record.created_at, record.started_at, None, now, self._seq,
                record.attempt,
            ), entries)  # fmt: skip
            # Steps of inline tools on the memory store never block. Yield at
            # least every YIELD_INTERVAL_S so that one long run cannot starve
            # the process and a cancel is seen promptly (a cancel can only be
            # posted while this task is suspended, so checking for one in
            # between is pointless); yielding on every step would cost more
            # than the step itself.
            tick = time.perf_counter()
            if tick - self._last_yield >= YIELD_INTERVAL_S:
                self._last_yield = tick
                await trio.lowlevel.checkpoint()

    def _completed(self, node_id: str, step: int) -> LogEntry:
        return self._entry(Event.NODE_COMPLETED, f"node {node_id} completed", node=node_id,
                           data={"step": step})  # fmt: skip

    async def _call_node(self, node: Node, ctx: RunContext | None) -> Any:
        attempt = 1
        while True:
            if ctx is not None:
                ctx.attempt = attempt
            try:
                if node.timeout_s is None:
                    return await self._invoke(node, ctx)
                with trio.fail_after(node.timeout_s):
                    return await self._invoke(node, ctx)
            except trio.TooSlowError:
                error: BaseException = TimeoutError(f"node timed out after {node.timeout_s}s")
                code = "node_timeout"
            except Exception as exc:  # the tool's own error; Cancelled is not an Exception
                error, code = exc, "node_failed"
            message = f"node {node.id} failed: {type(error).__name__}: {error}"
            if attempt >= node.retry.max_attempts:
                entries = self._custom(ctx)
                entries.append(self._entry(Event.NODE_FAILED, message, level=Level.ERROR,
                                           node=node.id,
                                           data={"attempt": attempt, "type": type(error).__name__,
                                                 "error": str(error)}))  # fmt: skip
                await self._save(entries)
                raise _RunFailed(RunFailure(code, message, node=node.id,
                                            error_type=type(error).__name__,
                                            extra={"attempts": attempt}))  # fmt: skip
            delay = _backoff(node, attempt)
            entries = self._custom(ctx)
            entries.append(self._entry(
                Event.NODE_RETRYING, f"{message}; retrying in {delay:.3g}s", level=Level.WARNING,
                node=node.id, data={"attempt": attempt, "delay_s": delay,
                                    "type": type(error).__name__, "error": str(error)},
            ))  # fmt: skip
            await self._save(entries)
            await trio.sleep(delay)
            attempt += 1

    async def _invoke(self, node: Node, ctx: RunContext | None) -> Any:
        tool = node.tool
        model = self._current_model()
        args: tuple[Any, ...] = (model, ctx)[: tool.arity]
        if tool.is_async:
            return await tool.func(*args)
        if tool.inline:
            return tool.func(*args)
        return await trio.to_thread.run_sync(
            functools.partial(tool.func, *args),
            abandon_on_cancel=True,
            limiter=self.engine._thread_limiter,
        )
