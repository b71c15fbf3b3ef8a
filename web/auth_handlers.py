"""Handlers of the access-control endpoints: who am I, stream tickets, tokens, audit, prune."""

from __future__ import annotations

import time
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from .auth import (
    SESSION_COOKIE,
    audit_view,
    make_token,
    principal_of,
    principal_view,
    require_every_graph,
    token_view,
)
from .errors import RequestError, request_invalid
from .handlers import parse_query, read_json
from .responses import JSON
from .schemas import AuditQuery, PruneRequest, SessionRequest, TokenCreate
from .services import services


async def whoami(request: Request) -> Response:
    """``GET /auth/whoami``: the token the request carries, as the server sees it."""
    required = await services(request).authority.required()
    return JSON(principal_view(principal_of(request), required))


async def open_session(request: Request) -> Response:
    """``POST /auth/session``: check a token and keep it in the page session's cookie.

    The cookie is ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no
    other site's page sends it) and ``Secure`` on https; it has no expiry of
    its own (it ends with the browser session; the token's expiry and
    revocation apply as for a header). Every endpoint takes it when a
    request has no ``Authorization`` header.
    """
    raw = await read_json(request)
    try:
        body = SessionRequest.model_validate(raw)
    except ValidationError as exc:
        raise request_invalid(exc, "body") from None
    authority = services(request).authority
    principal = await authority.authenticate(body.token)
    authority.limit(principal)
    response = JSON(principal_view(principal, await authority.required(request)))
    response.set_cookie(SESSION_COOKIE, body.token, **_session_cookie(request))
    return response


async def close_session(request: Request) -> Response:
    """``POST /auth/logout``: forget the page session's cookie (204)."""
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, **_session_cookie(request))
    return response


def _session_cookie(request: Request) -> dict[str, Any]:
    """The session cookie's attributes: setting and deleting it must name the same."""
    return {
        "path": "/",
        "secure": request.url.scheme == "https",
        "httponly": True,
        "samesite": "strict",
    }


async def issue_ticket(request: Request) -> Response:
    """``POST /auth/ticket``: a single-use ticket for ``/sse/logs/...?ticket=``."""
    ticket, expires_at = await services(request).authority.issue_ticket(principal_of(request))
    return JSON({"ticket": ticket, "expires_at": expires_at}, status_code=201)


async def list_tokens(request: Request) -> Response:
    """``GET /auth/tokens``: every token, without secrets."""
    require_every_graph(principal_of(request))
    svc = services(request)
    now = svc.authority.settings.clock()
    tokens = await svc.engine.store.list_tokens()
    return JSON({"items": [token_view(t, now) for t in tokens]})


async def create_token(request: Request) -> Response:
    """``POST /auth/tokens``: 201 with the new token's text, shown this once."""
    require_every_graph(principal_of(request))
    svc = services(request)
    raw = await read_json(request)
    try:
        body = TokenCreate.model_validate(raw)
    except ValidationError as exc:
        raise request_invalid(exc, "body") from None
    authority = svc.authority
    now = authority.settings.clock()
    try:
        record, text = make_token(
            body.name,
            body.role,
            body.graphs,
            pepper=authority.settings.pepper,
            now=now,
            expires_in=body.expires_in_s,
        )
    except ValueError as exc:
        raise RequestError(422, "request_invalid", str(exc)) from None
    await svc.engine.store.put_token(record)
    authority.forget_count()
    view = token_view(record, now)
    request.state.audit_target = f"token {record.token_id} ({record.name}, {record.role})"
    return JSON(
        {**view, "token": text},
        status_code=201,
        headers={"Cache-Control": "no-store"},
    )


async def revoke_token(request: Request) -> Response:
    """``POST /auth/tokens/{token_id}/revoke``: the revoked token (idempotent)."""
    require_every_graph(principal_of(request))
    svc = services(request)
    token_id = request.path_params["token_id"]
    now = svc.authority.settings.clock()
    token = await svc.engine.store.revoke_token(token_id, now)
    if token is None:
        raise RequestError(404, "not_found", f"no token {token_id[:40]!r}")
    svc.authority.forget(token_id)
    svc.authority.forget_count()
    return JSON(token_view(token, now))


async def read_audit(request: Request) -> Response:
    """``GET /auth/audit``: audit entries after ``?after=``, oldest first."""
    require_every_graph(principal_of(request))
    query = parse_query(AuditQuery, request)
    entries = await services(request).engine.store.read_audit(after=query.after, limit=query.limit)
    items = [audit_view(e) for e in entries]
    next_after = items[-1]["seq"] if len(items) == query.limit else None
    return JSON({"items": items, "next_after": next_after})


async def prune_runs(request: Request) -> Response:
    """``POST /runs/prune``: delete terminal runs finished more than ``older_than_s`` ago."""
    require_every_graph(principal_of(request))
    raw = await read_json(request)
    try:
        body = PruneRequest.model_validate(raw)
    except ValidationError as exc:
        raise request_invalid(exc, "body") from None
    cut_off = time.time() - body.older_than_s
    deleted = await services(request).engine.delete_runs(older_than_s=body.older_than_s)
    return JSON({"deleted": deleted, "finished_before": cut_off})
