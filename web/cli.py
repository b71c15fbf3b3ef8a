"""The ``trioflow`` command: serve, validate, run, tools, logs, resume, signal, prune.

Exit codes (also in ``trioflow --help``, :data:`EXIT_CODES`):
    ``run``: 0 completed, 1 failed, 2 cancelled (Ctrl-C cancels the run, and so
    does the end of stdin while it waits for input), 3 could not start
    (unreadable file, invalid graph or state, a tool module or entry point
    that does not load).
    ``validate``: 0 valid, 1 invalid (every problem is printed), 3 unreadable
    file or tools that do not load.
    ``logs``: 0 printed; with ``--follow`` the run's end like ``run`` (0/1/2);
    3 on errors (unknown run, server unreachable or shutting down).
    ``serve``: 0 after a clean shutdown (SIGINT/SIGTERM), 3 if it cannot start
    (bad option or ``TRIOFLOW_EVALUATOR``, ``--tracing on`` without
    OpenTelemetry, a tool module or entry point that does not load, a
    ``--graphs`` path that does not exist, the port in use, a store that
    cannot be opened).
    ``tools``: 0 listed, 3 if the tools do not load.
    ``resume``: 0 taken (with ``--wait``, the run's next stop like ``run``, a
    new wait being 0), 3 refused or server unreachable.
    ``signal``: 0 stored, 3 refused or server unreachable.
    ``prune``: 0 done, 3 if the store cannot be opened or is ``memory://``.
    Usage errors exit 3 as well, so that 2 always means "cancelled".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import json
import logging
import math
import os
import pathlib
import sys
import textwrap
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, NoReturn

import trio

import trioflow
from trioflow import (
    TERMINAL,
    EngineError,
    EngineLimits,
    GraphValidationError,
    InputValidationError,
    MemoryStore,
    Registry,
    RunStateError,
    RunStatus,
    open_engine,
    open_store_from_url,
)

from .app import build_registry, create_app, load_tool_module
from .auth import AUTH_MODES, AuthSettings, auth_pepper
from .handlers import tool_kind
from .serve import SHUTDOWN_SIGNALS, StartupError, serve
from .serverlog import LOG_FORMATS, configure
from .settings import EVALUATORS, TRACING_MODES, Settings, tracing_configured, tracing_enabled

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 2
EXIT_ERROR = 3

STATUS_EXIT = {
    RunStatus.COMPLETED: EXIT_OK,
    RunStatus.FAILED: EXIT_FAILED,
    RunStatus.CANCELLED: EXIT_CANCELLED,
}

EXIT_CODES = """\
exit codes:
  0  done (run, logs --follow, resume --wait: the run completed)
  1  validate: the graph is invalid; run, logs --follow, resume --wait: the
     run failed
  2  run, logs --follow, resume --wait: the run was cancelled
  3  could not do it: a usage error or bad option, an unreadable file, a tool
     module or entry point that does not load, the port in use, a store that
     cannot be opened, a server that cannot be reached or that refused
"""

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
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The epilogs (exit codes) keep their layout; descriptions are wrapped here.
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        if kwargs.get("description"):
            kwargs["description"] = textwrap.fill(kwargs["description"], 79)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def _fail(message: str) -> int:
    print(f"trioflow: {message}", file=sys.stderr)
    return EXIT_ERROR


def format_entry(entry: dict[str, Any], answer: str | None = None) -> str:
    """One log entry as a line: seq, local time, level, event, node, message.

    A ``run_waiting`` entry (its message is the prompt) gets indented lines
    after it: the input it accepts, its deadline and ``answer``, which says
    how to give the input.
    """
    when = datetime.datetime.fromtimestamp(entry["ts"]).strftime("%H:%M:%S.%f")[:-3]
    node = entry.get("node") or "-"
    line = (
        f"{entry['seq']:>5} {when} {entry['level']:<7} {entry['event']:<15} "
        f"{node} {entry['message']}"
    )
    if entry["event"] != "run_waiting":
        return line
    data = entry.get("data") or {}
    lines = [line]
    schema = data.get("input_schema")
    if schema is not None:
        lines.append(f"{'':6}input: {json.dumps(schema, separators=(',', ':'))}")
    deadline = data.get("deadline")
    if isinstance(deadline, (int, float)):
        local = datetime.datetime.fromtimestamp(deadline).isoformat(sep=" ", timespec="seconds")
        lines.append(f"{'':6}deadline: {local}")
    if answer is not None:
        lines.append(f"{'':6}answer: {answer}")
    return "\n".join(lines)


def resume_hint(run_id: str, entry: dict[str, Any]) -> str:
    """The command that answers the wait ``entry`` of run ``run_id``."""
    request_id = (entry.get("data") or {}).get("request_id")
    option = f" --request-id {request_id}" if request_id else ""
    return f"trioflow resume {run_id} --input '<JSON>'{option}"


def _read_document(path: str) -> Any:
    """The parsed JSON of ``path``; raises OSError or ValueError."""
    return json.loads(pathlib.Path(path).read_text())


# -- tools -------------------------------------------------------------------------


def _add_tool_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tools",
        action="append",
        default=[],
        metavar="MODULE[,MODULE]",
        help="a tool module to load: it defines register(registry) and is imported like "
        "python -m would (the current directory first, then the installed packages), "
        "e.g. mytools or samples.python_review. Repeatable or comma-separated",
    )
    p.add_argument(
        "--no-entry-points",
        dest="entry_points",
        action="store_false",
        help="do not load the tools that installed packages declare in the trioflow.tools "
        "entry-point group (loaded by default)",
    )


def _importable_from_here() -> None:
    """Put the current directory first on the import path, as ``python -m`` does."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)


def _tool_registry(modules: Sequence[str], entry_points: bool) -> Registry:
    """The registry ``serve`` would build. Raises RegistryError (one line).

    The entry points are loaded before the current directory goes on the
    import path: they name installed code, which a directory here that has
    the same name (a project checkout, say) must not shadow.
    """
    registry = build_registry((), entry_points=entry_points)
    if modules:
        _importable_from_here()
        for module in modules:
            load_tool_module(registry, module)
    return registry


def _sample_settings(tools: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
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


def _graph_files(paths: Sequence[str]) -> tuple[str, ...]:
    """The graph files ``--graphs`` names: files as given, directories' ``*.json`` in order.

    Raises:
        ValueError: a path that does not exist (one line).
    """
    files: list[str] = []
    for raw in paths:
        path = pathlib.Path(raw)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.json") if p.is_file())
            if not found:
                log.warning("--graphs %s: the directory holds no *.json file", raw)
            files += found
        elif path.exists():
            files.append(raw)
        else:
            raise ValueError(f"--graphs {raw}: no such file or directory")
    return tuple(dict.fromkeys(files))


def cmd_tools(args: argparse.Namespace) -> int:
    configure("warning")
    modules = list(_names(args.tools))
    if args.samples:
        modules += _sample_settings(modules)[1]
    try:
        registry = _tool_registry(modules, args.entry_points)
    except EngineError as exc:
        return _fail(exc.message)
    tools = sorted(registry.tools().values(), key=lambda tool: tool.name)
    width = max(len(tool.name) for tool in tools)
    for tool in tools:
        line = f"{tool.name:<{width}}  {tool_kind(tool):<6}  {tool.description}"
        print(line.rstrip())
    return EXIT_OK


# -- serve -------------------------------------------------------------------------


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
            raise ValueError(
                f"--limit takes NAME=VALUE with NAME one of: {known} (got {assignment!r})"
            )
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


def _bind_error(exc: OSError, host: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (another server?); choose another with "
            "--port PORT, or --port 0 for a free one"
        )
    return f"cannot serve on {host}:{port}: {exc.strerror or exc}"


def cmd_serve(args: argparse.Namespace) -> int:
    configure(args.log_level, args.log_format, access=not args.quiet)
    tools: list[str] = list(_names(args.tools))
    graph_paths: list[str] = list(args.graphs)
    if args.samples:
        sample_graphs, sample_modules = _sample_settings(tools)
        graph_paths = [*sample_graphs, *graph_paths]
        tools += sample_modules
    evaluator = args.evaluator or os.environ.get("TRIOFLOW_EVALUATOR") or "compiled"
    if evaluator not in EVALUATORS:
        return _fail(
            f"unknown evaluator {evaluator!r} (--evaluator or TRIOFLOW_EVALUATOR); "
            f"use one of: {', '.join(EVALUATORS)}"
        )
    if not args.send_timeout > 0:
        return _fail("--send-timeout must be > 0")
    for option, value in (
        ("--lease-ttl", args.lease_ttl),
        ("--claim-interval", args.claim_interval),
    ):
        if value is not None and not (0 < value <= 86400):
            return _fail(f"{option} must be > 0 seconds (and at most a day)")
    if not 0 <= args.drain_timeout <= 86400:
        return _fail("--drain-timeout must be 0 to 86400 seconds")
    if args.node_id is not None and not 1 <= len(args.node_id) <= 200:
        return _fail("--node-id must be 1 to 200 characters")
    try:
        tracing = tracing_enabled(args.tracing, os.environ)
        limits = engine_limits(args.limit)
        graphs = _graph_files(graph_paths)
        auth = AuthSettings(
            mode=args.auth,
            pepper=auth_pepper(),
            rate=args.token_rate,
            burst=max(1, math.ceil(args.token_rate * 2)),
            run_rate=args.run_rate,
            run_burst=max(1, math.ceil(args.run_rate * 2)),
            max_streams=args.max_streams,
        )
    except ValueError as exc:
        return _fail(str(exc))
    if args.tracing == "auto" and not tracing and tracing_configured(os.environ):
        log.warning(
            "OTEL_* variables ask for traces, but OpenTelemetry is not installed: no tracing "
            "(pip install 'trioflow[otel]')"
        )
    try:
        _tool_registry(tools, args.entry_points)
    except EngineError as exc:
        return _fail(exc.message)
    settings = Settings(
        store_url=args.store,
        tool_modules=tuple(tools),
        entry_points=args.entry_points,
        graph_files=graphs,
        evaluator=evaluator,  # type: ignore[arg-type]  # checked against EVALUATORS above
        max_body_bytes=args.max_body_bytes,
        allowed_hosts=_names(args.allowed_hosts),
        allowed_origins=_names(args.allowed_origins),
        send_timeout_s=args.send_timeout,
        limits=limits,
        access_log=not args.quiet,
        node_id=args.node_id,
        lease_ttl=args.lease_ttl,
        claim_interval=args.claim_interval,
        drain_timeout_s=args.drain_timeout,
        auth=auth,
        bind_host=args.host,
        tracing=tracing,
    )
    try:
        trio.run(_serve, settings, args.host, args.port, args.graceful_timeout)
    except OSError as exc:
        # Bound before anything else starts: nothing was opened or resumed.
        return _fail(_bind_error(exc, args.host, args.port))
    except StartupError as exc:
        # The store opens before any socket listens: a bad URL, an
        # unwritable directory, a foreign file or a store another server
        # holds is this one line and exit 3.
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass  # Ctrl-C while starting: everything opened has been closed
    return EXIT_OK


# -- validate ----------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        registry = _tool_registry(_names(args.tools), args.entry_points)
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


_GRAPH_EPILOG = (
    "exit codes:\n  0  printed\n  1  the graph is invalid (every problem is printed)\n"
    "  3  the file cannot be read or the tools do not load"
)


def cmd_graph_mermaid(args: argparse.Namespace) -> int:
    try:
        registry = _tool_registry(_names(args.tools), args.entry_points)
    except EngineError as exc:
        return _fail(exc.message)
    try:
        document = _read_document(args.file)
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror or exc}")
    except ValueError as exc:
        return _fail(f"{args.file} is not JSON: {exc}")
    from trioflow import compile_graph

    try:
        graph = compile_graph(document, registry)
    except GraphValidationError as exc:
        for problem in exc.problems:
            print(
                f"{args.file}: {problem.path}: {problem.code}: {problem.message}", file=sys.stderr
            )
        return EXIT_FAILED
    sys.stdout.write(graph.to_mermaid())
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
        stdin = _Lines()
        asking: trio.CancelScope | None = None

        async def cancel_on_signal() -> None:
            with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
                async for _ in signals:
                    print("trioflow: cancelling the run", file=sys.stderr)
                    await engine.cancel(run_id)
                    return

        async def ask(entry: dict[str, Any], task_status: Any) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await _answer(engine, run_id, entry, stdin)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_signal)
            async for entry in engine.follow(run_id):
                raw = entry.as_dict()
                if asking is not None:
                    # The run left the wait (answered, timed out or cancelled).
                    asking.cancel()
                    asking = None
                if entry.event != "run_waiting":
                    print(format_entry(raw), file=sys.stderr, flush=True)
                    continue
                hint = "one JSON object on a line of stdin (the end of stdin cancels the run)"
                print(format_entry(raw, hint), file=sys.stderr, flush=True)
                stdin.start(nursery)
                asking = await nursery.start(ask, raw)
            nursery.cancel_scope.cancel()
        final = await engine.get_run(run_id)
        print(json.dumps(final.state, indent=2, ensure_ascii=False))
        if final.error is not None:
            print(f"trioflow: run failed: {final.error.get('message')}", file=sys.stderr)
        return STATUS_EXIT.get(final.status, EXIT_ERROR)


class _Lines:
    """The lines of stdin, read by one worker thread once the first wait asks.

    One reader for the whole run, so that no line is lost to a read that was
    abandoned when a wait ended without it (timed out, or cancelled).
    """

    def __init__(self) -> None:
        self._send, self.receive = trio.open_memory_channel[str](0)
        self._started = False

    def start(self, nursery: trio.Nursery) -> None:
        if not self._started:
            self._started = True
            nursery.start_soon(self._read)

    async def _read(self) -> None:
        async with self._send:
            while True:
                line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                if not line:
                    return  # closing the channel says: stdin ended
                await self._send.send(line)


async def _answer(
    engine: trioflow.Engine, run_id: str, entry: dict[str, Any], stdin: _Lines
) -> None:
    """Read the input of a wait from stdin, a line at a time, until one is taken.

    The end of stdin cancels the run: nothing else could answer it, and the
    memory store it lives in ends with this process. When stdin is not a
    terminal, so does a line that is refused: a script's answer does not get
    better by asking again.
    """
    request_id = (entry.get("data") or {}).get("request_id")
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = await stdin.receive.receive()
        except trio.EndOfChannel:
            print("trioflow: stdin ended: cancelling the waiting run", file=sys.stderr)
            await engine.cancel(run_id)
            return
        if not line.strip():
            continue
        try:
            await engine.resume(run_id, json.loads(line), request_id=request_id)
            return
        except InputValidationError as exc:
            problem = "; ".join(f"{p.path}: {p.message}" for p in exc.problems)
        except RunStateError as exc:
            # The run no longer waits for this answer (its wait timed out).
            print(f"trioflow: {exc.message}", file=sys.stderr)
            return
        except EngineError as exc:
            problem = exc.message
        except ValueError as exc:
            problem = f"not JSON: {exc}"
        print(f"trioflow: input refused: {problem}", file=sys.stderr, flush=True)
        if not interactive:
            print("trioflow: cancelling the waiting run", file=sys.stderr)
            await engine.cancel(run_id)
            return


def cmd_run(args: argparse.Namespace) -> int:
    try:
        registry = _tool_registry(_names(args.tools), args.entry_points)
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


async def _logs(
    url: str, run_id: str, after: int, follow: bool, as_json: bool, token: str | None = None
) -> int:
    import httpx
    from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

    base = url.rstrip("/")
    until: int | None = None
    if not follow:
        # "What exists": everything up to the run's current checkpoint.
        try:
            async with httpx.AsyncClient(
                base_url=base, timeout=30, headers=auth_headers(token)
            ) as client:
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
        headers = [(k.encode(), v.encode()) for k, v in auth_headers(token).items()]
        async with open_websocket_url(ws_url, extra_headers=headers) as ws:
            try:
                while True:
                    message = json.loads(await ws.get_message())
                    if message["type"] == "log":
                        entry = message["log"]
                        text = (
                            json.dumps(entry)
                            if as_json
                            else format_entry(entry, resume_hint(run_id, entry))
                        )
                        print(text, flush=True)
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
    return trio.run(_logs, args.url, args.run_id, args.after, args.follow, args.json, args.token)


# -- resume, signal ----------------------------------------------------------------


def _json_object(text: str, option: str) -> dict[str, Any] | str:
    """``text`` parsed as a JSON object, or the reason it is not one."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"{option} is not JSON: {exc}"
    if not isinstance(value, dict):
        return f"{option} must be a JSON object, not {type(value).__name__}"
    return value


async def _post(
    url: str, path: str, body: dict[str, Any], wait: bool, token: str | None = None
) -> tuple[int, Any] | str:
    """POST ``body`` to the server; the status and the parsed answer, or why it failed."""
    import httpx

    base = url.rstrip("/")
    try:
        async with httpx.AsyncClient(
            base_url=base, timeout=None if wait else 30, headers=auth_headers(token)
        ) as client:
            response = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        return f"cannot reach {base}: {exc}"
    try:
        return response.status_code, response.json()
    except ValueError:
        return f"{base}{path} answered {response.status_code}: {response.text[:200]}"


def _refused(answer: Any) -> int:
    """Print an error answer: its message, then each problem it lists with its path."""
    error = answer.get("error", {}) if isinstance(answer, dict) else {}
    print(f"trioflow: {error.get('message', answer)}", file=sys.stderr)
    details = error.get("details") or {}
    for problem in details.get("problems") or []:
        print(f"  {problem.get('path')}: {problem.get('message')}", file=sys.stderr)
    for field in details.get("errors") or []:
        print(f"  {field.get('field')}: {field.get('message')}", file=sys.stderr)
    return EXIT_ERROR


def cmd_resume(args: argparse.Namespace) -> int:
    value = _json_object(args.input, "--input")
    if isinstance(value, str):
        return _fail(value)
    body: dict[str, Any] = {"input": value, "background": not args.wait}
    if args.request_id is not None:
        body["request_id"] = args.request_id
    result = trio.run(_post, args.url, f"/graph/resume/{args.run_id}", body, args.wait, args.token)
    if isinstance(result, str):
        return _fail(result)
    status, answer = result
    if status != 200:
        return _refused(answer)
    answer.pop("logs", None)
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    if not args.wait or answer["status"] == RunStatus.WAITING.value:
        return EXIT_OK
    return STATUS_EXIT.get(RunStatus(answer["status"]), EXIT_ERROR)


def cmd_signal(args: argparse.Namespace) -> int:
    value = _json_object(args.updates, "--updates")
    if isinstance(value, str):
        return _fail(value)
    body = {"name": args.name, "updates": value}
    result = trio.run(_post, args.url, f"/graph/signal/{args.run_id}", body, False, args.token)
    if isinstance(result, str):
        return _fail(result)
    status, answer = result
    if status != 202:
        return _refused(answer)
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    return EXIT_OK


# -- prune -------------------------------------------------------------------------

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_AGE_NAMES = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


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
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"an age must be positive: {text!r}")
    return value


def human_age(seconds: float) -> str:
    """``2592000`` -> ``"30 days"``: the largest unit that holds it a whole number of times."""
    for name, size in _AGE_NAMES:
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {name}" + ("" if count == 1 else "s")
    for name, size in _AGE_NAMES:
        if seconds >= size:
            return f"{seconds / size:.3g} {name}s"
    return f"{seconds:g} seconds"


async def _count_prunable(engine: trioflow.Engine, finished_before: float) -> int:
    """How many runs ``delete_runs`` would delete: terminal, finished before the cut-off."""
    count = 0
    for status in sorted(TERMINAL, key=lambda s: s.value):
        cursor: str | None = None
        while True:
            page = await engine.list_runs(status=status, cursor=cursor, limit=500)
            finished = (r.finished_at for r in page.items if r.finished_at is not None)
            count += sum(1 for when in finished if when < finished_before)
            cursor = page.next_cursor
            if cursor is None:
                break
    return count


async def _prune(store_url: str, older_than_s: float, dry_run: bool) -> tuple[int, float]:
    store = open_store_from_url(store_url)
    if isinstance(store, MemoryStore):
        raise _NothingToPrune
    # No resume and no session: pruning takes no lock, starts none of the
    # runs a stopped server left behind, and may run beside a server.
    async with open_engine(store=store, resume=False) as engine:
        cut_off = time.time() - older_than_s
        if dry_run:
            return await _count_prunable(engine, cut_off), cut_off
        return await engine.delete_runs(older_than_s=older_than_s), cut_off


class _NothingToPrune(Exception):
    """A memory store lives in one process: another process has nothing to prune in it."""


def cmd_prune(args: argparse.Namespace) -> int:
    try:
        count, cut_off = trio.run(_prune, args.store, args.older_than, args.dry_run)
    except _NothingToPrune:
        return _fail(
            f"nothing to prune in {args.store}: a memory store lives inside the "
            "process that opened it and ends with it"
        )
    except EngineError as exc:
        return _fail(exc.message)
    age = human_age(args.older_than)
    before = datetime.datetime.fromtimestamp(cut_off).strftime("%Y-%m-%d %H:%M:%S")
    if args.dry_run:
        print(
            f"would delete {count} terminal run(s) older than {age} (finished before "
            f"{before}); nothing was deleted"
        )
    else:
        print(f"deleted {count} terminal run(s) older than {age} (finished before {before})")
    return EXIT_OK


# -- main --------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (got {port})")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trioflow",
        description="JSON-defined workflow graphs on Trio: serve them over HTTP, or validate "
        "and run them here. `trioflow COMMAND --help` describes each command.",
        epilog=EXIT_CODES,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {trioflow.__version__}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve",
        help="serve the HTTP API",
        description="Serve the HTTP API (REST, WebSocket and SSE log streams). Prints "
        "`trioflow listening on URL` on stdout once it accepts connections; everything "
        "else (start-up summary, access lines, warnings) is the log, on stderr.",
        epilog="exit codes:\n  0  stopped cleanly (SIGINT/SIGTERM)\n"
        "  3  could not start: a bad option, tools that do not load, a --graphs path that "
        "does not exist,\n     the port in use, a store that cannot be opened",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)"
    )
    p.add_argument(
        "--port",
        type=_port,
        default=8000,
        help="port to listen on (default: 8000; 0 picks a free one)",
    )
    p.add_argument(
        "--store",
        default=_default_store(),
        help=f"store URL: sqlite:///PATH, memory://, or postgresql://USER@HOST/DB[?schema=NAME] "
        f"for several servers on one database (default: $TRIOFLOW_STORE, else {DEFAULT_STORE})",
    )
    p.add_argument(
        "--node-id",
        default=None,
        metavar="NAME",
        help="this server's name among the nodes of a PostgreSQL store "
        "(default: host, pid and start time); two live nodes may not share one",
    )
    p.add_argument(
        "--lease-ttl",
        type=float,
        default=None,
        metavar="SECONDS",
        help="PostgreSQL: how long a run's lease lasts without a renewal; a dead node's "
        "runs are taken over that long after it stopped renewing (default: 15)",
    )
    p.add_argument(
        "--claim-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="PostgreSQL: seconds between two scans for runs to take over "
        "(a notification wakes it sooner; default: 1)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=Settings().drain_timeout_s,
        metavar="SECONDS",
        help="on shutdown, seconds the nodes in flight get to finish before they are cut "
        "off (they run again on resume; default: %(default)g)",
    )
    p.add_argument(
        "--auth",
        choices=AUTH_MODES,
        default="auto",
        help="API tokens: auto (the default) requires them once any token exists, and "
        "always when --host is not loopback; on: always; off: never (refused beyond "
        "loopback). Token hashes are keyed with $TRIOFLOW_AUTH_SECRET when it is set",
    )
    p.add_argument(
        "--token-rate",
        type=float,
        default=AuthSettings().rate,
        metavar="PER_S",
        help="requests per second one token may make on average (default: %(default)g; "
        "bursts of twice that)",
    )
    p.add_argument(
        "--run-rate",
        type=float,
        default=AuthSettings().run_rate,
        metavar="PER_S",
        help="runs per second one token may start on average (default: %(default)g; "
        "bursts of twice that)",
    )
    p.add_argument(
        "--max-streams",
        type=int,
        default=AuthSettings().max_streams,
        metavar="N",
        help="WebSocket and SSE log followers one token may hold at once (default: %(default)s)",
    )
    _add_tool_options(p)
    p.add_argument(
        "--graphs",
        action="append",
        default=[],
        metavar="DIR_OR_FILE",
        help="register graph documents at start: a JSON file, or every *.json in a "
        "directory. Repeatable. A file that cannot be read or is not a valid graph is "
        "skipped with a warning line; a path that does not exist stops the server (exit 3)",
    )
    p.add_argument(
        "--samples",
        action="store_true",
        help="register the graphs in the repository's samples/ and load their tool "
        "modules (--graphs samples/ --tools samples.python_review)",
    )
    p.add_argument(
        "--evaluator",
        default=None,
        metavar="|".join(EVALUATORS),
        help="condition evaluator (default: $TRIOFLOW_EVALUATOR, else compiled)",
    )
    p.add_argument(
        "--allowed-hosts",
        action="append",
        default=[],
        metavar="HOST[,HOST]",
        help="Host names served besides localhost, 127.0.0.1, ::1 and the bound "
        "address; others get 421. Repeatable or comma-separated; * serves any",
    )
    p.add_argument(
        "--allowed-origins",
        action="append",
        default=[],
        metavar="ORIGIN[,ORIGIN]",
        help="browser Origins (scheme://host[:port]) allowed besides same-origin "
        "requests; others get 403. Repeatable or comma-separated; * allows any",
    )
    p.add_argument(
        "--send-timeout",
        type=float,
        default=Settings().send_timeout_s,
        metavar="SECONDS",
        help="close a connection whose client accepts no data for this long (default: %(default)g)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=Settings().max_body_bytes,
        metavar="BYTES",
        help="request bodies over this get 413 (default: %(default)d)",
    )
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an engine bound, e.g. max_log_entries=50000 or max_graph_steps=10000 "
        "(repeatable; see docs/operations.md for every name and default)",
    )
    p.add_argument(
        "--tracing",
        choices=TRACING_MODES,
        default="auto",
        help="OpenTelemetry spans of runs and steps, with the process's global tracer "
        "provider: auto (the default) traces when OpenTelemetry is installed and "
        "OTEL_TRACES_EXPORTER (not none) or an OTEL_EXPORTER_OTLP_*ENDPOINT is set; on "
        "fails to start without OpenTelemetry; off never traces",
    )
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds in-flight requests get on shutdown (default: %(default)g)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the least severe log records written to stderr (default: info)",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text lines, or json: one JSON object per line for every record, "
        "access lines included (default: text)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no access log (by default one line per request: method, path, status, duration)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "validate",
        help="validate a graph document",
        description="Validate a graph document against the tools the server would have, "
        "printing every problem with its JSON path.",
        epilog="exit codes:\n  0  valid\n  1  invalid (every problem is printed)\n"
        "  3  the file cannot be read or the tools do not load",
    )
    p.add_argument("file", metavar="FILE", help="the graph document (JSON)")
    _add_tool_options(p)
    p.set_defaults(func=cmd_validate)

    graph = sub.add_parser(
        "graph",
        help="pictures of a graph document",
        description="Pictures of a graph document: `trioflow graph mermaid FILE` prints it "
        "as a Mermaid flowchart (the text GET /graph/{graph_id}/mermaid answers).",
        epilog=_GRAPH_EPILOG,
    )
    actions = graph.add_subparsers(
        dest="graph_command", required=True, metavar="ACTION", help="mermaid"
    )
    p = actions.add_parser(
        "mermaid",
        help="print the graph as a Mermaid flowchart",
        description="Print the graph as a Mermaid flowchart: sequential edges as arrows, "
        "branches dotted with their condition, loops thick with their cap.",
        epilog=_GRAPH_EPILOG,
    )
    p.add_argument("file", metavar="FILE", help="the graph document (JSON)")
    _add_tool_options(p)
    p.set_defaults(func=cmd_graph_mermaid)

    p = sub.add_parser(
        "run",
        help="run a graph here, printing its log (stderr) and state (stdout)",
        description="Run a graph in this process with a memory store, printing its log on "
        "stderr and its final state on stdout. Ctrl-C cancels the run. When the run waits "
        "for input, its prompt is printed and the answer is read from stdin, one JSON object "
        "per line; the end of stdin cancels the run.",
        epilog="exit codes:\n  0  completed\n  1  failed\n  2  cancelled\n"
        "  3  could not start: unreadable file, invalid graph or state, tools that do not load",
    )
    p.add_argument("file", metavar="FILE", help="the graph document (JSON)")
    p.add_argument(
        "--state", default="{}", metavar="JSON", help="initial state as a JSON object (default: {})"
    )
    _add_tool_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "tools",
        help="list the tools graphs can name (the registry serve would have)",
        description="List the registered tools: name, kind (sync: runs in a worker thread, "
        "inline: a sync tool run on the event loop, async) and the first line of its "
        "docstring. Takes the same tool options as serve; GET /tools lists a server's.",
        epilog="exit codes:\n  0  listed\n  3  the tools do not load",
    )
    _add_tool_options(p)
    p.add_argument(
        "--samples",
        action="store_true",
        help="also load the samples' tool modules, as serve --samples does",
    )
    p.set_defaults(func=cmd_tools)

    p = sub.add_parser(
        "prune",
        help="delete terminal runs (and their logs) older than an age",
        description="Delete the runs that finished (completed, failed or cancelled) more than "
        "an age ago, with their logs. Takes no lock: safe beside a running server, whose "
        "runs in flight it never touches.",
        epilog="exit codes:\n  0  done\n"
        "  3  the store cannot be opened, or it is memory:// (nothing outlives its process)",
    )
    p.add_argument(
        "--store",
        default=_default_store(),
        help=f"store URL (default: $TRIOFLOW_STORE, else {DEFAULT_STORE})",
    )
    p.add_argument(
        "--older-than",
        required=True,
        type=_age,
        metavar="AGE",
        help="age such as 3600, 90s, 30m, 12h or 30d",
    )
    p.add_argument("--dry-run", action="store_true", help="only say how many runs would be deleted")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "logs",
        help="print a run's log from a server",
        description="Print a run's log from a running server (over its WebSocket).",
        epilog="exit codes:\n  0  printed (with --follow: the run completed)\n"
        "  1  with --follow: the run failed\n  2  with --follow: the run was cancelled\n"
        "  3  unknown run, server unreachable or shutting down",
    )
    p.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    _add_url_option(p)
    p.add_argument("--follow", "-f", action="store_true", help="wait for new entries until the end")
    p.add_argument(
        "--after",
        type=int,
        default=0,
        metavar="SEQ",
        help="only entries with seq > SEQ (default: 0)",
    )
    p.add_argument("--json", action="store_true", help="one JSON entry per line")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser(
        "resume",
        help="give a waiting run on a server its input",
        description="Give a run that waits for input (status waiting) its answer, over "
        "POST /graph/resume/RUN_ID, and print the run. The input is checked against what "
        "the wait accepts; every problem is printed with its path.",
        epilog="exit codes:\n  0  taken (with --wait: the run completed, or waits again)\n"
        "  1  with --wait: the run failed\n  2  with --wait: the run was cancelled\n"
        "  3  refused (input invalid, run not waiting, stale request id, unknown run), "
        "server unreachable",
    )
    p.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    p.add_argument("--input", required=True, metavar="JSON", help="the answer, a JSON object")
    p.add_argument(
        "--request-id",
        metavar="ID",
        help="the wait's request_id (from its run_waiting entry): refused if the run "
        "has moved on to another question",
    )
    p.add_argument("--wait", action="store_true", help="wait until the run ends or waits again")
    _add_url_option(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser(
        "signal",
        help="send a signal (state updates) to a run on a server",
        description="Send a signal to a run over POST /graph/signal/RUN_ID. The server "
        "stores it before answering; the run applies its updates between steps, in "
        "arrival order, exactly once (a waiting run applies it and keeps waiting).",
        epilog="exit codes:\n  0  stored\n"
        "  3  refused (run ended, unknown run, updates not a JSON object), server unreachable",
    )
    p.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    p.add_argument("name", metavar="NAME", help="the signal's name (logged with it)")
    p.add_argument("--updates", default="{}", metavar="JSON", help="state updates, a JSON object")
    _add_url_option(p)
    p.set_defaults(func=cmd_signal)
    from .token_cli import add_token_parser

    add_token_parser(sub, _add_url_option)
    return parser


def _add_url_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="the server's base URL (default: %(default)s)",
    )
    p.add_argument(
        "--token",
        default=None,
        metavar="TOKEN",
        help="an API token for a server that requires one (default: $TRIOFLOW_TOKEN)",
    )


def auth_headers(token: str | None) -> dict[str, str]:
    """The Authorization header for ``--token`` (or ``$TRIOFLOW_TOKEN``), if any."""
    token = token or os.environ.get("TRIOFLOW_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trioflow`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except BrokenPipeError:
        # The reader went away (trioflow tools | head): not an error of ours.
        # Python would complain again when it flushes stdout on exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
