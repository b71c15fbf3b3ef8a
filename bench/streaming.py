"""Log streaming: one run writing many log entries, followed by many WebSocket clients.

The server is a real Hypercorn in a child process (``python -m bench.streaming
--serve``, memory store) with one extra tool, ``bench.emit``: an async step
that logs a batch of entries with ``ctx.log``. The graph is a gate node
(``tools.sleep``, so clients can connect before anything is written) and
``emit`` looping on itself, so a run writes ``steps x batch`` custom entries,
one checkpoint per step, as fast as the engine goes.

The clients (trio-websocket, in this process) connect to ``/ws/logs/{run_id}``
(one message per entry, as the specification says, or with ``?batch=100``:
messages of up to 100 entries available at once)
during the gate, then read until the terminal status message. For every
custom entry received, lag = receipt time - the entry's ``ts`` (both
``time.time()`` on this machine). *Delivered per second* counts entries
received by all clients together from the first write to the last receipt.
A deadline bounds the benchmark: when it passes, the clients stop and the
table says what share of the deliveries arrived. The notes give the CPU
seconds of the server and of the client process, to show which side bounds
the rate.

Run alone: ``python -m bench.streaming [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from array import array
from typing import Any

import trio

from ._common import Row, percentile, row, skipped, web_available

GRAPH = {
    "id": "bench-stream",
    "name": "gate, then emit log batches",
    "start_node": "gate",
    "max_steps": 100_000,
    "nodes": [
        {"id": "gate", "callable": "tools.sleep"},
        {"id": "emit", "callable": "bench.emit"},
    ],
    "edges": [
        {"from": "gate", "to": "emit", "type": "sequential"},
        {"from": "emit", "to": "emit", "type": "loop", "loop": {"max_iterations": 99}},
    ],
}
STEPS = 100  # emit executions: the loop above fires 99 times


async def emit(state: Any, ctx: Any) -> None:
    """Log ``batch`` entries (from the state), then let other tasks run."""
    batch = int(getattr(state, "batch", 100))
    for i in range(batch):
        ctx.log("bench entry", i=i)
    await trio.lowlevel.checkpoint()


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve() -> None:
    from trioflow import EngineLimits, default_registry, open_engine
    from trioflow.web.app import create_app
    from trioflow.web.serve import serve

    _raise_fd_limit()
    registry = default_registry()
    registry.add_tool("bench.emit", emit)
    async with open_engine(registry=registry, limits=EngineLimits()) as engine:
        await engine.register_graph(GRAPH)
        app = create_app(engine)
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve(
                    app, host="127.0.0.1", port=0, graceful_timeout=2.0, task_status=task_status
                )
            )
            print(f"LISTENING {binds[0]}", flush=True)


async def _measure(
    url: str, server_pid: int, clients: int, entries: int, deadline_s: float, ws_batch: int = 1
) -> dict[str, Any]:
    import httpx
    from trio_websocket import open_websocket_url

    from .service import proc_cpu_s

    _raise_fd_limit()
    batch = entries // STEPS
    gate_s = 3.0 + clients * 0.01
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        resp = await http.post(
            "/graph/run",
            json={
                "graph_id": GRAPH["id"],
                "background": True,
                "initial_state": {"sleep_s": gate_s, "batch": batch},
            },
        )
        resp.raise_for_status()
        run_id = resp.json()["run_id"]
    ws_url = url.replace("http://", "ws://") + f"/ws/logs/{run_id}"
    if ws_batch > 1:
        ws_url += f"?batch={ws_batch}"
    lags = array("d")
    received = 0
    finished = 0
    connected = 0
    first_ts = float("inf")
    last_rx = 0.0
    connect_slots = trio.Semaphore(32)  # do not overflow the listen backlog
    all_connected = trio.Event()

    async def client() -> None:
        nonlocal received, finished, connected, first_ts, last_rx
        await connect_slots.acquire()
        released = False
        try:
            async with open_websocket_url(ws_url, message_queue_size=64) as ws:
                connect_slots.release()
                released = True
                connected += 1
                if connected == clients:
                    all_connected.set()
                while True:
                    message = json.loads(await ws.get_message())
                    now = time.time()
                    if message.get("type") == "status":
                        finished += 1
                        last_rx = max(last_rx, now)
                        return
                    batch_ = message["logs"] if message["type"] == "logs" else [message["log"]]
                    for entry in batch_:
                        if entry["event"] == "custom":
                            ts = entry["ts"]
                            first_ts = min(first_ts, ts)
                            lags.append(now - ts)
                            received += 1
                            last_rx = now
        finally:
            if not released:
                connect_slots.release()

    cpu_srv0, cpu_cli0 = proc_cpu_s(server_pid), proc_cpu_s()
    t_start = time.time()
    with trio.move_on_after(deadline_s) as timer:
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client)
            with trio.move_on_after(gate_s):
                await all_connected.wait()
            connect_s = time.time() - t_start
    cpu_srv, cpu_cli = proc_cpu_s(server_pid) - cpu_srv0, proc_cpu_s() - cpu_cli0
    window = max(last_rx - first_ts, 1e-9) if received else float("nan")
    return {
        "clients": clients,
        "entries": entries,
        "expected": clients * entries,
        "received": received,
        "finished": finished,
        "timed_out": timer.cancelled_caught,
        "connected": connected,
        "connect_s": connect_s,
        "gate_s": gate_s,
        "rate": received / window if received else 0.0,
        "p50_lag_ms": percentile(lags, 50) * 1e3,
        "p99_lag_ms": percentile(lags, 99) * 1e3,
        "max_lag_ms": max(lags, default=float("nan")) * 1e3,
        "server_cpu_s": cpu_srv,
        "client_cpu_s": cpu_cli,
        "window_s": window,
    }


def run(quick: bool = False) -> list[Row]:
    if not web_available():
        return [skipped("streaming", "WebSocket followers", "web/ has not landed")]
    from .service import Server

    # (clients, entries, deadline s, samples, entries per WebSocket message)
    plan = (
        [(100, 1_000, 20, 1, 1), (1_000, 1_000, 30, 1, 100)]
        if quick
        else [(100, 10_000, 45, 1, 1), (1_000, 10_000, 75, 1, 1), (1_000, 10_000, 75, 1, 100)]
    )
    rows: list[Row] = []
    for clients, entries, deadline, reps, ws_batch in plan:
        results = []
        for _ in range(reps):
            with Server("bench.streaming") as server:
                results.append(
                    trio.run(
                        _measure, server.url, server.proc.pid, clients, entries, deadline, ws_batch
                    )
                )
        r = results[0]
        case = f"{clients:,} WS followers, {entries:,} entries"
        if ws_batch > 1:
            case += f", ?batch={ws_batch}"
        share = sum(x["received"] for x in results) / sum(x["expected"] for x in results)
        cpu = (
            f"CPU: server {statistics.median(x['server_cpu_s'] for x in results):.1f} s, "
            f"client {statistics.median(x['client_cpu_s'] for x in results):.1f} s "
            f"over {r['window_s']:.1f} s; server CPU per delivered entry "
            f"{r['server_cpu_s'] / max(r['received'], 1) * 1e6:.0f} µs"
        )
        status = f"{share:.0%} delivered" + (
            f" before the {deadline} s deadline" if r["timed_out"] else ""
        )
        big = clients >= 1000
        rows += [
            row(
                "streaming",
                case,
                "delivered",
                "entries/s",
                [x["rate"] for x in results],
                note=f"{status}; {cpu}",
            ),
            row("streaming", case, "p50 lag", "ms", [x["p50_lag_ms"] for x in results]),
            row(
                "streaming",
                case,
                "p99 lag",
                "ms",
                [x["p99_lag_ms"] for x in results],
                target="< 250" if big else "",
                met=(statistics.median(x["p99_lag_ms"] for x in results) < 250) if big else None,
                note=f"{r['connected']} connected in {r['connect_s']:.1f} s; lag of delivered "
                "entries only",
            ),
        ]
    return rows


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
