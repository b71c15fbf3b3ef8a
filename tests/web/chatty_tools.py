"""A tool module for `trioflow serve --tools chatty_tools` (CLI tests): long logs on demand."""

from __future__ import annotations

from pydantic import BaseModel

from trioflow import Registry, RunContext


def chatty(state: BaseModel, ctx: RunContext) -> None:
    lines = int(getattr(state, "lines", 10))
    size = int(getattr(state, "line_bytes", 100))
    for i in range(lines):
        ctx.log(f"line {i}", payload="x" * size)


def register(registry: Registry) -> None:
    registry.add_tool("test.chatty", chatty, inline=True)


def chatty_graph(loops: int) -> dict[str, object]:
    """A graph whose run logs ``test.chatty``'s lines ``loops + 1`` times."""
    return {
        "id": "chatty",
        "start_node": "talk",
        "nodes": [
            {"id": "talk", "callable": "test.chatty"},
            {"id": "end", "callable": "tools.noop"},
        ],
        "edges": [
            {"from": "talk", "to": "end"},
            {"from": "talk", "to": "talk", "type": "loop", "loop": {"max_iterations": loops}},
        ],
    }
