"""A run as an actor: one task in the engine's nursery with its own cancel scope.

The actor is the only writer of its run. It executes node after node, and
after each node writes one checkpoint (the run record plus the step's log
entries) through the store. Commands reach it through :meth:`RunActor.send`;
a cancel cancels the execution scope at once, so an async node sees
``trio.Cancelled`` at its next checkpoint and a sync node's worker thread is
abandoned (its result discarded).

Nothing a node does can take the engine down: any exception it raises,
``SystemExit`` and ``KeyboardInterrupt`` included, fails its run (only
Trio's own cancellation passes through). A checkpoint the store cannot
write is retried for a while; after that the run fails where the failure
can be written, and otherwise stops where it stands, resumable.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pydantic_core
import trio
from pydantic import BaseModel

from .cancellation import is_cancellation
from .commands import Abandon, Cancel, Command, Drain, Resume, RunHandle, Signal, Start
from .context import RunContext
from .errors import ConditionError, LeaseLostError, RunFailure, StateValidationError, StoreError
from .fanout import FanOutRun
from .graph import Graph, Node
from .logs import Event, Level, LogEntry, bound_data, bound_text
from .planning import decide
from .runs import RunRecord, RunStatus
from .signals import fold_signals

if TYPE_CHECKING:
    from .host import RunHost
    from .observe import Observer
    from .tracing import RunSpan, StepSpan

log = logging.getLogger("trioflow.actor")

#: Longest a run executes steps without letting other tasks run.
YIELD_INTERVAL_S = 0.002
#: A step whose conditions held the event loop this long makes the run sit
#: out POLITE_YIELDS scheduler passes before its next step. A request needs
#: a dozen passes; without this each of them waits for one more heavy step.
POLITE_AFTER_S = 0.001
POLITE_YIELDS = 16
#: Most frames of a failing tool's traceback that are kept, and most characters.
TRACEBACK_FRAMES = 20
TRACEBACK_CHARS = 8192
#: Backoff between attempts of a checkpoint that failed transiently.
STORE_RETRY_FIRST_S = 0.05
STORE_RETRY_MAX_S = 2.0

_INFO = Level.INFO
_NODE_COMPLETED = Event.NODE_COMPLETED.value
_EDGE_TAKEN = Event.EDGE_TAKEN.value
_NODE_STARTED = Event.NODE_STARTED.value


class _RunFailed(Exception):
    """Internal: carries the failure (and the step's unwritten entries) to one place."""

    def __init__(self, failure: RunFailure, entries: Sequence[LogEntry] = ()) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.entries = entries


class _Abandoned(Exception):
    """Internal: the run is no longer this actor's to write (its lease passed on)."""


class _Unwritable(Exception):
    """Internal: the store refused a checkpoint for good (or for longer than we retry)."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(error.message)
        self.error = error


async def _let_others_run() -> None:
    """Sit out POLITE_YIELDS scheduler passes, each cheap when nothing else runs.

    Counting runnable tasks is not enough: a request between two passes often
    waits on its socket, and is runnable only after the next poll for I/O.
    """
    for _ in range(POLITE_YIELDS):
        await trio.lowlevel.checkpoint()


def _answered(record: RunRecord, node_id: str) -> bool:
    """The input this wait node asked for has arrived (the run may go on)."""
    waiting = record.waiting
    return waiting is not None and waiting.get("node") == node_id and bool(waiting.get("answered"))


def _backoff(node: Node, attempt: int) -> float:
    retry = node.retry
    delay = min(retry.backoff_s * retry.multiplier ** (attempt - 1), retry.max_backoff_s)
    if retry.jitter and delay > 0:
        delay = random.uniform(delay / 2, delay)  # jitter, not crypto
    return delay


def format_traceback(exc: BaseException) -> str:
    """The last frames of ``exc``'s traceback, at most :data:`TRACEBACK_CHARS` characters.

    Each part (a frame, the exception's message) is cut to a tenth of the
    budget first, so one huge message cannot push the frames out.
    """
    part_limit = TRACEBACK_CHARS // 10
    parts = traceback.TracebackException.from_exception(exc, limit=-TRACEBACK_FRAMES).format()
    text = "".join(
        part if len(part) <= part_limit else part[:part_limit] + "… [truncated]\n" for part in parts
    )
    if len(text) > TRACEBACK_CHARS:
        text = "…" + text[-(TRACEBACK_CHARS - 1) :]
    return text


class RunActor:
    """Executes one run. Created and started by the engine; never shared."""

    def __init__(
        self,
        host: RunHost,
        graph: Graph,
        record: RunRecord,
        handle: RunHandle,
    ) -> None:
        self.host = host
        self.limits = host.limits
        self.graph = graph
        self.record = record
        self.run_id = record.run_id
        self.handle = handle
        self._started = False
        #: The engine merged the input this run waited for and spawned it to go on.
        self._input_resume = False
        #: Stored signals may be waiting: a run coming back (after a crash, or
        #: from a wait) looks once; a Signal command says so later.
        self._signals_due = record.status is not RunStatus.PENDING
        self._seq = record.last_seq
        self._model: BaseModel | None = None
        self._last_yield = time.perf_counter()
        #: The engine stops: stop at the next step boundary, without ending.
        self._draining = False
        #: This execution's span while tracing is on (trioflow.tracing), and its step's.
        self._span: RunSpan | None = None
        self._step_span: StepSpan | None = None
        #: Why the run stopped at its last checkpoint (the store refused its end).
        self._stalled: str | None = None

    # -- commands --------------------------------------------------------------
    #
    # Every command reaches the actor through its mailbox and one dispatcher.
    # A Cancel has already cancelled the run's scope by the time it is read
    # (RunHandle.send): it must interrupt a node that blocks. The others are
    # taken between steps, or awaited while the run waits for its slot.

    def _dispatch(self, command: Command) -> None:
        match command:
            case Start():
                self._started = True
            case Cancel():
                pass  # the scope is cancelled; the reason is on the handle
            case Signal():
                self.handle.signal_queued = False
                self._signals_due = True
            case Resume():
                self._input_resume = True
            case Drain():
                self._draining = True
            case Abandon():
                pass  # the scope is cancelled; the handle forbids further writes
            case _:  # pragma: no cover - a new command without a handler
                raise TypeError(f"run {self.run_id}: no handler for command {command!r}")

    def _drain(self) -> None:
        """Take every command waiting in the mailbox (between steps: never blocks)."""
        handle = self.handle
        while handle.pending:
            self._dispatch(handle.take_nowait())

    async def _take(self) -> None:
        """Wait for the next command (while parked)."""
        self._dispatch(await self.handle.take())

    # -- lifetime --------------------------------------------------------------

    # KeyboardInterrupt from Ctrl-C is held back while the actor runs (it
    # reaches the program's main task at its next checkpoint): so one raised
    # inside a tool or a condition callable is always their own, and fails
    # only the run.
    @trio.lowlevel.enable_ki_protection
    async def run(self) -> None:
        """The actor's whole life. Never raises except ``Cancelled`` (engine shutdown)."""
        stopped = "drained"  # (for the span) why it stops without an end or a wait
        try:
            await self._execute()
        except _Abandoned:
            stopped = "abandoned"
            log.info("run %s: %s; this engine stopped it", self.run_id, self.handle.abandoned)
        except _Unwritable as exc:
            # Not even the run's end could be stored: it stays at its last
            # checkpoint, resumable, and the engine tells its followers.
            self._stall(exc.error)
        except Exception:
            # A bug: the run must not take the engine down.
            log.exception("run %s crashed", self.run_id)
            await self._record_crash()
        except BaseException:
            stopped = "interrupted"  # the engine stopped
            raise
        finally:
            self.handle.record = self.record
            self.handle.done.set()
            self.host.finished(self.handle)
            observer = self.host.observer
            if observer is not None and self.record.status.is_terminal:
                observer.run_ended(self.graph.id, self.record.status.value)
            span = self._span
            if span is not None:
                self._span = None
                status = self.record.status
                if status.is_terminal or status is RunStatus.WAITING:
                    span.end(self.record)
                elif self._stalled is not None:
                    span.end(self.record, "stalled", self._stalled)
                else:
                    span.end(self.record, stopped)

    def _stall(self, error: StoreError) -> None:
        self._stalled = f"its checkpoint could not be written ({error.message})"
        self.host.stall(self.run_id, error)

    async def _record_crash(self) -> None:
        if self.record.status.is_terminal:
            return
        failure = RunFailure(
            "internal_error", "run stopped on an internal error; see the server log"
        )
        self._seq = self.record.last_seq
        try:
            await self._fail(failure)
        except _Abandoned:
            return
        except _Unwritable as exc:
            self._stall(exc.error)
        except Exception:
            log.exception("could not record the failure of run %s", self.run_id)
            self._stall(StoreError("the failure could not be recorded"))

    async def _execute(self) -> None:
        failure: RunFailure | None = None
        entries: Sequence[LogEntry] = ()
        retry = True
        with self.handle.scope:
            try:
                # Most runs get their slot as they start; a pending one waits
                # for Start (the engine grants slots in FIFO order).
                self._drain()
                self._started = self._started or self.handle.has_slot
                while not self._started and not self._draining:
                    await self._take()
                if self._draining:
                    return  # it never started: nothing to checkpoint
                tracing = self.host.tracing
                if tracing is not None:
                    self._span = tracing.run(self.run_id, self.graph.id)
                if not self._input_resume:  # the engine wrote run_input already
                    await self._begin()
                await self._steps()
            except _RunFailed as exc:
                failure, entries = exc.failure, exc.entries
            except _Unwritable as exc:
                # A step's checkpoint could not be written, even after
                # retrying: fail the run if that much can be stored.
                failure = RunFailure(
                    "store_unavailable",
                    f"a checkpoint could not be written: {exc.error.message}",
                    node=self.record.current_node,
                )
                retry = False
            finally:
                self.host.release_slot(self.handle)
        if self.handle.abandoned is not None:
            # Another engine holds the run now (or may, any moment): whatever
            # happened here, it is not this actor's to record.
            raise _Abandoned
        # Terminal records are written outside the run's scope, so a cancel
        # arriving now cannot interrupt them; only engine shutdown can.
        if failure is not None:
            await self._fail(failure, entries, retry=retry)
        elif self.handle.scope.cancelled_caught and not self.record.status.is_terminal:
            self._seq = self.record.last_seq  # entries of an interrupted step are dropped
            await self._finish(
                RunStatus.CANCELLED,
                Event.RUN_CANCELLED,
                Level.WARNING,
                self.handle.cancel_reason or "cancelled",
                node=self.record.current_node,
            )

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
        limits = self.limits
        if len(message) > limits.max_log_message_chars:
            message = bound_text(message, limits.max_log_message_chars)
            data = {**(data or {}), "truncated": True}
        self._seq += 1
        # Plain str, not the Event member: entries are serialised many times.
        return LogEntry(
            self._seq,
            ts if ts is not None else time.time(),
            level,
            str(event),
            node,
            message,
            data or {},
        )

    async def _save(self, entries: Sequence[LogEntry], **changes: Any) -> None:
        record = self.record.evolve(last_seq=self._seq, updated_at=time.time(), **changes)
        await self._commit(record, entries)

    async def _commit(
        self, record: RunRecord, entries: Sequence[LogEntry], *, retry: bool = True
    ) -> None:
        """Write a checkpoint; on success it becomes ``self.record``.

        A transient store failure is retried with backoff for up to
        ``EngineLimits.store_retry_s``.

        Raises:
            _RunFailed: the run's log would pass ``max_log_entries``.
            _Unwritable: the store refused the checkpoint for good.
        """
        host = self.host
        if not record.status.is_terminal and record.last_seq >= self.limits.max_log_entries:
            # Keep the last entry for the failure that says why.
            self._seq = self.record.last_seq
            raise _RunFailed(
                RunFailure(
                    "log_limit_exceeded",
                    f"the run's log reached max_log_entries={self.limits.max_log_entries}",
                    node=record.current_node,
                )
            )
        delay = STORE_RETRY_FIRST_S
        deadline: float | None = None
        while True:
            if self.handle.abandoned is not None:
                self._seq = self.record.last_seq
                raise _Abandoned
            try:
                observer = host.observer
                if observer is None:
                    await host.store.save_run(record, entries)
                else:
                    began = time.perf_counter()
                    await host.store.save_run(record, entries)
                    observer.commit(time.perf_counter() - began)
            except LeaseLostError as exc:
                # Fenced: another writer claimed the run. Stop, write nothing.
                self._seq = self.record.last_seq
                self.handle.send(Abandon(f"lost the run to another writer ({exc.message})"))
                raise _Abandoned from None
            except StoreError as exc:
                host.store_failed(exc)
                now = trio.current_time()
                if deadline is None:
                    deadline = now + self.limits.store_retry_s
                if not (retry and exc.transient) or now + delay > deadline:
                    self._seq = self.record.last_seq
                    raise _Unwritable(exc) from None
            except BaseException:
                # Not written (a cancel landed in the store's I/O, or it
                # failed): the next entry reuses these seqs, so the stored
                # log stays gapless, and self.record keeps describing what is
                # stored.
                self._seq = self.record.last_seq
                raise
            else:
                if host.store_failing:
                    host.store_recovered()
                self.record = record
                return
            try:
                await trio.sleep(delay)
            except BaseException:
                self._seq = self.record.last_seq
                raise
            delay = min(delay * 2, STORE_RETRY_MAX_S)

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
        retry: bool = True,
        **changes: Any,
    ) -> None:
        data: dict[str, Any] = {"steps": self.record.step}
        room = self.limits.max_log_entries - self.record.last_seq - 1
        if len(entries) > room:
            # The log is full: only the run's end still fits.
            self._seq = self.record.last_seq
            data["dropped_entries"] = len(entries)
            entries = ()
        if error is not None:
            data["error"] = error
        final = self._entry(event, message, level=level, node=node, data=data)
        if self.record.waiting is not None:
            # A run that ends waits for nothing, even if it ends at its wait node.
            changes["waiting"] = None
        if self.record.fanout is not None and status is RunStatus.COMPLETED:
            # The join of its last node's fan-out: nothing is in progress any more.
            # (A failed or cancelled run keeps the branches' last progress.)
            changes["fanout"] = None
        record = self.record.evolve(
            last_seq=self._seq,
            updated_at=time.time(),
            status=status,
            error=error,
            finished_at=time.time(),
            **changes,
        )
        await self._commit(record, [*entries, final], retry=retry)

    async def _fail(
        self, failure: RunFailure, entries: Sequence[LogEntry] = (), *, retry: bool = True
    ) -> None:
        limits = self.limits
        if len(failure.message) > limits.max_log_message_chars:
            message = bound_text(failure.message, limits.max_log_message_chars)
            failure = replace(failure, message=message)
        error = failure.as_dict()
        if "details" in error:
            # The error is kept on the record and in the last log entry: bounded.
            error["details"] = bound_data(error["details"], limits.max_log_data_bytes)
        await self._finish(
            RunStatus.FAILED,
            Event.RUN_FAILED,
            Level.ERROR,
            failure.message,
            entries=entries,
            node=failure.node,
            error=error,
            retry=retry,
        )

    def _custom(self, ctx: RunContext | None) -> list[LogEntry]:
        if ctx is None or not (ctx._lines or ctx._dropped):
            return []
        max_data = self.limits.max_log_data_bytes
        return [
            self._entry(
                Event.CUSTOM,
                msg,
                level=level,
                node=ctx.node_id,
                data=bound_data(data, max_data) if data else {},
                ts=ts,
            )
            for ts, level, msg, data in ctx.take_lines()
        ]

    # -- execution -----------------------------------------------------------

    async def _begin(self) -> None:
        record = self.record
        node = record.current_node or self.graph.start_node
        if record.status is RunStatus.PENDING:
            step = 1
            begun: dict[str, Any] = {"graph_id": self.graph.id}
            if self.host.node_id is not None:
                begun["node"] = self.host.node_id
            first = self._entry(
                Event.RUN_STARTED, f"run started on graph {self.graph.id}", data=begun
            )
            status_changes: dict[str, Any] = {"started_at": time.time()}
        else:
            step = max(record.step, 1)
            data: dict[str, Any] = {"step": step, "attempt": record.attempt + 1}
            if record.crashes:
                data["crashes"] = record.crashes
            if self.host.node_id is not None:
                data["node"] = self.host.node_id
            first = self._entry(
                Event.RUN_RESUMED,
                f"run resumed at node {node} from its last checkpoint",
                node=node,
                data=data,
            )
            status_changes = {"attempt": record.attempt + 1}
        if step > self.graph.max_steps:
            raise _RunFailed(self._max_steps_failure(node), [first])
        started = self._entry(
            Event.NODE_STARTED, f"node {node} started", node=node, data={"step": step}
        )
        await self._save(
            [first, started],
            status=RunStatus.RUNNING,
            current_node=node,
            step=step,
            **status_changes,
        )

    def _max_steps_failure(self, node: str) -> RunFailure:
        return RunFailure(
            "max_steps_exceeded",
            f"the run reached max_steps={self.graph.max_steps} before node {node}",
            node=node,
        )

    def _current_model(self) -> BaseModel:
        model = self._model
        if model is None:
            model = self.graph.state.load(self.record.state)
        # A node may mutate what it is given; it gets this instance once.
        self._model = None
        return model

    async def _steps(self) -> None:
        graph = self.graph
        max_state_bytes = self.limits.max_state_bytes
        while True:
            if self.handle.pending:
                self._drain()
                if self._draining:
                    return  # the last step is checkpointed: the run stays running
            if self._signals_due and self.record.fanout is None:
                # (During a fan-out signals wait for its join: the merge starts from
                # the state at the fan-out, which they must not change.)
                await self._apply_signals()
            record = self.record
            node_id = record.current_node
            if node_id is None:  # pragma: no cover - _begin always sets it
                raise _RunFailed(RunFailure("internal_error", "run has no current node"))
            node = graph.nodes[node_id]
            if node.wait is not None and not _answered(record, node_id):
                await self._park(node)
                return
            result: Any
            if node.fanout is not None:
                # Branches checkpoint as they go: the record moved on (log, steps).
                result, joined = await FanOutRun(self, node, node.fanout).run(record.state)
                record = self.record
                entries = [self._entry(e, m, level=lv, node=n, data=d) for e, m, lv, n, d in joined]
            else:
                tool = node.tool
                # Only a tool that takes (state, ctx) can log custom lines.
                ctx = (
                    RunContext(
                        self.run_id,
                        graph.id,
                        node_id,
                        record.step,
                        1,
                        _max_lines=self.limits.max_log_lines_per_step,
                    )
                    if tool is not None and tool.arity == 2
                    else None
                )
                span = self._span
                observer = self.host.observer
                if span is not None and span.recording:
                    result = await self._call_traced(node, ctx, span, observer)
                elif observer is None:
                    result = await self._call_node(node, ctx) if tool is not None else None
                else:
                    began = time.perf_counter()
                    try:
                        result = await self._call_node(node, ctx) if tool is not None else None
                    finally:
                        observer.step(graph.id, node_id, time.perf_counter() - began)
                entries = self._custom(ctx)
            try:
                applied = graph.state.apply(record.state, result, node_id)
            except StateValidationError as exc:
                failure = RunFailure(
                    "state_invalid", exc.message, node=node_id, extra={"errors": exc.errors}
                )
                raise _RunFailed(failure, entries) from None
            model: BaseModel | None
            if applied is None:
                model, state = None, record.state
            else:
                model, state = applied
                size = len(pydantic_core.to_json(state))
                if size > max_state_bytes:
                    raise _RunFailed(
                        RunFailure(
                            "state_too_large",
                            f"node {node_id} made the state {size} bytes; the limit is "
                            f"{max_state_bytes}",
                            node=node_id,
                            extra={"bytes": size, "maximum": max_state_bytes},
                        ),
                        entries,
                    )
            metered = graph.outgoing[node_id].metered
            if metered:
                started = time.perf_counter()
            try:
                source = model if model is not None else self._current_model
                decision = decide(graph, node_id, source, state, record.loop_counters)
            except ConditionError as exc:
                entries.append(self._completed(node_id, record.step))
                await self._save(entries, state=state)
                raise _RunFailed(
                    RunFailure(exc.reason, exc.message, node=exc.node, edge=exc.edge)
                ) from None
            self._model = model
            polite = metered and time.perf_counter() - started >= POLITE_AFTER_S
            now = time.time()  # one timestamp for the step's bookkeeping entries
            self._seq += 1
            entries.append(
                LogEntry(
                    self._seq,
                    now,
                    _INFO,
                    _NODE_COMPLETED,
                    node_id,
                    node.completed_message,
                    {"step": record.step},
                )
            )
            for spent in decision.exhausted:
                entries.append(
                    self._entry(
                        Event.LOOP_EXHAUSTED,
                        f"loop {spent.key} reached max_iterations={spent.max_iterations}",
                        level=Level.WARNING,
                        node=node_id,
                        data={"edge": spent.key, "max_iterations": spent.max_iterations},
                    )
                )
            edge = decision.edge
            if edge is None:
                await self._finish(
                    RunStatus.COMPLETED,
                    Event.RUN_COMPLETED,
                    Level.INFO,
                    "run completed",
                    entries=entries,
                    state=state,
                )
                return
            counters = record.loop_counters
            data: dict[str, Any] = {"edge": edge.key, "type": edge.type}
            if edge.type == "loop":
                counters = {**counters, edge.key: counters.get(edge.key, 0) + 1}
                data["iteration"] = counters[edge.key]
            self._seq += 1
            entries.append(
                LogEntry(self._seq, now, _INFO, _EDGE_TAKEN, node_id, edge.taken_message, data)
            )
            step = record.step + 1
            if step > graph.max_steps:
                await self._save(entries, state=state, loop_counters=counters)
                raise _RunFailed(self._max_steps_failure(edge.target))
            # The hot path: build the next record positionally (evolve() with
            # keyword changes costs several microseconds more per step). A
            # completed step resets the crash count (0, the last field).
            self._seq += 1
            entries.append(
                LogEntry(
                    self._seq,
                    now,
                    _INFO,
                    _NODE_STARTED,
                    edge.target,
                    graph.nodes[edge.target].started_message,
                    {"step": step},
                )
            )
            # (crashes back to 0, no wait answered any more, the same signal cursor
            # and epoch)
            await self._commit(
                RunRecord(
                    record.run_id,
                    record.graph_id,
                    RunStatus.RUNNING,
                    state,
                    edge.target,
                    step,
                    counters,
                    None,
                    record.created_at,
                    record.started_at,
                    None,
                    now,
                    self._seq,
                    record.attempt,
                    0,
                    None,
                    record.signal_cursor,
                    record.epoch,
                ),
                entries,
            )
            # Steps of inline tools on the memory store never block. Yield at
            # least every YIELD_INTERVAL_S so that one long run cannot starve
            # the process and a cancel is seen promptly (a cancel can only be
            # posted while this task is suspended, so checking for one in
            # between is pointless); yielding on every step would cost more
            # than the step itself.
            tick = time.perf_counter()
            if tick - self._last_yield >= YIELD_INTERVAL_S:
                await trio.lowlevel.checkpoint()
                if polite:
                    await _let_others_run()
                self._last_yield = time.perf_counter()

    async def _park(self, node: Node) -> None:
        """Stop at a wait: one checkpoint (status ``waiting``), then the actor ends.

        Nothing of the run stays in memory: the store holds it, the engine's
        timer finds its deadline there, and a resume starts a new actor.
        """
        plan = node.wait
        if plan is None:  # pragma: no cover - called for wait nodes only
            raise TypeError(f"node {node.id} does not wait")
        request_id = os.urandom(8).hex()
        deadline = None if plan.timeout_s is None else self.host.wall() + plan.timeout_s
        waiting = {
            "node": node.id,
            **plan.describe(),
            "request_id": request_id,
            "deadline": deadline,
            "answered": False,
        }
        # Bounded already: the prompt and the schema come from the graph
        # document (and are shared with it, not copied, in a memory store).
        data = {"request_id": request_id, "deadline": deadline, **plan.describe()}
        message = plan.prompt or f"waiting for input at node {node.id}"
        entry = self._entry(Event.RUN_WAITING, message, node=node.id, data=data)
        await self._save([entry], status=RunStatus.WAITING, waiting=waiting)
        self.host.parked(deadline)

    async def _apply_signals(self) -> None:
        """Apply the stored signals after the run's cursor, in one checkpoint per batch."""
        self._signals_due = False
        while True:
            record = self.record
            pending = await self.host.store.signals_after(record.run_id, record.signal_cursor)
            if not pending:
                return

            def entry(
                event: str, message: str, level: Level, node: str | None, data: dict[str, Any]
            ) -> LogEntry:
                return self._entry(event, message, level=level, node=node, data=data)

            folded = fold_signals(
                self.graph,
                record.state,
                pending,
                node=record.current_node,
                max_state_bytes=self.limits.max_state_bytes,
                max_data_bytes=self.limits.max_log_data_bytes,
                entry=entry,
            )
            if folded.changed:
                self._model = None  # the next node gets the state with the signals
            await self._save(folded.entries, state=folded.state, signal_cursor=folded.cursor)

    def _completed(self, node_id: str, step: int) -> LogEntry:
        return self._entry(
            Event.NODE_COMPLETED, f"node {node_id} completed", node=node_id, data={"step": step}
        )

    async def _call_traced(
        self, node: Node, ctx: RunContext | None, span: RunSpan, observer: Observer | None
    ) -> Any:
        """The step in a span of its own (and told to ``observer``, if any)."""
        step = self._step_span = span.step(node.id, self.record.step, self.record.attempt)
        began = time.perf_counter()
        try:
            return await self._call_node(node, ctx) if node.tool is not None else None
        except _RunFailed as exc:
            step.failed(exc.failure)
            raise
        except BaseException:
            step.stopped("cancelled" if self.handle.cancel_requested else "interrupted")
            raise
        finally:
            if observer is not None:
                observer.step(self.graph.id, node.id, time.perf_counter() - began)
            self._step_span = None
            step.end()

    async def _call_node(self, node: Node, ctx: RunContext | None) -> Any:
        attempt = 1
        limit = self.limits.max_log_message_chars
        while True:
            if ctx is not None:
                ctx.attempt = attempt
            error: BaseException
            try:
                if node.timeout_s is None:
                    return await self._invoke(node, ctx)
                # Only this scope's deadline is a node timeout: a tool's own
                # trio.TooSlowError is an error like any other.
                with trio.move_on_after(node.timeout_s):
                    return await self._invoke(node, ctx)
                error = TimeoutError(f"node timed out after {node.timeout_s:g}s")
                code = "node_timeout"
            except BaseException as exc:
                # Whatever the tool raised fails the run, SystemExit and
                # KeyboardInterrupt included; only Trio's cancellation (of the
                # run, or of the engine) passes through.
                if is_cancellation(exc):
                    raise
                error, code = exc, "node_failed"
            text = bound_text(str(error), limit)
            message = bound_text(f"node {node.id} failed: {type(error).__name__}: {text}", limit)
            step = self._step_span
            if attempt >= node.retry.max_attempts:
                if step is not None:
                    step.attempt_failed(error, attempt)
                extra: dict[str, Any] = {"attempts": attempt}
                if code == "node_failed":
                    extra["traceback"] = tb = format_traceback(error)
                    log.error(
                        "run %s: node %s failed after %d attempt(s):\n%s",
                        self.run_id,
                        node.id,
                        attempt,
                        tb,
                    )
                entries = self._custom(ctx)
                entries.append(
                    self._entry(
                        Event.NODE_FAILED,
                        message,
                        level=Level.ERROR,
                        node=node.id,
                        data={"attempt": attempt, "type": type(error).__name__, "error": text},
                    )
                )
                await self._save(entries)
                raise _RunFailed(
                    RunFailure(
                        code, message, node=node.id, error_type=type(error).__name__, extra=extra
                    )
                )
            delay = _backoff(node, attempt)
            if step is not None:
                step.attempt_failed(error, attempt, delay)
            entries = self._custom(ctx)
            entries.append(
                self._entry(
                    Event.NODE_RETRYING,
                    f"{message}; retrying in {delay:.3g}s",
                    level=Level.WARNING,
                    node=node.id,
                    data={
                        "attempt": attempt,
                        "delay_s": delay,
                        "type": type(error).__name__,
                        "error": text,
                    },
                )
            )
            await self._save(entries)
            await trio.sleep(delay)
            attempt += 1

    async def _invoke(self, node: Node, ctx: RunContext | None) -> Any:
        return await self.invoke(node, self._current_model(), ctx)

    # -- what a fan-out (trioflow.fanout) uses of the actor --------------------------

    run_failed_type = _RunFailed

    @staticmethod
    def run_failed(failure: RunFailure, entries: Sequence[LogEntry] = ()) -> _RunFailed:
        """The exception that fails the run with ``failure``."""
        return _RunFailed(failure, entries)

    def make_entry(
        self, event: str, message: str, level: Level, node: str | None, data: dict[str, Any]
    ) -> LogEntry:
        """The run's next log entry (its seq is taken now)."""
        return self._entry(event, message, level=level, node=node, data=data)

    async def save_checkpoint(self, entries: Sequence[LogEntry], **changes: Any) -> None:
        """A checkpoint of the run record with ``changes`` and ``entries`` appended."""
        await self._save(entries, **changes)

    def max_steps_failure(self, node: str) -> RunFailure:
        return self._max_steps_failure(node)

    async def invoke(self, node: Node, model: BaseModel, ctx: RunContext | None) -> Any:
        """Call the node's tool with ``model`` (and ``ctx`` if it takes one)."""
        tool = node.tool
        if tool is None:  # pragma: no cover - _steps calls tools only
            return None
        args: tuple[Any, ...] = (model, ctx)[: tool.arity]
        if tool.is_async:
            return await tool.func(*args)
        if tool.inline:
            return tool.func(*args)
        return await trio.to_thread.run_sync(
            functools.partial(tool.func, *args),
            abandon_on_cancel=True,
            limiter=self.host.thread_limiter,
        )
