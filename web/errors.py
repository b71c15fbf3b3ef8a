"""The one place that turns errors into HTTP answers.

Every error answer is JSON ``{"error": {"code", "message", "details"}}``.
Core errors keep their own ``code``; errors of the HTTP layer (bad JSON, wrong
content type, unknown route, ...) are :class:`RequestError` or Starlette's
``HTTPException`` and get codes from here.

Status decisions: a size over a configured limit (request body, initial
state) is 413; a graph over its node/edge limits is one of the graph's
validation problems, so 422 like every other problem; per-field bounds of the
wire schema (an id too long, ``limit`` out of range) are request validation,
422.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from trioflow import (
    CapacityError,
    EngineError,
    EngineStoppingError,
    ExpressionError,
    GraphConflictError,
    GraphValidationError,
    InputValidationError,
    LimitExceededError,
    RegistryError,
    RunStalledError,
    RunStateError,
    StateValidationError,
    StoreError,
    UnknownGraphError,
    UnknownRunError,
)
from trioflow.stores.base import InvalidCursorError

from .responses import JSON

log = logging.getLogger("trioflow.web")

ENGINE_STATUS: dict[type[EngineError], int] = {
    GraphValidationError: 422,
    InputValidationError: 422,
    ExpressionError: 422,
    StateValidationError: 422,
    UnknownGraphError: 404,
    UnknownRunError: 404,
    GraphConflictError: 409,
    RunStateError: 409,
    LimitExceededError: 413,
    CapacityError: 429,
    InvalidCursorError: 400,
    RegistryError: 500,
    StoreError: 503,
    RunStalledError: 503,
    EngineStoppingError: 503,
}
"""HTTP status of each core error class; subclasses inherit their base's status."""

HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "request_invalid",
    429: "capacity_exceeded",
    500: "internal_error",
    503: "unavailable",
}
"""Error code of an HTTP-layer error, by status."""


class RequestError(Exception):
    """Raised by handlers for a request the HTTP layer rejects before core sees it."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers


def request_invalid(exc: ValidationError, where: str) -> RequestError:
    """A 422 listing every field pydantic rejected in the body or the query."""
    errors = [
        {
            "field": ".".join(str(p) for p in err["loc"]),
            "message": err["msg"],
            "type": err["type"],
        }
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]
    fields = ", ".join(e["field"] or "<root>" for e in errors)
    return RequestError(422, "request_invalid", f"invalid {where}: {fields}", {"errors": errors})


def engine_status(exc: EngineError) -> int:
    for cls in type(exc).__mro__:
        status = ENGINE_STATUS.get(cls)
        if status is not None:
            return status
    return 500


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSON:
    return JSON(error_body(code, message, details), status_code=status, headers=headers)


INVALID_CURSOR = (
    "the cursor is not one this server gave out; pass a next_cursor from a previous page, "
    "or leave cursor out to start from the first page"
)


def engine_error_parts(
    exc: EngineError,
) -> tuple[int, str, str, dict[str, Any], dict[str, str] | None]:
    """An engine error's status, code, message, details and headers (JSON or a page)."""
    if isinstance(exc, InvalidCursorError):
        # The store's message says why its decoder failed: nothing a client can act on.
        return 400, exc.code, INVALID_CURSOR, {}, None
    status = engine_status(exc)
    if status >= 500:
        log.error("%s: %s", type(exc).__name__, exc.message)
    headers = {"Retry-After": "1"} if status == 429 else None
    return status, exc.code, exc.message, exc.details, headers


def engine_error_response(exc: EngineError) -> JSON:
    return error_response(*engine_error_parts(exc))


async def _on_engine_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, EngineError):  # pragma: no cover - registered for EngineError only
        raise exc
    return engine_error_response(exc)


async def _on_request_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestError):  # pragma: no cover - registered for RequestError only
        raise exc
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # pragma: no cover
        raise exc
    code = HTTP_CODES.get(exc.status_code, "http_error")
    details: dict[str, Any] = {}
    if exc.status_code == 405 and exc.headers and "Allow" in exc.headers:
        details["allow"] = exc.headers["Allow"].split(", ")
    return error_response(
        exc.status_code, code, str(exc.detail), details, dict(exc.headers) if exc.headers else None
    )


async def _on_internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error; see the server log")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    EngineError: _on_engine_error,
    RequestError: _on_request_error,
    HTTPException: _on_http_exception,
    Exception: _on_internal_error,
}
"""For ``Starlette(exception_handlers=...)``."""
