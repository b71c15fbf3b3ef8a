"""Host and Origin checks and JSON-only bodies (web.guard), against a real server and clients."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from web_support import Server, open_ws, start_server, ws_collect

from trioflow import Engine
from trioflow.web import Settings, create_app


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    details: dict[str, Any] = body["error"]["details"]
    return details


async def raw_handshake(
    base_url: str, path: str, host: str | None = None, origin: str | None = None
) -> tuple[int, dict[str, Any]]:
    """A WebSocket handshake with the given Host and Origin: the status and the JSON body.

    (trio-websocket sends the URL's host as Host, and leaves its socket open
    when a handshake is rejected.)
    """
    address, port = base_url.removeprefix("http://").split(":")
    host = host or f"{address}:{port}"
    extra = f"Origin: {origin}\r\n" if origin else ""
    stream = await trio.open_tcp_stream(address, int(port))
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Upgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.fixture
async def open_server(web_engine: Engine) -> AsyncIterator[Any]:
    """Start servers with given settings on the test's engine; stopped on the way out."""
    async with trio.open_nursery() as nursery:
        servers: list[Server] = []

        async def start(settings: Settings) -> Server:
            srv = await start_server(nursery, create_app(web_engine, settings), web_engine)
            servers.append(srv)
            return srv

        yield start
        for srv in servers:
            await srv.client.aclose()
            srv.stop.set()


# -- Host (DNS rebinding) ---------------------------------------------------------------


async def test_a_foreign_host_is_misdirected(server: Server, sleep_graph: dict[str, Any]) -> None:
    port = server.base_url.rsplit(":", 1)[1]
    with trio.fail_after(10):
        for host in (
            "attacker.example",
            f"attacker.example:{port}",
            "127.0.0.1.nip.io",
            "localhost.attacker.example",
            "[::2]",
            "local host",
        ):
            response = await server.client.get("/healthz", headers={"Host": host})
            details = assert_error(response, 421, "misdirected_request")
            assert details["host"] == host
        # Writes too: the run is not started.
        await server.create(sleep_graph)
        response = await server.client.post(
            "/graph/run",
            json={"graph_id": "sleepy", "background": True},
            headers={"Host": "attacker.example"},
        )
        assert_error(response, 421, "misdirected_request")
        assert (await server.client.get("/runs")).json()["items"] == []
        # The loopback names and the bound address, with or without a port.
        for host in (
            "localhost",
            f"localhost:{port}",
            "LOCALHOST",
            "127.0.0.1",
            f"127.0.0.1:{port}",
            "[::1]",
            f"[::1]:{port}",
        ):
            ok = await server.client.get("/healthz", headers={"Host": host})
            assert ok.status_code == 200, (host, ok.text)


async def test_a_websocket_handshake_with_a_foreign_host_is_refused(
    server: Server, sleep_graph: dict[str, Any]
) -> None:
    with trio.fail_after(10):
        await server.create(sleep_graph)
        run_id = await server.start("sleepy", {"sleep_s": 0})
        status, body = await raw_handshake(
            server.base_url, f"/ws/logs/{run_id}", "attacker.example"
        )
        assert status == 421
        assert body["error"]["code"] == "misdirected_request"
        url = f"{server.ws_url}/ws/logs/{run_id}"
        async with open_ws(url) as ws:  # the same handshake with our own Host is served
            messages, code = await ws_collect(ws)
        assert code == 1000 and messages[-1]["type"] == "status"


async def test_allowed_hosts_setting(open_server: Any) -> None:
    with trio.fail_after(10):
        named = await open_server(Settings(allowed_hosts=("api.example", "Other.Example")))
        for host in ("api.example", "api.example:443", "other.example", "localhost"):
            assert (await named.client.get("/healthz", headers={"Host": host})).status_code == 200
        response = await named.client.get("/healthz", headers={"Host": "api.example.evil"})
        assert_error(response, 421, "misdirected_request")

        anything = await open_server(Settings(allowed_hosts=("*",)))
        response = await anything.client.get("/healthz", headers={"Host": "attacker.example"})
        assert response.status_code == 200


# -- Origin and content type (cross-site requests) ----------------------------------------


async def test_a_cross_site_post_is_refused(server: Server, sleep_graph: dict[str, Any]) -> None:
    with trio.fail_after(10):
        await server.create(sleep_graph)
        body = json.dumps({"graph_id": "sleepy", "background": True}).encode()
        # What a page on another site can send without a CORS preflight:
        # no content type, text/plain, a form.
        for headers in (
            {},
            {"Content-Type": "text/plain"},
            {"Content-Type": "application/x-www-form-urlencoded"},
            {"Content-Type": "multipart/form-data; boundary=x"},
        ):
            response = await server.client.post("/graph/run", content=body, headers=headers)
            details = assert_error(response, 415, "unsupported_media_type")
            assert details["content_type"] == headers.get("Content-Type")
        # JSON from a foreign Origin (sent after a preflight, or by a page that
        # fakes the type): refused as well, and so is a body-less cancel.
        evil = {"Origin": "http://attacker.example", "Content-Type": "application/json"}
        response = await server.client.post("/graph/run", content=body, headers=evil)
        details = assert_error(response, 403, "origin_forbidden")
        assert details["origin"] == "http://attacker.example"
        assert (await server.client.get("/runs")).json()["items"] == []

        run_id = await server.start("sleepy", {"sleep_s": 30})
        for origin in (
            "http://attacker.example",
            "null",
            f"{server.base_url}.evil",
            server.base_url.replace("http://", "https://"),
        ):
            response = await server.client.post(
                f"/graph/cancel/{run_id}", headers={"Origin": origin}
            )
            assert_error(response, 403, "origin_forbidden")
        response = await server.client.get("/runs", headers={"Origin": "http://attacker.example"})
        assert_error(response, 403, "origin_forbidden")
        # Same origin (the page the server itself serves) and no Origin (curl, SDKs) are fine.
        response = await server.client.post(
            f"/graph/cancel/{run_id}", headers={"Origin": server.base_url}
        )
        assert response.status_code == 200, response.text
        response = await server.client.post(f"/graph/cancel/{run_id}")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        same = {
            "Origin": server.base_url.replace("127.0.0.1", "localhost"),
            "Host": server.base_url.replace("http://127.0.0.1", "localhost"),
        }
        assert (await server.client.get("/runs", headers=same)).status_code == 200


async def test_a_post_without_a_body_needs_no_content_type(
    server: Server, sleep_graph: dict[str, Any]
) -> None:
    with trio.fail_after(10):
        await server.create(sleep_graph)
        run_id = await server.start("sleepy", {"sleep_s": 30})
        # What `curl -X POST .../graph/cancel/{run_id}` sends.
        host, port = server.base_url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                f"POST /graph/cancel/{run_id} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "User-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n".encode()
            )
            received = b""
            while b'"status":"cancelled"' not in received:
                chunk = await stream.receive_some(65536)
                assert chunk, received
                received += chunk
        assert received.startswith(b"HTTP/1.1 200 ")
        # A body still needs its type, whatever the route.
        response = await server.client.post(
            f"/graph/cancel/{run_id}", content=b"x", headers={"Content-Type": "text/plain"}
        )
        assert_error(response, 415, "unsupported_media_type")


async def test_a_websocket_handshake_from_a_foreign_origin_is_refused(
    server: Server, sleep_graph: dict[str, Any]
) -> None:
    with trio.fail_after(10):
        await server.create(sleep_graph)
        run_id = await server.start("sleepy", {"sleep_s": 0})
        url = f"{server.ws_url}/ws/logs/{run_id}"
        status, body = await raw_handshake(
            server.base_url, f"/ws/logs/{run_id}", origin="http://attacker.example"
        )
        assert status == 403
        assert body["error"]["code"] == "origin_forbidden"
        async with open_ws(url, extra_headers=[("Origin", server.base_url)]) as ws:
            messages, code = await ws_collect(ws)
        assert code == 1000 and messages[-1] == {"type": "status", "status": "completed"}


async def test_allowed_origins_setting(open_server: Any, sleep_graph: dict[str, Any]) -> None:
    with trio.fail_after(10):
        srv = await open_server(
            Settings(allowed_origins=("https://app.example", "http://localhost:3000"))
        )
        for origin in ("https://app.example", "https://APP.example:443", "http://localhost:3000"):
            response = await srv.client.get("/runs", headers={"Origin": origin})
            assert response.status_code == 200, (origin, response.text)
        for origin in ("http://app.example", "https://app.example:8443", "http://localhost:3001"):
            response = await srv.client.get("/runs", headers={"Origin": origin})
            assert_error(response, 403, "origin_forbidden")
        await srv.create(sleep_graph)
        run_id = await srv.start("sleepy", {"sleep_s": 0})
        url = f"{srv.ws_url}/ws/logs/{run_id}"
        async with open_ws(url, extra_headers=[("Origin", "https://app.example")]) as ws:
            _, code = await ws_collect(ws)
        assert code == 1000

        anyone = await open_server(Settings(allowed_origins=("*",)))
        response = await anyone.client.get("/runs", headers={"Origin": "http://attacker.example"})
        assert response.status_code == 200
