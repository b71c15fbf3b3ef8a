"""Logging in to /ui in a real browser, on a server that requires tokens.

A module of its own: one Playwright instance runs at a time, and the other
browser tests' server has access control off. See ``browser_support``.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from browser_support import TRIOFLOW, Watch, chromium, serve


def test_login_with_a_token_into_an_httponly_cookie(
    browser_available: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    db = tmp_path_factory.mktemp("ui-auth") / "auth.db"
    made = subprocess.run(
        [
            *TRIOFLOW,
            "token",
            "create",
            "--store",
            f"sqlite:///{db}",
            "--name",
            "ops",
            "--role",
            "viewer",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    token = re.search(r"tf_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", made.stdout)
    assert token is not None, made.stdout
    with (
        serve(["--store", f"sqlite:///{db}", "--samples", "--auth", "on"]) as url,
        chromium(tmp_path_factory.mktemp("chromium-auth")) as context,
    ):
        page = context.new_page()
        watch = Watch.page(page, url)
        page.goto(f"{url}/ui/graphs")
        page.wait_for_url(re.compile(r".*/ui/login\?next=.*"))
        page.fill("#token", "tf_0123456789abcdef_" + "x" * 43)
        page.click("#login-form button[type=submit]")
        problem = page.locator("#login-problem")
        problem.wait_for()  # shown once the server has answered
        assert "401" in problem.inner_text()
        page.fill("#token", token.group(0))
        page.click("#login-form button[type=submit]")
        page.wait_for_url(re.compile(r".*/ui/graphs$"))
        assert "ops (viewer)" in page.locator("header .who").inner_text()
        # Already logged in, the login page goes straight on (a link from another
        # site lands there: it arrives without the strict cookie).
        page.goto(f"{url}/ui/login?next=/ui")
        page.wait_for_url(re.compile(r"^http://[^/]+/ui$"))
        # The cookie is there, and no script can read it.
        cookies = {c["name"]: c for c in context.cookies()}
        assert cookies["trioflow_session"]["httpOnly"] is True
        assert cookies["trioflow_session"]["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""
        # A viewer gets no start form; the page says why.
        page.goto(f"{url}/ui/graphs/code-review-a")
        page.locator(".mermaid-box[data-rendered] svg").wait_for()
        assert page.locator("#start-form").count() == 0
        assert "role runner" in page.locator("section.start-run").inner_text()
        page.click("#logout")
        page.wait_for_url(re.compile(r".*/ui/login$"))
        page.goto(f"{url}/ui")
        page.wait_for_url(re.compile(r".*/ui/login\?next=.*"))
        watch.expect_status(401)  # the bad token's
        watch.check()
