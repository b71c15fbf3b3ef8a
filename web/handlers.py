"""REST handlers. Each one parses its input, calls the engine once or twice, answers JSON.

Core errors are not caught here: they propagate to :mod:`web.errors`, which
maps them to status codes in one place.
"""

from __future__ import annotations

import bisect
import math
import re
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import trioflow
from trioflow import (
    Engine,
    EngineError,
    GraphValidationError,
    Problem,
    RunRecord,
    RunStatus,
    Tool,
    UnknownGraphError,
    UnknownRunError,
)
from trioflow.stores.base import Cursor

from .auth import principal_of, require_every_graph
from .errors import RequestError, engine_error_response, request_invalid
from .responses import JSON, log_entry
from .schemas import (
    LogPageQuery,
    MermaidQuery,
    PageQuery,
    ResumeRequest,
    RunLogsQuery,
    RunRequest,
    RunsQuery,
    SignalRequest,
)
from .services import services


async def visible_run(request: Request, engine: Engine, run_id: str) -> RunRecord:
    """The run, if the request's token may see its graph; else 404 as for an unknown run."""
    record = await engine.get_run(run_id)
    if not principal_of(request).sees(record.graph_id):
        raise UnknownRunError(run_id)
    return record


async def check_run_visible(request: Request, engine: Engine, run_id: str) -> None:
    """:func:`visible_run` without the read when the token sees every graph."""
    if principal_of(request).graphs is not None:
        await visible_run(request, engine, run_id)


Q = TypeVar("Q", bound=BaseModel)

_READ_PAGE = 1000

# -- input -----------------------------------------------------------------------


# A float over the double range needs an exponent of three digits or a long
# run of digits; JSON with neither cannot hold one, so only bodies that have
# one are walked.
_HUGE_NUMBER = re.compile(rb"[eE][-+]?[0-9]{3}|[0-9]{300}")


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _has_infinity(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if math.isinf(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


async def read_json(request: Request) -> Any:
    """The request body parsed as JSON.

    A body needs a JSON ``Content-Type`` (``application/json`` or
    ``application/*+json``); :class:`web.guard.RequestGuard` refuses the
    others before the handler runs, and this checks again. NaN, Infinity and
    numbers beyond the double range (``1e400``) are not JSON numbers a
    client can mean, and are refused.

    Raises:
        RequestError: 415 for a missing or non-JSON content type, 400 for a
            body that is not JSON.
    """
    body = await request.body()
    if not body:
        raise RequestError(400, "malformed_json", "the request body is empty; expected JSON")
    content_type = request.headers.get("content-type")
    if content_type is None or not _is_json(content_type):
        raise RequestError(
            415, "unsupported_media_type", f"expected application/json, got {content_type!r}"
        )
    try:
        value = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise RequestError(400, "malformed_json", f"the request body is not JSON: {exc}") from None
    if _HUGE_NUMBER.search(body) is not None and _has_infinity(value):
        raise RequestError(
            400, "malformed_json", "the request body holds a number beyond the double range"
        )
    return value


def parse_query(model: type[Q], request: Request) -> Q:
    """The query string validated by ``model``. Raises :class:`RequestError` (422)."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise request_invalid(exc, "query") from None


# -- output ----------------------------------------------------------------------


async def run_with_logs(engine: Engine, record: RunRecord, limit: int) -> dict[str, Any]:
    """The record as a dict with the last ``limit`` log entries up to its checkpoint.

    ``logs_truncated`` says whether earlier entries exist; ``logs_first_seq``
    is the seq of the first entry given. Seqs are gapless from 1, so the
    window is read directly and the answer's size is bounded whatever the
    log's length.
    """
    out = record.as_dict()
    last = record.last_seq
    first = max(1, last - limit + 1)
    logs: list[dict[str, Any]] = []
    after = first - 1
    while after < last:
        size = min(_READ_PAGE, last - after)
        page = await engine.read_log(record.run_id, after=after, limit=size)
        for entry in page:
            if entry.seq > last:
                break
            logs.append(log_entry(entry))
        if not page:
            break
        after = page[-1].seq
    out["logs"] = logs
    out["logs_first_seq"] = logs[0]["seq"] if logs else None
    out["logs_truncated"] = logs[0]["seq"] > 1 if logs else last > 0
    return out


# -- graphs ----------------------------------------------------------------------


async def create_graph(request: Request) -> Response:
    """``POST /graph/create``: 201 when created, 200 when the identical document exists."""
    engine = services(request).engine
    document = await read_json(request)
    if not isinstance(document, dict):
        raise GraphValidationError([Problem("invalid_value", "$", "a graph must be a JSON object")])
    existed = False
    graph_id = document.get("id")
    principal = principal_of(request)
    if isinstance(graph_id, str) and not principal.sees(graph_id):
        raise RequestError(
            403,
            "out_of_scope",
            f"this token may not register the graph {graph_id[:200]!r}: it is outside "
            f"the token's graph scopes",
            {"graphs": list(principal.graphs or ())},
        )
    if isinstance(graph_id, str):
        try:
            await engine.get_graph_document(graph_id)
            existed = True
        except UnknownGraphError:
            pass
    graph = await engine.register_graph(document)
    edges = sum(len(o.conditional) + (o.sequential is not None) for o in graph.outgoing.values())
    body = {
        "graph_id": graph.id,
        "digest": graph.digest,
        "created": not existed,
        "nodes": len(graph.nodes),
        "edges": edges,
    }
    return JSON(
        body, status_code=200 if existed else 201, headers={"Location": f"/graph/{graph.id}"}
    )


# One member of an If-None-Match list (RFC 9110, 8.8.3 and 5.6.1): an entity
# tag, W/ marking a weak one, or nothing (lists may hold empty members).
_LIST_MEMBER = re.compile(r'[ \t]*(?:(?:W/)?("[\x21\x23-\x7e\x80-\xff]*"))?[ \t]*(,|$)')


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Whether an ``If-None-Match`` value matches ``etag`` (RFC 9110, 13.1.2).

    The weak comparison: ``W/"x"`` and ``"x"`` match each other. ``*`` alone
    matches any current representation. A list matches if one member does.
    A malformed value matches nothing, so the answer is the full one.
    """
    if if_none_match.strip(" \t") == "*":
        return True
    opaque = etag.removeprefix("W/")
    tags: list[str] = []
    pos, end = 0, len(if_none_match)
    while pos < end:
        member = _LIST_MEMBER.match(if_none_match, pos)
        if member is None or member.end() == pos:
            return False
        if member.group(1) is not None:
            tags.append(member.group(1))
        pos = member.end()
    return opaque in tags


def _fixed_graph_routes(request: Request) -> dict[str, str]:
    """``/graph/NAME`` paths with a route of their own -> their methods (``"POST"``).

    ``GET /graph/{graph_id}`` would otherwise take ``GET /graph/create`` for
    the graph ``create``.
    """
    fixed: dict[str, str] | None = getattr(request.app.state, "fixed_graph_routes", None)
    if fixed is None:
        fixed = {}
        for route in request.app.routes:
            if isinstance(route, Route) and route.path.startswith("/graph/"):
                name = route.path.removeprefix("/graph/")
                if "/" not in name and "{" not in name:
                    methods = sorted(m for m in route.methods or () if m != "HEAD")
                    fixed[name] = ", ".join(methods)
        request.app.state.fixed_graph_routes = fixed
    return fixed


async def get_graph(request: Request) -> Response:
    """``GET /graph/{graph_id}``: the stored (normalised) document; ``ETag`` is its digest.

    ``If-None-Match`` with the current tag (or ``*``) answers 304 without a
    body. A fixed path such as ``/graph/create`` answers 405 with its
    ``Allow``, not "graph 'create' not found".
    """
    graph_id = request.path_params["graph_id"]
    allow = _fixed_graph_routes(request).get(graph_id)
    if allow is not None:
        raise HTTPException(
            405,
            f"{request.method} is not allowed on /graph/{graph_id}; use {allow}",
            headers={"Allow": allow},
        )
    if not principal_of(request).sees(graph_id):
        raise UnknownGraphError(graph_id)
    stored = await services(request).engine.get_graph_document(graph_id)
    etag = f'"{stored.digest}"'
    conditions = request.headers.getlist("if-none-match")
    if conditions and etag_matches(", ".join(conditions), etag):
        return Response(status_code=304, headers={"ETag": etag})
    return JSON(stored.document, headers={"ETag": etag})


async def graph_mermaid(request: Request) -> Response:
    """``GET /graph/{graph_id}/mermaid``: the graph as a Mermaid flowchart (text/plain).

    ``?run_id=`` marks that run's visited, current, failed or waiting nodes.
    """
    graph_id = request.path_params["graph_id"]
    principal = principal_of(request)
    if not principal.sees(graph_id):
        raise UnknownGraphError(graph_id)
    query = parse_query(MermaidQuery, request)
    engine = services(request).engine
    if query.run_id is not None:
        run = await visible_run(request, engine, query.run_id)
        if run.graph_id != graph_id:
            raise RequestError(
                422,
                "request_invalid",
                f"run {query.run_id!r} is a run of graph {run.graph_id!r}, not {graph_id!r}",
                {"run_graph_id": run.graph_id},
            )
    text = await engine.graph_mermaid(graph_id, query.run_id)
    return Response(text, media_type="text/plain; charset=utf-8")


async def list_graphs(request: Request) -> Response:
    """``GET /graphs``: graphs in id order, one page."""
    query = parse_query(PageQuery, request)
    page = await services(request).engine.list_graphs(
        cursor=query.cursor, limit=query.limit, graphs=principal_of(request).graphs
    )
    items = [
        {
            "graph_id": g.graph_id,
            "name": g.document.get("name"),
            "digest": g.digest,
            "created_at": g.created_at,
        }
        for g in page.items
    ]
    return JSON({"items": items, "next_cursor": page.next_cursor})


# -- tools -----------------------------------------------------------------------


def tool_kind(tool: Tool) -> str:
    """``async``, ``inline`` (a sync tool run on the event loop) or ``sync`` (in a thread)."""
    return "async" if tool.is_async else "inline" if tool.inline else "sync"


async def list_tools(request: Request) -> Response:
    """``GET /tools``: the registered tools in name order, one page."""
    query = parse_query(PageQuery, request)
    tools = services(request).engine.registry.tools()
    names = sorted(tools)
    start = 0
    if query.cursor is not None:
        _, after = Cursor.decode(query.cursor)  # InvalidCursorError: 400
        start = bisect.bisect_right(names, after)
    page = names[start : start + query.limit]
    more = start + len(page) < len(names)
    items = [
        {"name": name, "kind": tool_kind(tools[name]), "description": tools[name].description}
        for name in page
    ]
    next_cursor = Cursor.encode(0, page[-1]) if more and page else None
    return JSON({"items": items, "next_cursor": next_cursor})


# -- runs ------------------------------------------------------------------------


async def run_graph(request: Request) -> Response:
    """``POST /graph/run``: 200 with the finished run, or 202 at once when ``background``.

    Both carry ``X-Run-Id`` and ``Location: /graph/state/{run_id}``. The sync
    answer is not streamed: its status is the run's outcome (200, or 503 when
    the run stalls), known only at its end, so the headers come with it.
    """
    engine = services(request).engine
    raw = await read_json(request)
    try:
        body = RunRequest.model_validate(raw)
    except ValidationError as exc:
        raise request_invalid(exc, "body") from None
    query = parse_query(RunLogsQuery, request)
    principal = principal_of(request)
    if not principal.sees(body.graph_id):
        raise UnknownGraphError(body.graph_id)
    services(request).authority.limit(principal, run_start=True)
    record = await engine.start_run(body.graph_id, body.initial_state)
    # Every answer about a started run names it, errors included (a run that
    # stalls answers 503): a client can always come back to it.
    run_headers = {"X-Run-Id": record.run_id, "Location": f"/graph/state/{record.run_id}"}
    if body.background:
        accepted = {
            "run_id": record.run_id,
            "graph_id": record.graph_id,
            "status": record.status.value,
        }
        return JSON(accepted, status_code=202, headers=run_headers)
    try:
        final = await engine.wait_stop(record.run_id)  # ends, or waits for input
        answer = await run_with_logs(engine, final, query.logs)
    except EngineError as exc:
        response = engine_error_response(exc)
        response.headers.update(run_headers)
        return response
    return JSON(answer, headers=run_headers)


async def run_state(request: Request) -> Response:
    """``GET /graph/state/{run_id}``: the run record and the last ``?logs=`` entries of its log."""
    query = parse_query(RunLogsQuery, request)
    engine = services(request).engine
    record = await visible_run(request, engine, request.path_params["run_id"])
    return JSON(await run_with_logs(engine, record, query.logs))


async def run_logs(request: Request) -> Response:
    """``GET /runs/{run_id}/logs``: one page of the log after ``?after=``, with the next cursor."""
    query = parse_query(LogPageQuery, request)
    engine = services(request).engine
    record = await visible_run(request, engine, request.path_params["run_id"])
    last = record.last_seq
    entries: list[dict[str, Any]] = []
    if query.after < last:
        page = await engine.read_log(
            record.run_id, after=query.after, limit=min(query.limit, last - query.after)
        )
        entries = [log_entry(e) for e in page if e.seq <= last]
    next_after = entries[-1]["seq"] if entries and entries[-1]["seq"] < last else None
    return JSON(
        {
            "run_id": record.run_id,
            "status": record.status.value,
            "last_seq": last,
            "entries": entries,
            "next_after": next_after,
        }
    )


async def cancel_run(request: Request) -> Response:
    """``POST /graph/cancel/{run_id}``: the cancelled run; 409 if it already ended otherwise."""
    engine = services(request).engine
    run_id = request.path_params["run_id"]
    await check_run_visible(request, engine, run_id)
    record = await engine.cancel(run_id)
    return JSON(record.as_dict())


async def resume_run(request: Request) -> Response:
    """``POST /graph/resume/{run_id}``: give a waiting run its input; 200 with the run."""
    engine = services(request).engine
    run_id = request.path_params["run_id"]
    raw = await read_json(request)
    try:
        body = ResumeRequest.model_validate(raw)
    except ValidationError as exc:
        raise request_invalid(exc, "body") from None
    query = parse_query(RunLogsQuery, request)
    await check_run_visible(request, engine, run_id)
    resumed = await engine.resume(run_id, body.input, request_id=body.request_id)
    headers = {"X-Run-Id": run_id, "Location": f"/graph/state/{run_id}"}
    if body.background:
        return JSON(resumed.as_dict(), headers=headers)
    try:
        stopped = await engine.wait_stop(run_id)
        answer = await run_with_logs(engine, stopped, query.logs)
    except EngineError as exc:
        response = engine_error_response(exc)
        response.headers.update(headers)
        return response
    return JSON(answer, headers=headers)


async def signal_run(request: Request) -> Response:
    """``POST /graph/signal/{run_id}``: 202 once the signal is stored."""
    engine = services(request).engine
    run_id = request.path_params["run_id"]
    raw = await read_json(request)
    try:
        body = SignalRequest.model_validate(raw)
    except ValidationError as exc:
        raise request_invalid(exc, "body") from None
    await check_run_visible(request, engine, run_id)
    stored = await engine.signal(run_id, body.name, body.updates)
    accepted = {"run_id": run_id, "signal_id": stored.signal_id, "name": stored.name}
    return JSON(accepted, status_code=202, headers={"Location": f"/graph/state/{run_id}"})


async def list_runs(request: Request) -> Response:
    """``GET /runs``: runs newest first, filtered by graph and status, one page."""
    query = parse_query(RunsQuery, request)
    status = RunStatus(query.status) if query.status is not None else None
    page = await services(request).engine.list_runs(
        graph_id=query.graph_id,
        status=status,
        cursor=query.cursor,
        limit=query.limit,
        graphs=principal_of(request).graphs,
    )
    return JSON({"items": [r.as_dict() for r in page.items], "next_cursor": page.next_cursor})


# -- service ---------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    """``GET /healthz``: 200 while the process serves and its store takes writes.

    While store writes fail, 503 with ``status: "degraded"`` and what failed;
    it never waits for the store.
    """
    engine = services(request).engine
    health = engine.store_health()
    body: dict[str, Any] = {
        "status": "ok" if health.ok else "degraded",
        "version": trioflow.__version__,
        "active_runs": engine.active_runs,
        "evaluator": engine.evaluator,
        "node": engine.node_id,
        "store": {"ok": health.ok, "error": health.error, "since": health.since},
    }
    return JSON(body, status_code=200 if health.ok else 503)


async def readyz(request: Request) -> Response:
    """``GET /readyz``: 200 while this server should get traffic; 503 with the reasons
    while its store refuses writes or it is shutting down. Never waits for the store."""
    svc = services(request)
    reasons = []
    health = svc.engine.store_health()
    if not health.ok:
        reasons.append(f"store: {health.error}")
    if svc.lifecycle.is_draining or svc.engine.stopping:
        reasons.append("draining: the server is shutting down")
    return JSON({"ready": not reasons, "reasons": reasons}, status_code=503 if reasons else 200)


async def list_nodes(request: Request) -> Response:
    """``GET /nodes``: the live nodes of the store, with the runs each executes."""
    engine = services(request).engine
    nodes = await engine.nodes()
    items = [
        {
            "node_id": n.node_id,
            "started_at": n.started_at,
            "heartbeat_at": n.heartbeat_at,
            "runs": n.runs,
        }
        for n in nodes
    ]
    return JSON({"node_id": engine.node_id, "items": items})


async def metrics(request: Request) -> Response:
    """``GET /metrics``: the Prometheus text format (see :mod:`web.metrics`).

    Its labels name every graph, so a token limited to some graphs gets 403.
    """
    from .metrics import CONTENT_TYPE

    require_every_graph(
        principal_of(request),
        "metrics name every graph: they need a token for every graph (scope *)",
    )
    svc = services(request)
    await svc.metrics.count_unfinished(svc.engine)
    return Response(svc.metrics.text(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    """``GET /openapi.json``: built once when the app is created."""
    return Response(request.app.state.openapi, media_type="application/json")
