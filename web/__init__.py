"""trioflow's service: the Starlette app, Hypercorn serving, the CLI.

``create_app`` builds the ASGI app (REST, WebSocket and SSE); ``serve`` runs it
on Hypercorn's Trio worker with a graceful shutdown.
"""

from __future__ import annotations

from .app import create_app as create_app
from .serve import serve as serve
from .settings import Settings as Settings
