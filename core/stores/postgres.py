"""The PostgreSQL store: several engines (nodes) on one database.

Every node runs the same API on the same data. A run executes on the node
that holds its *lease* (``owner``, ``lease_until`` from the database clock,
and ``epoch``, raised by one on every claim). A node renews all its leases
in one statement per heartbeat; live nodes claim runs whose lease expired
(``FOR UPDATE SKIP LOCKED``) and resume them from their last checkpoint.
Every checkpoint is written only while the run's stored epoch is still the
writer's and the writer still owns it, in the same transaction as its log
rows: a node that lost a run can never write a step, an entry or an end of
it (fencing).

Connections: psycopg 3, synchronous, in worker threads (its async
connection needs asyncio). One *writer* thread owns a connection and
commits checkpoints in batches: every checkpoint queued while a commit runs
goes into the next transaction, as one ``UPDATE ... FROM unnest(...)`` and
one ``INSERT ... SELECT FROM unnest(...)`` for the whole batch, pipelined
with the commit and with the ``NOTIFY`` that tells other nodes which logs
grew. Reads and the small writes (claims, renewals, signals) use a
``psycopg_pool`` pool through ``trio.to_thread``. One *listener* connection
per node, read with ``trio.lowlevel.wait_readable`` on its socket, receives
the other nodes' notifications and reconnects by itself.

Notification channels are per schema (several deployments, or test runs,
may share a database): ``<prefix>_log`` (payload ``run_id:seq,...``, never
entries: a payload is at most 8,000 bytes), ``<prefix>_ctl`` (``cancel:`` or
``signal:`` and a run id) and ``<prefix>_work`` (runs to claim).

The schema is versioned (table ``trioflow_schema``) and migrated at open
under an advisory lock, so nodes starting together do not race.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..errors import (
    EngineError,
    LeaseHeldError,
    LeaseLostError,
    RunStateError,
    StoreError,
    UnknownRunError,
)
from ..logs import Level, LogEntry
from ..runs import TERMINAL, RunRecord, RunStatus
from .base import (
    AuditEntry,
    Claimed,
    ClusterEvents,
    Cursor,
    NodeInfo,
    Page,
    PutResult,
    Renewal,
    SharedStore,
    StoredGraph,
    StoredSignal,
    StoredToken,
    checkpoint_conflict,
    deadline_of,
    default_node_id,
    fencing_problem,
    glob_like,
)

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

log = logging.getLogger("trioflow.store.postgres")

T = TypeVar("T")


_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE graphs (
            graph_id   text PRIMARY KEY,
            document   text NOT NULL,
            digest     text NOT NULL,
            created_at double precision NOT NULL
        )""",
        # fillfactor: room on each page for the next version of a row, so a
        # step's UPDATE (which changes no indexed column) stays a HOT update.
        """CREATE TABLE runs (
            run_id           text PRIMARY KEY,
            graph_id         text NOT NULL,
            status           text NOT NULL,
            current_node     text,
            state            text NOT NULL,
            step             integer NOT NULL,
            loop_counters    text NOT NULL,
            error            text,
            created_at       double precision NOT NULL,
            started_at       double precision,
            finished_at      double precision,
            updated_at       double precision NOT NULL,
            last_seq         integer NOT NULL,
            attempt          integer NOT NULL,
            crashes          integer NOT NULL DEFAULT 0,
            waiting          text,
            signal_cursor    integer NOT NULL DEFAULT 0,
            deadline         double precision,
            epoch            bigint NOT NULL DEFAULT 0,
            owner            text,
            lease_until      timestamptz,
            cancel_requested boolean NOT NULL DEFAULT false,
            last_signal_id   integer NOT NULL DEFAULT 0,
            write_id         bigint NOT NULL DEFAULT 0
        ) WITH (fillfactor = 70)""",
        "CREATE INDEX runs_by_created ON runs (created_at DESC, run_id DESC)",
        "CREATE INDEX runs_by_graph ON runs (graph_id, created_at, run_id)",
        "CREATE INDEX runs_by_status ON runs (status, created_at, run_id)",
        "CREATE INDEX runs_by_finished ON runs (status, finished_at)",
        "CREATE INDEX runs_by_deadline ON runs (deadline) WHERE deadline IS NOT NULL",
        # The claim scan: runs to execute whose lease is missing or expired.
        "CREATE INDEX runs_claimable ON runs (lease_until NULLS FIRST, created_at) "
        "WHERE status IN ('pending', 'running')",
        "CREATE INDEX runs_by_owner ON runs (owner) WHERE owner IS NOT NULL",
        """CREATE TABLE logs (
            run_id  text NOT NULL,
            seq     integer NOT NULL,
            ts      double precision NOT NULL,
            level   text NOT NULL,
            event   text NOT NULL,
            node    text,
            message text NOT NULL,
            data    text NOT NULL,
            PRIMARY KEY (run_id, seq)
        )""",
        """CREATE TABLE signals (
            run_id     text NOT NULL,
            signal_id  integer NOT NULL,
            name       text NOT NULL,
            updates    text NOT NULL,
            created_at double precision NOT NULL,
            PRIMARY KEY (run_id, signal_id)
        )""",
        """CREATE TABLE nodes (
            node_id      text PRIMARY KEY,
            started_at   timestamptz NOT NULL,
            heartbeat_at timestamptz NOT NULL,
            left_at      timestamptz
        )""",
        "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
    ),
    (
        # API tokens of the web service (a hash of each secret, never the
        # secret), single-use stream tickets, and the audit log.
        """CREATE TABLE tokens (
            token_id     text PRIMARY KEY,
            name         text NOT NULL,
            role         text NOT NULL,
            graphs       text NOT NULL,
            secret_hash  text NOT NULL,
            peppered     boolean NOT NULL,
            created_at   double precision NOT NULL,
            expires_at   double precision,
            revoked_at   double precision,
            last_used_at double precision
        )""",
        """CREATE TABLE tickets (
            ticket_hash text PRIMARY KEY,
            token_id    text NOT NULL,
            expires_at  double precision NOT NULL
        )""",
        "CREATE INDEX tickets_by_expiry ON tickets (expires_at)",
        """CREATE TABLE audit (
            seq    bigserial PRIMARY KEY,
            ts     double precision NOT NULL,
            actor  text NOT NULL,
            action text NOT NULL,
            target text NOT NULL,
            status int NOT NULL,
            detail text NOT NULL
        )""",
        "CREATE INDEX audit_by_ts ON audit (ts)",
    ),
    (
        # A run inside a parallel or map node: each started branch's progress.
        "ALTER TABLE runs ADD COLUMN fanout text",
    ),
)

#: The schema version this code writes and reads.
SCHEMA_VERSION = len(_MIGRATIONS)

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False).encode
_loads = json.loads
#: A str as a JSON string (the encoder's own C function, without its per-call set-up).
_quote: Callable[[str], str] = json.encoder.encode_basestring

_ACTIVE_SQL = "('pending', 'running')"
_TERMINAL_SQL = "(" + ", ".join(f"'{s.value}'" for s in sorted(TERMINAL)) + ")"

_RUN_COLUMNS = (
    "run_id, graph_id, status, current_node, state, step, loop_counters, error, "
    "created_at, started_at, finished_at, updated_at, last_seq, attempt, crashes, waiting, "
    "signal_cursor, epoch, fanout"
)
_RUN_WIDTH = len(_RUN_COLUMNS.split(","))

# One statement commits a whole batch: new runs (``n``: epoch > 0, held by this
# node; epoch 0, queued for any node), checkpoints (``v``) and the log rows of
# both. A checkpoint is written only on top of the record it continues
# (last_seq, epoch) and, for a claim, only if no live node holds the run; any
# other write, only by the run's owner (or, for a waiting run, which has
# none, by anyone). Log rows go in only with their run's row. One statement
# in autocommit is one round trip and one commit. The batch travels as three
# JSON documents (json_to_recordset): one parameter each, parsed by the server
# faster than the same data as arrays of text, with each state and log entry
# in it as JSON (json columns keep their text as given), encoded once. (Three
# variants: a batch of checkpoints only, the usual one, plans faster without
# the empty parts.) Rows are locked in run id order before they are written,
# as the heartbeat's renewal locks them: two statements that write the same
# runs never wait for each other in a cycle (a deadlock).
_SAVE_CTES = f"""
v AS (
  SELECT * FROM json_to_recordset(%(v)s::json) AS v(
    run_id text, status text, current_node text, state json, step int, loop_counters json,
    error json, started_at float8, finished_at float8, updated_at float8, last_seq int,
    attempt int, crashes int, waiting json, signal_cursor int, deadline float8, epoch bigint,
    fanout json, expect_seq int, expect_epoch bigint, claim bool, write_id bigint)
), k AS MATERIALIZED (
  SELECT r.run_id FROM runs r WHERE r.run_id IN (SELECT run_id FROM v)
  ORDER BY r.run_id FOR UPDATE OF r
), u AS (
  UPDATE runs r SET
    status = v.status, current_node = v.current_node, state = v.state::text, step = v.step,
    loop_counters = v.loop_counters::text, error = v.error::text, started_at = v.started_at,
    finished_at = v.finished_at, updated_at = v.updated_at, last_seq = v.last_seq,
    attempt = v.attempt, crashes = v.crashes, waiting = v.waiting::text,
    signal_cursor = v.signal_cursor, deadline = v.deadline, epoch = v.epoch,
    fanout = v.fanout::text, write_id = v.write_id,
    owner = CASE WHEN v.status IN {_ACTIVE_SQL} THEN %(me)s END,
    lease_until = CASE WHEN v.status NOT IN {_ACTIVE_SQL} THEN NULL
                       WHEN v.claim THEN now() + %(ttl)s * interval '1 second'
                       ELSE r.lease_until END,
    cancel_requested = r.cancel_requested AND v.status IN {_ACTIVE_SQL}
  FROM v JOIN k ON k.run_id = v.run_id
  WHERE r.run_id = v.run_id AND r.last_seq = v.expect_seq AND r.epoch = v.expect_epoch
    AND CASE WHEN v.claim THEN r.lease_until IS NULL OR r.lease_until < now()
             ELSE r.owner = %(me)s OR (r.owner IS NULL AND r.status = 'waiting') END
  RETURNING r.run_id
)"""

_CREATE_CTES = f"""
n AS (
  SELECT * FROM json_to_recordset(%(n)s::json) AS n(
    run_id text, graph_id text, status text, current_node text, state json, step int,
    loop_counters json, error json, created_at float8, started_at float8, finished_at float8,
    updated_at float8, last_seq int, attempt int, crashes int, waiting json, signal_cursor int,
    deadline float8, epoch bigint, fanout json, write_id bigint)
), c AS (
  INSERT INTO runs ({_RUN_COLUMNS}, deadline, write_id, owner, lease_until)
  SELECT n.run_id, n.graph_id, n.status, n.current_node, n.state::text, n.step,
         n.loop_counters::text, n.error::text, n.created_at, n.started_at, n.finished_at,
         n.updated_at, n.last_seq, n.attempt, n.crashes, n.waiting::text, n.signal_cursor,
         n.epoch, n.fanout::text, n.deadline, n.write_id,
         CASE WHEN n.epoch > 0 AND n.status IN {_ACTIVE_SQL} THEN %(me)s END,
         CASE WHEN n.epoch > 0 AND n.status IN {_ACTIVE_SQL}
              THEN now() + %(ttl)s * interval '1 second' END
  FROM n
  ON CONFLICT (run_id) DO NOTHING
  RETURNING run_id
)"""


def _logs_cte(written: str) -> str:
    return f"""
i AS (
  INSERT INTO logs (run_id, seq, ts, level, event, node, message, data)
  SELECT l.run_id, l.seq, l.ts, l.level, l.event, l.node, l.message, l.data::text
  FROM json_to_recordset(%(l)s::json) AS l(
    run_id text, seq int, ts float8, level text, event text, node text, message text, data json)
  WHERE l.run_id IN ({written})
)"""


_SAVE_SQL = f"WITH {_SAVE_CTES},{_logs_cte('SELECT run_id FROM u')}\nSELECT run_id FROM u"
_CREATE_SQL = f"WITH {_CREATE_CTES},{_logs_cte('SELECT run_id FROM c')}\nSELECT run_id FROM c"
_BATCH_SQL = (
    f"WITH {_SAVE_CTES},{_CREATE_CTES},"
    f"{_logs_cte('SELECT run_id FROM u UNION ALL SELECT run_id FROM c')}\n"
    "SELECT run_id FROM u UNION ALL SELECT run_id FROM c"
)

_CLAIM_SQL = f"""
WITH c AS (
  SELECT run_id, owner IS NOT NULL AND status = 'running' AS taken_over FROM runs
  WHERE status IN {_ACTIVE_SQL} AND (lease_until IS NULL OR lease_until < now())
  ORDER BY lease_until NULLS FIRST, created_at
  LIMIT %(limit)s
  FOR UPDATE SKIP LOCKED
)
UPDATE runs r SET owner = %(me)s, epoch = r.epoch + 1,
  lease_until = now() + %(ttl)s * interval '1 second',
  crashes = r.crashes + CASE WHEN c.taken_over THEN 1 ELSE 0 END
FROM c WHERE r.run_id = c.run_id
RETURNING {", ".join("r." + c.strip() for c in _RUN_COLUMNS.split(","))},
  c.taken_over, r.cancel_requested, r.last_signal_id > r.signal_cursor
"""

_RENEW_SQL = f"""
WITH n AS (
  UPDATE nodes SET heartbeat_at = now() WHERE node_id = %(me)s
), k AS MATERIALIZED (
  SELECT r.run_id FROM runs r
  JOIN unnest(%(ids)s::text[], %(epochs)s::bigint[]) AS h(run_id, epoch)
    ON r.run_id = h.run_id AND r.epoch = h.epoch
  WHERE r.owner = %(me)s AND r.status IN {_ACTIVE_SQL}
  ORDER BY r.run_id FOR UPDATE OF r
)
UPDATE runs r SET lease_until = now() + %(ttl)s * interval '1 second'
FROM k
WHERE r.run_id = k.run_id AND r.owner = %(me)s AND r.status IN {_ACTIVE_SQL}
RETURNING r.run_id, r.cancel_requested, r.last_signal_id > r.signal_cursor
"""

#: Most checkpoints committed in one transaction.
_MAX_BATCH = 512
#: How long a statement waits for a row lock, runs at all, or a session may
#: sit in a transaction without sending anything (milliseconds).
LOCK_TIMEOUT_MS = 5_000
STATEMENT_TIMEOUT_MS = 30_000
IDLE_IN_TRANSACTION_MS = 30_000
#: Notifications of commits are gathered this long into one NOTIFY.
NOTIFY_WINDOW_S = 0.01
#: Checkpoints of unknown outcome remembered for their retries (oldest forgotten first).
_MAX_AMBIGUOUS = 10_000
#: A NOTIFY payload is at most 8,000 bytes.
_MAX_PAYLOAD = 7900

Row = tuple[Any, ...]


def _text(value: str) -> str:
    """``value`` as PostgreSQL text can hold it (it cannot hold NUL)."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _storable_id(value: str) -> bool:
    """Whether an id can be stored, so can be looked up at all (no NUL)."""
    return "\x00" not in value


def _run_from_row(row: Sequence[Any]) -> RunRecord:
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
        epoch=row[17],
        fanout=None if row[18] is None else _loads(row[18]),
    )


def _entry_from_row(row: Sequence[Any]) -> LogEntry:
    return LogEntry(row[0], row[1], Level(row[2]), row[3], row[4], row[5], _loads(row[6]))


def _graph_from_row(row: Sequence[Any]) -> StoredGraph:
    return StoredGraph(row[0], _loads(row[1]), row[2], row[3])


@dataclass(slots=True, eq=False)
class _Checkpoint:
    """One create or checkpoint for the writer thread, serialised on the Trio thread.

    ``row`` is the run's row and ``entries`` its log rows, each a JSON object
    (see ``_BATCH_SQL``), built when the checkpoint is taken: a snapshot of
    this step, whatever the run does next.
    """

    create: bool
    run: RunRecord
    claim: bool
    row: str
    entries: list[str]
    #: Stored with the checkpoint: tells "written by an earlier try whose
    #: answer was lost" from "written by someone else" (a retry of the same
    #: checkpoint has the same one).
    write_id: int
    done: trio.Event = field(default_factory=trio.Event)
    error_out: EngineError | None = None
    #: It failed with the connection: it may have been committed all the same.
    ambiguous: bool = False


def _identity(run: RunRecord) -> tuple[str, int, int, float]:
    """What tells one checkpoint of a run from another (a retry is the same record)."""
    return (run.run_id, run.last_seq, run.epoch, run.updated_at)


def _num(value: float | None) -> str:
    return "null" if value is None else repr(value)


def _str(value: str | None) -> str:
    return "null" if value is None else _quote(_text(value))


def _row_json(run: RunRecord, *, create: bool, claim: bool, expect_seq: int, write_id: int) -> str:
    """The run's row for ``_BATCH_SQL``: a JSON object, states and the like as JSON in it."""
    error = "null" if run.error is None else _dumps(run.error)
    waiting = "null" if run.waiting is None else _dumps(run.waiting)
    fanout = "null" if run.fanout is None else _dumps(run.fanout)
    head = (
        f'{{"run_id":{_quote(run.run_id)},"status":"{run.status.value}",'
        f'"current_node":{_str(run.current_node)},"state":{_dumps(run.state)},'
        f'"step":{run.step},"loop_counters":{_dumps(run.loop_counters)},"error":{error},'
        f'"started_at":{_num(run.started_at)},"finished_at":{_num(run.finished_at)},'
        f'"updated_at":{_num(run.updated_at)},"last_seq":{run.last_seq},'
        f'"attempt":{run.attempt},"crashes":{run.crashes},"waiting":{waiting},'
        f'"signal_cursor":{run.signal_cursor},"deadline":{_num(deadline_of(run))},'
        f'"epoch":{run.epoch},"fanout":{fanout}'
    )
    if create:
        return (
            f'{head},"graph_id":{_quote(run.graph_id)},"created_at":{_num(run.created_at)},'
            f'"write_id":{write_id}}}'
        )
    expect_epoch = run.epoch - 1 if claim else run.epoch
    return (
        f'{head},"expect_seq":{expect_seq},"expect_epoch":{expect_epoch},'
        f'"claim":{"true" if claim else "false"},"write_id":{write_id}}}'
    )


def _entry_json(run_id: str, e: LogEntry) -> str:
    return (
        f'{{"run_id":{_quote(run_id)},"seq":{e.seq},"ts":{_num(e.ts)},'
        f'"level":"{e.level.value}","event":{_str(str(e.event))},"node":{_str(e.node)},'
        f'"message":{_str(e.message)},"data":{_dumps(e.data)}}}'
    )


def _store_error(exc: Exception, what: str) -> EngineError:
    """``exc`` as an engine error; connection-level failures are transient."""
    import psycopg

    if isinstance(exc, EngineError):
        return exc
    transient = isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError)
    if isinstance(exc, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected):
        transient = True
    return StoreError(f"PostgreSQL {what}: {type(exc).__name__}: {exc}", transient=transient)


class _Writer:
    """Owns the write connection; commits queued checkpoints in batches.

    Every job queued while a batch commits goes into the next one (group
    commit). A batch is one transaction: creates and checkpoints as two
    set-based statements, pipelined with the commit and the log NOTIFY, so
    one round trip commits up to ``_MAX_BATCH`` checkpoints. If the batch
    fails for a reason other than the connection, each job is tried alone,
    so one bad checkpoint fails alone. Outcomes return to the Trio thread
    through ``TrioToken.run_sync_soon``.
    """

    def __init__(self, store: PostgresStore, token: trio.lowlevel.TrioToken) -> None:
        self._store = store
        self._token = token
        self._pending: deque[_Checkpoint] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._conn: psycopg.Connection[Any] | None = None
        self._thread = threading.Thread(
            target=self._loop, name="trioflow-postgres-writer", daemon=True
        )
        self._thread.start()

    def submit(self, job: _Checkpoint) -> None:
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
                batch: list[_Checkpoint] = []
                seen: set[str] = set()
                deferred: list[_Checkpoint] = []
                while pending and len(batch) < _MAX_BATCH:
                    job = pending.popleft()
                    # One row per run per statement: a second checkpoint of the
                    # same run waits for the next batch.
                    if job.run.run_id in seen:
                        deferred.append(job)
                        continue
                    seen.add(job.run.run_id)
                    batch.append(job)
                pending.extendleft(reversed(deferred))
            self._run(batch)
            self._token.run_sync_soon(self._store._jobs_done, batch)
            self._notify(batch)
        self._close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._close()
            conn = self._conn = self._store._connect("writer")
        return conn

    def _run(self, checkpoints: list[_Checkpoint]) -> None:
        import psycopg

        lost = (psycopg.OperationalError, psycopg.InterfaceError)
        try:
            self._connection()
        except Exception as exc:
            # Nothing was sent: nothing can have been written.
            error = _store_error(exc, "cannot connect")
            for job in checkpoints:
                job.error_out = error
            self._close()
            return
        try:
            self._write(checkpoints)
        except lost as exc:
            # Sent, and no answer: the commit may or may not have happened.
            self._close()
            self._settle(checkpoints, _store_error(exc, "commit failed"))
        except Exception:
            # Something in the data: find which, one checkpoint at a time.
            for job in checkpoints:
                try:
                    self._write([job])
                except lost as one:
                    self._close()
                    self._settle([job], _store_error(one, "checkpoint failed"))
                except Exception as one:
                    job.error_out = _store_error(one, "checkpoint failed")

    def _settle(self, jobs: list[_Checkpoint], error: EngineError) -> None:
        """After a commit whose answer was lost: look whether each of ``jobs`` was written.

        Each checkpoint's row carries its ``write_id``. If the database
        answers again, each job is settled now: written (success) or not
        (the error; a retry may write it). If not, the jobs stay ambiguous:
        a retry of the same checkpoint reuses its write_id and recognises
        the row if this try did write it.
        """
        try:
            conn = self._connection()
            rows = conn.execute(
                "SELECT run_id, last_seq, epoch, write_id FROM runs WHERE run_id = ANY(%s)",
                ([j.run.run_id for j in jobs],),
            ).fetchall()
        except Exception:  # the database does not answer: decide later
            self._close()
            for job in jobs:
                job.error_out = error
                job.ambiguous = True
            return
        stored = {r[0]: r[1:] for r in rows}
        for job in jobs:
            if stored.get(job.run.run_id) == (job.run.last_seq, job.run.epoch, job.write_id):
                continue  # it was written
            job.error_out = error

    def _write(self, jobs: list[_Checkpoint]) -> None:
        """Commit ``jobs`` in one statement (one round trip, one commit); set each outcome."""
        conn = self._connection()
        creates = any(j.create for j in jobs)
        saves = not all(j.create for j in jobs)
        sql = _BATCH_SQL if creates and saves else _CREATE_SQL if creates else _SAVE_SQL
        rows = conn.execute(sql, self._store._batch_params(jobs)).fetchall()
        written = {row[0] for row in rows}
        missing = [j for j in jobs if j.run.run_id not in written]
        if missing:
            self._explain(conn, missing)

    def _notify(self, jobs: list[_Checkpoint]) -> None:
        """Hand the notifications of a committed batch to the notifier thread."""
        store = self._store
        notifier = store._notifier
        if notifier is None:
            return
        written = [j for j in jobs if j.error_out is None]
        items = [(store.channels["log"], payload) for payload in store._log_payloads(written)]
        if any(j.create and j.run.epoch == 0 for j in written):
            items.append((store.channels["work"], ""))
        if items:
            notifier.submit(items)

    def _explain(self, conn: psycopg.Connection[Any], jobs: list[_Checkpoint]) -> None:
        """Why each of ``jobs`` was not written; or that it was, by an earlier try."""
        rows = conn.execute(
            "SELECT run_id, last_seq, epoch, owner, write_id, "
            "lease_until IS NOT NULL AND lease_until >= now() FROM runs "
            "WHERE run_id = ANY(%s)",
            ([j.run.run_id for j in jobs],),
        ).fetchall()
        stored = {r[0]: r for r in rows}
        me = self._store.node_id
        for job in jobs:
            run = job.run
            row = stored.get(run.run_id)
            if job.create:
                job.error_out = StoreError(f"run {run.run_id!r} already exists")
                continue
            if row is None:
                job.error_out = StoreError(f"run {run.run_id!r} does not exist")
                continue
            _, last_seq, epoch, owner, write_id, lease_live = row
            if (last_seq, epoch, write_id) == (run.last_seq, run.epoch, job.write_id):
                continue  # an earlier try of this checkpoint committed it (its answer was lost)
            entries = len(job.entries)
            problem = fencing_problem(run, entries, last_seq, epoch, claim=job.claim)
            if problem is None and job.claim and owner is not None and lease_live:
                problem = LeaseHeldError(run.run_id, owner)
            if problem is None and not job.claim and owner != me:
                problem = LeaseLostError(
                    f"run {run.run_id!r} is held by node {owner!r}, not this one; nothing "
                    "was written",
                    details={"run_id": run.run_id, "owner": owner},
                )
            job.error_out = problem or checkpoint_conflict(run, entries, last_seq)


def _merge(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The notifications of ``items`` with each run's newest seq only, in few payloads."""
    latest: dict[str, dict[str, str]] = {}
    for channel, payload in items:
        runs = latest.setdefault(channel, {})
        for item in payload.split(",") if payload else [""]:
            run_id, _, seq = item.rpartition(":")
            runs[run_id or item] = seq
    out: list[tuple[str, str]] = []
    for channel, runs in latest.items():
        current: list[str] = []
        size = 0
        for run_id, seq in runs.items():
            item = f"{run_id}:{seq}" if seq else run_id
            if current and size + len(item) + 1 > _MAX_PAYLOAD:
                out.append((channel, ",".join(current)))
                current, size = [], 0
            current.append(item)
            size += len(item) + 1
        out.append((channel, ",".join(current)))
    return out


class _Notifier:
    """Sends NOTIFYs on a connection of its own, after the commits they announce.

    Outside the write transactions (a NOTIFY in a transaction serializes the
    commits of every notifying transaction in the database), without making
    the writer wait (its own thread), batched (every notification queued
    while one round trip is out goes in the next, as one statement), and
    with ``synchronous_commit = off``: a NOTIFY gives its transaction an id,
    and its commit need not wait for the disk. One that cannot be sent is
    dropped with a warning: followers on other nodes read the table every
    few seconds anyway.
    """

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._pending: deque[tuple[str, str]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._conn: psycopg.Connection[Any] | None = None
        #: The backend pid of its connection: this node's own notifications are not news.
        self.backend_pid: int | None = None
        self._thread = threading.Thread(
            target=self._loop, name="trioflow-postgres-notifier", daemon=True
        )
        self._thread.start()

    def submit(self, items: list[tuple[str, str]]) -> None:
        with self._cond:
            # Only the first item of a window wakes the thread (a wake-up
            # costs the writer more than the append).
            wake = not self._pending
            self._pending.extend(items)
            if wake:
                self._cond.notify()

    def stop(self) -> None:
        """Send what is queued, then close (blocking)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    break
                # Gather for a moment: one NOTIFY for many commits, so a busy
                # node's own listener (and every other node's) wakes up at most
                # a hundred times a second, whatever the step rate.
                until = time.monotonic() + NOTIFY_WINDOW_S
                while not self._stopping and (left := until - time.monotonic()) > 0:
                    self._cond.wait(left)
                items = list(self._pending)
                self._pending.clear()
            self._send(_merge(items))
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()

    def _send(self, items: list[tuple[str, str]]) -> None:
        try:
            conn = self._conn
            if conn is None or conn.closed or conn.broken:
                conn = self._conn = self._store._connect("notifier")
                conn.execute("SET synchronous_commit = off")
                self.backend_pid = conn.info.backend_pid
            conn.execute(
                "SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS t(c, p)",
                ([c for c, _ in items], [p for _, p in items]),
            )
        except Exception as exc:  # a worker thread: log, never die
            log.warning("could not notify the other nodes (%d dropped): %s", len(items), exc)
            self.backend_pid = None
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None


class PostgresStore(SharedStore):
    """Graphs, runs and logs in PostgreSQL, shared by several engines.

    Args:
        dsn: a libpq connection string or ``postgresql://`` URL.
        schema: the schema to use (created if missing); default: the
            connection's ``search_path`` (usually ``public``).
        node_id: this engine's name among the nodes; default: host, pid and
            start time. Two live nodes may not share one.
        lease_ttl: seconds a lease lasts without a renewal; a node renews
            every third of it, and its runs are taken over by another node
            that long after it stops renewing.
        claim_interval: seconds between two scans for runs to claim (a
            notification wakes the scan earlier).
        readers: connections of the pool for reads and small writes.
        notifications: send ``NOTIFY`` (live logs, cancels, work to claim)
            to other nodes. Without, they learn the same on their next
            heartbeat or poll (for tests of those fallbacks).
        connect_timeout: seconds to wait for a connection.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        node_id: str | None = None,
        lease_ttl: float = 15.0,
        claim_interval: float = 1.0,
        readers: int = 8,
        notifications: bool = True,
        connect_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        if schema is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", schema):
            raise StoreError(f"invalid schema name {schema!r}: letters, digits and _ only")
        if not lease_ttl > 0 or not claim_interval > 0:
            raise StoreError("lease_ttl and claim_interval must be > 0")
        if readers < 1:
            raise StoreError("PostgresStore needs at least one reader connection")
        self.dsn = dsn
        self.schema = schema
        self.node_id = node_id or default_node_id()
        if not 1 <= len(self.node_id) <= 200 or not _storable_id(self.node_id):
            raise StoreError("a node id is 1 to 200 characters, without NUL")
        self.lease_ttl = float(lease_ttl)
        self.claim_interval = float(claim_interval)
        self.notifications = notifications
        self._connect_timeout = connect_timeout
        self._readers = readers
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._writer: _Writer | None = None
        self._notifier: _Notifier | None = None
        self._limiter = trio.CapacityLimiter(readers)
        #: A checkpoint whose commit's outcome is unknown -> its write_id: its
        #: retries reuse it, and recognise the row if that try wrote it.
        self._ambiguous: dict[tuple[str, int, int, float], int] = {}
        #: Unique per checkpoint: a random start for this store (nodes differ), then +1.
        self._write_ids = itertools.count(int.from_bytes(os.urandom(6), "big") << 14)
        prefix = "tf_" + hashlib.sha1((schema or "").encode()).hexdigest()[:10]
        self.channels = {kind: f"{prefix}_{kind}" for kind in ("log", "ctl", "work")}

    # -- lifetime ----------------------------------------------------------------

    def _conninfo(self, role: str) -> dict[str, Any]:
        options: dict[str, Any] = {
            "autocommit": True,
            "application_name": f"trioflow-{role}:{self.node_id}"[:63],
            "connect_timeout": max(1, int(self._connect_timeout)),
            # A dead peer or network is noticed in seconds, not hours.
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": 10_000,
        }
        # No statement waits for ever: a row another session keeps locked
        # (a node frozen in a transaction) fails the write after a while, and
        # the write is retried; such a session is ended by the server.
        settings = [
            f"-c lock_timeout={LOCK_TIMEOUT_MS}",
            f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}",
        ]
        if self.schema is not None:
            settings.append(f"-c search_path={self.schema}")
        options["options"] = " ".join(settings)
        return options

    def _connect(self, role: str) -> psycopg.Connection[Any]:
        import psycopg

        return psycopg.connect(self.dsn, **self._conninfo(role))

    async def open(self) -> None:
        """Connect, create the schema or migrate it forward, start the writer.

        Raises:
            StoreError: the database cannot be reached, or its schema was
                written by a newer trioflow; nothing is written then.
        """
        try:
            import psycopg_pool
        except ImportError:
            raise StoreError(
                "the PostgreSQL store needs psycopg: pip install 'trioflow[postgresql]'"
            ) from None
        if self._pool is not None:
            raise StoreError("the PostgreSQL store is already open")

        def open_pool() -> psycopg_pool.ConnectionPool[Any]:
            options = self._conninfo("reader")
            pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
                self.dsn,
                kwargs=options,
                min_size=1,
                max_size=self._readers,
                open=False,
                timeout=self._connect_timeout,
                name=f"trioflow-{self.node_id}",
            )
            try:
                pool.open(wait=True, timeout=self._connect_timeout)
                with pool.connection() as conn:
                    self._migrate(conn)
            except BaseException:
                pool.close()
                raise
            return pool

        try:
            self._pool = await trio.to_thread.run_sync(open_pool, limiter=self._limiter)
        except Exception as exc:
            if isinstance(exc, EngineError):
                raise
            raise StoreError(
                f"cannot open the PostgreSQL store: {type(exc).__name__}: {exc}",
                transient=True,
            ) from None
        if self.notifications:
            self._notifier = _Notifier(self)
        self._writer = _Writer(self, trio.lowlevel.current_trio_token())

    async def aclose(self) -> None:
        """Commit every queued checkpoint, then close every connection."""
        writer, self._writer = self._writer, None
        if writer is not None:
            await trio.to_thread.run_sync(writer.stop)
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            await trio.to_thread.run_sync(notifier.stop)
        pool, self._pool = self._pool, None
        if pool is not None:
            await trio.to_thread.run_sync(pool.close)

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            # One node migrates at a time; the others wait, then find it done.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('trioflow-schema'))")
            if self.schema is not None:
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            conn.execute("CREATE TABLE IF NOT EXISTS trioflow_schema (version integer NOT NULL)")
            row = conn.execute("SELECT version FROM trioflow_schema").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the PostgreSQL schema has version {version}, but this trioflow knows "
                    f"versions up to {SCHEMA_VERSION}; upgrade trioflow to use it",
                    details={"version": version, "supported": SCHEMA_VERSION},
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target - 1]:
                    conn.execute(statement)
            if row is None:
                conn.execute("INSERT INTO trioflow_schema VALUES (%s)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                conn.execute("UPDATE trioflow_schema SET version = %s", (SCHEMA_VERSION,))

    # -- plumbing ----------------------------------------------------------------

    def _require_pool(self) -> psycopg_pool.ConnectionPool[Any]:
        pool = self._pool
        if pool is None:
            raise StoreError("the PostgreSQL store is not open")
        return pool

    async def _db(
        self, fn: Callable[[psycopg.Connection[Any]], T], what: str, *, abandon: bool = False
    ) -> T:
        """Run ``fn(conn)`` in one transaction on a pool connection, in a worker thread.

        ``abandon``: a cancel does not wait for the thread (heartbeats, whose
        caller must not hang on a database that does not answer).
        """
        pool = self._require_pool()

        def call() -> T:
            with pool.connection() as conn, conn.transaction():
                return fn(conn)

        try:
            return await trio.to_thread.run_sync(
                call, limiter=self._limiter, abandon_on_cancel=abandon
            )
        except EngineError:
            raise
        except Exception as exc:
            raise _store_error(exc, what) from None

    async def _submit(self, job: _Checkpoint) -> None:
        writer = self._writer
        if writer is None:
            raise StoreError("the PostgreSQL store is not open")
        writer.submit(job)
        try:
            await job.done.wait()
        except trio.Cancelled:
            # A job handed to the writer will be written or fail: its outcome
            # is the caller's, so wait for it (the writer's connection has TCP
            # timeouts: this is bounded). Written, it returns as written: the
            # caller's scope is still cancelled, and Trio raises Cancelled
            # again at its next checkpoint. (A shielded scope around every
            # wait would cost each step several microseconds.)
            with trio.CancelScope(shield=True):
                await job.done.wait()
            if job.error_out is None:
                return
        if job.error_out is not None:
            raise job.error_out

    def _jobs_done(self, batch: list[_Checkpoint]) -> None:
        """On the Trio thread: report outcomes, wake followers of the runs written."""
        for job in batch:
            key = _identity(job.run)
            if job.error_out is None:
                self.notifier.notify(job.run.run_id)
                self._ambiguous.pop(key, None)
            elif job.ambiguous:
                # Its retry (the same checkpoint) reuses this write_id.
                self._ambiguous.setdefault(key, job.write_id)
                if len(self._ambiguous) > _MAX_AMBIGUOUS:
                    del self._ambiguous[next(iter(self._ambiguous))]
            else:
                self._ambiguous.pop(key, None)
            job.done.set()

    def _checkpoint_job(
        self, run: RunRecord, entries: Sequence[LogEntry], *, create: bool, claim: bool
    ) -> _Checkpoint:
        rid = run.run_id
        earlier = self._ambiguous.get(_identity(run)) if self._ambiguous else None
        write_id = earlier if earlier is not None else next(self._write_ids)
        row = _row_json(
            run,
            create=create,
            claim=claim,
            expect_seq=run.last_seq - len(entries),
            write_id=write_id,
        )
        return _Checkpoint(
            create=create,
            run=run,
            claim=claim,
            row=row,
            entries=[_entry_json(rid, e) for e in entries],
            write_id=write_id,
        )

    def _batch_params(self, jobs: Sequence[_Checkpoint]) -> dict[str, Any]:
        """The three JSON documents of ``_BATCH_SQL`` for ``jobs`` (creates and checkpoints)."""
        saves = ",".join(j.row for j in jobs if not j.create)
        creates = ",".join(j.row for j in jobs if j.create)
        logs = ",".join(e for j in jobs for e in j.entries)
        return {
            "v": f"[{saves}]",
            "n": f"[{creates}]",
            "l": f"[{logs}]",
            "me": self.node_id,
            "ttl": self.lease_ttl,
        }

    def _log_payloads(self, jobs: Sequence[_Checkpoint]) -> list[str]:
        """``run_id:seq`` of every checkpoint with entries, in payloads under 8,000 bytes."""
        if not self.notifications:
            return []
        payloads: list[str] = []
        current: list[str] = []
        size = 0
        for job in jobs:
            if not job.entries:
                continue
            item = f"{job.run.run_id}:{job.run.last_seq}"
            if size + len(item) + 1 > _MAX_PAYLOAD and current:
                payloads.append(",".join(current))
                current, size = [], 0
            current.append(item)
            size += len(item) + 1
        if current:
            payloads.append(",".join(current))
        return payloads

    def _notify_sync(self, conn: psycopg.Connection[Any], kind: str, payload: str) -> None:
        if self.notifications:
            conn.execute("SELECT pg_notify(%s, %s)", (self.channels[kind], payload))

    # -- sessions and nodes --------------------------------------------------------

    async def begin_session(self) -> bool:
        """Join the nodes (each node's runs are accounted by lease, not by session).

        Raises:
            StoreError: a live node already uses this node id.
        """
        me, ttl = self.node_id, self.lease_ttl

        def join(conn: psycopg.Connection[Any]) -> None:
            row = conn.execute(
                "SELECT left_at IS NULL AND heartbeat_at > now() - %s * interval '1 second' "
                "FROM nodes WHERE node_id = %s FOR UPDATE",
                (ttl, me),
            ).fetchone()
            if row is not None and row[0]:
                raise StoreError(
                    f"node id {me!r} is in use by a live node; give each node its own "
                    "(trioflow serve --node-id NAME)",
                    details={"node_id": me},
                )
            conn.execute(
                "INSERT INTO nodes (node_id, started_at, heartbeat_at) VALUES (%s, now(), now()) "
                "ON CONFLICT (node_id) DO UPDATE SET started_at = now(), heartbeat_at = now(), "
                "left_at = NULL",
                (me,),
            )
            # Forget nodes gone for a week (runs never depend on these rows).
            conn.execute("DELETE FROM nodes WHERE heartbeat_at < now() - interval '7 days'")

        await self._db(join, "join")
        return True

    async def end_session(self) -> None:
        await self.leave()

    async def leave(self) -> None:
        me = self.node_id

        def leave(conn: psycopg.Connection[Any]) -> None:
            conn.execute("UPDATE nodes SET left_at = now() WHERE node_id = %s", (me,))

        await self._db(leave, "leave")

    async def live_nodes(self) -> list[NodeInfo]:
        ttl = self.lease_ttl

        def read(conn: psycopg.Connection[Any]) -> list[Row]:
            return conn.execute(
                "SELECT n.node_id, extract(epoch FROM n.started_at), "
                "extract(epoch FROM n.heartbeat_at), "
                "(SELECT count(*) FROM runs r WHERE r.owner = n.node_id "
                f" AND r.status IN {_ACTIVE_SQL}) "
                "FROM nodes n WHERE n.left_at IS NULL "
                "AND n.heartbeat_at > now() - %s * interval '1 second' ORDER BY n.node_id",
                (ttl,),
            ).fetchall()

        rows = await self._db(read, "nodes")
        return [NodeInfo(r[0], float(r[1]), float(r[2]), int(r[3])) for r in rows]

    async def probe(self) -> None:
        def probe(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('probe', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (repr(time.time()),),
            )

        await self._db(probe, "probe")

    # -- leases ----------------------------------------------------------------------

    async def claim_runs(self, limit: int) -> list[Claimed]:
        if limit <= 0:
            return []
        params = {"me": self.node_id, "ttl": self.lease_ttl, "limit": int(limit)}

        def claim(conn: psycopg.Connection[Any]) -> list[Row]:
            return conn.execute(_CLAIM_SQL, params).fetchall()

        rows = await self._db(claim, "claim")
        w = _RUN_WIDTH
        return [
            Claimed(_run_from_row(r[:w]), bool(r[w]), bool(r[w + 1]), bool(r[w + 2])) for r in rows
        ]

    async def renew_leases(self, held: Mapping[str, int], *, timeout_s: float) -> Renewal:
        params = {
            "me": self.node_id,
            "ttl": self.lease_ttl,
            "ids": list(held),
            "epochs": list(held.values()),
        }

        timeout_ms = max(1, int(timeout_s * 1000))

        def renew(conn: psycopg.Connection[Any]) -> list[Row]:
            conn.execute(f"SET LOCAL statement_timeout = {timeout_ms}")
            return conn.execute(_RENEW_SQL, params).fetchall()

        rows = await self._db(renew, "heartbeat", abandon=True)
        return Renewal(
            held=frozenset(r[0] for r in rows),
            cancel_requested=frozenset(r[0] for r in rows if r[1]),
            signals_pending=frozenset(r[0] for r in rows if r[2]),
        )

    async def release_leases(self, held: Mapping[str, int]) -> int:
        me = self.node_id
        keep = list(held)

        def release(conn: psycopg.Connection[Any]) -> int:
            count = conn.execute(
                "UPDATE runs SET owner = NULL, lease_until = NULL "
                f"WHERE owner = %s AND status IN {_ACTIVE_SQL} AND NOT (run_id = ANY(%s))",
                (me, keep),
            ).rowcount
            if count:
                self._notify_sync(conn, "work", "")
            return count

        return await self._db(release, "release")

    async def request_cancel(self, run_id: str) -> None:
        if not _storable_id(run_id):
            raise UnknownRunError(run_id)

        def request(conn: psycopg.Connection[Any]) -> None:
            row = conn.execute(
                f"UPDATE runs SET cancel_requested = true WHERE run_id = %s "
                f"AND status IN {_ACTIVE_SQL} RETURNING run_id",
                (run_id,),
            ).fetchone()
            if row is not None:
                self._notify_sync(conn, "ctl", f"cancel:{run_id}")

        await self._db(request, "cancel request")

    # -- notifications ---------------------------------------------------------------

    async def listen(
        self, events: ClusterEvents, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        import psycopg

        task_status.started()
        delay = 0.1
        while True:
            try:
                conn = await self._open_listener()
            except psycopg.Error as exc:
                log.warning("listener: cannot connect (%s); again in %.1f s", exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            try:
                events.reconnected()
                await self._pump(conn, events)
            except (psycopg.Error, OSError) as exc:
                log.warning("listener: connection lost (%s); reconnecting", exc)
            finally:
                with contextlib.suppress(Exception):
                    conn.close()

    async def _open_listener(self) -> psycopg.Connection[Any]:
        # Connecting can take as long as the network does, so a stopping
        # engine does not wait for it: the thread is abandoned, and whichever
        # of the two comes second (the connection or the abandon) closes it.
        lock = threading.Lock()
        opened: list[psycopg.Connection[Any]] = []
        abandoned = False

        def open_() -> psycopg.Connection[Any]:
            conn = self._connect("listener")
            try:
                for channel in self.channels.values():
                    conn.execute(f'LISTEN "{channel}"')
            except BaseException:
                conn.close()
                raise
            with lock:
                if abandoned:
                    conn.close()
                else:
                    opened.append(conn)
            return conn

        try:
            return await trio.to_thread.run_sync(open_, abandon_on_cancel=True)
        except trio.Cancelled:
            with lock:
                abandoned = True
                for conn in opened:
                    conn.close()
            raise

    async def _pump(self, conn: psycopg.Connection[Any], events: ClusterEvents) -> None:
        import psycopg
        from psycopg import pq

        pgconn = conn.pgconn
        fd = pgconn.socket
        log_channel = self.channels["log"]
        ctl_channel = self.channels["ctl"]
        while True:
            while (note := pgconn.notifies()) is not None:
                channel = note.relname.decode()
                payload = note.extra.decode()
                if channel == log_channel:
                    notifier = self._notifier
                    if notifier is not None and note.be_pid == notifier.backend_pid:
                        continue  # this node's own writes: its followers were told
                    for item in payload.split(","):
                        run_id = item.rpartition(":")[0]
                        if run_id:
                            events.log_written(run_id)
                elif channel == ctl_channel:
                    kind, _, run_id = payload.partition(":")
                    if kind == "cancel":
                        events.cancel_requested(run_id)
                    elif kind == "signal":
                        events.signal_sent(run_id)
                else:
                    events.work_available()
            await trio.lowlevel.wait_readable(fd)
            pgconn.consume_input()
            if pgconn.status != pq.ConnStatus.OK:
                raise psycopg.OperationalError("the listener connection is closed")

    # -- graphs ------------------------------------------------------------------

    async def put_graph(self, graph: StoredGraph) -> PutResult:
        params = (graph.graph_id, _dumps(graph.document), graph.digest, graph.created_at)

        def put(conn: psycopg.Connection[Any]) -> PutResult:
            row = conn.execute(
                "INSERT INTO graphs (graph_id, document, digest, created_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (graph_id) DO NOTHING RETURNING graph_id",
                params,
            ).fetchone()
            if row is not None:
                return "created"
            stored = conn.execute(
                "SELECT digest FROM graphs WHERE graph_id = %s", (graph.graph_id,)
            ).fetchone()
            return "exists" if stored is not None and stored[0] == graph.digest else "conflict"

        if not _storable_id(graph.graph_id):
            raise StoreError("a graph id cannot contain NUL")
        return await self._db(put, "graph write")

    async def get_graph(self, graph_id: str) -> StoredGraph | None:
        if not _storable_id(graph_id):
            return None

        def get(conn: psycopg.Connection[Any]) -> Row | None:
            return conn.execute(
                "SELECT graph_id, document, digest, created_at FROM graphs WHERE graph_id = %s",
                (graph_id,),
            ).fetchone()

        row = await self._db(get, "read")
        return None if row is None else _graph_from_row(row)

    async def list_graphs(
        self,
        *,
        cursor: str | None = None,
        limit: int = 50,
        graphs: Sequence[str] | None = None,
    ) -> Page[StoredGraph]:
        after = Cursor.decode(cursor)[1] if cursor is not None else None
        if after is not None and not _storable_id(after):
            after = after.replace("\x00", "")

        def page(conn: psycopg.Connection[Any]) -> list[Row]:
            sql = "SELECT graph_id, document, digest, created_at FROM graphs"
            params: list[Any] = []
            where: list[str] = []
            if after is not None:
                where.append("graph_id > %s")
                params.append(after)
            if graphs is not None:
                where.append("graph_id LIKE ANY(%s)")
                params.append([glob_like(g) for g in graphs])
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY graph_id LIMIT %s"
            params.append(max(limit, 0) + 1)
            return conn.execute(sql, params).fetchall()

        rows = await self._db(page, "read")
        items = [_graph_from_row(r) for r in rows[:limit]]
        more = len(rows) > limit and bool(items)
        return Page(items, Cursor.encode(0, items[-1].graph_id) if more else None)

    # -- runs --------------------------------------------------------------------

    async def create_run(self, run: RunRecord, entries: Sequence[LogEntry] = ()) -> None:
        if not _storable_id(run.run_id) or not _storable_id(run.graph_id):
            raise StoreError("run and graph ids cannot contain NUL")
        await self._submit(self._checkpoint_job(run, entries, create=True, claim=False))

    async def save_run(
        self, run: RunRecord, entries: Sequence[LogEntry], *, claim: bool = False
    ) -> None:
        await self._submit(self._checkpoint_job(run, entries, create=False, claim=claim))

    async def get_run(self, run_id: str) -> RunRecord | None:
        if not _storable_id(run_id):
            return None

        def get(conn: psycopg.Connection[Any]) -> Row | None:
            return conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = %s",
                (run_id,),
            ).fetchone()

        row = await self._db(get, "read")
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
            if not _storable_id(graph_id):
                return Page([], None)
            where.append("graph_id = %s")
            params.append(graph_id)
        if status is not None:
            where.append("status = %s")
            params.append(RunStatus(status).value)
        if graphs is not None:
            where.append("graph_id LIKE ANY(%s)")
            params.append([glob_like(g) for g in graphs])
        if cursor is not None:
            key, ident = Cursor.decode(cursor)
            where.append("(created_at, run_id) < (%s, %s)")
            params.extend((key, ident.replace("\x00", "")))
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, run_id DESC LIMIT %s"
        params.append(max(limit, 0) + 1)

        def page(conn: psycopg.Connection[Any]) -> list[Row]:
            return conn.execute(sql, params).fetchall()

        rows = await self._db(page, "read")
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
            if not _storable_id(graph_id):
                return {}
            where.append("graph_id = %s")
            params.append(graph_id)
        if graphs is not None:
            where.append("graph_id LIKE ANY(%s)")
            params.append([glob_like(g) for g in graphs])
        if statuses is not None:
            where.append("status = ANY(%s)")
            params.append([RunStatus(s).value for s in statuses])
        sql = "SELECT status, COUNT(*) FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " GROUP BY status"

        def count(conn: psycopg.Connection[Any]) -> list[Row]:
            return conn.execute(sql, params).fetchall()

        return {RunStatus(status): int(n) for status, n in await self._db(count, "read")}

    async def read_log(self, run_id: str, *, after: int = 0, limit: int = 1000) -> list[LogEntry]:
        if not _storable_id(run_id):
            return []

        def read(conn: psycopg.Connection[Any]) -> list[Row]:
            return conn.execute(
                "SELECT seq, ts, level, event, node, message, data FROM logs "
                "WHERE run_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                (run_id, max(after, 0), max(limit, 0)),
            ).fetchall()

        return [_entry_from_row(r) for r in await self._db(read, "read")]

    async def unfinished_runs(self) -> list[RunRecord]:
        def read(conn: psycopg.Connection[Any]) -> list[Row]:
            return conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE status IN {_ACTIVE_SQL} "
                "ORDER BY created_at, run_id"
            ).fetchall()

        return [_run_from_row(r) for r in await self._db(read, "read")]

    async def next_deadline(self) -> float | None:
        def read(conn: psycopg.Connection[Any]) -> Row | None:
            return conn.execute(
                "SELECT MIN(deadline) FROM runs WHERE deadline IS NOT NULL"
            ).fetchone()

        row = await self._db(read, "read")
        return None if row is None or row[0] is None else float(row[0])

    async def due_waits(self, now: float, *, limit: int = 100) -> list[RunRecord]:
        def read(conn: psycopg.Connection[Any]) -> list[Row]:
            return conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs "
                "WHERE deadline IS NOT NULL AND deadline <= %s ORDER BY deadline, run_id LIMIT %s",
                (now, max(limit, 0)),
            ).fetchall()

        return [_run_from_row(r) for r in await self._db(read, "read")]

    async def add_signal(
        self, run_id: str, name: str, updates: dict[str, Any], created_at: float
    ) -> StoredSignal:
        if not _storable_id(run_id):
            raise UnknownRunError(run_id)
        encoded = _dumps(updates)
        stored_name = _text(name)

        def add(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                "UPDATE runs SET last_signal_id = last_signal_id + 1 "
                f"WHERE run_id = %s AND status NOT IN {_TERMINAL_SQL} "
                "RETURNING last_signal_id, owner",
                (run_id,),
            ).fetchone()
            if row is None:
                status = conn.execute(
                    "SELECT status FROM runs WHERE run_id = %s", (run_id,)
                ).fetchone()
                if status is None:
                    raise UnknownRunError(run_id)
                raise RunStateError(run_id, status[0], "signal")
            signal_id = int(row[0])
            conn.execute(
                "INSERT INTO signals (run_id, signal_id, name, updates, created_at) "
                "VALUES (%s, %s, %s, %s, %s)",
                (run_id, signal_id, stored_name, encoded, created_at),
            )
            if row[1] is not None:
                self._notify_sync(conn, "ctl", f"signal:{run_id}")
            return signal_id

        signal_id = await self._db(add, "signal write")
        return StoredSignal(run_id, signal_id, stored_name, updates, created_at)

    async def signals_after(
        self, run_id: str, after: int, *, limit: int = 100
    ) -> list[StoredSignal]:
        if not _storable_id(run_id):
            return []

        def read(conn: psycopg.Connection[Any]) -> list[Row]:
            return conn.execute(
                "SELECT signal_id, name, updates, created_at FROM signals "
                "WHERE run_id = %s AND signal_id > %s ORDER BY signal_id LIMIT %s",
                (run_id, max(after, 0), max(limit, 0)),
            ).fetchall()

        rows = await self._db(read, "read")
        return [StoredSignal(run_id, r[0], r[1], _loads(r[2]), r[3]) for r in rows]

    async def delete_runs(self, *, finished_before: float) -> int:
        doomed = f"status IN {_TERMINAL_SQL} AND finished_at < %s"

        def delete(conn: psycopg.Connection[Any]) -> int:
            conn.execute(
                f"DELETE FROM logs WHERE run_id IN (SELECT run_id FROM runs WHERE {doomed})",
                (finished_before,),
            )
            conn.execute(
                f"DELETE FROM signals WHERE run_id IN (SELECT run_id FROM runs WHERE {doomed})",
                (finished_before,),
            )
            return conn.execute(
                f"DELETE FROM runs WHERE {doomed}",
                (finished_before,),
            ).rowcount

        return await self._db(delete, "delete")

    # -- API tokens and the audit log -------------------------------------------------

    async def put_token(self, token: StoredToken) -> None:
        params = (
            token.token_id,
            _text(token.name),
            token.role,
            _dumps(list(token.graphs)),
            token.secret_hash,
            token.peppered,
            token.created_at,
            token.expires_at,
            token.revoked_at,
            token.last_used_at,
        )

        def put(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES ({', '.join(['%s'] * 10)})",
                params,
            )

        await self._db(put, "token write")

    async def get_token(self, token_id: str) -> StoredToken | None:
        if not _storable_id(token_id):
            return None

        def get(conn: psycopg.Connection[Any]) -> Row | None:
            return conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = %s", (token_id,)
            ).fetchone()

        row = await self._db(get, "token read")
        return None if row is None else _token_from_row(row)

    async def list_tokens(self) -> list[StoredToken]:
        def read(conn: psycopg.Connection[Any]) -> list[Row]:
            return conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created_at, token_id"
            ).fetchall()

        return [_token_from_row(r) for r in await self._db(read, "token read")]

    async def count_tokens(self, *, active_at: float | None = None) -> int:
        def count(conn: psycopg.Connection[Any]) -> int:
            if active_at is None:
                row = conn.execute("SELECT count(*) FROM tokens").fetchone()
            else:
                row = conn.execute(
                    "SELECT count(*) FROM tokens WHERE revoked_at IS NULL "
                    "AND (expires_at IS NULL OR expires_at > %s)",
                    (active_at,),
                ).fetchone()
            return int(row[0]) if row is not None else 0

        return await self._db(count, "token read")

    async def revoke_token(self, token_id: str, at: float) -> StoredToken | None:
        if not _storable_id(token_id):
            return None

        def revoke(conn: psycopg.Connection[Any]) -> Row | None:
            conn.execute(
                "UPDATE tokens SET revoked_at = %s WHERE token_id = %s AND revoked_at IS NULL",
                (at, token_id),
            )
            return conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = %s", (token_id,)
            ).fetchone()

        row = await self._db(revoke, "token write")
        return None if row is None else _token_from_row(row)

    async def touch_tokens(self, used: Mapping[str, float]) -> None:
        ids = [i for i in used if _storable_id(i)]
        times = [used[i] for i in ids]

        def touch(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "UPDATE tokens t SET last_used_at = u.at "
                "FROM unnest(%s::text[], %s::float8[]) AS u(token_id, at) "
                "WHERE t.token_id = u.token_id "
                "AND (t.last_used_at IS NULL OR t.last_used_at < u.at)",
                (ids, times),
            )

        if ids:
            await self._db(touch, "token write")

    async def put_ticket(
        self, ticket_hash: str, token_id: str, expires_at: float, *, now: float
    ) -> None:
        def put(conn: psycopg.Connection[Any]) -> None:
            conn.execute("DELETE FROM tickets WHERE expires_at <= %s", (now,))
            conn.execute(
                "INSERT INTO tickets (ticket_hash, token_id, expires_at) VALUES (%s, %s, %s)",
                (ticket_hash, token_id, expires_at),
            )

        await self._db(put, "ticket write")

    async def take_ticket(self, ticket_hash: str, now: float) -> str | None:
        if not _storable_id(ticket_hash):
            return None

        def take(conn: psycopg.Connection[Any]) -> str | None:
            row = conn.execute(
                "DELETE FROM tickets WHERE ticket_hash = %s RETURNING token_id, expires_at",
                (ticket_hash,),
            ).fetchone()
            if row is not None and row[1] <= now:
                return None
            return None if row is None else str(row[0])

        return await self._db(take, "ticket write")

    async def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        rows = [
            (e.ts, _text(e.actor), _text(e.action), _text(e.target), e.status, _text(e.detail))
            for e in entries
        ]

        def add(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO audit (ts, actor, action, target, status, detail) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    rows,
                )

        if rows:
            await self._db(add, "audit write")

    async def read_audit(self, *, after: int = 0, limit: int = 100) -> list[AuditEntry]:
        def read(conn: psycopg.Connection[Any]) -> list[Row]:
            return conn.execute(
                "SELECT seq, ts, actor, action, target, status, detail FROM audit "
                "WHERE seq > %s ORDER BY seq LIMIT %s",
                (max(after, 0), max(limit, 0)),
            ).fetchall()

        return [AuditEntry(*r) for r in await self._db(read, "audit read")]


def parse_url(url: str) -> tuple[str, dict[str, Any]]:
    """Split trioflow's own query parameters (``schema``) off a PostgreSQL URL.

    Returns the URL for libpq and the store's keyword arguments.
    """
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    kept: list[tuple[str, str]] = []
    options: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "schema":
            options["schema"] = value
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), options


_TOKEN_COLUMNS = (
    "token_id, name, role, graphs, secret_hash, peppered, created_at, expires_at, "
    "revoked_at, last_used_at"
)


def _token_from_row(row: Row) -> StoredToken:
    return StoredToken(row[0], row[1], row[2], tuple(_loads(row[3])), row[4], *row[5:10])
