"""A store wrapper that injects write failures, for testing the engine against any backend."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from trioflow.errors import StoreError
from trioflow.logs import LogEntry
from trioflow.runs import RunRecord, RunStatus
from trioflow.stores.base import Page, PutResult, Store, StoredGraph, StoredSignal

Rule = Callable[[RunRecord], bool]


async def until(check: Callable[[], Awaitable[bool] | bool], interval: float = 0.1) -> None:
    """Poll ``check`` (a function or coroutine function) until it is true.

    For state observed from outside (a store's health, a record in a store
    another party writes); callers bound it with ``fail_after``.
    """
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await trio.sleep(interval)


class FaultyStore(Store):
    """Delegates to ``inner``; checkpoints matching the active rule raise a StoreError.

    ``refused`` counts the checkpoints refused so far. Reads, run creation and
    graphs are never refused (a test picks the writes it breaks).
    """

    def __init__(self, inner: Store) -> None:
        super().__init__()
        self.inner = inner
        self.notifier = inner.notifier  # the inner store's writes wake followers
        self.refused = 0
        self._rule: Rule | None = None
        self._transient = True
        self._times: int | None = None

    def fail(
        self, rule: Rule = lambda run: True, *, transient: bool = True, times: int | None = None
    ) -> None:
        """Refuse matching checkpoints (the next ``times`` of them, or all) from now on."""
        self._rule, self._transient, self._times = rule, transient, times

    def heal(self) -> None:
        self._rule = None

    @property
    def failing(self) -> bool:
        return self._rule is not None

    def _check(self, run: RunRecord | None) -> None:
        rule = self._rule
        if rule is None or (run is not None and not rule(run)):
            return
        if self._times is not None:
            if self._times <= 0:
                self._rule = None
                return
            self._times -= 1
        self.refused += 1
        raise StoreError("injected failure: disk full", transient=self._transient)

    # -- the Store interface -------------------------------------------------------

    async def open(self) -> None:
        await self.inner.open()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def begin_session(self) -> bool:
        return await self.inner.begin_session()

    async def end_session(self) -> None:
        await self.inner.end_session()

    async def probe(self) -> None:
        self._check(None)
        await self.inner.probe()

    async def put_graph(self, graph: StoredGraph) -> PutResult:
        return await self.inner.put_graph(graph)

    async def get_graph(self, graph_id: str) -> StoredGraph | None:
        return await self.inner.get_graph(graph_id)

    async def list_graphs(self, *, cursor: str | None = None, limit: int = 50) -> Page[StoredGraph]:
        return await self.inner.list_graphs(cursor=cursor, limit=limit)

    async def create_run(self, run: RunRecord, entries: Sequence[LogEntry] = ()) -> None:
        await self.inner.create_run(run, entries)

    async def save_run(
        self, run: RunRecord, entries: Sequence[LogEntry], *, claim: bool = False
    ) -> None:
        self._check(run)
        await self.inner.save_run(run, entries, claim=claim)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self.inner.get_run(run_id)

    async def list_runs(
        self,
        *,
        graph_id: str | None = None,
        status: RunStatus | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page[RunRecord]:
        return await self.inner.list_runs(
            graph_id=graph_id, status=status, cursor=cursor, limit=limit
        )

    async def count_runs(
        self,
        *,
        graph_id: str | None = None,
        graphs: Sequence[str] | None = None,
        statuses: Sequence[RunStatus] | None = None,
    ) -> dict[RunStatus, int]:
        return await self.inner.count_runs(graph_id=graph_id, graphs=graphs, statuses=statuses)

    async def read_log(self, run_id: str, *, after: int = 0, limit: int = 1000) -> list[LogEntry]:
        return await self.inner.read_log(run_id, after=after, limit=limit)

    async def unfinished_runs(self) -> list[RunRecord]:
        return await self.inner.unfinished_runs()

    async def delete_runs(self, *, finished_before: float) -> int:
        return await self.inner.delete_runs(finished_before=finished_before)

    async def next_deadline(self) -> float | None:
        return await self.inner.next_deadline()

    async def due_waits(self, now: float, *, limit: int = 100) -> list[RunRecord]:
        return await self.inner.due_waits(now, limit=limit)

    async def add_signal(
        self, run_id: str, name: str, updates: dict[str, Any], created_at: float
    ) -> StoredSignal:
        return await self.inner.add_signal(run_id, name, updates, created_at)

    async def signals_after(
        self, run_id: str, after: int, *, limit: int = 100
    ) -> list[StoredSignal]:
        return await self.inner.signals_after(run_id, after, limit=limit)
