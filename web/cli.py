"""The ``trioflow`` command: serve, validate, run, logs, prune.

Exit codes:
    ``run``: 0 completed, 1 failed, 2 cancelled (Ctrl-C cancels the run), 3 could
    not start (unreadable file, invalid graph or state, bad tool module).
    ``validate``: 0 valid, 1 invalid (every problem is printed), 3 unreadable.
    ``logs``: 0 printed; with ``--follow`` the run's end like ``run`` (0/1/2);
    3 on errors (unknown run, server unreachable or shutting down).
    ``serve``: 0 after a clean shutdown (SIGINT/SIGTERM), 3 if it cannot start
    (bad option or ``TRIOFLOW_EVALUATOR``, unknown tool module, a store that
    cannot be opened: checked before the port is bound).
    ``prune``: 0 done, 3 if the store cannot be opened.
    Usage errors exit 3 as well, so that 2 always means "cancelled".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any, NoReturn

import trio

from trioflow import (
    EngineError,
    EngineLimits,
    GraphValidationError,
    Registry,
    RunStatus,
    open_engine,
    open_store_from_url,
)

from .app import build_registry, create_app
from .serve import SHUTDOWN_SIGNALS, StartupError, serve
from .settings import EVALUATORS, Settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 2
EXIT_ERROR = 3

STATUS_EXIT = {
    RunStatus.COMPLETED: EXIT_OK,
    RunStatus.FAILED: EXIT_FAILED,
    RunStatus.CANCELLED: EXIT_CANCELLED,
}

SAMPLES_DIR = pathlib.Path(__file__).resolve().parent.parent / "samples"

#: Where ``serve`` and ``prune`` keep data unless told otherwise.
DEFAULT_STORE = "sqlite:///./trioflow.db"


def _default_store() -> str:
    return os.environ.get("TRIOFLOW_STORE", DEFAULT_STORE)


def _names(values: list[str]) -> tuple[str, ...]:
    """Repeated and comma-separated option values, in order, without blanks or repeats."""
    names = (name.strip() for value in values for name in value.split(","))
    return tuple(dict.fromkeys(name for name in names if name))

log = logging.getLogger("trioflow.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def _fail(message: str) -> int:
    print(f"trioflow: {message}", file=sys.stderr)
    return EXIT_ERROR


def format_entry(entry: dict[str, Any]) -> str:
    """One log entry as a line: seq, local time, level, event, node, message."""
    when = datetime.datetime.fromtimestamp(entry["ts"]).strftime("%H:%M:%S.%f")[:-3]
    node = entry.get("node") or "-"
    return (
        f"{entry['seq']:>5} {when} {entry['level']:<7} {entry['event']:<15} "
        f"{node} {entry['message']}"
    )


def _read_document(path: str) -> Any:
    """The parsed JSON of ``path``; raises OSError or ValueError."""
    return json.loads(pathlib.Path(path).read_text())


# -- serve -------------------------------------------------------------------------


def _sample_settings(tools: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Graph files and tool modules for ``--samples``.

    ``samples/NAME.json`` is registered; if ``samples/NAME.py`` or the package
    ``samples/NAME/`` exists, the module ``samples.NAME`` is loaded first. A
    module that fails to load is skipped with a warning (its graph then fails
    validation and is skipped too).
    """
    if not SAMPLES_DIR.is_dir():
        log.warning("no samples directory at %s", SAMPLES_DIR)
        return (), ()
    root = str(SAMPLES_DIR.parent)
    if root not in sys.path:
        sys.path.append(root)
    graphs: list[str] = []
    modules: list[str] = []
    for path in sorted(SAMPLES_DIR.glob("*.json")):
        graphs.append(str(path))
        stem = path.stem
        if not ((SAMPLES_DIR / f"{stem}.py").is_file() or (SAMPLES_DIR / stem).is_dir()):
            continue
        module = f"samples.{stem}"
        try:
            Registry().load_module(module)
        except EngineError as exc:
            log.warning("skipping sample tools %s: %s", module, exc.message)
            continue
        if module not in tools:
            modules.append(module)
    return tuple(graphs), tuple(modules)


async def _serve(settings: Settings, host: str, port: int, graceful_timeout: float) -> None:
    app = create_app(settings=settings)
    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(serve, app, host=host, port=port, graceful_timeout=graceful_timeout)
            )
            for bind in binds:
                print(f"trioflow listening on {bind}", flush=True)
    except BaseExceptionGroup as group:
        # The server's own one error (it could not start or bind), as itself.
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], StartupError | OSError):
            raise group.exceptions[0] from None
        raise


def engine_limits(assignments: Sequence[str]) -> EngineLimits:
    """``EngineLimits`` from ``NAME=VALUE`` strings (``--limit max_log_entries=50000``).

    Raises:
        ValueError: an unknown name, a malformed assignment or a bad value.
    """
    fields = {f.name: f.type for f in dataclasses.fields(EngineLimits)}
    changes: dict[str, int | float] = {}
    for assignment in assignments:
        name, sep, raw = assignment.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            known = ", ".join(sorted(fields))
            raise ValueError(f"--limit takes NAME=VALUE with NAME one of: {known} "
                             f"(got {assignment!r})")  # fmt: skip
        kind = float if fields[name] in (float, "float") else int
        try:
            value = kind(raw.replace("_", ""))
        except ValueError:
            what = "a number" if kind is float else "an integer"
            raise ValueError(f"--limit {name}: {raw!r} is not {what}") from None
        if not value > 0:
            raise ValueError(f"--limit {name}: must be > 0 (got {raw})")
        changes[name] = value
    return EngineLimits(**changes)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    tools: list[str] = list(args.tools)
    graphs: tuple[str, ...] = ()
    if args.samples:
        graphs, sample_modules = _sample_settings(tools)
        tools += sample_modules
    evaluator = args.evaluator or os.environ.get("TRIOFLOW_EVALUATOR") or "compiled"
    if evaluator not in EVALUATORS:
        return _fail(f"unknown evaluator {evaluator!r} (--evaluator or TRIOFLOW_EVALUATOR); "
                     f"use one of: {', '.join(EVALUATORS)}")  # fmt: skip
    if not args.send_timeout > 0:
        return _fail("--send-timeout must be > 0")
    try:
        limits = engine_limits(args.limit)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        build_registry(tuple(tools))
    except EngineError as exc:
        return _fail(exc.message)
    settings = Settings(
        store_url=args.store,
        tool_modules=tuple(tools),
        graph_files=graphs,
        evaluator=evaluator,  # type: ignore[arg-type]  # checked against EVALUATORS above
        max_body_bytes=args.max_body_bytes,
        allowed_hosts=_names(args.allowed_hosts),
        allowed_origins=_names(args.allowed_origins),
        send_timeout_s=args.send_timeout,
        limits=limits,
    )
    try:
        trio.run(_serve, settings, args.host, args.port, args.graceful_timeout)
    except OSError as exc:
        return _fail(f"cannot serve on {args.host}:{args.port}: {exc}")
    except StartupError as exc:
        # The store opens before any socket is bound: a bad URL, an
        # unwritable directory, a foreign file or a store another server
        # holds is this one line and exit 3.
        return _fail(str(exc))
    return EXIT_OK


# -- validate ----------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        registry = build_registry(tuple(args.tools))
    except EngineError as exc:
        return _fail(exc.message)
    try:
        document = _read_document(args.file)
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror or exc}")
    except ValueError as exc:
        print(f"{args.file}: $: invalid_json: {exc}")
        return EXIT_FAILED
    from trioflow import compile_graph

    try:
        graph = compile_graph(document, registry)
    except GraphValidationError as exc:
        for problem in exc.problems:
            print(f"{args.file}: {problem.path}: {problem.code}: {problem.message}")
        print(f"{len(exc.problems)} problem(s)", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.file}: graph {graph.id!r} is valid ({len(graph.nodes)} nodes)")
    return EXIT_OK


# -- run ---------------------------------------------------------------------------


async def _run(document: Any, state: Any, registry: Registry) -> int:
    async with open_engine(registry=registry) as engine:
        try:
            graph = await engine.register_graph(document)
            record = await engine.start_run(graph.id, state)
        except GraphValidationError as exc:
            for problem in exc.problems:
                print(f"{problem.path}: {problem.code}: {problem.message}", file=sys.stderr)
            return EXIT_ERROR
        except EngineError as exc:
            return _fail(exc.message)
        run_id = record.run_id

        async def cancel_on_signal() -> None:
            with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
                async for _ in signals:
                    print("trioflow: cancelling the run", file=sys.stderr)
                    await engine.cancel(run_id)
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_signal)
            async for entry in engine.follow(run_id):
                print(format_entry(entry.as_dict()), file=sys.stderr, flush=True)
            nursery.cancel_scope.cancel()
        final = await engine.get_run(run_id)
        print(json.dumps(final.state, indent=2, ensure_ascii=False))
        if final.error is not None:
            print(f"trioflow: run failed: {final.error.get('message')}", file=sys.stderr)
        return STATUS_EXIT.get(final.status, EXIT_ERROR)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        registry = build_registry(tuple(args.tools))
    except EngineError as exc:
        return _fail(exc.message)
    try:
        document = _read_document(args.file)
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror or exc}")
    except ValueError as exc:
        return _fail(f"{args.file} is not JSON: {exc}")
    try:
        state = json.loads(args.state)
    except ValueError as exc:
        return _fail(f"--state is not JSON: {exc}")
    return trio.run(_run, document, state, registry)


# -- logs --------------------------------------------------------------------------


async def _logs(url: str, run_id: str, after: int, follow: bool, as_json: bool) -> int:
    import httpx
    from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

    base = url.rstrip("/")
    until: int | None = None
    if not follow:
        # "What exists": everything up to the run's current checkpoint.
        try:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                response = await client.get(f"/graph/state/{run_id}")
        except httpx.HTTPError as exc:
            return _fail(f"cannot reach {base}: {exc}")
        if response.status_code != 200:
            return _fail(_error_text(response.text))
        until = response.json()["last_seq"]
        if until <= after:
            return EXIT_OK
    ws_url = "ws" + base[len("http") :] if base.startswith("http") else base
    ws_url = f"{ws_url}/ws/logs/{run_id}?after={after}"
    status: str | None = None
    try:
        async with open_websocket_url(ws_url) as ws:
            try:
                while True:
                    message = json.loads(await ws.get_message())
                    if message["type"] == "log":
                        entry = message["log"]
                        print(json.dumps(entry) if as_json else format_entry(entry), flush=True)
                        if until is not None and entry["seq"] >= until:
                            break
                    elif message["type"] == "status":
                        status = message["status"]
                    elif message["type"] == "error":
                        return _fail(message["error"]["message"])
            except ConnectionClosed as closed:
                if closed.reason is not None and closed.reason.code == 1001:
                    return _fail("the server is shutting down")
            finally:
                stream = ws._stream
        # trio-websocket does not close its socket when the server closes first.
        await stream.aclose()
    except (HandshakeError, OSError) as exc:
        return _fail(f"cannot follow {ws_url}: {exc}")
    if follow and status is not None:
        return STATUS_EXIT.get(RunStatus(status), EXIT_ERROR)
    return EXIT_OK


def _error_text(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200]


def cmd_logs(args: argparse.Namespace) -> int:
    if args.after < 0:
        return _fail("--after must be >= 0")
    return trio.run(_logs, args.url, args.run_id, args.after, args.follow, args.json)


# -- prune -------------------------------------------------------------------------

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _age(text: str) -> float:
    """``"30d"`` -> seconds. Plain numbers are seconds."""
    raw = text.strip().lower()
    unit = _AGE_UNITS.get(raw[-1:])
    number = raw[:-1] if unit is not None else raw
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an age: {text!r} (use e.g. 90s, 30m, 12h, 30d)"
        ) from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"an age must be positive: {text!r}")
    return value


async def _prune(store_url: str, older_than_s: float) -> int:
    store = open_store_from_url(store_url)
    # No resume: pruning must not start the runs a stopped server left behind.
    async with open_engine(store=store, resume=False) as engine:
        return await engine.delete_runs(older_than_s=older_than_s)


def cmd_prune(args: argparse.Namespace) -> int:
    try:
        deleted = trio.run(_prune, args.store, args.older_than)
    except EngineError as exc:
        return _fail(exc.message)
    print(f"deleted {deleted} terminal run(s) older than {args.older_than:g} s")
    return EXIT_OK


# -- main --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trioflow", description="JSON-defined workflow graphs on Trio.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the HTTP API")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (0: pick a free one)")
    p.add_argument("--store", default=_default_store(),
                   help=f"store URL: sqlite:///PATH or memory:// (default: $TRIOFLOW_STORE, "
                        f"else {DEFAULT_STORE})")  # fmt: skip
    p.add_argument("--tools", nargs="+", action="extend", default=[], metavar="MODULE",
                   help="tool modules to load (each defines register(registry))")  # fmt: skip
    p.add_argument("--samples", action="store_true",
                   help="register the graphs in samples/ (and their tool modules)")  # fmt: skip
    p.add_argument("--evaluator", default=None, metavar="|".join(EVALUATORS),
                   help="condition evaluator (default: $TRIOFLOW_EVALUATOR, else compiled)")
    p.add_argument("--allowed-hosts", action="append", default=[], metavar="HOST[,HOST]",
                   help="Host names served besides localhost, 127.0.0.1, ::1 and the bound "
                        "address; others get 421. Repeatable or comma-separated; * serves any")
    p.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGIN[,ORIGIN]",
                   help="browser Origins (scheme://host[:port]) allowed besides same-origin "
                        "requests; others get 403. Repeatable or comma-separated; * allows any")
    p.add_argument("--send-timeout", type=float, default=Settings().send_timeout_s,
                   metavar="SECONDS",
                   help="close a connection whose client accepts no data for this long")
    p.add_argument("--max-body-bytes", type=int, default=Settings().max_body_bytes)
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="an engine bound, e.g. max_log_entries=50000 or max_graph_steps=10000 "
                        "(repeatable; see docs/operations.md for every name and default)")
    p.add_argument("--graceful-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get on shutdown")  # fmt: skip
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])  # fmt: skip
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("validate", help="validate a graph document")
    p.add_argument("file")
    p.add_argument("--tools", nargs="+", action="extend", default=[], metavar="MODULE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run a graph here, printing its log (stderr) and state (stdout)")
    p.add_argument("file")
    p.add_argument("--state", default="{}", help="initial state as a JSON object")
    p.add_argument("--tools", nargs="+", action="extend", default=[], metavar="MODULE")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prune", help="delete terminal runs (and their logs) older than an age")
    p.add_argument("--store", default=_default_store(),
                   help=f"store URL (default: $TRIOFLOW_STORE, else {DEFAULT_STORE})")  # fmt: skip
    p.add_argument("--older-than", required=True, type=_age, metavar="AGE",
                   help="age such as 3600, 90s, 30m, 12h or 30d")  # fmt: skip
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("logs", help="print a run's log from a server")
    p.add_argument("run_id")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--follow", "-f", action="store_true", help="wait for new entries until the end")
    p.add_argument("--after", type=int, default=0, help="only entries with seq > AFTER")
    p.add_argument("--json", action="store_true", help="one JSON entry per line")
    p.set_defaults(func=cmd_logs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trioflow`` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
