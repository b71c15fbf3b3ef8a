"""HTTP edge cases a client meets: fixed paths, cursors, ETags, the end of SSE, run ids.

Real Hypercorn, real httpx client (the ``server`` fixture), as in test_web_rest.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
from web_support import Server, assert_error, parse_sse

from trioflow.web.handlers import etag_matches

# -- cursors ---------------------------------------------------------------------------


async def test_a_cursor_this_server_did_not_give_out_is_a_clear_400(server: Server) -> None:
    with trio.fail_after(10):
        for path in ("/runs", "/graphs", "/tools"):
            for cursor in ("garbage", "gQ", "W1td", "bm90IGpzb24"):
                response = await server.client.get(path, params={"cursor": cursor})
                assert_error(response, 400, "invalid_cursor")
                message = response.json()["error"]["message"]
                assert message.startswith("the cursor is not one this server gave out")
                assert "codec" not in message and "decode" not in message


# -- fixed /graph/... paths -----------------------------------------------------------


async def test_fixed_graph_paths_answer_405_with_allow(server: Server) -> None:
    client = server.client
    with trio.fail_after(10):
        for path in ("/graph/create", "/graph/run"):
            response = await client.get(path)
            details = assert_error(response, 405, "method_not_allowed")
            assert response.headers["allow"] == "POST"
            assert details["allow"] == ["POST"]
            message = response.json()["error"]["message"]
            assert message == f"GET is not allowed on {path}; use POST"
            head = await client.head(path)
            assert head.status_code == 405 and head.headers["allow"] == "POST"
        response = await client.post("/graph/state/some-run")
        assert_error(response, 405, "method_not_allowed")
        assert "GET" in response.headers["allow"]
        response = await client.get("/graph/cancel/some-run")
        assert_error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "POST"
        # Other names are graph ids, as before.
        assert_error(await client.get("/graph/state"), 404, "graph_not_found")
        await server.create(
            {"id": "state", "start_node": "a", "nodes": [{"id": "a", "callable": "tools.noop"}]}
        )
        assert (await client.get("/graph/state")).status_code == 200


# -- ETag and If-None-Match ------------------------------------------------------------


def test_if_none_match_follows_rfc_9110() -> None:
    etag = '"abc"'
    assert etag_matches('"abc"', etag)
    assert etag_matches('W/"abc"', etag)  # weak comparison
    assert etag_matches('"x", W/"abc"', etag)
    assert etag_matches(' "x" ,"abc" ', etag)
    assert etag_matches("*", etag)
    assert etag_matches(" * ", etag)
    assert not etag_matches('"abcd"', etag)
    assert not etag_matches("abc", etag)  # not a quoted entity tag
    assert not etag_matches('w/"abc"', etag)  # the W is upper case
    assert not etag_matches('"x", *', etag)  # * only alone
    assert not etag_matches("", etag)
    assert etag_matches('"a,b"', '"a,b"')  # a comma is a valid etag character


async def test_get_graph_answers_304_to_the_current_etag(
    server: Server, spec_graph: dict[str, Any]
) -> None:
    client = server.client
    with trio.fail_after(10):
        await server.create(spec_graph)
        first = await client.get("/graph/code-review-a")
        assert first.status_code == 200
        etag = first.headers["etag"]
        assert etag.startswith('"') and etag.endswith('"')
        for condition in (etag, f"W/{etag}", f'"stale", {etag}', "*"):
            again = await client.get("/graph/code-review-a", headers={"If-None-Match": condition})
            assert again.status_code == 304, condition
            assert again.content == b""
            assert again.headers["etag"] == etag
            assert "content-type" not in again.headers
        # Two header fields are one list.
        two = await client.get(
            "/graph/code-review-a",
            headers=[("If-None-Match", '"stale"'), ("If-None-Match", f"W/{etag}")],
        )
        assert two.status_code == 304
        for condition in ('"stale"', "garbage", etag[1:-1]):
            fresh = await client.get("/graph/code-review-a", headers={"If-None-Match": condition})
            assert fresh.status_code == 200, condition
            assert fresh.json() == first.json()
        # * matches only a graph that exists.
        missing = await client.get("/graph/nope", headers={"If-None-Match": "*"})
        assert_error(missing, 404, "graph_not_found")


# -- SSE on a finished run --------------------------------------------------------------


async def test_sse_after_the_end_of_a_finished_run_is_204(
    server: Server, spec_graph: dict[str, Any]
) -> None:
    client = server.client
    with trio.fail_after(10):
        await server.create(spec_graph)
        run = (await client.post("/graph/run", json={"graph_id": "code-review-a"})).json()
        last = run["last_seq"]
        path = f"/sse/logs/{run['run_id']}"
        for response in (
            await client.get(path, headers={"Last-Event-ID": str(last)}),
            await client.get(path, params={"after": last}),
            await client.get(path, headers={"Last-Event-ID": str(last + 5)}),
        ):
            assert response.status_code == 204
            assert response.content == b""
        # One entry before the end: that entry and the status, as before.
        response = await client.get(path, headers={"Last-Event-ID": str(last - 1)})
        assert response.status_code == 200
        events = parse_sse(response.text)
        assert [e.get("id") for e in events] == [str(last), None]
        assert events[-1]["event"] == "status"


async def test_sse_at_the_end_of_a_run_still_going_waits(
    server: Server, gate_graph: dict[str, Any], gates: Any
) -> None:
    client = server.client
    await server.create(gate_graph)
    run_id = await server.start("gated")
    with trio.fail_after(10):
        await gates.reached.wait()
        last = (await client.get(f"/graph/state/{run_id}")).json()["last_seq"]
        async with client.stream(
            "GET", f"/sse/logs/{run_id}", headers={"Last-Event-ID": str(last)}
        ) as response:
            assert response.status_code == 200
            gates.opened.set()
            text = "".join([chunk async for chunk in response.aiter_text()])
    events = parse_sse(text)
    assert int(events[0]["id"]) == last + 1
    assert events[-1] == {"event": "status", "data": '{"status":"completed"}'}


# -- the run id of a synchronous run ----------------------------------------------------


async def test_a_sync_run_names_its_run_and_a_client_that_gave_up_can_reattach(
    server: Server, spec_graph: dict[str, Any], gate_graph: dict[str, Any], gates: Any
) -> None:
    client = server.client
    with trio.fail_after(10):
        await server.create(spec_graph)
        ran = await client.post("/graph/run", json={"graph_id": "code-review-a"})
        assert ran.status_code == 200
        run_id = ran.json()["run_id"]
        assert ran.headers["x-run-id"] == run_id
        assert ran.headers["location"] == f"/graph/state/{run_id}"
        assert (await client.get(ran.headers["location"])).json()["status"] == "completed"

        background = await client.post(
            "/graph/run", json={"graph_id": "code-review-a", "background": True}
        )
        assert background.status_code == 202
        assert background.headers["x-run-id"] == background.json()["run_id"]

        # A client that gives up before the answer: the run goes on, and the
        # listing finds it (docs/api.md, "Reattaching to a run").
        await server.create(gate_graph)
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/graph/run", json={"graph_id": "gated"}, timeout=0.5)
        await gates.reached.wait()
        page = (await client.get("/runs", params={"graph_id": "gated", "status": "running"})).json()
        (lost,) = page["items"]
        gates.opened.set()
        final = await server.engine.wait(lost["run_id"])
        assert final.status.value == "completed"
