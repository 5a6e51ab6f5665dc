"""Error responses in the format the client asked for, as llama-swap sends them.

``Accept`` containing ``text/plain`` gets ``llama-swap: <message>``,
``text/html`` a small HTML page, anything else the OpenAI-style JSON envelope
``{"src":"llama-swap","error":{...}}``.  A wrong method gets the one ``405``
of :func:`method_not_allowed` (the same negotiated error, with ``Allow``),
whichever part of the server answers.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from typing import Any

from llamaswap.core.text import as_text
from llamaswap.web.requestinfo import client_gone

_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    403: ("authentication_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "gateway_timeout"),
}

#: The 429 body llama-swap sends for a full concurrency budget, always JSON.
TOO_MANY_REQUESTS = (
    b'{"src":"llama-swap","error":{"message":"Too many requests",'
    b'"type":"rate_limit_error","param":null,"code":"concurrency_limit"}}'
)


def error_type(status: int) -> tuple[str, str]:
    if status in _TYPES:
        return _TYPES[status]
    if 400 <= status < 500:
        return ("invalid_request_error", "invalid_request")
    return ("server_error", "internal_error")


def json_envelope(status: int, message: str, code: str | None = None) -> bytes:
    kind, default_code = error_type(status)
    return json.dumps(
        {
            "src": "llama-swap",
            "error": {
                "message": message,
                "type": kind,
                "param": None,
                "code": code or default_code,
            },
        },
        separators=(",", ":"),
    ).encode()


def error_body(
    accept: bytes, status: int, message: str, code: str | None = None
) -> tuple[bytes, bytes]:
    """The ``Content-Type`` and body of an error for a client sending ``accept``."""
    text = accept.decode("latin-1")
    if "text/plain" in text:
        return b"text/plain; charset=utf-8", f"llama-swap: {message}".encode()
    if "text/html" in text:
        page = "<html><body><h1>llama-swap</h1><p>" + html.escape(message) + "</p></body></html>"
        return b"text/html; charset=utf-8", page.encode()
    return b"application/json", json_envelope(status, message, code)


def render_error(request: Any, status: int, message: str, code: str | None = None) -> bytes:
    """Set status and content type on ``request``; return the body bytes."""
    ctype, body = error_body(request.getHeader(b"accept") or b"", status, message, code)
    request.setResponseCode(status)
    request.setHeader(b"content-type", ctype)
    return body


def write_error(request: Any, status: int, message: str, code: str | None = None) -> None:
    """Answer ``request`` with an error and finish it (if still open)."""
    if client_gone(request):
        return
    body = render_error(request, status, message, code)
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def write_too_many(request: Any) -> None:
    """Answer ``request`` with llama-swap's 429 for a full concurrency budget."""
    if client_gone(request):
        return
    request.setResponseCode(429)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"retry-after", b"1")
    request.setHeader(b"content-length", b"%d" % len(TOO_MANY_REQUESTS))
    request.write(TOO_MANY_REQUESTS)
    request.finish()


def method_not_allowed(request: Any, allowed: Iterable[bytes]) -> bytes:
    """Set a ``405`` with ``Allow: <allowed, in the order given>`` on
    ``request``; return the error body (JSON unless ``Accept`` asks for
    text): an API client never gets an error it cannot parse."""
    allow = b", ".join(allowed)
    request.setHeader(b"allow", allow)
    message = f"method {as_text(request.method)} not allowed here; allowed: {as_text(allow)}"
    return render_error(request, 405, message, "method_not_allowed")
