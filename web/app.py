"""The Starlette application: routes, error mapping, the request guard, the engine's lifetime."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.middleware import Middleware

from trioflow import (
    Engine,
    EngineError,
    Registry,
    default_registry,
    open_engine,
    open_store_from_url,
)

from .errors import EXCEPTION_HANDLERS
from .guard import RequestGuard
from .openapi import openapi_bytes
from .routes import starlette_routes
from .serverlog import AccessLog
from .services import Lifecycle, Services
from .settings import Settings

log = logging.getLogger("trioflow.web")


def build_registry(tool_modules: tuple[str, ...]) -> Registry:
    """The built-in tools plus every operator-named tool module.

    Raises:
        RegistryError: a module cannot be imported or does not register.
    """
    registry = default_registry()
    for module in tool_modules:
        registry.load_module(module)
    return registry


async def _register_files(engine: Engine, paths: tuple[str, ...]) -> None:
    for path in paths:
        try:
            text = await trio.Path(path).read_text()
            document = json.loads(text)
            graph = await engine.register_graph(document)
        except (OSError, ValueError) as exc:
            log.warning("skipping graph file %s: %s", path, exc)
        except EngineError as exc:
            log.warning("skipping graph file %s: %s", path, exc.message)
        else:
            log.info("registered graph %s from %s", graph.id, path)


def create_app(engine: Engine | None = None, settings: Settings | None = None) -> Starlette:
    """Build the trioflow ASGI app.

    Args:
        engine: an open engine to serve (tests, embedding programs); the app
            uses it as is and never closes it. Without one, the app's lifespan
            opens an engine on ``settings.store_url`` with the built-in tools
            plus ``settings.tool_modules`` and ``settings.evaluator``, and
            closes it after the server has stopped (runs still in flight stay
            resumable in a durable store).
        settings: service settings (default: :class:`Settings()`).
    """
    settings = settings or Settings()
    lifecycle = Lifecycle()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[Mapping[str, Any]]:
        lifecycle.reset()
        if engine is not None:
            yield {"services": Services(engine, settings, lifecycle)}
            return
        async with AsyncExitStack() as stack:
            try:
                registry = build_registry(settings.tool_modules)
                store = open_store_from_url(settings.store_url)
                owned = await stack.enter_async_context(open_engine(
                    store=store, registry=registry, limits=settings.limits,
                    evaluator=settings.evaluator))  # fmt: skip
                await _register_files(owned, settings.graph_files)
            except EngineError as exc:
                # The server reports this in one line (web.serve.StartupError).
                where = settings.store_url
                app.state.startup_error = f"cannot open the store {where}: {exc.message}"
                raise
            yield {"services": Services(owned, settings, lifecycle)}

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
