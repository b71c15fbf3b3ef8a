"""The HTTP service: sync ``POST /graph/run`` on the spec's graph beside ``GET /healthz``.

The server is a real Hypercorn (Trio worker) serving ``trioflow.web.create_app``
on ``127.0.0.1:0`` in a **child process** (``python -m bench.service
--serve``) with the memory store. On a 2-core machine a child process gets
its own core while the client (httpx.AsyncClient under Trio, in this
process) uses the other; in one process, client and server would share one
event loop and one GIL and every figure would include the client's cost.

For each concurrency level (1, 8, 64 clients, each a task sending requests
back to back over a shared connection pool) a round sends a bounded number
of ``/healthz`` requests, then the same number of sync ``/graph/run``
requests (``background: false``, ``{"issues_open": 1}``: 9 steps). Rounds
alternate so both see the same noise; the table gives the median over rounds
of requests per second and of per-round p50/p99 latency, and the ratio
run/healthz of the medians. The client is Python too (httpx costs more CPU
per request than the server's /healthz does), so the notes also give CPU
time per request of the server process (from /proc/PID/stat) and of the
client: the server's figure is what the service costs, whatever the load.

Run alone: ``python -m bench.service [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import trio

from ._common import (
    ROOT,
    SPEC_INITIAL_STATE,
    Row,
    load_spec_graph,
    percentile,
    row,
    skipped,
    web_available,
)

LEVELS = (1, 8, 64)


# -- the server (child process) -------------------------------------------------


async def _serve() -> None:
    from trioflow import EngineLimits, open_engine
    from trioflow.web.app import create_app
    from trioflow.web.serve import serve

    async with open_engine(limits=EngineLimits()) as engine:
        await engine.register_graph(load_spec_graph())
        app = create_app(engine)
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve(
                    app, host="127.0.0.1", port=0, graceful_timeout=2.0, task_status=task_status
                )
            )
            print(f"LISTENING {binds[0]}", flush=True)


class Server:
    """A ``bench.service --serve`` child; ``url`` once it listens. Stop with :meth:`stop`."""

    def __init__(self, module: str = "bench.service", extra: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--serve", *extra],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.url = ""
        #: What the child printed before it listened.
        self.preamble: list[str] = []
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in self.proc.stdout:
            self.preamble.append(line)
            if line.startswith("LISTENING "):
                self.url = line.split(None, 1)[1].strip()
                break
            if time.monotonic() > deadline:
                break
        if not self.url:
            self.stop()
            raise RuntimeError("the bench server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the client ------------------------------------------------------------------


def proc_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default)."""
    if pid is None:
        return time.process_time()
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _batch(
    client: Any, clients: int, total: int, method: str, path: str, body: Any = None
) -> tuple[float, list[float], int]:
    """``total`` requests from ``clients`` tasks; (wall s, latencies s, errors)."""
    import httpx

    latencies: list[float] = []
    errors = 0
    remaining = total

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            for attempt in range(3):
                try:
                    resp = await client.request(method, path, json=body)
                    break
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    # Hypercorn closes a connection idle for keep_alive_timeout
                    # (5 s); a pooled connection can lose that race (seen as a
                    # disconnect or a reset). Retried and counted as an error.
                    errors += 1
                    if attempt == 2:
                        raise
            latencies.append(time.perf_counter() - t0)
            failed = resp.status_code != 200
            if not failed and body is not None:
                failed = resp.json().get("status") != "completed"
            errors += failed

    t0 = time.perf_counter()
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(worker)
    return time.perf_counter() - t0, latencies, errors


async def _measure(url: str, server_pid: int, quick: bool) -> list[Row]:
    import httpx

    spec_id = load_spec_graph()["id"]
    body = {"graph_id": spec_id, "initial_state": SPEC_INITIAL_STATE, "background": False}
    rounds = 2 if quick else 5
    rows: list[Row] = []
    limits = httpx.Limits(max_connections=max(LEVELS), max_keepalive_connections=max(LEVELS))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        await _batch(client, 8, 200, "GET", "/healthz")  # warm up connections and code
        await _batch(client, 8, 200, "POST", "/graph/run", body)
        for clients in LEVELS:
            total = (100 if quick else 300) * (1 if clients == 1 else 2 if clients == 8 else 4)
            stats: dict[str, dict[str, list[float]]] = {
                k: {"rps": [], "p50": [], "p99": [], "srv": [], "cli": []}
                for k in ("healthz", "run")
            }
            errors = 0
            for _ in range(rounds):
                plan = (("healthz", "GET", "/healthz", None), ("run", "POST", "/graph/run", body))
                for kind, method, path, payload in plan:
                    srv0, cli0 = proc_cpu_s(server_pid), proc_cpu_s()
                    wall, lat, err = await _batch(client, clients, total, method, path, payload)
                    stats[kind]["srv"].append((proc_cpu_s(server_pid) - srv0) / total * 1e3)
                    stats[kind]["cli"].append((proc_cpu_s() - cli0) / total * 1e3)
                    errors += err
                    stats[kind]["rps"].append(total / wall)
                    stats[kind]["p50"].append(percentile(lat, 50) * 1e3)
                    stats[kind]["p99"].append(percentile(lat, 99) * 1e3)
            med_h = statistics.median(stats["healthz"]["rps"])
            med_r = statistics.median(stats["run"]["rps"])
            share = med_r / med_h
            case = f"{clients} client{'s' if clients > 1 else ''}"
            err_note = f"; {errors} errors/retries" if errors else ""

            def cpu(kind: str, stats: dict[str, dict[str, list[float]]] = stats) -> str:
                return (
                    f"CPU/request: server {statistics.median(stats[kind]['srv']):.2f} ms, "
                    f"client {statistics.median(stats[kind]['cli']):.2f} ms"
                )

            rows += [
                row(
                    "service",
                    f"{case}: POST /graph/run sync",
                    "throughput",
                    "runs/s",
                    stats["run"]["rps"],
                    target=">= 50% healthz",
                    met=share >= 0.5,
                    note=f"{share:.0%} of /healthz ({total} requests/round); {cpu('run')}"
                    f"{err_note}",
                ),
                row(
                    "service",
                    f"{case}: POST /graph/run sync",
                    "p50 latency",
                    "ms",
                    stats["run"]["p50"],
                ),
                row(
                    "service",
                    f"{case}: POST /graph/run sync",
                    "p99 latency",
                    "ms",
                    stats["run"]["p99"],
                ),
                row(
                    "service",
                    f"{case}: GET /healthz",
                    "throughput",
                    "req/s",
                    stats["healthz"]["rps"],
                    note=cpu("healthz"),
                ),
                row(
                    "service", f"{case}: GET /healthz", "p50 latency", "ms", stats["healthz"]["p50"]
                ),
                row(
                    "service", f"{case}: GET /healthz", "p99 latency", "ms", stats["healthz"]["p99"]
                ),
            ]
    return rows


def run(quick: bool = False) -> list[Row]:
    if not web_available():
        return [skipped("service", "POST /graph/run vs /healthz", "web/ has not landed")]
    with Server() as server:
        return trio.run(_measure, server.url, server.proc.pid, quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(_serve)
        return
    from .__main__ import print_table

    print_table(run(args.quick))


if __name__ == "__main__":
    main()
