"""The /ui pages in a real browser: Debian's headless Chromium, driven by Playwright.

The server is ``trioflow serve --port 0 --samples`` on a SQLite file, in a
subprocess, as a user starts it; runs are made through its HTTP API. Every
page is watched (``browser_support.Watch``): a console error (a Mermaid
parse error, a Content-Security-Policy violation, an uncaught exception), a
dialog opened by a script, or a request to another host fails the test.

Screenshots go to ``artifacts/``; ``run-live.png`` is the README's picture.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from browser_support import ARTIFACTS, Watch, chromium, serve

SLOW = {
    "id": "ui.slow",
    "name": "Two sleepers taking turns",
    "start_node": "ping",
    "nodes": [
        {"id": "ping", "callable": "tools.sleep"},
        {"id": "pong", "callable": "tools.sleep"},
        {"id": "done", "callable": "tools.noop"},
    ],
    "edges": [
        {"from": "ping", "to": "pong"},
        {"from": "pong", "to": "done", "type": "branch", "condition": {"expression": "False"}},
        {"from": "pong", "to": "ping", "type": "loop", "loop": {"max_iterations": 200}},
    ],
}
FAIL = {"id": "ui.fail", "start_node": "a", "nodes": [{"id": "a", "callable": "tools.fail"}]}
FAN = {
    "id": "ui.fan",
    "start_node": "fan",
    "nodes": [
        {
            "id": "fan",
            "map": {
                "items": "[0.5, 4]",
                "as": "sleep_s",
                "branch": {
                    "start_node": "nap",
                    "nodes": [{"id": "nap", "callable": "tools.sleep"}],
                },
            },
        }
    ],
}
ASK = {
    "id": "ui.ask",
    "start_node": "check",
    "nodes": [
        {"id": "check", "callable": "tools.noop"},
        {
            "id": "human",
            "wait": {
                "prompt": "Approve the change?",
                "input_schema": {
                    "type": "object",
                    "properties": {
                        "approved": {"type": "boolean"},
                        "comment": {"type": "string", "maxLength": 20},
                    },
                    "required": ["approved"],
                    "additionalProperties": False,
                },
            },
        },
        {"id": "merge", "callable": "tools.approve"},
    ],
    "edges": [{"from": "check", "to": "human"}, {"from": "human", "to": "merge"}],
}
HOSTILE = "<img src=x onerror=alert(1)><script>alert(2)</script>\"'"
HOSTILE_GRAPH = {
    "id": "ui.hostile",
    "name": HOSTILE,
    "start_node": "a",
    "nodes": [{"id": "a", "callable": "tools.noop"}, {"id": "b", "callable": "tools.fail"}],
    "edges": [
        {
            "from": "a",
            "to": "b",
            "type": "branch",
            "condition": {"expression": f"context.get('note') == {HOSTILE!r}"},
        }
    ],
}

PAGE_WEIGHT_BUDGET = 1_000_000
"""Bytes on the wire to load a run page with its picture (Mermaid is most of it)."""


class Api:
    def __init__(self, base_url: str) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=30)

    def create(self, document: dict[str, Any]) -> None:
        response = self.client.post("/graph/create", json=document)
        assert response.status_code in (200, 201), response.text

    def start(self, graph_id: str, state: dict[str, Any] | None = None) -> str:
        response = self.client.post(
            "/graph/run", json={"graph_id": graph_id, "initial_state": state, "background": True}
        )
        assert response.status_code == 202, response.text
        run_id: str = response.json()["run_id"]
        return run_id

    def state(self, run_id: str) -> dict[str, Any]:
        response = self.client.get(f"/graph/state/{run_id}", params={"logs": 0})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def until(self, run_id: str, *statuses: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:
            state = self.state(run_id)
            if state["status"] in statuses:
                return state
            assert time.monotonic() < deadline, (run_id, state["status"], statuses)
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(browser_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    db = tmp_path_factory.mktemp("ui") / "ui.db"
    with serve(["--store", f"sqlite:///{db}", "--samples"]) as url:
        yield url


@pytest.fixture(scope="module")
def api(server: str) -> Iterator[Api]:
    api = Api(server)
    for document in (SLOW, FAIL, ASK, HOSTILE_GRAPH, FAN):
        api.create(document)
    yield api
    api.client.close()


@pytest.fixture(scope="module")
def browser(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def tab(browser: Any, server: str) -> Iterator[tuple[Any, Watch]]:
    page = browser.new_page()
    watch = Watch.page(page, server)
    try:
        yield page, watch
    finally:
        page.close()


def shoot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def shown_seqs(page: Any) -> list[int]:
    """The seqs of the log rows on a run page, top to bottom."""
    found = page.eval_on_selector_all("#log-rows tr", "rows => rows.map(r => r.dataset.seq)")
    return [int(seq) for seq in found]


def last_seq_above(page: Any, seq: int, timeout: float = 30_000) -> None:
    page.wait_for_function(
        "seq => Number(document.querySelector('#log-rows tr:last-child').dataset.seq) > seq",
        arg=seq,
        timeout=timeout,
    )


def wait_drawn(page: Any) -> Any:
    """The picture once Mermaid has drawn it (an SVG, no error)."""
    page.locator(".mermaid-box[data-rendered] svg").first.wait_for()
    assert page.locator(".mermaid-box .problem").count() == 0
    return page.locator(".mermaid-box svg").first


def test_runs_list_shows_statuses_filters_and_new_runs(
    tab: tuple[Any, Watch], api: Api, server: str
) -> None:
    page, watch = tab
    completed = api.start("code-review-a", {"issues_open": 0})
    failed = api.start("ui.fail", {"fail_message": "no luck"})
    waiting = api.start("ui.ask")
    running = api.start("ui.slow", {"sleep_s": 30})
    cancelled = api.start("ui.slow", {"sleep_s": 30})
    api.until(completed, "completed")
    api.until(failed, "failed")
    api.until(waiting, "waiting")
    api.until(running, "running")
    assert api.client.post(f"/graph/cancel/{cancelled}").status_code == 200

    page.goto(f"{server}/ui")
    for run_id, status in (
        (completed, "completed"),
        (failed, "failed"),
        (waiting, "waiting"),
        (running, "running"),
        (cancelled, "cancelled"),
    ):
        row = page.locator(f'tr[data-run-id="{run_id}"]')
        assert row.locator(f".chip.status-{status}").count() == 1, status
    shoot(page, "ui-runs.png")

    # A status chip filters the list.
    page.locator('#live a.chip[data-status="failed"]').click()
    page.wait_for_url(re.compile(r".*status=failed.*"))
    statuses = page.locator("table.runs tbody .chip").all_inner_texts()
    assert statuses and set(statuses) == {"failed"}
    assert page.locator(f'tr[data-run-id="{failed}"]').count() == 1

    # The graph filter (a form).
    page.goto(f"{server}/ui")
    page.fill('input[name="graph_id"]', "ui.ask")
    page.click(".filters button[type=submit]")
    page.wait_for_url(re.compile(r".*graph_id=ui\.ask.*"))
    ids = [r.get_attribute("data-run-id") for r in page.locator("tr[data-run-id]").all()]
    assert ids == [waiting]

    # Live: a run started now appears, and a status change shows, without a reload.
    page.goto(f"{server}/ui")
    fresh = api.start("ui.fail", {"fail_message": "later"})
    page.locator(f'tr[data-run-id="{fresh}"] .chip.status-failed').wait_for(timeout=10_000)
    assert api.client.post(f"/graph/cancel/{running}").status_code == 200
    page.locator(f'tr[data-run-id="{running}"] .chip.status-cancelled').wait_for(timeout=10_000)
    watch.check()


def test_run_page_follows_the_run_live_and_cancels_it(
    tab: tuple[Any, Watch], api: Api, server: str
) -> None:
    page, watch = tab
    run_id = api.start("ui.slow", {"sleep_s": 0.4})
    api.until(run_id, "running")
    page.goto(f"{server}/ui/runs/{run_id}")
    svg = wait_drawn(page)
    rows = page.locator("#log-rows tr")
    first = int(rows.last.get_attribute("data-seq"))
    # Rows arrive over the stream, in order, none missing.
    last_seq_above(page, first + 8)
    seqs = [
        int(s) for s in page.eval_on_selector_all("#log-rows tr", "e => e.map(r => r.dataset.seq)")
    ]
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    # The node running now is marked in the picture.
    current = page.wait_for_function(
        "() => document.querySelector('.mermaid-box svg g.node.current')?.textContent",
        timeout=10_000,
    ).json_value()
    assert current.startswith(("ping", "pong")), current
    assert svg.locator("g.node.visited").count() >= 1
    assert page.locator("#run-status .chip").inner_text() == "running"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "run-live.png"))

    page.click("#cancel")
    page.locator("#run-status .chip.status-cancelled").wait_for(timeout=10_000)
    assert api.state(run_id)["status"] == "cancelled"
    page.locator("#cancel").wait_for(state="hidden")
    page.wait_for_function(
        "() => document.getElementById('live-note').textContent.includes('ended')"
    )
    # Every entry of the log is on the page: the stream lost none, the last is the end.
    total = api.state(run_id)["last_seq"]
    last_seq_above(page, total - 1)
    seqs = [
        int(s) for s in page.eval_on_selector_all("#log-rows tr", "e => e.map(r => r.dataset.seq)")
    ]
    assert seqs == list(range(seqs[0], total + 1))
    assert page.locator("#log-rows tr").last.inner_text().find("run_cancelled") >= 0
    shoot(page, "ui-run-cancelled.png")
    weight = watch.save_requests("ui-run-requests.txt")
    assert weight < PAGE_WEIGHT_BUDGET, f"the run page loaded {weight} bytes"
    watch.check()


def test_load_earlier_pages_back_through_a_long_log(
    tab: tuple[Any, Watch], api: Api, server: str
) -> None:
    page, watch = tab
    run_id = api.start("ui.slow", {"sleep_s": 0})
    final = api.until(run_id, "completed", "failed")
    total = final["last_seq"]
    assert total > 600
    page.goto(f"{server}/ui/runs/{run_id}")
    rows = page.locator("#log-rows tr")
    assert rows.count() == 200
    presses = 0
    while page.locator("#load-earlier").is_visible():
        before = rows.count()
        page.click("#load-earlier")
        page.wait_for_function(
            "n => document.querySelectorAll('#log-rows tr').length > n", arg=before
        )
        presses += 1
    seqs = [
        int(s) for s in page.eval_on_selector_all("#log-rows tr", "e => e.map(r => r.dataset.seq)")
    ]
    assert seqs == list(range(1, total + 1))
    assert presses == -(-(total - 200) // 200)
    watch.check()


def test_a_followed_page_keeps_its_last_rows_and_the_earlier_ones_asked_for(
    tab: tuple[Any, Watch], api: Api, server: str
) -> None:
    """Following keeps the page's last rows (LOG_KEEP, 2,000: made 30 here by rewriting
    the page on its way to the browser); rows the reader loaded stay."""
    page, watch = tab
    run_id = api.start("ui.slow", {"sleep_s": 0.05})
    api.until(run_id, "running")

    def smaller(route: Any) -> None:
        response = route.fetch()
        body = re.sub(r'data-log-keep="\d+"', 'data-log-keep="30"', response.text())
        route.fulfill(response=response, body=body)

    page.route(re.compile(r".*/ui/runs/[0-9a-f]+$"), smaller)
    first_seq = api.state(run_id)["last_seq"]
    page.goto(f"{server}/ui/runs/{run_id}")
    last_seq_above(page, first_seq + 45)
    rows = page.locator("#log-rows tr")
    assert rows.count() == 30
    seqs = shown_seqs(page)
    assert seqs == list(range(seqs[0], seqs[0] + 30))
    before = shown_seqs(page)[0]
    page.click("#load-earlier")
    page.wait_for_function(
        "n => Number(document.querySelector('#log-rows tr').dataset.seq) < n", arg=before
    )
    loaded = shown_seqs(page)[0]
    assert loaded == max(1, before - 200)
    last_seq_above(page, shown_seqs(page)[-1] + 10)
    seqs = shown_seqs(page)
    assert seqs[0] == loaded  # the rows the reader asked for stay while new ones come
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    assert api.client.post(f"/graph/cancel/{run_id}").status_code == 200
    watch.check()


def test_a_refused_log_stream_is_tried_again(tab: tuple[Any, Watch], api: Api, server: str) -> None:
    page, watch = tab
    run_id = api.start("ui.slow", {"sleep_s": 0.1})
    api.until(run_id, "running")
    refused: list[str] = []

    def once(route: Any) -> None:
        if not refused:
            refused.append(route.request.url)
            route.fulfill(status=503, body="busy")
        else:
            route.continue_()

    page.route(re.compile(r".*/sse/logs/.*"), once)
    page.goto(f"{server}/ui/runs/{run_id}")
    page.wait_for_function(
        "() => document.getElementById('live-note').textContent.includes('trying again')"
    )
    start = shown_seqs(page)[-1]
    last_seq_above(page, start + 5)  # the second attempt follows
    assert len(refused) == 1
    assert "Following the run live" in page.locator("#live-note").inner_text()
    seqs = shown_seqs(page)
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    assert api.client.post(f"/graph/cancel/{run_id}").status_code == 200
    watch.expect_status(503)
    watch.check()


def test_a_run_page_follows_the_branches_of_a_fan_out(
    tab: tuple[Any, Watch], api: Api, server: str
) -> None:
    page, watch = tab
    run_id = api.start("ui.fan")
    page.goto(f"{server}/ui/runs/{run_id}")
    wait_drawn(page)
    rows = page.locator("#fanout-rows tr")
    page.wait_for_function("() => document.querySelectorAll('#fanout-rows tr').length === 2")
    assert sorted(rows.all_inner_texts())[0].startswith("fan[0]")
    page.locator("#fanout-rows .chip.status-completed").first.wait_for(timeout=10_000)
    shoot(page, "ui-fanout.png")
    page.locator("#run-status .chip.status-completed").wait_for(timeout=15_000)
    page.locator("#fanout").wait_for(state="hidden")
    tagged = page.locator("#log-rows tr").all_inner_texts()
    assert any('"branch":"fan[1]"' in row for row in tagged)
    watch.check()


def test_a_waiting_run_is_resumed_from_its_form(
    tab: tuple[Any, Watch], api: Api, server: str
) -> None:
    page, watch = tab
    run_id = api.start("ui.ask")
    api.until(run_id, "waiting")
    page.goto(f"{server}/ui/runs/{run_id}")
    wait_drawn(page)
    assert page.locator(".mermaid-box svg g.node.waiting").count() == 1
    assert "Approve the change?" in page.locator("#wait .prompt").inner_text()
    shoot(page, "ui-waiting.png")

    # The server's 422 shows next to the field it is about; the run keeps waiting.
    page.fill('[data-field="comment"] input', "this comment is far too long")
    page.click("#resume-form button[type=submit]")
    problem = page.locator('[data-field="comment"] .problem')
    problem.wait_for()
    assert "$.comment" in problem.inner_text()
    assert api.state(run_id)["status"] == "waiting"
    shoot(page, "ui-waiting-422.png")

    page.fill('[data-field="comment"] input', "fine")
    page.check('[data-field="approved"] input')
    page.click("#resume-form button[type=submit]")
    page.locator("#run-status .chip.status-completed").wait_for(timeout=15_000)
    final = api.state(run_id)
    assert final["status"] == "completed" and final["state"]["approved"] is True
    assert page.locator("#wait").count() == 0
    watch.expect_status(422)
    watch.check()


def test_both_samples_are_drawn_and_a_run_starts_from_the_graph_page(
    tab: tuple[Any, Watch], api: Api, server: str
) -> None:
    page, watch = tab
    page.goto(f"{server}/ui/graphs")
    listed = page.locator("table.graphs tbody tr").all_inner_texts()
    assert any("python-review" in row for row in listed)
    for graph_id in ("python-review", "code-review-a"):
        page.goto(f"{server}/ui/graphs/{graph_id}")
        svg = wait_drawn(page)
        assert svg.locator("g.node").count() >= 4
        shoot(page, f"ui-graph-{graph_id}.png")

    # The start form: a JSON problem stays on the page; a good state starts a run.
    page.fill("#initial-state", "{not json")
    page.click("#start-form button[type=submit]")
    assert "not JSON" in page.locator("#start-problem").inner_text()
    page.fill("#initial-state", '{"issues_open": 0}')
    page.click("#start-form button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui/runs/[0-9a-f]+$"))
    page.locator("#run-status .chip.status-completed").wait_for(timeout=15_000)
    run_id = page.url.rsplit("/", 1)[1]
    assert api.state(run_id)["current_node"] == "approve"
    watch.check()


def test_hostile_values_stay_text_in_the_browser(
    tab: tuple[Any, Watch], api: Api, server: str
) -> None:
    page, watch = tab
    run_id = api.start("ui.hostile", {"note": HOSTILE, "fail_message": HOSTILE})
    api.until(run_id, "failed")
    for path in (f"/ui/runs/{run_id}", "/ui/graphs/ui.hostile", "/ui/graphs", "/ui"):
        page.goto(f"{server}{path}")
        if path != "/ui/graphs" and path != "/ui":
            wait_drawn(page)
        page.wait_for_timeout(300)
        assert page.locator("img").count() == 0, path
        assert page.evaluate("document.scripts.length") == 1, path
        if path != "/ui":
            assert HOSTILE in page.locator("main").inner_text(), path
    watch.check()
