"""A tool module as an operator would write one, for ``Registry.load_module``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

CALLS: list[str] = []


class Ticket(BaseModel):
    """A state model the module registers."""

    title: str = ""
    severity: int = 0


def triage(state: Any) -> dict[str, Any]:
    """Raise the severity by one."""
    return {"severity": state.severity + 1}


async def notify(state: Any, ctx: Any) -> None:
    """Pretend to notify someone."""


def register(registry: Any) -> None:
    CALLS.append("register")
    registry.add_tool("fixture.triage", triage, inline=True)
    registry.add_tool("fixture.notify", notify)
    registry.add_model("Ticket", Ticket)
