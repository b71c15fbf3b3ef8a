"""The ``trioflow`` command, run as a user runs it: in a subprocess."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPEC = ROOT / "samples" / "code_review.json"
TRIOFLOW = [sys.executable, "-c", "import sys; from trioflow.web.cli import main; sys.exit(main())"]


async def trioflow(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [*TRIOFLOW, *args], capture_stdout=True, capture_stderr=True, check=False
        )


async def trioflow_many(*calls: tuple[str, ...]) -> list[subprocess.CompletedProcess[bytes]]:
    """Several invocations at once (each pays the interpreter's start-up)."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int) -> None:
        results[i] = await trioflow(*calls[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(one, i)
    return results


@asynccontextmanager
async def spawn(*args: str, **kwargs: Any) -> AsyncIterator[trio.Process]:
    """A running ``trioflow`` process, killed on the way out if it is still running."""
    process = await trio.lowlevel.open_process([*TRIOFLOW, *args], **kwargs)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()


def write(tmp_path: pathlib.Path, name: str, document: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return str(path)


async def test_validate(tmp_path: pathlib.Path) -> None:
    ok = await trioflow("validate", str(SPEC))
    assert ok.returncode == 0, ok.stderr
    assert b"code-review-a" in ok.stdout

    bad = write(
        tmp_path,
        "bad.json",
        {
            "id": "bad",
            "start_node": "ghost",
            "nodes": [{"id": "a", "callable": "tools.nope"}],
            "edges": [{"from": "a", "to": "nowhere"}],
        },
    )
    result = await trioflow("validate", bad)
    assert result.returncode == 1
    lines = result.stdout.decode().splitlines()
    assert len(lines) >= 3  # every problem, one per line, with its path and code
    assert any("$.start_node: unknown_start_node" in line for line in lines)
    assert any("$.nodes[0].callable: unknown_callable" in line for line in lines)

    (tmp_path / "broken.json").write_text("{nope")
    broken, missing = await trioflow_many(
        ("validate", str(tmp_path / "broken.json")), ("validate", str(tmp_path / "missing.json"))
    )
    assert broken.returncode == 1
    assert missing.returncode == 3


async def test_run_exit_codes(tmp_path: pathlib.Path) -> None:
    done = await trioflow("run", str(SPEC), "--state", '{"issues_open": 0}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"issues_open": 0, "approved": True}
    log = done.stderr.decode()
    assert "run_started" in log and "run_completed" in log
    assert log.index("node_started    submit") < log.index("node_started    approve")

    failing = write(
        tmp_path,
        "fail.json",
        {
            "id": "f",
            "start_node": "a",
            "nodes": [{"id": "a", "callable": "tools.fail"}],
        },
    )
    failed = await trioflow("run", failing, "--state", '{"fail_message": "kaput"}')
    assert failed.returncode == 1
    assert json.loads(failed.stdout) == {"fail_message": "kaput"}
    assert b"kaput" in failed.stderr

    invalid = write(tmp_path, "invalid.json", {"id": "x", "start_node": "a", "nodes": []})
    cannot_start = await trioflow_many(
        ("run", str(SPEC), "--state", "[1"),
        ("run", str(SPEC), "--state", "[1]"),
        ("run", invalid),
        ("run", str(SPEC), "--tools", "no.such.module"),
        ("run",),  # usage errors are 3 too, never "cancelled"
    )
    assert [r.returncode for r in cannot_start] == [3] * 5


async def test_run_cancelled_by_ctrl_c(tmp_path: pathlib.Path) -> None:
    sleepy = write(
        tmp_path,
        "sleep.json",
        {
            "id": "s",
            "start_node": "a",
            "nodes": [{"id": "a", "callable": "tools.sleep"}],
        },
    )
    with trio.fail_after(30):
        async with spawn(
            "run",
            sleepy,
            "--state",
            '{"sleep_s": 60}',
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as process:
            assert process.stderr is not None and process.stdout is not None
            err = b""
            while b"node_started" not in err:
                err += await process.stderr.receive_some()
            process.send_signal(signal.SIGINT)
            with trio.fail_after(5):
                code = await process.wait()
            out = b""
            while chunk := await process.stdout.receive_some():
                out += chunk
    assert code == 2
    assert json.loads(out) == {"sleep_s": 60}


async def test_serve_logs_and_sigterm(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(60):
        async with spawn(
            "serve",
            "--port",
            "0",
            "--samples",
            "--log-level",
            "warning",
            "--store",
            "memory://",
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        ) as process:
            assert process.stdout is not None
            out = b""
            while b"\n" not in out:
                chunk = await process.stdout.receive_some()
                assert chunk, "serve exited before listening"
                out += chunk
            line = out.decode().splitlines()[0]
            assert line.startswith("trioflow listening on http://127.0.0.1:")
            url = line.removeprefix("trioflow listening on ")

            import httpx

            async with httpx.AsyncClient(base_url=url) as client:
                ran = await client.post(
                    "/graph/run",
                    json={"graph_id": "code-review-a", "initial_state": {"issues_open": 1}},
                )
                assert ran.status_code == 200  # --samples registered the spec graph
                run = ran.json()

            logs = await trioflow("logs", run["run_id"], "--url", url)
            assert logs.returncode == 0, logs.stderr
            lines = logs.stdout.decode().splitlines()
            assert len(lines) == run["last_seq"]
            assert "run_completed" in lines[-1]

            tail = await trioflow(
                "logs", run["run_id"], "--url", url, "--follow", "--json", "--after", "27"
            )
            assert tail.returncode == 0
            entries = [json.loads(x) for x in tail.stdout.decode().splitlines()]
            assert entries == run["logs"][27:]

            missing = await trioflow("logs", "nope", "--url", url)
            assert missing.returncode == 3
            assert b"not found" in missing.stderr

            process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                assert await process.wait() == 0


async def test_serve_refuses_bad_configuration() -> None:
    tools, store = await trioflow_many(
        ("serve", "--port", "0", "--tools", "no.such.module"),
        ("serve", "--port", "0", "--store", "redis://nope"),
    )
    assert tools.returncode == 3
    assert b"no.such.module" in tools.stderr
    assert store.returncode == 3
    assert b"redis://nope" in store.stderr


async def test_clients_hanging_up_at_any_moment_do_not_hurt_the_server() -> None:
    # Hypercorn 0.18 races its connection teardown against a close reply it
    # still has to send; a client closing while the server sends its status
    # and close frame used to take the whole server down. Timing matters, so
    # this runs against a real `trioflow serve` process.
    from trio_websocket import ConnectionClosed
    from web_support import open_ws

    with trio.fail_after(60):
        async with spawn(
            "serve",
            "--port",
            "0",
            "--samples",
            "--log-level",
            "error",
            "--store",
            "memory://",
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        ) as process:
            assert process.stdout is not None
            out = b""
            while b"\n" not in out:
                out += await process.stdout.receive_some()
            url = out.decode().split()[3]
            import httpx

            async with httpx.AsyncClient(base_url=url) as client:
                body = {"graph_id": "code-review-a", "initial_state": {"issues_open": 1}}
                ran = await client.post("/graph/run", json=body)
                run_id = ran.json()["run_id"]
                ws_url = f"{url.replace('http', 'ws')}/ws/logs/{run_id}?after=25"
                for i in range(200):
                    async with open_ws(ws_url) as ws:
                        try:
                            for _ in range(i % 6):  # hang up after 0..5 messages
                                await ws.get_message()
                        except ConnectionClosed:
                            pass
                assert process.returncode is None
                assert (await client.get("/healthz")).status_code == 200


@asynccontextmanager
async def serving(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[tuple[str, int]]:
    """A ``trioflow serve --port 0`` process: its URL and pid; SIGTERM on the way out."""
    environment = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "web"), str(ROOT)]),
        **(env or {}),
    }
    async with spawn(
        "serve",
        "--port",
        "0",
        "--log-level",
        "warning",
        *args,
        stdout=subprocess.PIPE,
        env=environment,
    ) as process:
        assert process.stdout is not None
        out = b""
        while b"\n" not in out:
            chunk = await process.stdout.receive_some()
            assert chunk, "serve exited before listening"
            out += chunk
        yield out.decode().split()[3], process.pid
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.wait() == 0


async def test_serve_allowed_hosts_and_origins_options() -> None:
    import httpx

    with trio.fail_after(60):
        options = (
            "--store",
            "memory://",
            "--allowed-hosts",
            "api.example,Other.example",
            "--allowed-hosts",
            "third.example",
            "--allowed-origins",
            "https://app.example",
        )
        async with serving(*options) as (url, _), httpx.AsyncClient(base_url=url) as client:
            for host in ("api.example", "other.example:8080", "third.example", "localhost"):
                response = await client.get("/healthz", headers={"Host": host})
                assert response.status_code == 200, host
            response = await client.get("/healthz", headers={"Host": "attacker.example"})
            assert response.status_code == 421
            assert response.json()["error"]["code"] == "misdirected_request"
            response = await client.get("/runs", headers={"Origin": "https://app.example"})
            assert response.status_code == 200
            response = await client.get("/runs", headers={"Origin": "https://evil.example"})
            assert response.status_code == 403
        options = ("--store", "memory://", "--allowed-hosts", "*")
        async with serving(*options) as (url, _), httpx.AsyncClient(base_url=url) as client:
            response = await client.get("/healthz", headers={"Host": "anything.example"})
            assert response.status_code == 200


async def test_serve_refuses_a_store_it_cannot_open_before_binding(
    tmp_path: pathlib.Path,
) -> None:
    # A read-only directory does not stop root, so the unopenable store is a
    # path under a regular file, which fails for every user alike.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    stores = [f"sqlite:///{blocker}/trioflow.db"]
    if os.geteuid() != 0:
        read_only = tmp_path / "read-only"
        read_only.mkdir()
        read_only.chmod(0o555)
        stores.append(f"sqlite:///{read_only}/trioflow.db")
    results = await trioflow_many(*(("serve", "--port", "0", "--store", s) for s in stores))
    for store, result in zip(stores, results, strict=True):
        assert result.returncode == 3, result.stderr
        assert result.stdout == b""  # never printed "listening": no port was bound
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"trioflow: cannot open the store {store}: ")
        assert "unable to open database file" in lines[0]


async def test_serve_evaluator_option_and_environment(tmp_path: pathlib.Path) -> None:
    import httpx

    bad_option = await trioflow(
        "serve", "--port", "0", "--store", "memory://", "--evaluator", "eval"
    )
    bad_env = await run_with_env(
        {"TRIOFLOW_EVALUATOR": "python"}, "serve", "--port", "0", "--store", "memory://"
    )
    for result, value in ((bad_option, "eval"), (bad_env, "python")):
        assert result.returncode == 3
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1, lines
        assert f"unknown evaluator {value!r}" in lines[0] and "compiled, asteval" in lines[0]

    # The engine behind the server says which evaluator it compiles conditions with.
    async def evaluator(*args: str, env: dict[str, str] | None = None) -> str:
        async with (
            serving("--store", "memory://", *args, env=env) as (url, _),
            httpx.AsyncClient(base_url=url) as client,
        ):
            value: str = (await client.get("/healthz")).json()["evaluator"]
        return value

    with trio.fail_after(60):
        assert await evaluator() == "compiled"
        assert await evaluator("--evaluator", "asteval") == "asteval"
        assert await evaluator(env={"TRIOFLOW_EVALUATOR": "asteval"}) == "asteval"
        assert (
            await evaluator("--evaluator", "compiled", env={"TRIOFLOW_EVALUATOR": "asteval"})
            == "compiled"
        )


async def run_with_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [*TRIOFLOW, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, **env},
        )


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_followers_that_never_read_are_bounded_and_closed(tmp_path: pathlib.Path) -> None:
    # 100 WebSocket followers that never read, on a 1.3 MB log in SQLite,
    # against a real `trioflow serve`: the server keeps serving, holds a bounded
    # amount per follower, closes them once they have accepted nothing for the
    # send timeout, and a second wave reuses the memory the first one freed.
    import httpx
    from chatty_tools import chatty_graph
    from web_support import open_silent_ws

    followers, send_timeout = 100, 2.0

    async def healthz_seconds(client: httpx.AsyncClient) -> float:
        start = trio.current_time()
        assert (await client.get("/healthz")).status_code == 200
        return trio.current_time() - start

    closed: list[str] = []

    async def read_until_closed(stream: trio.SocketStream) -> None:
        received = b""
        with trio.move_on_after(10):
            try:
                while chunk := await stream.receive_some(1 << 20):
                    received += chunk
                closed.append("eof")
            except trio.BrokenResourceError:
                closed.append("reset")  # the server closed with data we had not read
            return
        closed.append(f"open after {len(received)} bytes: {received[-60:]!r}")

    options = (
        "--store",
        f"sqlite:///{tmp_path}/trioflow.db",
        "--tools",
        "chatty_tools",
        "--send-timeout",
        str(send_timeout),
    )
    state = {"lines": 10, "line_bytes": 1000}
    with trio.fail_after(120):
        async with (
            serving(*options) as (url, pid),
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            await client.post("/graph/create", json=chatty_graph(99))
            ran = await client.post(
                "/graph/run?logs=0", json={"graph_id": "chatty", "initial_state": state}
            )
            run = ran.json()
            assert run["last_seq"] > 1300
            path = f"/ws/logs/{run['run_id']}"
            await client.get(f"/sse/logs/{run['run_id']}")  # one follower reads it all
            base = rss_kib(pid)
            peaks, after = [], []
            for _ in range(2):
                silent = [await open_silent_ws(url, path) for _ in range(followers)]
                await trio.sleep(0.5)
                peaks.append(rss_kib(pid))
                # Served while they pile up: well within the send timeout (a
                # server stuck behind them would answer only after it).
                assert max([await healthz_seconds(client) for _ in range(10)]) < send_timeout / 2
                await trio.sleep(send_timeout + 1)
                closed.clear()
                async with trio.open_nursery() as nursery:
                    for stream in silent:
                        nursery.start_soon(read_until_closed, stream)
                for stream in silent:
                    await stream.aclose()
                # The server has closed every one of them.
                assert [c for c in closed if c not in ("eof", "reset")] == []
                assert await healthz_seconds(client) < send_timeout / 2
                await trio.sleep(0.5)
                after.append(rss_kib(pid))
    per_follower = (peaks[0] - base) / followers
    # KiB: one page of at most 64 entries of ~1.2 KB and its frame (500-entry pages before).
    assert per_follower < 256, (base, peaks, after)
    assert after[1] - after[0] < 4 * 1024, (base, peaks, after)  # the second wave reused it


async def test_serve_limit_options_reach_the_engine() -> None:
    import httpx

    bad = await trioflow(
        "serve", "--port", "0", "--store", "memory://", "--limit", "max_log_entriez=5"
    )
    assert bad.returncode == 3
    lines = bad.stderr.decode().splitlines()
    assert len(lines) == 1 and "max_log_entries" in lines[0], lines
    zero = await trioflow(
        "serve", "--port", "0", "--store", "memory://", "--limit", "max_graph_steps=0"
    )
    assert zero.returncode == 3 and "must be > 0" in zero.stderr.decode()

    loop = {
        "id": "spin",
        "start_node": "a",
        "max_steps": 200,
        "nodes": [{"id": "a", "callable": "tools.noop"}],
        "edges": [{"from": "a", "to": "a", "type": "loop", "loop": {"max_iterations": 100}}],
    }
    with trio.fail_after(60):
        options = (
            "--store",
            "memory://",
            "--limit",
            "max_graph_steps=100",
            "--limit",
            "max_log_entries=40",
        )
        async with serving(*options) as (url, _), httpx.AsyncClient(base_url=url) as client:
            r = await client.post("/graph/create", json=loop)
            assert r.status_code == 422
            problem = r.json()["error"]["details"]["problems"][0]
            assert (problem["code"], problem["path"]) == ("over_limit", "$.max_steps")
            loop["max_steps"] = 100
            assert (await client.post("/graph/create", json=loop)).status_code == 201
            run = (await client.post("/graph/run", json={"graph_id": "spin"})).json()
            assert run["status"] == "failed"
            assert run["error"]["code"] == "log_limit_exceeded"
            assert run["last_seq"] <= 40
