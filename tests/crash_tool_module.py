"""Tools that misbehave as badly as code can, for the crash tests.

Loaded by ``trioflow serve --tools tests.crash_tool_module``.
"""

from __future__ import annotations

import os
from typing import Any


def die(state: Any) -> None:
    """Kill the whole process at once, as a segfault or the OOM killer would."""
    os._exit(70)


def exit_politely(state: Any) -> None:
    """Raise SystemExit, which kills a Python program unless someone catches it."""
    raise SystemExit(f"{state.get('who', 'someone')} wants out")


def interrupt(state: Any) -> None:
    """Raise KeyboardInterrupt from a worker thread."""
    raise KeyboardInterrupt


def register(registry: Any) -> None:
    registry.add_tool("crash.die", die, inline=True)
    registry.add_tool("crash.exit", exit_politely, inline=True)
    registry.add_tool("crash.interrupt", interrupt)
