"""PostgreSQL for the tests: the server ``TRIOFLOW_TEST_PG`` names, one fresh schema per test.

Tests that need PostgreSQL skip, with the reason, when it cannot be reached;
with ``TRIOFLOW_REQUIRE_PG=1`` (CI) they fail instead.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress

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


class Cluster:
    """A throwaway PostgreSQL server of its own (initdb + pg_ctl), for restarts."""

    def __init__(self, directory: str, port: int, bindir: str) -> None:
        self.directory = directory
        self.port = port
        self._bindir = bindir
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        import subprocess

        command = [
            os.path.join(self._bindir, "pg_ctl"),
            "-D",
            self.directory,
            "-l",
            os.path.join(self.directory, "server.log"),
            *args,
        ]
        subprocess.run(_as_owner(command), check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-w", "-m", mode, "stop")


def _as_owner(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run as the postgres user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


def _bindir() -> str | None:
    import glob
    import shutil

    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(found)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(candidates[-1]) if candidates else None


@contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """A PostgreSQL server started for one test and removed after it."""
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _bindir()
    if bindir is None:
        reason = "initdb/pg_ctl are not installed (apt-get install postgresql)"
        if os.environ.get("TRIOFLOW_REQUIRE_PG") == "1":
            pytest.fail(f"TRIOFLOW_REQUIRE_PG=1 but {reason}")
        pytest.skip(reason)
    directory = tempfile.mkdtemp(prefix="trioflow-pg-")
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cluster = Cluster(directory, port, bindir)
    try:
        subprocess.run(
            _as_owner(
                [
                    os.path.join(bindir, "initdb"),
                    "-D",
                    directory,
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        cluster.start()
        yield cluster
    finally:
        with suppress(Exception):
            cluster.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
