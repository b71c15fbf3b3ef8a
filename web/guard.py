"""What every request passes before the app sees it: one pure ASGI middleware.

:class:`RequestGuard` reads the request headers once and answers, without
running the app:

* **421** ``misdirected_request`` when ``Host`` names a host this server
  does not serve (DNS rebinding: a page on ``attacker.example`` whose name
  now resolves to 127.0.0.1 sends ``Host: attacker.example``);
* **403** ``origin_forbidden`` when a browser's ``Origin`` is neither the
  request's own origin nor an allowed one (cross-site requests);
* **415** ``unsupported_media_type`` when a request carries a body that is
  not declared JSON (``application/json`` or ``application/*+json``): a
  browser can send ``text/plain``, form or no content type cross-site
  without a CORS preflight, never JSON;
* **413** ``body_too_large`` when the body is over the limit: a declared
  ``Content-Length`` before the app runs, a chunked body as it streams in.

WebSocket handshakes get the same Host and Origin checks; a refused
handshake is answered with the HTTP status and the JSON error (the ASGI
``websocket.http.response`` extension), so a client sees 421 or 403 and
never an open socket.

It adds no task and no allocation to an allowed request beyond the header
scan: allowed ``Host`` values are remembered in a small set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import pydantic_core
import trio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body
from .settings import LOOPBACK_HOSTS, Settings

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
_PAGE_SCHEMES = {"http": "http", "ws": "http", "https": "https", "wss": "https"}
_KNOWN_HOSTS_MAX = 256


class _BodyTooLarge(Exception):
    """Internal: a streamed body went over the limit while the app was reading it."""


def split_host(value: str) -> tuple[str, int | None]:
    """``"Example.com:8000"`` -> ``("example.com", 8000)``; ``"[::1]"`` -> ``("::1", None)``.

    A value that is not ``host[:port]`` comes back whole, with no port; it
    then matches no allowed name.
    """
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, None
        host, rest = value[1:end], value[end + 1 :]
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
        rest = ":" + port
    else:
        host, rest = value, ""
    host = host.removesuffix(".")
    if not rest:
        return host, None
    if rest.startswith(":") and rest[1:].isdigit() and rest[1:].isascii() and len(rest) <= 6:
        return host, int(rest[1:])
    return value, None


def normalise_origin(origin: str) -> str | None:
    """``"HTTP://Localhost"`` -> ``"http://localhost:80"``; None if it is not ``scheme://host[:port]``."""
    scheme, sep, netloc = origin.strip().lower().partition("://")
    if not sep or not netloc or "/" in netloc or scheme not in _DEFAULT_PORTS:
        return None
    host, port = split_host(netloc)
    if port is None:
        if ":" in netloc and not netloc.startswith("["):
            return None
        port = _DEFAULT_PORTS[scheme]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class RequestGuard:
    """Host, Origin, content type and body size checks (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.max_bytes = settings.max_body_bytes
        hosts = {split_host(h)[0] for h in settings.allowed_hosts if h != "*"}
        self.any_host = "*" in settings.allowed_hosts
        self.hosts = frozenset(hosts | set(LOOPBACK_HOSTS))
        self.any_origin = "*" in settings.allowed_origins
        origins = (normalise_origin(o) for o in settings.allowed_origins if o != "*")
        self.origins = frozenset(o for o in origins if o is not None)
        # Raw Host header values already found allowed: the common case is one set lookup.
        self._known_hosts: set[bytes] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        host = origin = content_type = length = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True

        if host is not None and host not in self._known_hosts and not self._host_ok(scope, host):
            shown = host.decode("latin-1")[:200]
            await self._refuse(
                scope,
                receive,
                send,
                421,
                "misdirected_request",
                f"this server does not serve the host {shown!r}",
                {"host": shown},
            )
            return
        if origin is not None and not self.any_origin and not self._origin_ok(scope, origin, host):
            shown = origin.decode("latin-1")[:200]
            await self._refuse(
                scope,
                receive,
                send,
                403,
                "origin_forbidden",
                f"requests from the origin {shown!r} are not allowed",
                {"origin": shown},
            )
            return
        if kind == "websocket":
            await self.app(scope, receive, send)
            return

        declared: int | None = None
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = None  # the HTTP server rejects malformed lengths itself
        has_body = chunked or bool(declared)
        if has_body and scope["method"] in _BODY_METHODS and not _is_json(content_type):
            shown = content_type.decode("latin-1")[:200] if content_type is not None else None
            message = (
                "a request body needs Content-Type: application/json"
                if shown is None
                else f"expected application/json, got {shown!r}"
            )
            await self._refuse(
                scope,
                receive,
                send,
                415,
                "unsupported_media_type",
                message,
                {"content_type": shown},
            )
            return
        if declared is not None and not chunked:
            if declared > self.max_bytes:
                await self._refuse_size(send, declared)
            else:
                # The HTTP server delivers exactly the declared length: nothing to count.
                await self.app(scope, receive, send)
            return
        await self._counted(scope, receive, send)

    # -- checks --------------------------------------------------------------------

    def _host_ok(self, scope: Scope, raw: bytes) -> bool:
        if self.any_host:
            return True
        name, _ = split_host(raw.decode("latin-1"))
        server = scope.get("server")
        bound = server[0].lower() if server else None
        if name in self.hosts or name == bound:
            if len(self._known_hosts) >= _KNOWN_HOSTS_MAX:
                self._known_hosts.clear()
            self._known_hosts.add(raw)
            return True
        return False

    def _origin_ok(self, scope: Scope, raw: bytes, host: bytes | None) -> bool:
        origin = normalise_origin(raw.decode("latin-1"))
        if origin is None:
            return False  # "null" (sandboxed pages, file://) and anything malformed
        if origin in self.origins:
            return True
        if host is None:
            return False
        # Same origin: the Origin names the host (and port) the request was sent to.
        scheme = _PAGE_SCHEMES.get(scope.get("scheme", "http"), "http")
        name, port = split_host(host.decode("latin-1"))
        if port is None:
            port = _DEFAULT_PORTS[scheme]
        own = f"[{name}]:{port}" if ":" in name else f"{name}:{port}"
        return origin == f"{scheme}://{own}"

    # -- bodies --------------------------------------------------------------------

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, aborting with 413 once a streamed body passes the limit."""
        limit = self.max_bytes
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse_size(send, received)

    async def _refuse_size(self, send: Send, size: int) -> None:
        body = error_body(
            "body_too_large",
            f"request body is over the limit of {self.max_bytes} bytes",
            {"limit": "max_body_bytes", "value": size, "maximum": self.max_bytes},
        )
        await _send_http(send, 413, pydantic_core.to_json(body), close=True)

    # -- answers -------------------------------------------------------------------

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        code: str,
        message: str,
        details: dict[str, object],
    ) -> None:
        body = pydantic_core.to_json(error_body(code, message, details))
        if scope["type"] == "http":
            await _send_http(send, status, body, close=True)
            return
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": status,
                    "headers": _json_headers(body),
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 4000 + status})


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def _json_headers(
    body: bytes, extra: Iterable[tuple[bytes, bytes]] = ()
) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]


async def _send_http(send: Send, status: int, body: bytes, *, close: bool = False) -> None:
    extra = [(b"connection", b"close")] if close else []
    await send(
        {"type": "http.response.start", "status": status, "headers": _json_headers(body, extra)}
    )
    # The client may hang up as soon as it has the answer, and Hypercorn's
    # connection teardown can race this last write; nothing is lost then.
    with contextlib.suppress(trio.BusyResourceError):
        await send({"type": "http.response.body", "body": body})
