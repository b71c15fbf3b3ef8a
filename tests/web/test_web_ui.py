"""The /ui pages over a real server and httpx: what they show, escaping, CSP, login, static files.

The pages in a real browser (live log, Cancel, the resume form, Mermaid
drawing) are tested in ``test_web_ui_browser.py``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import trio
from web_support import Server, start_server

from trioflow import Engine, open_engine
from trioflow.web import Settings, create_app
from trioflow.web.auth import SESSION_COOKIE, AuthSettings, make_token
from trioflow.web.ui import CSP, LOG_PAGE, RUNS_PAGE, wait_fields

HOSTILE = "<script>alert('x')</script><img src=x onerror=alert(1)>\"'&amp;"
"""A value that would run script if any page put it into markup unescaped."""


class Parsed(HTMLParser):
    """What a page's markup holds: its elements, scripts, event-handler attributes, text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[dict[str, str | None]] = []
        self.inline_script = ""
        self.handlers: list[tuple[str, str]] = []
        self.text: list[str] = []
        self._in_script = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        self.handlers.extend((tag, name) for name, _ in attrs if name.startswith("on"))
        if tag == "script":
            self.scripts.append(attributes)
            self._in_script = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.inline_script += data
        else:
            self.text.append(data)

    def all_text(self) -> str:
        return "".join(self.text)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [
            a
            for t, a in self.tags
            if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


def check_inert(page: Parsed) -> None:
    """No script but the page's own module, no handler attribute, no injected element."""
    assert [s.get("src", "").split("?")[0] for s in page.scripts] == ["/static/ui.js"]  # type: ignore[union-attr]
    assert page.inline_script.strip() == ""
    assert page.handlers == []
    assert page.find("img") == []


async def get_page(client: Any, path: str, status: int = 200) -> Parsed:
    response = await client.get(path)
    assert response.status_code == status, (path, response.status_code, response.text[:500])
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    return Parsed(response.text)


def csp_directives() -> dict[str, str]:
    return dict(part.strip().split(" ", 1) for part in CSP.split(";"))  # type: ignore[misc]


def test_the_policy_allows_scripts_from_this_origin_only() -> None:
    directives = csp_directives()
    assert directives["script-src"] == "'self'"
    assert directives["default-src"] == "'none'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe-eval" not in CSP


# -- the runs list ---------------------------------------------------------------------

NOOP = {"id": "ui.noop", "start_node": "a", "nodes": [{"id": "a", "callable": "tools.noop"}]}
FAIL = {"id": "ui.fail", "start_node": "a", "nodes": [{"id": "a", "callable": "tools.fail"}]}


def chip_counts(page: Parsed) -> dict[str, int]:
    counts = {}
    for tag, attrs in page.tags:
        if tag == "a" and "chip" in (attrs.get("class") or "") and attrs.get("data-status"):
            counts[str(attrs["data-status"])] = -1
    text = page.all_text()
    for status in counts:
        match = re.search(rf"\b{status}\s+(\d+)", text)
        assert match is not None, status
        counts[status] = int(match.group(1))
    return counts


def listed_runs(page: Parsed) -> list[str]:
    return [str(a["data-run-id"]) for t, a in page.tags if t == "tr" and a.get("data-run-id")]


async def test_runs_list_counts_filters_and_pages(server: Server) -> None:
    await server.create(NOOP)
    await server.create(FAIL)
    done = [await server.start("ui.noop") for _ in range(RUNS_PAGE + 5)]
    failed = [await server.start("ui.fail") for _ in range(3)]
    for run_id in done + failed:
        await server.engine.wait(run_id)

    page = await get_page(server.client, "/ui")
    check_inert(page)
    counts = chip_counts(page)
    assert counts["completed"] == RUNS_PAGE + 5
    assert counts["failed"] == 3
    assert counts["running"] == 0
    first = listed_runs(page)
    assert len(first) == RUNS_PAGE
    assert set(failed) <= set(first)  # newest first
    older = [a["href"] for t, a in page.tags if t == "a" and a.get("rel") == "next"]
    assert len(older) == 1
    second = listed_runs(await get_page(server.client, str(older[0])))
    assert len(second) == 8 and not set(second) & set(first)
    assert set(first) | set(second) == set(done) | set(failed)

    page = await get_page(server.client, "/ui?status=failed")
    assert sorted(listed_runs(page)) == sorted(failed)
    page = await get_page(server.client, "/ui?graph_id=ui.fail&status=completed")
    assert listed_runs(page) == []
    assert chip_counts(page)["failed"] == 3  # the chips count the graph's runs
    page = await get_page(server.client, "/ui?graph_id=ui.noop")
    assert chip_counts(page) == {
        "pending": 0,
        "running": 0,
        "waiting": 0,
        "completed": RUNS_PAGE + 5,
        "failed": 0,
        "cancelled": 0,
    }

    # The live part the script polls: chips and table only, same filters.
    live = await get_page(server.client, "/ui?status=failed&live=1")
    assert sorted(listed_runs(live)) == sorted(failed)
    assert live.find("form") == [] and live.scripts == []


async def test_runs_list_answers_bad_filters_with_an_error_page(server: Server) -> None:
    page = await get_page(server.client, "/ui?status=%3Cb%3Ebogus", status=422)
    assert "request_invalid" in page.all_text()
    assert page.find("b", **{}) == []  # the value is text, not markup
    check_inert(page)
    page = await get_page(server.client, "/ui?cursor=not-a-cursor", status=400)
    assert "invalid_cursor" in page.all_text()
    page = await get_page(server.client, "/ui?limit=0", status=422)
    page = await get_page(server.client, "/ui/runs/" + "%3Cscript%3Ex", status=404)
    check_inert(page)
    assert "<script>x" in page.all_text()


async def test_runs_list_ignores_parameters_it_does_not_know(server: Server) -> None:
    await server.create(NOOP)
    await server.engine.wait(await server.start("ui.noop"))
    page = await get_page(server.client, "/ui?utm_source=mail&live=0&status=")
    assert page.find("form") != []  # the whole page: live=0 is not the live part
    assert len(listed_runs(page)) == 1


async def test_root_leads_to_the_dashboard(server: Server) -> None:
    response = await server.client.get("/")
    assert response.status_code == 307 and response.headers["location"] == "/ui"


# -- one run ---------------------------------------------------------------------------

HOSTILE_GRAPH = {
    "id": "ui.hostile",
    "name": HOSTILE,
    "start_node": "first",
    "nodes": [
        {"id": "first", "callable": "tools.noop", "description": HOSTILE},
        {"id": "boom", "callable": "tools.fail"},
        {"id": "never", "callable": "tools.noop"},
    ],
    "edges": [
        {
            "from": "first",
            "to": "boom",
            "type": "branch",
            "condition": {"expression": f"context.get('note') == {HOSTILE!r}"},
        },
        {
            "from": "first",
            "to": "never",
            "type": "branch",
            "condition": {"expression": f"context.get('note') != {HOSTILE!r}"},
        },
    ],
}


async def test_hostile_values_render_as_text(server: Server) -> None:
    """A graph's name and conditions, a state value, an error and a log message."""
    await server.create(HOSTILE_GRAPH)
    run_id = await server.start("ui.hostile", {"note": HOSTILE, "fail_message": HOSTILE})
    final = await server.engine.wait(run_id)
    assert final.status == "failed" and final.current_node == "boom"

    page = await get_page(server.client, f"/ui/runs/{run_id}")
    check_inert(page)
    text = page.all_text()
    assert text.count(HOSTILE) >= 3  # the state, the error box, the log's failure message
    # The Mermaid source is text of a <pre>: the script reads it with textContent.
    assert page.find("pre", **{"class": "mermaid-source"}) != []

    page = await get_page(server.client, "/ui/graphs/ui.hostile")
    check_inert(page)
    assert HOSTILE in page.all_text()
    page = await get_page(server.client, "/ui/graphs")
    check_inert(page)
    assert HOSTILE in page.all_text()
    page = await get_page(server.client, "/ui")
    check_inert(page)


async def test_run_page_shows_the_last_entries_of_a_long_log(server: Server) -> None:
    chatty = {
        "id": "ui.chatty",
        "start_node": "talk",
        "nodes": [{"id": "talk", "callable": "test.chatty"}],
    }
    await server.create(chatty)
    run_id = await server.start("ui.chatty", {"lines": 1000, "line_bytes": 10})
    final = await server.engine.wait(run_id)
    page = await get_page(server.client, f"/ui/runs/{run_id}")
    rows = [int(str(a["data-seq"])) for t, a in page.tags if t == "tr" and a.get("data-seq")]
    assert rows == list(range(final.last_seq - LOG_PAGE + 1, final.last_seq + 1))
    section = page.find("section", id="run")[0]
    assert section["data-first-seq"] == str(rows[0])
    assert section["data-last-seq"] == str(final.last_seq)
    assert "hidden" not in page.find("button", id="load-earlier")[0]


async def test_run_page_of_a_waiting_run_has_a_form_from_the_schema(server: Server) -> None:
    schema = {
        "type": "object",
        "properties": {
            "approved": {"type": "boolean", "description": HOSTILE},
            "score": {"type": "integer", "minimum": 0},
            "verdict": {"enum": ["ship", HOSTILE]},
            "notes": {"type": "array", "items": {"type": "string"}},
            "comment": {"type": "string", "title": "Comment"},
        },
        "required": ["approved", "score"],
    }
    graph = {
        "id": "ui.wait",
        "start_node": "ask",
        "nodes": [
            {"id": "ask", "wait": {"prompt": HOSTILE, "input_schema": schema}},
            {"id": "end", "callable": "tools.noop"},
        ],
        "edges": [{"from": "ask", "to": "end"}],
    }
    await server.create(graph)
    run_id = await server.start("ui.wait")
    record = await server.engine.wait_stop(run_id)
    assert record.status == "waiting"
    page = await get_page(server.client, f"/ui/runs/{run_id}")
    check_inert(page)
    fields = {str(a["data-field"]): a["data-kind"] for t, a in page.tags if a.get("data-field")}
    assert fields == {
        "approved": "boolean",
        "score": "integer",
        "verdict": "enum",
        "notes": "json",
        "comment": "string",
    }
    form = page.find("form", id="resume-form")[0]
    assert form["data-request-id"] == record.waiting["request_id"]  # type: ignore[index]
    assert page.all_text().count(HOSTILE) >= 3  # the prompt, a description, an enum option
    assert page.find("button", id="cancel") != []


async def test_run_page_of_a_run_in_a_fan_out_lists_its_branches(
    server: Server, gates: Any
) -> None:
    graph = {
        "id": "ui.fan",
        "start_node": "fan",
        "nodes": [
            {
                "id": "fan",
                "parallel": {
                    "branches": [
                        {
                            "id": "quick",
                            "start_node": "q",
                            "nodes": [{"id": "q", "callable": "tools.noop"}],
                        },
                        {
                            "id": HOSTILE[:40],
                            "start_node": "g",
                            "nodes": [{"id": "g", "callable": "test.gate"}],
                        },
                    ]
                },
            }
        ],
    }
    await server.create(graph)
    run_id = await server.start("ui.fan")
    await gates.reached.wait()
    page = await get_page(server.client, f"/ui/runs/{run_id}")
    check_inert(page)
    assert "hidden" not in page.find("section", id="fanout")[0]
    text = page.all_text()
    assert "parallel, 2 branches, 0 not started" in text
    assert HOSTILE[:40] in text  # a branch id is text
    gates.opened.set()
    assert (await server.engine.wait(run_id)).status == "completed"
    page = await get_page(server.client, f"/ui/runs/{run_id}")
    assert "hidden" in page.find("section", id="fanout")[0]


def test_wait_fields_fall_back_to_raw_json() -> None:
    assert wait_fields(None) is None
    assert wait_fields({"type": "object"}) is None
    assert wait_fields({"type": "array", "items": {}}) is None
    assert wait_fields({"properties": []}) is None
    fields = wait_fields({"properties": {"n": {"type": "number", "default": 1.5}}})
    assert fields is not None and fields[0].kind == "number" and fields[0].default_text == "1.5"


def test_wait_fields_read_what_schemas_and_models_hold() -> None:
    """Odd schemas the engine accepts render; a model's schema ($ref, X | None) reads well."""
    odd = wait_fields({"properties": {"a": {"type": "string"}}, "required": [{"x": 1}, ["a"]]})
    assert odd is not None and odd[0].kind == "string" and not odd[0].required
    schema = {
        "$defs": {"Colour": {"enum": ["red", "<b>blue</b>"], "type": "string"}},
        "properties": {
            "colour": {"$ref": "#/$defs/Colour", "default": "<b>blue</b>"},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
            "kind": {"const": "review"},
            "loop": {"$ref": "#/properties/loop"},
            "missing": {"$ref": "#/$defs/Nope"},
            "flag": {"type": "boolean", "default": "false"},
            "count": {"type": "integer", "default": True},
            "extra": {"type": "object", "default": {"a": 1}},
        },
        "required": ["colour", "kind"],
    }
    fields = {f.name: f for f in wait_fields(schema) or []}
    assert fields["colour"].kind == "enum" and fields["colour"].required
    assert fields["colour"].options == ["red", "<b>blue</b>"]
    assert fields["colour"].option_labels == ["red", "<b>blue</b>"]  # text, escaped on the page
    assert fields["colour"].selected == 1
    assert fields["note"].kind == "string" and fields["note"].default_text == ""
    assert fields["kind"].kind == "enum" and fields["kind"].options == ["review"]
    assert fields["loop"].kind == "json" and fields["missing"].kind == "json"
    assert not fields["flag"].checked  # "false" is no default of a boolean
    assert fields["count"].default_text == ""  # nor True of an integer
    assert fields["extra"].default_json == '{"a": 1}'


async def test_run_page_of_a_wait_with_an_odd_schema_renders(server: Server) -> None:
    graph = {
        "id": "ui.odd",
        "start_node": "ask",
        "nodes": [
            {
                "id": "ask",
                "wait": {
                    "prompt": "?",
                    "input_schema": {
                        "properties": {"a": {"type": "string"}},
                        "required": [{"x": 1}],
                    },
                },
            }
        ],
    }
    response = await server.client.post("/graph/create", json=graph)
    if response.status_code == 422:
        pytest.skip("the engine refuses this schema: nothing to render")
    run_id = await server.start("ui.odd")
    assert (await server.engine.wait_stop(run_id)).status == "waiting"
    page = await get_page(server.client, f"/ui/runs/{run_id}")
    assert page.find("form", id="resume-form") != []


# -- access ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def new_token(engine: Engine, role: str, graphs: list[str] | None = None) -> str:
    record, text = make_token(role, role, graphs, pepper=None, now=Clock()())
    await engine.store.put_token(record)
    return text


@pytest.fixture
async def locked() -> AsyncIterator[tuple[Server, Engine, dict[str, str]]]:
    """A server that requires tokens, with one of each kind."""
    settings = AuthSettings(mode="on", clock=Clock(), rate=1000, burst=1000)
    async with open_engine() as engine:
        await engine.register_graph({**NOOP, "id": "team-a.noop"})
        await engine.register_graph({**NOOP, "id": "team-b.noop"})
        tokens = {
            "admin": await new_token(engine, "admin"),
            "viewer_a": await new_token(engine, "viewer", ["team-a.*"]),
            "runner": await new_token(engine, "runner"),
        }
        app = create_app(engine, Settings(auth=settings))
        async with trio.open_nursery() as nursery:
            srv = await start_server(nursery, app, engine)
            async with srv.client:
                yield srv, engine, tokens
            srv.stop.set()


async def test_pages_need_a_login_and_the_cookie_is_strict(
    locked: tuple[Server, Engine, dict[str, str]],
) -> None:
    srv, engine, tokens = locked
    client = srv.client
    run_a = (await engine.start_run("team-a.noop")).run_id
    run_b = (await engine.start_run("team-b.noop")).run_id
    await engine.wait(run_a)
    await engine.wait(run_b)

    for path in ("/ui", f"/ui/runs/{run_a}", "/ui/graphs", "/ui/graphs/team-a.noop"):
        response = await client.get(path)
        assert response.status_code == 303, path
        target = urlsplit(response.headers["location"])
        assert target.path == "/ui/login"
        assert parse_qs(target.query)["next"] == [path]
    login = await get_page(client, "/ui/login?next=/ui/graphs")
    assert login.find("form", id="login-form")[0]["data-next"] == "/ui/graphs"
    # Only a path of the dashboard is a place to go after logging in.
    for elsewhere in ("https://evil.example/", "//evil.example/ui", "/docs", "/ui\\@evil"):
        page = await get_page(client, f"/ui/login?next={elsewhere}")
        assert page.find("form", id="login-form")[0]["data-next"] == "/ui"

    bad = await client.post("/auth/session", json={"token": "tf_0123456789abcdef_nope"})
    assert bad.status_code == 401 and "set-cookie" not in bad.headers
    response = await client.post("/auth/session", json={"token": tokens["viewer_a"]})
    assert response.status_code == 200 and response.json()["role"] == "viewer"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    assert "secure" not in attributes  # plain http on loopback; https adds it

    # The client keeps the cookie: pages and the API now answer as the viewer.
    page = await get_page(client, "/ui")
    assert listed_runs(page) == [run_a]  # team-b's run is not in this token's scope
    assert "viewer" in page.all_text()
    page = await get_page(client, f"/ui/runs/{run_a}")
    assert page.find("button", id="cancel") == []  # a viewer cannot cancel
    await get_page(client, f"/ui/runs/{run_b}", status=404)
    await get_page(client, "/ui/graphs/team-b.noop", status=404)
    graph = await get_page(client, "/ui/graphs/team-a.noop")
    assert graph.find("form", id="start-form") == []  # nor start runs
    assert (await client.get(f"/graph/state/{run_a}")).status_code == 200
    assert (await client.post("/graph/run", json={"graph_id": "team-a.noop"})).status_code == 403

    # Another site's page cannot use the cookie: a cross-origin POST is refused.
    foreign = await client.post(
        "/graph/run", json={"graph_id": "team-a.noop"}, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403

    # An Authorization header wins over the cookie.
    runner = {"Authorization": f"Bearer {tokens['runner']}"}
    started = await client.post(
        "/graph/run", json={"graph_id": "team-a.noop", "background": True}, headers=runner
    )
    assert started.status_code == 202

    out = await client.post("/auth/logout")
    assert out.status_code == 204
    assert out.headers["set-cookie"].startswith(f'{SESSION_COOKIE}=""')
    assert SESSION_COOKIE not in client.cookies
    assert (await client.get("/ui")).status_code == 303


async def test_a_page_over_the_tokens_rate_says_when_to_come_back() -> None:
    settings = AuthSettings(mode="on", clock=Clock(), rate=0.001, burst=2)
    async with open_engine() as engine:
        token = await new_token(engine, "viewer")
        app = create_app(engine, Settings(auth=settings))
        async with trio.open_nursery() as nursery:
            srv = await start_server(nursery, app, engine)
            async with srv.client:
                headers = {"Authorization": f"Bearer {token}"}
                for _ in range(2):
                    assert (await srv.client.get("/ui", headers=headers)).status_code == 200
                response = await srv.client.get("/ui", headers=headers)
                assert response.status_code == 429
                assert int(response.headers["retry-after"]) >= 1
                assert response.headers["content-type"] == "text/html; charset=utf-8"
                assert "rate" in Parsed(response.text).all_text()
            srv.stop.set()


async def test_login_page_without_access_control(server: Server) -> None:
    page = await get_page(server.client, "/ui/login")
    assert page.find("form", id="login-form") == []
    assert "Access control is off" in page.all_text()


# -- static files ----------------------------------------------------------------------


async def test_the_pages_assets_and_mermaids_chunks(server: Server) -> None:
    response = await server.client.get("/ui", headers={"Accept-Encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"  # httpx decodes it
    assert response.headers["vary"] == "Accept-Encoding"
    plain = await server.client.get("/ui", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.text == response.text
    page = await get_page(server.client, "/ui")
    links = [str(a["href"]) for t, a in page.tags if t == "link" and a.get("rel") == "stylesheet"]
    scripts = [str(a["src"]) for a in page.scripts]
    body = page.find("body")[0]
    for url in (*links, *scripts, str(body["data-mermaid"])):
        response = await server.client.get(url, headers={"Accept-Encoding": "gzip"})
        assert response.status_code == 200, url
        assert response.headers["cache-control"].endswith("immutable"), url
    entry = (await server.client.get(str(body["data-mermaid"]))).text
    chunks = re.findall(r'from"\./(chunks/mermaid\.esm\.min/[A-Za-z0-9_-]+\.mjs)"', entry)
    assert chunks
    chunk = await server.client.get(f"/static/mermaid/{chunks[0]}")
    assert chunk.status_code == 200
    assert chunk.headers["content-type"] == "text/javascript; charset=utf-8"
    for missing in (
        "mermaid/chunks/mermaid.esm.min/nope.mjs",
        "mermaid/chunks/mermaid.esm.min/../../../ui.py",
        "mermaid/chunks/mermaid.esm.min/%2e%2e%2fLICENSE",
        "mermaid/mermaid.js",
    ):
        response = await server.client.get(f"/static/{missing}")
        assert response.status_code == 404, missing
