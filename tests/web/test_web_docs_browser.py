"""``/docs`` in a real browser: Debian's headless Chromium, driven by Playwright.

The server is ``trioflow serve --port 0 --store memory://`` in a subprocess,
as a user starts it (see ``browser_support`` for the browser, and what makes
these tests skip or fail when it is missing).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from browser_support import ARTIFACTS, Watch, chromium, serve

SEED_ENDPOINTS = {
    ("POST", "/graph/create"),
    ("POST", "/graph/run"),
    ("GET", "/graph/state/{run_id}"),
    ("POST", "/graph/cancel/{run_id}"),
}
PAGE_WEIGHT_BUDGET = 800_000
"""Bytes on the wire to load /docs (the bundle is 1.7 MB, about 460 kB gzipped)."""


@pytest.fixture(scope="module")
def server_url(browser_available: None) -> Iterator[str]:
    """``trioflow serve`` on a free port with a memory store, for the module."""
    with serve(["--store", "memory://"]) as url:
        yield url


@pytest.fixture(scope="module")
def browser_context(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def page(browser_context: Any, server_url: str) -> Iterator[tuple[Any, Watch]]:
    """A new tab on /docs, watched, once Swagger UI has rendered the operations."""
    page = browser_context.new_page()
    watch = Watch.page(page, server_url)
    page.goto(f"{server_url}/docs")
    page.locator(".opblock").first.wait_for()
    try:
        yield page, watch
    finally:
        page.close()


def _operation(page: Any, method: str, path: str) -> Any:
    return page.locator(f".opblock-{method.lower()}").filter(
        has=page.locator(f'.opblock-summary-path[data-path="{path}"]')
    )


def test_docs_loads_from_the_server_alone_and_lists_the_endpoints(
    page: tuple[Any, Watch],
) -> None:
    tab, watch = page
    tab.wait_for_load_state("networkidle")
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / "docs.png"), full_page=True)

    listed = set()
    for block in tab.locator(".opblock").all():
        method = block.locator(".opblock-summary-method").inner_text().strip()
        path = block.locator(".opblock-summary-path").get_attribute("data-path")
        listed.add((method, path))
    assert listed >= SEED_ENDPOINTS
    assert ("GET", "/healthz") in listed
    assert tab.title().startswith("trioflow ")

    watch.check()
    fetched = {urlsplit(r.url).path for r in watch.requests}
    assert {"/docs", "/openapi.json", "/static/docs.js"} <= fetched
    weight = watch.save_requests("docs-requests.txt")
    assert weight < PAGE_WEIGHT_BUDGET, f"/docs loads {weight} bytes"


def test_try_it_out_on_healthz_and_create(page: tuple[Any, Watch], server_url: str) -> None:
    tab, watch = page
    health = _operation(tab, "GET", "/healthz")
    health.locator(".opblock-summary-control").click()
    health.get_by_role("button", name="Try it out").click()
    health.get_by_role("button", name="Execute").click()
    answer = health.locator(".live-responses-table .response .response-col_status")
    answer.wait_for()
    assert answer.inner_text().strip() == "200"
    assert '"status": "ok"' in health.locator(".live-responses-table").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    health.screenshot(path=str(ARTIFACTS / "docs-healthz.png"))

    # A POST from the page carries its Origin and a JSON body: the guard lets it through.
    create = _operation(tab, "POST", "/graph/create")
    create.locator(".opblock-summary-control").click()
    create.get_by_role("button", name="Try it out").click()
    with tab.expect_request(lambda r: r.method == "POST") as sent:
        create.get_by_role("button", name="Execute").click()
    headers = sent.value.all_headers()
    assert headers["origin"] == watch.origin
    assert headers["content-type"].startswith("application/json")
    answer = create.locator(".live-responses-table .response .response-col_status")
    answer.wait_for()
    assert answer.inner_text().strip() == "201"  # the example graph, new to this server

    watch.check()
