"""What the run actors of one engine share: the store, running slots, handles, store health.

The engine owns one :class:`RunHost`; every actor gets it at construction and
calls only its public methods, never the engine's. It keeps:

* a :class:`~trioflow.commands.RunHandle` per active run, by run id;
* running slots: a counter and a FIFO of runs waiting for one, so that
  pending runs start in the order they were created (a ``CapacityLimiter``
  would serve them in the order their tasks happened to start);
* runs that stopped without an end because the store refused it (stalled);
* the store's health, learnt from every checkpoint and from probes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .actor import RunActor  # (it imports this module for type checking only)
from .commands import START, Command, RunHandle
from .errors import StoreError
from .graph import Graph
from .runs import RunRecord
from .stores.base import Store

if TYPE_CHECKING:
    from .engine import EngineLimits
    from .observe import Observer
    from .tracing import Tracing

log = logging.getLogger("trioflow.engine")

#: Fewest seconds between two store probes while writes fail.
PROBE_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """Whether the store takes writes.

    Attributes:
        ok: the last write (a checkpoint or a probe) succeeded.
        error: the last write error while not ok.
        since: when writes started failing (seconds since the Unix epoch).
    """

    ok: bool
    error: str | None = None
    since: float | None = None


class RunHost:
    """The engine's bookkeeping of its runs' actors. One per engine."""

    def __init__(self, store: Store, limits: EngineLimits, nursery: trio.Nursery) -> None:
        self.store = store
        #: See :mod:`trioflow.observe`; None: nothing is told.
        self.observer: Observer | None = None
        #: See :mod:`trioflow.tracing`; None: no spans (read once per run execution).
        self.tracing: Tracing | None = None
        #: This engine's node id on a shared store (logged where runs start and resume).
        self.node_id: str | None = getattr(store, "node_id", None)
        self.limits = limits
        self.thread_limiter = trio.CapacityLimiter(limits.worker_threads)
        self.handles: dict[str, RunHandle] = {}
        self._nursery = nursery
        self._running = 0
        self._queue: deque[RunHandle] = deque()
        self.stalled: dict[str, str] = {}
        #: True while store writes fail (checked by every checkpoint: keep it a bool).
        self.store_failing = False
        self._store_error: StoreError | None = None
        self._store_failing_since: float | None = None
        self._last_probe = -PROBE_INTERVAL_S
        # Wall-clock time as the engine measures it: fixed at start, then
        # advanced by Trio's clock (so deadlines follow a virtual clock in
        # tests, and a clock step while running does not fire them early).
        self._wall0 = time.time()
        self._trio0 = trio.current_time()
        #: Set when a run parks with a deadline: the deadline timer looks again.
        self.deadlines_changed = trio.Event()
        #: Called when a running slot frees up (a shared store's claim scan looks again).
        self.slot_freed: Callable[[], None] | None = None

    # -- actors ------------------------------------------------------------------

    def spawn(self, graph: Graph, record: RunRecord, *first: Command) -> RunHandle:
        """Start an actor for ``record``; it executes once it gets a running slot.

        ``first`` commands are in its mailbox before anything else.
        """
        handle = RunHandle(record.run_id, record.epoch)
        for command in first:
            handle.send(command)
        actor = RunActor(self, graph, record, handle)
        self.handles[record.run_id] = handle
        if self._running < self.limits.max_running:
            # It starts at once: the slot needs no command.
            self._running += 1
            handle.has_slot = True
        else:
            self._queue.append(handle)
        self._nursery.start_soon(actor.run, name=f"run-{record.run_id}")
        return handle

    def _grant(self, handle: RunHandle) -> None:
        self._running += 1
        handle.has_slot = True
        handle.send(START)

    def release_slot(self, handle: RunHandle) -> None:
        """Called once by every actor when it stops executing."""
        if not handle.has_slot:
            return  # it never held one (cancelled while pending)
        handle.has_slot = False
        self._running -= 1
        while self._queue and self._running < self.limits.max_running:
            nxt = self._queue.popleft()
            if nxt.done.is_set() or nxt.cancel_requested:
                continue
            self._grant(nxt)
        if self.slot_freed is not None and self._running < self.limits.max_running:
            self.slot_freed()

    @property
    def free_slots(self) -> int:
        """Running slots nobody holds or waits for."""
        return self.limits.max_running - self._running - len(self._queue)

    def finished(self, handle: RunHandle) -> None:
        """Called once by every actor as it ends."""
        if self.handles.get(handle.run_id) is handle:
            del self.handles[handle.run_id]

    def stall(self, run_id: str, error: StoreError) -> None:
        """Called by an actor that stopped without a terminal record (its store failed)."""
        reason = f"its checkpoint could not be written ({error.message})"
        log.error("run %s stopped at its last checkpoint: %s", run_id, reason)
        self.stalled[run_id] = reason
        # Followers waiting for entries that will not come learn it now.
        self.store.notifier.notify(run_id)

    def wall(self) -> float:
        """Seconds since the Unix epoch, as deadlines are kept."""
        return self._wall0 + (trio.current_time() - self._trio0)

    def parked(self, deadline: float | None) -> None:
        """Called by an actor that parked its run at a wait (it ends right after)."""
        if deadline is not None:
            self.deadlines_changed.set()

    # -- store health ------------------------------------------------------------

    def store_failed(self, error: StoreError) -> None:
        if not self.store_failing:
            self.store_failing = True
            self._store_failing_since = time.time()
            log.error("store writes are failing: %s", error.message)
        self._store_error = error

    def store_recovered(self) -> None:
        if self.store_failing:
            since = self._store_failing_since or time.time()
            log.warning("store writes work again after %.1f s", time.time() - since)
        self.store_failing = False
        self._store_error = None
        self._store_failing_since = None

    def store_health(self) -> StoreHealth:
        """See :meth:`trioflow.Engine.store_health`."""
        if not self.store_failing:
            return StoreHealth(ok=True)
        now = trio.current_time()
        if now - self._last_probe >= PROBE_INTERVAL_S:
            self._last_probe = now
            self._nursery.start_soon(self._probe_store)
        error = self._store_error.message if self._store_error is not None else None
        return StoreHealth(ok=False, error=error, since=self._store_failing_since)

    async def _probe_store(self) -> None:
        try:
            await self.store.probe()
        except StoreError as exc:
            self.store_failed(exc)
        else:
            self.store_recovered()
