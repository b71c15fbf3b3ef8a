"""Choosing a store from a URL: ``memory://``, ``sqlite:///path``, ``postgresql://...``."""

from __future__ import annotations

from typing import Any

from ..errors import StoreError
from .base import Store
from .memory import MemoryStore

_SQLITE_OPTIONS = {
    "durability": ("sync", "async"),
    "synchronous": ("NORMAL", "FULL"),
}


def _sqlite_options(path: str) -> tuple[str, dict[str, Any]]:
    """``path?durability=async&synchronous=FULL`` -> the path and the store's options."""
    path, mark, query = path.partition("?")
    options: dict[str, Any] = {}
    if not mark:
        return path, options
    for part in query.split("&"):
        name, _, value = part.partition("=")
        allowed = _SQLITE_OPTIONS.get(name)
        if allowed is None:
            raise StoreError(
                f"unknown sqlite URL option {name!r}; the options are "
                + ", ".join(f"{k}={'|'.join(v)}" for k, v in _SQLITE_OPTIONS.items())
            )
        if value not in allowed:
            raise StoreError(f"sqlite URL option {name} must be one of {', '.join(allowed)}")
        options[name] = value
    return path, options


def open_store_from_url(url: str, **shared: Any) -> Store:
    """Build (not open) the store a URL names.

    ``sqlite:///PATH`` takes ``?durability=sync|async`` and
    ``?synchronous=NORMAL|FULL`` (see :class:`~core.stores.sqlite.SQLiteStore`).
    ``postgresql://user@host:port/db?schema=NAME`` (or ``postgres://``) is the
    store several engines share; ``schema`` is trioflow's own parameter, the
    others go to libpq. ``shared`` keyword arguments (``node_id``,
    ``lease_ttl``, ``claim_interval``) go to that store and are refused by
    the others.

    Raises:
        StoreError: the scheme is unknown, or an option does not apply to it.
    """
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore, parse_url

        dsn, options = parse_url(url)
        return PostgresStore(dsn, **options, **shared)
    if shared:
        names = ", ".join(sorted(shared))
        raise StoreError(f"{names} only apply to a postgresql:// store, not to {url!r}")
    if url in ("memory://", "memory:", "memory"):
        return MemoryStore()
    if url.startswith("sqlite://"):
        from .sqlite import SQLiteStore  # imported here: memory-only users skip sqlite3

        path = url[len("sqlite://") :]
        path, options = _sqlite_options(path)
        if path.startswith("/"):
            path = path[1:]  # sqlite:///rel.db -> rel.db ; sqlite:////abs.db -> /abs.db
        if not path:
            raise StoreError("sqlite URL needs a path, e.g. sqlite:///./trioflow.db")
        return SQLiteStore(path, **options)
    raise StoreError(
        f"unknown store URL {url!r}; use memory://, sqlite:///PATH or postgresql://..."
    )
