"""A fan-out over HTTP: a map and a parallel node registered, run and followed on a
real server, with a WebSocket follower that sees every branch's entries."""

from __future__ import annotations

from typing import Any

import trio
from web_support import Server, open_ws, ws_collect

REVIEW = {
    "id": "fan-review",
    "start_node": "checks",
    "nodes": [
        {
            "id": "checks",
            "parallel": {
                "branches": [
                    {
                        "id": "lint",
                        "start_node": "l",
                        "nodes": [{"id": "l", "callable": "tools.sleep"}],
                    },
                    {
                        "id": "tests",
                        "start_node": "t",
                        "nodes": [{"id": "t", "callable": "test.chatty"}],
                    },
                ],
            },
        },
        {
            "id": "each",
            "map": {
                "items": "state['files']",
                "as": "file",
                "branch": {"start_node": "r", "nodes": [{"id": "r", "callable": "tools.noop"}]},
                "collect": {"from": "file", "into": "seen"},
                "max_concurrency": 2,
            },
        },
    ],
    "edges": [{"from": "checks", "to": "each"}],
}


async def test_a_fan_out_run_over_http_with_a_websocket_follower(server: Server) -> None:
    created = await server.client.post("/graph/create", json=REVIEW)
    assert created.status_code == 201, created.text
    state = {"files": ["a.py", "b.py", "c.py"], "sleep_s": 0.2, "lines": 2, "line_bytes": 4}
    run_id = await server.start("fan-review", state)
    with trio.fail_after(30):
        # While the fan-out runs, the state shows each branch.
        while True:
            snapshot = (await server.client.get(f"/graph/state/{run_id}?logs=0")).json()
            if snapshot["fanout"] is not None or snapshot["status"] != "running":
                break
            await trio.sleep(0.01)
        assert snapshot["fanout"]["node"] == "checks"
        assert {b["branch"] for b in snapshot["fanout"]["branches"]} <= {"lint", "tests"}
        async with open_ws(f"{server.ws_url}/ws/logs/{run_id}") as ws:
            messages, code = await ws_collect(ws)
    assert code == 1000
    entries: list[dict[str, Any]] = [m["log"] for m in messages if m["type"] == "log"]
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    branches = {e["data"].get("branch") for e in entries} - {None}
    assert branches == {"lint", "tests", "each[0]", "each[1]", "each[2]"}
    assert {e["data"]["item"] for e in entries if "item" in e["data"]} == {0, 1, 2}
    custom = [e for e in entries if e["event"] == "custom"]
    assert custom and all(e["data"]["branch"] == "tests" for e in custom)
    assert entries[-1]["event"] == "run_completed"
    final = (await server.client.get(f"/graph/state/{run_id}?logs=0")).json()
    assert final["status"] == "completed" and final["fanout"] is None
    # Collected in item order; the item key itself is not merged back.
    assert final["state"]["seen"] == ["a.py", "b.py", "c.py"] and "file" not in final["state"]


async def test_a_wait_in_a_branch_is_a_422_at_its_path(server: Server) -> None:
    document = {
        "id": "fan-wait",
        "start_node": "each",
        "nodes": [
            {
                "id": "each",
                "map": {
                    "items": "[1]",
                    "branch": {"start_node": "ask", "nodes": [{"id": "ask", "wait": {}}]},
                },
            }
        ],
    }
    response = await server.client.post("/graph/create", json=document)
    assert response.status_code == 422
    problems = response.json()["error"]["details"]["problems"]
    assert [(p["code"], p["path"]) for p in problems] == [
        ("wait_in_branch", "$.nodes[0].map.branch.nodes[0].wait")
    ]
