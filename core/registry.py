"""The registry: the only place graph documents can reach code through.

A graph names callables and state models by string; those strings are looked
up here and nowhere else. Nothing named in a graph is ever imported. Modules
are imported only when an operator names them (``--tools MODULE``) or when an
installed distribution declares a ``trioflow.tools`` entry point.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar, overload

from pydantic import BaseModel

from .errors import RegistryError

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=type[BaseModel])

ENTRY_POINT_GROUP = "trioflow.tools"


@dataclass(frozen=True, slots=True)
class Tool:
    """A registered node callable or condition callable.

    Attributes:
        name: the name graphs use.
        func: the callable.
        is_async: ``func`` is a coroutine function: it runs on the event loop.
        inline: a sync ``func`` that is cheap and non-blocking: called on the
            event loop instead of in a worker thread.
        arity: how many arguments ``func`` takes: 0, 1 (the state) or 2
            (the state and the ``RunContext``).
        description: free text for listings.
    """

    name: str
    func: Callable[..., Any]
    is_async: bool
    inline: bool
    arity: int
    description: str = ""


def _arity(func: Callable[..., Any], name: str) -> int:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"cannot inspect callable {name!r}: {exc}") from None
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values()):
        return 2
    if len(positional) > 2:
        raise RegistryError(
            f"callable {name!r} takes {len(positional)} required arguments; "
            "a tool takes (state) or (state, ctx)"
        )
    return len(positional)


class Registry:
    """Named tools (node and condition callables) and state models.

    Registering the same object twice under one name is a no-op; registering a
    different object under a taken name is an error (silent replacement would
    change what stored graphs do).
    """

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}
        self._models: dict[str, type[BaseModel]] = {}

    # -- tools ---------------------------------------------------------------

    def add_tool(
        self,
        name: str,
        func: Callable[..., Any],
        *,
        inline: bool = False,
        description: str | None = None,
    ) -> Tool:
        """Register ``func`` as the tool ``name``.

        Args:
            name: the name graph documents use, e.g. ``"review.lint"``.
            func: ``f(state)`` or ``f(state, ctx)``, sync or async, returning
                ``None``, a mapping of field updates or a whole state model.
            inline: run a sync ``func`` on the event loop (only for cheap,
                non-blocking code); otherwise it runs in a worker thread.
            description: shown in tool listings; defaults to the docstring.

        Raises:
            RegistryError: ``func`` is not callable, takes more than two
                arguments, or ``name`` is taken by another callable.
        """
        if not isinstance(name, str) or not name:
            raise RegistryError("tool name must be a non-empty string")
        if not callable(func):
            raise RegistryError(f"tool {name!r} is not callable")
        # An object whose __call__ is async is an async tool too.
        is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
            getattr(func, "__call__", None)  # noqa: B004 - the method itself, not callability
        )
        if inline and is_async:
            raise RegistryError(f"tool {name!r} is async; inline applies to sync tools only")
        existing = self._tools.get(name)
        if existing is not None:
            if existing.func == func:  # == so that a bound method registered twice matches
                return existing
            raise RegistryError(f"tool name {name!r} is already registered")
        tool = Tool(
            name=name,
            func=func,
            is_async=is_async,
            inline=inline,
            arity=_arity(func, name),
            description=description or (inspect.getdoc(func) or "").split("\n")[0],
        )
        self._tools[name] = tool
        return tool

    @overload
    def tool(self, name: str, *, inline: bool = False) -> Callable[[F], F]: ...
    @overload
    def tool(self, name: F) -> F: ...

    def tool(self, name: str | F, *, inline: bool = False) -> Callable[[F], F] | F:
        """Decorator form of :meth:`add_tool`: ``@registry.tool("name", inline=True)``."""
        if callable(name):
            func = name
            self.add_tool(f"{func.__module__}.{func.__qualname__}", func)
            return func
        tool_name = name

        def decorate(func: F) -> F:
            self.add_tool(tool_name, func, inline=inline)
            return func

        return decorate

    def get_tool(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def tools(self) -> Mapping[str, Tool]:
        return dict(self._tools)

    # -- state models ----------------------------------------------------------

    def add_model(self, name: str, model: type[BaseModel]) -> type[BaseModel]:
        """Register a Pydantic model as the state model ``name``.

        Raises:
            RegistryError: ``model`` is not a Pydantic model class or the name is taken.
        """
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise RegistryError(f"state model {name!r} must be a pydantic BaseModel subclass")
        existing = self._models.get(name)
        if existing is not None and existing is not model:
            raise RegistryError(f"state model name {name!r} is already registered")
        self._models[name] = model
        return model

    def model(self, name: str) -> Callable[[M], M]:
        """Decorator form of :meth:`add_model`."""

        def decorate(model: M) -> M:
            self.add_model(name, model)
            return model

        return decorate

    def get_model(self, name: str) -> type[BaseModel] | None:
        return self._models.get(name)

    def models(self) -> Mapping[str, type[BaseModel]]:
        return dict(self._models)

    # -- loading ---------------------------------------------------------------

    def load_module(self, module_path: str) -> None:
        """Import an operator-named module and let it register into this registry.

        The module must define ``register(registry)``; it is called once.

        Raises:
            RegistryError: the module cannot be imported or has no ``register``.
        """
        try:
            module = importlib.import_module(module_path)
        except ImportError as exc:
            raise RegistryError(f"cannot import tool module {module_path!r}: {exc}") from None
        register = getattr(module, "register", None)
        if not callable(register):
            raise RegistryError(f"tool module {module_path!r} has no register(registry) function")
        register(self)

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Call every ``register(registry)`` declared in the entry-point group.

        Returns:
            The names of the entry points loaded.
        """
        loaded = []
        for ep in entry_points(group=group):
            register = ep.load()
            if not callable(register):
                raise RegistryError(f"entry point {ep.name!r} is not callable")
            register(self)
            loaded.append(ep.name)
        return loaded

    def load_modules(self, module_paths: Iterable[str]) -> None:
        for path in module_paths:
            self.load_module(path)


def default_registry() -> Registry:
    """A registry holding the built-in tools (``tools.noop`` and friends)."""
    from .builtin_tools import register

    registry = Registry()
    register(registry)
    return registry


ToolFunc = Callable[..., Any | Awaitable[Any]]
