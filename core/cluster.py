"""An engine's part among several on one shared store (PostgreSQL): leases and notifications.

When the store is a :class:`~trioflow.stores.base.SharedStore`, the engine
is one *node* of several, and runs this next to its actors:

* a **heartbeat**, every third of a lease (at most every 0.75 s): one
  statement renews the leases of every run this node executes, and tells it
  which were sent a cancel or a signal (the fallback for a lost
  notification). A renewal may take up to a third of a lease, as long as it
  answers before the node must give its runs up; the database drops it
  after that, so a late renewal never lands. A run it thought it held
  and that was not renewed belongs to another node now: its actor is
  abandoned (it stops and writes nothing). A node that cannot renew for a
  lease (less one heartbeat) abandons every actor: soon another node may
  claim them;
* a **claim scan**, every ``claim_interval`` or sooner when a notification
  says there is work (a node left, a run was queued) or a running slot
  frees up: it claims as many unheld runs as it has free slots and resumes
  them (a run taken over from a dead node counts a crash: two in a row at
  one step fail it with ``crash_loop``, as after a restart);
* the **listener** of the store's notifications: log entries written on
  other nodes wake this node's followers; a cancel or a signal reaches the
  run's actor here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio

from .commands import Abandon, Cancel, Signal
from .errors import CapacityError, StoreError
from .host import RunHost
from .stores.base import Claimed, SharedStore

log = logging.getLogger("trioflow.cluster")

#: Most runs claimed by one scan.
CLAIM_BATCH = 100
#: Followers on a shared store read the log at least this often (a lost notification).
FOLLOW_POLL_S = 2.0
#: The longest pause between two heartbeats.
HEARTBEAT_MAX_S = 0.75


class Cluster:
    """The heartbeat, the claim scan and the listener of one engine (see the module)."""

    def __init__(
        self,
        host: RunHost,
        store: SharedStore,
        start_claimed: Callable[[list[Claimed]], Awaitable[None]],
    ) -> None:
        self._host = host
        self._store = store
        self._start_claimed = start_claimed
        self._wake = trio.Event()
        #: Trio time of the start of the last heartbeat that renewed our leases.
        self._renewed_at = trio.current_time()
        #: True once (almost) a whole lease passed without a renewal (until one succeeds).
        self.cut_off = False
        #: Set when the engine stops: no more claims.
        self.draining = False
        host.slot_freed = self.wake

    @property
    def heartbeat_s(self) -> float:
        """A third of a lease, and at most 0.75 s (it is also how soon a lost
        notification's cancel or signal is seen)."""
        return min(self._store.lease_ttl / 3, HEARTBEAT_MAX_S)

    def wake(self) -> None:
        """Look for runs to claim now."""
        self._wake.set()

    # -- tasks -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The listener, the heartbeat and the claim scan, until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._store.listen, self)
            nursery.start_soon(self._heartbeats, name="cluster-heartbeat")
            nursery.start_soon(self._claims, name="cluster-claims")
            task_status.started()

    async def _heartbeats(self) -> None:
        ttl = self._store.lease_ttl
        while True:
            await trio.sleep(self.heartbeat_s)
            started = trio.current_time()
            held = {rid: h.epoch for rid, h in self._host.handles.items() if h.abandoned is None}
            # A renewal may take up to a third of a lease (a busy database is
            # not a dead one), but never past the point where this node must
            # give its runs up: a heartbeat before their leases can expire.
            # (Once they are given up, it only tells when the store is back.)
            timeout = ttl / 3
            if not self.cut_off:
                timeout = min(timeout, self._renewed_at + ttl - self.heartbeat_s - started)
            try:
                if timeout <= 0:
                    raise trio.TooSlowError
                with trio.fail_after(timeout):
                    renewal = await self._store.renew_leases(held, timeout_s=timeout)
            except (StoreError, trio.TooSlowError) as exc:
                error = (
                    exc
                    if isinstance(exc, StoreError)
                    else StoreError(
                        f"the heartbeat got no answer in {max(timeout, 0):.2g} s", transient=True
                    )
                )
                reason = error.message
                self._host.store_failed(error)  # /healthz says so
                silent = trio.current_time() - self._renewed_at
                log.warning("heartbeat failed (%s); no renewal for %.1f s", reason, silent)
                # Give the runs up a heartbeat before their leases can expire,
                # so that no other node executes them while this one still does.
                if silent >= ttl - self.heartbeat_s and not self.cut_off:
                    self.cut_off = True
                    self._abandon_all(
                        f"this node could not renew its leases for {silent:.1f} s "
                        f"(lease_ttl {ttl:g} s)"
                    )
                continue
            self._renewed_at = started
            if self._host.store_failing:
                self._host.store_recovered()
            if self.cut_off:
                log.warning("heartbeat: the store answers again")
                self.cut_off = False
                # The runs abandoned meanwhile are handed over, not counted as
                # crashes (whoever claims them next, this node included).
                live = {r: h.epoch for r, h in self._host.handles.items() if h.abandoned is None}
                try:
                    await self._store.release_leases(live)
                except StoreError as exc:
                    log.warning("could not release the abandoned runs: %s", exc.message)
                self.wake()
            for run_id in held.keys() - renewal.held:
                handle = self._host.handles.get(run_id)
                # A run taken after the renewal started could not be in it.
                if handle is not None and handle.since < started:
                    handle.send(Abandon("its lease was not renewed: another node holds it"))
            for run_id in renewal.cancel_requested:
                self.cancel_requested(run_id)
            for run_id in renewal.signals_pending:
                self.signal_sent(run_id)

    def _abandon_all(self, reason: str) -> None:
        handles = list(self._host.handles.values())
        if handles:
            log.error("abandoning %d runs: %s", len(handles), reason)
        for handle in handles:
            handle.send(Abandon(reason))

    async def _claims(self) -> None:
        while True:
            with trio.move_on_after(self._store.claim_interval):
                await self._wake.wait()
            self._wake = trio.Event()
            if self.draining or self.cut_off:
                continue
            free = min(self._host.free_slots, CLAIM_BATCH)
            if free <= 0:
                continue
            try:
                claimed = await self._store.claim_runs(free)
            except StoreError as exc:
                log.warning("claim scan failed: %s", exc.message)
                continue
            if claimed:
                await self._start_claimed(claimed)
                if len(claimed) == free:
                    self.wake()  # there may be more

    # -- what the listener says (ClusterEvents) -------------------------------------

    def log_written(self, run_id: str) -> None:
        self._store.notifier.notify(run_id)

    def cancel_requested(self, run_id: str) -> None:
        handle = self._host.handles.get(run_id)
        if handle is not None:
            handle.send(Cancel())

    def signal_sent(self, run_id: str) -> None:
        handle = self._host.handles.get(run_id)
        if handle is not None:
            # Stored already: a full mailbox is read anyway.
            with contextlib.suppress(CapacityError):
                handle.send(Signal("", {}))

    def work_available(self) -> None:
        self.wake()

    def reconnected(self) -> None:
        # Notifications may have been lost while the listener was away.
        self._store.notifier.notify_all()
        self.wake()
