"""``GET /docs``: the API as a page a person can click (Swagger UI), and its static files.

Everything the page loads comes from this server: Swagger UI is vendored in
``static/swagger-ui/`` (see the README there) and started by our own
``static/docs.js``. The page itself is a few lines of HTML with no inline
script, sent with a Content-Security-Policy (:data:`CSP`) that allows
scripts, styles and requests from this origin only.

Static files are read and gzipped once per process, in a worker thread (the
bundle is 1.7 MB; compressing it takes tens of milliseconds that the event
loop does not wait for). The page links each file with a digest of its
content (``?v=``); a request carrying the current digest is cached for a
year (``immutable``), any other must revalidate (``ETag``).
"""

from __future__ import annotations

import gzip
import hashlib
import html
import importlib.resources
import re
from dataclasses import dataclass, field

import trio
from starlette.requests import Request
from starlette.responses import Response

import trioflow

from .errors import RequestError

STATIC_PREFIX = "/static/"

_JS = "text/javascript; charset=utf-8"
_CSS = "text/css; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"

STATIC_FILES: dict[str, str] = {
    "docs.js": _JS,
    "ui.js": _JS,
    "ui.css": _CSS,
    "mermaid/mermaid.esm.min.mjs": _JS,
    "mermaid/LICENSE": _TEXT,
    "mermaid/README.md": _TEXT,
    "swagger-ui/swagger-ui-bundle.js": _JS,
    "swagger-ui/swagger-ui.css": _CSS,
    "swagger-ui/swagger-ui-bundle.js.LICENSE.txt": _TEXT,
    "swagger-ui/LICENSE": _TEXT,
    "swagger-ui/NOTICE": _TEXT,
}
"""The files served under ``/static/`` (path below ``web/static/``), read at the first
request, and their content types. Mermaid's chunks (:data:`CHUNKS`) are read when
first asked for."""

CHUNKS = "mermaid/chunks/mermaid.esm.min/"
"""Mermaid's ES module chunks: a page loads only those its diagram imports."""

_CHUNK_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}\.mjs")

CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        # Swagger UI 5 sets its element styles through the DOM (element.style),
        # which a policy does not restrict; it writes no style="" markup and no
        # <style> element, so it needs no 'unsafe-inline'. (HTML in the
        # document's Markdown descriptions could carry style=""; ours has none,
        # and such a style would only be dropped.)
        "style-src 'self'",
        # swagger-ui.css draws its icons as data: SVG images; the page's empty
        # favicon is data: too (no request for /favicon.ico).
        "img-src data:",
        # /openapi.json and the requests "Try it out" sends.
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        # No other site can frame the page and trick a click on Execute.
        "frame-ancestors 'none'",
    )
)
"""The ``Content-Security-Policy`` of ``/docs``: this origin only, no inline script."""

_YEAR = "public, max-age=31536000, immutable"
_REVALIDATE = "no-cache"
_GZIP_MIN_BYTES = 1024


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    gzipped: bytes | None
    """The gzip encoding, or None for a file too small to gain from it."""
    content_type: str
    digest: str
    """A prefix of the SHA-256 of ``body``: the ``?v=``, and the ``ETag`` (``-gzip`` added)."""


def _read(path: str, content_type: str) -> StaticFile:
    resource = importlib.resources.files(__package__).joinpath("static", *path.split("/"))
    try:
        body = resource.read_bytes()
    except OSError as exc:
        raise RuntimeError(
            f"the /docs page's file static/{path} is not installed with trioflow.web "
            "(package data missing from the build)"
        ) from exc
    gzipped: bytes | None = None
    if len(body) >= _GZIP_MIN_BYTES:
        gzipped = gzip.compress(body, compresslevel=9, mtime=0)
        if len(gzipped) >= len(body):
            gzipped = None
    digest = hashlib.sha256(body).hexdigest()[:16]
    return StaticFile(body, gzipped, content_type, digest)


@dataclass(frozen=True, slots=True)
class _Static:
    files: dict[str, StaticFile]
    urls: dict[str, str]
    """``path`` -> ``/static/{path}?v={digest}`` for every file of :data:`STATIC_FILES`."""
    page: bytes
    chunk_names: frozenset[str] = frozenset()
    """The names of Mermaid's chunks shipped (the files in :data:`CHUNKS`)."""
    chunks: dict[str, StaticFile] = field(default_factory=dict)
    """Mermaid's chunks read so far (at most every shipped one)."""


_loaded: list[_Static] = []


def _load() -> _Static:
    files = {path: _read(path, kind) for path, kind in STATIC_FILES.items()}
    folder = importlib.resources.files(__package__).joinpath("static", *CHUNKS.split("/"))
    names = frozenset(
        entry.name for entry in folder.iterdir() if _CHUNK_NAME.fullmatch(entry.name) is not None
    )
    urls = {path: f"{STATIC_PREFIX}{path}?v={file.digest}" for path, file in files.items()}
    return _Static(files, urls, _page(urls), names)


async def _static() -> _Static:
    """The static files and the page, made once per process (in a worker thread)."""
    if not _loaded:
        static = await trio.to_thread.run_sync(_load)
        if not _loaded:
            _loaded.append(static)
    return _loaded[0]


def accepts_gzip(header: str | None) -> bool:
    """Whether ``Accept-Encoding`` takes gzip (``gzip`` itself wins over ``*``)."""
    if not header:
        return False
    qualities: dict[str, float] = {}
    for item in header.split(","):
        name, _, params = item.partition(";")
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        qualities.setdefault(name.strip().lower(), quality)
    return qualities.get("gzip", qualities.get("*", 0.0)) > 0


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return etag in tags or "*" in tags


async def asset_urls() -> dict[str, str]:
    """``path`` -> ``/static/{path}?v={digest}`` for every file of :data:`STATIC_FILES`."""
    return (await _static()).urls


async def _file(path: str) -> StaticFile | None:
    static = await _static()
    file = static.files.get(path)
    if file is not None or not path.startswith(CHUNKS):
        return file
    name = path.removeprefix(CHUNKS)
    if name not in static.chunk_names:
        return None
    if name not in static.chunks:
        chunk = await trio.to_thread.run_sync(_read, path, _JS)
        static.chunks.setdefault(name, chunk)
    return static.chunks[name]


async def static_file(request: Request) -> Response:
    """``GET /static/{path}``: one of :data:`STATIC_FILES` or a Mermaid chunk, else 404."""
    path = request.path_params["path"]
    file = await _file(path)
    if file is None:
        raise RequestError(404, "not_found", f"no static file {path!r}", {"path": path[:200]})
    gzipped = file.gzipped is not None and accepts_gzip(request.headers.get("accept-encoding"))
    # Each encoding is its own representation, with its own entity tag.
    etag = f'"{file.digest}-gzip"' if gzipped else f'"{file.digest}"'
    current = request.query_params.get("v") == file.digest
    headers = {
        "Cache-Control": _YEAR if current else _REVALIDATE,
        "ETag": etag,
        "Vary": "Accept-Encoding",
        "X-Content-Type-Options": "nosniff",
    }
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    if file.gzipped is not None and gzipped:
        headers["Content-Encoding"] = "gzip"
        return Response(file.gzipped, media_type=file.content_type, headers=headers)
    return Response(file.body, media_type=file.content_type, headers=headers)


def _page(urls: dict[str, str]) -> bytes:
    def url(path: str) -> str:
        return html.escape(urls[path])

    title = html.escape(f"trioflow {trioflow.__version__}: HTTP API")
    return f"""\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{url("swagger-ui/swagger-ui.css")}">
</head>
<body>
<noscript>This page needs JavaScript. The API's contract is
<a href="/openapi.json">/openapi.json</a>.</noscript>
<div id="swagger-ui" data-openapi-url="/openapi.json"></div>
<script src="{url("swagger-ui/swagger-ui-bundle.js")}"></script>
<script src="{url("docs.js")}"></script>
</body>
</html>
""".encode()


async def docs(request: Request) -> Response:
    """``GET /docs``: the Swagger UI page for ``/openapi.json``."""
    page = (await _static()).page
    headers = {
        "Content-Security-Policy": CSP,
        "Cache-Control": _REVALIDATE,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return Response(page, media_type="text/html; charset=utf-8", headers=headers)
