"""Pydantic models of the graph document, exactly as clients send it.

These models check shape only (types, unknown keys). Everything that needs
the whole graph or the registry (endpoints exist, callables registered,
cycles bounded, expressions safe) is checked by :mod:`core.validation`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RetrySpec(_Strict):
    """How often a node is tried before its failure fails the run.

    The delay before attempt ``n + 1`` is ``backoff_s * multiplier ** (n - 1)``,
    capped at ``max_backoff_s``; with ``jitter`` it is drawn uniformly from
    ``[delay / 2, delay]`` so that retries of many runs do not align.
    """

    max_attempts: Annotated[int, Field(ge=1, le=100)] = 1
    backoff_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    multiplier: Annotated[float, Field(ge=1, le=10)] = 2.0
    max_backoff_s: Annotated[float, Field(ge=0, le=3600)] = 60.0
    jitter: bool = True


class TimeoutInput(_Strict):
    """``on_timeout`` that resumes the run with this input."""

    input: dict[str, Any]


class WaitSpec(_Strict):
    """A node that waits for input before its callable (if any) runs.

    ``input_schema`` (a JSON Schema object, in the subset documented in
    ``docs/semantics.md``) or ``input_model`` (a registered Pydantic model)
    says what the input may be; with neither, any JSON object is accepted.
    """

    prompt: Annotated[str, Field(max_length=4000)] = ""
    input_schema: dict[str, Any] | None = None
    input_model: Annotated[str | None, Field(min_length=1, max_length=200)] = None
    timeout_s: Annotated[float | None, Field(gt=0, le=366 * 86_400)] = None
    on_timeout: Literal["fail"] | TimeoutInput = "fail"


Reducer = Annotated[str, Field(min_length=1, max_length=200)]
"""``conflict``, ``keep``, ``replace``, ``append``, ``extend``, ``sum``, ``min``, ``max``,
``merge``, or the
name of a registered tool called as ``tool(value_at_fan_out, [contributions])``."""


class MergeSpec(_Strict):
    """How the branches' changes are folded into the state at the join."""

    default: Reducer = "conflict"
    keys: dict[str, Reducer] = Field(default_factory=dict)


class ToleranceSpec(_Strict):
    """Failed branches tolerated: at most ``tolerated_failures`` of them, or at most
    ``tolerated_failure_pct`` percent of the branches."""

    tolerated_failures: Annotated[int | None, Field(ge=0)] = None
    tolerated_failure_pct: Annotated[float | None, Field(ge=0, le=100)] = None


FailureSpec = Literal["fail_fast"] | ToleranceSpec


class BranchSpec(_Strict):
    """A sub-graph: the node and edge syntax of a graph (``id`` names a parallel branch)."""

    id: Annotated[
        str | None, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    ] = None
    start_node: Annotated[str, Field(min_length=1)]
    nodes: list[NodeSpec]
    edges: list[EdgeSpec] = Field(default_factory=list)


class ParallelSpec(_Strict):
    branches: Annotated[list[BranchSpec], Field(min_length=1)]
    merge: MergeSpec = Field(default_factory=MergeSpec)
    failure: FailureSpec = "fail_fast"
    max_concurrency: Annotated[int | None, Field(ge=1, le=10_000)] = None


class CollectSpec(_Strict):
    source: Annotated[str, Field(alias="from", min_length=1, max_length=200)]
    into: Annotated[str, Field(min_length=1, max_length=200)]


class MapSpec(_Strict):
    items: Annotated[str, Field(min_length=1)]
    as_: Annotated[str, Field(alias="as", min_length=1, max_length=200)] = "item"
    branch: BranchSpec
    collect: CollectSpec | None = None
    merge: MergeSpec = Field(default_factory=MergeSpec)
    failure: FailureSpec = "fail_fast"
    max_concurrency: Annotated[int, Field(ge=1, le=10_000)] = 16
    max_items: Annotated[int, Field(ge=1, le=100_000)] = 1000


class NodeSpec(_Strict):
    # Any printable text: ids are stored and logged, and no store keeps a NUL.
    id: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
    callable: Annotated[str | None, Field(min_length=1, max_length=200)] = None
    wait: WaitSpec | None = None
    parallel: ParallelSpec | None = None
    map: MapSpec | None = None
    timeout_s: Annotated[float | None, Field(gt=0, le=86_400)] = None
    retry: RetrySpec | None = None
    description: Annotated[str | None, Field(max_length=2000)] = None


class ConditionSpec(_Strict):
    """A branch condition: exactly one of ``expression`` or ``callable``."""

    expression: str | None = None
    callable: Annotated[str | None, Field(min_length=1, max_length=200)] = None


class LoopSpec(_Strict):
    max_iterations: int | None = None
    until_expression: str | None = None


EdgeType = Literal["sequential", "branch", "loop"]


class EdgeSpec(_Strict):
    source: Annotated[str, Field(alias="from", min_length=1)]
    to: Annotated[str, Field(min_length=1)]
    type: EdgeType = "sequential"
    condition: ConditionSpec | None = None
    loop: LoopSpec | None = None


class GraphDocument(_Strict):
    """The graph document. Unknown keys anywhere are errors."""

    id: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:\-]+$")]
    name: Annotated[str | None, Field(max_length=500)] = None
    description: Annotated[str | None, Field(max_length=5000)] = None
    start_node: Annotated[str, Field(min_length=1)]
    state_model: Annotated[str | None, Field(min_length=1, max_length=200)] = None
    max_steps: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    nodes: list[NodeSpec]
    edges: list[EdgeSpec] = Field(default_factory=list)


BranchSpec.model_rebuild()
ParallelSpec.model_rebuild()
MapSpec.model_rebuild()
NodeSpec.model_rebuild()
