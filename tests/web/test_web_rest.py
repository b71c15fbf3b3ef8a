"""The REST contract end to end: real Hypercorn, real httpx client."""

from __future__ import annotations

import copy
from typing import Any

import trio
from web_support import Server

from trioflow import EngineLimits, RunStatus

SPEC_SEQUENCE = ["submit", "review", "fix", "review", "fix", "review", "fix", "review", "fix"]


def started_nodes(run: dict[str, Any]) -> list[str]:
    return [e["node"] for e in run["logs"] if e["event"] == "node_started"]


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    details: dict[str, Any] = body["error"]["details"]
    return details


async def test_spec_walkthrough(server: Server, spec_graph: dict[str, Any]) -> None:
    with trio.fail_after(10):
        created = await server.client.post("/graph/create", json=spec_graph)
        assert created.status_code == 201
        assert created.json()["graph_id"] == "code-review-a"
        assert created.json()["created"] is True

        ran = await server.client.post(
            "/graph/run",
            json={
                "graph_id": "code-review-a",
                "initial_state": {"issues_open": 1},
                "background": False,
            },
        )
        assert ran.status_code == 200
        run = ran.json()
        assert run["status"] == "completed"
        assert started_nodes(run) == SPEC_SEQUENCE
        assert run["loop_counters"] == {"fix->review": 3}
        assert [e["seq"] for e in run["logs"]] == list(range(1, run["last_seq"] + 1))
        assert run["logs"][-1]["event"] == "run_completed"
        assert any(e["event"] == "loop_exhausted" for e in run["logs"])

        state = await server.client.get(f"/graph/state/{run['run_id']}")
        assert state.status_code == 200
        assert state.json() == run

        cancelled = await server.client.post(f"/graph/cancel/{run['run_id']}")
        details = assert_error(cancelled, 409, "run_state_conflict")
        assert details["status"] == "completed"


async def test_state_has_the_record_fields(server: Server, spec_graph: dict[str, Any]) -> None:
    with trio.fail_after(10):
        await server.create(spec_graph)
        ran = await server.client.post(
            "/graph/run", json={"graph_id": "code-review-a", "initial_state": {"issues_open": 0}}
        )
        run = (await server.client.get(f"/graph/state/{ran.json()['run_id']}")).json()
    for key in (
        "run_id",
        "graph_id",
        "status",
        "current_node",
        "state",
        "step",
        "loop_counters",
        "error",
        "created_at",
        "started_at",
        "finished_at",
        "updated_at",
        "logs",
    ):
        assert key in run
    assert run["state"] == {"issues_open": 0, "approved": True}
    assert started_nodes(run) == ["submit", "review", "approve"]
    assert run["current_node"] == "approve"
    assert run["step"] == 3
    assert run["finished_at"] >= run["started_at"] >= run["created_at"]


async def test_create_is_idempotent_and_conflicts(
    server: Server, spec_graph: dict[str, Any]
) -> None:
    with trio.fail_after(10):
        first = await server.client.post("/graph/create", json=spec_graph)
        again = await server.client.post("/graph/create", json=spec_graph)
        assert first.status_code == 201 and again.status_code == 200
        assert again.json()["created"] is False
        assert again.json()["digest"] == first.json()["digest"]
        # Spelling out a default is the same document.
        explicit = copy.deepcopy(spec_graph)
        explicit["max_steps"] = 10_000
        assert (await server.client.post("/graph/create", json=explicit)).status_code == 200

        changed = copy.deepcopy(spec_graph)
        changed["nodes"][0]["callable"] = "tools.approve"
        details = assert_error(
            await server.client.post("/graph/create", json=changed), 409, "graph_conflict"
        )
        assert details["graph_id"] == "code-review-a"
        # The stored graph did not change.
        stored = await server.client.get("/graph/code-review-a")
        assert stored.json()["nodes"][0]["callable"] == "tools.noop"


async def test_create_reports_every_problem(server: Server) -> None:
    bad = {
        "id": "bad",
        "start_node": "nowhere",
        "nodes": [
            {"id": "a", "callable": "tools.noop"},
            {"id": "a", "callable": "tools.noop"},
            {"id": "b", "callable": "tools.nope"},
        ],
        "edges": [
            {"from": "a", "to": "ghost"},
            {
                "from": "a",
                "to": "a",
                "type": "branch",
                "condition": {"expression": "__import__('os')"},
            },
        ],
    }
    with trio.fail_after(10):
        details = assert_error(
            await server.client.post("/graph/create", json=bad), 422, "graph_invalid"
        )
        codes = {p["code"] for p in details["problems"]}
        assert {"unknown_callable", "duplicate_node_id", "unknown_start_node"} <= codes
        assert len(details["problems"]) >= 4
        for problem in details["problems"]:
            assert set(problem) == {"code", "path", "message"}
            assert problem["path"].startswith("$")
        # Shape problems are problems too, with paths.
        typo = {
            "id": "t",
            "start_node": "a",
            "nodes": [{"id": "a", "callable": "tools.noop", "retries": 3}],
        }
        details = assert_error(
            await server.client.post("/graph/create", json=typo), 422, "graph_invalid"
        )
        assert details["problems"][0]["code"] == "unknown_key"
        assert details["problems"][0]["path"] == "$.nodes[0].retries"
        # Not an object at all.
        assert_error(await server.client.post("/graph/create", json=[1, 2]), 422, "graph_invalid")
        # Nothing was stored.
        assert (await server.client.get("/graph/bad")).status_code == 404


async def test_get_graph_and_list_graphs(server: Server, spec_graph: dict[str, Any]) -> None:
    with trio.fail_after(10):
        for i in range(5):
            doc = {
                "id": f"g{i}",
                "name": f"graph {i}",
                "start_node": "a",
                "nodes": [{"id": "a", "callable": "tools.noop"}],
            }
            await server.create(doc)
        created = await server.create(spec_graph)
        got = await server.client.get("/graph/code-review-a")
        assert got.status_code == 200
        assert got.json()["nodes"] == spec_graph["nodes"]
        assert got.headers["etag"] == f'"{created["digest"]}"'
        # The stored document round-trips through /graph/create.
        assert (await server.client.post("/graph/create", json=got.json())).status_code == 200
        assert_error(await server.client.get("/graph/missing"), 404, "graph_not_found")

        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = (await server.client.get("/graphs", params=params)).json()
            assert len(page["items"]) <= 2
            seen += [g["graph_id"] for g in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ["code-review-a", "g0", "g1", "g2", "g3", "g4"]
        first = (await server.client.get("/graphs", params={"limit": 1})).json()["items"][0]
        assert first == {
            "graph_id": "code-review-a",
            "name": "Code Review Loop",
            "digest": created["digest"],
            "created_at": first["created_at"],
        }


async def test_list_runs_filters_and_pages(
    server: Server, spec_graph: dict[str, Any], gate_graph: dict[str, Any]
) -> None:
    with trio.fail_after(10):
        await server.create(spec_graph)
        await server.create(gate_graph)
        done = [
            (await server.client.post("/graph/run", json={"graph_id": "code-review-a"})).json()[
                "run_id"
            ]
            for _ in range(5)
        ]
        waiting = await server.start("gated")

        all_ids: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            response = await server.client.get("/runs", params=params)
            assert response.status_code == 200
            page = response.json()
            all_ids += [r["run_id"] for r in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(all_ids) == sorted([*done, waiting])
        assert len(set(all_ids)) == 6

        by_graph = (await server.client.get("/runs", params={"graph_id": "gated"})).json()
        assert [r["run_id"] for r in by_graph["items"]] == [waiting]
        completed = (await server.client.get("/runs", params={"status": "completed"})).json()
        assert sorted(r["run_id"] for r in completed["items"]) == sorted(done)
        assert all(r["status"] == "completed" for r in completed["items"])

        assert_error(
            await server.client.get("/runs", params={"status": "bogus"}), 422, "request_invalid"
        )
        for limit in ("0", "501", "x"):
            details = assert_error(
                await server.client.get("/runs", params={"limit": limit}), 422, "request_invalid"
            )
            assert details["errors"][0]["field"] == "limit"
        assert_error(
            await server.client.get("/runs", params={"cursor": "not-a-cursor!"}),
            400,
            "invalid_cursor",
        )
        assert_error(
            await server.client.get("/graphs", params={"cursor": "%%%"}), 400, "invalid_cursor"
        )
        assert_error(
            await server.client.get("/runs", params={"colour": "red"}), 422, "request_invalid"
        )
        assert (await server.client.get("/runs", params={"limit": 500})).status_code == 200


async def test_run_errors(server: Server, spec_graph: dict[str, Any]) -> None:
    with trio.fail_after(10):
        await server.create(spec_graph)
        details = assert_error(
            await server.client.post("/graph/run", json={"graph_id": "nope"}),
            404,
            "graph_not_found",
        )
        assert details == {"graph_id": "nope"}
        for body, field in [
            ({"graph_id": "code-review-a", "initial_state": [1]}, "initial_state"),
            ({"graph_id": "code-review-a", "background": "yes"}, "background"),
            ({"graph_id": "code-review-a", "extra": 1}, "extra"),
            ({"initial_state": {}}, "graph_id"),
            ({"graph_id": ""}, "graph_id"),
        ]:
            details = assert_error(
                await server.client.post("/graph/run", json=body), 422, "request_invalid"
            )
            assert [e["field"] for e in details["errors"]] == [field]
        assert_error(await server.client.post("/graph/run", json=[]), 422, "request_invalid")


async def test_bad_initial_state_is_422(web_registry: Any, settings: Any) -> None:
    from pydantic import BaseModel
    from web_support import start_server

    from trioflow import open_engine
    from trioflow.web import create_app

    class Review(BaseModel):
        issues_open: int

    web_registry.add_model("review", Review)
    doc = {
        "id": "typed",
        "start_node": "a",
        "state_model": "review",
        "nodes": [{"id": "a", "callable": "tools.noop"}],
    }
    with trio.fail_after(10):
        async with open_engine(registry=web_registry) as engine, trio.open_nursery() as nursery:
            srv = await start_server(nursery, create_app(engine, settings), engine)
            async with srv.client:
                await srv.create(doc)
                response = await srv.client.post(
                    "/graph/run",
                    json={"graph_id": "typed", "initial_state": {"issues_open": "many"}},
                )
                details = assert_error(response, 422, "state_invalid")
                assert details["errors"][0]["field"] == "issues_open"
                ok = await srv.client.post(
                    "/graph/run", json={"graph_id": "typed", "initial_state": {"issues_open": 2}}
                )
                assert ok.json()["status"] == "completed"
            srv.stop.set()


async def test_background_run_and_cancel(server: Server, sleep_graph: dict[str, Any]) -> None:
    with trio.fail_after(10):
        await server.create(sleep_graph)
        response = await server.client.post(
            "/graph/run",
            json={"graph_id": "sleepy", "initial_state": {"sleep_s": 30}, "background": True},
        )
        assert response.status_code == 202
        accepted = response.json()
        assert accepted["status"] == "pending"
        assert response.headers["location"] == f"/graph/state/{accepted['run_id']}"
        run_id = accepted["run_id"]

        cancelled = await server.client.post(f"/graph/cancel/{run_id}")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["run_id"] == run_id
        again = await server.client.post(f"/graph/cancel/{run_id}")
        assert again.status_code == 200
        assert again.json()["status"] == "cancelled"

        state = (await server.client.get(f"/graph/state/{run_id}")).json()
        assert state["status"] == "cancelled"
        assert state["logs"][-1]["event"] == "run_cancelled"

        assert_error(await server.client.post("/graph/cancel/nope"), 404, "run_not_found")
        assert_error(await server.client.get("/graph/state/nope"), 404, "run_not_found")


async def test_failed_run_is_200_with_error_and_cancel_is_409(server: Server) -> None:
    doc = {"id": "boom", "start_node": "a", "nodes": [{"id": "a", "callable": "tools.fail"}]}
    with trio.fail_after(10):
        await server.create(doc)
        response = await server.client.post(
            "/graph/run", json={"graph_id": "boom", "initial_state": {"fail_message": "kaput"}}
        )
        assert response.status_code == 200
        run = response.json()
        assert run["status"] == "failed"
        assert run["error"]["node"] == "a"
        assert "kaput" in run["error"]["message"]
        details = assert_error(
            await server.client.post(f"/graph/cancel/{run['run_id']}"), 409, "run_state_conflict"
        )
        assert details["status"] == "failed"


async def test_http_layer_errors_share_the_shape(server: Server) -> None:
    with trio.fail_after(10):
        assert_error(await server.client.get("/no/such/route"), 404, "not_found")
        details = assert_error(await server.client.delete("/graph/run"), 405, "method_not_allowed")
        assert details["allow"] == ["POST"]
        json_type = {"content-type": "application/json"}
        assert_error(
            await server.client.post("/graph/run", content=b'{"graph_id": ', headers=json_type),
            400,
            "malformed_json",
        )
        assert_error(await server.client.post("/graph/run", content=b""), 400, "malformed_json")
        assert_error(
            await server.client.post(
                "/graph/run",
                content=b'{"graph_id": NaN}',
                headers={"content-type": "application/json"},
            ),
            400,
            "malformed_json",
        )
        assert_error(
            await server.client.post("/graph/create", content=b"[" * 10_000, headers=json_type),
            400,
            "malformed_json",
        )
        assert_error(
            await server.client.post(
                "/graph/run",
                content=b"graph_id=x",
                headers={"content-type": "application/x-www-form-urlencoded"},
            ),
            415,
            "unsupported_media_type",
        )
        # JSON with a charset or a +json media type is JSON.
        ok = await server.client.post(
            "/graph/run",
            content=b'{"graph_id": "nope"}',
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert_error(ok, 404, "graph_not_found")


async def test_body_limit(server: Server) -> None:
    big = b'{"graph_id": "x", "initial_state": {"blob": "' + b"x" * 70_000 + b'"}}'
    with trio.fail_after(10):
        details = assert_error(
            await server.client.post(
                "/graph/run", content=big, headers={"content-type": "application/json"}
            ),
            413,
            "body_too_large",
        )
        assert details["maximum"] == 64 * 1024

        # No Content-Length: the body is counted while it streams in.
        host, port = server.base_url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                b"POST /graph/create HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"x" * 4096
            received = b""
            with trio.move_on_after(5):
                for _ in range(40):  # 160 KiB in all, over the 64 KiB limit
                    await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    if b"\r\n\r\n" in received:
                        break
                    with trio.move_on_after(0.01):
                        received += await stream.receive_some(65536)
                while b"body_too_large" not in received:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    received += data
        assert received.startswith(b"HTTP/1.1 413 "), received[:200]
        assert b'"code":"body_too_large"' in received
        # The server is fine afterwards.
        assert (await server.client.get("/healthz")).status_code == 200


async def test_state_limit_is_413(
    web_registry: Any, settings: Any, spec_graph: dict[str, Any]
) -> None:
    from web_support import start_server

    from trioflow import open_engine
    from trioflow.web import create_app

    limits = EngineLimits(max_state_bytes=1000)
    with trio.fail_after(10):
        async with (
            open_engine(registry=web_registry, limits=limits) as engine,
            trio.open_nursery() as nursery,
        ):
            srv = await start_server(nursery, create_app(engine, settings), engine)
            async with srv.client:
                await srv.create(spec_graph)
                response = await srv.client.post(
                    "/graph/run",
                    json={"graph_id": "code-review-a", "initial_state": {"blob": "x" * 2000}},
                )
                details = assert_error(response, 413, "limit_exceeded")
                assert details["maximum"] == 1000
            srv.stop.set()


async def test_capacity_is_429(
    web_registry: Any, settings: Any, gate_graph: dict[str, Any], gates: Any
) -> None:
    from web_support import start_server

    from trioflow import open_engine
    from trioflow.web import create_app

    with trio.fail_after(10):
        async with (
            open_engine(registry=web_registry, limits=EngineLimits(max_active_runs=1)) as engine,
            trio.open_nursery() as nursery,
        ):
            srv = await start_server(nursery, create_app(engine, settings), engine)
            async with srv.client:
                await srv.create(gate_graph)
                await srv.start("gated")
                response = await srv.client.post("/graph/run", json={"graph_id": "gated"})
                assert_error(response, 429, "capacity_exceeded")
                assert response.headers["retry-after"] == "1"
                gates.opened.set()
            srv.stop.set()


async def test_healthz(server: Server) -> None:
    with trio.fail_after(10):
        response = await server.client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["active_runs"] == 0


async def test_sync_run_survives_a_client_that_hangs_up(
    server: Server, gate_graph: dict[str, Any], gates: Any
) -> None:
    with trio.fail_after(10):
        await server.create(gate_graph)
        with trio.move_on_after(0.2):
            await server.client.post("/graph/run", json={"graph_id": "gated"})
        gates.opened.set()
        page = (await server.client.get("/runs", params={"graph_id": "gated"})).json()
        run_id = page["items"][0]["run_id"]
        final = await server.engine.wait(run_id)
    assert final.status is RunStatus.COMPLETED
