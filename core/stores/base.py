"""The store interface every backend implements, and the per-run notifier."""

from __future__ import annotations

import base64
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import trio

from ..errors import EngineError, LeaseLostError, StoreConflictError, StoreError
from ..logs import LogEntry
from ..runs import RunRecord, RunStatus

T = TypeVar("T")

PutResult = Literal["created", "exists", "conflict"]


@dataclass(frozen=True, slots=True)
class StoredGraph:
    graph_id: str
    document: dict[str, Any]
    digest: str
    created_at: float


@dataclass(frozen=True, slots=True)
class StoredToken:
    """An API token as stored: never its secret, only a hash of it.

    ``graphs`` are glob patterns over graph ids (``*`` any run of
    characters, ``?`` one); ``role`` is ``viewer``, ``runner`` or ``admin``.
    ``peppered``: the hash is an HMAC keyed with the server's secret.
    Times are seconds since the Unix epoch.
    """

    token_id: str
    name: str
    role: str
    graphs: tuple[str, ...]
    secret_hash: str
    peppered: bool
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None

    def active(self, now: float) -> bool:
        """Neither revoked nor expired at ``now``."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the audit log: who did what to which resource, and the answer.

    ``seq`` is 1, 2, 3, ... in the store (0 for an entry not stored yet);
    ``actor`` a token id, or ``local`` for the command line on the store.
    """

    seq: int
    ts: float
    actor: str
    action: str
    target: str
    status: int
    detail: str = ""


GRAPH_GLOB_CHARS = frozenset("*?")
"""The wildcards of a graph scope pattern; every other character is literal."""


def glob_like(pattern: str) -> str:
    """A graph scope pattern as a SQL ``LIKE`` pattern with ``\\`` as the escape character."""
    out = []
    for char in pattern:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "%_\\":
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def glob_match(pattern: str, text: str) -> bool:
    """Whether ``text`` matches a graph scope pattern, in time linear in their lengths.

    (A regular expression with several ``.*`` backtracks: cubic on a long
    hostile id.) Backtracks only to the last ``*`` seen.
    """
    p = t = 0
    star = -1
    mark = 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, t
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            t = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def glob_any(patterns: Sequence[str], text: str) -> bool:
    """Whether ``text`` matches one of the patterns."""
    return any(glob_match(p, text) for p in patterns)


@dataclass(frozen=True, slots=True)
class StoredSignal:
    """A signal stored for a run. ``signal_id`` is 1, 2, 3, ... per run, in arrival order."""

    run_id: str
    signal_id: int
    name: str
    updates: dict[str, Any]
    created_at: float


def deadline_of(run: RunRecord) -> float | None:
    """When a waiting run's wait times out (``None``: never, or not waiting for input)."""
    waiting = run.waiting
    if run.status is not RunStatus.WAITING or not waiting or waiting.get("answered"):
        return None
    deadline = waiting.get("deadline")
    return float(deadline) if deadline is not None else None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; pass ``next_cursor`` back to get the next one."""

    items: list[T]
    next_cursor: str | None


class InvalidCursorError(EngineError):
    """Raised when a pagination cursor was not produced by this store."""

    code = "invalid_cursor"


class Cursor:
    """Opaque keyset cursors: ``(sort key, id)`` of the last item of a page."""

    @staticmethod
    def encode(key: float, ident: str) -> str:
        raw = json.dumps([key, ident], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def decode(cursor: str) -> tuple[float, str]:
        try:
            padded = cursor + "=" * (-len(cursor) % 4)
            key, ident = json.loads(base64.urlsafe_b64decode(padded.encode()))
            if not isinstance(ident, str) or not isinstance(key, int | float):
                raise ValueError("bad cursor fields")
            return float(key), ident
        except (ValueError, TypeError, UnicodeDecodeError, OverflowError) as exc:
            raise InvalidCursorError(f"invalid cursor: {exc}") from None


def checkpoint_conflict(run: RunRecord, entries: int, stored: int) -> StoreConflictError:
    """The error for a checkpoint of ``run`` that does not continue the stored seq ``stored``."""
    return StoreConflictError(
        f"run {run.run_id!r} is stored at seq {stored}, but the checkpoint continues seq "
        f"{run.last_seq - entries}; nothing was written",
        details={"run_id": run.run_id, "stored_seq": stored},
    )


def fencing_problem(
    run: RunRecord, entries: int, stored_seq: int, stored_epoch: int, *, claim: bool
) -> StoreConflictError | None:
    """Why a checkpoint of ``run`` may not be written on top of the stored record, if it may not.

    See :meth:`Store.save_run`: the stored epoch must be the writer's (one
    less, for a claim), and the entries must continue the stored log.
    """
    expected = run.epoch - 1 if claim else run.epoch
    if stored_epoch != expected:
        if claim:
            return StoreConflictError(
                f"run {run.run_id!r} was claimed by another writer (epoch {stored_epoch}); "
                "nothing was written",
                details={"run_id": run.run_id, "stored_epoch": stored_epoch},
            )
        return LeaseLostError(
            f"run {run.run_id!r} is now at epoch {stored_epoch}, not {run.epoch}: another "
            "writer claimed it; nothing was written",
            details={"run_id": run.run_id, "stored_epoch": stored_epoch, "epoch": run.epoch},
        )
    if stored_seq != run.last_seq - entries:
        return checkpoint_conflict(run, entries, stored_seq)
    return None


class Notifier:
    """Wakes followers of a run when its log grows.

    A follower takes the run's current event with :meth:`watch` *before*
    reading the store, waits on it if the read found nothing new, and hands
    it back with :meth:`release` either way. A write that lands after the
    read sets that event; a write before it is seen by the read; so no entry
    is missed. One event is shared by every follower of a run, and it is
    forgotten as soon as the last follower hands it back, so memory does not
    grow with followers or with runs that were once followed.
    """

    def __init__(self) -> None:
        self._watches: dict[str, _Watch] = {}

    def watch(self, run_id: str) -> trio.Event:
        """The event the next write of ``run_id`` sets. Pair with :meth:`release`."""
        w = self._watches.get(run_id)
        if w is None:
            w = self._watches[run_id] = _Watch(trio.Event())
        w.holders += 1
        return w.event

    def notify(self, run_id: str) -> None:
        w = self._watches.pop(run_id, None)
        if w is not None:
            w.event.set()

    def notify_all(self) -> None:
        """Wake every follower (they read the store again): notifications may have been lost."""
        watches, self._watches = self._watches, {}
        for w in watches.values():
            w.event.set()

    def release(self, run_id: str, event: trio.Event) -> None:
        """Hand back an event from :meth:`watch` (set or not)."""
        w = self._watches.get(run_id)
        if w is not None and w.event is event:
            w.holders -= 1
            if w.holders == 0:
                del self._watches[run_id]

    def watched(self) -> int:
        """How many runs have an event out (for tests and metrics)."""
        return len(self._watches)


@dataclass(slots=True)
class _Watch:
    event: trio.Event
    holders: int = 0


class Store(ABC):
    """Graphs, runs with their last checkpoint, and append-only run logs.

    All methods are called from the Trio thread. ``save_run`` is the
    checkpoint: it writes the run record and the step's new log entries in
    one atomic transaction, then notifies followers.
    """

    def __init__(self) -> None:
        self.notifier = Notifier()

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect, migrate. Called once before use."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Called once after use."""

    async def begin_session(self) -> bool:
        """Record that an engine now executes this store's runs.

        Returns:
            Whether the previous session ended with :meth:`end_session`. False
            means the process that held it died, and every run it was
            executing died with it. A store that keeps nothing across
            processes returns True.
        """
        return True

    async def end_session(self) -> None:  # noqa: B027 - optional hook
        """Record that the engine holding this store stopped cleanly."""

    async def probe(self) -> None:  # noqa: B027 - optional hook
        """Commit a tiny write now, to learn whether writes work again.

        Raises:
            StoreError: the write failed.
        """

    # -- graphs ----------------------------------------------------------------
    @abstractmethod
    async def put_graph(self, graph: StoredGraph) -> PutResult:
        """Store a graph unless its id exists. ``exists``: same digest; ``conflict``: other."""

    @abstractmethod
    async def get_graph(self, graph_id: str) -> StoredGraph | None: ...

    @abstractmethod
    async def list_graphs(
        self,
        *,
        cursor: str | None = None,
        limit: int = 50,
        graphs: Sequence[str] | None = None,
    ) -> Page[StoredGraph]:
        """Graphs in id order.

        ``graphs``: only those whose id matches one of these scope patterns
        (``*`` any run of characters, ``?`` one; ``None``: all). The filter
        is part of the query, so pages are full and cursors stay valid.
        """

    # -- runs ------------------------------------------------------------------
    @abstractmethod
    async def create_run(self, run: RunRecord, entries: Sequence[LogEntry] = ()) -> None:
        """Insert a new run (and its first log entries) atomically.

        In a shared store, a run with ``epoch`` 1 is held by the creating
        engine (it executes it); one with ``epoch`` 0 is queued for any
        engine to claim.
        """

    @abstractmethod
    async def save_run(
        self, run: RunRecord, entries: Sequence[LogEntry], *, claim: bool = False
    ) -> None:
        """Checkpoint: replace the run record and append ``entries`` atomically.

        ``entries`` continue the stored log: their seqs run from the stored
        record's ``last_seq + 1`` to ``run.last_seq``. A checkpoint built on
        anything else (another writer got there first) raises
        :class:`~core.errors.StoreConflictError` and writes nothing, so a
        stored log never has a gap and is never rewritten.

        Fencing: the stored record's ``epoch`` must be ``run.epoch``; a writer
        that *claims* the run (``claim=True``: it takes a run no live engine
        executes, such as a waiting run it answers) writes ``run.epoch`` one
        above the stored one. A checkpoint whose epoch is not the stored one
        any more raises :class:`~core.errors.LeaseLostError` (a subclass of
        ``StoreConflictError``): someone claimed the run since, and this
        writer must stop. A store shared by several engines (PostgreSQL)
        also refuses a claim of a run a live engine holds
        (:class:`~core.errors.LeaseHeldError`).

        Raises:
            StoreError: nothing was written; ``transient`` says whether the
                same checkpoint may succeed if tried again.
        """

    @abstractmethod
    async def get_run(self, run_id: str) -> RunRecord | None: ...

    @abstractmethod
    async def list_runs(
        self,
        *,
        graph_id: str | None = None,
        status: RunStatus | None = None,
        cursor: str | None = None,
        limit: int = 50,
        graphs: Sequence[str] | None = None,
    ) -> Page[RunRecord]:
        """Runs, newest first (by ``created_at`` then ``run_id``).

        ``graphs``: only runs of graphs matching one of these scope patterns
        (as in :meth:`list_graphs`).
        """

    @abstractmethod
    async def count_runs(
        self,
        *,
        graph_id: str | None = None,
        graphs: Sequence[str] | None = None,
        statuses: Sequence[RunStatus] | None = None,
    ) -> dict[RunStatus, int]:
        """How many runs there are of each status (statuses with none are left out).

        ``graph_id`` and ``graphs`` filter as in :meth:`list_runs`;
        ``statuses``: count only these (a range of the status index).
        """

    @abstractmethod
    async def read_log(self, run_id: str, *, after: int = 0, limit: int = 1000) -> list[LogEntry]:
        """Entries with ``seq > after`` in seq order, at most ``limit``."""

    @abstractmethod
    async def unfinished_runs(self) -> list[RunRecord]:
        """Runs left ``pending`` or ``running``, to resume at start (waiting ones stay parked)."""

    # -- waits and signals --------------------------------------------------------

    @abstractmethod
    async def next_deadline(self) -> float | None:
        """The earliest deadline of a run waiting for input, if any."""

    @abstractmethod
    async def due_waits(self, now: float, *, limit: int = 100) -> list[RunRecord]:
        """Runs waiting for input whose deadline is at or before ``now``, earliest first."""

    @abstractmethod
    async def add_signal(
        self, run_id: str, name: str, updates: dict[str, Any], created_at: float
    ) -> StoredSignal:
        """Store a signal for a run that has not ended, with the next id of that run.

        Raises:
            UnknownRunError: no such run.
            RunStateError: the run has ended.
        """

    @abstractmethod
    async def signals_after(
        self, run_id: str, after: int, *, limit: int = 100
    ) -> list[StoredSignal]:
        """The run's signals with ``signal_id > after``, in id order."""

    @abstractmethod
    async def delete_runs(self, *, finished_before: float) -> int:
        """Delete terminal runs finished before the given time, and their logs."""

    # -- API tokens and the audit log (used by the web service, not the engine) ------

    async def put_token(self, token: StoredToken) -> None:
        """Store a new token. Raises :class:`StoreError` if its id exists."""
        raise StoreError(f"{type(self).__name__} keeps no API tokens")

    async def get_token(self, token_id: str) -> StoredToken | None:
        """The token with this id, revoked and expired ones included."""
        raise StoreError(f"{type(self).__name__} keeps no API tokens")

    async def list_tokens(self) -> list[StoredToken]:
        """Every token, oldest first."""
        raise StoreError(f"{type(self).__name__} keeps no API tokens")

    async def count_tokens(self, *, active_at: float | None = None) -> int:
        """Every token ever created; with ``active_at``, those neither revoked nor expired then."""
        raise StoreError(f"{type(self).__name__} keeps no API tokens")

    async def revoke_token(self, token_id: str, at: float) -> StoredToken | None:
        """Mark the token revoked (once: a second revoke keeps the first time)."""
        raise StoreError(f"{type(self).__name__} keeps no API tokens")

    async def touch_tokens(self, used: Mapping[str, float]) -> None:
        """Record when tokens were last used (token id -> time; never moves back)."""
        raise StoreError(f"{type(self).__name__} keeps no API tokens")

    async def put_ticket(
        self, ticket_hash: str, token_id: str, expires_at: float, *, now: float
    ) -> None:
        """Store a single-use stream ticket (its hash) for a token; expired ones go."""
        raise StoreError(f"{type(self).__name__} keeps no API tokens")

    async def take_ticket(self, ticket_hash: str, now: float) -> str | None:
        """Consume a ticket: the token id it was issued to, if it exists and is unexpired.

        A ticket is taken once: it is deleted (expired ones too, in passing).
        """
        raise StoreError(f"{type(self).__name__} keeps no API tokens")

    async def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Append audit entries (their ``seq`` is assigned by the store)."""
        raise StoreError(f"{type(self).__name__} keeps no audit log")

    async def read_audit(self, *, after: int = 0, limit: int = 100) -> list[AuditEntry]:
        """Audit entries with ``seq > after``, oldest first."""
        raise StoreError(f"{type(self).__name__} keeps no audit log")


# -- stores shared by several engines -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Renewal:
    """What one heartbeat learned about the leases an engine holds.

    ``held``: the runs whose lease was renewed (a run the engine thought it
    held and that is missing was claimed by another engine, or ended);
    ``cancel_requested`` and ``signals_pending``: held runs that were sent
    a cancel or a signal (the fallback when a notification was lost).
    """

    held: frozenset[str]
    cancel_requested: frozenset[str]
    signals_pending: frozenset[str]


@dataclass(frozen=True, slots=True)
class Claimed:
    """A run an engine has just claimed: it executes it now, at ``record.epoch``."""

    record: RunRecord
    #: The previous holder's lease expired while the run was running (it died, or
    #: lost the database); ``record.crashes`` was counted up for it.
    taken_over: bool
    cancel_requested: bool
    #: Signals are stored that the run has not applied yet.
    signals_pending: bool = False


def default_node_id() -> str:
    """A node id for this process: host, pid and start time."""
    import os
    import socket
    import time

    return f"{socket.gethostname()}-{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S')}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A live engine of a shared store."""

    node_id: str
    started_at: float
    heartbeat_at: float
    runs: int


class ClusterEvents(Protocol):
    """What a shared store's listener tells its engine (all called on the Trio thread)."""

    def log_written(self, run_id: str) -> None:
        """Another engine wrote log entries of ``run_id``."""

    def cancel_requested(self, run_id: str) -> None:
        """Someone asked for ``run_id`` to be cancelled."""

    def signal_sent(self, run_id: str) -> None:
        """A signal for ``run_id`` was stored."""

    def work_available(self) -> None:
        """Runs may be waiting for an engine to claim them."""

    def reconnected(self) -> None:
        """The listener was cut off and is back: notifications may have been lost."""


class SharedStore(Store):
    """A store several engines (nodes) use at once: leases, fencing, notifications.

    Each engine is a node with an id. A run executes on the node that holds
    its lease; the node renews its leases on every heartbeat, and a run
    whose lease expired (its node died, or lost the database) is claimed by
    another node, which resumes it from its last checkpoint. Every claim
    raises the run's epoch, and checkpoints are fenced by it (see
    :meth:`Store.save_run`), so a node that lost a run can never write it.
    """

    #: This engine's node id.
    node_id: str
    #: Seconds a lease lasts without a renewal.
    lease_ttl: float
    #: Seconds between two scans for runs to claim (a notification wakes it earlier).
    claim_interval: float

    @abstractmethod
    async def claim_runs(self, limit: int) -> list[Claimed]:
        """Claim up to ``limit`` runs no live node holds, oldest first."""

    @abstractmethod
    async def renew_leases(self, held: Mapping[str, int], *, timeout_s: float) -> Renewal:
        """Renew the leases of ``held`` (run id -> epoch) in one statement.

        The database gives the statement up after ``timeout_s``: a renewal
        must not land after the node has stopped waiting for it (and has
        perhaps given its runs up)."""

    @abstractmethod
    async def release_leases(self, held: Mapping[str, int]) -> int:
        """Give up every lease this node has but those of ``held`` (run id -> epoch).

        So other nodes claim those runs at once, as handed over rather than
        taken from a dead node (no crash is counted): a node that stops
        releases all; one whose actors were abandoned while it could not
        reach the store releases theirs when it can again.
        """

    @abstractmethod
    async def request_cancel(self, run_id: str) -> None:
        """Record that ``run_id`` is to be cancelled, and tell the node that holds it."""

    @abstractmethod
    async def live_nodes(self) -> list[NodeInfo]:
        """The nodes whose heartbeat is younger than a lease, with the runs each holds."""

    @abstractmethod
    async def leave(self) -> None:
        """Record that this node stopped cleanly."""

    @abstractmethod
    async def listen(
        self, events: ClusterEvents, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver the other nodes' notifications to ``events`` until cancelled.

        Reconnects by itself after losing the database (``events.reconnected``
        then says that some may have been lost).
        """
