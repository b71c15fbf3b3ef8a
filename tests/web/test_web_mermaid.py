"""GET /graph/{graph_id}/mermaid over a real server."""

from __future__ import annotations

from typing import Any

from web_support import Server, assert_error


async def test_a_graph_as_mermaid_text_with_a_runs_progress(
    server: Server, sleep_graph: dict[str, Any], gate_graph: dict[str, Any]
) -> None:
    await server.create(gate_graph)
    await server.create(sleep_graph)
    r = await server.client.get("/graph/gated/mermaid")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text.startswith("flowchart TD\n") and "    n0 --> n1\n" in r.text
    run_id = await server.start("gated")
    r = await server.client.get("/graph/gated/mermaid", params={"run_id": run_id})
    assert r.status_code == 200 and "class n0 current" in r.text
    other = await server.start("sleepy", {"sleep_s": 0.01})
    details = assert_error(
        await server.client.get("/graph/gated/mermaid", params={"run_id": other}),
        422,
        "request_invalid",
    )
    assert details["run_graph_id"] == "sleepy"
    assert_error(await server.client.get("/graph/nope/mermaid"), 404, "graph_not_found")
    r = await server.client.get("/graph/gated/mermaid", params={"run_id": "nope"})
    assert_error(r, 404, "run_not_found")
    r = await server.client.get("/graph/gated/mermaid", params={"runid": "x"})
    assert_error(r, 422, "request_invalid")
    await server.client.post(f"/graph/cancel/{run_id}")
