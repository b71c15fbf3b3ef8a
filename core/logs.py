"""The run log: append-only entries with gapless ``seq`` numbers."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, NamedTuple

import pydantic_core


class Level(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Event(enum.StrEnum):
    RUN_STARTED = "run_started"
    RUN_RESUMED = "run_resumed"
    NODE_STARTED = "node_started"
    NODE_COMPLETED = "node_completed"
    NODE_RETRYING = "node_retrying"
    NODE_FAILED = "node_failed"
    EDGE_TAKEN = "edge_taken"
    LOOP_EXHAUSTED = "loop_exhausted"
    RUN_COMPLETED = "run_completed"
    RUN_FAILED = "run_failed"
    RUN_CANCELLED = "run_cancelled"
    RUN_WAITING = "run_waiting"
    RUN_INPUT = "run_input"
    WAIT_TIMED_OUT = "wait_timed_out"
    SIGNAL_RECEIVED = "signal_received"
    SIGNAL_REJECTED = "signal_rejected"
    FANOUT_STARTED = "fanout_started"
    FANOUT_RESUMED = "fanout_resumed"
    FANOUT_COMPLETED = "fanout_completed"
    BRANCH_STARTED = "branch_started"
    BRANCH_COMPLETED = "branch_completed"
    BRANCH_FAILED = "branch_failed"
    CUSTOM = "custom"


TERMINAL_EVENTS = frozenset({Event.RUN_COMPLETED, Event.RUN_FAILED, Event.RUN_CANCELLED})


class LogEntry(NamedTuple):
    """One log line of a run. ``ts`` is seconds since the Unix epoch.

    A named tuple rather than a dataclass: entries are created several times
    per step on the hot path, and a tuple is both immutable and the cheapest
    immutable record to build.
    """

    seq: int
    ts: float
    level: Level
    event: str  # an Event value, as a plain str
    node: str | None
    message: str
    data: dict[str, Any]

    @property
    def is_terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "level": self.level.value,
            "event": self.event,
            "node": self.node,
            "message": self.message,
            "data": self.data,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LogEntry:
        return cls(
            seq=int(raw["seq"]),
            ts=float(raw["ts"]),
            level=Level(raw["level"]),
            event=str(raw["event"]),
            node=raw.get("node"),
            message=str(raw.get("message", "")),
            data=dict(raw.get("data") or {}),
        )


#: Appended to a message that was cut at the size limit.
TRUNCATION_MARK = "… [truncated]"
#: How much of oversized data an entry keeps, as JSON text.
DATA_PREVIEW_CHARS = 1024


def bound_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters (plus the truncation mark)."""
    if len(text) <= limit:
        return text
    return text[:limit] + TRUNCATION_MARK


def bound_data(data: Mapping[str, Any], limit: int) -> dict[str, Any]:
    """``data`` as plain JSON within ``limit`` bytes of compact JSON.

    Values that are not JSON are written as JSON encoders usually write
    them (sets as lists, other objects as their ``str``); data over the limit
    is replaced by ``{"truncated": true, "preview": <its JSON, cut>}``.
    """
    try:
        raw = pydantic_core.to_json(data, serialize_unknown=True, inf_nan_mode="null")
    except (TypeError, ValueError, pydantic_core.PydanticSerializationError):
        raw = pydantic_core.to_json({"unserialisable": str(data)[:DATA_PREVIEW_CHARS]})
    if len(raw) > limit:
        preview = raw[:DATA_PREVIEW_CHARS].decode("utf-8", errors="ignore")
        return {"truncated": True, "preview": preview, "bytes": len(raw)}
    try:
        value = pydantic_core.from_json(raw)
    except ValueError:  # e.g. an integer JSON readers refuse
        return {"truncated": True, "preview": raw[:DATA_PREVIEW_CHARS].decode(errors="ignore")}
    return value if isinstance(value, dict) else {"value": value}
