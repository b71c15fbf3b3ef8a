"""trioflow benchmarks: scripts that print figures, never assertions.

Run them all with ``make bench`` (or ``python -m bench``); see
``docs/performance.md`` for the latest table and how to read it.
"""
