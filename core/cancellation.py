"""Telling Trio's cancellation apart from everything else user code may raise."""

from __future__ import annotations

import trio


def is_cancellation(exc: BaseException) -> bool:
    """Trio's cancellation (possibly in a group), which must always pass through.

    Everything else a tool or a condition callable raises, ``SystemExit`` and
    ``KeyboardInterrupt`` included, is that code's failure.
    """
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(trio.Cancelled) is not None
    return False
