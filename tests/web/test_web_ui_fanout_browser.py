"""Fan-out nodes drawn by the dashboard in a real browser (headless Chromium).

The graph of ``tests/golden/fanout.json`` (a parallel node, a map whose
branch holds a parallel node) is registered with ``trioflow serve`` over
HTTP; its page must draw the picture, with the fan-outs as subgraphs titled
by their ids, and no console error. A run held inside a parallel node shows
its branches' nodes marked inside their subgraphs. Hostile ids stay text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from browser_support import ARTIFACTS, ROOT, Watch, chromium, serve

FANOUT = json.loads((ROOT / "tests" / "golden" / "fanout.json").read_text())
HELD = {
    "id": "ui.fanout.held",
    "start_node": "fan",
    "nodes": [
        {
            "id": "fan",
            "parallel": {
                "branches": [
                    {
                        "id": "slow",
                        "start_node": "nap",
                        "nodes": [{"id": "nap", "callable": "tools.sleep"}],
                    },
                    {
                        "id": "quick",
                        "start_node": "fan",  # the id of the parallel node, again
                        "nodes": [{"id": "fan", "callable": "tools.noop"}],
                    },
                ]
            },
        },
        {"id": "done", "callable": "tools.noop"},
    ],
    "edges": [{"from": "fan", "to": "done"}],
}

HOSTILE = "end\"] ; subgraph x %%{init: {'theme': 'dark'}}%% <img src=x onerror=alert(1)>"
HOSTILE_GRAPH = {
    "id": "ui.fanout.hostile",
    "start_node": HOSTILE,
    "nodes": [
        {
            "id": HOSTILE,
            "parallel": {
                "branches": [
                    {
                        "id": HOSTILE,
                        "start_node": HOSTILE,
                        "nodes": [{"id": HOSTILE, "callable": "tools.noop"}],
                    }
                ]
            },
        },
        {
            "id": "each",
            "map": {
                "items": f"context.get({HOSTILE!r}, [])",
                "as": HOSTILE,
                "branch": {
                    "start_node": HOSTILE,
                    "nodes": [{"id": HOSTILE, "callable": "tools.noop"}],
                },
            },
        },
    ],
    "edges": [{"from": HOSTILE, "to": "each"}],
}


@pytest.fixture(scope="module")
def server(browser_available: None) -> Iterator[str]:
    with serve([]) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as client:
        for document in (FANOUT, HELD, HOSTILE_GRAPH):
            response = client.post("/graph/create", json=document)
            assert response.status_code in (200, 201), response.text
        yield client


@pytest.fixture(scope="module")
def browser(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def tab(browser: Any, server: str) -> Iterator[tuple[Any, Watch]]:
    page = browser.new_page()
    try:
        yield page, Watch.page(page, server)
    finally:
        page.close()


def drawn(page: Any) -> Any:
    page.locator(".mermaid-box[data-rendered] svg").first.wait_for()
    assert page.locator(".mermaid-box .problem").count() == 0
    return page.locator(".mermaid-box svg").first


def texts(svg: Any, selector: str) -> list[str]:
    """The text of each element of the picture that ``selector`` finds."""
    found: list[str] = svg.evaluate(
        "(svg, selector) => [...svg.querySelectorAll(selector)].map(e => e.textContent.trim())",
        selector,
    )
    return found


def test_fanouts_are_drawn_as_subgraphs(
    tab: tuple[Any, Watch], client: httpx.Client, server: str
) -> None:
    page, watch = tab
    page.goto(f"{server}/ui/graphs/fanout-review")
    svg = drawn(page)
    titles = texts(svg, "g.cluster")
    for title in ("checks", "lint", "tests", "each_file", "opinions", "style", "security"):
        assert any(t.startswith(title) for t in titles), (title, titles)
    assert any("map over context.get('files', []) as file" in t for t in titles), titles
    assert svg.locator("g.cluster.fanout_parallel").count() == 2
    assert svg.locator("g.cluster.fanout_map").count() == 1
    assert svg.locator("g.cluster.fanout_branch").count() == 4
    assert svg.locator("g.node").count() == 9
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-graph-fanout.png"), full_page=True)
    watch.check()


def test_a_run_inside_a_parallel_node_is_marked_in_its_branches(
    tab: tuple[Any, Watch], client: httpx.Client, server: str
) -> None:
    page, watch = tab
    response = client.post(
        "/graph/run",
        json={"graph_id": HELD["id"], "initial_state": {"sleep_s": 60}, "background": True},
    )
    assert response.status_code == 202, response.text
    run_id = response.json()["run_id"]
    try:
        text = ""
        for _ in range(300):  # until the quick branch has completed
            text = client.get(f"/graph/{HELD['id']}/mermaid", params={"run_id": run_id}).text
            if "class n0_b1_n0 visited" in text:
                break
            page.wait_for_timeout(50)
        assert "    class n0_b0_n0 current\n" in text, text
        page.goto(f"{server}/ui/runs/{run_id}")
        svg = drawn(page)
        assert [t[:3] for t in texts(svg, "g.node.current")] == ["nap"]
        assert [t[:3] for t in texts(svg, "g.node.visited")] == ["fan"]
        assert svg.locator("g.cluster.current").count() == 1  # the parallel node
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui-run-fanout.png"), full_page=True)
    finally:
        client.post(f"/graph/cancel/{run_id}")
    watch.check()


def test_hostile_ids_stay_text_in_subgraph_titles(
    tab: tuple[Any, Watch], client: httpx.Client, server: str
) -> None:
    page, watch = tab
    page.goto(f"{server}/ui/graphs/{HOSTILE_GRAPH['id']}")
    svg = drawn(page)
    titles = texts(svg, "g.cluster")
    assert len(titles) == 3 and sum(t.startswith(HOSTILE) for t in titles) == 2, titles
    assert svg.locator("g.node").count() == 2
    assert page.locator("img").count() == 0
    watch.check()
