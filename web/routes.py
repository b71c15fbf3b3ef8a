"""The routes table: every endpoint once, with what ``/openapi.json`` says about it.

Routes are data. :func:`starlette_routes` turns the table into Starlette
routes and :mod:`web.openapi` turns the same table into the OpenAPI document,
so the two cannot drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from trioflow import EngineError, GraphDocument

from . import auth_handlers, docs_page, handlers, schemas, streaming, ui
from .auth import Access
from .errors import RequestError, engine_status
from .services import services

Body = type[BaseModel] | dict[str, Any] | None
"""A response body: a wire model, a raw JSON schema (``{}`` = any JSON), or nothing."""

EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True, slots=True)
class Operation:
    """One HTTP endpoint.

    Attributes:
        responses: status -> (description, body schema). Error statuses use
            :class:`~web.schemas.ErrorResponse` unless given otherwise.
        body: the request body model (``application/json``).
        query: the query string model.
        headers: request headers read: name -> (description, JSON schema).
        media_type: of the success responses.
        access: what a caller needs (``public``, or the least token role:
            ``viewer``, ``runner``, ``admin``); required, so no endpoint
            ships without a decision.
        tickets: a stream ticket (``?ticket=``) is accepted instead of the
            ``Authorization`` header (EventSource cannot send headers).
    """

    method: str
    path: str
    endpoint: Callable[[Request], Awaitable[Response]]
    operation_id: str
    summary: str
    responses: Mapping[int, tuple[str, Body]]
    tag: str
    access: Access
    body: type[BaseModel] | None = None
    body_example: Any = None
    query: type[BaseModel] | None = None
    headers: Mapping[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    media_type: str = "application/json"
    tickets: bool = False


def _errors(*statuses: int) -> dict[int, tuple[str, Body]]:
    text = {
        400: "Malformed JSON, bad cursor or bad header",
        404: "Not found",
        409: "Conflicts with the current state",
        403: "The token's role is too low, or the request's Origin is not allowed",
        413: "Body or state over the configured limit",
        415: "A body without Content-Type: application/json",
        421: "The Host header names a host this server does not serve",
        422: "Request or document invalid (every problem listed)",
        401: "No API token, or one that is unknown, revoked or expired (WWW-Authenticate)",
        429: "Too many active runs, or this token is over its rate (Retry-After)",
        503: "The store cannot be reached or refuses writes (store_error)",
    }
    return {s: (text[s], schemas.ErrorResponse) for s in (*statuses, *GUARDED)}


GUARDED = (403, 421)
"""Every route may answer these (web.guard: Host and Origin checks)."""


_SPEC_GRAPH: dict[str, Any] = {
    "id": "code-review-a",
    "name": "Code Review Loop",
    "start_node": "submit",
    "nodes": [
        {"id": "submit", "callable": "tools.noop"},
        {"id": "review", "callable": "tools.noop"},
        {"id": "fix", "callable": "tools.noop"},
        {"id": "approve", "callable": "tools.approve"},
    ],
    "edges": [
        {"from": "submit", "to": "review", "type": "sequential"},
        {
            "from": "review",
            "to": "approve",
            "type": "branch",
            "condition": {"expression": "context.get('issues_open', 0) == 0"},
        },
        {
            "from": "review",
            "to": "fix",
            "type": "branch",
            "condition": {"expression": "context.get('issues_open', 0) > 0"},
        },
        {
            "from": "fix",
            "to": "review",
            "type": "loop",
            "loop": {"max_iterations": 3, "until_expression": "context.get('issues_open', 0) == 0"},
        },
    ],
}

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST",
        "/graph/create",
        handlers.create_graph,
        "createGraph",
        "Register a graph document (idempotent for an identical document)",
        {
            201: ("Registered", schemas.GraphCreated),
            200: ("The identical document was already registered", schemas.GraphCreated),
            **_errors(400, 409, 413, 415, 422),
        },
        tag="graphs",
        access="admin",
        body=GraphDocument,
        body_example=_SPEC_GRAPH,
    ),
    Operation(
        "GET",
        "/graphs",
        handlers.list_graphs,
        "listGraphs",
        "Graphs in id order, paginated",
        {200: ("One page", schemas.GraphPage), **_errors(400, 422)},
        tag="graphs",
        access="viewer",
        query=schemas.PageQuery,
    ),
    Operation(
        "GET",
        "/tools",
        handlers.list_tools,
        "listTools",
        "Registered tools in name order (what a graph may name), paginated",
        {200: ("One page", schemas.ToolPage), **_errors(400, 422)},
        tag="graphs",
        access="viewer",
        query=schemas.PageQuery,
    ),
    Operation(
        "POST",
        "/graph/run",
        handlers.run_graph,
        "runGraph",
        "Start a run; wait for it unless background",
        {
            200: ("The finished run with the last ?logs= entries of its log", schemas.RunWithLogs),
            202: ("Started in the background", schemas.RunAccepted),
            503: (
                "The store refuses writes (store_error), the run stalled (run_stalled), or "
                "the server is stopping (engine_stopping)",
                schemas.ErrorResponse,
            ),
            **_errors(400, 404, 413, 415, 422, 429),
        },
        tag="runs",
        access="runner",
        body=schemas.RunRequest,
        query=schemas.RunLogsQuery,
        body_example={
            "graph_id": "code-review-a",
            "initial_state": {"issues_open": 1},
            "background": False,
        },
    ),
    Operation(
        "GET",
        "/graph/state/{run_id}",
        handlers.run_state,
        "getRunState",
        "A run's record and the last ?logs= entries of its log (1,000 by default)",
        {200: ("The run", schemas.RunWithLogs), **_errors(404, 422)},
        tag="runs",
        access="viewer",
        query=schemas.RunLogsQuery,
    ),
    Operation(
        "POST",
        "/graph/cancel/{run_id}",
        handlers.cancel_run,
        "cancelRun",
        "Cancel a pending or running run (idempotent once cancelled)",
        {200: ("The cancelled run", schemas.RunOut), **_errors(404, 409, 413, 415)},
        tag="runs",
        access="runner",
    ),
    Operation(
        "POST",
        "/graph/resume/{run_id}",
        handlers.resume_run,
        "resumeRun",
        "Give a run that waits for input its answer; it goes on at once",
        {
            200: (
                "The run once it ends or waits again (background: the run as it left the wait)",
                schemas.RunWithLogs,
            ),
            409: (
                "The run does not wait (or another answer won), or request_id is not "
                "the current wait's (stale_request)",
                schemas.ErrorResponse,
            ),
            422: (
                "The input does not fit the wait (every problem, with its path: "
                "input_invalid), or the state model rejects it",
                schemas.ErrorResponse,
            ),
            **_errors(400, 404, 413, 415, 429),
        },
        tag="runs",
        access="runner",
        body=schemas.ResumeRequest,
        body_example={"input": {"approved": True, "comment": "looks good"}},
        query=schemas.RunLogsQuery,
    ),
    Operation(
        "POST",
        "/graph/signal/{run_id}",
        handlers.signal_run,
        "signalRun",
        "Send a run state updates, applied between steps in arrival order",
        {
            202: ("Stored; the run applies it before its next step", schemas.SignalAccepted),
            409: ("The run has ended", schemas.ErrorResponse),
            **_errors(400, 404, 413, 415, 422),
        },
        tag="runs",
        access="runner",
        body=schemas.SignalRequest,
        body_example={"name": "priority", "updates": {"priority": "high"}},
    ),
    Operation(
        "GET",
        "/graph/{graph_id}/mermaid",
        handlers.graph_mermaid,
        "getGraphMermaid",
        "The graph as a Mermaid flowchart; ?run_id= marks a run's progress",
        {
            200: ("Mermaid text", {"type": "string"}),
            422: ("The run is not one of this graph's, or a bad query", schemas.ErrorResponse),
            **_errors(404),
        },
        tag="graphs",
        access="viewer",
        query=schemas.MermaidQuery,
        media_type="text/plain",
    ),
    # Listed after the fixed /graph/... routes: Starlette matches in table order.
    Operation(
        "GET",
        "/graph/{graph_id}",
        handlers.get_graph,
        "getGraph",
        "The stored, normalised graph document",
        {
            200: ("The document", GraphDocument),
            304: ("Not modified, no body: If-None-Match holds the current ETag (or *)", None),
            405: (
                "A fixed path such as /graph/create or /graph/run (Allow names its method)",
                schemas.ErrorResponse,
            ),
            **_errors(404),
        },
        tag="graphs",
        access="viewer",
        headers={
            "If-None-Match": (
                "ETags the client holds (RFC 9110, weak comparison; *)",
                {"type": "string"},
            )
        },
    ),
    Operation(
        "GET",
        "/runs",
        handlers.list_runs,
        "listRuns",
        "Runs newest first, filtered, paginated",
        {200: ("One page", schemas.RunPage), **_errors(400, 422)},
        tag="runs",
        access="viewer",
        query=schemas.RunsQuery,
    ),
    Operation(
        "GET",
        "/runs/{run_id}/logs",
        handlers.run_logs,
        "getRunLogs",
        "One page of a run's log after ?after=, in seq order; next_after is the next cursor",
        {200: ("One page", schemas.LogPage), **_errors(404, 422)},
        tag="runs",
        access="viewer",
        query=schemas.LogPageQuery,
    ),
    Operation(
        "GET",
        "/sse/logs/{run_id}",
        streaming.sse_logs,
        "streamRunLog",
        "A run's log as Server-Sent Events: replay, live tail, final status",
        {
            200: ("Events `log` (id = seq) then one `status`", {"type": "string"}),
            204: (
                "No body: the run has ended and has no entry after Last-Event-ID (or "
                "?after=), so an EventSource stops reconnecting",
                None,
            ),
            **_errors(400, 404, 422),
        },
        tag="runs",
        access="viewer",
        query=schemas.FollowQuery,
        media_type=EVENT_STREAM,
        tickets=True,
        headers={
            "Last-Event-ID": ("Resume after this seq (wins over ?after=)", {"type": "string"})
        },
    ),
    Operation(
        "GET",
        "/healthz",
        handlers.healthz,
        "health",
        "Liveness and store health",
        {
            200: ("Serving", schemas.Health),
            503: ("Serving, but the store refuses writes or cannot be reached", schemas.Health),
            **_errors(),
        },
        tag="service",
        access="public",
    ),
    Operation(
        "GET",
        "/metrics",
        handlers.metrics,
        "metrics",
        "Prometheus metrics: runs, steps, checkpoint commits, HTTP requests, followers",
        {200: ("The Prometheus text format", {"type": "string"}), **_errors()},
        tag="service",
        access="viewer",
        media_type="text/plain",
    ),
    Operation(
        "GET",
        "/readyz",
        handlers.readyz,
        "ready",
        "Readiness: the store takes writes and the server is not shutting down",
        {
            200: ("Ready for traffic", schemas.Readiness),
            503: ("Not ready, with the reasons", schemas.Readiness),
            **_errors(),
        },
        tag="service",
        access="public",
    ),
    Operation(
        "GET",
        "/nodes",
        handlers.list_nodes,
        "listNodes",
        "The live nodes of the store and the runs each executes",
        {200: ("Nodes", schemas.NodeList), **_errors(503)},
        tag="service",
        access="viewer",
    ),
    Operation(
        "GET",
        "/openapi.json",
        handlers.openapi,
        "openapi",
        "This document",
        {200: ("OpenAPI 3.1", {"type": "object"}), **_errors()},
        tag="service",
        access="public",
    ),
    Operation(
        "GET",
        "/docs",
        docs_page.docs,
        "docs",
        "This API as an interactive page (Swagger UI, served by this server)",
        {
            200: ("An HTML page; its scripts and styles are under /static/", {"type": "string"}),
            **_errors(),
        },
        tag="service",
        access="public",
        media_type="text/html",
    ),
)

AUTH_OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST",
        "/auth/session",
        auth_handlers.open_session,
        "openSession",
        "Log a browser in: the token goes into an HttpOnly, SameSite=Strict cookie",
        {200: ("The principal", schemas.WhoAmI), **_errors(400, 401, 413, 415, 422, 429)},
        tag="auth",
        access="public",
        body=schemas.SessionRequest,
    ),
    Operation(
        "POST",
        "/auth/logout",
        auth_handlers.close_session,
        "closeSession",
        "Log a browser out: its session cookie is removed",
        {204: ("Logged out", None), **_errors()},
        tag="auth",
        access="public",
    ),
    Operation(
        "GET",
        "/auth/whoami",
        auth_handlers.whoami,
        "whoAmI",
        "The token this request carries, as the server sees it",
        {200: ("The principal", schemas.WhoAmI), **_errors(401)},
        tag="auth",
        access="viewer",
    ),
    Operation(
        "POST",
        "/auth/ticket",
        auth_handlers.issue_ticket,
        "issueTicket",
        "A single-use ticket (30 s) for /sse/logs/{run_id}?ticket= (EventSource sends no headers)",
        {201: ("The ticket", schemas.Ticket), **_errors(400, 401, 429)},
        tag="auth",
        access="viewer",
    ),
    Operation(
        "GET",
        "/auth/tokens",
        auth_handlers.list_tokens,
        "listTokens",
        "Every API token, without secrets (an admin token for every graph)",
        {200: ("Tokens", schemas.TokenList), **_errors(401, 429)},
        tag="auth",
        access="admin",
    ),
    Operation(
        "POST",
        "/auth/tokens",
        auth_handlers.create_token,
        "createToken",
        "Create an API token; its text is in this answer only",
        {201: ("Created", schemas.TokenCreated), **_errors(400, 401, 413, 415, 422, 429)},
        tag="auth",
        access="admin",
        body=schemas.TokenCreate,
        body_example={"name": "ci", "role": "runner", "graphs": ["team-a.*"]},
    ),
    Operation(
        "POST",
        "/auth/tokens/{token_id}/revoke",
        auth_handlers.revoke_token,
        "revokeToken",
        "Revoke a token (every node refuses it within 2 s)",
        {200: ("The revoked token", schemas.TokenOut), **_errors(401, 404, 413, 415, 429)},
        tag="auth",
        access="admin",
    ),
    Operation(
        "GET",
        "/auth/audit",
        auth_handlers.read_audit,
        "readAudit",
        "The audit log: every admin action and every refusal for a role too low",
        {200: ("One page", schemas.AuditPage), **_errors(401, 422, 429)},
        tag="auth",
        access="admin",
        query=schemas.AuditQuery,
    ),
    Operation(
        "POST",
        "/runs/prune",
        auth_handlers.prune_runs,
        "pruneRuns",
        "Delete terminal runs finished more than older_than_s ago, with their logs",
        {200: ("Deleted", schemas.PruneResult), **_errors(400, 401, 413, 415, 422, 429)},
        tag="runs",
        access="admin",
        body=schemas.PruneRequest,
        body_example={"older_than_s": 2592000},
    ),
)

ALL_OPERATIONS: tuple[Operation, ...] = OPERATIONS[:-3] + AUTH_OPERATIONS + OPERATIONS[-3:]
"""Every HTTP operation, in matching order (the service ones, public, last)."""

WEBSOCKET_PATH = "/ws/logs/{run_id}"
WEBSOCKET_ACCESS: Access = "viewer"
"""What the WebSocket log stream needs (checked in :func:`web.streaming.ws_logs`)."""

STATIC_PATH = "/static/{path:path}"
"""The /docs page's scripts and styles; not an API operation, so not in /openapi.json."""


def error_status(exc: Exception) -> int:
    """The status the app's error handlers (web.errors) answer ``exc`` with."""
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, EngineError):
        return engine_status(exc)
    if isinstance(exc, HTTPException):
        return exc.status_code
    return 500


def measured(
    op: Operation, endpoint: Callable[[Request], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    """``endpoint`` counted in the metrics: its status (errors included) and latency."""
    name = op.operation_id

    async def measure(request: Request) -> Response:
        began = time.perf_counter()
        status = 500
        try:
            response = await endpoint(request)
            status = response.status_code
            return response
        except Exception as exc:
            status = error_status(exc)
            raise
        finally:
            services(request).metrics.request(name, status, time.perf_counter() - began)

    measure.__name__ = getattr(endpoint, "__name__", name)
    measure.__doc__ = endpoint.__doc__
    return measure


def guarded(op: Operation) -> Callable[[Request], Awaitable[Response]]:
    """``op``'s endpoint behind its access check, rate limit and audit.

    A public operation is served as is. Any other: the caller's token must
    have at least ``op.access``; the request then counts against the
    token's rate. A refusal for a role too low, and every admin operation,
    whatever its outcome, go to the audit log.
    """
    endpoint = op.endpoint
    needed = op.access
    if needed == "public":
        return endpoint
    admin = needed == "admin"
    action = f"{op.method} {op.path}"

    async def guard(request: Request) -> Response:
        authority = services(request).authority
        ticket = request.query_params.get("ticket") if op.tickets else None
        if ticket is not None and "authorization" not in request.headers:
            principal = (
                await authority.redeem_ticket(ticket)
                if await authority.required()
                else await authority.principal(request, needed, action)
            )
        else:
            principal = await authority.principal(request, needed, action)
        request.state.principal = principal
        if not admin:
            return await endpoint(request)
        status = 500
        try:
            response = await endpoint(request)
            status = response.status_code
            return response
        except Exception as exc:
            status = error_status(exc)
            raise
        finally:
            target = getattr(request.state, "audit_target", None) or request.url.path
            with trio.CancelScope(shield=True):
                await authority.audit(principal, action, target, status)

    guard.__name__ = getattr(endpoint, "__name__", op.operation_id)
    guard.__doc__ = endpoint.__doc__
    return guard


def starlette_routes() -> list[BaseRoute]:
    """The Starlette routes of every operation, the WebSocket log stream and the static files."""
    routes: list[BaseRoute] = [
        Route(op.path, measured(op, guarded(op)), methods=[op.method], name=op.operation_id)
        for op in ALL_OPERATIONS
    ]
    routes.append(WebSocketRoute(WEBSOCKET_PATH, streaming.ws_logs, name="followRunLog"))
    routes.append(Route(STATIC_PATH, docs_page.static_file, methods=["GET"], name="static"))
    routes.extend(ui.ui_routes())
    return routes
