"""The engine: the supervisor that owns every run actor, and the embedding API."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pydantic_core
import trio

from .actor import Cancel, RunActor
from .document import GraphDocument
from .errors import (
    CapacityError,
    EngineError,
    GraphConflictError,
    GraphValidationError,
    LimitExceededError,
    RunFailure,
    RunStateError,
    StateValidationError,
    UnknownGraphError,
    UnknownRunError,
)
from .expressions import Evaluator
from .graph import Graph, compile_graph
from .logs import Event, Level, LogEntry
from .registry import Registry, default_registry
from .runs import RunRecord, RunStatus
from .stores.base import Page, Store, StoredGraph
from .stores.memory import MemoryStore

log = logging.getLogger("trioflow.engine")


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """Bounds that keep one process healthy under any input.

    Attributes:
        max_active_runs: runs held in this process (pending + running); more
            are refused with :class:`~core.errors.CapacityError`.
        max_running: runs executing nodes at once; the rest wait ``pending``.
        max_state_bytes: size of an initial state as compact JSON.
        max_followers: concurrent ``follow`` iterators.
        worker_threads: worker threads for sync tools.
        log_page: entries a follower reads from the store per query.
    """

    max_active_runs: int = 10_000
    max_running: int = 10_000
    max_state_bytes: int = 1 << 20
    max_followers: int = 10_000
    worker_threads: int = 32
    log_page: int = 500


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
        self._nursery = nursery
        self._graphs: dict[str, Graph] = {}
        self._actors: dict[str, RunActor] = {}
        # Running slots: a counter and a FIFO of runs waiting for one, so that
        # pending runs start in the order they were created (a CapacityLimiter
        # would serve them in the order their tasks happened to start).
        self._running = 0
        self._waiting: deque[RunActor] = deque()
        self._thread_limiter = trio.CapacityLimiter(limits.worker_threads)
        self._followers = 0

    # -- graphs ------------------------------------------------------------------

    def validate_graph(self, document: Mapping[str, Any] | GraphDocument) -> Graph:
        """Validate and compile a document without storing it.

        Raises:
            GraphValidationError: every problem found.
        """
        return compile_graph(document, self.registry, evaluator=self._evaluator)

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

    async def list_graphs(self, *, cursor: str | None = None, limit: int = 50) -> Page[StoredGraph]:
        return await self.store.list_graphs(cursor=cursor, limit=limit)

    # -- runs --------------------------------------------------------------------

    @property
    def active_runs(self) -> int:
        """Runs held by this process (pending or running)."""
        return len(self._actors)

    async def start_run(self, graph_id: str, initial_state: Any = None) -> RunRecord:
        """Create a run and start its actor; returns at once with the ``pending`` record.

        Raises:
            UnknownGraphError: no graph has this id.
            LimitExceededError: the initial state is over ``max_state_bytes``.
            StateValidationError: the state model rejects the initial state.
            CapacityError: the process already holds ``max_active_runs`` runs.
        """
        graph = await self.get_graph(graph_id)
        if len(self._actors) >= self.limits.max_active_runs:
            raise CapacityError(
                f"{len(self._actors)} runs are active; the limit is {self.limits.max_active_runs}",
                details={"limit": self.limits.max_active_runs},
            )
        if initial_state is not None:
            try:
                size = len(pydantic_core.to_json(initial_state))
            except (TypeError, ValueError, pydantic_core.PydanticSerializationError) as exc:
                raise StateValidationError(
                    f"initial state is not JSON-serialisable: {exc}", node=None,
                    errors=[{"field": "", "message": str(exc), "type": "json"}],
                ) from None  # fmt: skip
            if size > self.limits.max_state_bytes:
                raise LimitExceededError(
                    f"initial state is {size} bytes; the limit is {self.limits.max_state_bytes}",
                    limit="max_state_bytes", value=size, maximum=self.limits.max_state_bytes,
                )  # fmt: skip
        _, state = graph.state.initial(initial_state)
        now = time.time()
        record = RunRecord(
            run_id=os.urandom(16).hex(),
            graph_id=graph.id,
            status=RunStatus.PENDING,
            state=state,
            current_node=graph.start_node,
            created_at=now,
            updated_at=now,
        )
        await self.store.create_run(record)
        self._spawn(graph, record)
        return record

    def _spawn(self, graph: Graph, record: RunRecord) -> None:
        actor = RunActor(self, graph, record)
        self._actors[record.run_id] = actor
        if self._running < self.limits.max_running:
            self._running += 1
            actor.grant_slot()
        else:
            self._waiting.append(actor)
        self._nursery.start_soon(actor.run, name=f"run-{record.run_id}")

    def _release_slot(self, actor: RunActor) -> None:
        """Called once by every actor when it stops executing."""
        if not actor.has_slot:
            return  # it never held one (cancelled while pending)
        self._running -= 1
        while self._waiting and self._running < self.limits.max_running:
            nxt = self._waiting.popleft()
            if nxt.done.is_set() or nxt.cancel_requested:
                continue
            self._running += 1
            nxt.grant_slot()

    def _forget(self, actor: RunActor) -> None:
        if self._actors.get(actor.run_id) is actor:
            del self._actors[actor.run_id]

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
    ) -> Page[RunRecord]:
        """Runs, newest first, filtered; pass ``next_cursor`` back for the next page."""
        return await self.store.list_runs(graph_id=graph_id, status=status, cursor=cursor,
                                          limit=limit)  # fmt: skip

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
        actor = self._actors.get(run_id)
        if actor is not None:
            actor.send(Cancel())
            await actor.done.wait()
            record = actor.record  # what it committed last
        else:
            record = await self.get_run(run_id)
        if record.status is RunStatus.CANCELLED:
            return record
        if record.status.is_terminal:
            raise RunStateError(run_id, record.status.value, "cancel")
        # Not terminal and no actor here: another process owns it.
        raise RunStateError(run_id, record.status.value, "cancel (owned by another process)")

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
        actors = [a for a in (self._actors.get(r) for r in run_ids) if a is not None]
        for actor in actors:
            actor.send(Cancel())
        for actor in actors:
            await actor.done.wait()
        return [actor.record for actor in actors]

    async def wait(self, run_id: str) -> RunRecord:
        """Wait until the run is terminal and return its final record.

        Raises:
            UnknownRunError: no such run.
        """
        actor = self._actors.get(run_id)
        if actor is not None:
            await actor.done.wait()
            # The actor's record is what it last committed; no store read needed.
            if actor.record.status.is_terminal:
                return actor.record
            return await self.get_run(run_id)
        record = await self.get_run(run_id)
        if record.status.is_terminal:
            return record
        async for _ in self.follow(run_id, after=record.last_seq):
            pass
        return await self.get_run(run_id)

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
        """
        page_size = min(limit or self.limits.log_page, self.limits.log_page)
        record = await self.get_run(run_id)
        if record.status.is_terminal and after >= record.last_seq:
            return
        if self._followers >= self.limits.max_followers:
            raise CapacityError(f"{self._followers} followers are active; the limit is "
                                f"{self.limits.max_followers}")  # fmt: skip
        self._followers += 1
        notifier = self.store.notifier
        cursor = max(after, 0)
        try:
            while True:
                event = notifier.watch(run_id)
                try:
                    entries = await self.store.read_log(run_id, after=cursor, limit=page_size)
                    if not entries:
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

    async def delete_runs(self, *, older_than_s: float) -> int:
        """Delete terminal runs that finished more than ``older_than_s`` ago, with their logs."""
        return await self.store.delete_runs(finished_before=time.time() - older_than_s)

    # -- start-up ----------------------------------------------------------------

    async def _resume_unfinished(self) -> int:
        """Restart runs a previous process left unfinished, from their last checkpoint."""
        resumed = 0
        for record in await self.store.unfinished_runs():
            if record.run_id in self._actors:
                continue
            try:
                graph = await self.get_graph(record.graph_id)
            except (UnknownGraphError, GraphValidationError) as exc:
                await self._fail_unresumable(record, exc)
                continue
            self._spawn(graph, record)
            resumed += 1
        return resumed

    async def _fail_unresumable(self, record: RunRecord, exc: EngineError) -> None:
        failure = RunFailure("graph_unavailable", f"cannot resume run: {exc.message}",
                             node=record.current_node)  # fmt: skip
        now = time.time()
        entry = LogEntry(record.last_seq + 1, now, Level.ERROR, Event.RUN_FAILED.value,
                         record.current_node, failure.message,
                         {"error": failure.as_dict()})  # fmt: skip
        final = record.evolve(status=RunStatus.FAILED, error=failure.as_dict(), finished_at=now,
                              updated_at=now, last_seq=entry.seq)  # fmt: skip
        await self.store.save_run(final, [entry])


@asynccontextmanager
async def open_engine(
    *,
    store: Store | None = None,
    registry: Registry | None = None,
    limits: EngineLimits | None = None,
    evaluator: Evaluator = "compiled",
    resume: bool = True,
) -> AsyncIterator[Engine]:
    """Open an engine: the store, the supervisor nursery, resumed runs.

    Leaving the block cancels runs still in flight; they are left as their
    last checkpoint says (``running``), so a durable store resumes them the
    next time an engine opens on it.

    Args:
        store: where graphs, runs and logs live (default: a new ``MemoryStore``).
        registry: tools and state models (default: the built-in tools).
        limits: process-wide bounds (default: :class:`EngineLimits()`).
        evaluator: condition evaluator, ``"compiled"`` or ``"asteval"``.
        resume: resume the store's unfinished runs on open.
    """
    store = store if store is not None else MemoryStore()
    registry = registry if registry is not None else default_registry()
    await store.open()
    try:
        async with trio.open_nursery() as nursery:
            engine = Engine(store=store, registry=registry, nursery=nursery,
                            limits=limits or EngineLimits(), evaluator=evaluator)  # fmt: skip
            if resume:
                count = await engine._resume_unfinished()
                if count:
                    log.info("resumed %d unfinished runs", count)
            try:
                yield engine
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
