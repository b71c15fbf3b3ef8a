"""Live run logs: WebSocket ``/ws/logs/{run_id}`` and Server-Sent Events ``/sse/logs/{run_id}``.

Both are thin relays over :meth:`trioflow.Engine.follow_pages`, which reads the
store by cursor: replay and live tail are one mechanism and a slow client
never slows the run. A follower holds at most one page of
:data:`FOLLOW_PAGE` entries (or ``?batch=N``) and the frame being written;
a client that accepts nothing for ``Settings.send_timeout_s`` has its
connection closed by the server (:mod:`web.serve`), which ends the
follower. Each stream races three things: the relay, the client going away,
and the server draining for shutdown.

WebSocket close codes: 1000 after the status message; 1001 when the server
shuts down; ``4000 + HTTP status`` after an error message (4404 unknown run,
4422 bad query, 4429 too many followers).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from functools import partial
from typing import Any

import trio
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from trioflow import TERMINAL, Engine, EngineError, LogEntry, RunStatus, UnknownRunError

from .auth import WS_PROTOCOL, Principal, principal_of
from .errors import RequestError, engine_status, error_body, request_invalid
from .responses import ENCODED, dumps
from .schemas import MAX_SEQ, SSEFollowQuery, WebSocketFollowQuery
from .services import Lifecycle, services

log = logging.getLogger("trioflow.web")

GOING_AWAY = 1001
CLIENT_GONE = (
    WebSocketDisconnect,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    # Hypercorn 0.18 may be tearing the connection down in another task.
    trio.BusyResourceError,
)
CLOSE_REPLY_TIMEOUT = 2.0

FOLLOW_PAGE = 64
"""Entries a follower reads from the store at once (``?batch=N`` reads N).

What a follower holds while its client is slow is one page plus the frame
being written, so the page is kept small; a follower that keeps up reads
what each checkpoint wrote anyway.
"""

_SEQ = re.compile(r"[0-9]{1,20}", re.ASCII)


async def relay(
    engine: Engine,
    run_id: str,
    after: int,
    on_entry: Callable[[LogEntry], Awaitable[None]],
) -> RunStatus:
    """Hand every entry with ``seq > after`` to ``on_entry``; return the run's terminal status.

    Raises:
        UnknownRunError: no such run.
        CapacityError: too many followers.
    """
    # follow_pages is an async generator: close it here, not whenever it is
    # collected, so that a cancelled stream releases its follower slot at once.
    async with aclosing(engine.follow_pages(run_id, after=after, limit=FOLLOW_PAGE)) as pages:
        async for page in pages:
            for entry in page:
                await on_entry(entry)
            del page  # a follower waiting for the next checkpoint holds no entries
    # The terminal entry and the terminal record are one checkpoint, so once
    # follow has ended the record says how the run ended.
    return (await engine.get_run(run_id)).status


async def relay_pages(
    engine: Engine,
    run_id: str,
    after: int,
    batch: int,
    on_page: Callable[[list[LogEntry]], Awaitable[None]],
) -> RunStatus:
    """Like :func:`relay`, handing over pages of up to ``batch`` entries available at once."""
    async with aclosing(engine.follow_pages(run_id, after=after, limit=batch)) as pages:
        async for page in pages:
            await on_page(page)
    return (await engine.get_run(run_id)).status


async def _race(
    lifecycle: Lifecycle,
    wait_gone: Callable[[], Awaitable[None]],
    work: Callable[[], Awaitable[None]],
    revoked: Callable[[], Awaitable[None]] | None = None,
) -> str:
    """Run ``work`` until it ends, the client goes, the server drains, or the
    follower's token stops being valid (``revoked``). Returns which."""
    outcome = "done"
    async with trio.open_nursery() as nursery:

        async def watch(what: str, wait: Callable[[], Awaitable[Any]]) -> None:
            nonlocal outcome
            await wait()
            outcome = what
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch, "gone", wait_gone)
        nursery.start_soon(watch, "draining", lifecycle.draining.wait)
        if revoked is not None:
            nursery.start_soon(watch, "revoked", revoked)
        await work()
        nursery.cancel_scope.cancel()
    return outcome


# -- WebSocket -------------------------------------------------------------------


async def _close(websocket: WebSocket, code: int, reason: str | None = None) -> None:
    """Close, then wait (briefly) for the client's closing reply before returning.

    Hypercorn 0.18 tears the connection down when the handler returns, and
    that teardown is not serialised with the close reply its reader task may
    still have to send; the collision raises inside Hypercorn's connection
    task and takes the whole server down. Returning only once the closing
    handshake is complete (or the client is clearly not answering) avoids it.
    """
    await websocket.close(code=code, reason=reason)
    with trio.move_on_after(CLOSE_REPLY_TIMEOUT):
        while websocket.client_state is WebSocketState.CONNECTED:
            if (await websocket.receive())["type"] == "websocket.disconnect":
                break


async def _error_close(websocket: WebSocket, status: int, body: dict[str, Any]) -> None:
    await websocket.send_text(dumps({"type": "error", **body}))
    await _close(websocket, 4000 + status)


async def ws_logs(websocket: WebSocket) -> None:
    """``WS /ws/logs/{run_id}?after=SEQ``: log messages, one status message, close 1000.

    The token comes in ``Authorization: Bearer`` or, from a browser, as the
    subprotocol ``trioflow.bearer.<token>`` next to ``trioflow.v1``; the
    server answers with ``trioflow.v1`` only. A refused token closes with
    4401 (none, unknown, revoked, expired), 4403 or 4429.
    """
    from .routes import WEBSOCKET_ACCESS

    offered = websocket.scope.get("subprotocols") or ()
    await websocket.accept(subprotocol=WS_PROTOCOL if WS_PROTOCOL in offered else None)
    svc = services(websocket)
    svc.metrics.request("followRunLog", 101, None)
    # A client may hang up at any moment; a send that then fails means it is gone.
    with contextlib.suppress(*CLIENT_GONE):
        try:
            principal = await svc.authority.principal(
                websocket, WEBSOCKET_ACCESS, "WS /ws/logs/{run_id}"
            )
            with svc.authority.stream(principal):
                await _follow(websocket, principal)
        except RequestError as exc:
            body = error_body(exc.code, exc.message, exc.details)
            await _error_close(websocket, exc.status, body)


async def _follow(websocket: WebSocket, principal: Principal) -> None:
    svc = services(websocket)
    run_id = websocket.path_params["run_id"]
    try:
        query = WebSocketFollowQuery.model_validate(dict(websocket.query_params))
        record = await svc.engine.get_run(run_id)
        if not principal.sees(record.graph_id):
            raise UnknownRunError(run_id)
    except ValidationError as exc:
        err = request_invalid(exc, "query")
        await _error_close(websocket, err.status, error_body(err.code, err.message, err.details))
        return
    except EngineError as exc:
        body = error_body(exc.code, exc.message, exc.details)
        await _error_close(websocket, engine_status(exc), body)
        return

    async def wait_gone() -> None:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    async def send_entry(entry: LogEntry) -> None:
        await websocket.send_text(ENCODED.websocket(run_id, entry))

    async def send_page(page: list[LogEntry]) -> None:
        await websocket.send_text(ENCODED.websocket_batch(run_id, page))

    error: EngineError | None = None
    final: RunStatus | None = None
    gone = False

    async def work() -> None:
        nonlocal error, final, gone
        try:
            if query.batch > 1:
                final = await relay_pages(svc.engine, run_id, query.after, query.batch, send_page)
            else:
                final = await relay(svc.engine, run_id, query.after, send_entry)
        except EngineError as exc:  # e.g. CapacityError: reported to the client
            error = exc
        except CLIENT_GONE:
            gone = True

    outcome = await _race(
        svc.lifecycle, wait_gone, work, partial(svc.authority.still_valid, principal)
    )
    if gone or outcome == "gone" or websocket.application_state is not WebSocketState.CONNECTED:
        return
    if outcome == "revoked":
        body = error_body("unauthorized", "the token was revoked or has expired")
        await _error_close(websocket, 401, body)
    elif outcome == "draining":
        await _close(websocket, GOING_AWAY, "server shutting down")
    elif error is not None:
        body = error_body(error.code, error.message, error.details)
        await _error_close(websocket, engine_status(error), body)
    elif final is not None:
        await websocket.send_text(dumps({"type": "status", "status": final.value}))
        await _close(websocket, 1000)


# -- Server-Sent Events ----------------------------------------------------------


def _last_event_id(request: Request) -> int | None:
    """The seq a reconnecting EventSource resumes after, parsed as strictly as ``?after=``."""
    raw = request.headers.get("last-event-id")
    if raw is None or raw == "":
        return None
    if _SEQ.fullmatch(raw) is None or int(raw) > MAX_SEQ:
        raise RequestError(
            400,
            "bad_request",
            f"Last-Event-ID must be a log seq: decimal digits, 0 to {MAX_SEQ}",
            {"last_event_id": raw[:100]},
        )
    return int(raw)


class EventStream(Response):
    """A run's log as ``text/event-stream``.

    Each entry is ``id: <seq>``, ``event: log``, ``data: <entry JSON>``; the
    stream ends with ``event: status`` (``data: {"status": ...}``). While idle
    a comment line goes out every ``heartbeat_s`` so proxies keep it open.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        engine: Engine,
        lifecycle: Lifecycle,
        run_id: str,
        after: int,
        heartbeat_s: float,
        on_end: contextlib.AbstractContextManager[Any] | None = None,
        revoked: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            media_type="text/event-stream; charset=utf-8",
        )
        self.engine = engine
        self.lifecycle = lifecycle
        self.run_id = run_id
        self.after = after
        self.heartbeat_s = heartbeat_s
        self.on_end = on_end
        self.revoked = revoked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._stream(receive, send)
        finally:
            if self.on_end is not None:
                self.on_end.__exit__(None, None, None)

    async def _stream(self, receive: Receive, send: Send) -> None:
        # Response.__init__ set a zero content-length for the empty body; a stream has none.
        headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        lock = trio.Lock()
        last_sent = trio.current_time()
        gone = trio.Event()

        async def emit(chunk: str) -> None:
            nonlocal last_sent
            async with lock:
                if gone.is_set():
                    return
                try:
                    await send(
                        {"type": "http.response.body", "body": chunk.encode(), "more_body": True}
                    )
                except CLIENT_GONE:
                    gone.set()
                last_sent = trio.current_time()

        async def send_entry(entry: LogEntry) -> None:
            await emit(ENCODED.sse(self.run_id, entry))

        async def wait_gone() -> None:
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    gone.set()

                nursery.start_soon(read)
                await gone.wait()
                nursery.cancel_scope.cancel()

        async def heartbeat() -> None:
            while True:
                await trio.sleep_until(last_sent + self.heartbeat_s)
                if trio.current_time() >= last_sent + self.heartbeat_s:
                    await emit(": keepalive\n\n")

        async def work() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(heartbeat)
                try:
                    status = await relay(self.engine, self.run_id, self.after, send_entry)
                except EngineError as exc:
                    body = dumps(error_body(exc.code, exc.message, exc.details))
                    await emit(f"event: error\ndata: {body}\n\n")
                else:
                    await emit(f"event: status\ndata: {dumps({'status': status.value})}\n\n")
                nursery.cancel_scope.cancel()

        outcome = await _race(self.lifecycle, wait_gone, work, self.revoked)
        if outcome == "revoked":
            body = dumps(error_body("unauthorized", "the token was revoked or has expired"))
            await emit(f"event: error\ndata: {body}\n\n")
        if outcome != "gone" and not gone.is_set():
            with contextlib.suppress(*CLIENT_GONE):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


async def sse_logs(request: Request) -> Response:
    """``GET /sse/logs/{run_id}``: resumes after ``Last-Event-ID`` (or ``?after=``).

    A run that has ended and has nothing after that seq answers 204: a
    browser's ``EventSource`` reconnects after every stream that ends, and
    204 is what makes it stop.
    """
    svc = services(request)
    run_id = request.path_params["run_id"]
    try:
        query = SSEFollowQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise request_invalid(exc, "query") from None
    resume = _last_event_id(request)
    record = await svc.engine.get_run(run_id)  # 404 before the stream starts
    principal = principal_of(request)
    if not principal.sees(record.graph_id):
        raise UnknownRunError(run_id)
    after = resume if resume is not None else query.after
    if record.status in TERMINAL and after >= record.last_seq:
        # The terminal record and the last entry are one checkpoint: nothing follows.
        return Response(status_code=204, headers={"Cache-Control": "no-cache"})
    hold = svc.authority.stream(principal)
    hold.__enter__()  # 429 now, before the stream starts; left when the stream ends
    try:
        return EventStream(
            svc.engine,
            svc.lifecycle,
            run_id,
            after,
            svc.settings.heartbeat_s,
            on_end=hold,
            revoked=partial(svc.authority.still_valid, principal),
        )
    except BaseException:
        hold.__exit__(None, None, None)
        raise
