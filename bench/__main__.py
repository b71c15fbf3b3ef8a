"""Run the benchmarks and print one table: ``python -m bench [--quick] [--only NAME ...]``.

Every figure is the median of repeated samples with their min and max; every
ratio compares figures measured in the same process run. Nothing asserts a
timing: a target is printed beside the figure with whether it is met.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence

from ._common import Row, fmt

#: In the order they run. ``profile`` prints its own report and is not in the table.
BENCHMARKS = (
    "per_step",
    "fanout",
    "service",
    "auth",
    "observe",
    "concurrency",
    "waits",
    "postgres",
    "streaming",
    "listing",
    "ui",
    "expressions",
    "condition_stall",
)
EXTRA = ("profile",)


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores, {model}, Python {platform.python_version()} "
        f"({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()}"
    )


def print_table(rows: Sequence[Row], file: object = None) -> None:
    out = file or sys.stdout
    header = (
        "benchmark",
        "case",
        "metric",
        "median",
        "min",
        "max",
        "unit",
        "n",
        "target",
        "met",
        "notes",
    )
    lines = []
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        lines.append(
            (
                r.bench,
                r.case,
                r.metric,
                fmt(r.median),
                fmt(r.lo),
                fmt(r.hi),
                r.unit,
                str(r.samples or ""),
                r.target,
                met,
                r.note,
            )
        )
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
        for i, h in enumerate(header)
    ]
    # The notes column is last and left ragged.
    widths[-1] = 0

    def render(cells: Sequence[str]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            right = 3 <= i <= 5 or i == 7
            parts.append(cell.rjust(widths[i]) if right else cell.ljust(widths[i]))
        return "| " + " | ".join(parts).rstrip() + " |"

    print(render(header), file=out)  # type: ignore[call-overload]
    print("|" + "|".join("-" * (w + 2) if w else "---" for w in widths) + "|", file=out)  # type: ignore[call-overload]
    for line in lines:
        print(render(line), file=out)  # type: ignore[call-overload]


def _run_one(name: str, quick: bool) -> list[Row]:
    if name == "listing":
        # Written by another hand; included when it exists and follows the
        # same ``run(quick) -> list[Row]`` shape.
        try:
            module = importlib.import_module("bench.bench_listing")
        except ImportError:
            return []
    else:
        module = importlib.import_module(f"bench.{name}")
    runner = getattr(module, "run", None)
    if runner is None:
        return []
    result = runner(quick=quick)
    return [r for r in result if isinstance(r, Row)] if isinstance(result, list) else []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer samples and smaller sizes (about 2 minutes)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=(*BENCHMARKS, *EXTRA),
        metavar="NAME",
        help=f"run only NAME (repeatable): {', '.join(BENCHMARKS + EXTRA)}",
    )
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    print(f"trioflow benchmarks{' (quick)' if args.quick else ''} on {machine()}", flush=True)
    rows: list[Row] = []
    for name in names:
        if name == "profile":
            from . import profile_step

            profile_step.main(["--quick"] if args.quick else [])
            continue
        t0 = time.perf_counter()
        print(f"... {name}", file=sys.stderr, flush=True)
        try:
            rows += _run_one(name, args.quick)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            rows.append(Row(name, "-", "-", "-", note=f"error: {type(exc).__name__}: {exc}"))
        print(f"    {name} took {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    if rows:
        print()
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
