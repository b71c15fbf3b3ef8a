"""Graceful shutdown and the app-owned engine's lifetime."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import trio
from web_support import open_ws, parse_sse, start_server, ws_collect

from trioflow import Engine, RunStatus
from trioflow.web import Settings, create_app

SAMPLES = pathlib.Path(__file__).resolve().parents[2] / "samples"


async def test_shutdown_closes_followers_with_1001_and_lets_requests_finish(
    web_engine: Engine,
    settings: Settings,
    sleep_graph: dict[str, Any],
    gate_graph: dict[str, Any],
    gates: Any,
) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            srv = await start_server(nursery, create_app(web_engine, settings), web_engine)
            async with srv.client:
                await srv.create(sleep_graph)
                await srv.create(gate_graph)
                sleeping = await srv.start("sleepy", {"sleep_s": 30})
                sync_result: list[Any] = []

                async def sync_run() -> None:
                    response = await srv.client.post("/graph/run", json={"graph_id": "gated"})
                    sync_result.append(response)

                async with open_ws(f"{srv.ws_url}/ws/logs/{sleeping}") as ws:
                    while json.loads(await ws.get_message())["log"]["event"] != "node_started":
                        pass
                    nursery.start_soon(sync_run)
                    with trio.fail_after(2):
                        await gates.reached.wait()
                    srv.stop.set()
                    with trio.fail_after(2):
                        messages, code = await ws_collect(ws)
                    assert code == 1001
                    assert messages == []
                # Draining: the in-flight request is still served.
                assert not srv.stopped.is_set()
                gates.opened.set()
                with trio.fail_after(2):
                    await srv.stopped.wait()
                assert sync_result[0].status_code == 200
                assert sync_result[0].json()["status"] == "completed"
    # The engine was handed in, so the server did not stop the sleeping run.
    run = await web_engine.get_run(sleeping)
    assert run.status is RunStatus.RUNNING


async def test_shutdown_ends_sse_streams(
    web_engine: Engine, settings: Settings, sleep_graph: dict[str, Any]
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            srv = await start_server(nursery, create_app(web_engine, settings), web_engine)
            async with srv.client:
                await srv.create(sleep_graph)
                run_id = await srv.start("sleepy", {"sleep_s": 30})
                text = ""
                async with srv.client.stream("GET", f"/sse/logs/{run_id}") as response:
                    async for chunk in response.aiter_text():
                        text += chunk
                        if "node_started" in text:
                            srv.stop.set()
                # The stream ended without a status: the client reconnects elsewhere.
                events = parse_sse(text)
                assert events and all(e["event"] == "log" for e in events)
            await srv.stopped.wait()


async def test_app_owned_engine_serves_samples_and_stops(tmp_path: pathlib.Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"id": "broken", "start_node": "x", "nodes": []}')
    settings = Settings(graph_files=(str(SAMPLES / "code_review.json"), str(broken)))
    app = create_app(settings=settings)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            stop, stopped = trio.Event(), trio.Event()

            async def run(task_status: trio.TaskStatus[list[str]]) -> None:
                from trioflow.web import serve

                await serve(
                    app,
                    host="127.0.0.1",
                    port=0,
                    task_status=task_status,
                    shutdown_trigger=stop.wait,
                    handle_signals=False,
                )
                stopped.set()

            binds = await nursery.start(run)
            import httpx

            async with httpx.AsyncClient(base_url=binds[0]) as client:
                graphs = (await client.get("/graphs")).json()
                assert [g["graph_id"] for g in graphs["items"]] == ["code-review-a"]
                ran = await client.post(
                    "/graph/run",
                    json={"graph_id": "code-review-a", "initial_state": {"issues_open": 1}},
                )
                assert ran.json()["status"] == "completed"
                async with open_ws(
                    binds[0].replace("http", "ws") + f"/ws/logs/{ran.json()['run_id']}"
                ) as ws:
                    messages, code = await ws_collect(ws)
                assert code == 1000 and messages[-1]["status"] == "completed"
            stop.set()
            await stopped.wait()


async def test_readyz_says_not_ready_once_the_server_drains(
    web_engine: Engine, settings: Settings
) -> None:
    from trioflow.web.app import lifecycle_of

    app = create_app(web_engine, settings)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            srv = await start_server(nursery, app, web_engine)
            async with srv.client:
                r = await srv.client.get("/readyz")
                assert r.status_code == 200 and r.json() == {"ready": True, "reasons": []}
                lifecycle_of(app).drain()  # what a shutdown does first
                r = await srv.client.get("/readyz")
                assert r.status_code == 503
                assert r.json()["reasons"] == ["draining: the server is shutting down"]
                # Liveness is another question: the process still serves.
                assert (await srv.client.get("/healthz")).status_code == 200
            srv.stop.set()
