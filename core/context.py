"""What a node callable may take as its second argument."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .logs import Level


@dataclass(slots=True)
class RunContext:
    """Facts about the current node execution, and a logger for custom lines.

    ``log`` may be called from async tools and from sync tools running in a
    worker thread. Lines are written with the step's checkpoint, in order,
    before the node's ``node_completed`` entry.
    """

    run_id: str
    graph_id: str
    node_id: str
    step: int
    attempt: int
    _lines: list[tuple[float, Level, str, dict[str, Any]]] = field(default_factory=list, repr=False)
    _max_lines: int = field(default=1000, repr=False)
    _dropped: int = field(default=0, repr=False)

    def log(self, message: str, /, *, level: str = "info", **data: Any) -> None:
        """Add a custom log line (event ``custom``) to the run's log.

        A node execution keeps at most ``EngineLimits.max_log_lines_per_step``
        lines; later ones are counted in one final ``truncated`` line. Long
        messages and large data are cut (see ``EngineLimits``).

        Args:
            message: the text of the line.
            level: ``debug``, ``info``, ``warning`` or ``error``.
            **data: JSON values stored with the line (any key, even
                ``message``; only ``level`` is taken by this method).
        """
        if len(self._lines) >= self._max_lines:
            self._dropped += 1
            return
        self._lines.append((time.time(), Level(level), str(message), data))

    def take_lines(self) -> list[tuple[float, Level, str, dict[str, Any]]]:
        lines, self._lines = self._lines, []
        if self._dropped:
            lines.append(
                (
                    time.time(),
                    Level.WARNING,
                    f"{self._dropped} more log lines dropped: at most {self._max_lines} "
                    "are kept per node execution",
                    {"dropped": self._dropped, "truncated": True},
                )
            )
            self._dropped = 0
        return lines
