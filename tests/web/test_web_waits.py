"""Waits, resumes and signals over HTTP and WebSocket, on a real server."""

from __future__ import annotations

import json
from typing import Any

import trio
from web_support import Server, open_ws, ws_collect

SCHEMA = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}, "comment": {"type": "string", "maxLength": 20}},
    "required": ["approved"],
    "additionalProperties": False,
}
REVIEW = {
    "id": "review",
    "start_node": "check",
    "nodes": [
        {"id": "check", "callable": "tools.noop"},
        {"id": "human", "wait": {"prompt": "Approve?", "input_schema": SCHEMA}},
        {"id": "merge", "callable": "tools.approve"},
    ],
    "edges": [{"from": "check", "to": "human"}, {"from": "human", "to": "merge"}],
}


async def waiting_run(server: Server) -> dict[str, Any]:
    """A run of REVIEW, waiting at ``human``: the sync answer of POST /graph/run."""
    await server.create(REVIEW)
    r = await server.client.post("/graph/run", json={"graph_id": "review", "initial_state": {}})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["status"] == "waiting"
    assert r.headers["X-Run-Id"] == body["run_id"]
    return body


async def test_a_sync_run_answers_when_it_waits_and_the_state_says_what_for(
    server: Server,
) -> None:
    with trio.fail_after(10):
        run = await waiting_run(server)
        assert run["logs"][-1]["event"] == "run_waiting"
        state = (await server.client.get(f"/graph/state/{run['run_id']}")).json()
        waiting = state["waiting"]
        assert {k: waiting[k] for k in ("node", "prompt", "input_schema", "deadline")} == {
            "node": "human",
            "prompt": "Approve?",
            "input_schema": SCHEMA,
            "deadline": None,
        }
        assert waiting["request_id"] == run["logs"][-1]["data"]["request_id"]
        listed = (await server.client.get("/runs", params={"status": "waiting"})).json()
        assert [r["run_id"] for r in listed["items"]] == [run["run_id"]]


async def test_resume_checks_the_input_then_the_run_completes(server: Server) -> None:
    with trio.fail_after(10):
        run = await waiting_run(server)
        url = f"/graph/resume/{run['run_id']}"
        r = await server.client.post(url, json={"input": {"approved": "yes", "comment": "x" * 30}})
        assert r.status_code == 422
        error = r.json()["error"]
        assert error["code"] == "input_invalid"
        paths = {p["path"] for p in error["details"]["problems"]}
        assert paths == {"$.approved", "$.comment"}
        assert (await server.client.get(f"/graph/state/{run['run_id']}")).json()["status"] == (
            "waiting"
        )
        request_id = run["logs"][-1]["data"]["request_id"]
        r = await server.client.post(
            url, json={"input": {"approved": True}, "request_id": "an-old-one"}
        )
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "stale_request"
        r = await server.client.post(
            url, json={"input": {"approved": True, "comment": "ok"}, "request_id": request_id}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "completed"
        assert body["state"] == {"approved": True, "comment": "ok"}
        assert body["waiting"] is None
        events = [e["event"] for e in body["logs"]]
        assert events[events.index("run_waiting") :] == [
            "run_waiting",
            "run_input",
            "node_completed",
            "edge_taken",
            "node_started",
            "node_completed",
            "run_completed",
        ]
        r = await server.client.post(url, json={"input": {"approved": True}})
        assert r.status_code == 409
        r = await server.client.post("/graph/resume/no-such-run", json={"input": {}})
        assert r.status_code == 404


async def test_of_two_concurrent_resumes_one_wins(server: Server) -> None:
    with trio.fail_after(20):
        for _ in range(3):
            run = await waiting_run(server)
            statuses: list[int] = []

            async def resume(
                answer: bool, run_id: str = run["run_id"], statuses: list[int] = statuses
            ) -> None:
                r = await server.client.post(
                    f"/graph/resume/{run_id}", json={"input": {"approved": answer}}
                )
                statuses.append(r.status_code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(resume, True)
                nursery.start_soon(resume, False)
            assert sorted(statuses) == [200, 409]


async def test_a_background_resume_answers_at_once(server: Server) -> None:
    with trio.fail_after(10):
        run = await waiting_run(server)
        r = await server.client.post(
            f"/graph/resume/{run['run_id']}", json={"input": {"approved": True}, "background": True}
        )
        assert r.status_code == 200
        assert r.json()["status"] == "running"
        assert r.json()["waiting"]["answered"] is True
        final = await server.engine.wait(run["run_id"])
        assert final.state == {"approved": True}


async def test_cancelling_a_waiting_run(server: Server) -> None:
    with trio.fail_after(10):
        run = await waiting_run(server)
        r = await server.client.post(f"/graph/cancel/{run['run_id']}")
        assert r.status_code == 200
        assert r.json()["status"] == "cancelled"
        r = await server.client.post(
            f"/graph/resume/{run['run_id']}", json={"input": {"approved": True}}
        )
        assert r.status_code == 409


async def test_signals_over_http(server: Server) -> None:
    with trio.fail_after(10):
        run = await waiting_run(server)
        url = f"/graph/signal/{run['run_id']}"
        r = await server.client.post(url, json={"name": "note", "updates": {"note": "hi"}})
        assert r.status_code == 202
        assert r.json() == {"run_id": run["run_id"], "signal_id": 1, "name": "note"}
        state = (await server.client.get(f"/graph/state/{run['run_id']}")).json()
        assert state["status"] == "waiting"
        assert state["state"] == {"note": "hi"}
        assert state["logs"][-1]["event"] == "signal_received"
        for bad in (
            {"name": "", "updates": {}},
            {"name": "x", "updates": [1]},
            {"name": "x", "extra": 1},
        ):
            r = await server.client.post(url, json=bad)
            assert r.status_code == 422, bad
        r = await server.client.post(
            url,
            content=b'{"name": "x", "updates": {"n": NaN}}',
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 400
        await server.client.post(f"/graph/cancel/{run['run_id']}")
        r = await server.client.post(url, json={"name": "late", "updates": {}})
        assert r.status_code == 409
        r = await server.client.post("/graph/signal/no-such-run", json={"name": "x"})
        assert r.status_code == 404


async def test_a_websocket_follower_stays_through_the_wait(server: Server) -> None:
    await server.create(REVIEW)
    with trio.fail_after(15):
        run_id = await server.start("review", {})
        async with open_ws(f"{server.ws_url}/ws/logs/{run_id}") as ws:
            seen: list[dict[str, Any]] = []
            while not seen or seen[-1].get("log", {}).get("event") != "run_waiting":
                seen.append(json.loads(await ws.get_message()))
            r = await server.client.post(
                f"/graph/resume/{run_id}", json={"input": {"approved": True}}
            )
            assert r.status_code == 200
            rest, code = await ws_collect(ws)
    assert code == 1000
    events = [m["log"]["event"] for m in seen + rest if m["type"] == "log"]
    assert events.count("run_waiting") == 1
    assert events[-1] == "run_completed"
    assert rest[-1] == {"type": "status", "status": "completed"}
