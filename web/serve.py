"""Serving the app with Hypercorn's Trio worker, with a graceful shutdown."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette

from .app import lifecycle_of

log = logging.getLogger("trioflow.web")

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def hypercorn_config(host: str, port: int, *, graceful_timeout: float) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = graceful_timeout
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None
    # Clients send nothing on the log WebSocket; bound what they could.
    config.websocket_max_message_size = 64 * 1024
    return config


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

    Shutdown is graceful: the listeners close, log streams are told to go
    (WebSockets close with 1001, SSE streams end), requests in flight get up
    to ``graceful_timeout`` seconds to finish, then the app's lifespan ends
    (closing the engine it owns, which leaves unfinished runs resumable).

    Args:
        app: an app made by :func:`web.app.create_app`.
        host: address to bind; port 0 picks a free port.
        task_status: started with the bound addresses (``["http://127.0.0.1:8000"]``).
        shutdown_trigger: an awaitable factory; its return starts the shutdown.
        handle_signals: listen for SIGINT/SIGTERM (main thread only).
        graceful_timeout: seconds in-flight requests get after shutdown starts.
    """
    config = hypercorn_config(host, port, graceful_timeout=graceful_timeout)
    lifecycle = lifecycle_of(app)

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
    await hypercorn_serve(asgi, config, shutdown_trigger=trigger if (
        shutdown_trigger is not None or handle_signals) else None,
        task_status=task_status)  # fmt: skip


async def _wait_for_signal() -> None:
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        async for signum in signals:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            return
