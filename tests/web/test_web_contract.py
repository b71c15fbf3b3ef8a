"""The OpenAPI document, and schemathesis fuzzing the live server against it.

Schemathesis is synchronous (``requests``), so the server runs in a thread
with its own ``trio.run``; the fuzzing is bounded and derandomised.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import trio
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from trioflow import open_engine
from trioflow.web import Settings, create_app, serve
from trioflow.web.openapi import build_openapi

DOCUMENT = build_openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    """A real Hypercorn server in a background thread, for the module."""
    yield from _live(auth=False)


ADMIN: list[str] = []


@pytest.fixture(scope="module")
def live_auth_url() -> Iterator[str]:
    """The same with access control on, and an admin token in ``ADMIN``."""
    yield from _live(auth=True)


def _live(auth: bool) -> Iterator[str]:
    from trioflow.web.auth import AuthSettings, make_token

    bound: queue.Queue[str | BaseException] = queue.Queue()
    tokens: list[trio.lowlevel.TrioToken] = []
    stop: list[trio.Event] = []

    async def main() -> None:
        stop.append(trio.Event())
        tokens.append(trio.lowlevel.current_trio_token())
        async with open_engine() as engine, trio.open_nursery() as nursery:
            settings = Settings(max_body_bytes=256 * 1024)
            if auth:
                record, text = make_token("fuzz", "admin", None, pepper=None, now=time.time())
                await engine.store.put_token(record)
                ADMIN[:] = [text]
                # A fuzzer is a fast client: no rate limit in the way.
                limits = AuthSettings(mode="on", rate=1e6, burst=10**6, run_rate=1e6)
                settings = Settings(max_body_bytes=256 * 1024, auth=limits)
            app = create_app(engine, settings)
            binds = await nursery.start(
                lambda task_status: serve(
                    app,
                    host="127.0.0.1",
                    port=0,
                    task_status=task_status,
                    shutdown_trigger=stop[0].wait,
                    handle_signals=False,
                    graceful_timeout=1,
                )
            )
            bound.put(binds[0])

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported to the test thread
            bound.put(exc)

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    url = bound.get(timeout=10)
    if isinstance(url, BaseException):
        raise url
    yield url
    trio.from_thread.run_sync(stop[0].set, trio_token=tokens[0])
    thread.join(timeout=10)
    assert not thread.is_alive()


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@schema.parametrize()
@settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_fuzz_finds_no_500_and_no_schema_break(case: Any, live_url: str) -> None:
    # Raises (fails the test) on a 500, a status code the schema does not
    # list, a wrong content type or a body that breaks the response schema.
    response = case.call_and_validate(base_url=live_url, checks=CHECKS, timeout=10)
    assert response.status_code < 500, (case.method, case.path, response.status_code)


@schema.parametrize()
@settings(
    max_examples=15,
    derandomize=True,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_fuzz_with_an_admin_token_finds_no_500(case: Any, live_auth_url: str) -> None:
    response = case.call_and_validate(
        base_url=live_auth_url,
        checks=CHECKS,
        timeout=10,
        headers={"Authorization": f"Bearer {ADMIN[0]}"},
    )
    assert response.status_code < 500, (case.method, case.path, response.status_code)


def test_openapi_covers_every_route() -> None:
    from trioflow.web.routes import STATIC_PATH, starlette_routes
    from trioflow.web.ui import UI_ACCESS

    paths = DOCUMENT["paths"]
    from starlette.routing import Route

    for route in starlette_routes():
        if not isinstance(route, Route):
            assert route.path == "/ws/logs/{run_id}"  # type: ignore[attr-defined]
            continue
        if route.path == STATIC_PATH:
            continue  # the /docs page's files, not an API operation
        if route.path in UI_ACCESS:
            assert route.path not in paths  # the dashboard's pages are not the API
            continue
        path = route.path
        methods = {m.lower() for m in route.methods or ()} - {"head"}
        assert methods <= set(paths[path]), path
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert operation["responses"], (method, path)
            bodiless = (
                "/graph/cancel/{run_id}",
                "/auth/ticket",
                "/auth/tokens/{token_id}/revoke",
                "/auth/logout",
            )
            if method == "post" and path not in bodiless:
                assert "requestBody" in operation
    assert DOCUMENT["openapi"].startswith("3.1")
    for name in ("LogMessage", "StatusMessage", "ErrorMessage", "ErrorResponse", "RunWithLogs"):
        assert name in DOCUMENT["components"]["schemas"]


def test_summaries_are_for_readers_of_the_api() -> None:
    # Internal notes (route order, implementation) belong in comments, not in the document.
    for operations in DOCUMENT["paths"].values():
        for operation in operations.values():
            assert "(after " not in operation["summary"], operation
