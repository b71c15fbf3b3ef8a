"""The SQLite store: the embedded default. Runs and logs survive a restart.

One file holds graphs, runs (each with its last checkpoint) and run logs.
Every blocking call runs in a worker thread (``trio.to_thread``), never on
the event loop. One writer connection, guarded by a :class:`trio.Lock`,
performs every write inside ``BEGIN IMMEDIATE ... COMMIT``; a small pool of
read-only connections serves reads concurrently, which WAL mode allows
alongside the writer. A checkpoint (run row + the step's log entries) is one
transaction and one thread hop.

Group commit: checkpoints that arrive while the writer is busy are written
together, in one transaction and one thread hop, each inside its own
SAVEPOINT, so one failing checkpoint rolls back alone. Every ``save_run``
and ``create_run`` still returns only once its own checkpoint is committed,
and either raises with nothing written or returns with everything written
(also when cancelled: a checkpoint already handed to the writer is waited
for, and the cancellation is delivered at the caller's next checkpoint).

Durability:

* The database runs in WAL mode with ``synchronous=NORMAL`` by default: a
  commit is not fsynced, so a power loss or OS crash may lose the last few
  committed checkpoints, but never corrupts the database and never leaves a
  half-written checkpoint. A crash of the *process* loses nothing that was
  committed. ``synchronous="FULL"`` fsyncs every commit and survives power
  loss too, at a cost per step.
* Runs that were ``pending``/``running``/``waiting`` when the process ended
  are resumed by the next engine from their last checkpoint, so the node
  that was in flight runs again (at-least-once).
* One engine process per database file: SQLite serializes writers across
  processes (``busy_timeout``), but nothing stops two processes from both
  resuming the same unfinished runs. Several processes on one database is
  what the PostgreSQL store is for.
* The file must live on a local filesystem (WAL needs shared memory).

Schema changes are forward migrations applied in :meth:`SQLiteStore.open`;
``PRAGMA user_version`` records the schema version and ``PRAGMA
application_id`` marks the file as a trioflow database.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import trio

from ..errors import EngineError, RunStateError, StoreError, UnknownRunError
from ..logs import Level, LogEntry
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
    checkpoint_conflict,
    deadline_of,
    fencing_problem,
)
from .ownerlock import OwnerLock

T = TypeVar("T")

#: Marks a file as a trioflow database (``PRAGMA application_id``): "TFLW".
APPLICATION_ID = 0x54464C57

# Each migration takes the schema from version ``i`` to ``i + 1`` and is
# applied in one transaction together with the new ``user_version``.
# Append new migrations; never edit one that has shipped.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"PRAGMA application_id = {APPLICATION_ID}",
        """CREATE TABLE graphs (
            graph_id   TEXT PRIMARY KEY,
            document   TEXT NOT NULL,
            digest     TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE runs (
            run_id        TEXT PRIMARY KEY,
            graph_id      TEXT NOT NULL,
            status        TEXT NOT NULL,
            current_node  TEXT,
            state         TEXT NOT NULL,
            step          INTEGER NOT NULL,
            loop_counters TEXT NOT NULL,
            error         TEXT,
            created_at    REAL NOT NULL,
            started_at    REAL,
            finished_at   REAL,
            updated_at    REAL NOT NULL,
            last_seq      INTEGER NOT NULL,
            attempt       INTEGER NOT NULL
        )""",
        "CREATE INDEX runs_by_created ON runs (created_at DESC, run_id DESC)",
        "CREATE INDEX runs_by_graph ON runs (graph_id, created_at, run_id)",
        "CREATE INDEX runs_by_status ON runs (status, created_at, run_id)",
        "CREATE INDEX runs_by_finished ON runs (status, finished_at)",
        """CREATE TABLE logs (
            run_id  TEXT NOT NULL,
            seq     INTEGER NOT NULL,
            ts      REAL NOT NULL,
            level   TEXT NOT NULL,
            event   TEXT NOT NULL,
            node    TEXT,
            message TEXT NOT NULL,
            data    TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        ) WITHOUT ROWID""",
    ),
    (
        # Consecutive process deaths of a run at its current step (crash loops).
        "ALTER TABLE runs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0",
        # Small facts about the store itself, such as whether the last engine
        # session ended cleanly.
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    ),
    (
        # Runs waiting for input: what they wait for, and when the wait times
        # out (indexed for the timer, only while a run waits).
        "ALTER TABLE runs ADD COLUMN waiting TEXT",
        "ALTER TABLE runs ADD COLUMN deadline REAL",
        "CREATE INDEX runs_by_deadline ON runs (deadline) WHERE deadline IS NOT NULL",
        # The id of the last signal applied, and the signals themselves.
        "ALTER TABLE runs ADD COLUMN signal_cursor INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE signals (
            run_id     TEXT NOT NULL,
            signal_id  INTEGER NOT NULL,
            name       TEXT NOT NULL,
            updates    TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (run_id, signal_id)
        ) WITHOUT ROWID""",
    ),
    (
        # The run's fencing token: raised by every claim (see Store.save_run).
        "ALTER TABLE runs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
    ),
    (
        # API tokens of the web service (a hash of each secret, never the
        # secret), single-use stream tickets, and the audit log.
        """CREATE TABLE tokens (
            token_id     TEXT PRIMARY KEY,
            name         TEXT NOT NULL,
            role         TEXT NOT NULL,
            graphs       TEXT NOT NULL,
            secret_hash  TEXT NOT NULL,
            peppered     INTEGER NOT NULL,
            created_at   REAL NOT NULL,
            expires_at   REAL,
            revoked_at   REAL,
            last_used_at REAL
        ) WITHOUT ROWID""",
        """CREATE TABLE tickets (
            ticket_hash TEXT PRIMARY KEY,
            token_id    TEXT NOT NULL,
            expires_at  REAL NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX tickets_by_expiry ON tickets (expires_at)",
        """CREATE TABLE audit (
            seq    INTEGER PRIMARY KEY AUTOINCREMENT,
            ts     REAL NOT NULL,
            actor  TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            status INTEGER NOT NULL,
            detail TEXT NOT NULL
        )""",
        "CREATE INDEX audit_by_ts ON audit (ts)",
    ),
    (
        # A run inside a parallel or map node: each started branch's progress.
        "ALTER TABLE runs ADD COLUMN fanout TEXT",
    ),
)

#: The schema version this code writes and reads.
SCHEMA_VERSION = len(_MIGRATIONS)


def _glob_filter(patterns: Sequence[str], params: list[Any]) -> str:
    """``graph_id`` matches one of the scope patterns (their alphabet has no ``[``, so
    SQLite's GLOB means what a scope pattern means)."""
    params.extend(patterns)
    return "(" + " OR ".join(["graph_id GLOB ?"] * len(patterns)) + ")" if patterns else "0"


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False).encode
_loads = json.loads

_RUN_COLUMNS = (
    "run_id, graph_id, status, current_node, state, step, loop_counters, error, "
    "created_at, started_at, finished_at, updated_at, last_seq, attempt, crashes, waiting, "
    "signal_cursor, deadline, epoch, fanout"
)
_INSERT_RUN = (
    f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES "
    "(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"
)
# A checkpoint applies only on top of the stored record it continues (?21 is
# the stored last_seq it expects, ?22 the stored epoch), so a log never gets a
# gap or a rewrite, and a writer whose run was claimed since writes nothing.
_UPDATE_RUN = (
    "UPDATE runs SET graph_id = ?2, status = ?3, current_node = ?4, state = ?5, step = ?6, "
    "loop_counters = ?7, error = ?8, created_at = ?9, started_at = ?10, finished_at = ?11, "
    "updated_at = ?12, last_seq = ?13, attempt = ?14, crashes = ?15, waiting = ?16, "
    "signal_cursor = ?17, deadline = ?18, epoch = ?19, fanout = ?20 "
    "WHERE run_id = ?1 AND last_seq = ?21 AND epoch = ?22"
)
_INSERT_LOG = (
    "INSERT INTO logs (run_id, seq, ts, level, event, node, message, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_TERMINAL_SQL = ", ".join(f"'{s.value}'" for s in sorted(TERMINAL))
_UNFINISHED_SQL = f"'{RunStatus.PENDING.value}', '{RunStatus.RUNNING.value}'"

Row = tuple[Any, ...]


def _run_params(run: RunRecord) -> Row:
    return (
        run.run_id,
        run.graph_id,
        run.status.value,
        run.current_node,
        _dumps(run.state),
        run.step,
        _dumps(run.loop_counters),
        None if run.error is None else _dumps(run.error),
        run.created_at,
        run.started_at,
        run.finished_at,
        run.updated_at,
        run.last_seq,
        run.attempt,
        run.crashes,
        None if run.waiting is None else _dumps(run.waiting),
        run.signal_cursor,
        deadline_of(run),
        run.epoch,
        None if run.fanout is None else _dumps(run.fanout),
    )


def _run_from_row(row: Row) -> RunRecord:
    error = row[7]
    return RunRecord(
        run_id=row[0],
        graph_id=row[1],
        status=RunStatus(row[2]),
        current_node=row[3],
        state=_loads(row[4]),
        step=row[5],
        loop_counters=_loads(row[6]),
        error=None if error is None else _loads(error),
        created_at=row[8],
        started_at=row[9],
        finished_at=row[10],
        updated_at=row[11],
        last_seq=row[12],
        attempt=row[13],
        crashes=row[14],
        waiting=None if row[15] is None else _loads(row[15]),
        signal_cursor=row[16],
        epoch=row[18],
        fanout=None if row[19] is None else _loads(row[19]),
    )


def _entry_rows(run_id: str, entries: Sequence[LogEntry]) -> list[Row]:
    return [
        (run_id, e.seq, e.ts, e.level.value, str(e.event), e.node, e.message, _dumps(e.data))
        for e in entries
    ]


def _entry_from_row(row: Row) -> LogEntry:
    return LogEntry(row[0], row[1], Level(row[2]), row[3], row[4], row[5], _loads(row[6]))


def _store_error(exc: Exception, prefix: str = "") -> EngineError:
    """``exc`` as an engine error: the engine's own errors (raised by a write
    on purpose) as they are, the rest as a StoreError. SQLite's operational
    errors (locked, busy, disk full, I/O, read-only) may pass: transient."""
    if isinstance(exc, EngineError):
        return exc
    return StoreError(
        f"{prefix}{type(exc).__name__}: {exc}", transient=isinstance(exc, sqlite3.OperationalError)
    )


def _graph_from_row(row: Row) -> StoredGraph:
    return StoredGraph(row[0], _loads(row[1]), row[2], row[3])


@dataclass(slots=True, eq=False)
class _Job:
    """One write for the writer thread and, once it ran, its outcome.

    ``run_id`` names the run a checkpoint belongs to (``None`` for other
    writes); ``wait`` is whether a task awaits ``done``.
    """

    run_id: str | None
    write: Callable[[sqlite3.Connection], Any]
    wait: bool
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: EngineError | None = None


#: Most jobs committed in one transaction.
_MAX_BATCH = 512
#: Most jobs handed to the writer and not yet committed (async durability).
_MAX_IN_FLIGHT = 4096


class _WriterThread:
    """Owns the write connection; commits queued jobs in batches.

    A dedicated thread fed by a queue costs less per checkpoint than a
    ``trio.to_thread`` call, batches naturally (every job queued while a
    commit runs goes into the next transaction: group commit), and lets a
    checkpoint be handed over without waiting for it (``durability="async"``).
    Jobs are appended under a lock and the thread is woken only when it
    waits; outcomes return to the Trio thread through
    ``TrioToken.run_sync_soon``.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        token: trio.lowlevel.TrioToken,
        on_done: Callable[[list[_Job]], None],
    ) -> None:
        self._conn = conn
        self._token = token
        self._on_done = on_done
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._loop, name="trioflow-sqlite-writer", daemon=True
        )
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._cond:
            self._pending.append(job)
            self._cond.notify()

    def stop(self) -> None:
        """Finish every queued job, then close the connection (blocking)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _loop(self) -> None:
        pending = self._pending
        while True:
            with self._cond:
                while not pending and not self._stopping:
                    self._cond.wait()
                if not pending:
                    break
                batch = [pending.popleft() for _ in range(min(len(pending), _MAX_BATCH))]
            self._write(batch)
            self._token.run_sync_soon(self._on_done, batch)
        _close_writer(self._conn)

    def _write(self, batch: list[_Job]) -> None:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    job.result = job.write(conn)
                except Exception as exc:  # a worker thread: no Trio cancellation here
                    # Any failure (SQLite's, or a bug in a write) fails this job
                    # alone; the thread must live on, or every waiter would hang.
                    # A later checkpoint of the same run (async durability)
                    # then fails its continuity check: no gap is ever written.
                    conn.execute("ROLLBACK TO job")
                    job.error = _store_error(exc)
                conn.execute("RELEASE job")
            conn.execute("COMMIT")
        except Exception as exc:  # BEGIN, SAVEPOINT or COMMIT failed: nothing was written
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the connection reports the original error below
            error = _store_error(exc, "SQLite commit failed: ")
            for job in batch:
                job.result = None
                if job.error is None:
                    job.error = error


class SQLiteStore(Store):
    """Graphs, runs and logs in one SQLite file (WAL mode).

    Args:
        path: the database file; created (with its schema) if missing.
        readers: read connections, i.e. reads that may run at once.
        busy_timeout_ms: how long a statement waits for a lock held by
            another connection (another process) before failing.
        synchronous: ``"NORMAL"`` (default; see the module docs for what a
            power loss may cost) or ``"FULL"`` (fsync on every commit).
        durability: ``"sync"`` (default): a run's next node starts only once
            the previous step's checkpoint is committed. ``"async"``: step
            checkpoints are handed to the writer thread and the run goes on;
            they are still written in order, each atomically, and followers
            see a step only once it is committed, but a crash may lose the
            last few steps (they run again on resume). Creating a run and
            its terminal checkpoint are always waited for.
    """

    def __init__(
        self,
        path: str,
        *,
        readers: int = 4,
        busy_timeout_ms: int = 5000,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        durability: Literal["sync", "async"] = "sync",
    ) -> None:
        super().__init__()
        if path == ":memory:" or path.startswith("file::memory:"):
            raise StoreError("SQLiteStore needs a file; use MemoryStore for an in-memory store")
        if readers < 1:
            raise StoreError("SQLiteStore needs at least one reader connection")
        self.path = path
        self._reader_count = readers
        self._busy_timeout_ms = busy_timeout_ms
        self._synchronous = synchronous
        self._writer: sqlite3.Connection | None = None
        self._idle_readers: list[sqlite3.Connection] = []
        self._reader_slots = trio.Semaphore(readers)
        if durability not in ("sync", "async"):
            raise StoreError(f"durability must be 'sync' or 'async', not {durability!r}")
        self.durability = durability
        self._writer_thread: _WriterThread | None = None
        self._in_flight = 0
        self._room = trio.Event()
        self._async_errors: dict[str, EngineError] = {}
        self._owner = OwnerLock(path)
        # Our own thread budget: store calls never queue behind sync tools.
        self._limiter = trio.CapacityLimiter(readers + 1)

    # -- lifetime ----------------------------------------------------------------

    async def open(self) -> None:
        """Open the file, migrate the schema forward, open the reader pool.

        Raises:
            StoreError: the file cannot be opened, is not a trioflow database,
                or was written by a newer trioflow (its schema version is
                higher than :data:`SCHEMA_VERSION`); nothing is written then.
        """
        if self._writer is not None:
            raise StoreError(f"SQLite store {self.path!r} is already open")
        self._writer = await self._call(self._open_writer)
        self._writer_thread = _WriterThread(
            self._writer, trio.lowlevel.current_trio_token(), self._jobs_done
        )
        try:
            for _ in range(self._reader_count):
                reader = await self._call(self._connect, True)
                self._idle_readers.append(reader)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.aclose()
            raise

    async def aclose(self) -> None:
        """Write every queued checkpoint, wait for in-flight calls, close every connection."""
        writer_thread, self._writer_thread = self._writer_thread, None
        writer, self._writer = self._writer, None
        if writer_thread is not None:
            await trio.to_thread.run_sync(writer_thread.stop)
            writer = None  # the thread closed it
        # Taking every reader slot waits for reads still in their threads.
        for _ in range(self._reader_count):
            await self._reader_slots.acquire()
        readers, self._idle_readers = self._idle_readers, []
        try:
            await trio.to_thread.run_sync(_close_all, writer, readers, limiter=self._limiter)
        finally:
            for _ in range(self._reader_count):
                self._reader_slots.release()
            self._owner.release()

    def _connect(self, read_only: bool) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions, we issue BEGIN
        # ourselves. check_same_thread=False: a connection moves between the
        # worker threads of trio's pool, but is used by one thread at a time
        # (the write lock, the reader slots).
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, cached_statements=64
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            if read_only:
                conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._connect(False)
        try:
            self._migrate(conn)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"SQLite database {self.path!r} cannot use WAL mode ({mode})")
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # Check before writing anything: a newer or foreign file stays untouched.
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"SQLite database {self.path!r} has schema version {version}, but this trioflow "
                f"knows versions up to {SCHEMA_VERSION}; upgrade trioflow to open it",
                details={"path": self.path, "version": version, "supported": SCHEMA_VERSION},
            )
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        has_tables = conn.execute("SELECT 1 FROM sqlite_schema LIMIT 1").fetchone() is not None
        if app_id != APPLICATION_ID and (version > 0 or has_tables):
            raise StoreError(
                f"{self.path!r} is an SQLite database, but not a trioflow one",
                details={"path": self.path},
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _MIGRATIONS[target - 1]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    # -- plumbing ----------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread, turning SQLite errors into StoreError."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise StoreError(
                f"SQLite store {self.path!r}: {exc}",
                details={"path": self.path},
                transient=isinstance(exc, sqlite3.OperationalError),
            ) from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._reader_slots:
            if not self._idle_readers:
                raise StoreError(f"SQLite store {self.path!r} is not open")
            conn = self._idle_readers.pop()
            try:
                # Not abandoned on cancel: the connection comes back only
                # once its thread is done with it.
                return await self._call(fn, conn)
            finally:
                self._idle_readers.append(conn)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in its own savepoint on the writer thread and wait for it."""
        job = _Job(None, fn, wait=True)
        await self._submit(job)
        return job.result  # type: ignore[no-any-return]

    async def _checkpoint(
        self, run: RunRecord, write: Callable[[sqlite3.Connection], None], wait: bool
    ) -> None:
        error = self._async_errors.pop(run.run_id, None)
        if error is not None:
            # An unawaited checkpoint of this run failed, and the steps after
            # it were refused: retrying this one cannot help. The run stays at
            # its last committed checkpoint.
            raise StoreError(
                f"an earlier checkpoint of run {run.run_id!r} failed: {error.message}",
                details=error.details,
            )
        await self._submit(_Job(run.run_id, write, wait=wait))

    async def _submit(self, job: _Job) -> None:
        writer = self._writer_thread
        if writer is None:
            raise StoreError(f"SQLite store {self.path!r} is not open")
        if not job.wait:
            # Backpressure before handing over: once queued, a job is written.
            while self._in_flight >= _MAX_IN_FLIGHT:
                if self._room.is_set():
                    self._room = trio.Event()
                await self._room.wait()
        self._in_flight += 1
        writer.submit(job)
        if not job.wait:
            # Handed over, so it will be written: the call must return (a caller
            # keeps its log's seqs only for checkpoints that returned). No
            # checkpoint here: a cancel is delivered at the caller's next one, and
            # the run goes on without a trip through the scheduler.
            return
        # Shielded: a job handed to the writer will be written; its outcome
        # is the caller's, as with a thread that cannot be abandoned. A
        # cancel stays pending and is delivered at the next checkpoint.
        with trio.CancelScope(shield=True):
            await job.done.wait()
        if job.error is not None:
            raise job.error

    def _jobs_done(self, batch: list[_Job]) -> None:
        """On the Trio thread: report outcomes, wake followers and waiters."""
        for job in batch:
            self._in_flight -= 1
            if job.error is None:
                if job.run_id is not None:
                    self.notifier.notify(job.run_id)
            elif not job.wait and job.run_id is not None:
                self._async_errors.setdefault(job.run_id, job.error)
            job.done.set()
        if self._in_flight < _MAX_IN_FLIGHT:
            self._room.set()

    # -- sessions ----------------------------------------------------------------

    async def begin_session(self) -> bool:
        """Take the store's owner lock (see :mod:`.ownerlock`), then record the session.

        Raises:
            StoreLockedError: another engine owns this file.
        """
        await trio.to_thread.run_sync(self._owner.acquire, limiter=self._limiter)

        def begin(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT value FROM meta WHERE key = 'session'").fetchone()
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('session', 'open')")
            return row is None or row[0] != "open"

        try:
            return await self._write(begin)
        except BaseException:
            self._owner.release()
            raise

    async def end_session(self) -> None:
        def end(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('session', 'closed')")

        try:
            await self._write(end)
        finally:
            self._owner.release()

    async def probe(self) -> None:
        stamp = repr(time.time())

        def probe(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?)", (stamp,))

        await self._write(probe)

    # -- graphs ------------------------------------------------------------------

    async def put_graph(self, graph: StoredGraph) -> PutResult:
        params = (graph.graph_id, _dumps(graph.document), graph.digest, graph.created_at)

        def put(conn: sqlite3.Connection) -> PutResult:
            row = conn.execute(
                "SELECT digest FROM graphs WHERE graph_id = ?", (graph.graph_id,)
            ).fetchone()
            if row is not None:
                return "exists" if row[0] == graph.digest else "conflict"
            conn.execute(
                "INSERT INTO graphs (graph_id, document, digest, created_at) VALUES (?, ?, ?, ?)",
                params,
            )
            return "created"

        return await self._write(put)

    async def get_graph(self, graph_id: str) -> StoredGraph | None:
        def get(conn: sqlite3.Connection) -> Row | None:
            return conn.execute(  # type: ignore[no-any-return]
                "SELECT graph_id, document, digest, created_at FROM graphs WHERE graph_id = ?",
                (graph_id,),
            ).fetchone()

        row = await self._read(get)
        return None if row is None else _graph_from_row(row)

    async def list_graphs(
        self,
        *,
        cursor: str | None = None,
        limit: int = 50,
        graphs: Sequence[str] | None = None,
    ) -> Page[StoredGraph]:
        after = Cursor.decode(cursor)[1] if cursor is not None else None

        def page(conn: sqlite3.Connection) -> list[Row]:
            sql = "SELECT graph_id, document, digest, created_at FROM graphs"
            where: list[str] = []
            params: list[Any] = []
            if after is not None:
                where.append("graph_id > ?")
                params.append(after)
            if graphs is not None:
                where.append(_glob_filter(graphs, params))
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY graph_id LIMIT ?"
            params.append(max(limit, 0) + 1)
            return conn.execute(sql, params).fetchall()

        rows = await self._read(page)
        items = [_graph_from_row(r) for r in rows[:limit]]
        more = len(rows) > limit and bool(items)
        return Page(items, Cursor.encode(0, items[-1].graph_id) if more else None)

    # -- runs --------------------------------------------------------------------

    async def create_run(self, run: RunRecord, entries: Sequence[LogEntry] = ()) -> None:
        params = _run_params(run)
        rows = _entry_rows(run.run_id, entries)

        def create(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(_INSERT_RUN, params)
            except sqlite3.IntegrityError:
                raise StoreError(f"run {run.run_id!r} already exists") from None
            if rows:
                conn.executemany(_INSERT_LOG, rows)

        await self._checkpoint(run, create, wait=True)

    async def save_run(
        self, run: RunRecord, entries: Sequence[LogEntry], *, claim: bool = False
    ) -> None:
        # Serialise on the Trio thread: the record and entries are a snapshot
        # of this step, whatever the run does next.
        expected_epoch = run.epoch - 1 if claim else run.epoch
        params = (*_run_params(run), run.last_seq - len(entries), expected_epoch)
        rows = _entry_rows(run.run_id, entries)

        def save(conn: sqlite3.Connection) -> None:
            if conn.execute(_UPDATE_RUN, params).rowcount != 1:
                row = conn.execute(
                    "SELECT last_seq, epoch FROM runs WHERE run_id = ?", (run.run_id,)
                ).fetchone()
                if row is None:
                    raise StoreError(f"run {run.run_id!r} does not exist")
                problem = fencing_problem(run, len(rows), row[0], row[1], claim=claim)
                raise problem or checkpoint_conflict(run, len(rows), row[0])
            if rows:
                try:
                    conn.executemany(_INSERT_LOG, rows)
                except sqlite3.IntegrityError:
                    seqs = [r[1] for r in rows]
                    raise StoreError(
                        f"run {run.run_id!r} already has log entries among seq {seqs}; "
                        "the checkpoint was not written"
                    ) from None

        wait = self.durability == "sync" or run.status in TERMINAL
        await self._checkpoint(run, save, wait=wait)

    async def get_run(self, run_id: str) -> RunRecord | None:
        def get(conn: sqlite3.Connection) -> Row | None:
            return conn.execute(  # type: ignore[no-any-return]
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()

        row = await self._read(get)
        return None if row is None else _run_from_row(row)

    async def list_runs(
        self,
        *,
        graph_id: str | None = None,
        status: RunStatus | None = None,
        cursor: str | None = None,
        limit: int = 50,
        graphs: Sequence[str] | None = None,
    ) -> Page[RunRecord]:
        where: list[str] = []
        params: list[Any] = []
        if graph_id is not None:
            where.append("graph_id = ?")
            params.append(graph_id)
        if status is not None:
            where.append("status = ?")
            params.append(RunStatus(status).value)
        if graphs is not None:
            where.append(_glob_filter(graphs, params))
        if cursor is not None:
            # Keyset pagination: strictly after the last item of the previous
            # page in (created_at DESC, run_id DESC) order; served by an index.
            where.append("(created_at, run_id) < (?, ?)")
            params.extend(Cursor.decode(cursor))
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, run_id DESC LIMIT ?"
        params.append(max(limit, 0) + 1)

        def page(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute(sql, params).fetchall()

        rows = await self._read(page)
        items = [_run_from_row(r) for r in rows[:limit]]
        more = len(rows) > limit and bool(items)
        last = items[-1] if more else None
        return Page(items, Cursor.encode(last.created_at, last.run_id) if last else None)

    async def count_runs(
        self,
        *,
        graph_id: str | None = None,
        graphs: Sequence[str] | None = None,
        statuses: Sequence[RunStatus] | None = None,
    ) -> dict[RunStatus, int]:
        where: list[str] = []
        params: list[Any] = []
        if graph_id is not None:
            where.append("graph_id = ?")
            params.append(graph_id)
        if graphs is not None:
            where.append(_glob_filter(graphs, params))
        if statuses is not None:
            where.append(f"status IN ({','.join('?' * len(statuses))})" if statuses else "0")
            params.extend(RunStatus(s).value for s in statuses)
        sql = "SELECT status, COUNT(*) FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " GROUP BY status"

        def count(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute(sql, params).fetchall()

        return {RunStatus(status): n for status, n in await self._read(count)}

    async def read_log(self, run_id: str, *, after: int = 0, limit: int = 1000) -> list[LogEntry]:
        def read(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute(
                "SELECT seq, ts, level, event, node, message, data FROM logs "
                "WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (run_id, max(after, 0), max(limit, 0)),
            ).fetchall()

        return [_entry_from_row(r) for r in await self._read(read)]

    async def unfinished_runs(self) -> list[RunRecord]:
        def read(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE status IN ({_UNFINISHED_SQL}) "
                "ORDER BY created_at, run_id"
            ).fetchall()

        return [_run_from_row(r) for r in await self._read(read)]

    async def next_deadline(self) -> float | None:
        def read(conn: sqlite3.Connection) -> Row | None:
            return conn.execute(  # type: ignore[no-any-return]
                "SELECT MIN(deadline) FROM runs WHERE deadline IS NOT NULL"
            ).fetchone()

        row = await self._read(read)
        return None if row is None or row[0] is None else float(row[0])

    async def due_waits(self, now: float, *, limit: int = 100) -> list[RunRecord]:
        def read(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE deadline IS NOT NULL AND deadline <= ? "
                "ORDER BY deadline, run_id LIMIT ?",
                (now, max(limit, 0)),
            ).fetchall()

        return [_run_from_row(r) for r in await self._read(read)]

    async def add_signal(
        self, run_id: str, name: str, updates: dict[str, Any], created_at: float
    ) -> StoredSignal:
        encoded = _dumps(updates)

        def add(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise UnknownRunError(run_id)
            if RunStatus(row[0]) in TERMINAL:
                raise RunStateError(run_id, row[0], "signal")
            (last,) = conn.execute(
                "SELECT COALESCE(MAX(signal_id), 0) FROM signals WHERE run_id = ?", (run_id,)
            ).fetchone()
            conn.execute(
                "INSERT INTO signals (run_id, signal_id, name, updates, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (run_id, last + 1, name, encoded, created_at),
            )
            return int(last) + 1

        signal_id = await self._write(add)
        return StoredSignal(run_id, signal_id, name, updates, created_at)

    async def signals_after(
        self, run_id: str, after: int, *, limit: int = 100
    ) -> list[StoredSignal]:
        def read(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute(
                "SELECT signal_id, name, updates, created_at FROM signals "
                "WHERE run_id = ? AND signal_id > ? ORDER BY signal_id LIMIT ?",
                (run_id, max(after, 0), max(limit, 0)),
            ).fetchall()

        rows = await self._read(read)
        return [StoredSignal(run_id, r[0], r[1], _loads(r[2]), r[3]) for r in rows]

    async def delete_runs(self, *, finished_before: float) -> int:
        doomed = f"status IN ({_TERMINAL_SQL}) AND finished_at < ?"

        def delete(conn: sqlite3.Connection) -> int:
            conn.execute(
                f"DELETE FROM logs WHERE run_id IN (SELECT run_id FROM runs WHERE {doomed})",
                (finished_before,),
            )
            conn.execute(
                f"DELETE FROM signals WHERE run_id IN (SELECT run_id FROM runs WHERE {doomed})",
                (finished_before,),
            )
            return conn.execute(f"DELETE FROM runs WHERE {doomed}", (finished_before,)).rowcount

        return await self._write(delete)

    # -- API tokens and the audit log -------------------------------------------------

    async def put_token(self, token: StoredToken) -> None:
        params = _token_params(token)

        def put(conn: sqlite3.Connection) -> None:
            conn.execute(f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES ({_TOKEN_MARKS})", params)

        await self._write(put)

    async def get_token(self, token_id: str) -> StoredToken | None:
        def get(conn: sqlite3.Connection) -> Row | None:
            return conn.execute(  # type: ignore[no-any-return]
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = ?", (token_id,)
            ).fetchone()

        row = await self._read(get)
        return None if row is None else _token_from_row(row)

    async def list_tokens(self) -> list[StoredToken]:
        def read(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created_at, token_id"
            ).fetchall()

        return [_token_from_row(r) for r in await self._read(read)]

    async def count_tokens(self, *, active_at: float | None = None) -> int:
        def count(conn: sqlite3.Connection) -> int:
            if active_at is None:
                return int(conn.execute("SELECT count(*) FROM tokens").fetchone()[0])
            return int(
                conn.execute(
                    "SELECT count(*) FROM tokens WHERE revoked_at IS NULL "
                    "AND (expires_at IS NULL OR expires_at > ?)",
                    (active_at,),
                ).fetchone()[0]
            )

        return await self._read(count)

    async def revoke_token(self, token_id: str, at: float) -> StoredToken | None:
        def revoke(conn: sqlite3.Connection) -> Row | None:
            conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL",
                (at, token_id),
            )
            return conn.execute(  # type: ignore[no-any-return]
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = ?", (token_id,)
            ).fetchone()

        row = await self._write(revoke)
        return None if row is None else _token_from_row(row)

    async def touch_tokens(self, used: Mapping[str, float]) -> None:
        rows = [(at, token_id, at) for token_id, at in used.items()]

        def touch(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE tokens SET last_used_at = ? WHERE token_id = ? "
                "AND (last_used_at IS NULL OR last_used_at < ?)",
                rows,
            )

        if rows:
            await self._write(touch)

    async def put_ticket(
        self, ticket_hash: str, token_id: str, expires_at: float, *, now: float
    ) -> None:
        def put(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM tickets WHERE expires_at <= ?", (now,))
            conn.execute(
                "INSERT INTO tickets (ticket_hash, token_id, expires_at) VALUES (?, ?, ?)",
                (ticket_hash, token_id, expires_at),
            )

        await self._write(put)

    async def take_ticket(self, ticket_hash: str, now: float) -> str | None:
        def take(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "DELETE FROM tickets WHERE ticket_hash = ? RETURNING token_id, expires_at",
                (ticket_hash,),
            ).fetchone()
            if row is not None and row[1] <= now:
                return None
            return None if row is None else str(row[0])

        return await self._write(take)

    async def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        rows = [(e.ts, e.actor, e.action, e.target, e.status, e.detail) for e in entries]

        def add(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO audit (ts, actor, action, target, status, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

        if rows:
            await self._write(add)

    async def read_audit(self, *, after: int = 0, limit: int = 100) -> list[AuditEntry]:
        def read(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute(
                "SELECT seq, ts, actor, action, target, status, detail FROM audit "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (max(after, 0), max(limit, 0)),
            ).fetchall()

        return [AuditEntry(*r) for r in await self._read(read)]


_TOKEN_COLUMNS = (
    "token_id, name, role, graphs, secret_hash, peppered, created_at, expires_at, "
    "revoked_at, last_used_at"
)
_TOKEN_MARKS = ", ".join("?" * 10)


def _token_params(token: StoredToken) -> tuple[Any, ...]:
    return (
        token.token_id,
        token.name,
        token.role,
        _dumps(list(token.graphs)),
        token.secret_hash,
        int(token.peppered),
        token.created_at,
        token.expires_at,
        token.revoked_at,
        token.last_used_at,
    )


def _token_from_row(row: Row) -> StoredToken:
    return StoredToken(
        row[0], row[1], row[2], tuple(_loads(row[3])), row[4], bool(row[5]), *row[6:10]
    )


def _close_writer(writer: sqlite3.Connection) -> None:
    try:
        # Lets SQLite refresh its planner statistics where they went stale.
        writer.execute("PRAGMA analysis_limit = 400")
        writer.execute("PRAGMA optimize")
    finally:
        writer.close()


def _close_all(writer: sqlite3.Connection | None, readers: list[sqlite3.Connection]) -> None:
    for reader in readers:
        reader.close()
    if writer is not None:
        _close_writer(writer)
