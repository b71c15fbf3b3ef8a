"""Run status, its guarded transitions, and the run record."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import InvalidTransitionError


class RunStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL: frozenset[RunStatus] = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED}
)

_ALLOWED: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.PENDING: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED, RunStatus.FAILED}),
    RunStatus.RUNNING: frozenset(
        {RunStatus.WAITING, RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED}
    ),
    RunStatus.WAITING: frozenset({RunStatus.RUNNING, RunStatus.FAILED, RunStatus.CANCELLED}),
    RunStatus.COMPLETED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}


def check_transition(current: RunStatus, new: RunStatus) -> None:
    """Raise unless ``current -> new`` is a legal transition.

    Raises:
        InvalidTransitionError: always a bug in the caller.
    """
    if new not in _ALLOWED[current]:
        raise InvalidTransitionError(f"illegal run transition {current} -> {new}")


@dataclass(slots=True)
class RunRecord:
    """A run as stored: its status and its last checkpoint.

    Records are values: never modify one you received; derive a new one with
    :meth:`evolve`. (Not a frozen dataclass only because a frozen one costs
    several microseconds more to build, once per step.)

    ``state`` is the JSON-safe state after the last completed step;
    ``current_node`` is the node that runs (or ran last); ``step`` counts
    node executions started; ``loop_counters`` maps ``"from->to"`` of each
    loop edge to how often it fired; ``last_seq`` is the seq of the run's
    newest log entry; ``attempt`` counts the executions of the run (1, then
    one more on every resume); ``crashes`` counts the processes that died
    while the run was at its current step (reset when a step completes).
    Timestamps are seconds since the Unix epoch.
    """

    run_id: str
    graph_id: str
    status: RunStatus
    state: dict[str, Any]
    current_node: str | None
    step: int = 0
    loop_counters: dict[str, int] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0
    last_seq: int = 0
    attempt: int = 1
    crashes: int = 0
    waiting: dict[str, Any] | None = None
    signal_cursor: int = 0
    epoch: int = 0
    fanout: dict[str, Any] | None = None
    """While the run is inside a parallel or map node: each started branch's progress
    (see :mod:`trioflow.fanout`); None otherwise."""

    def evolve(self, **changes: Any) -> RunRecord:
        """A copy with ``changes``; a status change goes through the transition guard."""
        new_status = changes.get("status")
        if new_status is not None and new_status != self.status:
            check_transition(self.status, new_status)
        # Hand-rolled instead of dataclasses.replace, which is several times
        # slower and runs once per step.
        new = RunRecord(
            self.run_id,
            self.graph_id,
            self.status,
            self.state,
            self.current_node,
            self.step,
            self.loop_counters,
            self.error,
            self.created_at,
            self.started_at,
            self.finished_at,
            self.updated_at,
            self.last_seq,
            self.attempt,
            self.crashes,
            self.waiting,
            self.signal_cursor,
            self.epoch,
            self.fanout,
        )
        for name, value in changes.items():
            if name not in _FIELD_SET:
                raise TypeError(f"RunRecord has no field {name!r}")
            setattr(new, name, value)
        return new

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "graph_id": self.graph_id,
            "status": self.status.value,
            "current_node": self.current_node,
            "state": self.state,
            "step": self.step,
            "loop_counters": self.loop_counters,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "updated_at": self.updated_at,
            "last_seq": self.last_seq,
            "attempt": self.attempt,
            "waiting": self.waiting,
            "fanout": fanout_view(self.fanout),
        }


def branch_label(node: str, kind: str, key: str) -> str:
    """How logs and views name a branch: a parallel branch's id; ``NODE[i]`` for a map's
    item ``i``."""
    return f"{node}[{key}]" if kind == "map" else key


def fanout_view(fanout: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a client sees of a fan-out in progress: each started branch's status,
    node and step (not its state), and how many have not started."""
    if fanout is None:
        return None
    branches = fanout.get("branches", {})
    kind = fanout.get("kind")
    view = []
    keys = sorted(branches, key=int) if kind == "map" else list(branches)
    for key in keys:
        progress = branches[key]
        item: dict[str, Any] = {"branch": branch_label(str(fanout.get("node")), str(kind), key)}
        if kind == "map":
            item["item"] = int(key)
        item.update(
            status=progress.get("status"), node=progress.get("node"), step=progress.get("step")
        )
        if progress.get("error") is not None:
            item["error"] = progress["error"]
        view.append(item)
    return {
        "node": fanout.get("node"),
        "kind": kind,
        "size": fanout.get("size"),
        "branches": view,
        "not_started": max(0, int(fanout.get("size", 0)) - len(branches)),
    }


_FIELD_SET: frozenset[str] = frozenset(f.name for f in fields(RunRecord))
