"""Odd input: sequence numbers in headers and queries, numbers beyond the double range,
and bounded run answers with the paged log endpoint. Real server, real clients."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
import trio
from chatty_tools import chatty_graph
from web_support import Server, open_ws, parse_sse, start_server, ws_collect

from trioflow import Registry, open_engine
from trioflow.stores.sqlite import SQLiteStore
from trioflow.web import Settings, create_app

NOT_SEQS = (
    "1_0",
    "+3",
    " 3",
    "3 ",
    "3.0",
    "0x1",
    "-1",
    "",
    "٣",
    "9007199254740993",
    "9223372036854775808",
    "1e3",
)


@pytest.fixture
async def sqlite_server(
    web_registry: Registry, settings: Settings, tmp_path: pathlib.Path
) -> AsyncIterator[Server]:
    store = SQLiteStore(str(tmp_path / "trioflow.db"))
    async with (
        open_engine(store=store, registry=web_registry) as engine,
        trio.open_nursery() as nursery,
    ):
        srv = await start_server(nursery, create_app(engine, settings), engine)
        async with srv.client:
            yield srv
        srv.stop.set()


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    details: dict[str, Any] = body["error"]["details"]
    return details


async def finished_chatty(server: Server, loops: int, lines: int = 10) -> dict[str, Any]:
    await server.create(chatty_graph(loops))
    response = await server.client.post(
        "/graph/run",
        json={"graph_id": "chatty", "initial_state": {"lines": lines, "line_bytes": 10}},
    )
    assert response.status_code == 200, response.text
    run: dict[str, Any] = response.json()
    return run


# -- sequence numbers -------------------------------------------------------------------


async def test_sequence_numbers_are_strict_and_bounded_on_sqlite(
    sqlite_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    server = sqlite_server
    caplog.set_level(logging.WARNING)
    with trio.fail_after(20):
        run = await finished_chatty(server, loops=1, lines=3)
        run_id, last = run["run_id"], run["last_seq"]
        sse = f"/sse/logs/{run_id}"
        for raw in (
            "9223372036854775808",
            "9007199254740993",
            "1_0",
            "+3",
            "3.0",
            "0x1",
            "-1",
            "1e3",
            "3 4",
        ):
            response = await server.client.get(sse, headers={"Last-Event-ID": raw})
            details = assert_error(response, 400, "bad_request")
            assert details["last_event_id"] == raw
        for raw in NOT_SEQS:
            response = await server.client.get(sse, params={"after": raw})
            assert_error(response, 422, "request_invalid")
            response = await server.client.get(f"/runs/{run_id}/logs", params={"after": raw})
            assert_error(response, 422, "request_invalid")
            async with open_ws(f"{server.ws_url}/ws/logs/{run_id}?after={quote(raw)}") as ws:
                messages, code = await ws_collect(ws)
            assert code == 4422, raw
            assert messages[0]["error"]["code"] == "request_invalid"
        # The bounds themselves are sequence numbers: the entries after them and the
        # status; at or past the end of this finished run, 204 (nothing follows).
        for raw in ("0", "00"):
            response = await server.client.get(sse, headers={"Last-Event-ID": raw})
            assert response.status_code == 200, response.text
            events = parse_sse(response.text)
            assert events[-1]["event"] == "status"
            assert len(events) - 1 == last
        for raw in ("9007199254740992", str(last)):
            response = await server.client.get(sse, headers={"Last-Event-ID": raw})
            assert response.status_code == 204, response.text
        response = await server.client.get(sse, params={"after": "9007199254740992"})
        assert response.status_code == 204, response.text
        # And the stream is whole: no OverflowError cut it short.
        response = await server.client.get(sse, headers={"Last-Event-ID": "1"})
        assert [int(e["id"]) for e in parse_sse(response.text)[:-1]] == list(range(2, last + 1))
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# -- numbers beyond the double range --------------------------------------------------------


async def test_numbers_beyond_the_double_range_are_malformed_json(
    server: Server, spec_graph: dict[str, Any]
) -> None:
    json_type = {"content-type": "application/json"}
    with trio.fail_after(10):
        await server.create(spec_graph)
        for number in (b"1e400", b"-1e400", b"1E+999", b"1" + b"0" * 400 + b".0", b"2e308"):
            body = b'{"graph_id": "code-review-a", "initial_state": {"deep": [{"x": %s}]}}' % number
            response = await server.client.post("/graph/run", content=body, headers=json_type)
            assert_error(response, 400, "malformed_json")
        document = dict(spec_graph, id="huge", name=None)
        text = (
            b'{"id": "huge", "start_node": "submit", "nodes": [{"id": "submit", '
            b'"callable": "tools.noop", "retry": 1e999}]}'
        )
        assert_error(
            await server.client.post("/graph/create", content=text, headers=json_type),
            400,
            "malformed_json",
        )
        assert (await server.client.get(f"/graph/{document['id']}")).status_code == 404
        # Large but finite numbers, big integers and look-alikes in strings are fine.
        body = (
            b'{"graph_id": "code-review-a", "initial_state": {"issues_open": 0, '
            b'"big": 1e308, "tiny": 1e-400, "int": 1' + b"0" * 400 + b', "s": "1e400"}}'
        )
        response = await server.client.post("/graph/run", content=body, headers=json_type)
        assert response.status_code == 200, response.text
        state = response.json()["state"]
        assert state["big"] == 1e308 and state["tiny"] == 0.0 and state["s"] == "1e400"
        assert state["int"] == 10**400


# -- bounded run answers and the paged log ---------------------------------------------------


async def test_run_answers_hold_at_most_the_last_entries(sqlite_server: Server) -> None:
    server = sqlite_server
    with trio.fail_after(30):
        run = await finished_chatty(server, loops=99)  # 100 steps of 10 lines: > 1,000 entries
        last = run["last_seq"]
        assert last > 1100
        # The sync answer: the last 1,000 entries.
        assert len(run["logs"]) == 1000
        assert run["logs_truncated"] is True
        assert run["logs_first_seq"] == last - 999
        assert [e["seq"] for e in run["logs"]] == list(range(last - 999, last + 1))
        assert run["logs"][-1]["event"] == "run_completed"

        state = (await server.client.get(f"/graph/state/{run['run_id']}")).json()
        assert state == run
        small = (await server.client.get(f"/graph/state/{run['run_id']}?logs=5")).json()
        assert [e["seq"] for e in small["logs"]] == list(range(last - 4, last + 1))
        assert small["logs_truncated"] is True and small["logs_first_seq"] == last - 4
        none = (await server.client.get(f"/graph/state/{run['run_id']}?logs=0")).json()
        assert none["logs"] == [] and none["logs_truncated"] is True
        assert none["logs_first_seq"] is None
        whole = (await server.client.get(f"/graph/state/{run['run_id']}?logs=10000")).json()
        assert [e["seq"] for e in whole["logs"]] == list(range(1, last + 1))
        assert whole["logs_truncated"] is False and whole["logs_first_seq"] == 1
        for bad in ("10001", "-1", "x", "1_0"):
            response = await server.client.get(f"/graph/state/{run['run_id']}?logs={bad}")
            assert_error(response, 422, "request_invalid")
            response = await server.client.post(
                f"/graph/run?logs={bad}", json={"graph_id": "chatty"}
            )
            assert_error(response, 422, "request_invalid")
        assert (await server.client.get("/runs")).json()["items"][0]["run_id"] == run["run_id"]

        ran = await server.client.post(
            "/graph/run?logs=3", json={"graph_id": "chatty", "initial_state": {"lines": 1}}
        )
        assert [e["seq"] for e in ran.json()["logs"]] == list(
            range(ran.json()["last_seq"] - 2, ran.json()["last_seq"] + 1)
        )

        # The paged endpoint reads the whole log, exactly once, in order.
        seen: list[dict[str, Any]] = []
        after: int | None = 0
        pages = 0
        while after is not None:
            response = await server.client.get(
                f"/runs/{run['run_id']}/logs", params={"after": after, "limit": 1000}
            )
            assert response.status_code == 200, response.text
            page = response.json()
            assert page["run_id"] == run["run_id"] and page["status"] == "completed"
            assert page["last_seq"] == last
            assert len(page["entries"]) <= 1000
            seen += page["entries"]
            after = page["next_after"]
            pages += 1
        assert pages == 2
        assert [e["seq"] for e in seen] == list(range(1, last + 1))
        assert seen[-1000:] == run["logs"]
        default = (await server.client.get(f"/runs/{run['run_id']}/logs?after=10")).json()
        assert [e["seq"] for e in default["entries"]] == list(range(11, 511))
        assert default["next_after"] == 510
        end = (await server.client.get(f"/runs/{run['run_id']}/logs?after={last}")).json()
        assert end["entries"] == [] and end["next_after"] is None
        for bad in ("limit=0", "limit=1001", "limit=x", "after=-1", "after=9007199254740993"):
            response = await server.client.get(f"/runs/{run['run_id']}/logs?{bad}")
            assert_error(response, 422, "request_invalid")
        assert_error(await server.client.get("/runs/nope/logs"), 404, "run_not_found")


async def test_runs_under_the_cap_keep_their_answer(
    server: Server, spec_graph: dict[str, Any]
) -> None:
    with trio.fail_after(10):
        await server.create(spec_graph)
        response = await server.client.post(
            "/graph/run", json={"graph_id": "code-review-a", "initial_state": {"issues_open": 1}}
        )
        run = response.json()
    assert run["last_seq"] == 29
    assert [e["seq"] for e in run["logs"]] == list(range(1, 30))
    assert run["logs_truncated"] is False and run["logs_first_seq"] == 1
