"""CORS preflight answers (llama-swap §3.1 in docs/design.md).

Every ``OPTIONS`` request, on any path and without authentication, is
answered ``204`` with permissive CORS headers.  The requested headers are
echoed back, keeping only names made of RFC 7230 token characters so a
client cannot inject anything into our response.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["DEFAULT_ALLOW_HEADERS", "allow_headers", "preflight"]

ALLOW_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
DEFAULT_ALLOW_HEADERS = b"Content-Type, Authorization, Accept, X-Requested-With"
MAX_AGE = b"86400"

# RFC 7230 §3.2.6 token: 1*tchar
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def allow_headers(requested: bytes | None) -> bytes:
    """The ``Access-Control-Allow-Headers`` value for ``Access-Control-Request-Headers``.

    Names are trimmed, those with a non-token character dropped, the rest
    joined with ``", "``.  With nothing (valid) requested, the default list.
    """
    if not requested:
        return DEFAULT_ALLOW_HEADERS
    names = [name.strip() for name in requested.split(b",")]
    valid = [name for name in names if _TOKEN.fullmatch(name)]
    return b", ".join(valid) if valid else DEFAULT_ALLOW_HEADERS


def preflight(request: Any) -> bytes:
    """Answer an ``OPTIONS`` request: ``204`` with CORS headers, empty body."""
    request.setResponseCode(204)
    request.setHeader(b"access-control-allow-origin", b"*")
    request.setHeader(b"access-control-allow-methods", ALLOW_METHODS)
    requested = request.getHeader(b"access-control-request-headers")
    request.setHeader(b"access-control-allow-headers", allow_headers(requested))
    if requested:
        # The answer depends on the request header: keep caches from sharing it.
        request.setHeader(b"vary", b"Access-Control-Request-Headers")
    request.setHeader(b"access-control-max-age", MAX_AGE)
    return b""
