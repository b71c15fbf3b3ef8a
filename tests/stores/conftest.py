"""Store fixtures: every backend the contract suite runs against.

Backend-specific set-up lives here and nowhere else, so adding a backend
(PostgreSQL) is adding one branch to :func:`make_store`.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest
from pgtest import fresh_schema, pg_url

from trioflow.stores.base import Store
from trioflow.stores.memory import MemoryStore
from trioflow.stores.sqlite import SQLiteStore

BACKENDS = ["memory", "sqlite", "postgresql"]


def make_store(backend: str, tmp_path: pathlib.Path, schema: str | None = None) -> Store:
    """A new, unopened store of ``backend`` with no data (PostgreSQL: in ``schema``)."""
    if backend == "memory":
        return MemoryStore()
    if backend == "sqlite":
        return SQLiteStore(str(tmp_path / "contract.db"))
    if backend == "postgresql":
        from trioflow.stores.postgres import PostgresStore

        return PostgresStore(pg_url(), schema=schema, lease_ttl=3.0)
    raise ValueError(f"unknown store backend {backend!r}")


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Store]:
    """An opened, empty store of each backend; closed after the test."""
    if request.param == "postgresql":
        with fresh_schema() as schema:
            backend = make_store(request.param, tmp_path, schema)
            await backend.open()
            try:
                yield backend
            finally:
                await backend.aclose()
        return
    backend = make_store(request.param, tmp_path)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()
