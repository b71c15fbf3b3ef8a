"""Access control over a real server: tokens, roles, graph scopes, tickets, limits, audit."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed
from web_support import Server, assert_error, open_ws, start_server

from trioflow import Engine, open_engine
from trioflow.web import Settings, create_app
from trioflow.web.auth import CACHE_S, AuthSettings, make_token
from trioflow.web.routes import ALL_OPERATIONS, STATIC_PATH, WEBSOCKET_ACCESS, starlette_routes
from trioflow.web.ui import UI_ACCESS


class Clock:
    """The wall clock token expiry is judged by, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


NOOP = {"id": "team-a.noop", "start_node": "a", "nodes": [{"id": "a", "callable": "tools.noop"}]}
NAP = {"id": "team-a.nap", "start_node": "a", "nodes": [{"id": "a", "callable": "tools.sleep"}]}
OTHER = {"id": "team-b.noop", "start_node": "a", "nodes": [{"id": "a", "callable": "tools.noop"}]}


async def new_token(
    engine: Engine, clock: Clock, role: str, graphs: list[str] | None = None, **kw: Any
) -> str:
    record, text = make_token(role, role, graphs, pepper=None, now=clock(), **kw)
    await engine.store.put_token(record)
    return text


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Env:
    def __init__(self, srv: Server, engine: Engine, clock: Clock) -> None:
        self.srv = srv
        self.engine = engine
        self.clock = clock
        self.client: httpx.AsyncClient = srv.client
        self.tokens: dict[str, str] = {}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth_settings(clock: Clock) -> AuthSettings:
    return AuthSettings(
        mode="on", clock=clock, rate=1000, burst=1000, run_rate=1000, run_burst=1000
    )


@pytest.fixture
async def env(auth_settings: AuthSettings, clock: Clock) -> AsyncIterator[Env]:
    async with open_engine() as engine:
        await engine.register_graph(NOOP)
        await engine.register_graph(NAP)
        await engine.register_graph(OTHER)
        # Startup needs a token when --auth on: one exists before the app starts.
        admin = await new_token(engine, clock, "admin")
        app = create_app(engine, Settings(auth=auth_settings))
        async with trio.open_nursery() as nursery:
            srv = await start_server(nursery, app, engine)
            async with srv.client:
                e = Env(srv, engine, clock)
                e.tokens["admin"] = admin
                yield e
            srv.stop.set()


# -- the routes table --------------------------------------------------------------


def test_every_route_declares_what_it_needs() -> None:
    from starlette.routing import Route, WebSocketRoute

    declared = {(op.method, op.path): op.access for op in ALL_OPERATIONS}
    assert set(declared.values()) <= {"public", "viewer", "runner", "admin"}
    for route in starlette_routes():
        if isinstance(route, WebSocketRoute):
            assert route.path == "/ws/logs/{run_id}" and WEBSOCKET_ACCESS == "viewer"
            continue
        assert isinstance(route, Route)
        if route.path == STATIC_PATH:
            continue  # the pages' own scripts and styles, public like /docs
        if route.path in UI_ACCESS:
            assert route.methods == {"GET", "HEAD"}, route.path
            continue  # a page: its access is in UI_ACCESS (tests/web/test_web_ui.py)
        for method in (route.methods or set()) - {"HEAD"}:
            assert (method, route.path) in declared, (method, route.path)
    # Only the service's own descriptions are public.
    public = {path for (_, path), access in declared.items() if access == "public"}
    assert public == {
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/docs",
        # A browser logs in with a token, and out.
        "/auth/session",
        "/auth/logout",
    }
    assert {path for path, access in UI_ACCESS.items() if access == "public"} == {"/", "/ui/login"}
    # An operation cannot be declared without deciding.
    from trioflow.web.routes import Operation

    with pytest.raises(TypeError):
        Operation("GET", "/x", ALL_OPERATIONS[0].endpoint, "x", "x", {}, tag="x")  # type: ignore[call-arg]


# -- the route x credential matrix --------------------------------------------------

#: What a token scoped to other graphs gets, per operation.
OUT_OF_SCOPE = {
    "createGraph": 403,
    "listGraphs": 200,
    "listTools": 200,
    "runGraph": 404,
    "getRunState": 404,
    "cancelRun": 404,
    "resumeRun": 404,
    "signalRun": 404,
    "getGraph": 404,
    "getGraphMermaid": 404,
    "listRuns": 200,
    "getRunLogs": 404,
    "streamRunLog": 404,
    "listNodes": 200,
    "metrics": 403,
    "whoAmI": 200,
    "issueTicket": 201,
    "listTokens": 403,
    "createToken": 403,
    "revokeToken": 403,
    "readAudit": 403,
    "pruneRuns": 403,
}


#: Operations that need a token for every graph (scope *) whatever its role.
EVERY_GRAPH = {"metrics"}


def _request(op: Any, env: Env, ids: dict[str, str]) -> tuple[str, str, Any]:
    path = op.path.format(graph_id="team-a.noop", run_id=ids["run"], token_id=ids["spare_token"])
    bodies: dict[str, Any] = {
        "createGraph": NOOP,
        "runGraph": {"graph_id": "team-a.noop", "background": True},
        "resumeRun": {"input": {}},
        "signalRun": {"name": "n", "updates": {}},
        "createToken": {"name": "made", "role": "viewer"},
        "pruneRuns": {"older_than_s": 86400},
    }
    body = bodies.get(op.operation_id)
    if op.method == "POST" and body is None:
        body = {}
    return op.method, path, body


async def test_every_route_with_every_credential(env: Env) -> None:
    assert set(OUT_OF_SCOPE) == {op.operation_id for op in ALL_OPERATIONS if op.access != "public"}
    engine, clock = env.engine, env.clock
    creds: dict[str, str | None] = {
        "none": None,
        "bad": "tf_0123456789abcdef_" + "A" * 43,
        "malformed": "not-a-token",
        "viewer": await new_token(engine, clock, "viewer", ["team-a.*"]),
        "runner": await new_token(engine, clock, "runner", ["team-a.*"]),
        "admin": env.tokens["admin"],
        "out_of_scope": await new_token(engine, clock, "admin", ["team-b.*"]),
        "expired": await new_token(engine, clock, "admin", expires_in=10),
        "revoked": await new_token(engine, clock, "admin"),
    }
    revoked_id = creds["revoked"].split("_")[1]  # type: ignore[union-attr]
    await engine.store.revoke_token(revoked_id, clock())
    spare, _ = make_token("spare", "viewer", None, pepper=None, now=clock())
    await engine.store.put_token(spare)
    clock.now += 11  # the expired one has expired (and the cache is older than CACHE_S)
    run = await engine.start_run("team-a.nap", {"sleep_s": 3600})
    ids = {"run": run.run_id, "spare_token": spare.token_id}
    rank = {"viewer": 1, "runner": 2, "admin": 3}
    for op in ALL_OPERATIONS:
        method, path, body = _request(op, env, ids)
        for name, token in creds.items():
            headers = bearer(token) if token is not None else {}
            if op.operation_id == "openSession":
                # Public, and checks the token it is given in its body.
                response = await env.client.post(path, json={"token": token or "x"})
                ok = name not in ("none", "bad", "malformed", "expired", "revoked")
                assert response.status_code == (200 if ok else 401), (name, response.text)
                assert ("set-cookie" in response.headers) == ok, name
                env.client.cookies.clear()  # the other requests carry only their header
                continue
            if op.access == "public":
                response = await env.client.request(method, path, headers=headers)
                assert response.status_code in (200, 204, 304), (name, path, response.status_code)
                continue
            if op.operation_id == "streamRunLog":
                headers["Accept"] = "text/event-stream"
                # The run sleeps: the stream would not end. Its answer's head is enough.
                async with env.client.stream(method, path, headers=headers) as response:
                    status = response.status_code
                    www = response.headers.get("www-authenticate")
            else:
                response = await env.client.request(
                    method, path, json=body if method == "POST" else None, headers=headers
                )
                status = response.status_code
                www = response.headers.get("www-authenticate")
            where = (name, method, path, status)
            if name in ("none", "bad", "malformed", "expired", "revoked"):
                assert status == 401, where
                assert www is not None and www.startswith("Bearer"), where
            elif name == "out_of_scope":
                assert status == OUT_OF_SCOPE[op.operation_id], where
            elif rank[name] < rank[op.access]:
                assert status == 403, where
            elif op.operation_id in EVERY_GRAPH and name in ("viewer", "runner"):
                assert status == 403, where  # these tokens are scoped to team-a.*
            else:
                assert status not in (401, 403, 404, 500), where


# -- scopes ----------------------------------------------------------------------------


async def test_scopes_filter_paginated_listings_in_the_store(env: Env) -> None:
    engine = env.engine
    for team in ("team-a", "team-b", "team-c"):
        for i in range(5):
            graph = {**NOOP, "id": f"{team}.g{i}"}
            await engine.register_graph(graph)
            await engine.wait((await engine.start_run(graph["id"])).run_id)
    token = await new_token(engine, env.clock, "viewer", ["team-a.*", "team-c.g?"])
    seen: list[str] = []
    cursor = None
    pages = []
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        r = await env.client.get("/runs", params=params, headers=bearer(token))
        assert r.status_code == 200
        page = r.json()
        pages.append(len(page["items"]))
        seen += [run["graph_id"] for run in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    expected = [f"team-a.g{i}" for i in range(5)] + [f"team-c.g{i}" for i in range(5)]
    assert sorted(seen) == sorted(expected)
    assert all(n == 3 for n in pages[:-1])  # full pages: filtered in the query, not after
    r = await env.client.get("/graphs", params={"limit": "4"}, headers=bearer(token))
    first = [g["graph_id"] for g in r.json()["items"]]
    assert first == ["team-a.g0", "team-a.g1", "team-a.g2", "team-a.g3"]
    # Another team's run, by id or by filter, does not exist for this token.
    other = (await engine.list_runs(graph_id="team-b.g0")).items[0]
    assert_error(
        await env.client.get(f"/graph/state/{other.run_id}", headers=bearer(token)),
        404,
        "run_not_found",
    )
    r = await env.client.get("/runs", params={"graph_id": "team-b.g0"}, headers=bearer(token))
    assert r.json()["items"] == []
    ws = env.srv.base_url.replace("http", "ws", 1)
    async with open_ws(
        f"{ws}/ws/logs/{other.run_id}", subprotocols=["trioflow.v1", f"trioflow.bearer.{token}"]
    ) as conn:
        message = await conn.get_message()
        assert '"run_not_found"' in message
        with pytest.raises(ConnectionClosed) as closed:
            await conn.get_message()
        assert closed.value.reason.code == 4404
    mine = (await engine.list_runs(graph_id="team-a.g0")).items[0]
    async with open_ws(
        f"{ws}/ws/logs/{mine.run_id}", subprotocols=["trioflow.v1", f"trioflow.bearer.{token}"]
    ) as conn:
        assert conn.subprotocol == "trioflow.v1"
        messages = []
        with pytest.raises(ConnectionClosed):
            while True:
                messages.append(await conn.get_message())
        assert '"run_completed"' in messages[-2] and '"completed"' in messages[-1]


# -- WebSocket -----------------------------------------------------------------------


async def test_websocket_takes_the_token_as_a_subprotocol_and_never_from_the_query(
    env: Env,
) -> None:
    run = await env.engine.start_run("team-a.noop")
    await env.engine.wait(run.run_id)
    ws = env.srv.base_url.replace("http", "ws", 1)
    token = env.tokens["admin"]
    url = f"{ws}/ws/logs/{run.run_id}"
    # The header works too (non-browser clients).
    async with open_ws(url, extra_headers=[(b"authorization", f"Bearer {token}".encode())]) as c:
        assert '"log"' in await c.get_message()
    for subprotocols, code in (
        (["trioflow.v1"], 4401),
        (["trioflow.v1", "trioflow.bearer.tf_0123456789abcdef_" + "B" * 43], 4401),
    ):
        async with open_ws(url, subprotocols=subprotocols) as conn:
            assert conn.subprotocol == "trioflow.v1"  # echoed, never the token
            message = await conn.get_message()
            assert '"unauthorized"' in message and token not in message
            with pytest.raises(ConnectionClosed) as closed:
                await conn.get_message()
            assert closed.value.reason.code == code
    # A token in the query string is refused (query strings end up in logs).
    async with open_ws(f"{url}?token={token}") as conn:
        await conn.get_message()
        with pytest.raises(ConnectionClosed) as closed:
            await conn.get_message()
        assert closed.value.reason.code == 4401


# -- revocation, expiry, tickets -----------------------------------------------------------


async def test_revoked_and_expired_tokens_stop_working_within_the_cache_time(env: Env) -> None:
    engine, clock = env.engine, env.clock
    runner = await new_token(engine, clock, "runner", expires_in=3600)
    assert (await env.client.get("/runs", headers=bearer(runner))).status_code == 200
    token_id = runner.split("_")[1]
    r = await env.client.post(
        f"/auth/tokens/{token_id}/revoke", json={}, headers=bearer(env.tokens["admin"])
    )
    assert r.json()["state"] == "revoked"
    # Revoked through this node's API: refused at once here.
    assert_error(await env.client.get("/runs", headers=bearer(runner)), 401, "unauthorized")
    # Revoked in the store by someone else (another node, the command line): within CACHE_S.
    other = await new_token(engine, clock, "viewer")
    assert (await env.client.get("/runs", headers=bearer(other))).status_code == 200
    await engine.store.revoke_token(other.split("_")[1], clock())
    await trio.sleep(CACHE_S)  # the cache ages on the monotonic clock, not the wall clock
    assert_error(await env.client.get("/runs", headers=bearer(other)), 401, "unauthorized")
    # Expiry, on the injected clock.
    short = await new_token(engine, clock, "viewer", expires_in=60)
    assert (await env.client.get("/runs", headers=bearer(short))).status_code == 200
    clock.now += 59
    assert (await env.client.get("/runs", headers=bearer(short))).status_code == 200
    clock.now += 1
    r = await env.client.get("/runs", headers=bearer(short))
    assert "expired" in assert_error(r, 401, "unauthorized") or "expired" in r.text
    # last_used_at is recorded at the cache's pace: when the record is read again.
    await trio.sleep(CACHE_S)
    assert (await env.client.get("/runs", headers=bearer(short))).status_code == 401
    listed = (await env.client.get("/auth/tokens", headers=bearer(env.tokens["admin"]))).json()
    mine = [t for t in listed["items"] if t["token_id"] == short.split("_")[1]]
    assert mine[0]["state"] == "expired" and mine[0]["last_used_at"] is not None
    assert all("secret" not in str(t) and "hash" not in str(t) for t in listed["items"])


async def test_an_event_source_uses_a_single_use_ticket(env: Env) -> None:
    run = await env.engine.start_run("team-a.noop")
    await env.engine.wait(run.run_id)
    viewer = await new_token(env.engine, env.clock, "viewer", ["team-a.*"])
    r = await env.client.post("/auth/ticket", headers=bearer(viewer))
    assert r.status_code == 201
    ticket = r.json()["ticket"]
    r = await env.client.get(f"/sse/logs/{run.run_id}", params={"ticket": ticket})
    assert r.status_code == 200 and "event: status" in r.text
    # Used up.
    r = await env.client.get(f"/sse/logs/{run.run_id}", params={"ticket": ticket})
    assert_error(r, 401, "unauthorized")
    # Expired after 30 s.
    ticket = (await env.client.post("/auth/ticket", headers=bearer(viewer))).json()["ticket"]
    env.clock.now += 31
    r = await env.client.get(f"/sse/logs/{run.run_id}", params={"ticket": ticket})
    assert_error(r, 401, "unauthorized")
    # A ticket carries its token's scopes.
    other = await env.engine.start_run("team-b.noop")
    ticket = (await env.client.post("/auth/ticket", headers=bearer(viewer))).json()["ticket"]
    r = await env.client.get(f"/sse/logs/{other.run_id}", params={"ticket": ticket})
    assert_error(r, 404, "run_not_found")


# -- limits ------------------------------------------------------------------------------


@pytest.fixture
def limited(clock: Clock) -> AuthSettings:
    return AuthSettings(
        mode="on", clock=clock, rate=0.5, burst=3, run_rate=0.2, run_burst=2, max_streams=1
    )


async def test_rate_limits_answer_429_with_retry_after(limited: AuthSettings, clock: Clock) -> None:
    async with open_engine() as engine:
        await engine.register_graph(NOOP)
        await engine.register_graph(NAP)
        token = await new_token(engine, clock, "runner")
        app = create_app(engine, Settings(auth=limited))
        async with trio.open_nursery() as nursery:
            srv = await start_server(nursery, app, engine)
            async with srv.client as client:
                statuses = [
                    (await client.get("/runs", headers=bearer(token))).status_code for _ in range(4)
                ]
                assert statuses == [200, 200, 200, 429]
                r = await client.get("/runs", headers=bearer(token))
                details = assert_error(r, 429, "rate_limited")
                assert int(r.headers["retry-after"]) >= 1 and details["retry_after_s"] > 0
                await trio.sleep(2.2)  # one request's worth comes back
                assert (await client.get("/runs", headers=bearer(token))).status_code == 200
                # Another token has a bucket of its own.
                other = await new_token(engine, clock, "runner")
                assert (await client.get("/runs", headers=bearer(other))).status_code == 200
                # Run starts: their own, smaller bucket.
                run = {"graph_id": "team-a.noop", "background": True}
                starts = [
                    (await client.post("/graph/run", json=run, headers=bearer(other))).status_code
                    for _ in range(3)
                ]
                assert starts == [202, 202, 429]
                # One stream per token at a time (max_streams=1).
                third = await new_token(engine, clock, "viewer")
                nap = await engine.start_run("team-a.nap", {"sleep_s": 3600})
                ws = srv.base_url.replace("http", "ws", 1)
                protocols = ["trioflow.v1", f"trioflow.bearer.{third}"]
                async with open_ws(f"{ws}/ws/logs/{nap.run_id}", subprotocols=protocols) as one:
                    await one.get_message()
                    async with open_ws(f"{ws}/ws/logs/{nap.run_id}", subprotocols=protocols) as two:
                        assert '"too_many_streams"' in await two.get_message()
                        with pytest.raises(ConnectionClosed) as closed:
                            await two.get_message()
                        assert closed.value.reason.code == 4429
                await engine.cancel(nap.run_id)
            srv.stop.set()


# -- audit ---------------------------------------------------------------------------------


async def test_admin_actions_and_refusals_are_audited(env: Env) -> None:
    viewer = await new_token(env.engine, env.clock, "viewer")
    r = await env.client.post(
        "/graph/create", json={**NOOP, "id": "team-a.x"}, headers=bearer(viewer)
    )
    assert_error(r, 403, "forbidden")
    admin = bearer(env.tokens["admin"])
    assert (
        await env.client.post("/graph/create", json={**NOOP, "id": "team-a.x"}, headers=admin)
    ).status_code == 201
    made = (
        await env.client.post("/auth/tokens", json={"name": "ci", "role": "runner"}, headers=admin)
    ).json()
    assert made["token"].startswith("tf_")
    audit = (await env.client.get("/auth/audit", headers=admin)).json()["items"]
    rows = [(a["actor"], a["action"], a["status"]) for a in audit]
    viewer_id, admin_id = viewer.split("_")[1], env.tokens["admin"].split("_")[1]
    assert (viewer_id, "POST /graph/create", 403) in rows
    assert (admin_id, "POST /graph/create", 201) in rows
    assert (admin_id, "POST /auth/tokens", 201) in rows
    assert made["token"] not in str(audit)


# -- startup and the command line -----------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trioflow.web.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_a_server_beyond_loopback_without_tokens_refuses_to_start(tmp_path: Any) -> None:
    store = f"sqlite:///{tmp_path}/t.db"
    done = _cli("serve", "--host", "0.0.0.0", "--port", "0", "--store", store)
    assert done.returncode == 3, done.stderr
    assert "trioflow token create" in done.stderr
    done = _cli("serve", "--host", "0.0.0.0", "--port", "0", "--store", store, "--auth", "off")
    assert done.returncode == 3 and "--auth off is refused" in done.stderr


def test_tokens_on_the_store_secret_never_stored(tmp_path: Any) -> None:
    db = tmp_path / "t.db"
    store = f"sqlite:///{db}"
    done = _cli("token", "create", "--name", "ops", "--role", "admin", "--store", store)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("tf_") and "shown this once" in done.stderr
    secret = token.split("_", 2)[2]
    listed = _cli("token", "list", "--store", store, "--json")
    assert listed.returncode == 0 and secret not in listed.stdout
    for path in tmp_path.iterdir():  # the database, its WAL and its lock file
        assert secret.encode() not in path.read_bytes(), path
    token_id = token.split("_")[1]
    assert token_id in listed.stdout
    done = _cli("token", "revoke", token_id, "--store", store)
    assert done.returncode == 0, done.stderr
    assert '"revoked"' in _cli("token", "list", "--store", store, "--json").stdout
    audit = _cli("token", "audit", "--store", store)
    assert "token create" in audit.stdout and "token revoke" in audit.stdout


async def test_a_running_server_requires_tokens_once_one_is_created_beside_it(
    tmp_path: Any,
) -> None:
    from test_web_cli import serving

    store = f"sqlite:///{tmp_path}/t.db"
    async with (
        serving("--store", store) as (base, _),
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        assert (await client.get("/runs")).status_code == 200  # loopback, no token yet
        done = await trio.to_thread.run_sync(
            lambda: _cli("token", "create", "--name", "ops", "--role", "admin", "--store", store)
        )
        token = done.stdout.strip()
        await trio.sleep(CACHE_S + 0.2)
        assert_error(await client.get("/runs"), 401, "unauthorized")
        assert (await client.get("/runs", headers=bearer(token))).status_code == 200
        # Over the API with that admin token.
        made = await trio.to_thread.run_sync(
            lambda: _cli(
                "token",
                "create",
                "--name",
                "ci",
                "--role",
                "viewer",
                "--url",
                base,
                "--token",
                token,
            )
        )
        assert made.returncode == 0, made.stderr
        viewer = made.stdout.strip()
        assert (await client.get("/runs", headers=bearer(viewer))).status_code == 200
        r = await client.post("/graph/run", json={"graph_id": "x"}, headers=bearer(viewer))
        assert_error(r, 403, "forbidden")


async def test_revoking_every_token_does_not_open_an_auto_server_again(clock: Clock) -> None:
    async with open_engine() as engine:
        app = create_app(engine, Settings(auth=AuthSettings(mode="auto", clock=clock)))
        async with trio.open_nursery() as nursery:
            srv = await start_server(nursery, app, engine)
            async with srv.client as client:
                assert (await client.get("/runs")).status_code == 200  # no token yet: open
                token = await new_token(engine, clock, "admin")
                await trio.sleep(CACHE_S)
                assert_error(await client.get("/runs"), 401, "unauthorized")
                await engine.store.revoke_token(token.split("_")[1], clock())
                await trio.sleep(CACHE_S * 2)
                assert_error(await client.get("/runs"), 401, "unauthorized")
                made = await client.post("/auth/tokens", json={"name": "x", "role": "admin"})
                assert_error(made, 401, "unauthorized")
            srv.stop.set()


async def test_an_open_stream_ends_when_its_token_is_revoked(env: Env) -> None:
    nap = await env.engine.start_run("team-a.nap", {"sleep_s": 3600})
    viewer = await new_token(env.engine, env.clock, "viewer")
    ws = env.srv.base_url.replace("http", "ws", 1)
    protocols = ["trioflow.v1", f"trioflow.bearer.{viewer}"]
    async with open_ws(f"{ws}/ws/logs/{nap.run_id}", subprotocols=protocols) as conn:
        await conn.get_message()
        await env.engine.store.revoke_token(viewer.split("_")[1], env.clock())
        with trio.fail_after(CACHE_S * 3):
            messages = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    messages.append(await conn.get_message())
        assert closed.value.reason.code == 4401 and '"unauthorized"' in messages[-1]
    # SSE too: an error event, then the end of the stream.
    other = await new_token(env.engine, env.clock, "viewer")
    with trio.fail_after(CACHE_S * 3):
        async with env.client.stream(
            "GET", f"/sse/logs/{nap.run_id}", headers=bearer(other)
        ) as response:
            assert response.status_code == 200
            await env.engine.store.revoke_token(other.split("_")[1], env.clock())
            text = "".join([chunk async for chunk in response.aiter_text()])
    assert "event: error" in text and "unauthorized" in text
    await env.engine.cancel(nap.run_id)


@pytest.fixture
def strict(clock: Clock) -> AuthSettings:
    return AuthSettings(mode="on", clock=clock, rate=0.1, burst=5)


async def test_refusals_count_against_the_rate_and_flood_no_audit_log(
    strict: AuthSettings, clock: Clock
) -> None:
    async with open_engine() as engine:
        await new_token(engine, clock, "admin")
        viewer = await new_token(engine, clock, "viewer")
        app = create_app(engine, Settings(auth=strict))
        async with trio.open_nursery() as nursery:
            srv = await start_server(nursery, app, engine)
            async with srv.client as client:
                statuses = [
                    (await client.get("/auth/tokens", headers=bearer(viewer))).status_code
                    for _ in range(40)
                ]
                assert statuses == [403] * 5 + [429] * 35
            srv.stop.set()
        audit = await engine.store.read_audit(limit=1000)
        assert len([a for a in audit if a.status == 403]) == 5


def test_a_hostile_graph_id_is_matched_in_linear_time() -> None:
    import fnmatch
    import random
    import time

    from trioflow.stores.base import glob_match
    from trioflow.web.auth import Principal

    principal = Principal("t", "t", "viewer", ("team-*.*.*", "a*b*c*d*e"))
    hostile = "team-" + "." * 15_000 + "\nx"
    started = time.perf_counter()
    assert not principal.sees(hostile)
    assert not glob_match("a*b*c*d*e", "a" + "b" * 5000 + "c" * 5000 + "d" * 5000)
    assert time.perf_counter() - started < 1.0  # a backtracking regex took seconds
    assert not principal.sees("team-x.y.z\n")  # no "$ before a newline"
    assert principal.sees("team-x.y.z")
    rng = random.Random(3)
    alphabet = "ab_.-*?"
    for _ in range(20_000):
        pattern = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        text = "".join(rng.choice("ab_.-") for _ in range(rng.randint(0, 8)))
        assert glob_match(pattern, text) == fnmatch.fnmatchcase(text, pattern), (pattern, text)


async def test_an_empty_scope_list_is_refused(env: Env) -> None:
    r = await env.client.post(
        "/auth/tokens",
        json={"name": "x", "role": "viewer", "graphs": []},
        headers=bearer(env.tokens["admin"]),
    )
    assert_error(r, 422, "request_invalid")


def test_a_connection_on_a_network_address_always_needs_a_token() -> None:
    from starlette.requests import Request

    from trioflow.web.auth import _arrived_on_loopback

    def on(host: str) -> Request:
        return Request({"type": "http", "server": (host, 8000), "headers": []})

    assert _arrived_on_loopback(on("127.0.0.1")) and _arrived_on_loopback(on("::1"))
    for host in ("10.0.0.5", "192.168.1.2", "::ffff:127.0.0.1", "2001:db8::1", "example.com"):
        assert not _arrived_on_loopback(on(host)), host
