"""PostgreSQL for the tests: the server ``TRIOFLOW_TEST_PG`` names, one fresh schema per test.

Tests that need PostgreSQL skip, with the reason, when it cannot be reached;
with ``TRIOFLOW_REQUIRE_PG=1`` (CI) they fail instead.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def pg_url() -> str:
    return os.environ.get("TRIOFLOW_TEST_PG", DEFAULT_URL)


@functools.cache
def _unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'trioflow[postgresql]')"
    try:
        with psycopg.connect(pg_url(), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {pg_url()} is unreachable: {exc}".strip()
    return None


def require_pg() -> None:
    """Skip (or, with TRIOFLOW_REQUIRE_PG=1, fail) when PostgreSQL cannot be used."""
    reason = _unreachable()
    if reason is None:
        return
    if os.environ.get("TRIOFLOW_REQUIRE_PG") == "1":
        pytest.fail(f"TRIOFLOW_REQUIRE_PG=1 but {reason}")
    pytest.skip(reason)


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(pg_url(), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A new schema name (the store creates it); dropped, with all in it, afterwards."""
    require_pg()
    schema = "t_" + secrets.token_hex(6)
    try:
        yield schema
    finally:
        drop_schema(schema)


def store_url(schema: str) -> str:
    """The ``postgresql://`` store URL for ``schema``."""
    base = pg_url()
    return f"{base}{'&' if '?' in base else '?'}schema={schema}"
