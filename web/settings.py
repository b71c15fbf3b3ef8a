"""Service settings: one frozen object built by the CLI (or an embedder) and given to the app."""

from __future__ import annotations

from dataclasses import dataclass, field

from core import EngineLimits


@dataclass(frozen=True, slots=True)
class Settings:
    """What the service needs to know at start.

    Attributes:
        store_url: where graphs and runs live when the app opens its own
            engine (``memory://``, ``sqlite:///PATH``); ignored when an
            engine is handed to :func:`web.app.create_app`.
        tool_modules: operator-named modules whose ``register(registry)`` is
            called at start, after the built-in tools.
        graph_files: graph documents (JSON files) registered at start.
        limits: the engine's process-wide bounds.
        max_body_bytes: request bodies above this get 413 before they are read whole.
        heartbeat_s: an idle SSE stream gets a comment line this often.
    """

    store_url: str = "memory://"
    tool_modules: tuple[str, ...] = ()
    graph_files: tuple[str, ...] = ()
    limits: EngineLimits = field(default_factory=EngineLimits)
    max_body_bytes: int = 1 << 20
    heartbeat_s: float = 15.0
