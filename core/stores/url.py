"""Choosing a store from a URL: ``memory://``, ``sqlite:///path``."""

from __future__ import annotations

from ..errors import StoreError
from .base import Store
from .memory import MemoryStore


def open_store_from_url(url: str) -> Store:
    """Build (not open) the store a URL names.

    Raises:
        StoreError: the scheme is unknown.
    """
    if url in ("memory://", "memory:", "memory"):
        return MemoryStore()
    if url.startswith("sqlite://"):
        from .sqlite import SQLiteStore  # imported here: memory-only users skip sqlite3

        path = url[len("sqlite://") :]
        if path.startswith("/"):
            path = path[1:]  # sqlite:///rel.db -> rel.db ; sqlite:////abs.db -> /abs.db
        if not path:
            raise StoreError("sqlite URL needs a path, e.g. sqlite:///./trioflow.db")
        return SQLiteStore(path)
    raise StoreError(f"unknown store URL {url!r}; use memory:// or sqlite:///PATH")
