"""``GET /docs`` and its static files over HTTP: headers, caching, encodings, the guard.

What a browser makes of the page is in ``test_web_docs_browser.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import html.parser
import importlib.resources
import pathlib
import re

import trio
from web_support import Server

from trioflow.web import docs_page
from trioflow.web.openapi import build_openapi

STATIC = pathlib.Path(docs_page.__file__).resolve().parent / "static"
IDENTITY = {"Accept-Encoding": "identity"}


class _Tags(html.parser.HTMLParser):
    """The tags of a page, their attributes, and whether any script has inline text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline_script = False
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_script = True


def _linked(page: str) -> list[str]:
    parser = _Tags()
    parser.feed(page)
    assert not parser.inline_script
    urls = []
    for tag, attrs in parser.tags:
        if tag == "script":
            assert attrs.get("src"), attrs
            urls.append(attrs["src"])
        elif tag == "link" and attrs.get("rel") == "stylesheet":
            urls.append(attrs["href"])
        assert not any(name.startswith("on") or name == "style" for name in attrs), (tag, attrs)
    return [u for u in urls if u is not None]


async def test_docs_is_a_small_page_with_a_strict_policy(server: Server) -> None:
    response = await server.client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert policy == docs_page.CSP
    directives = dict(d.split(" ", 1) for d in policy.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in policy and "http" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-cache"
    assert len(response.content) < 2048
    assert "<title>trioflow " in response.text
    assert 'data-openapi-url="/openapi.json"' in response.text

    linked = _linked(response.text)
    assert [u.split("?")[0] for u in linked] == [
        "/static/swagger-ui/swagger-ui.css",
        "/static/swagger-ui/swagger-ui-bundle.js",
        "/static/docs.js",
    ]
    for url in linked:
        asset = await server.client.get(url, headers=IDENTITY)
        assert asset.status_code == 200, url
        path = url.split("?")[0].removeprefix("/static/")
        assert asset.content == (STATIC / path).read_bytes()
        assert asset.headers["content-type"] == docs_page.STATIC_FILES[path]
        # The page links the current digest: cached for a year, never revalidated.
        assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert url.endswith("?v=" + hashlib.sha256(asset.content).hexdigest()[:16])


async def test_head_docs(server: Server) -> None:
    response = await server.client.head("/docs")
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-security-policy"] == docs_page.CSP


async def test_static_content_types_and_cache_headers(server: Server) -> None:
    kinds = {
        "docs.js": "text/javascript; charset=utf-8",
        "swagger-ui/swagger-ui-bundle.js": "text/javascript; charset=utf-8",
        "swagger-ui/swagger-ui.css": "text/css; charset=utf-8",
        "swagger-ui/LICENSE": "text/plain; charset=utf-8",
        "swagger-ui/NOTICE": "text/plain; charset=utf-8",
        "swagger-ui/swagger-ui-bundle.js.LICENSE.txt": "text/plain; charset=utf-8",
        # The dashboard's (/ui); Mermaid's chunks are served as they are asked for.
        "ui.js": "text/javascript; charset=utf-8",
        "ui.css": "text/css; charset=utf-8",
        "mermaid/mermaid.esm.min.mjs": "text/javascript; charset=utf-8",
        "mermaid/LICENSE": "text/plain; charset=utf-8",
        "mermaid/README.md": "text/plain; charset=utf-8",
    }
    assert kinds == docs_page.STATIC_FILES
    for path, kind in kinds.items():
        response = await server.client.get(f"/static/{path}", headers=IDENTITY)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == kind
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["vary"] == "Accept-Encoding"
        assert "content-encoding" not in response.headers
        # Without the current digest (an old or no ?v=): revalidate each time.
        assert response.headers["cache-control"] == "no-cache"
        etag = response.headers["etag"]
        assert etag == f'"{hashlib.sha256(response.content).hexdigest()[:16]}"'
        again = await server.client.get(
            f"/static/{path}", headers={**IDENTITY, "If-None-Match": etag}
        )
        assert again.status_code == 304 and again.content == b""
        assert again.headers["etag"] == etag
        old = await server.client.get(f"/static/{path}?v=0123456789abcdef", headers=IDENTITY)
        assert old.headers["cache-control"] == "no-cache"


async def test_static_files_are_gzipped_for_clients_that_accept_it(server: Server) -> None:
    url = "/static/swagger-ui/swagger-ui-bundle.js"
    original = (STATIC / "swagger-ui" / "swagger-ui-bundle.js").read_bytes()
    # httpx decodes gzip itself: read the raw bytes.
    async with server.client.stream("GET", url, headers={"Accept-Encoding": "gzip, br"}) as r:
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    assert r.headers["content-encoding"] == "gzip"
    assert int(r.headers["content-length"]) == len(raw) < len(original) // 3
    assert gzip.decompress(raw) == original
    digest = hashlib.sha256(original).hexdigest()[:16]
    assert r.headers["etag"] == f'"{digest}-gzip"'
    again = await server.client.get(
        url, headers={"Accept-Encoding": "gzip", "If-None-Match": r.headers["etag"]}
    )
    assert again.status_code == 304
    for accepted in ("gzip", "GZIP;q=0.5", "*", "*;q=0, gzip", "br;q=1, gzip;q=0.1"):
        response = await server.client.get(url, headers={"Accept-Encoding": accepted})
        assert response.headers.get("content-encoding") == "gzip", accepted
    for refused in ("gzip;q=0", "br", "identity", "*;q=0", "gzip;q=0, *", "gzip;q=x"):
        response = await server.client.get(url, headers={"Accept-Encoding": refused})
        assert "content-encoding" not in response.headers, refused
        assert response.headers["etag"] == f'"{digest}"'
        assert response.content == original
    # A file too small to gain is always sent as it is.
    small = await server.client.get("/static/swagger-ui/NOTICE")
    assert "content-encoding" not in small.headers


async def test_only_the_listed_files_are_served(server: Server) -> None:
    for path in (
        "swagger-ui/README.md",
        "swagger-ui/swagger-ui-bundle.js.map",
        "swagger-ui/swagger-ui.css.map",
        "nope.js",
        "swagger-ui",
        "",
        "swagger-ui/index.html",
        "Docs.js",
        "docs.js/",
    ):
        response = await server.client.get(f"/static/{path}")
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == "not_found"
    # Dot segments as sent on the wire (httpx would remove them).
    for target in (
        "/static/swagger-ui/../docs.js",
        "/static/../docs_page.py",
        "/static/%2e%2e/docs_page.py",
        "/static/swagger-ui/..%2f..%2fapp.py",
    ):
        status, _ = await raw_get(server.base_url, target)
        assert status == 404, target
    refused = await server.client.post("/static/docs.js")
    assert refused.status_code == 405


async def raw_get(base_url: str, target: str) -> tuple[int, bytes]:
    """``GET target`` sent byte for byte: the status and the body."""
    address, port = base_url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(address, int(port))
    async with stream:
        await stream.send_all(
            f"GET {target} HTTP/1.1\r\nHost: {address}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_the_guard_applies_to_the_page_and_lets_its_own_requests_through(
    server: Server,
) -> None:
    own = server.base_url
    # Same-origin requests, as the page makes them, pass; a script or style load
    # carries no Origin at all.
    page = await server.client.get("/docs", headers={"Origin": own})
    assert page.status_code == 200
    static = await server.client.get("/static/docs.js", headers={"Origin": own})
    assert static.status_code == 200
    spec = await server.client.get("/openapi.json", headers={"Origin": own})
    assert spec.status_code == 200
    graph = {"id": "from-docs", "start_node": "a", "nodes": [{"id": "a", "callable": "tools.noop"}]}
    created = await server.client.post("/graph/create", headers={"Origin": own}, json=graph)
    assert created.status_code == 201, created.text
    # "Try it out" on cancel sends a POST without a body: no content type needed.
    cancel = await server.client.post("/graph/cancel/nope", headers={"Origin": own})
    assert cancel.status_code == 404
    assert cancel.json()["error"]["code"] == "run_not_found"
    # Other sites and other names are refused, the page and its files too.
    for path in ("/docs", "/static/docs.js"):
        foreign = await server.client.get(path, headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403
        rebound = await server.client.get(path, headers={"Host": "evil.example"})
        assert rebound.status_code == 421


def test_docs_is_an_html_operation_and_the_static_files_are_not() -> None:
    document = build_openapi()
    docs = document["paths"]["/docs"]["get"]
    assert docs["operationId"] == "docs"
    assert list(docs["responses"]["200"]["content"]) == ["text/html"]
    assert not any(path.startswith("/static") for path in document["paths"])


def test_vendored_swagger_ui_is_the_published_release() -> None:
    """The files are those of swagger-ui-dist as the README says (checksums), with no source map."""
    readme = (STATIC / "swagger-ui" / "README.md").read_text()
    assert "swagger-ui-dist" in readme and "Apache-2.0" in readme
    version = re.search(r"version: (\d+\.\d+\.\d+)", readme)
    assert version is not None
    sums = dict(
        (name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M)
    )
    vendored = {p.name for p in (STATIC / "swagger-ui").iterdir()} - {"README.md"}
    assert set(sums) == vendored
    for name, digest in sums.items():
        assert hashlib.sha256((STATIC / "swagger-ui" / name).read_bytes()).hexdigest() == digest
    assert not list(STATIC.rglob("*.map"))
    # The installed package (the editable install links what the build ships) has them all.
    installed = importlib.resources.files("trioflow.web").joinpath("static")
    for path in docs_page.STATIC_FILES:
        assert installed.joinpath(*path.split("/")).is_file(), path


def test_our_initialiser_names_no_other_host() -> None:
    ours = (STATIC / "docs.js").read_text()
    assert "http:" not in ours and "https:" not in ours
    assert "validatorUrl: null" in ours
