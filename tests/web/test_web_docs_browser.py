"""``/docs`` in a real browser: Debian's headless Chromium, driven by Playwright.

The server is ``trioflow serve --port 0 --store memory://`` in a subprocess,
as a user starts it. The browser is the system's ``/usr/bin/chromium``
(``apt-get install chromium``); Playwright's own browser downloads are not
used. Without Chromium or the ``playwright`` package these tests skip, with
the reason in pytest's summary; with ``TRIOFLOW_REQUIRE_BROWSER=1`` (CI) they
fail instead.

Screenshots and the list of the page's requests go to ``artifacts/`` at the
repository root (ignored by git), overwritten on each run.
"""

from __future__ import annotations

import os
import pathlib
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # No name resolves but the server's: nothing leaves the machine, whatever the page asks.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
TRIOFLOW = [sys.executable, "-c", "import sys; from trioflow.web.cli import main; sys.exit(main())"]

SEED_ENDPOINTS = {
    ("POST", "/graph/create"),
    ("POST", "/graph/run"),
    ("GET", "/graph/state/{run_id}"),
    ("POST", "/graph/cancel/{run_id}"),
}
PAGE_WEIGHT_BUDGET = 800_000
"""Bytes on the wire to load /docs (the bundle is 1.7 MB, about 460 kB gzipped)."""


def _browser_required() -> bool:
    return os.environ.get("TRIOFLOW_REQUIRE_BROWSER", "") not in ("", "0")


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (it is in the dev extra: make install)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser_available() -> None:
    reason = _missing()
    if reason is None:
        return
    if _browser_required():
        pytest.fail(f"TRIOFLOW_REQUIRE_BROWSER is set, but {reason}", pytrace=False)
    pytest.skip(f"browser test: {reason}")


@pytest.fixture(scope="module")
def server_url(browser_available: None) -> Iterator[str]:
    """``trioflow serve`` on a free port with a memory store, for the module."""
    process = subprocess.Popen(
        [*TRIOFLOW, "serve", "--port", "0", "--store", "memory://", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    try:
        line = _first_line(process, timeout=30)
        assert line.startswith("trioflow listening on http://127.0.0.1:"), line
        yield line.removeprefix("trioflow listening on ")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def _first_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    out = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"\n" not in out:
            left = deadline - time.monotonic()
            assert left > 0, "trioflow serve printed nothing in time"
            if selector.select(left):
                chunk = os.read(process.stdout.fileno(), 4096)
                assert chunk, f"trioflow serve exited ({process.wait()}) before listening"
                out += chunk
    return out.decode().splitlines()[0]


@dataclass
class Watch:
    """What a page did: console errors, uncaught exceptions, every request."""

    origin: str
    errors: list[str] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)

    def foreign(self) -> list[str]:
        """Requests to anything but the server (data: and blob: URLs are no requests)."""
        urls = (r.url for r in self.requests)
        return [
            u
            for u in urls
            if _origin(u) != self.origin and urlsplit(u).scheme not in ("data", "blob")
        ]

    def check(self) -> None:
        assert self.errors == [], "console errors on /docs"
        assert self.foreign() == [], "requests to other hosts"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@pytest.fixture(scope="module")
def browser_context(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(30_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context: Any, server_url: str) -> Iterator[tuple[Any, Watch]]:
    """A new tab on /docs, watched, once Swagger UI has rendered the operations."""
    page = browser_context.new_page()
    watch = Watch(_origin(server_url))
    page.on("console", lambda m: m.type == "error" and watch.errors.append(m.text))
    page.on("pageerror", lambda exc: watch.errors.append(f"uncaught: {exc}"))
    page.on("request", lambda request: watch.requests.append(request))
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


def _save_requests(name: str, watch: Watch) -> int:
    """Write each request with its status and bytes on the wire; return the total."""
    total = 0
    lines = []
    for request in watch.requests:
        response = request.response()
        sizes = request.sizes()
        wire = sizes["responseHeadersSize"] + sizes["responseBodySize"]
        total += wire
        status = response.status if response is not None else "-"
        lines.append(f"{status} {wire:>9} {request.method} {request.url}")
    lines.append(f"total {total} bytes")
    (ARTIFACTS / name).write_text("\n".join(lines) + "\n")
    return total


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
    weight = _save_requests("docs-requests.txt", watch)
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
