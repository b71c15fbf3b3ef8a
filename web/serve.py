"""Serving the app with Hypercorn's Trio worker, with a graceful shutdown and bounded writes.

The loop below is Hypercorn's own ``worker_serve`` (its lifespan, worker
context and per-connection ``TCPServer``) with two differences:

* the sockets are bound first, so that an address in use is reported before
  anything else happens (no store opened, no run resumed), and listen only
  after the app's lifespan has started (the engine and its store are open),
  so a server that cannot start never accepts a connection;
* every connection's stream is a :class:`_BoundedSendStream`: a write that
  makes no progress for ``Settings.send_timeout_s`` closes that connection.
  Hypercorn shields its writes from cancellation, so without this a client
  that never reads (a silent WebSocket or SSE follower) would pin its
  connection, its handler task and whatever that task holds for as long as
  it stays connected.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import (
    LifespanFailureError,
    ShutdownError,
    raise_shutdown,
    repr_socket_addr,
    wrap_app,
)
from starlette.applications import Starlette

from .app import lifecycle_of, settings_of

log = logging.getLogger("trioflow.web")

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: A write is sent in pieces of this size; each must be accepted within the send timeout.
SEND_CHUNK = 64 * 1024


class StartupError(Exception):
    """The app's lifespan did not start (the engine or its store could not open)."""


def hypercorn_config(host: str, port: int, *, graceful_timeout: float) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = graceful_timeout
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None
    # Clients send nothing on the log WebSocket; bound what they could.
    config.websocket_max_message_size = 64 * 1024
    return config


class _BoundedSendStream:
    """A connection's socket stream whose writes give up when the peer stops reading.

    Each write goes out in pieces of :data:`SEND_CHUNK` bytes; a piece the
    peer's TCP window does not take within ``timeout`` seconds closes the
    socket and raises ``BrokenResourceError``, which Hypercorn treats as the
    client having gone: the handler gets its disconnect and ends, and the
    connection's reader task wakes up on the closed socket. The client sees
    the connection end without a closing handshake (WebSocket close code
    1006).
    """

    def __init__(self, stream: trio.SocketStream, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout
        self.socket = stream.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) <= SEND_CHUNK:
            with trio.move_on_after(self._timeout):
                await self._stream.send_all(data)
                return
        else:
            view = memoryview(data)
            for start in range(0, len(view), SEND_CHUNK):
                with trio.move_on_after(self._timeout) as scope:
                    await self._stream.send_all(view[start : start + SEND_CHUNK])
                if scope.cancelled_caught:
                    break
            else:
                return
        self._abort()
        raise trio.BrokenResourceError("the peer accepted no data within the send timeout")

    def _abort(self) -> None:
        try:
            peer = repr_socket_addr(self.socket.family, self.socket.getpeername())
        except OSError:
            peer = "a client"
        log.info("closing the connection of %s: it accepted no data for %g s", peer, self._timeout)
        self.socket.close()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def serve(
    app: Starlette,
    *,
    host: str,
    port: int,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    handle_signals: bool = True,
    graceful_timeout: float = 10.0,
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM or ``shutdown_trigger`` returns.

    The sockets are bound first; then the app's lifespan starts (opening the
    engine it owns); only then do the sockets listen. Shutdown is graceful:
    the listeners close, log streams are told to go (WebSockets close with
    1001, SSE streams end), requests in flight get up to ``graceful_timeout``
    seconds to finish, then the app's lifespan ends (closing the engine it
    owns, which leaves unfinished runs resumable).

    Args:
        app: an app made by :func:`web.app.create_app`.
        host: address to bind; port 0 picks a free port.
        task_status: started with the bound addresses (``["http://127.0.0.1:8000"]``).
        shutdown_trigger: an awaitable factory; its return starts the shutdown.
        handle_signals: listen for SIGINT/SIGTERM (main thread only).
        graceful_timeout: seconds in-flight requests get after shutdown starts.

    Raises:
        StartupError: the app's lifespan failed (the error is logged).
        OSError: the address cannot be bound (raised before the lifespan
            starts; ``errno.EADDRINUSE`` when the port is taken).
    """
    config = hypercorn_config(host, port, graceful_timeout=graceful_timeout)
    lifecycle = lifecycle_of(app)
    send_timeout = settings_of(app).send_timeout_s

    async def trigger() -> None:
        async with trio.open_nursery() as nursery:

            async def fire(wait: Callable[[], Awaitable[object]]) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            if shutdown_trigger is not None:
                nursery.start_soon(fire, shutdown_trigger)
            if handle_signals:
                nursery.start_soon(fire, _wait_for_signal)
        lifecycle.drain()

    asgi: Any = app  # hypercorn's app type is a union it cannot match to Starlette
    wrapped = wrap_app(asgi, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    sockets = config.create_sockets()
    listening = False

    try:
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            # A lifespan that failed has set "started" on its way out; let its
            # task's end reach this nursery before anything is bound.
            await trio.lowlevel.checkpoint()
            if not lifespan.supported or app.state.startup_error is not None:
                raise StartupError(app.state.startup_error or "the app failed to start")

            async with trio.open_nursery() as server_nursery:
                listening = True
                listeners: list[trio.SocketListener] = []
                binds: list[str] = []
                for sock in sockets.insecure_sockets:
                    sock.listen(config.backlog)
                    listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                    binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
                app.state.bound = tuple(binds)

                async def connection(stream: trio.SocketStream) -> None:
                    bounded: Any = _BoundedSendStream(stream, send_timeout)
                    state = ConnectionState(lifespan_state.copy())
                    await TCPServer(wrapped, config, context, state, bounded).run()

                task_status.started(binds)
                try:
                    async with trio.open_nursery() as nursery:
                        if shutdown_trigger is not None or handle_signals:
                            nursery.start_soon(raise_shutdown, trigger)
                        nursery.start_soon(raise_shutdown, context.terminate.wait)
                        nursery.start_soon(_serve_listeners, connection, listeners, server_nursery)
                        await trio.sleep_forever()
                except BaseExceptionGroup as error:
                    _, others = error.split((ShutdownError, KeyboardInterrupt))
                    if others is not None:
                        raise others from None
                except ShutdownError:
                    pass
                finally:
                    await context.terminated.set()
                    server_nursery.cancel_scope.deadline = trio.current_time() + graceful_timeout

            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The lifespan raised while starting (Starlette reports it as a
        # failure, and Hypercorn raises that with the whole traceback as text):
        # one line, from what the app recorded.
        if group.subgroup((LifespanFailureError, StartupError)) is None:
            raise
        raise StartupError(app.state.startup_error or "the app failed to start") from None
    finally:
        if not listening:
            for sock in sockets.insecure_sockets:
                sock.close()


async def _serve_listeners(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    listeners: list[trio.SocketListener],
    handler_nursery: trio.Nursery,
) -> None:
    await trio.serve_listeners(handler, listeners, handler_nursery=handler_nursery)


async def _wait_for_signal() -> None:
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        async for signum in signals:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            return
