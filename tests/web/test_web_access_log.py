"""The access log: one record per request or stream, with its status and duration."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from web_support import Server, open_ws, start_server, ws_collect

from trioflow import Engine
from trioflow.web import Settings, create_app
from trioflow.web.serverlog import ACCESS_LOGGER, JsonFormatter


def access_fields(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [dict(r.fields) for r in caplog.records if r.name == ACCESS_LOGGER]  # type: ignore[attr-defined]


async def test_every_request_and_stream_gets_one_access_record(
    server: Server, spec_graph: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    client = server.client
    with trio.fail_after(10):
        await server.create(spec_graph)
        run = (await client.post("/graph/run", json={"graph_id": "code-review-a"})).json()
        await client.get("/healthz")
        await client.get("/no/such/route")
        await client.get("/healthz", headers={"Host": "attacker.example"})  # the guard: 421
        await client.get(f"/sse/logs/{run['run_id']}")
        async with open_ws(f"{server.ws_url}/ws/logs/{run['run_id']}") as ws:
            await ws_collect(ws)
        async with open_ws(f"{server.ws_url}/ws/logs/unknown") as ws:
            await ws_collect(ws)
        await trio.sleep(0.1)  # the server logs a stream once its handler has returned
    fields = access_fields(caplog)
    seen = [(f["method"], f["path"], f["status"]) for f in fields]
    assert seen == [
        ("POST", "/graph/create", 201),
        ("POST", "/graph/run", 200),
        ("GET", "/healthz", 200),
        ("GET", "/no/such/route", 404),
        ("GET", "/healthz", 421),
        ("GET", f"/sse/logs/{run['run_id']}", 200),
        ("WS", f"/ws/logs/{run['run_id']}", 101),
        ("WS", "/ws/logs/unknown", 101),
    ]
    assert [f.get("close_code") for f in fields[-2:]] == [1000, 4404]
    for f in fields:
        assert isinstance(f["duration_ms"], float) and f["duration_ms"] >= 0
        assert f["client"].startswith("127.0.0.1:")
    text = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert text[2].endswith('"GET /healthz" 200 ' + f"{fields[2]['duration_ms']:.2f} ms")
    assert text[-1].endswith("close 4404")


async def test_a_stream_is_logged_with_its_lifetime(
    server: Server, gate_graph: dict[str, Any], gates: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    await server.create(gate_graph)
    run_id = await server.start("gated")
    with trio.fail_after(10):
        async with open_ws(f"{server.ws_url}/ws/logs/{run_id}") as ws:
            await ws.get_message()
            await trio.sleep(0.3)
            gates.opened.set()
            await ws_collect(ws)
        await trio.sleep(0.1)
    (stream,) = [f for f in access_fields(caplog) if f["method"] == "WS"]
    assert stream["duration_ms"] >= 300
    assert stream["close_code"] == 1000


@pytest.fixture
async def quiet_server(web_engine: Engine) -> AsyncIterator[Server]:
    app = create_app(web_engine, Settings(access_log=False))
    async with trio.open_nursery() as nursery:
        srv = await start_server(nursery, app, web_engine)
        async with srv.client:
            yield srv
        srv.stop.set()


async def test_no_access_log_leaves_the_middleware_out(
    quiet_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    with trio.fail_after(10):
        assert (await quiet_server.client.get("/healthz")).status_code == 200
    assert access_fields(caplog) == []


def test_json_format_is_one_object_per_line_with_the_fields() -> None:
    record = logging.LogRecord(
        ACCESS_LOGGER,
        logging.INFO,
        __file__,
        1,
        '%s "%s %s" %s %.2f ms',
        ("127.0.0.1:5", "GET", "/x\n\u2028y", 200, 1.5),
        None,
    )
    record.fields = {"method": "GET", "path": "/x\n\u2028y", "status": 200, "duration_ms": 1.5}
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\u2028" not in line
    out = json.loads(line)
    assert out["level"] == "info" and out["logger"] == ACCESS_LOGGER
    assert out["message"] == '127.0.0.1:5 "GET /x\n\u2028y" 200 1.50 ms'
    assert (out["method"], out["path"], out["status"], out["duration_ms"]) == (
        "GET",
        "/x\n\u2028y",
        200,
        1.5,
    )
    assert out["time"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        error = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    out = json.loads(JsonFormatter().format(error))
    assert "ValueError: boom" in out["exception"]
