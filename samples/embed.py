"""Embed trioflow in a Trio program: run the Python review graph and follow its log.

Run from the repository root::

    .venv/bin/python samples/embed.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

# Only so that `python samples/embed.py` finds the `samples` package in a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from samples import python_review
from trioflow import default_registry, open_engine

SOURCE = """\
import os
import json


def load(path, cache={}):
    try:
        return json.loads(open(path).read())
    except:
        return cache
"""


async def main() -> None:
    registry = default_registry()
    python_review.register(registry)
    async with open_engine(registry=registry) as engine:
        graph = await engine.register_graph(python_review.graph_document())
        run = await engine.start_run(graph.id, {"source": SOURCE, "filename": "load.py"})
        async for entry in engine.follow(run.run_id):
            print(
                f"{entry.seq:3} {entry.level:7} {entry.event:15} {entry.node or '-':12} "
                f"{entry.message}"
            )
        final = await engine.wait(run.run_id)

    state = final.state
    print(f"\nstatus: {final.status}, verdict: {state['verdict']}, rounds: {state['rounds']}")
    print("fixes applied:", json.dumps(state["fixes_applied"], indent=2))
    print("issues left:", json.dumps(state["issues"], indent=2))
    print("fixed source:\n" + state["source"])
    if final.status != "completed":
        raise SystemExit(f"the run ended {final.status}: {final.error}")


if __name__ == "__main__":
    trio.run(main)
