"""Log streaming end to end: WebSocket (trio-websocket client) and SSE (httpx)."""

from __future__ import annotations

import json
from typing import Any

import trio
from web_support import Server, open_silent_ws, open_ws, parse_sse, start_server, ws_collect

from trioflow import EngineLimits, Registry, open_engine
from trioflow.web import Settings, create_app


async def completed_run(server: Server, spec_graph: dict[str, Any]) -> dict[str, Any]:
    await server.create(spec_graph)
    response = await server.client.post(
        "/graph/run", json={"graph_id": "code-review-a", "initial_state": {"issues_open": 1}}
    )
    run: dict[str, Any] = response.json()
    return run


# -- WebSocket ---------------------------------------------------------------------


async def test_ws_replays_a_finished_run(server: Server, spec_graph: dict[str, Any]) -> None:
    with trio.fail_after(10):
        run = await completed_run(server, spec_graph)
        async with open_ws(f"{server.ws_url}/ws/logs/{run['run_id']}") as ws:
            messages, code = await ws_collect(ws)
    assert code == 1000
    assert [m["type"] for m in messages] == ["log"] * len(run["logs"]) + ["status"]
    assert [m["log"] for m in messages[:-1]] == run["logs"]
    assert messages[-1] == {"type": "status", "status": "completed"}


async def test_ws_after_skips_what_the_client_has(
    server: Server, spec_graph: dict[str, Any]
) -> None:
    with trio.fail_after(10):
        run = await completed_run(server, spec_graph)
        async with open_ws(f"{server.ws_url}/ws/logs/{run['run_id']}?after=25") as ws:
            messages, code = await ws_collect(ws)
        assert code == 1000
        assert [m["log"]["seq"] for m in messages[:-1]] == list(range(26, run["last_seq"] + 1))
        assert messages[-1]["status"] == "completed"
        # After the last entry: just the status.
        url = f"{server.ws_url}/ws/logs/{run['run_id']}?after={run['last_seq']}"
        async with open_ws(url) as ws:
            messages, code = await ws_collect(ws)
        assert messages == [{"type": "status", "status": "completed"}]
        assert code == 1000


async def test_ws_batch_sends_pages_of_entries_in_order_exactly_once(
    server: Server, spec_graph: dict[str, Any]
) -> None:
    with trio.fail_after(10):
        run = await completed_run(server, spec_graph)
        url = f"{server.ws_url}/ws/logs/{run['run_id']}?batch=10&after=3"
        async with open_ws(url) as ws:
            messages, code = await ws_collect(ws)
    assert code == 1000
    assert messages[-1] == {"type": "status", "status": "completed"}
    pages = messages[:-1]
    assert all(m["type"] == "logs" and 1 <= len(m["logs"]) <= 10 for m in pages)
    # A finished run is all there at once: full pages, then the rest.
    assert [len(m["logs"]) for m in pages] == [10, 10, 6]
    received = [entry for m in pages for entry in m["logs"]]
    assert received == run["logs"][3:]


async def test_ws_batch_out_of_range_is_a_bad_query(server: Server) -> None:
    with trio.fail_after(10):
        async with open_ws(f"{server.ws_url}/ws/logs/any?batch=0") as ws:
            messages, code = await ws_collect(ws)
    assert code == 4422
    assert messages[0]["type"] == "error"


async def test_ws_unknown_run_and_bad_query(server: Server) -> None:
    with trio.fail_after(10):
        async with open_ws(f"{server.ws_url}/ws/logs/nope") as ws:
            messages, code = await ws_collect(ws)
        assert code == 4404
        assert messages == [
            {
                "type": "error",
                "error": {
                    "code": "run_not_found",
                    "message": "run 'nope' not found",
                    "details": {"run_id": "nope"},
                },
            }
        ]
        async with open_ws(f"{server.ws_url}/ws/logs/nope?after=-1") as ws:
            messages, code = await ws_collect(ws)
        assert code == 4422
        assert messages[0]["error"]["code"] == "request_invalid"


async def test_ws_follower_sees_cancel_within_a_second(
    server: Server, sleep_graph: dict[str, Any]
) -> None:
    with trio.fail_after(10):
        await server.create(sleep_graph)
        run_id = await server.start("sleepy", {"sleep_s": 30})
        async with open_ws(f"{server.ws_url}/ws/logs/{run_id}") as ws:
            # Live: the run is sleeping in its only node.
            while True:
                message = json.loads(await ws.get_message())
                if message["log"]["event"] == "node_started":
                    break
            response = await server.client.post(f"/graph/cancel/{run_id}")
            assert response.json()["status"] == "cancelled"
            with trio.fail_after(1):
                messages, code = await ws_collect(ws)
    assert code == 1000
    assert messages[-2]["log"]["event"] == "run_cancelled"
    assert messages[-1] == {"type": "status", "status": "cancelled"}


async def test_200_followers_each_get_every_entry_once_in_order(
    server: Server, gate_graph: dict[str, Any], gates: Any
) -> None:
    followers = 200
    results: list[tuple[list[dict[str, Any]], int | None]] = []
    connected = 0
    all_connected = trio.Event()

    async def follow(run_id: str) -> None:
        nonlocal connected
        async with open_ws(f"{server.ws_url}/ws/logs/{run_id}") as ws:
            first = json.loads(await ws.get_message())  # replayed run_started
            connected += 1
            if connected == followers:
                all_connected.set()
            rest, code = await ws_collect(ws)
            results.append(([first, *rest], code))

    with trio.fail_after(30):
        await server.create(gate_graph)
        run_id = await server.start("gated")
        async with trio.open_nursery() as nursery:
            for _ in range(followers):
                nursery.start_soon(follow, run_id)
            await all_connected.wait()
            gates.opened.set()  # everything after this point is live
        final = (await server.client.get(f"/graph/state/{run_id}")).json()

    assert final["status"] == "completed"
    expected = final["logs"]
    assert len(expected) >= 7
    assert len(results) == followers
    for messages, code in results:
        assert code == 1000
        assert [m["log"] for m in messages[:-1]] == expected
        assert messages[-1] == {"type": "status", "status": "completed"}


async def test_a_follower_that_never_reads_delays_nobody(server: Server) -> None:
    # Each step logs 160 KB, 100 steps: 16 MB, far more than the socket buffers hold.
    chatty = {
        "id": "chatty",
        "start_node": "talk",
        "nodes": [
            {"id": "talk", "callable": "test.chatty"},
            {"id": "end", "callable": "tools.noop"},
        ],
        "edges": [
            {"from": "talk", "to": "end"},
            {"from": "talk", "to": "talk", "type": "loop", "loop": {"max_iterations": 99}},
        ],
    }
    with trio.fail_after(20):
        await server.create(chatty)
        run_id = await server.start("chatty", {"lines": 10, "line_bytes": 16000})
        stuck = await open_silent_ws(server.base_url, f"/ws/logs/{run_id}")
        async with stuck:
            final = await server.engine.wait(run_id)
            assert final.status.value == "completed"
            assert final.last_seq > 1000
            # Another follower still gets the whole log promptly.
            async with open_ws(f"{server.ws_url}/ws/logs/{run_id}") as ws:
                messages, code = await ws_collect(ws)
            assert code == 1000
            assert [m["log"]["seq"] for m in messages[:-1]] == list(range(1, final.last_seq + 1))
            # Requests are served meanwhile.
            assert (await server.client.get("/healthz")).status_code == 200


async def test_follower_slots_are_freed_and_bounded(
    web_registry: Registry, settings: Settings, gate_graph: dict[str, Any], gates: Any
) -> None:
    limits = EngineLimits(max_followers=1)
    with trio.fail_after(10):
        async with (
            open_engine(registry=web_registry, limits=limits) as engine,
            trio.open_nursery() as nursery,
        ):
            srv = await start_server(nursery, create_app(engine, settings), engine)
            async with srv.client:
                await srv.create(gate_graph)
                run_id = await srv.start("gated")
                url = f"{srv.ws_url}/ws/logs/{run_id}"
                for _ in range(3):
                    # The previous follower's slot frees once the server reads its close.
                    with trio.fail_after(2):
                        while True:
                            async with open_ws(url) as ws:
                                first = json.loads(await ws.get_message())
                                if first["type"] == "log":
                                    async with open_ws(url) as second:
                                        messages, code = await ws_collect(second)
                                    break
                            await trio.sleep(0.01)
                    assert code == 4429
                    assert messages[0]["error"]["code"] == "capacity_exceeded"
                gates.opened.set()
                async with open_ws(url) as ws:
                    messages, code = await ws_collect(ws)
                assert code == 1000
                assert messages[-1]["status"] == "completed"
            srv.stop.set()


# -- SSE ---------------------------------------------------------------------------


async def test_sse_stream_and_resume(server: Server, spec_graph: dict[str, Any]) -> None:
    with trio.fail_after(10):
        run = await completed_run(server, spec_graph)
        response = await server.client.get(f"/sse/logs/{run['run_id']}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        events = parse_sse(response.text)
        assert [e["event"] for e in events] == ["log"] * run["last_seq"] + ["status"]
        assert [int(e["id"]) for e in events[:-1]] == list(range(1, run["last_seq"] + 1))
        assert [json.loads(e["data"]) for e in events[:-1]] == run["logs"]
        assert json.loads(events[-1]["data"]) == {"status": "completed"}
        assert "id" not in events[-1]

        # A reconnecting EventSource sends Last-Event-ID; it wins over ?after=.
        resumed = await server.client.get(
            f"/sse/logs/{run['run_id']}?after=2", headers={"Last-Event-ID": "20"}
        )
        ids = [int(e["id"]) for e in parse_sse(resumed.text) if e["event"] == "log"]
        assert ids == list(range(21, run["last_seq"] + 1))
        after = await server.client.get(f"/sse/logs/{run['run_id']}?after=27")
        ids = [int(e["id"]) for e in parse_sse(after.text) if e["event"] == "log"]
        assert ids == list(range(28, run["last_seq"] + 1))


async def test_sse_errors(server: Server, spec_graph: dict[str, Any]) -> None:
    with trio.fail_after(10):
        run = await completed_run(server, spec_graph)
        missing = await server.client.get("/sse/logs/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "run_not_found"
        bad = await server.client.get(
            f"/sse/logs/{run['run_id']}", headers={"Last-Event-ID": "abc"}
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "bad_request"
        bad = await server.client.get(f"/sse/logs/{run['run_id']}?after=x")
        assert bad.status_code == 422


async def test_sse_live_with_heartbeat(
    web_registry: Registry, gate_graph: dict[str, Any], gates: Any
) -> None:
    settings = Settings(heartbeat_s=0.05)
    with trio.fail_after(10):
        async with open_engine(registry=web_registry) as engine, trio.open_nursery() as nursery:
            srv = await start_server(nursery, create_app(engine, settings), engine)
            async with srv.client:
                await srv.create(gate_graph)
                run_id = await srv.start("gated")
                seen: list[dict[str, str]] = []
                async with srv.client.stream("GET", f"/sse/logs/{run_id}") as response:
                    buffer = ""
                    async for chunk in response.aiter_text():
                        buffer += chunk
                        seen = parse_sse(buffer)
                        if any("comment" in e for e in seen) and not gates.opened.is_set():
                            gates.opened.set()  # idle long enough for a heartbeat: finish
                events = [e for e in seen if "comment" not in e]
                assert any(e.get("comment") == "keepalive" for e in seen)
                assert events[-1]["event"] == "status"
                assert json.loads(events[-1]["data"]) == {"status": "completed"}
                ids = [int(e["id"]) for e in events[:-1]]
                assert ids == list(range(1, len(ids) + 1))
            srv.stop.set()
