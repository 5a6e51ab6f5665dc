"""The web UI: static files under ``/ui/``.

The files are small and few, so they are read once, at construction, into
memory (with a gzip copy of the compressible ones and an ETag each): serving
a request never touches the disk or blocks the reactor.  Unknown paths whose
last segment has no ``.`` get ``index.html`` (the single-page app routes
itself); a missing file with an extension is a 404.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from typing import Any

from twisted.web.resource import Resource

from llamaswap.web.errors import method_not_allowed

#: Where the UI files live: ``llamaswap/ui/`` next to this package.
UI_DIRECTORY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ui")

#: URL prefix the resource is mounted at.
PREFIX = b"/ui"
_GET = (b"GET", b"HEAD")

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".mjs": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".json": b"application/json",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
    ".txt": b"text/plain; charset=utf-8",
    ".map": b"application/json",
    ".woff2": b"font/woff2",
}
_COMPRESSIBLE = frozenset({".html", ".js", ".mjs", ".css", ".json", ".svg", ".txt", ".map"})
#: Files smaller than this are not worth compressing.
_GZIP_MIN = 512
#: Revalidate every time (cheap: ETag + 304), so an upgrade never leaves a
#: browser with a stale mix of ES modules.
_CACHE_CONTROL = b"no-cache"


@dataclass(frozen=True)
class StaticFile:
    """One file held in memory, ready to serve."""

    body: bytes
    content_type: bytes
    etag: bytes
    gzipped: bytes | None


def load_static_files(directory: str) -> dict[str, StaticFile]:
    """Read every file under ``directory``, keyed by its ``/``-separated path."""
    files: dict[str, StaticFile] = {}
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(names):
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            relative = os.path.relpath(full, directory).replace(os.sep, "/")
            ext = os.path.splitext(name)[1].lower()
            with open(full, "rb") as f:
                body = f.read()
            gzipped = None
            if ext in _COMPRESSIBLE and len(body) >= _GZIP_MIN:
                packed = gzip.compress(body, compresslevel=9, mtime=0)
                if len(packed) < len(body):
                    gzipped = packed
            etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
            files[relative] = StaticFile(
                body, CONTENT_TYPES.get(ext, b"application/octet-stream"), etag, gzipped
            )
    return files


def _accepts_gzip(header: bytes | None) -> bool:
    if not header:
        return False
    for part in header.split(b","):
        coding, _, params = part.strip().partition(b";")
        if coding.strip().lower() in (b"gzip", b"*"):
            q = params.strip().lower()
            if not q.startswith(b"q="):
                return True
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
    return False


class UIResource(Resource):
    """Serves the single-page UI from memory.

    A leaf: it reads ``request.path`` itself, so it can be rendered from
    llamaswap's root resource for ``/ui``, ``/ui/...`` and ``/favicon.ico``.
    """

    isLeaf = True

    def __init__(self, directory: str = UI_DIRECTORY) -> None:
        super().__init__()
        self.files = load_static_files(directory)

    def lookup(self, relative: str) -> StaticFile | None:
        """The file for a path below ``/ui/``, with the SPA fallback."""
        if relative == "" or relative.endswith("/"):
            relative += "index.html"
        found = self.files.get(relative)
        if found is not None:
            return found
        last = relative.rsplit("/", 1)[-1]
        if "." in last:
            return None
        return self.files.get("index.html")

    def render(self, request: Any) -> bytes:
        path: bytes = request.path
        if request.method not in _GET:
            return method_not_allowed(request, _GET)
        if path == b"/favicon.ico":
            found = self.files.get("favicon.ico")
        elif path == PREFIX:
            query = request.uri.partition(b"?")[2]
            request.setResponseCode(301)
            request.setHeader(b"location", PREFIX + b"/" + (b"?" + query if query else b""))
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return b'<a href="/ui/">Moved Permanently</a>.\n'
        elif path.startswith(PREFIX + b"/"):
            relative = path[len(PREFIX) + 1 :].decode("utf-8", "replace")
            if any(part in ("..", ".") for part in relative.split("/")):
                found = None
            else:
                found = self.lookup(relative)
        else:
            found = None
        if found is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"404 page not found\n"
        return self._send(request, found)

    def _send(self, request: Any, found: StaticFile) -> bytes:
        request.setHeader(b"content-type", found.content_type)
        request.setHeader(b"cache-control", _CACHE_CONTROL)
        request.setHeader(b"x-content-type-options", b"nosniff")
        body, etag = found.body, found.etag
        if found.gzipped is not None:
            request.setHeader(b"vary", b"Accept-Encoding")
            if _accepts_gzip(request.getHeader(b"accept-encoding")):
                request.setHeader(b"content-encoding", b"gzip")
                # A different representation needs a different strong ETag.
                body, etag = found.gzipped, found.etag[:-1] + b'-gz"'
        request.setHeader(b"etag", etag)
        match = request.getHeader(b"if-none-match")
        if match and etag in [tag.strip() for tag in match.split(b",")]:
            request.setResponseCode(304)
            return b""
        request.setHeader(b"content-length", b"%d" % len(body))
        return body
