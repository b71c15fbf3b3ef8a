"""The cost of access control per request: server CPU with a token and without one.

Two Hypercorn servers (``bench.auth --serve MODE``), each a child process
with the memory store and one finished run of the spec's graph: one with
``--auth off``, one with ``--auth on`` and a runner token scoped to that
graph (so each request pays for the token check, the role, the rate bucket
and the scope check). Rounds alternate between the two servers; each round
sends the same number of ``GET /graph/state/{run_id}?logs=0`` (a small read,
where auth is the largest share) and of ``GET /healthz`` (public: no auth)
from one client over keep-alive. The figure is the server process's CPU per
request, summed over its threads from /proc/PID/task/*/schedstat (nanoseconds); the
note gives the difference, which is what a token costs.

Run alone: ``python -m bench.auth [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import trio

from ._common import SPEC_INITIAL_STATE, Row, load_spec_graph, row, skipped, web_available
from .service import Server


def proc_cpu_s(pid: int) -> float:
    """CPU seconds of every thread of a process, to the nanosecond (/proc/PID/task/*/schedstat)."""
    import os

    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total / 1e9


async def _serve(mode: str) -> None:
    from trioflow import open_engine
    from trioflow.web import Settings
    from trioflow.web.app import create_app
    from trioflow.web.auth import AuthSettings, make_token
    from trioflow.web.serve import serve

    async with open_engine() as engine:
        graph = load_spec_graph()
        await engine.register_graph(graph)
        run = await engine.start_run(graph["id"], SPEC_INITIAL_STATE)
        await engine.wait(run.run_id)
        token = ""
        auth = AuthSettings(mode="off")
        if mode == "on":
            record, token = make_token(
                "bench", "runner", [graph["id"][:4] + "*"], pepper=b"x" * 32, now=0.0
            )
            await engine.store.put_token(record)
            auth = AuthSettings(mode="on", pepper=b"x" * 32, rate=1e9, burst=10**9)
        app = create_app(engine, Settings(auth=auth, access_log=False))
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve(
                    app, host="127.0.0.1", port=0, graceful_timeout=2.0, task_status=task_status
                )
            )
            print(f"TOKEN {token} {run.run_id}", flush=True)
            print(f"LISTENING {binds[0]}", flush=True)


async def _round(url: str, pid: int, headers: dict[str, str], path: str, n: int) -> float:
    import httpx

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        for _ in range(20):  # warm the connection and the token cache
            (await client.get(path)).raise_for_status()
        before = proc_cpu_s(pid)
        for _ in range(n):
            response = await client.get(path)
            if response.status_code != 200:
                raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")
        return (proc_cpu_s(pid) - before) / n * 1e6


def run(quick: bool = False) -> list[Row]:
    if not web_available():
        return [skipped("auth", "cost per request", "web/ has not landed")]
    servers: dict[str, Any] = {}
    try:
        for mode in ("off", "on"):
            server = Server("bench.auth", (mode,))
            assert server.proc.stdout is not None
            servers[mode] = server
        n = 300 if quick else 1500
        rounds = 3 if quick else 7
        samples: dict[tuple[str, str], list[float]] = {}
        meta: dict[str, tuple[str, str]] = {}
        for mode, server in servers.items():
            line = next(x for x in server.preamble if x.startswith("TOKEN "))
            _, token, run_id = _token_line(line)
            meta[mode] = (token, run_id)
        for _ in range(rounds):
            for mode, server in servers.items():
                token, run_id = meta[mode]
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                for name, path in (
                    ("state", f"/graph/state/{run_id}?logs=0"),
                    ("healthz", "/healthz"),
                ):
                    cpu = trio.run(_round, server.url, server.proc.pid, headers, path, n)
                    samples.setdefault((mode, name), []).append(cpu)
    finally:
        for server in servers.values():
            server.stop()
    checks = [trio.run(_check_cost, 5000 if quick else 20000) for _ in range(rounds)]
    med = {k: statistics.median(v) for k, v in samples.items()}
    cost = med[("on", "state")] - med[("off", "state")]
    base = med[("off", "healthz")], med[("on", "healthz")]
    rows = [
        row(
            "auth",
            "GET /graph/state, no access control",
            "server CPU",
            "µs/request",
            samples[("off", "state")],
        ),
        row(
            "auth",
            "GET /graph/state, runner token (scoped)",
            "server CPU",
            "µs/request",
            samples[("on", "state")],
            note=f"a token costs {cost:+.0f} µs of server CPU per request "
            f"({cost / med[('off', 'state')] * 100:+.0f}%); /healthz (public) on the two "
            f"servers: {base[0]:.0f} and {base[1]:.0f} µs",
        ),
        row(
            "auth",
            "the token check alone, in process",
            "CPU",
            "µs/check",
            checks,
            note="Authority.principal + rate bucket + scope match, the token's record cached",
        ),
    ]
    return rows


async def _check_cost(n: int) -> float:
    """µs per token check in process: authenticate, role, rate bucket, scope (cached record)."""
    import time

    from starlette.requests import Request

    from trioflow import open_engine
    from trioflow.web.auth import Authority, AuthSettings, make_token

    async with open_engine() as engine:
        record, token = make_token("b", "runner", ["code-*"], pepper=b"x" * 32, now=0.0)
        await engine.store.put_token(record)
        authority = Authority(
            engine.store, AuthSettings(mode="on", pepper=b"x" * 32, rate=1e9, burst=10**9)
        )
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/graph/state/x",
            "headers": [(b"authorization", f"Bearer {token}".encode())],
            "query_string": b"",
        }
        request = Request(scope)
        await authority.principal(request, "viewer", "GET")
        t0 = time.perf_counter()
        for _ in range(n):
            principal = await authority.principal(request, "viewer", "GET")
            authority.limit(principal)
            principal.sees("code-review-a")
        return (time.perf_counter() - t0) / n * 1e6


def _token_line(line: str) -> tuple[str, str, str]:
    """``TOKEN <token or nothing> <run_id>``."""
    parts = line.rstrip("\n").split(" ")
    return parts[0], parts[1], parts[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(_serve, args.serve[0])
        return
    from .__main__ import print_table

    print_table(run(args.quick))


if __name__ == "__main__":
    sys.exit(main())
