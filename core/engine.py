"""The engine: the supervisor that owns every run actor, and the embedding API."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pydantic_core
import trio

from .cluster import FOLLOW_POLL_S, Cluster
from .commands import Abandon, Cancel, Command, Drain, Signal
from .document import GraphDocument
from .errors import (
    CapacityError,
    EngineStoppingError,
    GraphConflictError,
    GraphValidationError,
    LeaseHeldError,
    LimitExceededError,
    RunFailure,
    RunStalledError,
    RunStateError,
    StateValidationError,
    StoreConflictError,
    StoreError,
    UnknownGraphError,
    UnknownRunError,
)
from .expressions import Evaluator
from .graph import Graph, GraphLimits, compile_graph
from .host import RunHost, StoreHealth
from .logs import Event, Level, LogEntry
from .observe import Observer
from .registry import Registry, default_registry
from .runs import RunRecord, RunStatus
from .stores.base import (
    Claimed,
    NodeInfo,
    Page,
    SharedStore,
    Store,
    StoredGraph,
    StoredSignal,
    default_node_id,
)
from .stores.memory import MemoryStore
from .tracing import Tracer, TracerProvider, Tracing
from .waiting import Waiting

log = logging.getLogger("trioflow.engine")

#: How often a cancel sent to another node looks whether it has landed (its
#: end's notification usually says so first).
CANCEL_POLL_S = 0.1


#: Log entries :meth:`Engine.graph_mermaid` reads at most to find a run's visited nodes.
MERMAID_LOG_ENTRIES = 20_000


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """Bounds that keep one process healthy under any input.

    Attributes:
        max_active_runs: runs held in this process (pending + running); more
            are refused with :class:`~core.errors.CapacityError`.
        max_running: runs executing nodes at once; the rest wait ``pending``.
        max_state_bytes: size of a run's state as compact JSON, initial or
            after any node (a node that makes it larger fails the run with
            ``state_too_large``).
        max_followers: concurrent ``follow`` iterators.
        worker_threads: worker threads for sync tools.
        log_page: entries a follower reads from the store per query.
        max_log_entries: log entries one run may write; a run that needs more
            fails with ``log_limit_exceeded`` (its last entry is the failure).
        max_log_message_chars: characters of one entry's message; longer
            messages are cut and the entry's data gets ``truncated: true``.
        max_log_data_bytes: one entry's data as compact JSON; larger data is
            replaced by ``{"truncated": true, "preview": ...}``.
        max_log_lines_per_step: ``ctx.log`` lines kept per node execution;
            the rest are counted in one ``truncated`` line.
        max_graph_steps: the largest ``max_steps`` a graph may declare.
        max_loop_iterations: the largest ``loop.max_iterations`` of an edge.
        max_node_attempts: the largest ``retry.max_attempts`` of a node.
        store_retry_s: how long a checkpoint that fails with a transient store
            error is retried (with backoff) before the run gives up on it.
    """

    max_active_runs: int = 10_000
    max_running: int = 10_000
    max_state_bytes: int = 1 << 20
    max_followers: int = 10_000
    worker_threads: int = 32
    log_page: int = 500
    max_log_entries: int = 100_000
    max_log_message_chars: int = 4096
    max_log_data_bytes: int = 16_384
    max_log_lines_per_step: int = 1000
    max_graph_steps: int = 100_000
    max_loop_iterations: int = 100_000
    max_node_attempts: int = 20
    store_retry_s: float = 30.0

    def graph_limits(self) -> GraphLimits:
        """The bounds graph documents are validated against."""
        return GraphLimits(self.max_graph_steps, self.max_loop_iterations, self.max_node_attempts)


class Engine:
    """Runs graphs. Get one from :func:`open_engine`; do not construct it directly."""

    def __init__(
        self,
        *,
        store: Store,
        registry: Registry,
        nursery: trio.Nursery,
        limits: EngineLimits,
        evaluator: Evaluator,
    ) -> None:
        self.store = store
        self.registry = registry
        self.limits = limits
        self._evaluator: Evaluator = evaluator
        self._graph_limits = limits.graph_limits()
        self._nursery = nursery
        self._graphs: dict[str, Graph] = {}
        self._host = RunHost(store, limits, nursery)
        self._waits = Waiting(self._host, self.get_graph)
        self._followers = 0
        #: Set when the engine starts closing: no run ends here after that.
        self._closing = False
        #: The engine stops: it takes no new runs.
        self._stopping = False
        #: Set for a store several engines share (PostgreSQL): this engine is a node.
        self.cluster: Cluster | None = None
        self._follow_poll_s: float | None = None
        if isinstance(store, SharedStore):
            self.cluster = Cluster(self._host, store, self._start_claimed)
            self._follow_poll_s = FOLLOW_POLL_S

        #: This engine's name: its node id on a shared store; on a store it
        #: has alone, host, pid and start time.
        self.node_id: str = store.node_id if isinstance(store, SharedStore) else default_node_id()
        self._started_at = time.time()

    async def nodes(self) -> list[NodeInfo]:
        """The live engines on this engine's store, with the runs each executes.

        On a store it has alone: this engine only.
        """
        if isinstance(self.store, SharedStore):
            return await self.store.live_nodes()
        return [NodeInfo(self.node_id, self._started_at, time.time(), self.active_runs)]

    @property
    def evaluator(self) -> Evaluator:
        """The condition evaluator graphs are compiled with (``compiled`` or ``asteval``)."""
        return self._evaluator

    # -- graphs ------------------------------------------------------------------

    def validate_graph(self, document: Mapping[str, Any] | GraphDocument) -> Graph:
        """Validate and compile a document without storing it.

        Raises:
            GraphValidationError: every problem found.
        """
        return compile_graph(
            document, self.registry, evaluator=self._evaluator, limits=self._graph_limits
        )

    async def register_graph(self, document: Mapping[str, Any] | GraphDocument) -> Graph:
        """Validate, compile and store a graph.

        Registering the same document under the same id again is a no-op.

        Raises:
            GraphValidationError: every problem found in the document.
            GraphConflictError: the id is taken by a different document.
        """
        graph = self.validate_graph(document)
        stored = StoredGraph(graph.id, dict(graph.document), graph.digest, time.time())
        result = await self.store.put_graph(stored)
        if result == "conflict":
            raise GraphConflictError(graph.id)
        cached = self._graphs.get(graph.id)
        if cached is not None:
            return cached
        self._graphs[graph.id] = graph
        return graph

    async def get_graph(self, graph_id: str) -> Graph:
        """The compiled graph.

        Raises:
            UnknownGraphError: no graph has this id.
            GraphValidationError: the stored document no longer validates
                (a tool it names is no longer registered).
        """
        graph = self._graphs.get(graph_id)
        if graph is not None:
            return graph
        stored = await self.store.get_graph(graph_id)
        if stored is None:
            raise UnknownGraphError(graph_id)
        graph = self.validate_graph(stored.document)
        self._graphs[graph_id] = graph
        return graph

    async def get_graph_document(self, graph_id: str) -> StoredGraph:
        """The stored document of a graph. Raises :class:`UnknownGraphError`."""
        stored = await self.store.get_graph(graph_id)
        if stored is None:
            raise UnknownGraphError(graph_id)
        return stored

    async def list_graphs(
        self, *, cursor: str | None = None, limit: int = 50, graphs: Sequence[str] | None = None
    ) -> Page[StoredGraph]:
        """Graphs in id order; ``graphs``: only ids matching one of these patterns
        (``*`` any run of characters, ``?`` one)."""
        if graphs is None:
            return await self.store.list_graphs(cursor=cursor, limit=limit)
        return await self.store.list_graphs(cursor=cursor, limit=limit, graphs=graphs)

    # -- runs --------------------------------------------------------------------

    @property
    def active_runs(self) -> int:
        """Runs held by this process (pending or running)."""
        return len(self._host.handles)

    async def start_run(self, graph_id: str, initial_state: Any = None) -> RunRecord:
        """Create a run and start its actor; returns at once with the ``pending`` record.

        Raises:
            UnknownGraphError: no graph has this id.
            LimitExceededError: the initial state is over ``max_state_bytes``.
            StateValidationError: the state model rejects the initial state.
            CapacityError: the process already holds ``max_active_runs`` runs.
            EngineStoppingError: the engine is shutting down.
        """
        if self._stopping:
            raise EngineStoppingError("the engine is stopping: it takes no new runs")
        graph = await self.get_graph(graph_id)
        if len(self._host.handles) >= self.limits.max_active_runs:
            raise CapacityError(
                f"{len(self._host.handles)} runs are active; "
                f"the limit is {self.limits.max_active_runs}",
                details={"limit": self.limits.max_active_runs},
            )
        if initial_state is not None:
            try:
                size = len(pydantic_core.to_json(initial_state))
            except (TypeError, ValueError, pydantic_core.PydanticSerializationError) as exc:
                raise StateValidationError(
                    f"initial state is not JSON-serialisable: {exc}",
                    node=None,
                    errors=[{"field": "", "message": str(exc), "type": "json"}],
                ) from None
            if size > self.limits.max_state_bytes:
                raise LimitExceededError(
                    f"initial state is {size} bytes; the limit is {self.limits.max_state_bytes}",
                    limit="max_state_bytes",
                    value=size,
                    maximum=self.limits.max_state_bytes,
                )
        _, state = graph.state.initial(initial_state)
        now = time.time()
        # On a shared store, a node with no free running slot queues the run
        # (epoch 0: no node holds it) for whichever node has one first.
        queued = self.cluster is not None and self._host.free_slots <= 0
        record = RunRecord(
            run_id=os.urandom(16).hex(),
            graph_id=graph.id,
            status=RunStatus.PENDING,
            state=state,
            current_node=graph.start_node,
            created_at=now,
            updated_at=now,
            epoch=0 if queued else 1,
        )
        await self.store.create_run(record)
        if not queued:
            self._host.spawn(graph, record)
        observer = self._host.observer
        if observer is not None:
            observer.run_started(graph.id)
        return record

    @property
    def stopping(self) -> bool:
        """The engine is stopping (draining): it takes no new runs."""
        return self._stopping

    @property
    def followers(self) -> int:
        """Log followers (``follow`` iterators) open now."""
        return self._followers

    def observe(self, observer: Observer | None) -> None:
        """Tell ``observer`` (see :mod:`trioflow.observe`) about runs, steps and
        checkpoints from now on; None stops it."""
        self._host.observer = observer

    def trace(self, tracer: TracerProvider | Tracer | None) -> None:
        """Make OpenTelemetry spans of run executions and their steps from now on; None stops.

        Give an OpenTelemetry ``TracerProvider`` (the engine takes its tracer
        ``trioflow``), or a ``Tracer``; :mod:`trioflow.tracing` describes the
        spans. Executions already under way keep what they had when they
        started (spans, or none).

        Raises:
            ImportError: opentelemetry is not installed.
        """
        self._host.tracing = None if tracer is None else Tracing(tracer)

    def store_health(self) -> StoreHealth:
        """Whether the store takes writes, as the last checkpoint or probe found.

        While writes fail, asking starts a background probe write (at most
        one every second), so recovery is noticed even when no run writes.
        Never waits.
        """
        return self._host.store_health()

    async def get_run(self, run_id: str) -> RunRecord:
        """The run's record as of its last checkpoint. Raises :class:`UnknownRunError`."""
        record = await self.store.get_run(run_id)
        if record is None:
            raise UnknownRunError(run_id)
        return record

    async def list_runs(
        self,
        *,
        graph_id: str | None = None,
        status: RunStatus | None = None,
        cursor: str | None = None,
        limit: int = 50,
        graphs: Sequence[str] | None = None,
    ) -> Page[RunRecord]:
        """Runs, newest first, filtered; pass ``next_cursor`` back for the next page.

        ``graphs``: only runs of graphs whose id matches one of these patterns
        (``*`` any run of characters, ``?`` one), filtered in the store's query.
        """
        if graphs is None:
            return await self.store.list_runs(
                graph_id=graph_id, status=status, cursor=cursor, limit=limit
            )
        return await self.store.list_runs(
            graph_id=graph_id, status=status, cursor=cursor, limit=limit, graphs=graphs
        )

    async def count_runs(
        self,
        *,
        graph_id: str | None = None,
        graphs: Sequence[str] | None = None,
        statuses: Sequence[RunStatus] | None = None,
    ) -> dict[RunStatus, int]:
        """How many stored runs there are of each status, filtered as :meth:`list_runs`;
        ``statuses``: count only these."""
        return await self.store.count_runs(graph_id=graph_id, graphs=graphs, statuses=statuses)

    async def read_log(self, run_id: str, *, after: int = 0, limit: int = 1000) -> list[LogEntry]:
        """Stored log entries with ``seq > after``."""
        return await self.store.read_log(run_id, after=after, limit=limit)

    async def cancel(self, run_id: str) -> RunRecord:
        """Cancel a pending or running run and wait until it is recorded ``cancelled``.

        Cancelling a cancelled run returns it again (idempotent).

        Raises:
            UnknownRunError: no such run.
            RunStateError: the run already ended ``completed`` or ``failed``
                (also when it finished before the cancel took effect).
        """
        handle = self._host.handles.get(run_id)
        if handle is not None:
            handle.send(Cancel())
            await handle.done.wait()
            record = handle.record or await self.get_run(run_id)  # what it committed last
            if not record.status.is_terminal:
                # It stopped without recording its end (its store failed).
                record = await self.get_run(run_id)
        else:
            record = await self.get_run(run_id)
        if record.status is RunStatus.CANCELLED:
            return record
        if record.status.is_terminal:
            raise RunStateError(run_id, record.status.value, "cancel")
        # Not terminal and no actor executes it here: a run left stalled by a
        # store failure, or left by a stopped process (an engine opened with
        # resume=False), a waiting run, or (on a shared store) a run queued
        # or held by another node. Record its end directly, on top of its last
        # checkpoint, claiming it: that works unless a live node holds it.
        try:
            return await self._cancel_stored(record)
        except LeaseHeldError:
            pass
        # Another node executes it: the request goes to the run's row first,
        # then (notification, or that node's next heartbeat) to its actor.
        if not isinstance(self.store, SharedStore):  # pragma: no cover - shared stores only
            raise RunStateError(run_id, record.status.value, "cancel")
        await self.store.request_cancel(run_id)
        final = await self._until_cancelled(run_id)
        if final.status is not RunStatus.CANCELLED:
            raise RunStateError(run_id, final.status.value, "cancel")
        return final

    async def _until_cancelled(self, run_id: str, poll_s: float = CANCEL_POLL_S) -> RunRecord:
        """The run's record once it ended, after a cancel request went to another node.

        Woken by its log, or reading every ``poll_s``. A run that stopped at a
        wait meanwhile belongs to no node any more (nobody will act on the
        request): it is cancelled here.
        """
        notifier = self.store.notifier
        while True:
            event = notifier.watch(run_id)
            try:
                record = await self.get_run(run_id)
                if record.status.is_terminal:
                    return record
                if record.status is RunStatus.WAITING:
                    with contextlib.suppress(LeaseHeldError):
                        return await self._cancel_stored(record)
                with trio.move_on_after(poll_s):
                    await event.wait()
            finally:
                notifier.release(run_id, event)

    async def _cancel_stored(self, record: RunRecord) -> RunRecord:
        for _ in range(3):
            now = time.time()
            entry = LogEntry(
                record.last_seq + 1,
                now,
                Level.WARNING,
                Event.RUN_CANCELLED.value,
                record.current_node,
                "cancelled by request",
                {"steps": record.step},
            )
            final = record.evolve(
                status=RunStatus.CANCELLED,
                finished_at=now,
                updated_at=now,
                last_seq=entry.seq,
                waiting=None,
                epoch=record.epoch + 1,
            )
            try:
                await self.store.save_run(final, [entry], claim=True)
            except LeaseHeldError:
                raise
            except StoreConflictError:
                # Someone wrote in between: look again.
                record = await self.get_run(record.run_id)
                if record.status is RunStatus.CANCELLED:
                    return record
                if record.status.is_terminal:
                    raise RunStateError(record.run_id, record.status.value, "cancel") from None
                continue
            self._host.stalled.pop(record.run_id, None)
            return final
        raise RunStateError(
            record.run_id, record.status.value, "cancel (another process keeps writing it)"
        )

    async def resume(self, run_id: str, input: Any, *, request_id: str | None = None) -> RunRecord:
        """Give a waiting run the input it waits for; it goes on at once.

        The input is checked against the wait (its ``input_schema`` or
        ``input_model``), merged into the state as a node's update would be,
        and recorded (``run_input``) in one checkpoint on top of the waiting
        record: of two concurrent resumes exactly one wins. The run then goes
        on from the wait's node: its callable, if it has one, then its edges.

        Args:
            run_id: the waiting run.
            input: a JSON object.
            request_id: when given, it must be the current wait's (as in
                ``waiting.request_id``), so an answer to an older question is
                refused rather than applied to a newer one.

        Returns:
            The run's record as it left the wait (``running``).

        Raises:
            UnknownRunError: no such run.
            RunStateError: the run is not waiting (or another resume won).
            StaleRequestError: ``request_id`` is not the current wait's.
            InputValidationError: the input does not fit; every problem listed.
            StateValidationError: the state model rejects the merged state.
            LimitExceededError: the input or the merged state is too large.
            CapacityError: the process holds ``max_active_runs`` runs.
        """
        return await self._waits.resume(run_id, input, request_id)

    async def signal(self, run_id: str, name: str, updates: Mapping[str, Any]) -> StoredSignal:
        """Send a run state updates from outside; stored before this returns.

        The run applies its signals between steps, in the order they arrived,
        as state updates the state model validates (``signal_received``, or
        ``signal_rejected`` when the model refuses them at that point), each
        exactly once, across crashes too. A waiting run has them applied at
        once and keeps waiting.

        Returns:
            The stored signal (its ``signal_id`` is 1, 2, 3, ... per run).

        Raises:
            UnknownRunError: no such run.
            RunStateError: the run has ended.
            StateValidationError: the updates are not a JSON object the
                state model accepts now.
            LimitExceededError: the updates are over ``max_state_bytes``.
        """
        return await self._waits.signal(run_id, name, updates)

    async def wait_stop(self, run_id: str) -> RunRecord:
        """Wait until the run ends or waits for input, and return its record.

        Raises:
            UnknownRunError: no such run.
            RunStalledError: the run stopped without an end (see :meth:`wait`).
        """
        handle = self._host.handles.get(run_id)
        if handle is not None:
            await handle.done.wait()
            final = handle.record
            if final is not None and (
                final.status.is_terminal or final.status is RunStatus.WAITING
            ):
                return final
        record = await self.get_run(run_id)
        if record.status.is_terminal or record.status is RunStatus.WAITING:
            return record
        self._raise_if_stopped(run_id)
        async with aclosing(self.follow(run_id, after=record.last_seq)) as entries:
            async for entry in entries:
                if entry.event == Event.RUN_WAITING.value:
                    break
        return await self.get_run(run_id)

    async def cancel_many(self, run_ids: Iterable[str]) -> list[RunRecord]:
        """Cancel many runs of this engine at once and wait until each is recorded.

        Every run is signalled first, then all are awaited, so the cost per
        run is only its own cancellation. Runs this engine does not hold
        (unknown, finished, or owned by another process) are skipped.

        Returns:
            The final records of the runs that were active here, in the order
            given; a run that finished before the cancel took effect keeps
            its own terminal status.
        """
        handles = [h for h in (self._host.handles.get(r) for r in run_ids) if h is not None]
        for handle in handles:
            handle.send(Cancel())
        records = []
        for handle in handles:
            await handle.done.wait()
            records.append(handle.record or await self.get_run(handle.run_id))
        return records

    async def wait(self, run_id: str) -> RunRecord:
        """Wait until the run is terminal and return its final record.

        Raises:
            UnknownRunError: no such run.
            RunStalledError: the run stopped without an end, because its
                store failed or the engine is closing; it stays resumable.
        """
        handle = self._host.handles.get(run_id)
        if handle is not None:
            await handle.done.wait()
            # The actor's record is what it last committed; no store read needed.
            if handle.record is not None and handle.record.status.is_terminal:
                return handle.record
            # It stopped without an end: its store failed, or the engine closes.
        record = await self.get_run(run_id)
        if record.status.is_terminal:
            return record
        self._raise_if_stopped(run_id)
        async for _ in self.follow(run_id, after=record.last_seq):
            pass
        return await self.get_run(run_id)

    def _raise_if_stopped(self, run_id: str) -> None:
        """Raise :class:`RunStalledError` if nothing here will ever end ``run_id``."""
        stalled = self._host.stalled.get(run_id)
        if stalled is not None:
            raise RunStalledError(run_id, stalled)
        if self._closing and run_id not in self._host.handles:
            raise RunStalledError(run_id, "the engine stopped before the run ended")

    async def follow(self, run_id: str, *, after: int = 0) -> AsyncGenerator[LogEntry, None]:
        """Every log entry with ``seq > after``: stored ones, then live ones.

        Ends after the run's terminal entry. Reads by cursor from the store,
        so a slow consumer holds no buffer and never slows the run. Close it
        (``contextlib.aclosing``) when you stop early, to free its follower
        slot at once.

        Raises:
            UnknownRunError: no such run.
            CapacityError: ``max_followers`` followers are already active.
        """
        async with aclosing(self.follow_pages(run_id, after=after)) as pages:
            async for page in pages:
                for entry in page:
                    yield entry

    async def follow_pages(
        self, run_id: str, *, after: int = 0, limit: int | None = None
    ) -> AsyncGenerator[list[LogEntry], None]:
        """Like :meth:`follow`, in pages: every entry available at once, up to ``limit``.

        A consumer that is behind gets big pages and one that keeps up gets
        what each checkpoint wrote, so a stream can send one message per
        page instead of one per entry.

        Raises:
            UnknownRunError: no such run.
            CapacityError: ``max_followers`` followers are already active.
            RunStalledError: the run stopped without an end because its store
                failed (after every entry it has was yielded).
        """
        page_size = min(limit or self.limits.log_page, self.limits.log_page)
        record = await self.get_run(run_id)
        if record.status.is_terminal and after >= record.last_seq:
            return
        if self._followers >= self.limits.max_followers:
            raise CapacityError(
                f"{self._followers} followers are active; the limit is {self.limits.max_followers}"
            )
        self._followers += 1
        notifier = self.store.notifier
        cursor = max(after, 0)
        try:
            while True:
                event = notifier.watch(run_id)
                try:
                    entries = await self.store.read_log(run_id, after=cursor, limit=page_size)
                    if not entries:
                        self._raise_if_stopped(run_id)
                        # On a shared store a notification may be lost: read again anyway.
                        with trio.move_on_after(self._follow_poll_s or math.inf):
                            await event.wait()
                        continue
                finally:
                    notifier.release(run_id, event)
                for i, entry in enumerate(entries):
                    if entry.is_terminal:
                        yield entries[: i + 1]
                        return
                cursor = entries[-1].seq
                yield entries
        finally:
            self._followers -= 1

    async def graph_mermaid(self, graph_id: str, run_id: str | None = None) -> str:
        """The graph as a Mermaid flowchart; with ``run_id``, that run's progress marked.

        The visited nodes come from the run's log (``node_completed``),
        read up to :data:`MERMAID_LOG_ENTRIES` entries: a longer run shows
        the nodes of its first ones, its current node always. An entry of a
        branch (``data["branch"]``) marks that branch's node (in a map, the
        template's), never a node of the graph with the same id: it belongs
        to the fan-out the last ``fanout_started``/``fanout_resumed`` entry named.

        Raises:
            UnknownGraphError; UnknownRunError: no such run, or it is not
            one of this graph's.
        """
        graph = await self.get_graph(graph_id)
        if run_id is None:
            return graph.to_mermaid()
        run = await self.get_run(run_id)
        if run.graph_id != graph_id:
            raise UnknownRunError(run_id)
        from .mermaid import to_mermaid

        visited: set[str] = set()
        in_branches: set[tuple[str, str, str]] = set()
        fan_node: str | None = None  # the fan-out whose branches log now
        after = 0
        last = min(run.last_seq, MERMAID_LOG_ENTRIES)
        while after < last:
            page = await self.read_log(run_id, after=after, limit=min(1000, last - after))
            if not page:
                break
            for e in page:
                branch = e.data.get("branch")
                if branch is None:
                    if e.event == "node_completed" and e.node:
                        visited.add(e.node)
                    elif e.event in ("fanout_started", "fanout_resumed"):
                        fan_node = e.node
                elif e.event == "node_completed" and e.node and fan_node is not None:
                    in_branches.add((fan_node, str(branch), e.node))
            after = page[-1].seq
        return to_mermaid(graph, run, visited, branch_visited=in_branches)

    async def delete_runs(self, *, older_than_s: float) -> int:
        """Delete terminal runs that finished more than ``older_than_s`` ago, with their logs."""
        return await self.store.delete_runs(finished_before=time.time() - older_than_s)

    # -- start-up ----------------------------------------------------------------

    async def _resume_unfinished(self, *, crashed: bool) -> int:
        """Restart runs a previous process left unfinished, from their last checkpoint.

        Args:
            crashed: the previous process died (its session did not end
                cleanly), so every run it was executing crashed with it. A run
                whose process died twice while it stayed at one step is not
                resumed a third time: it fails with ``crash_loop``.
        """
        resumed = 0
        for record in await self.store.unfinished_runs():
            if record.run_id in self._host.handles:
                continue
            died = None
            if crashed and record.status is RunStatus.RUNNING:
                record = record.evolve(crashes=record.crashes + 1)
                died = "the process died"
            graph = await self._graph_to_resume(record, died)
            if isinstance(graph, RunFailure):
                await self._fail_stored(record, graph)
                continue
            self._host.spawn(graph, record)
            resumed += 1
        return resumed

    async def _drain(self, grace_s: float) -> None:
        """Let the nodes in flight finish, for up to ``grace_s`` seconds (engine shutdown)."""
        handles = list(self._host.handles.values())
        if grace_s <= 0 or not handles:
            return
        log.info("draining %d runs (up to %g s)", len(handles), grace_s)
        for handle in handles:
            handle.send(Drain())
        with trio.CancelScope(shield=True), trio.move_on_after(grace_s):
            for handle in handles:
                await handle.done.wait()

    async def _start_claimed(self, claimed: list[Claimed]) -> None:
        """Execute runs this node has just claimed on a shared store (each at its new epoch).

        A store error on one of them leaves it as claimed: its lease is not
        renewed (no actor holds it), so it expires and the run is claimed
        again, here or elsewhere.
        """
        for item in claimed:
            try:
                await self._start_one_claimed(item)
            except StoreError as exc:
                log.warning(
                    "run %s: could not start it after claiming it: %s",
                    item.record.run_id,
                    exc.message,
                )

    async def _start_one_claimed(self, item: Claimed) -> None:
        record = item.record
        old = self._host.handles.get(record.run_id)
        if old is not None:
            # Its lease lapsed here while the actor lived (a heartbeat
            # that could not get through): that actor is fenced off now.
            old.send(Abandon("this node claimed the run again"))
        died = "the node executing this run died (or lost the store)" if item.taken_over else None
        graph = await self._graph_to_resume(record, died)
        if isinstance(graph, RunFailure):
            await self._end_claimed(record, graph)
            return
        first: list[Command] = []
        if item.cancel_requested:
            first.append(Cancel())
        if item.signals_pending:
            first.append(Signal("", {}))
        if item.taken_over:
            log.warning(
                "run %s: taken over from a node whose lease expired (at node %s)",
                record.run_id,
                record.current_node,
            )
        self._host.spawn(graph, record, *first)

    async def _graph_to_resume(self, record: RunRecord, died: str | None) -> Graph | RunFailure:
        """The graph to resume ``record`` on, or why it must fail instead.

        ``died``: what happened to its executor (``record.crashes`` counts
        it already); the second time in a row at one step is a crash loop.
        A graph that is gone or no longer compiles fails the run too.
        """
        if died is not None and record.crashes >= 2:
            return RunFailure(
                "crash_loop",
                f"{died} {record.crashes} times in a row while this run was at node "
                f"{record.current_node} (step {record.step}); it is not resumed again",
                node=record.current_node,
                extra={"crashes": record.crashes},
            )
        try:
            return await self.get_graph(record.graph_id)
        except (UnknownGraphError, GraphValidationError) as exc:
            return RunFailure(
                "graph_unavailable", f"cannot resume run: {exc.message}", node=record.current_node
            )

    async def _end_claimed(self, record: RunRecord, failure: RunFailure) -> None:
        # A conflict: claimed by yet another node meanwhile, its business now.
        with contextlib.suppress(StoreConflictError):
            await self._fail_stored(record, failure)

    async def _fail_stored(self, record: RunRecord, failure: RunFailure) -> None:
        """End a run that no actor executes ``failed``, on top of its last checkpoint."""
        now = time.time()
        entry = LogEntry(
            record.last_seq + 1,
            now,
            Level.ERROR,
            Event.RUN_FAILED.value,
            record.current_node,
            failure.message,
            {"error": failure.as_dict()},
        )
        final = record.evolve(
            status=RunStatus.FAILED,
            error=failure.as_dict(),
            finished_at=now,
            updated_at=now,
            last_seq=entry.seq,
        )
        await self.store.save_run(final, [entry])


@asynccontextmanager
async def _one_error() -> AsyncIterator[None]:
    """Raise the one exception of a group out of the engine's nursery as itself.

    Actors never raise (a run's failure is its own), so what leaves the
    engine's nursery is the embedding program's own exception, or a store
    error while opening: the caller gets it as raised, not wrapped in an
    exception group it has to unpack.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


@asynccontextmanager
async def open_engine(
    *,
    store: Store | None = None,
    registry: Registry | None = None,
    limits: EngineLimits | None = None,
    evaluator: Evaluator = "compiled",
    resume: bool = True,
    drain_timeout: float = 0.0,
    tracer: TracerProvider | Tracer | None = None,
) -> AsyncIterator[Engine]:
    """Open an engine: the store, the supervisor nursery, resumed runs.

    Leaving the block stops the engine: it takes no new runs, lets the nodes
    in flight finish for up to ``drain_timeout`` seconds (each run then stops
    at its step boundary, its last step checkpointed), and cancels what is
    still running. Runs stopped either way are left as their last checkpoint
    says (``running``), so a durable store resumes them the next time an
    engine opens on it, and on a shared store another node takes them over
    at once (this one gives up its leases).

    Args:
        store: where graphs, runs and logs live (default: a new ``MemoryStore``).
        registry: tools and state models (default: the built-in tools).
        limits: process-wide bounds (default: :class:`EngineLimits()`).
        evaluator: condition evaluator, ``"compiled"`` or ``"asteval"``.
        resume: resume the store's unfinished runs on open. Such an engine
            owns the store's runs: it records its session in the store, so
            the next one knows whether it stopped cleanly or died (crash
            loops are told apart that way). ``resume=False`` is for tools
            that only read or prune a store. On a shared store (PostgreSQL)
            such an engine is a node: it executes runs, claims runs no live
            node holds (see :mod:`trioflow.cluster`) and times out waits.
        drain_timeout: seconds the nodes in flight get to finish when the
            engine stops (0: cancel them at once).
        tracer: an OpenTelemetry ``TracerProvider`` or ``Tracer``: the
            engine makes spans of its runs from the start, the runs it
            resumes on open included (see :meth:`Engine.trace`).

    Raises:
        ImportError: ``tracer`` is given and opentelemetry is not installed.
    """
    store = store if store is not None else MemoryStore()
    registry = registry if registry is not None else default_registry()
    await store.open()
    session = False
    try:
        async with _one_error(), trio.open_nursery() as nursery:
            engine = Engine(
                store=store,
                registry=registry,
                nursery=nursery,
                limits=limits or EngineLimits(),
                evaluator=evaluator,
            )
            if tracer is not None:
                engine.trace(tracer)
            cluster = engine.cluster
            if resume:
                clean = await store.begin_session()
                session = True
                if cluster is not None:
                    # A node: it claims the runs no live node holds (those of
                    # a node that died, queued ones) instead of taking all.
                    await nursery.start(cluster.run)
                    cluster.wake()
                    poll = store.claim_interval if isinstance(store, SharedStore) else None
                    nursery.start_soon(engine._waits.watch_deadlines, poll, name="wait-deadlines")
                else:
                    if not clean:
                        log.warning("the previous engine on this store did not stop cleanly")
                    count = await engine._resume_unfinished(crashed=not clean)
                    if count:
                        log.info("resumed %d unfinished runs", count)
                    # The engine that owns the store's runs times out their waits.
                    nursery.start_soon(engine._waits.watch_deadlines, name="wait-deadlines")
            try:
                yield engine
            finally:
                engine._stopping = True
                if cluster is not None:
                    cluster.draining = True
                await engine._drain(drain_timeout)
                engine._closing = True
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if session and isinstance(store, SharedStore):
                # Every actor has stopped: the runs this node still held go
                # back to the others now, not when their leases expire.
                try:
                    released = await store.release_leases({})
                    if released:
                        log.info("released %d runs to the other nodes", released)
                except StoreError as exc:
                    log.error("could not release this node's runs: %s", exc.message)
            if session:
                # Every actor has stopped: the runs left unfinished were
                # stopped by this engine, not by a crash.
                try:
                    await store.end_session()
                except StoreError as exc:
                    log.error("could not record a clean stop in the store: %s", exc.message)
            await store.aclose()
