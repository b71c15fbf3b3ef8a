"""What the browser tests share: Debian's headless Chromium driven by Playwright, and
``trioflow serve`` processes to point it at.

The browser is the system's ``/usr/bin/chromium`` (``apt-get install
chromium``); Playwright's own browser downloads are not used. Without
Chromium or the ``playwright`` package the tests skip, with the reason in
pytest's summary; with ``TRIOFLOW_REQUIRE_BROWSER=1`` (CI) they fail instead.

Screenshots and the lists of a page's requests go to ``artifacts/`` at the
repository root (ignored by git), overwritten on each run.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
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


def require_browser() -> None:
    """Skip the test (fail it with ``TRIOFLOW_REQUIRE_BROWSER=1``) if there is no browser."""
    reason = _missing()
    if reason is None:
        return
    if _browser_required():
        pytest.fail(f"TRIOFLOW_REQUIRE_BROWSER is set, but {reason}", pytrace=False)
    pytest.skip(f"browser test: {reason}")


@contextlib.contextmanager
def serve(args: Sequence[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """``trioflow serve --port 0 ARGS`` in a subprocess; yields its base URL."""
    process = subprocess.Popen(
        [*TRIOFLOW, "serve", "--port", "0", "--log-level", "warning", *args],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
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


@contextlib.contextmanager
def chromium(profile: pathlib.Path) -> Iterator[Any]:
    """A persistent headless Chromium context (1280x900, 30 s timeouts)."""
    from playwright.sync_api import sync_playwright

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


@dataclass
class Watch:
    """What a page did: console errors, uncaught exceptions, dialogs, every request."""

    origin: str
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)

    @classmethod
    def page(cls, page: Any, origin: str) -> Watch:
        watch = cls(_origin(origin))
        page.on("console", lambda m: m.type == "error" and watch.errors.append(m.text))
        page.on("pageerror", lambda exc: watch.errors.append(f"uncaught: {exc}"))
        page.on("request", lambda request: watch.requests.append(request))

        def dialog(d: Any) -> None:
            watch.dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", dialog)
        return watch

    def foreign(self) -> list[str]:
        """Requests to anything but the server (data: and blob: URLs are no requests)."""
        urls = (r.url for r in self.requests)
        return [
            u
            for u in urls
            if _origin(u) != self.origin and urlsplit(u).scheme not in ("data", "blob")
        ]

    def expect_status(self, status: int) -> None:
        """Forget the browser's own console line for an answer the test asked for."""
        line = f"Failed to load resource: the server responded with a status of {status} "
        self.errors = [e for e in self.errors if not e.startswith(line)]

    def check(self) -> None:
        assert self.errors == [], "console errors"
        assert self.dialogs == [], "a script opened a dialog"
        assert self.foreign() == [], "requests to other hosts"

    def save_requests(self, name: str) -> int:
        """Write each request with its status and bytes on the wire; return the total."""
        total = 0
        lines = []
        for request in self.requests:
            response = request.response()
            sizes = request.sizes()
            wire = sizes["responseHeadersSize"] + sizes["responseBodySize"]
            total += wire
            status = response.status if response is not None else "-"
            lines.append(f"{status} {wire:>9} {request.method} {request.url}")
        lines.append(f"total {total} bytes")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / name).write_text("\n".join(lines) + "\n")
        return total


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
