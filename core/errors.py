"""Every error the engine raises on purpose derives from :class:`EngineError`.

Each subclass carries structured fields so that callers (the web layer, the
CLI, embedding programs) can report it without parsing messages. The web
layer maps these classes to HTTP status codes in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem found in a document: a stable code, a JSON path, a message."""

    code: str
    path: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "path": self.path, "message": self.message}


class EngineError(Exception):
    """Root of every error trioflow raises on purpose.

    ``code`` is a stable machine-readable identifier; ``details`` is JSON-safe.
    """

    code = "engine_error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}


class GraphValidationError(EngineError):
    """Raised when a graph document is invalid; ``problems`` lists every problem."""

    code = "graph_invalid"

    def __init__(self, problems: Sequence[Problem], graph_id: str | None = None) -> None:
        self.problems = tuple(problems)
        self.graph_id = graph_id
        n = len(self.problems)
        first = self.problems[0].message if self.problems else "invalid graph"
        summary = first if n == 1 else f"{n} problems, first: {first}"
        super().__init__(
            f"graph {graph_id or '?'} is invalid: {summary}",
            details={"graph_id": graph_id, "problems": [p.as_dict() for p in self.problems]},
        )


class ExpressionError(EngineError):
    """Raised when a condition expression is rejected at validation time."""

    code = "expression_invalid"

    def __init__(self, message: str, *, reason: str, expression: str) -> None:
        self.reason = reason
        self.expression = expression
        super().__init__(message, details={"reason": reason, "expression": expression})


class ExpressionEvaluationError(EngineError):
    """Raised when an accepted expression fails while being evaluated."""

    code = "expression_failed"


class ExpressionBudgetError(ExpressionEvaluationError):
    """Raised when an evaluation would pass its budget of work or memory.

    Every evaluation has a fixed budget (see ``docs/semantics.md``); an
    expression that needs more is stopped before the work is done.
    """

    code = "expression_budget_exceeded"


class InputValidationError(EngineError):
    """Raised when the input given to a waiting run does not fit what its wait accepts.

    ``problems`` lists every problem, each with the JSON path of the input
    it is about. The run keeps waiting.
    """

    code = "input_invalid"

    def __init__(self, problems: Sequence[Problem], run_id: str | None = None) -> None:
        self.problems = tuple(problems)
        n = len(self.problems)
        first = self.problems[0].message if self.problems else "invalid input"
        where = f" for run {run_id!r}" if run_id else ""
        if n == 1:
            summary = f"{first} ({self.problems[0].path})"
        else:
            summary = f"{n} problems, first: {first}"
        super().__init__(
            f"invalid input{where}: {summary}",
            details={"run_id": run_id, "problems": [p.as_dict() for p in self.problems]},
        )


class RegistryError(EngineError):
    """Raised on a bad registration: duplicate name, wrong kind of object, bad module path."""

    code = "registry_error"


class UnknownGraphError(EngineError):
    """Raised when a graph id is not registered."""

    code = "graph_not_found"

    def __init__(self, graph_id: str) -> None:
        self.graph_id = graph_id
        super().__init__(f"graph {graph_id!r} not found", details={"graph_id": graph_id})


class GraphConflictError(EngineError):
    """Raised when a graph id is registered again with a different document."""

    code = "graph_conflict"

    def __init__(self, graph_id: str) -> None:
        self.graph_id = graph_id
        super().__init__(
            f"graph {graph_id!r} already exists with a different document",
            details={"graph_id": graph_id},
        )


class UnknownRunError(EngineError):
    """Raised when a run id is not known to the store."""

    code = "run_not_found"

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id!r} not found", details={"run_id": run_id})


class RunStateError(EngineError):
    """Raised when an operation is not allowed in the run's current status.

    For example cancelling a run that already completed.
    """

    code = "run_state_conflict"

    def __init__(self, run_id: str, status: str, operation: str) -> None:
        self.run_id = run_id
        self.status = status
        self.operation = operation
        super().__init__(
            f"cannot {operation} run {run_id!r}: it is {status}",
            details={"run_id": run_id, "status": status},
        )


class StaleRequestError(RunStateError):
    """Raised by a resume that names a ``request_id`` other than the current wait's.

    The input answered an earlier question (the run has moved on, or waits
    for something else now); nothing is changed.
    """

    code = "stale_request"

    def __init__(self, run_id: str, given: str, current: str | None) -> None:
        EngineError.__init__(
            self,
            f"run {run_id!r} is not waiting for request {given!r}"
            + (f" (it waits for {current!r})" if current else ""),
            details={"run_id": run_id, "request_id": given, "current_request_id": current},
        )
        self.run_id = run_id
        self.status = "waiting"
        self.operation = "resume"


class InvalidTransitionError(EngineError):
    """Raised by the status guard on an illegal transition. Always a bug."""

    code = "invalid_transition"


class StateValidationError(EngineError):
    """Raised when a state (initial or a node's update) does not fit the state model."""

    code = "state_invalid"

    def __init__(self, message: str, *, node: str | None, errors: list[dict[str, Any]]) -> None:
        self.node = node
        self.errors = errors
        super().__init__(message, details={"node": node, "errors": errors})


class LimitExceededError(EngineError):
    """Raised when an input is over a configured size or count limit."""

    code = "limit_exceeded"

    def __init__(self, message: str, *, limit: str, value: int, maximum: int) -> None:
        self.limit = limit
        super().__init__(message, details={"limit": limit, "value": value, "maximum": maximum})


class EngineStoppingError(EngineError):
    """Raised by a request for a new run while the engine shuts down."""

    code = "engine_stopping"


class CapacityError(EngineError):
    """Raised when the engine already holds its maximum number of active runs."""

    code = "capacity_exceeded"


class StoreError(EngineError):
    """Raised when a store cannot do what was asked (bad URL, newer schema, a failed write).

    ``transient`` is true for failures that may pass if the same write is
    tried again later (a lock held by another process, a full disk, an I/O
    error); the engine retries those, with backoff, for a bounded time.
    """

    code = "store_error"

    def __init__(
        self, message: str, *, details: dict[str, Any] | None = None, transient: bool = False
    ) -> None:
        super().__init__(message, details=details)
        self.transient = transient


class StoreLockedError(StoreError):
    """Raised when an engine opens a store file that another engine already owns.

    ``holder`` says who holds it (``pid``, ``host``, ``since``, ``command``),
    as far as the holder wrote it.
    """

    code = "store_locked"

    def __init__(self, path: str, holder: dict[str, Any]) -> None:
        self.path = path
        self.holder = holder
        who = f"process {holder['pid']}" if "pid" in holder else "another process"
        if holder.get("host"):
            who += f" on {holder['host']}"
        if holder.get("command"):
            who += f" ({holder['command']})"
        super().__init__(
            f"{path} is in use by {who}; one engine at a time may own a store file",
            details={"path": path, "holder": holder},
        )


class StoreConflictError(StoreError):
    """Raised when a checkpoint does not continue the run as stored.

    A checkpoint is written only on top of the stored record it was built
    from (its log entries continue the stored log); anything else means
    another writer got there first, and nothing is written.
    """

    code = "store_conflict"


class LeaseLostError(StoreConflictError):
    """Raised by a checkpoint of a run that another writer has claimed since.

    The run's stored epoch (its fencing token) is no longer the writer's:
    another engine took the run over (its lease had expired), or answered,
    cancelled or timed out its wait. Nothing was written; the writer must
    stop executing the run and write nothing more for it.
    """

    code = "lease_lost"


class LeaseHeldError(StoreConflictError):
    """Raised by a claim of a run that a live engine holds (its lease has not expired).

    Only the PostgreSQL store has leases. Nothing was written; a change to
    such a run goes to its owner (a cancel request, a signal).
    """

    code = "lease_held"

    def __init__(self, run_id: str, owner: str | None) -> None:
        super().__init__(
            f"run {run_id!r} is executing on node {owner!r}",
            details={"run_id": run_id, "owner": owner},
        )
        self.owner = owner


class RunStalledError(EngineError):
    """Raised to a follower of a run that stopped because its store failed.

    The run keeps its last stored checkpoint and is resumed from there by the
    next engine to open the store; cancelling it ends it ``cancelled``.
    """

    code = "run_stalled"

    def __init__(self, run_id: str, reason: str) -> None:
        self.run_id = run_id
        super().__init__(
            f"run {run_id!r} is not executing: {reason}; it resumes when the engine "
            "restarts, or cancel it",
            details={"run_id": run_id, "reason": reason},
        )


@dataclass(frozen=True, slots=True)
class RunFailure:
    """Why a run failed, as recorded on the run: JSON-safe via :meth:`as_dict`."""

    code: str
    message: str
    node: str | None = None
    edge: str | None = None
    error_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.node is not None:
            out["node"] = self.node
        if self.edge is not None:
            out["edge"] = self.edge
        if self.error_type is not None:
            out["type"] = self.error_type
        if self.extra:
            out["details"] = self.extra
        return out


class ConditionError(EngineError):
    """Raised when a branch condition or loop ``until_expression`` fails to evaluate.

    ``reason`` is the failure code the run records: ``condition_failed``, or
    ``expression_budget_exceeded`` when the expression ran out of budget.
    """

    code = "condition_failed"

    def __init__(
        self, message: str, *, node: str, edge: str, reason: str = "condition_failed"
    ) -> None:
        self.node = node
        self.edge = edge
        self.reason = reason
        super().__init__(message, details={"node": node, "edge": edge, "reason": reason})
