"""Signals: state updates sent to a run from outside, applied between steps in arrival order.

A signal is stored (``Store.add_signal``) before its sender is answered; the
run applies the signals stored after its ``signal_cursor`` and advances the
cursor in the same checkpoint as the state they change and their log
entries, so each one takes effect exactly once, across crashes too. A
signal whose updates the state model rejects, or that would make the state
too large, is logged as ``signal_rejected`` and skipped: the run goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic_core

from .errors import StateValidationError
from .graph import Graph
from .logs import Event, Level, LogEntry, bound_data
from .stores.base import StoredSignal

#: Builds a log entry with the next seq: (event, message, level, node, data).
EntryMaker = Callable[[str, str, Level, str | None, dict[str, Any]], LogEntry]


@dataclass(frozen=True, slots=True)
class Folded:
    """The result of applying some signals to a state."""

    state: dict[str, Any]
    cursor: int
    entries: list[LogEntry]
    changed: bool


def fold_signals(
    graph: Graph,
    state: dict[str, Any],
    signals: Sequence[StoredSignal],
    *,
    node: str | None,
    max_state_bytes: int,
    max_data_bytes: int,
    entry: EntryMaker,
) -> Folded:
    """Apply ``signals`` (in id order) to ``state``; one log entry per signal."""
    entries: list[LogEntry] = []
    changed = False
    cursor = 0
    for signal in signals:
        cursor = signal.signal_id
        data: dict[str, Any] = {"signal_id": signal.signal_id, "name": signal.name}
        try:
            applied = graph.state.apply(state, signal.updates, f"signal {signal.name}")
        except StateValidationError as exc:
            data["errors"] = exc.errors
            message = f"signal {signal.name} rejected: {exc.message}"
            rejected = bound_data(data, max_data_bytes)
            entries.append(
                entry(Event.SIGNAL_REJECTED.value, message, Level.WARNING, node, rejected)
            )
            continue
        new_state = state if applied is None else applied[1]
        size = len(pydantic_core.to_json(new_state))
        if size > max_state_bytes:
            data["bytes"] = size
            entries.append(
                entry(
                    Event.SIGNAL_REJECTED.value,
                    f"signal {signal.name} rejected: the state would be {size} "
                    f"bytes; the limit is {max_state_bytes}",
                    Level.WARNING,
                    node,
                    data,
                )
            )
            continue
        if applied is not None:
            state, changed = new_state, True
        data["updates"] = signal.updates
        entries.append(
            entry(
                Event.SIGNAL_RECEIVED.value,
                f"signal {signal.name} applied",
                Level.INFO,
                node,
                bound_data(data, max_data_bytes),
            )
        )
    return Folded(state, cursor, entries, changed)
