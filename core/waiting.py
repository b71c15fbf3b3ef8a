"""The engine's side of waits and signals: resume, time out, and signal runs.

A run waiting for input holds no task: it is a row in the store. This module
wakes it:

* :meth:`Waiting.resume` checks the input against the wait, merges it into
  the state as a node's update would be, and writes ``run_input`` on top of
  the waiting record in one conditional checkpoint, so of two concurrent
  resumes exactly one wins; then it starts an actor that goes on from the
  wait's node (its callable, if any, then its edges);
* :meth:`Waiting.watch_deadlines` sleeps until the store's earliest deadline
  and times out what is due: ``wait_timed_out``, then the run fails, or
  resumes with the wait's ``on_timeout`` input;
* :meth:`Waiting.signal` stores a signal before it returns, then tells the
  run's actor, or applies it itself to a waiting run (which keeps waiting).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pydantic_core
import trio

from .commands import Resume, Signal
from .errors import (
    CapacityError,
    EngineError,
    GraphValidationError,
    LimitExceededError,
    RunFailure,
    RunStateError,
    StaleRequestError,
    StateValidationError,
    StoreConflictError,
    StoreError,
    UnknownGraphError,
    UnknownRunError,
)
from .graph import Graph
from .host import RunHost
from .logs import Event, Level, LogEntry, bound_data
from .runs import RunRecord, RunStatus
from .signals import fold_signals
from .state import json_problem
from .stores.base import StoredSignal

log = logging.getLogger("trioflow.engine")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: Most due waits handled per pass of the deadline timer.
DUE_BATCH = 100
#: Pause of the deadline timer after a store error.
TIMER_RETRY_S = 1.0
#: Most attempts when another writer moved a run between read and write.
ATTEMPTS = 5

GraphLookup = Callable[[str], Awaitable[Graph]]


class Waiting:
    """Resumes, signals and wait deadlines of one engine's runs."""

    def __init__(self, host: RunHost, graph_of: GraphLookup) -> None:
        self._host = host
        self._store = host.store
        self._limits = host.limits
        self._graph_of = graph_of

    # -- resume ------------------------------------------------------------------

    async def resume(self, run_id: str, value: Any, request_id: str | None = None) -> RunRecord:
        """See :meth:`trioflow.Engine.resume`."""
        for _ in range(ATTEMPTS):
            record = await self._get(run_id)
            waiting = record.waiting
            if record.status is not RunStatus.WAITING or not waiting or waiting.get("answered"):
                raise RunStateError(run_id, record.status.value, "resume")
            if request_id is not None and request_id != waiting.get("request_id"):
                raise StaleRequestError(run_id, request_id, waiting.get("request_id"))
            graph = await self._graph_of(record.graph_id)
            node = graph.nodes[waiting["node"]]
            if node.wait is None:  # pragma: no cover - the stored graph changed under the run
                raise RunStateError(run_id, "waiting at a node that no longer waits", "resume")
            try:
                checked = node.wait.check(value)
            except EngineError as exc:
                exc.details["run_id"] = run_id
                raise
            self._check_size(checked, "input")
            self._check_capacity()
            new, entry = self._answer(graph, record, checked, Event.RUN_INPUT, "input received")
            try:
                await self._store.save_run(new, [entry], claim=True)
            except StoreConflictError:
                continue  # cancelled, resumed or signalled meanwhile: look again
            self._host.spawn(graph, new, Resume(checked, waiting.get("request_id")))
            return new
        raise RunStateError(run_id, "changing", "resume")

    def _answer(
        self,
        graph: Graph,
        record: RunRecord,
        checked: dict[str, Any],
        event: Event,
        message: str,
        first: list[LogEntry] | None = None,
    ) -> tuple[RunRecord, LogEntry]:
        """The record and entry that take ``record`` out of its wait with ``checked`` merged.

        Raises:
            StateValidationError: the state model rejects the merged state.
            LimitExceededError: the merged state is over ``max_state_bytes``.
        """
        waiting = dict(record.waiting or {})
        node = waiting.get("node")
        applied = graph.state.apply(record.state, checked, str(node))
        state = record.state if applied is None else applied[1]
        self._check_size(state, "state")
        seq = record.last_seq + 1 + len(first or [])
        data = {"request_id": waiting.get("request_id"), "input": checked}
        entry = LogEntry(
            seq,
            time.time(),
            Level.INFO,
            event.value,
            node,
            message,
            bound_data(data, self._limits.max_log_data_bytes),
        )
        waiting["answered"] = True
        # A claim: the run belongs to no engine while it waits; this one takes it.
        new = record.evolve(
            status=RunStatus.RUNNING,
            state=state,
            waiting=waiting,
            last_seq=seq,
            updated_at=time.time(),
            epoch=record.epoch + 1,
        )
        return new, entry

    def _check_size(self, value: dict[str, Any], what: str) -> None:
        size = len(pydantic_core.to_json(value))
        if size > self._limits.max_state_bytes:
            raise LimitExceededError(
                f"the {what} would be {size} bytes; the limit is {self._limits.max_state_bytes}",
                limit="max_state_bytes",
                value=size,
                maximum=self._limits.max_state_bytes,
            )

    def _check_capacity(self) -> None:
        active, maximum = len(self._host.handles), self._limits.max_active_runs
        if active >= maximum:
            raise CapacityError(
                f"{active} runs are active; the limit is {maximum}", details={"limit": maximum}
            )

    async def _get(self, run_id: str) -> RunRecord:
        record = await self._store.get_run(run_id)
        if record is None:
            raise UnknownRunError(run_id)
        return record

    # -- deadlines ---------------------------------------------------------------

    async def watch_deadlines(self, poll_s: float | None = None) -> None:
        """Time out waits as their deadlines pass. Runs for the engine's lifetime.

        ``poll_s``: look at the store at least this often (on a shared
        store, other nodes park runs with deadlines this one is not told of).
        """
        while True:
            changed = self._host.deadlines_changed = trio.Event()
            try:
                deadline = await self._store.next_deadline()
                if deadline is None:
                    with trio.move_on_after(poll_s if poll_s is not None else math.inf):
                        await changed.wait()
                    continue
                delay = deadline - self._host.wall()
                if poll_s is not None:
                    delay = min(delay, poll_s)
                if delay > 0:
                    with trio.move_on_after(delay):
                        await changed.wait()
                    continue
                for record in await self._store.due_waits(self._host.wall(), limit=DUE_BATCH):
                    await self._time_out(record)
            except StoreError as exc:
                log.warning("wait deadlines: %s; trying again in %g s", exc.message, TIMER_RETRY_S)
                await trio.sleep(TIMER_RETRY_S)

    async def _time_out(self, record: RunRecord) -> None:
        waiting = record.waiting or {}
        node_id = str(waiting.get("node"))
        timed_out = LogEntry(
            record.last_seq + 1,
            time.time(),
            Level.WARNING,
            Event.WAIT_TIMED_OUT.value,
            node_id,
            f"the wait at node {node_id} timed out",
            {"request_id": waiting.get("request_id"), "deadline": waiting.get("deadline")},
        )
        try:
            graph = await self._graph_of(record.graph_id)
        except (UnknownGraphError, GraphValidationError) as exc:
            failure = RunFailure("graph_unavailable", f"cannot go on: {exc.message}", node=node_id)
            await self._end(record, [timed_out], failure)
            return
        plan = graph.nodes[node_id].wait if node_id in graph.nodes else None
        if plan is None or plan.on_timeout_input is None:
            failure = RunFailure(
                "wait_timed_out", f"the wait at node {node_id} timed out", node=node_id
            )
            await self._end(record, [timed_out], failure)
            return
        try:
            new, entry = self._answer(
                graph,
                record,
                plan.on_timeout_input,
                Event.RUN_INPUT,
                "the wait timed out: its on_timeout input is used",
                first=[timed_out],
            )
        except (StateValidationError, LimitExceededError) as exc:
            failure = RunFailure("state_invalid", exc.message, node=node_id)
            await self._end(record, [timed_out], failure)
            return
        try:
            await self._store.save_run(new, [timed_out, entry], claim=True)
        except StoreConflictError:
            return  # resumed or cancelled meanwhile
        self._host.spawn(graph, new, Resume(plan.on_timeout_input, waiting.get("request_id")))

    async def _end(self, record: RunRecord, entries: list[LogEntry], failure: RunFailure) -> None:
        now = time.time()
        error = failure.as_dict()
        final_entry = LogEntry(
            record.last_seq + len(entries) + 1,
            now,
            Level.ERROR,
            Event.RUN_FAILED.value,
            failure.node,
            failure.message,
            {"steps": record.step, "error": error},
        )
        final = record.evolve(
            status=RunStatus.FAILED,
            error=error,
            waiting=None,
            finished_at=now,
            updated_at=now,
            last_seq=final_entry.seq,
            epoch=record.epoch + 1,
        )
        try:
            await self._store.save_run(final, [*entries, final_entry], claim=True)
        except StoreConflictError:
            return  # resumed or cancelled meanwhile
        self._store.notifier.notify(record.run_id)

    # -- signals -----------------------------------------------------------------

    async def signal(self, run_id: str, name: str, updates: Mapping[str, Any]) -> StoredSignal:
        """See :meth:`trioflow.Engine.signal`."""
        if not isinstance(name, str) or not 1 <= len(name) <= 200 or _CONTROL.search(name):
            raise StateValidationError(
                "a signal's name is 1 to 200 characters, without control characters",
                node=None,
                errors=[
                    {"field": "name", "message": "1 to 200 characters", "type": "string_length"}
                ],
            )
        if not isinstance(updates, Mapping):
            raise StateValidationError(
                "a signal's updates are a JSON object",
                node=None,
                errors=[{"field": "updates", "message": "not an object", "type": "type_error"}],
            )
        updates = dict(updates)
        problem = json_problem(updates, "updates")
        if problem is not None:
            raise StateValidationError(
                f"signal {name}: {problem[0]}: {problem[1]}",
                node=None,
                errors=[{"field": problem[0], "message": problem[1], "type": "json_invalid"}],
            )
        self._check_size(updates, "signal")
        record = await self._get(run_id)
        if record.status.is_terminal:
            raise RunStateError(run_id, record.status.value, "signal")
        graph = await self._graph_of(record.graph_id)
        graph.state.apply(record.state, updates, f"signal {name}")  # 422 now rather than later
        stored = await self._store.add_signal(run_id, name, updates, time.time())
        handle = self._host.handles.get(run_id)
        if handle is not None:
            # Stored already: if the mailbox is full, a queued command (or the
            # run's next start) reads it.
            with contextlib.suppress(CapacityError):
                handle.send(Signal(name, updates))
        elif record.status is RunStatus.WAITING:
            await self._apply_to_waiting(run_id, graph)
        return stored

    async def _apply_to_waiting(self, run_id: str, graph: Graph) -> None:
        """Fold a waiting run's stored signals into its state; it keeps waiting."""
        for _ in range(ATTEMPTS):
            record = await self._get(run_id)
            if record.status is not RunStatus.WAITING:
                return  # resumed meanwhile: its actor applies them
            pending = await self._store.signals_after(run_id, record.signal_cursor)
            if not pending:
                return
            seq = record.last_seq

            def entry(
                event: str, message: str, level: Level, node: str | None, data: dict[str, Any]
            ) -> LogEntry:
                nonlocal seq
                seq += 1
                return LogEntry(seq, time.time(), level, event, node, message, data)

            folded = fold_signals(
                graph,
                record.state,
                pending,
                node=record.current_node,
                max_state_bytes=self._limits.max_state_bytes,
                max_data_bytes=self._limits.max_log_data_bytes,
                entry=entry,
            )
            new = record.evolve(
                state=folded.state,
                signal_cursor=folded.cursor,
                last_seq=seq,
                updated_at=time.time(),
            )
            try:
                await self._store.save_run(new, folded.entries)
            except StoreConflictError:
                continue
            return
