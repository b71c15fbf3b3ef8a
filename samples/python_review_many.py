"""The tools of ``samples/python_review_many.json``: those of :mod:`samples.python_review`.

``trioflow serve --samples`` registers each ``samples/NAME.json`` after
loading the module ``samples.NAME`` when there is one; this module makes the
many-files graph name its tools the same way as ``python_review.json`` does,
so that it does not depend on that file being there too. Registering the
same tools twice is harmless.
"""

from __future__ import annotations

from samples.python_review import register as register

__all__ = ["register"]
