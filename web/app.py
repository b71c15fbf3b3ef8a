"""The Starlette application: routes, error mapping, the request guard, the engine's lifetime."""

from __future__ import annotations

import importlib
import json
import logging
import os
import traceback
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from importlib.metadata import entry_points
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.middleware import Middleware

import trioflow
from trioflow import (
    Engine,
    EngineError,
    Registry,
    RegistryError,
    default_registry,
    open_engine,
    open_store_from_url,
)
from trioflow.registry import ENTRY_POINT_GROUP
from trioflow.tracing import TracerProvider, global_tracer_provider, global_tracer_provider_set

from .auth import Authority
from .errors import EXCEPTION_HANDLERS
from .guard import RequestGuard
from .metrics import Metrics
from .openapi import openapi_bytes
from .routes import starlette_routes
from .serverlog import AccessLog
from .services import Lifecycle, Services
from .settings import Settings

log = logging.getLogger("trioflow.web")


def redact_url(url: str) -> str:
    """``url`` without the password of its user part (``scheme://user:***@host/...``)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.partition("@")
    if not sep or not at or ":" not in userinfo or "/" in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


_ENGINE_DIR = os.path.dirname(trioflow.__file__) + os.sep


def _where(exc: BaseException) -> str:
    """`` (file, line N)``: where the operator's code raised ``exc``.

    Frames of the import machinery and of trioflow itself are skipped: the
    line to look at is in the tool module.
    """
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({_shown_path(exc.filename)}, line {exc.lineno})"
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(("<", _ENGINE_DIR)) and "importlib" not in f.filename
    ]
    if not frames:
        return ""
    return f" ({_shown_path(frames[-1].filename)}, line {frames[-1].lineno})"


def _shown_path(path: str) -> str:
    """``path`` relative to the current directory when it is inside it."""
    here = os.getcwd() + os.sep
    return path[len(here) :] if path.startswith(here) else path


def _cause(exc: BaseException) -> str:
    text = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_tool_module(registry: Registry, module: str) -> None:
    """Import ``module`` and call its ``register(registry)``.

    Raises:
        RegistryError: in one line, naming the module and the cause: it cannot
            be imported (or raised while importing), has no ``register``, or
            ``register`` raised.
    """
    if module.endswith(".py") or "/" in module or os.sep in module:
        name = os.path.splitext(os.path.basename(module))[0]
        raise RegistryError(
            f"tool module {module!r} is a file name: --tools takes a module name, such as "
            f"{name!r} for {name}.py in the current directory"
        )
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise RegistryError(
                f"cannot import tool module {module!r}: no module named {exc.name!r} in the "
                f"current directory ({os.getcwd()}) or the installed packages"
            ) from None
        raise RegistryError(
            f"cannot import tool module {module!r}: {_cause(exc)}{_where(exc)}"
        ) from None
    except Exception as exc:
        raise RegistryError(
            f"cannot import tool module {module!r}: {_cause(exc)}{_where(exc)}"
        ) from None
    register = getattr(imported, "register", None)
    if not callable(register):
        where = getattr(imported, "__file__", None)
        if where is None:
            # A directory without __init__.py: a namespace package, often a
            # project checkout that shadows the package of the same name.
            places = ", ".join(getattr(imported, "__path__", ()))
            raise RegistryError(
                f"tool module {module!r} is a directory without __init__.py ({places}), "
                "not a module with register(registry); is it hiding the package of that name?"
            )
        raise RegistryError(
            f"tool module {module!r} has no register(registry) function ({_shown_path(where)})"
        )
    try:
        register(registry)
    except Exception as exc:
        cause = exc.message if isinstance(exc, EngineError) else _cause(exc)
        raise RegistryError(
            f"tool module {module!r}: register(registry) failed: {cause}{_where(exc)}"
        ) from None


_SKIP_HINT = " (--no-entry-points skips the tools of installed packages)"


def load_entry_point_tools(registry: Registry) -> list[str]:
    """Call every ``register(registry)`` of the ``trioflow.tools`` entry-point group.

    Returns the names of the entry points loaded.

    Raises:
        RegistryError: in one line, naming the entry point, its distribution
            and the cause.
    """
    loaded: list[str] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "an unknown distribution"
        what = f"{ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}, from {dist})"
        try:
            register = ep.load()
        except Exception as exc:
            raise RegistryError(
                f"cannot load the {what}: {_cause(exc)}{_where(exc)}{_SKIP_HINT}"
            ) from None
        if not callable(register):
            raise RegistryError(f"the {what} is not callable{_SKIP_HINT}")
        try:
            register(registry)
        except Exception as exc:
            cause = exc.message if isinstance(exc, EngineError) else _cause(exc)
            raise RegistryError(f"the {what} failed: {cause}{_where(exc)}{_SKIP_HINT}") from None
        loaded.append(ep.name)
    return loaded


def build_registry(tool_modules: tuple[str, ...], *, entry_points: bool = False) -> Registry:
    """The built-in tools, the installed ``trioflow.tools`` entry points, the named modules.

    Args:
        tool_modules: modules whose ``register(registry)`` is called, in order.
        entry_points: load the ``trioflow.tools`` entry-point group first.

    Raises:
        RegistryError: a module or an entry point cannot be loaded (one line).
    """
    registry = default_registry()
    if entry_points:
        load_entry_point_tools(registry)
    for module in tool_modules:
        load_tool_module(registry, module)
    return registry


async def _register_files(engine: Engine, paths: tuple[str, ...]) -> tuple[int, int]:
    """Register each graph file; one warning line per file that fails. (loaded, skipped)."""
    loaded = skipped = 0
    for path in paths:
        try:
            text = await trio.Path(path).read_text()
            document = json.loads(text)
            graph = await engine.register_graph(document)
        except OSError as exc:
            log.warning("skipping graph file %s: cannot read it: %s", path, exc.strerror or exc)
        except ValueError as exc:
            log.warning("skipping graph file %s: not JSON: %s", path, exc)
        except EngineError as exc:
            log.warning("skipping graph file %s: %s", path, exc.message)
        else:
            log.info("registered graph %s from %s", graph.id, path)
            loaded += 1
            continue
        skipped += 1
    return loaded, skipped


async def _authority(app: Starlette, engine: Engine, settings: Settings) -> Authority:
    """The app's access control; refuses to start where it would leave the server open."""
    authority = Authority(engine.store, settings.auth, loopback=settings.loopback_bind)
    try:
        problem = await authority.startup_problem()
    except EngineError as exc:
        problem = f"cannot read the API tokens: {exc.message}"
    if problem is not None:
        app.state.startup_error = problem
        raise AuthStartupError(problem)
    return authority


def _tracer_provider() -> TracerProvider:
    """OpenTelemetry's global tracer provider, for the engine's spans (``--tracing``)."""
    if not global_tracer_provider_set():
        log.warning(
            "tracing is on, but no OpenTelemetry tracer provider is set in this process: "
            "spans are dropped until one is (run the server under opentelemetry-instrument; "
            "see docs/operations.md)"
        )
    return global_tracer_provider()


class AuthStartupError(Exception):
    """The server would be open to everyone who reaches it (see :mod:`web.auth`)."""


def create_app(engine: Engine | None = None, settings: Settings | None = None) -> Starlette:
    """Build the trioflow ASGI app.

    Args:
        engine: an open engine to serve (tests, embedding programs); the app
            uses it as is and never closes it. Without one, the app's lifespan
            opens an engine on ``settings.store_url`` with the built-in tools,
            the ``trioflow.tools`` entry points (unless
            ``settings.entry_points`` is false), ``settings.tool_modules`` and
            ``settings.evaluator``, registers ``settings.graph_files``, logs
            what it loaded, and closes the engine after the server has
            stopped (runs still in flight stay resumable in a durable store).
        settings: service settings (default: :class:`Settings()`).
    """
    settings = settings or Settings()
    lifecycle = Lifecycle()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[Mapping[str, Any]]:
        lifecycle.reset()
        if engine is not None:
            authority = await _authority(app, engine, settings)
            metrics = Metrics(engine)
            engine.observe(metrics)
            try:
                yield {"services": Services(engine, settings, lifecycle, authority, metrics)}
            finally:
                engine.observe(None)
            return
        async with AsyncExitStack() as stack:
            try:
                registry = build_registry(settings.tool_modules, entry_points=settings.entry_points)
            except EngineError as exc:
                app.state.startup_error = exc.message
                raise
            try:
                store = open_store_from_url(settings.store_url, **settings.shared_store_options())
                owned = await stack.enter_async_context(
                    open_engine(
                        store=store,
                        registry=registry,
                        limits=settings.limits,
                        evaluator=settings.evaluator,
                        drain_timeout=settings.drain_timeout_s,
                        tracer=_tracer_provider() if settings.tracing else None,
                    )
                )
            except EngineError as exc:
                # The server reports this in one line (web.serve.StartupError).
                where = settings.store_url
                app.state.startup_error = f"cannot open the store {where}: {exc.message}"
                raise
            loaded, skipped = await _register_files(owned, settings.graph_files)
            graphs = f"{loaded} graph(s) loaded from files"
            if skipped:
                graphs += f", {skipped} skipped"
            fields = {
                "store": redact_url(settings.store_url),
                "node": owned.node_id,
                "evaluator": owned.evaluator,
                "tools": len(registry.tools()),
                "graphs_loaded": loaded,
                "graphs_skipped": skipped,
                "runs_resumed": owned.active_runs,
                "tracing": settings.tracing,
            }
            # The node id matters where there are several (a PostgreSQL store).
            node = f", node {owned.node_id}" if owned.cluster is not None else ""
            log.info(
                "store %s%s, evaluator %s, %d tools, %s, %d run(s) resumed%s",
                fields["store"],
                node,
                owned.evaluator,
                fields["tools"],
                graphs,
                owned.active_runs,
                ", tracing on" if settings.tracing else "",
                extra={"fields": fields},
            )
            authority = await _authority(app, owned, settings)
            metrics = Metrics(owned)
            owned.observe(metrics)
            yield {"services": Services(owned, settings, lifecycle, authority, metrics)}

    # The access log is outermost: it sees the guard's refusals too.
    middleware = [Middleware(RequestGuard, settings=settings)]
    if settings.access_log:
        middleware.insert(0, Middleware(AccessLog))
    app = Starlette(
        routes=starlette_routes(),
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.lifecycle = lifecycle
    app.state.settings = settings
    app.state.startup_error = None
    app.state.openapi = openapi_bytes()
    return app


def lifecycle_of(app: Starlette) -> Lifecycle:
    """The app's :class:`Lifecycle`, for the server that runs it."""
    lifecycle = app.state.lifecycle
    if not isinstance(lifecycle, Lifecycle):
        raise TypeError("not an app made by web.app.create_app")
    return lifecycle


def settings_of(app: Starlette) -> Settings:
    """The app's :class:`Settings`, for the server that runs it."""
    settings = app.state.settings
    if not isinstance(settings, Settings):
        raise TypeError("not an app made by web.app.create_app")
    return settings
