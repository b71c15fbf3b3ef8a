"""App-lifetime objects, and how handlers reach them (lifespan state, never globals)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import trio
from starlette.requests import HTTPConnection

from trioflow import Engine

from .auth import Authority
from .metrics import Metrics
from .settings import Settings


class Lifecycle:
    """Tells long-lived handlers (log streams) that the server is going away.

    :func:`web.serve.serve` calls :meth:`drain` when a shutdown starts; every
    WebSocket follower then closes with 1001 and every SSE stream ends, while
    ordinary requests in flight run to completion.
    """

    def __init__(self) -> None:
        self.draining = trio.Event()

    def reset(self) -> None:
        """Start a new serving period (the app may be served more than once)."""
        self.draining = trio.Event()

    def drain(self) -> None:
        self.draining.set()

    @property
    def is_draining(self) -> bool:
        return self.draining.is_set()


@dataclass(frozen=True, slots=True)
class Services:
    """What every handler may use, put into the lifespan state as ``services``."""

    engine: Engine
    settings: Settings
    lifecycle: Lifecycle
    authority: Authority
    metrics: Metrics


def services(conn: HTTPConnection) -> Services:
    """The app's services for a request or WebSocket."""
    return cast(Services, conn.state.services)
