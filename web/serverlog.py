"""The server log: an access line per request, and the text or JSON format of every record.

:class:`AccessLog` is a pure ASGI middleware (no task, no
``BaseHTTPMiddleware``): it wraps ``send`` to note the status and logs one
record on the logger ``trioflow.access`` when the request ends, with the
method, path, status and duration in milliseconds. A WebSocket or an SSE
stream is logged when it ends, so its duration is the stream's lifetime; a
WebSocket's status is 101 once accepted (or the status of a refused
handshake) and its close code is logged beside it. When the logger does not
take INFO records the middleware only checks that and calls the app.

:func:`configure` sets up the root logger for ``trioflow serve``: the text
format, or ``json`` for one JSON object per line (every record, access lines
included, with their fields as keys).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

ACCESS_LOGGER = "trioflow.access"

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[str, ...] = ("text", "json")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

access_log = logging.getLogger(ACCESS_LOGGER)


class AccessLog:
    """Log one line per HTTP request or WebSocket session when it ends.

    The record's message is ``client "METHOD /path" status duration ms``; its
    ``fields`` attribute holds the same values for the JSON format:
    ``method`` (``WS`` for a WebSocket), ``path``, ``status`` (``null`` when
    the client went away before any answer), ``duration_ms``, ``client``,
    and ``close_code`` for a WebSocket.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if (kind != "http" and kind != "websocket") or not access_log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None
        close_code: int | None = None

        async def noting_send(message: Message) -> None:
            nonlocal status, close_code
            what = message["type"]
            if what == "http.response.start" or what == "websocket.http.response.start":
                status = message["status"]
            elif what == "websocket.accept":
                status = 101
            elif what == "websocket.close":
                close_code = message.get("code", 1000)
                if status is None:
                    status = 403  # closed before accepting: the server refuses the handshake
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        except Exception:
            if status is None:
                status = 500  # the server's error handler answers it
            raise
        finally:
            duration_ms = round((time.perf_counter() - start) * 1000, 2)
            method = scope["method"] if kind == "http" else "WS"
            path = scope["path"]
            client = scope.get("client")
            peer = f"{client[0]}:{client[1]}" if client else "-"
            fields: dict[str, Any] = {
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": duration_ms,
                "client": peer,
            }
            if kind == "websocket":
                fields["close_code"] = close_code
                access_log.info(
                    '%s "%s %s" %s %.2f ms close %s',
                    peer,
                    method,
                    path,
                    status or "-",
                    duration_ms,
                    close_code or "-",
                    extra={"fields": fields},
                )
            else:
                access_log.info(
                    '%s "%s %s" %s %.2f ms',
                    peer,
                    method,
                    path,
                    status or "-",
                    duration_ms,
                    extra={"fields": fields},
                )


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line.

    Keys: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, the
    record's ``fields`` (access lines) and ``exception`` (the traceback as
    text) when there is one. Non-ASCII characters are escaped, so a record
    never spans two lines for any reader.
    """

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def configure(level: str = "info", log_format: LogFormat = "text", *, access: bool = True) -> None:
    """Send every log record to stderr, as text or JSON lines.

    Args:
        level: the root level (``debug``, ``info``, ``warning``, ``error``).
        log_format: ``text`` (``time LEVEL logger: message``) or ``json``.
        access: log access lines (INFO on ``trioflow.access``); False
            silences them whatever the level.
    """
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    access_log.setLevel(logging.NOTSET if access else logging.WARNING)
