"""Service settings: one frozen object built by the CLI (or an embedder) and given to the app."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from trioflow import EngineLimits
from trioflow.expressions import Evaluator
from trioflow.tracing import available as tracing_available

from .auth import AuthSettings

EVALUATORS: tuple[str, ...] = get_args(Evaluator)
"""The condition evaluators an engine can use."""

LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
"""Host names served by default (with any port), besides the bound address."""

TRACING_MODES: tuple[str, ...] = ("auto", "on", "off")
"""``trioflow serve --tracing``: auto turns it on when OpenTelemetry is installed and configured."""

#: OpenTelemetry's standard variables that give traces somewhere to go.
OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_configured(environ: Mapping[str, str]) -> bool:
    """Whether OpenTelemetry's environment variables ask for traces to be exported.

    ``OTEL_TRACES_EXPORTER`` names the exporters (``none``: no traces); when
    it is not set, an OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) does. ``OTEL_SDK_DISABLED=true``
    turns everything off.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {
        name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")
    } - {""}
    if exporters:
        return bool(exporters - {"none"})
    return any(environ.get(name, "").strip() for name in OTLP_ENDPOINT_VARIABLES)


def tracing_enabled(mode: str, environ: Mapping[str, str]) -> bool:
    """Whether ``trioflow serve --tracing MODE`` traces, given the environment.

    ``off``: never; ``on``: always; ``auto``: when opentelemetry is installed
    and :func:`tracing_configured`.

    Raises:
        ValueError: an unknown mode, or ``on`` without opentelemetry installed.
    """
    if mode not in TRACING_MODES:
        raise ValueError(f"--tracing must be one of {', '.join(TRACING_MODES)} (got {mode!r})")
    if mode == "off":
        return False
    if mode == "on":
        if not tracing_available():
            raise ValueError(
                "--tracing on: OpenTelemetry is not installed; install it with "
                "pip install 'trioflow[otel]', or use --tracing auto or off"
            )
        return True
    return tracing_configured(environ) and tracing_available()


@dataclass(frozen=True, slots=True)
class Settings:
    """What the service needs to know at start.

    Attributes:
        store_url: where graphs and runs live when the app opens its own
            engine (``memory://``, ``sqlite:///PATH``); ignored when an
            engine is handed to :func:`web.app.create_app`.
        tool_modules: operator-named modules whose ``register(registry)`` is
            called at start, after the built-in tools and the entry points.
        entry_points: call every ``register(registry)`` that installed
            distributions declare in the ``trioflow.tools`` entry-point group
            at start (``trioflow serve --no-entry-points`` turns it off).
        graph_files: graph documents (JSON files) registered at start; a file
            that cannot be read or is not a valid graph is skipped with a
            warning line.
        limits: the engine's process-wide bounds.
        evaluator: the condition evaluator of the engine the app opens
            (``"compiled"`` or ``"asteval"``); ignored when an engine is handed in.
        max_body_bytes: request bodies above this get 413 before they are read whole.
        heartbeat_s: an idle SSE stream gets a comment line this often.
        allowed_hosts: ``Host`` names served (compared without the port,
            case-insensitively); any other gets 421. The loopback names and
            the address the server is bound to are always served; ``"*"``
            serves any host (behind a proxy that checks it).
        allowed_origins: ``Origin`` values (``scheme://host[:port]``) allowed
            to make requests and open WebSockets besides same-origin ones;
            any other gets 403. Requests without an ``Origin`` (non-browser
            clients) are always allowed; ``"*"`` allows every origin.
        send_timeout_s: a connection whose client accepts no data for this
            long while the server writes to it (a follower that never
            reads) is closed and everything it held is freed.
        access_log: log one line per request (logger ``trioflow.access``,
            see :mod:`web.serverlog`); false leaves the middleware out.
        node_id: this server's node id on a PostgreSQL store (default: host,
            pid and start time); refused with any other store.
        lease_ttl: seconds a run's lease lasts without a renewal (PostgreSQL).
        claim_interval: seconds between scans for runs to claim (PostgreSQL).
        drain_timeout_s: on shutdown, seconds the nodes in flight get to finish
            (each run then stops at its step boundary; on PostgreSQL another
            node takes it over at once).
        auth: access control (API tokens; see :class:`web.auth.AuthSettings`).
        bind_host: the address the server listens on: access control is
            always required when it is not a loopback address.
        tracing: make OpenTelemetry spans of runs and steps with the global
            tracer provider (see :mod:`trioflow.tracing`); ignored when an
            engine is handed in (call its :meth:`~trioflow.Engine.trace`).
    """

    store_url: str = "memory://"
    tool_modules: tuple[str, ...] = ()
    entry_points: bool = True
    graph_files: tuple[str, ...] = ()
    limits: EngineLimits = field(default_factory=EngineLimits)
    evaluator: Evaluator = "compiled"
    max_body_bytes: int = 1 << 20
    heartbeat_s: float = 15.0
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    send_timeout_s: float = 30.0
    access_log: bool = True
    node_id: str | None = None
    lease_ttl: float | None = None
    claim_interval: float | None = None
    drain_timeout_s: float = 10.0
    auth: AuthSettings = field(default_factory=AuthSettings)
    bind_host: str = "127.0.0.1"
    tracing: bool = False

    @property
    def loopback_bind(self) -> bool:
        """Whether ``bind_host`` is a loopback address (only this machine can connect)."""
        import ipaddress

        host = self.bind_host.strip("[]")
        if host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False  # a name: whatever it resolves to, assume the network

    def shared_store_options(self) -> dict[str, Any]:
        """The options given for a shared (PostgreSQL) store, for ``open_store_from_url``."""
        options: dict[str, Any] = {}
        if self.node_id is not None:
            options["node_id"] = self.node_id
        if self.lease_ttl is not None:
            options["lease_ttl"] = self.lease_ttl
        if self.claim_interval is not None:
            options["claim_interval"] = self.claim_interval
        return options

    def __post_init__(self) -> None:
        if self.evaluator not in EVALUATORS:
            raise ValueError(
                f"unknown evaluator {self.evaluator!r}; use one of {', '.join(EVALUATORS)}"
            )
        if not self.send_timeout_s > 0:
            raise ValueError("send_timeout_s must be > 0")
