"""What an engine tells an observer (metrics, tracing) about its runs, if one is set.

:meth:`trioflow.Engine.observe` sets one. Every call is made on the Trio
thread, synchronously, on the engine's hot path: an observer must only
count or record (no I/O, no await). With no observer the engine pays one
attribute test per step.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    def run_started(self, graph_id: str) -> None:
        """A run was created (``start_run``)."""

    def run_ended(self, graph_id: str, status: str) -> None:
        """A run this engine executed ended: ``completed``, ``failed`` or ``cancelled``."""

    def step(self, graph_id: str, node_id: str, seconds: float) -> None:
        """A node's tool returned (or raised) after ``seconds``."""

    def commit(self, seconds: float) -> None:
        """A checkpoint was stored; ``seconds`` from the request to the store's answer."""
