"""``/ui``: the dashboard. Server-rendered pages (Jinja2, autoescaped) and one script.

Pages:

* ``/ui``: the runs, newest first, with a chip per status (its count),
  filters by graph and status, and keyset paging on the store's listing. The
  script swaps in the live part (``?live=1``: chips and table) every
  :data:`LIVE_POLL_S` seconds while the tab is visible.
* ``/ui/runs/{run_id}``: one run. Its header, the graph drawn by Mermaid
  with the run's nodes marked, the state, the log (the last
  :data:`LOG_PAGE` entries, earlier ones on demand, new ones followed over
  ``/sse/logs``), a Cancel button, and for a waiting run a form built from
  the wait's input schema.
* ``/ui/graphs`` and ``/ui/graphs/{graph_id}``: the graphs; one graph's
  picture, document, counts, recent runs and a form to start a run.
* ``/ui/login``: a token into an ``HttpOnly``, ``SameSite=Strict`` cookie
  (``POST /auth/session``), when the server asks for tokens.

Every value from a graph, a state or a log reaches the page through Jinja2's
autoescape or the script's ``textContent``: never as markup. The pages load
no inline script (:data:`CSP`). They act through the public API only, with
the cookie as the credential; a page answers what the API would (the same
404 for a run out of the token's scope), as HTML.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
import trio
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from trioflow import EngineError, RunRecord, RunStatus, StoreError, UnknownGraphError
from trioflow.logs import LogEntry

from . import docs_page
from .auth import Access, Principal, principal_of, role_allows
from .errors import RequestError, engine_error_parts, request_invalid
from .handlers import visible_run
from .schemas import RunsQuery
from .services import services

LIVE_POLL_S = 2.0
"""How often the runs list asks for its live part (the issue's bound: at most every 2 s)."""

RUNS_PAGE = 50
"""Runs per page of ``/ui``."""

LOG_PAGE = 200
"""Log entries a run page shows at first, and per "Load earlier"."""

LOG_KEEP = 2000
"""Most log rows a run page keeps while following; older rows leave the page
(and come back with "Load earlier")."""

STATE_CHARS = 100_000
"""The state shown on a run page is cut at this many characters of JSON."""

DATA_CHARS = 500
"""A log entry's ``data`` is shown cut at this many characters of JSON."""

GRAPH_IDS = 200
"""Graph ids offered in the runs list's filter."""

COUNTS_TTL_S = 1.5
"""The status counts of one filter are shared for this long: a scan of the status
index (4 ms at 100,000 runs), done once per poll period however many tabs poll."""

COUNTS_KEPT = 256
"""Filters whose counts are kept at most."""

GZIP_MIN_BYTES = 1024
"""Pages at least this long are sent gzipped to browsers that take it."""

STATUSES = tuple(s.value for s in RunStatus)

_RUNS_PARAMETERS = frozenset(RunsQuery.model_fields)

CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        # Mermaid puts a <style> element in each diagram it draws; without
        # it the picture has no colours. Scripts stay 'self' only.
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        # The API calls the script makes, and the log over /sse/logs.
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)
"""The ``Content-Security-Policy`` of every ``/ui`` page: no inline script, this origin only."""

_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


# -- formatting ----------------------------------------------------------------------


def _when(ts: float | None) -> str:
    if ts is None or not math.isfinite(ts):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def _iso(ts: float | None) -> str:
    if ts is None or not math.isfinite(ts):
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _clock(ts: float) -> str:
    if not math.isfinite(ts):
        return ""
    return time.strftime("%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def _seconds(span: float) -> str:
    if span < 1:
        return f"{span * 1000:.0f} ms"
    if span < 120:
        return f"{span:.1f} s"
    return f"{span / 60:.1f} min"


def _took(run: RunRecord) -> str:
    """How long a finished run took (an unfinished one: nothing, so a page that
    nothing changed renders the same bytes, and the list's poll swaps nothing)."""
    if run.started_at is None or run.finished_at is None:
        return ""
    return _seconds(max(0.0, run.finished_at - run.started_at))


def _json_text(value: Any, limit: int, indent: int | None = 2) -> tuple[str, int | None]:
    """``value`` as JSON text, cut at ``limit`` characters; and the limit if it was cut."""
    separators = None if indent is not None else (",", ":")  # compact as the script's
    text = json.dumps(value, indent=indent, separators=separators, ensure_ascii=False, default=str)
    if len(text) > limit:
        return text[:limit] + "\n…", limit
    return text, None


def _compact(value: Any) -> str:
    if not value:
        return ""
    return _json_text(value, DATA_CHARS, indent=None)[0]


def _urlpart(value: str) -> str:
    return quote(str(value), safe="")


_env = jinja2.Environment(
    loader=jinja2.PackageLoader("trioflow.web", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(
    when=_when, iso=_iso, clock=_clock, took=_took, compact=_compact, urlpart=_urlpart
)


# -- answers -------------------------------------------------------------------------


async def _render(
    request: Request,
    template: str,
    http_status: int = 200,
    extra_headers: Mapping[str, str] | None = None,
    **context: Any,
) -> Response:
    assets = await docs_page.asset_urls()
    context.setdefault("nav", "")
    context.setdefault("principal", principal_of(request))
    body = _env.get_template(template).render(asset=assets.__getitem__, **context).encode()
    headers = {**_HEADERS, **(extra_headers or {})}
    if len(body) >= GZIP_MIN_BYTES and docs_page.accepts_gzip(
        request.headers.get("accept-encoding")
    ):
        body = gzip.compress(body, compresslevel=6)
        headers.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
    return Response(body, http_status, media_type="text/html; charset=utf-8", headers=headers)


def _login_redirect(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = RedirectResponse("/ui/login?" + urlencode({"next": target}), status_code=303)
    response.headers.update(_HEADERS)
    return response


async def _error_page(request: Request, exc: Exception) -> Response:
    """The HTML page of what the API would answer as JSON (the same status and headers)."""
    if isinstance(exc, RequestError):
        status, code, message, details = exc.status, exc.code, exc.message, exc.details
        headers = exc.headers
    elif isinstance(exc, EngineError):
        status, code, message, details, headers = engine_error_parts(exc)
    else:
        raise exc
    # A document's problems, or a request's invalid fields (web.errors.request_invalid).
    problems = details.get("problems")
    if not isinstance(problems, list):
        errors = details.get("errors")
        problems = [
            {"path": e.get("field", ""), "message": e.get("message", "")}
            for e in (errors if isinstance(errors, list) else [])
            if isinstance(e, Mapping)
        ]
    return await _render(
        request,
        "error.html",
        status,
        headers,
        status=status,
        code=code,
        message=message,
        problems=problems,
    )


Page = Callable[[Request, Principal], Awaitable[Response]]


def _page(endpoint: Page) -> Callable[[Request], Awaitable[Response]]:
    """A page behind the viewer check: no token sends the browser to the login page."""

    async def page(request: Request) -> Response:
        authority = services(request).authority
        try:
            principal = await authority.principal(request, "viewer", f"GET {request.url.path}")
        except RequestError as exc:
            if exc.status == 401:
                return _login_redirect(request)
            return await _error_page(request, exc)
        request.state.principal = principal
        try:
            return await endpoint(request, principal)
        except (RequestError, EngineError) as exc:
            if isinstance(exc, StoreError):
                raise  # 503 with Retry-After, as the API answers it
            return await _error_page(request, exc)

    page.__name__ = endpoint.__name__
    page.__doc__ = endpoint.__doc__
    return page


# -- the runs ------------------------------------------------------------------------

_counts: dict[tuple[str | None, tuple[str, ...] | None], tuple[float, dict[str, int]]] = {}


async def _status_counts(
    request: Request, graph_id: str | None, principal: Principal
) -> dict[str, int]:
    """The runs of each status for a filter, shared for :data:`COUNTS_TTL_S`."""
    key = (graph_id, principal.graphs)
    now = trio.current_time()
    cached = _counts.get(key)
    if cached is not None and now - cached[0] < COUNTS_TTL_S:
        return cached[1]
    counts = await services(request).engine.count_runs(graph_id=graph_id, graphs=principal.graphs)
    if len(_counts) >= COUNTS_KEPT:
        _counts.clear()
    value = {s.value: n for s, n in counts.items()}
    _counts[key] = (now, value)
    return value


async def runs_page(request: Request, principal: Principal) -> Response:
    """``GET /ui``: runs newest first, filtered, paged; ``?live=1``: only the live part."""
    # Only the listing's own parameters: a link may carry others (utm_source=...).
    params = {k: v for k, v in request.query_params.items() if v != "" and k in _RUNS_PARAMETERS}
    try:
        query = RunsQuery.model_validate({"limit": RUNS_PAGE, **params})
    except ValidationError as exc:
        raise request_invalid(exc, "query") from None
    engine = services(request).engine
    status = RunStatus(query.status) if query.status is not None else None
    page = await engine.list_runs(
        graph_id=query.graph_id,
        status=status,
        cursor=query.cursor,
        limit=query.limit,
        graphs=principal.graphs,
    )
    counts = await _status_counts(request, query.graph_id, principal)
    base = {"graph_id": query.graph_id, "status": query.status, "cursor": query.cursor}

    def filter_url(**changes: str | None) -> str:
        merged = {**base, **changes}
        if "status" in changes:
            merged["cursor"] = None  # a new filter starts at the newest run
        kept = {k: v for k, v in merged.items() if v is not None}
        return "/ui" + (f"?{urlencode(kept)}" if kept else "")

    context: dict[str, Any] = {
        "runs": page.items,
        "counts": counts,
        "total": sum(counts.values()),
        "statuses": STATUSES,
        "status": query.status,
        "graph_id": query.graph_id,
        "cursor": query.cursor,
        "next_cursor": page.next_cursor,
        "filter_url": filter_url,
    }
    if request.query_params.get("live") == "1":
        return await _render(request, "runs_live.html", **context)
    graphs = await engine.list_graphs(limit=GRAPH_IDS, graphs=principal.graphs)
    live = {k: v for k, v in base.items() if v is not None}
    live["live"] = "1"
    return await _render(
        request,
        "runs.html",
        nav="runs",
        graph_ids=[g.graph_id for g in graphs.items],
        live_url="/ui?" + urlencode(live),
        **context,
    )


# -- one run -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaitField:
    """One input of a waiting run's form, from a property of its input schema."""

    name: str
    label: str
    kind: str  # string, integer, number, boolean, enum, json
    required: bool
    description: str
    options: list[Any]
    """An enum's values, in order (the form sends the index; the script maps it back)."""
    option_labels: list[str]
    selected: int | None
    """The index of the enum's default, if it is one of its values."""
    default_text: str
    default_json: str
    checked: bool


_SIMPLE = ("string", "integer", "number", "boolean")


def _resolve(spec: Any, root: Mapping[str, Any]) -> Mapping[str, Any]:
    """A property's schema with a local ``$ref`` followed (a few levels) and an optional
    (``anyOf`` of one schema and ``null``, as a Pydantic model's ``X | None``) unwrapped."""
    for _ in range(8):
        if not isinstance(spec, Mapping):
            return {}
        ref = spec.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = root
            for part in ref[2:].split("/"):
                target = target.get(part) if isinstance(target, Mapping) else None
            found = target if isinstance(target, Mapping) else {}
            spec = {**{k: v for k, v in spec.items() if k != "$ref"}, **found}
            continue
        choices = spec.get("anyOf")
        if isinstance(choices, list):
            others = [
                c for c in choices if not (isinstance(c, Mapping) and c.get("type") == "null")
            ]
            if len(others) == 1 and len(others) < len(choices):
                spec = {
                    **{k: v for k, v in spec.items() if k != "anyOf"},
                    **_resolve(others[0], root),
                }
                continue
        return spec
    return {}


def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def wait_fields(schema: Any) -> list[WaitField] | None:
    """The form's fields for an object schema with properties; None: ask for raw JSON.

    Any schema the engine accepts renders: what this cannot make a field of
    becomes a JSON field, and a schema it cannot read becomes one JSON field
    for the whole answer.
    """
    if not isinstance(schema, Mapping) or schema.get("type", "object") != "object":
        return None
    properties = schema.get("properties")
    if not isinstance(properties, Mapping) or not properties:
        return None
    required = schema.get("required")
    names = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
    fields: list[WaitField] = []
    for name, raw in properties.items():
        spec = _resolve(raw, schema)
        kind = spec.get("type")
        options = spec.get("enum")
        if "const" in spec:
            options = [spec["const"]]
        default = spec.get("default")
        if isinstance(options, list) and options:
            kind = "enum"
        elif kind not in _SIMPLE:
            kind = "json"
        options = options if kind == "enum" and isinstance(options, list) else []
        text = ""
        if kind == "string" and isinstance(default, str):
            text = default
        elif kind in ("integer", "number") and type(default) in (int, float):
            text = json.dumps(default)
        fields.append(
            WaitField(
                name=str(name),
                label=str(spec.get("title") or name),
                kind=str(kind),
                required=name in names,
                description=str(spec.get("description") or ""),
                options=options,
                option_labels=[_label(o) for o in options],
                selected=next((i for i, o in enumerate(options) if o == default), None)
                if "default" in spec
                else None,
                default_text=text,
                default_json=json.dumps(default) if "default" in spec else "",
                checked=default is True,
            )
        )
    return fields


def _entries_window(last_seq: int) -> tuple[int, int]:
    """The seqs a run page shows first: the last :data:`LOG_PAGE` up to ``last_seq``."""
    first = max(1, last_seq - LOG_PAGE + 1)
    return first, last_seq


async def run_page(request: Request, principal: Principal) -> Response:
    """``GET /ui/runs/{run_id}``: one run, followed live."""
    engine = services(request).engine
    run = await visible_run(request, engine, request.path_params["run_id"])
    first, last = _entries_window(run.last_seq)
    entries: list[LogEntry] = []
    if last >= first:
        entries = [
            e
            for e in await engine.read_log(run.run_id, after=first - 1, limit=last - first + 1)
            if e.seq <= last
        ]
    mermaid = ""
    no_picture = ""
    try:
        mermaid = await engine.graph_mermaid(run.graph_id, run.run_id)
    except (UnknownGraphError, EngineError) as exc:
        if isinstance(exc, StoreError):
            raise
        no_picture = f"The graph cannot be drawn: {exc.message}"
    state_text, state_cut = _json_text(run.state, STATE_CHARS)
    waiting = run.waiting if isinstance(run.waiting, Mapping) else None
    fields = wait_fields(waiting.get("input_schema")) if waiting is not None else None
    return await _render(
        request,
        "run.html",
        nav="runs",
        run=run,
        entries=entries,
        first_seq=entries[0].seq if entries else run.last_seq + 1,
        log_page=LOG_PAGE,
        log_keep=LOG_KEEP,
        mermaid=mermaid,
        no_picture=no_picture,
        state_text=state_text,
        state_cut=state_cut,
        waiting=waiting,
        wait_fields=fields or [],
        raw_input=fields is None,
        can_run=role_allows(principal.role, "runner"),
    )


# -- graphs --------------------------------------------------------------------------


async def graphs_page(request: Request, principal: Principal) -> Response:
    """``GET /ui/graphs``: graphs in id order, paged."""
    cursor = request.query_params.get("cursor") or None
    if cursor is not None and len(cursor) > 1000:
        raise RequestError(400, "invalid_cursor", "the cursor is too long")
    page = await services(request).engine.list_graphs(
        cursor=cursor, limit=RUNS_PAGE, graphs=principal.graphs
    )
    return await _render(
        request,
        "graphs.html",
        nav="graphs",
        graphs=page.items,
        cursor=cursor,
        next_cursor=page.next_cursor,
    )


async def graph_page(request: Request, principal: Principal) -> Response:
    """``GET /ui/graphs/{graph_id}``: picture, counts, recent runs, document, start form."""
    graph_id = request.path_params["graph_id"]
    if not principal.sees(graph_id):
        raise UnknownGraphError(graph_id)
    engine = services(request).engine
    stored = await engine.get_graph_document(graph_id)
    mermaid = ""
    no_picture = ""
    try:
        mermaid = await engine.graph_mermaid(graph_id)
    except EngineError as exc:
        if isinstance(exc, StoreError):
            raise
        no_picture = f"The graph cannot be drawn: {exc.message}"
    runs = await engine.list_runs(graph_id=graph_id, limit=20)
    counts = await _status_counts(request, graph_id, principal)
    document_text, _ = _json_text(stored.document, STATE_CHARS)
    return await _render(
        request,
        "graph.html",
        nav="graphs",
        graph=stored,
        mermaid=mermaid,
        no_picture=no_picture,
        runs=runs.items,
        counts=counts,
        total=sum(counts.values()),
        statuses=STATUSES,
        document_text=document_text,
        can_run=role_allows(principal.role, "runner"),
    )


# -- login ---------------------------------------------------------------------------


def _safe_next(value: str | None) -> str:
    """Where to go after logging in: a path of this site under /ui, else /ui."""
    if value and value.startswith("/ui") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui"


async def login_page(request: Request) -> Response:
    """``GET /ui/login``: a form for a token (posted by the script to ``POST /auth/session``)."""
    authority = services(request).authority
    return await _render(
        request,
        "login.html",
        required=await authority.required(request),
        next=_safe_next(request.query_params.get("next")),
    )


async def root(request: Request) -> Response:
    """``GET /``: to the dashboard."""
    return RedirectResponse("/ui", status_code=307)


UI_ACCESS: dict[str, Access] = {
    "/": "public",
    "/ui/login": "public",
    "/ui": "viewer",
    "/ui/runs/{run_id}": "viewer",
    "/ui/graphs": "viewer",
    "/ui/graphs/{graph_id}": "viewer",
}
"""What each page needs (a page that needs a token sends a browser without one to log in)."""


def ui_routes() -> list[BaseRoute]:
    """The dashboard's routes (HTML pages, not part of the API document)."""
    endpoints: dict[str, Callable[[Request], Awaitable[Response]]] = {
        "/": root,
        "/ui/login": login_page,
        "/ui": _page(runs_page),
        "/ui/runs/{run_id}": _page(run_page),
        "/ui/graphs": _page(graphs_page),
        "/ui/graphs/{graph_id}": _page(graph_page),
    }
    assert endpoints.keys() == UI_ACCESS.keys()
    return [Route(path, endpoint, methods=["GET"]) for path, endpoint in endpoints.items()]
