"""Choosing the next edge: a pure function of graph, node, state and loop counters.

Kept apart from the actor so that rule 4 of docs/semantics.md can be
tested without Trio and so the actor only performs effects around it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .cancellation import is_cancellation
from .errors import ConditionError, ExpressionBudgetError, ExpressionEvaluationError
from .expressions import truthy
from .graph import Edge, Graph


@dataclass(frozen=True, slots=True)
class Decision:
    """What happens after a node: take ``edge`` (``None``: the run completes).

    ``exhausted`` lists loop edges that would have fired but reached their cap.
    """

    edge: Edge | None
    exhausted: tuple[Edge, ...] = ()


ModelSource = BaseModel | Callable[[], BaseModel]


def _expression_failed(exc: ExpressionEvaluationError, edge: Edge) -> ConditionError:
    """The run's failure for an expression that raised or ran out of budget."""
    reason = exc.code if isinstance(exc, ExpressionBudgetError) else ConditionError.code
    return ConditionError(exc.message, node=edge.source, edge=edge.key, reason=reason)


def _condition(edge: Edge, model: ModelSource, state: Mapping[str, Any]) -> bool:
    try:
        if edge.expression is not None:
            return truthy(edge.expression.evaluate(state))
        if edge.condition_tool is not None:
            if not isinstance(model, BaseModel):
                model = model()
            result = edge.condition_tool.func(model)
            if hasattr(result, "__await__"):
                close = getattr(result, "close", None)
                if close is not None:
                    close()  # never awaited: close it so no RuntimeWarning leaks out
                raise TypeError("condition callables must be synchronous")
            return truthy(result)
    except ExpressionEvaluationError as exc:
        raise _expression_failed(exc, edge) from None
    except BaseException as exc:  # a user callable: whatever it raises, SystemExit included
        if is_cancellation(exc):  # pragma: no cover - a sync callable cannot see Trio's cancel
            raise
        raise ConditionError(
            f"condition of edge {edge.key} raised {type(exc).__name__}: {exc}",
            node=edge.source,
            edge=edge.key,
        ) from exc
    return False


def decide(
    graph: Graph,
    node_id: str,
    model: ModelSource,
    state: Mapping[str, Any],
    loop_counters: Mapping[str, int],
) -> Decision:
    """Apply rule 4: the first branch/loop edge that fires, else the sequential one.

    ``model`` is the state as a model instance, for condition callables, or a
    function building it (called only if a condition callable needs it).

    Raises:
        ConditionError: a condition raised; the run fails naming node and edge.
    """
    out = graph.outgoing[node_id]
    exhausted: list[Edge] = []
    for edge in out.conditional:
        if edge.type == "branch":
            if _condition(edge, model, state):
                return Decision(edge, tuple(exhausted))
            continue
        # loop edge
        if edge.until is not None:
            try:
                done = truthy(edge.until.evaluate(state))
            except ExpressionEvaluationError as exc:
                raise _expression_failed(exc, edge) from None
            if done:
                continue
        if loop_counters.get(edge.key, 0) < edge.max_iterations:
            return Decision(edge, tuple(exhausted))
        exhausted.append(edge)
    return Decision(out.sequential, tuple(exhausted))
