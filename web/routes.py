"""The routes table: every endpoint once, with what ``/openapi.json`` says about it.

Routes are data. :func:`starlette_routes` turns the table into Starlette
routes and :mod:`web.openapi` turns the same table into the OpenAPI document,
so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from trioflow import GraphDocument

from . import docs_page, handlers, schemas, streaming

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
    """

    method: str
    path: str
    endpoint: Callable[[Request], Awaitable[Response]]
    operation_id: str
    summary: str
    responses: Mapping[int, tuple[str, Body]]
    tag: str
    body: type[BaseModel] | None = None
    body_example: Any = None
    query: type[BaseModel] | None = None
    headers: Mapping[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    media_type: str = "application/json"


def _errors(*statuses: int) -> dict[int, tuple[str, Body]]:
    text = {
        400: "Malformed JSON, bad cursor or bad header",
        404: "Not found",
        409: "Conflicts with the current state",
        403: "The request's Origin is not allowed",
        413: "Body or state over the configured limit",
        415: "A body without Content-Type: application/json",
        421: "The Host header names a host this server does not serve",
        422: "Request or document invalid (every problem listed)",
        429: "Too many active runs",
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
        body=schemas.SignalRequest,
        body_example={"name": "priority", "updates": {"priority": "high"}},
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
        query=schemas.FollowQuery,
        media_type=EVENT_STREAM,
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
    ),
    Operation(
        "GET",
        "/nodes",
        handlers.list_nodes,
        "listNodes",
        "The live nodes of the store and the runs each executes",
        {200: ("Nodes", schemas.NodeList), **_errors(503)},
        tag="service",
    ),
    Operation(
        "GET",
        "/openapi.json",
        handlers.openapi,
        "openapi",
        "This document",
        {200: ("OpenAPI 3.1", {"type": "object"}), **_errors()},
        tag="service",
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
        media_type="text/html",
    ),
)

WEBSOCKET_PATH = "/ws/logs/{run_id}"

STATIC_PATH = "/static/{path:path}"
"""The /docs page's scripts and styles; not an API operation, so not in /openapi.json."""


def starlette_routes() -> list[BaseRoute]:
    """The Starlette routes of every operation, the WebSocket log stream and the static files."""
    routes: list[BaseRoute] = [
        Route(op.path, op.endpoint, methods=[op.method], name=op.operation_id) for op in OPERATIONS
    ]
    routes.append(WebSocketRoute(WEBSOCKET_PATH, streaming.ws_logs, name="followRunLog"))
    routes.append(Route(STATIC_PATH, docs_page.static_file, methods=["GET"], name="static"))
    return routes
