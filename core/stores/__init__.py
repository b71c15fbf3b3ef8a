"""Stores: where graphs, runs, checkpoints and logs live.

One abstract :class:`Store` (``base``), one module per backend, and one shared
contract test suite run against every backend.
"""

from __future__ import annotations

from .base import Cursor, Notifier, Page, Store, StoredGraph
from .memory import MemoryStore
from .url import open_store_from_url

__all__ = [
    "Cursor",
    "MemoryStore",
    "Notifier",
    "Page",
    "Store",
    "StoredGraph",
    "open_store_from_url",
]
