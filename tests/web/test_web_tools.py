"""GET /tools: the registered tools a graph may name, paginated like /graphs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from pydantic import BaseModel
from web_support import Server, assert_error, start_server

from trioflow import Registry, default_registry, open_engine
from trioflow.web import Settings, create_app


def blocking_lookup(state: BaseModel) -> dict[str, Any]:
    """Look something up (a sync tool: it runs in a worker thread).

    More text that the listing leaves out.
    """
    return {}


@pytest.fixture
async def tools_server(settings: Settings) -> AsyncIterator[Server]:
    registry: Registry = default_registry()
    registry.add_tool("test.lookup", blocking_lookup)
    async with open_engine(registry=registry) as engine, trio.open_nursery() as nursery:
        srv = await start_server(nursery, create_app(engine, settings), engine)
        async with srv.client:
            yield srv
        srv.stop.set()


async def test_tools_lists_the_registry_in_pages(tools_server: Server) -> None:
    client = tools_server.client
    with trio.fail_after(10):
        whole = await client.get("/tools", params={"limit": 500})
        assert whole.status_code == 200, whole.text
        assert whole.json()["next_cursor"] is None
        items = whole.json()["items"]
        assert [t["name"] for t in items] == [
            "test.lookup",
            "tools.approve",
            "tools.fail",
            "tools.noop",
            "tools.sleep",
        ]
        by_name = {t["name"]: t for t in items}
        assert by_name["test.lookup"] == {
            "name": "test.lookup",
            "kind": "sync",
            "description": "Look something up (a sync tool: it runs in a worker thread).",
        }
        assert by_name["tools.sleep"]["kind"] == "async"
        assert by_name["tools.noop"]["kind"] == "inline"
        assert by_name["tools.noop"]["description"] == "Do nothing; the state is unchanged."

        pages: list[list[str]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor is not None:
                params["cursor"] = cursor
            page = (await client.get("/tools", params=params)).json()
            pages.append([t["name"] for t in page["items"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == [
            ["test.lookup", "tools.approve"],
            ["tools.fail", "tools.noop"],
            ["tools.sleep"],
        ]
        assert_error(await client.get("/tools", params={"limit": 0}), 422, "request_invalid")
