"""A newcomer's first hour with the ``trioflow`` command: their own tools and graphs, and errors.

Every test runs the installed console script (``.venv/bin/trioflow``) in a
subprocess, from the directory a user would run it in, without PYTHONPATH:
``python -c`` or ``python -m`` would put the current directory on the import
path by themselves, the console script does not.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from trioflow import LogEntry, RunRecord, RunStatus
from trioflow.logs import Event, Level
from trioflow.stores.sqlite import SQLiteStore

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = pathlib.Path(sys.executable).parent / "trioflow"

MYTOOLS = '''\
"""Text tools for a three-node flow."""

from trioflow import Registry, RunContext


def normalise(state):
    """Collapse the whitespace of `text`."""
    return {"text": " ".join(state.text.split())}


def count_words(state, ctx: RunContext):
    """Count the words of `text` into `words`."""
    words = len(state.text.split())
    ctx.log(f"{words} words")
    return {"words": words}


async def verdict(state):
    """Set `long` when there are more than `max_words` words."""
    return {"long": state.words > state.get("max_words", 3)}


def register(registry: Registry) -> None:
    registry.add_tool("text.normalise", normalise, inline=True)
    registry.add_tool("text.count_words", count_words)
    registry.add_tool("text.verdict", verdict)
'''

MORETOOLS = '''\
def shout(state):
    """Upper-case `text`."""
    return {"text": state.text.upper()}


def register(registry):
    registry.add_tool("more.shout", shout, inline=True)
'''

MY_GRAPH = {
    "id": "words",
    "start_node": "normalise",
    "nodes": [
        {"id": "normalise", "callable": "text.normalise"},
        {"id": "count", "callable": "text.count_words"},
        {"id": "verdict", "callable": "text.verdict"},
    ],
    "edges": [{"from": "normalise", "to": "count"}, {"from": "count", "to": "verdict"}],
}

SHOUT_GRAPH = {
    "id": "shout",
    "start_node": "a",
    "nodes": [{"id": "a", "callable": "more.shout"}, {"id": "b", "callable": "text.normalise"}],
    "edges": [{"from": "a", "to": "b"}],
}


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


async def trioflow(
    *args: str, cwd: pathlib.Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    with trio.fail_after(30):
        done = await trio.run_process(
            [str(SCRIPT), *args],
            cwd=cwd,
            env=env or user_env(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


@pytest.fixture
def project(tmp_path: pathlib.Path) -> pathlib.Path:
    """A user's directory: two tool modules and two graphs."""
    (tmp_path / "mytools.py").write_text(MYTOOLS)
    (tmp_path / "moretools.py").write_text(MORETOOLS)
    (tmp_path / "my_graph.json").write_text(json.dumps(MY_GRAPH))
    (tmp_path / "shout.json").write_text(json.dumps(SHOUT_GRAPH))
    return tmp_path


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 3, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# -- your own tools -----------------------------------------------------------------------


async def test_tool_modules_import_from_the_current_directory(project: pathlib.Path) -> None:
    listed = await trioflow("tools", "--tools", "mytools", cwd=project)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split(None, 2) for line in listed.stdout.splitlines()]
    assert ["text.count_words", "sync", "Count the words of `text` into `words`."] in rows
    assert ["text.normalise", "inline", "Collapse the whitespace of `text`."] in rows
    assert rows[[r[0] for r in rows].index("text.verdict")][:2] == ["text.verdict", "async"]
    assert ["tools.noop", "inline", "Do nothing; the state is unchanged."] in rows

    # --tools does not swallow the FILE that follows it.
    valid = await trioflow("validate", "--tools", "mytools", "my_graph.json", cwd=project)
    assert valid.returncode == 0, valid.stderr
    assert "graph 'words' is valid (3 nodes)" in valid.stdout
    state = json.dumps({"text": "  the quick   brown fox ", "max_words": 3})
    ran = await trioflow(
        "run", "--tools", "mytools", "my_graph.json", "--state", state, cwd=project
    )
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout) == {
        "text": "the quick brown fox",
        "max_words": 3,
        "words": 4,
        "long": True,
    }
    assert "4 words" in ran.stderr
    # Repeated, or comma-separated.
    for tools in (("--tools", "moretools", "--tools", "mytools"), ("--tools", "moretools,mytools")):
        both = await trioflow(
            "run", *tools, "shout.json", "--state", '{"text": "a  b"}', cwd=project
        )
        assert both.returncode == 0, both.stderr
        assert json.loads(both.stdout) == {"text": "A B"}
    # Without them, the graph names tools that do not exist.
    invalid = await trioflow("validate", "my_graph.json", cwd=project)
    assert invalid.returncode == 1
    assert "unknown_callable" in invalid.stdout


async def test_the_samples_tools_import_from_the_repository_root() -> None:
    result = await trioflow(
        "validate", "--tools", "samples.python_review", "samples/python_review.json", cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "graph 'python-review' is valid" in result.stdout


async def test_a_tool_module_that_does_not_load_is_one_line_and_exit_3(
    tmp_path: pathlib.Path,
) -> None:
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency\n")
    (tmp_path / "broken.py").write_text("def register(registry):\n    return (\n")
    (tmp_path / "raises.py").write_text("x = 1\nraise RuntimeError('no config')\n")
    (tmp_path / "clash.py").write_text(
        "def register(registry):\n    registry.add_tool('tools.noop', print)\n"
    )
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "g.json").write_text(json.dumps(MY_GRAPH))
    cases = {
        ("tools", "--tools", "missing"): (
            "cannot import tool module 'missing': no module named 'missing' in the current "
            f"directory ({tmp_path}) or the installed packages"
        ),
        ("validate", "--tools", "needs_dep", "g.json"): (
            "cannot import tool module 'needs_dep': ModuleNotFoundError: No module named "
            "'no_such_dependency' (needs_dep.py, line 1)"
        ),
        ("run", "--tools", "broken", "g.json"): "cannot import tool module 'broken': SyntaxError:",
        ("serve", "--store", "memory://", "--port", "0", "--tools", "raises"): (
            "cannot import tool module 'raises': RuntimeError: no config (raises.py, line 2)"
        ),
        ("tools", "--tools", "clash"): (
            "tool module 'clash': register(registry) failed: tool name 'tools.noop' is already "
            "registered (clash.py, line 2)"
        ),
        ("tools", "--tools", "empty"): (
            "tool module 'empty' has no register(registry) function (empty.py)"
        ),
        ("tools", "--tools", "clash.py"): (
            "tool module 'clash.py' is a file name: --tools takes a module name, such as 'clash'"
        ),
    }
    results = [await trioflow(*args, cwd=tmp_path) for args in cases]
    for (args, expected), result in zip(cases.items(), results, strict=True):
        line = one_line(result)
        assert line.startswith(f"trioflow: {expected}"), (args, line)


def fake_distribution(site: pathlib.Path, entry_point: str = "acme_tools:register") -> None:
    """An installed distribution declaring a trioflow.tools entry point (what pip writes)."""
    package = site / "acme_tools"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        'def hello(state):\n    """Say hello."""\n    return {"greeting": "hello"}\n\n\n'
        'def register(registry):\n    registry.add_tool("acme.hello", hello, inline=True)\n'
    )
    info = site / "acme_tools-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-tools\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[trioflow.tools]\nacme = {entry_point}\n")


async def test_installed_entry_points_are_loaded_unless_told_not_to(
    tmp_path: pathlib.Path,
) -> None:
    site = tmp_path / "site"
    fake_distribution(site)
    graph = {"id": "hi", "start_node": "a", "nodes": [{"id": "a", "callable": "acme.hello"}]}
    (tmp_path / "hi.json").write_text(json.dumps(graph))
    env = user_env(PYTHONPATH=str(site))
    listed = await trioflow("tools", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "acme.hello     inline  Say hello." in listed.stdout.splitlines()
    without = await trioflow("tools", "--no-entry-points", cwd=tmp_path, env=env)
    assert "acme.hello" not in without.stdout
    ran = await trioflow("run", "hi.json", cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout) == {"greeting": "hello"}
    invalid = await trioflow("validate", "hi.json", "--no-entry-points", cwd=tmp_path, env=env)
    assert invalid.returncode == 1
    async with (
        serving("--store", "memory://", cwd=tmp_path, env=env) as (url, _),
        httpx.AsyncClient(base_url=url) as client,
    ):
        names = [t["name"] for t in (await client.get("/tools")).json()["items"]]
    assert "acme.hello" in names

    # A directory without __init__.py is a namespace package, not a tool module.
    (tmp_path / "checkout").mkdir()
    line = one_line(await trioflow("tools", "--tools", "checkout", cwd=tmp_path, env=env))
    assert line == (
        f"trioflow: tool module 'checkout' is a directory without __init__.py "
        f"({tmp_path / 'checkout'}), not a module with register(registry); is it hiding "
        "the package of that name?"
    )

    fake_distribution(site, "acme_tools:missing")
    line = one_line(await trioflow("tools", cwd=tmp_path, env=env))
    assert line.startswith(
        "trioflow: cannot load the trioflow.tools entry point 'acme' (acme_tools:missing, "
        "from acme-tools): AttributeError:"
    )
    assert line.endswith("(--no-entry-points skips the tools of installed packages)")
    assert (await trioflow("tools", "--no-entry-points", cwd=tmp_path, env=env)).returncode == 0


EDITABLE_FINDER = """\
import importlib.util
import sys

SOURCE = {source!r}


class EditableFinder:
    # What setuptools installs for `pip install -e` of a flat project: a finder
    # at the end of sys.meta_path, after the one that searches sys.path.
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "acme_tools":
            return None
        return importlib.util.spec_from_file_location(
            name, SOURCE + "/acme_tools/__init__.py",
            submodule_search_locations=[SOURCE + "/acme_tools"])


sys.meta_path.append(EditableFinder)
"""


async def test_an_editable_package_is_not_shadowed_by_its_checkout_here(
    tmp_path: pathlib.Path,
) -> None:
    # The README's walk: `pip install -e ./acme_tools` from the directory that
    # holds the checkout, then --tools for a module there. The current
    # directory goes on the import path for --tools; the checkout's outer
    # directory, acme_tools/ without __init__.py, must not replace the
    # installed package when its entry point loads.
    site = tmp_path / "site"
    fake_distribution(site)
    checkout = tmp_path / "acme_tools"
    checkout.mkdir()
    (site / "acme_tools").rename(checkout / "acme_tools")
    (site / "sitecustomize.py").write_text(EDITABLE_FINDER.format(source=str(checkout)))
    (tmp_path / "local.py").write_text("def register(registry):\n    pass\n")
    env = user_env(PYTHONPATH=str(site))
    listed = await trioflow("tools", "--tools", "local", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "acme.hello" in listed.stdout


# -- serve: graphs, start-up, log ----------------------------------------------------------


@asynccontextmanager
async def serving(
    *args: str, cwd: pathlib.Path, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, list[str]]]:
    """``trioflow serve --port 0``: its URL and its output (stdout and stderr, merged) so far.

    On the way out: SIGTERM, exit code 0, and the rest of the output in the list.
    """
    process = await trio.lowlevel.open_process(
        [str(SCRIPT), "serve", "--port", "0", *args],
        cwd=cwd,
        env=env or user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(30):
            while (match := re.search(rb"trioflow listening on (\S+)\n", output)) is None:
                chunk = await process.stdout.receive_some()
                assert chunk, f"serve exited before listening: {output.decode()}"
                output += chunk
        lines = output.decode().splitlines()
        yield match.group(1).decode(), lines
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            while chunk := await process.stdout.receive_some():
                output += chunk
            assert await process.wait() == 0
        lines[:] = output.decode().splitlines()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            await process.stdout.aclose()


async def test_serve_runs_your_own_tools_and_graphs(project: pathlib.Path) -> None:
    graphs = project / "graphs"
    graphs.mkdir()
    (graphs / "shout.json").write_text(json.dumps(SHOUT_GRAPH))
    (graphs / "broken.json").write_text("{nope")
    (graphs / "bad.json").write_text(json.dumps({"id": "bad", "start_node": "x", "nodes": []}))
    (graphs / "notes.txt").write_text("not a graph")
    options = (
        "--store",
        "memory://",
        "--tools",
        "mytools",
        "--tools",
        "moretools",
        "--graphs",
        "my_graph.json",
        "--graphs",
        "graphs",
    )
    with trio.fail_after(60):
        async with serving(*options, cwd=project) as (url, lines):
            async with httpx.AsyncClient(base_url=url) as client:
                body = {"graph_id": "words", "initial_state": {"text": "a  b c d e"}}
                run = (await client.post("/graph/run", json=body)).json()
                ids = [g["graph_id"] for g in (await client.get("/graphs")).json()["items"]]
                tools = (await client.get("/tools", params={"limit": 500})).json()["items"]
            start = lines[:]
    assert run["status"] == "completed", run
    assert run["state"] == {"text": "a b c d e", "words": 5, "long": True}
    assert sorted(ids) == ["shout", "words"]
    verdict = "Set `long` when there are more than `max_words` words."
    assert {"name": "text.verdict", "kind": "async", "description": verdict} in tools
    skipped = [line for line in start if "skipping graph file" in line]
    assert len(skipped) == 2, start
    assert any("graphs/bad.json: graph bad is invalid" in line for line in skipped)
    assert any("graphs/broken.json: not JSON" in line for line in skipped)
    # The summary comes after the store opened and before "listening on".
    (summary,) = [i for i, line in enumerate(start) if "trioflow.web: store " in line]
    assert start[summary].endswith(
        "store memory://, evaluator compiled, 8 tools, 2 graph(s) loaded from files, "
        "2 skipped, 0 run(s) resumed"
    )
    assert start[-1].startswith("trioflow listening on ")
    assert summary < len(start) - 1

    missing = await trioflow(
        "serve", "--port", "0", "--store", "memory://", "--graphs", "nowhere", cwd=project
    )
    assert one_line(missing) == "trioflow: --graphs nowhere: no such file or directory"


async def test_samples_are_a_graphs_directory_with_its_tools() -> None:
    with trio.fail_after(60):
        async with (
            serving("--store", "memory://", "--samples", cwd=ROOT) as (url, lines),
            httpx.AsyncClient(base_url=url) as client,
        ):
            ids = [g["graph_id"] for g in (await client.get("/graphs")).json()["items"]]
            names = [t["name"] for t in (await client.get("/tools")).json()["items"]]
    assert ids == ["code-review-a", "python-review", "python-review-many"]
    assert "python_review.review" in names
    assert any("3 graph(s) loaded from files, 0 run(s) resumed" in line for line in lines)


async def test_the_access_log_is_on_by_default_quiet_and_json(tmp_path: pathlib.Path) -> None:
    async def healthz(*options: str) -> list[str]:
        async with (
            serving("--store", "memory://", *options, cwd=tmp_path) as (url, lines),
            httpx.AsyncClient(base_url=url) as client,
        ):
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/nope")).status_code == 404
        return lines

    with trio.fail_after(60):
        text, quiet, as_json = (
            await healthz(),
            await healthz("--quiet"),
            await healthz("--log-format", "json"),
        )
    access = [line for line in text if " trioflow.access: " in line]
    assert len(access) == 2, text
    assert re.search(
        r'INFO trioflow\.access: 127\.0\.0\.1:\d+ "GET /healthz" 200 [0-9.]+ ms$', access[0]
    )
    assert '"GET /nope" 404' in access[1]
    assert not [line for line in quiet if "trioflow.access" in line]
    assert any("trioflow.web: store memory://" in line for line in quiet)

    records = [json.loads(line) for line in as_json if not line.startswith("trioflow listening")]
    assert records, as_json
    by_logger = {r["logger"] for r in records}
    assert {"trioflow.access", "trioflow.web"} <= by_logger
    hits = [r for r in records if r["logger"] == "trioflow.access"]
    assert [(r["method"], r["path"], r["status"]) for r in hits] == [
        ("GET", "/healthz", 200),
        ("GET", "/nope", 404),
    ]
    assert all(isinstance(r["duration_ms"], float) for r in hits)
    (summary,) = [r for r in records if r["message"].startswith("store ")]
    assert (summary["store"], summary["evaluator"], summary["graphs_loaded"]) == (
        "memory://",
        "compiled",
        0,
    )


# -- errors and help -----------------------------------------------------------------------


async def test_a_port_in_use_is_one_line_and_exit_3_before_the_store_opens(
    tmp_path: pathlib.Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        db = tmp_path / "trioflow.db"
        result = await trioflow(
            "serve", "--port", str(port), "--store", f"sqlite:///{db}", cwd=tmp_path
        )
    line = one_line(result)
    assert line == (
        f"trioflow: port {port} on 127.0.0.1 is in use (another server?); choose another "
        "with --port PORT, or --port 0 for a free one"
    )
    assert result.stdout == ""
    assert not db.exists()  # nothing was opened, no run was resumed
    bad = await trioflow("serve", "--port", "70000", cwd=tmp_path)
    assert bad.returncode == 3 and "a port is 0 to 65535" in bad.stderr


async def test_version_help_text_and_exit_codes(tmp_path: pathlib.Path) -> None:
    from trioflow import __version__
    from trioflow.web.cli import build_parser

    version = await trioflow("--version", cwd=tmp_path)
    assert version.returncode == 0
    assert version.stdout.strip() == f"trioflow {__version__}"

    import argparse

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {
        "serve",
        "validate",
        "run",
        "tools",
        "prune",
        "logs",
        "resume",
        "signal",
        "token",
        "graph",
    }
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
        assert command.epilog and command.epilog.startswith("exit codes:"), name
    invocations = [(), *[(command,) for command in commands.choices]]
    helps = [await trioflow(*args, "--help", cwd=tmp_path) for args in invocations]
    main = helps[0].stdout
    assert "exit codes:" in main
    for code in range(4):
        assert re.search(rf"^  {code}  ", main, re.MULTILINE), code
    for result in helps:
        assert result.returncode == 0 and "exit codes:" in result.stdout


# -- prune ---------------------------------------------------------------------------------

DAY = 86400.0


async def _store_with_runs(db: pathlib.Path) -> SQLiteStore:
    store = SQLiteStore(str(db))
    await store.open()
    now = time.time()
    finished = {"old": 3 * DAY, "older": 40 * DAY, "recent": 3600.0, "running": None}
    for run_id, ago in finished.items():
        record = RunRecord(
            run_id=run_id,
            graph_id="g",
            status=RunStatus.RUNNING if ago is None else RunStatus.COMPLETED,
            state={},
            current_node="a",
            step=1,
            created_at=now - 50 * DAY,
            updated_at=now,
            last_seq=1,
            finished_at=None if ago is None else now - ago,
        )
        entry = LogEntry(1, now, Level.INFO, Event.RUN_STARTED.value, None, "x", {})
        await store.create_run(record, [entry])
    return store


async def test_prune_dry_run_human_ages_and_memory_stores(tmp_path: pathlib.Path) -> None:
    db = tmp_path / "t.db"
    store = await _store_with_runs(db)
    # The store is open, and its owner lock taken as a server takes it: prune takes none.
    await store.begin_session()
    try:
        url = f"sqlite:///{db}"
        dry = await trioflow(
            "prune", "--store", url, "--older-than", "1d", "--dry-run", cwd=tmp_path
        )
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.startswith(
            "would delete 2 terminal run(s) older than 1 day (finished before "
        )
        assert dry.stdout.rstrip().endswith("; nothing was deleted")
        assert len((await store.list_runs(limit=10)).items) == 4
        month = await trioflow("prune", "--store", url, "--older-than", "30d", cwd=tmp_path)
        assert month.returncode == 0, month.stderr
        assert month.stdout.startswith("deleted 1 terminal run(s) older than 30 days")
        hours = await trioflow(
            "prune", "--store", url, "--older-than", "36h", "--dry-run", cwd=tmp_path
        )
        assert hours.stdout.startswith("would delete 1 terminal run(s) older than 36 hours")
        left = {r.run_id for r in (await store.list_runs(limit=10)).items}
        assert left == {"old", "recent", "running"}
    finally:
        await store.end_session()
        await store.aclose()

    memory = await trioflow("prune", "--store", "memory://", "--older-than", "1d", cwd=tmp_path)
    assert one_line(memory) == (
        "trioflow: nothing to prune in memory://: a memory store lives inside the process "
        "that opened it and ends with it"
    )


def test_ages_read_in_human_units() -> None:
    from trioflow.web.cli import human_age

    assert human_age(30 * DAY) == "30 days"
    assert human_age(DAY) == "1 day"
    assert human_age(36 * 3600) == "36 hours"
    assert human_age(90) == "90 seconds"
    assert human_age(120) == "2 minutes"
    assert human_age(0) == "0 seconds"
    assert human_age(0.5) == "0.5 seconds"
    assert human_age(90.5) == "1.51 minutes"
