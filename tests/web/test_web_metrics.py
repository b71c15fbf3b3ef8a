"""GET /metrics over a real server: names, labels, and bounded cardinality."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from web_support import Server

from trioflow.web.metrics import MAX_GRAPHS


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_metrics_after_a_few_runs(server: Server, sleep_graph: dict[str, Any]) -> None:
    await server.create(sleep_graph)
    failing = {"id": "fails", "start_node": "f", "nodes": [{"id": "f", "callable": "tools.fail"}]}
    await server.create(failing)
    for _ in range(3):
        r = await server.client.post(
            "/graph/run", json={"graph_id": "sleepy", "initial_state": {"sleep_s": 0.001}}
        )
        assert r.json()["status"] == "completed"
    r = await server.client.post("/graph/run", json={"graph_id": "fails"})
    assert r.json()["status"] == "failed"
    await server.client.get("/graph/state/nope")
    r = await server.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _samples(r.text)
    assert m['trioflow_runs_started_total{graph="sleepy"}'] == 3
    assert m['trioflow_runs_ended_total{graph="sleepy",status="completed"}'] == 3
    assert m['trioflow_runs_ended_total{graph="fails",status="failed"}'] == 1
    assert m['trioflow_step_duration_seconds_count{graph="sleepy",node="nap"}'] == 3
    assert m['trioflow_step_duration_seconds_bucket{graph="sleepy",le="+Inf",node="nap"}'] == 3
    assert m['trioflow_checkpoint_commit_seconds_count{store="MemoryStore"}'] >= 3 * 2
    assert m['trioflow_http_requests_total{operation="runGraph",status="200"}'] == 4
    assert m['trioflow_http_requests_total{operation="getRunState",status="404"}'] == 1
    assert m['trioflow_http_request_duration_seconds_count{operation="runGraph"}'] == 4
    assert m["trioflow_runs_active"] == 0
    assert m["trioflow_log_followers"] == 0
    for status in ("pending", "running", "waiting"):
        assert m[f'trioflow_runs_unfinished{{status="{status}"}}'] == 0
    assert not any("run_id" in name for name in m)


async def test_unfinished_runs_are_counted_from_the_store(
    server: Server, gate_graph: dict[str, Any], gates: Any
) -> None:
    await server.create(gate_graph)
    ask = {
        "id": "asks",
        "start_node": "q",
        "nodes": [{"id": "q", "wait": {"prompt": "ok?"}}, {"id": "end", "callable": "tools.noop"}],
        "edges": [{"from": "q", "to": "end"}],
    }
    await server.create(ask)
    held = [await server.start("gated") for _ in range(2)]
    waiting = [await server.start("asks") for _ in range(3)]
    for run_id in waiting:
        assert (await server.engine.wait_stop(run_id)).status == "waiting"
    await gates.reached.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert gates.entered == 2
    m = _samples((await server.client.get("/metrics")).text)
    assert m['trioflow_runs_unfinished{status="waiting"}'] == 3
    assert m['trioflow_runs_unfinished{status="running"}'] == 2
    assert m['trioflow_runs_unfinished{status="pending"}'] == 0
    assert m["trioflow_runs_active"] == 2
    gates.opened.set()
    for run_id in held:
        await server.engine.wait(run_id)
    m = _samples((await server.client.get("/metrics")).text)
    assert m['trioflow_runs_unfinished{status="running"}'] == 0
    assert m['trioflow_runs_unfinished{status="waiting"}'] == 3


async def test_label_cardinality_stays_bounded(server: Server) -> None:
    engine = server.engine
    for i in range(MAX_GRAPHS + 50):
        await engine.register_graph(
            {"id": f"g{i}", "start_node": "a", "nodes": [{"id": "a", "callable": "tools.noop"}]}
        )
    with trio.fail_after(60):
        for i in range(MAX_GRAPHS + 50):
            for _ in range(4):  # 1,000 runs in all
                await engine.wait((await engine.start_run(f"g{i}")).run_id)
    m = _samples((await server.client.get("/metrics")).text)
    graphs = {
        name.split('graph="')[1].split('"')[0]
        for name in m
        if name.startswith("trioflow_runs_started_total{")
    }
    assert len(graphs) == MAX_GRAPHS + 1 and "other" in graphs
    assert m['trioflow_runs_started_total{graph="other"}'] == 50 * 4
    series = [n for n in m if n.startswith("trioflow_step_duration_seconds_count")]
    assert len(series) == MAX_GRAPHS + 1
