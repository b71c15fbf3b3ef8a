"""The in-memory store: for tests and short-lived embedding. Nothing survives the process."""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import RunStateError, StoreError, UnknownRunError
from ..logs import LogEntry
from ..runs import TERMINAL, RunRecord, RunStatus
from .base import (
    AuditEntry,
    Cursor,
    Page,
    PutResult,
    Store,
    StoredGraph,
    StoredSignal,
    StoredToken,
    deadline_of,
    fencing_problem,
    glob_any,
)

_UNFINISHED = frozenset({RunStatus.PENDING, RunStatus.RUNNING})


#: The memory store keeps this many audit entries (the newest).
MAX_AUDIT_ENTRIES = 100_000


class MemoryStore(Store):
    def __init__(self) -> None:
        super().__init__()
        self._graphs: dict[str, StoredGraph] = {}
        self._runs: dict[str, RunRecord] = {}
        self._logs: dict[str, list[LogEntry]] = {}
        self._signals: dict[str, list[StoredSignal]] = {}
        self._tokens: dict[str, StoredToken] = {}
        self._tickets: dict[str, tuple[str, float]] = {}
        self._audit: list[AuditEntry] = []
        self._audit_seq = 0

    async def put_graph(self, graph: StoredGraph) -> PutResult:
        existing = self._graphs.get(graph.graph_id)
        if existing is not None:
            return "exists" if existing.digest == graph.digest else "conflict"
        self._graphs[graph.graph_id] = graph
        return "created"

    async def get_graph(self, graph_id: str) -> StoredGraph | None:
        return self._graphs.get(graph_id)

    async def list_graphs(
        self,
        *,
        cursor: str | None = None,
        limit: int = 50,
        graphs: Sequence[str] | None = None,
    ) -> Page[StoredGraph]:
        ids = sorted(self._graphs)
        if graphs is not None:
            ids = [i for i in ids if glob_any(graphs, i)]
        if cursor is not None:
            _, after = Cursor.decode(cursor)
            ids = [i for i in ids if i > after]
        page = [self._graphs[i] for i in ids[:limit]]
        more = len(ids) > limit
        return Page(page, Cursor.encode(0, page[-1].graph_id) if more and page else None)

    async def create_run(self, run: RunRecord, entries: Sequence[LogEntry] = ()) -> None:
        if run.run_id in self._runs:
            raise StoreError(f"run {run.run_id!r} already exists")
        self._runs[run.run_id] = run
        self._logs[run.run_id] = list(entries)
        self.notifier.notify(run.run_id)

    async def save_run(
        self, run: RunRecord, entries: Sequence[LogEntry], *, claim: bool = False
    ) -> None:
        log = self._logs.get(run.run_id)
        if log is None:
            raise StoreError(f"run {run.run_id!r} does not exist")
        stored = self._runs[run.run_id]
        if stored.epoch != run.epoch or stored.last_seq != run.last_seq - len(entries) or claim:
            problem = fencing_problem(run, len(entries), stored.last_seq, stored.epoch, claim=claim)
            if problem is not None:
                raise problem
        log.extend(entries)
        self._runs[run.run_id] = run
        self.notifier.notify(run.run_id)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return self._runs.get(run_id)

    async def list_runs(
        self,
        *,
        graph_id: str | None = None,
        status: RunStatus | None = None,
        cursor: str | None = None,
        limit: int = 50,
        graphs: Sequence[str] | None = None,
    ) -> Page[RunRecord]:
        bound = Cursor.decode(cursor) if cursor is not None else None
        runs = sorted(self._runs.values(), key=lambda r: (r.created_at, r.run_id), reverse=True)
        out: list[RunRecord] = []
        more = False
        for run in runs:
            if bound is not None and (run.created_at, run.run_id) >= bound:
                continue
            if graph_id is not None and run.graph_id != graph_id:
                continue
            if status is not None and run.status != status:
                continue
            if graphs is not None and not glob_any(graphs, run.graph_id):
                continue
            if len(out) == limit:
                more = True
                break
            out.append(run)
        last = out[-1] if out else None
        return Page(out, Cursor.encode(last.created_at, last.run_id) if more and last else None)

    async def count_runs(
        self,
        *,
        graph_id: str | None = None,
        graphs: Sequence[str] | None = None,
        statuses: Sequence[RunStatus] | None = None,
    ) -> dict[RunStatus, int]:
        counts: dict[RunStatus, int] = {}
        for run in self._runs.values():
            if graph_id is not None and run.graph_id != graph_id:
                continue
            if graphs is not None and not glob_any(graphs, run.graph_id):
                continue
            if statuses is not None and run.status not in statuses:
                continue
            counts[run.status] = counts.get(run.status, 0) + 1
        return counts

    async def read_log(self, run_id: str, *, after: int = 0, limit: int = 1000) -> list[LogEntry]:
        log = self._logs.get(run_id, [])
        # seq is 1-based and gapless, so seq n sits at index n - 1.
        start = max(after, 0)
        return log[start : start + limit]

    async def unfinished_runs(self) -> list[RunRecord]:
        return [r for r in self._runs.values() if r.status in _UNFINISHED]

    async def next_deadline(self) -> float | None:
        deadlines = [d for d in map(deadline_of, self._runs.values()) if d is not None]
        return min(deadlines, default=None)

    async def due_waits(self, now: float, *, limit: int = 100) -> list[RunRecord]:
        due = []
        for run in self._runs.values():
            deadline = deadline_of(run)
            if deadline is not None and deadline <= now:
                due.append((deadline, run.run_id, run))
        due.sort(key=lambda item: item[:2])
        return [run for _, _, run in due[:limit]]

    async def add_signal(
        self, run_id: str, name: str, updates: dict[str, Any], created_at: float
    ) -> StoredSignal:
        run = self._runs.get(run_id)
        if run is None:
            raise UnknownRunError(run_id)
        if run.status in TERMINAL:
            raise RunStateError(run_id, run.status.value, "signal")
        signals = self._signals.setdefault(run_id, [])
        signal = StoredSignal(run_id, len(signals) + 1, name, updates, created_at)
        signals.append(signal)
        return signal

    async def signals_after(
        self, run_id: str, after: int, *, limit: int = 100
    ) -> list[StoredSignal]:
        return self._signals.get(run_id, [])[max(after, 0) : max(after, 0) + limit]

    async def delete_runs(self, *, finished_before: float) -> int:
        doomed = [
            r.run_id
            for r in self._runs.values()
            if r.status in TERMINAL
            and r.finished_at is not None
            and r.finished_at < finished_before
        ]
        for run_id in doomed:
            del self._runs[run_id]
            del self._logs[run_id]
            self._signals.pop(run_id, None)
        return len(doomed)

    # -- API tokens and the audit log -------------------------------------------------

    async def put_token(self, token: StoredToken) -> None:
        tokens = self._tokens
        if token.token_id in tokens:
            raise StoreError(f"token {token.token_id!r} already exists")
        tokens[token.token_id] = token

    async def get_token(self, token_id: str) -> StoredToken | None:
        return self._tokens.get(token_id)

    async def list_tokens(self) -> list[StoredToken]:
        tokens = self._tokens
        return sorted(tokens.values(), key=lambda t: (t.created_at, t.token_id))

    async def count_tokens(self, *, active_at: float | None = None) -> int:
        if active_at is None:
            return len(self._tokens)
        return sum(t.active(active_at) for t in self._tokens.values())

    async def revoke_token(self, token_id: str, at: float) -> StoredToken | None:
        tokens = self._tokens
        token = tokens.get(token_id)
        if token is not None and token.revoked_at is None:
            token = tokens[token_id] = dataclasses.replace(token, revoked_at=at)
        return token

    async def touch_tokens(self, used: Mapping[str, float]) -> None:
        tokens = self._tokens
        for token_id, at in used.items():
            token = tokens.get(token_id)
            if token is not None and (token.last_used_at or 0.0) < at:
                tokens[token_id] = dataclasses.replace(token, last_used_at=at)

    async def put_ticket(
        self, ticket_hash: str, token_id: str, expires_at: float, *, now: float
    ) -> None:
        tickets = self._tickets
        # Oldest first (insertion order): the expired ones are at the front.
        while tickets:
            key, (_, until) = next(iter(tickets.items()))
            if until > now:
                break
            del tickets[key]
        tickets[ticket_hash] = (token_id, expires_at)

    async def take_ticket(self, ticket_hash: str, now: float) -> str | None:
        found = self._tickets.pop(ticket_hash, None)
        return found[0] if found is not None and found[1] > now else None

    async def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        for entry in entries:
            self._audit_seq += 1
            self._audit.append(dataclasses.replace(entry, seq=self._audit_seq))
        if len(self._audit) > MAX_AUDIT_ENTRIES:
            # A process-local store: the oldest entries go first.
            del self._audit[: len(self._audit) - MAX_AUDIT_ENTRIES]

    async def read_audit(self, *, after: int = 0, limit: int = 100) -> list[AuditEntry]:
        start = bisect.bisect_right([e.seq for e in self._audit], after)
        return self._audit[start : start + max(limit, 0)]
