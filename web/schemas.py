"""Wire schemas: what clients send and what they get back.

These models are the HTTP contract and feed ``/openapi.json``. They are kept
apart from core's domain objects: input models validate requests (every one
forbids unknown keys); output models describe the JSON the handlers build from
``RunRecord.as_dict()`` and ``LogEntry.as_dict()`` (handlers do not round-trip
responses through them, which keeps the hot path lean; the contract tests
check that responses match). The graph document itself is the engine's
:class:`trioflow.GraphDocument`, which already is a wire model.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_PAGE = 500
"""The largest ``limit`` a listing accepts."""

MAX_SEQ = 2**53
"""The largest log seq a client may name (the largest integer every JSON client holds exactly)."""

STATE_LOGS = 1000
"""Log entries in a run answer (``/graph/state``, sync ``/graph/run``) unless ``?logs=`` says."""

MAX_STATE_LOGS = 10_000
"""The largest ``?logs=`` of a run answer; read longer logs with ``/runs/{run_id}/logs``."""

LOG_PAGE = 500
"""Entries per page of ``/runs/{run_id}/logs`` unless ``?limit=`` says."""

MAX_LOG_PAGE = 1000
"""The largest ``?limit=`` of ``/runs/{run_id}/logs``."""

_DIGITS = re.compile(r"[0-9]{1,20}", re.ASCII)


def _decimal(value: Any) -> Any:
    """A query integer is decimal digits only: not ``+3``, ``1_0``, `` 3``, ``3.0`` or ``0x1``."""
    if isinstance(value, str):
        if _DIGITS.fullmatch(value) is None:
            raise ValueError("expected a non-negative decimal integer (digits 0-9 only)")
        return int(value)
    return value


Seq = Annotated[int, BeforeValidator(_decimal), Field(ge=0, le=MAX_SEQ)]
"""A log seq in a query (``?after=``): decimal digits, 0 to 2**53."""

RunStatusName = Literal["pending", "running", "waiting", "completed", "failed", "cancelled"]
TerminalStatusName = Literal["completed", "failed", "cancelled"]
LevelName = Literal["debug", "info", "warning", "error"]

GraphId = Annotated[str, Field(min_length=1, max_length=200)]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _StrictInput(_Input):
    # JSON bodies: no coercion ("true" is not a boolean, 1 is not a string).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# -- requests ------------------------------------------------------------------


class RunRequest(_StrictInput):
    """Body of ``POST /graph/run``."""

    graph_id: GraphId
    initial_state: dict[str, Any] | None = Field(
        default=None, description="The run's first state; a JSON object (default: empty)."
    )
    background: bool = Field(
        default=False,
        description="false: wait and answer the run once it ends, or waits for input (200); "
        "true: answer 202 with the run id at once.",
    )


class ResumeRequest(_StrictInput):
    """Body of ``POST /graph/resume/{run_id}``."""

    input: dict[str, Any] = Field(description="The answer: a JSON object the wait accepts.")
    request_id: Annotated[str | None, Field(min_length=1, max_length=200)] = Field(
        default=None,
        description="The wait's request_id (from run_waiting or the run's waiting): an "
        "answer to an earlier question is refused (409 stale_request).",
    )
    background: bool = Field(
        default=False,
        description="false: answer once the run ends or waits again (200, with its log); "
        "true: answer at once with the run as it left the wait.",
    )


class SignalRequest(_StrictInput):
    """Body of ``POST /graph/signal/{run_id}``."""

    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
    updates: dict[str, Any] = Field(
        default_factory=dict, description="State updates, applied between steps."
    )


class PageQuery(_Input):
    """Query of ``GET /graphs``."""

    cursor: Annotated[str | None, Field(min_length=1, max_length=1000)] = Field(
        default=None, description="next_cursor of the previous page."
    )
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE)] = 50


class RunsQuery(PageQuery):
    """Query of ``GET /runs``."""

    graph_id: GraphId | None = None
    status: RunStatusName | None = None


class FollowQuery(_Input):
    """Query of the log streams (``/ws/logs/{run_id}``, ``/sse/logs/{run_id}``)."""

    after: Seq = Field(default=0, description="Send only entries with seq > after.")


class SSEFollowQuery(FollowQuery):
    """Query of ``/sse/logs/{run_id}``."""

    ticket: Annotated[str, Field(max_length=100)] | None = Field(
        default=None,
        description=(
            "A single-use stream ticket from POST /auth/ticket, for clients that cannot "
            "send an Authorization header (a browser's EventSource). Good for 30 s, once."
        ),
    )


class WebSocketFollowQuery(FollowQuery):
    """Query of ``/ws/logs/{run_id}``."""

    batch: Annotated[int, Field(ge=1, le=500)] = Field(
        default=1,
        description=(
            "1 (default): one {type: log} message per entry, as the specification "
            "says. N > 1: {type: logs, logs: [...]} messages of up to N entries, "
            "as many as are available at once, for followers that must keep up "
            "with fast runs."
        ),
    )


class MermaidQuery(_Input):
    """Query of ``/graph/{graph_id}/mermaid``."""

    run_id: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        default=None, description="Mark this run's visited, current, failed or waiting nodes."
    )


class RunLogsQuery(_Input):
    """Query of ``GET /graph/state/{run_id}`` and ``POST /graph/run``."""

    logs: Annotated[int, BeforeValidator(_decimal), Field(ge=0, le=MAX_STATE_LOGS)] = Field(
        default=STATE_LOGS,
        description="The answer holds at most this many of the run's last log entries; "
        "read a whole log with GET /runs/{run_id}/logs.",
    )


class LogPageQuery(_Input):
    """Query of ``GET /runs/{run_id}/logs``."""

    after: Seq = Field(default=0, description="Only entries with seq > after.")
    limit: Annotated[int, BeforeValidator(_decimal), Field(ge=1, le=MAX_LOG_PAGE)] = LOG_PAGE


# -- responses -----------------------------------------------------------------


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable identifier.")
    message: str
    details: dict[str, Any]


class ErrorResponse(BaseModel):
    """Every error answer has this shape."""

    error: ErrorBody


class LogEntryOut(BaseModel):
    """One run log line. ``seq`` is 1, 2, 3, ... without gaps."""

    seq: int
    ts: float
    level: LevelName
    event: str
    node: str | None
    message: str
    data: dict[str, Any]


class WaitingOut(BaseModel):
    """What a waiting run waits for (kept, ``answered``, until its wait node completes)."""

    node: str
    prompt: str
    input_schema: dict[str, Any] | None = Field(description="What the answer may be.")
    request_id: str = Field(description="Give it back with the answer (optional).")
    deadline: float | None = Field(description="When the wait times out (epoch seconds).")
    answered: bool


class SignalAccepted(BaseModel):
    """Answer to a signal: stored, to be applied between steps."""

    run_id: str
    signal_id: int = Field(description="1, 2, 3, ... per run, in arrival order.")
    name: str


class RunOut(BaseModel):
    """A run as of its last checkpoint."""

    run_id: str
    graph_id: str
    status: RunStatusName
    current_node: str | None
    state: dict[str, Any]
    step: int
    loop_counters: dict[str, int]
    error: dict[str, Any] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    last_seq: int
    attempt: int
    waiting: WaitingOut | None = Field(
        default=None, description="While the run waits for input: what it waits for."
    )


class RunWithLogs(RunOut):
    """A run with the last entries of its log (all of them, up to ``?logs=``, 1,000 by default)."""

    logs: list[LogEntryOut]
    logs_truncated: bool = Field(
        description="true when the log has entries before logs_first_seq that are not here."
    )
    logs_first_seq: int | None = Field(
        description="seq of the first entry in logs (null when logs is empty)."
    )


class LogPage(BaseModel):
    """One page of a run's log, in seq order."""

    run_id: str
    status: RunStatusName
    last_seq: int = Field(description="The run's last seq as of this read.")
    entries: list[LogEntryOut]
    next_after: int | None = Field(
        description="Pass as ?after= for the next page; null when this page reached last_seq."
    )


class RunAccepted(BaseModel):
    """Answer to a background run: poll ``/graph/state/{run_id}`` or follow its log."""

    run_id: str
    graph_id: str
    status: RunStatusName


class GraphCreated(BaseModel):
    graph_id: str
    digest: str = Field(description="sha256 of the normalised document.")
    created: bool = Field(description="false when the identical document was already registered.")
    nodes: int
    edges: int


class GraphSummary(BaseModel):
    graph_id: str
    name: str | None
    digest: str
    created_at: float


class GraphPage(BaseModel):
    items: list[GraphSummary]
    next_cursor: str | None


ToolKind = Literal["sync", "async", "inline"]


class ToolSummary(BaseModel):
    """A registered tool: what a graph node (or a branch condition) may name."""

    name: str = Field(description="The name graphs use in `callable`.")
    kind: ToolKind = Field(
        description="sync: runs in a worker thread; inline: a sync tool run on the event "
        "loop (cheap, non-blocking); async: a coroutine run on the event loop."
    )
    description: str = Field(description="The first line of its docstring (may be empty).")


class ToolPage(BaseModel):
    items: list[ToolSummary]
    next_cursor: str | None


class RunPage(BaseModel):
    items: list[RunOut]
    next_cursor: str | None


class StoreHealthOut(BaseModel):
    ok: bool = Field(description="The store takes writes (and, on PostgreSQL, heartbeats).")
    error: str | None = Field(description="The last error, while failing.")
    since: float | None = Field(description="When it started failing.")


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        description="degraded (with HTTP 503) while the store refuses writes or, on "
        "PostgreSQL, cannot be reached."
    )
    version: str
    active_runs: int
    evaluator: Literal["compiled", "asteval"] = Field(description="The condition evaluator.")
    node: str = Field(description="This server's node id (see GET /nodes).")
    store: StoreHealthOut


class Readiness(BaseModel):
    ready: bool
    reasons: list[str] = Field(
        description="Why not: the store refuses writes or cannot be reached; the server "
        "is draining (shutting down)."
    )


class NodeOut(BaseModel):
    node_id: str
    started_at: float
    heartbeat_at: float = Field(description="Its last heartbeat (epoch seconds).")
    runs: int = Field(description="Runs it executes now.")


class NodeList(BaseModel):
    """The live nodes; on a store one server has alone, that server."""

    node_id: str = Field(description="The node that answered.")
    items: list[NodeOut]


# -- stream messages (WebSocket text frames; SSE data lines) -------------------


class LogMessage(BaseModel):
    type: Literal["log"]
    log: LogEntryOut


class StatusMessage(BaseModel):
    type: Literal["status"]
    status: TerminalStatusName


class ErrorMessage(BaseModel):
    type: Literal["error"]
    error: ErrorBody


# -- access control ------------------------------------------------------------------

TokenRole = Literal["viewer", "runner", "admin"]


class TokenCreate(_StrictInput):
    """Body of ``POST /auth/tokens``."""

    name: Annotated[str, Field(min_length=1, max_length=100)]
    role: TokenRole
    graphs: Annotated[list[Annotated[str, Field(max_length=200)]], Field(max_length=100)] = Field(
        default_factory=lambda: ["*"],
        description="Glob patterns over graph ids (* and ?); default: every graph.",
    )
    expires_in_s: Annotated[float, Field(gt=0, le=10 * 365 * 86400)] | None = Field(
        default=None, description="Seconds until the token expires; default: never."
    )


class TokenOut(BaseModel):
    token_id: str
    name: str
    role: TokenRole
    graphs: list[str]
    state: Literal["active", "revoked", "expired"]
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None


class TokenCreated(TokenOut):
    token: str = Field(description="tf_<id>_<secret>: shown this once, stored nowhere.")


class TokenList(BaseModel):
    items: list[TokenOut]


class Ticket(BaseModel):
    ticket: str
    expires_at: float


class WhoAmI(BaseModel):
    auth_required: bool
    token_id: str | None
    name: str
    role: TokenRole
    graphs: list[str]


class SessionRequest(_StrictInput):
    """Body of ``POST /auth/session``."""

    token: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        description="An API token (tf_<id>_<secret>); kept in an HttpOnly cookie."
    )


class AuditQuery(_Input):
    after: Seq = Field(default=0, description="Entries with seq > after.")
    limit: Annotated[int, BeforeValidator(_decimal), Field(ge=1, le=MAX_PAGE)] = 100


class AuditOut(BaseModel):
    seq: int
    ts: float
    actor: str
    action: str
    target: str
    status: int
    detail: str


class AuditPage(BaseModel):
    items: list[AuditOut]
    next_after: int | None


class PruneRequest(_StrictInput):
    older_than_s: Annotated[float, Field(ge=0, le=100 * 365 * 86400)] = Field(
        description="Delete terminal runs (and their logs) finished more than this long ago."
    )


class PruneResult(BaseModel):
    deleted: int
    finished_before: float
