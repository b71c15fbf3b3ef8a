"""Pydantic models of the graph document, exactly as clients send it.

These models check shape only (types, unknown keys). Everything that needs
the whole graph or the registry (endpoints exist, callables registered,
cycles bounded, expressions safe) is checked by :mod:`core.validation`.
"""

from __future__ import annotations

from typing import Annotated, Literal

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


class NodeSpec(_Strict):
    id: Annotated[str, Field(min_length=1, max_length=200)]
    callable: Annotated[str, Field(min_length=1, max_length=200)]
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
