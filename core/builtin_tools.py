"""Tools that ship with trioflow and are always registered.

``tools.noop`` and ``tools.approve`` are what the specification's sample graph
uses; ``tools.sleep`` and ``tools.fail`` exercise the long-running and failing
paths (cancellation, timeouts, retries).
"""

from __future__ import annotations

from typing import Any

import trio
from pydantic import BaseModel

from .registry import Registry


def noop(state: BaseModel) -> None:
    """Do nothing; the state is unchanged."""
    return None


def approve(state: BaseModel) -> dict[str, Any]:
    """Set ``approved: true``."""
    return {"approved": True}


async def sleep(state: BaseModel) -> None:
    """Sleep ``sleep_s`` seconds (from the state, default 1); cancellable."""
    seconds = getattr(state, "sleep_s", None)
    if seconds is None:
        seconds = 1.0
    await trio.sleep(float(seconds))


class ToolFailure(RuntimeError):
    """What ``tools.fail`` raises."""


def fail(state: BaseModel) -> None:
    """Raise ``ToolFailure`` with ``fail_message`` from the state."""
    message = getattr(state, "fail_message", None) or "tools.fail was called"
    raise ToolFailure(str(message))


def register(registry: Registry) -> None:
    """Register the built-in tools into ``registry``."""
    registry.add_tool("tools.noop", noop, inline=True)
    registry.add_tool("tools.approve", approve, inline=True)
    registry.add_tool("tools.sleep", sleep)
    registry.add_tool("tools.fail", fail, inline=True)
