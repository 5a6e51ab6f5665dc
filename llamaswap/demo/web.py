"""HTTP pieces the demo's endpoints share: llama-server's error envelope,
JSON answers, reading a request body and its common fields."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from twisted.web.server import Request

from llamaswap.demo.model import CONTEXT_SIZE, dumps

JSON_TYPE = b"application/json; charset=utf-8"
SSE_TYPE = b"text/event-stream"

Handler = Callable[[Request], bytes | int]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def error_body(code: int, message: str) -> bytes:
    """The llama-server error envelope, as bytes."""
    error = {"code": code, "message": message, "type": _ERROR_TYPES.get(code, "server_error")}
    return dumps({"error": error})


class BadRequest(Exception):
    """A client error, answered with a 400 JSON error envelope."""


def json_response(request: Request, code: int, body: bytes) -> bytes:
    """Answer ``body`` as JSON with status ``code``."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", JSON_TYPE)
    return body


def error_response(request: Request, code: int, message: str) -> bytes:
    """Answer with the error envelope."""
    return json_response(request, code, error_body(code, message))


def read_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; :class:`BadRequest` otherwise."""
    raw = request.content.read() if request.content is not None else b""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadRequest(f"Invalid JSON body: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object")
    return body


def requested_tokens(body: dict[str, Any], keys: Sequence[str], default: int) -> tuple[int, bool]:
    """The number of tokens to generate, and whether the client capped it."""
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f'"{key}" must be an integer')
        if value == -1:
            break
        if value < 0:
            raise BadRequest(f'"{key}" must be -1 or a non-negative integer')
        if value > CONTEXT_SIZE:
            raise BadRequest(f'"{key}" exceeds the context size ({CONTEXT_SIZE})')
        return value, True
    return default, False


def requested_model(body: dict[str, Any], default: str) -> str:
    """The model name to answer with: llama-server echoes the requested one."""
    requested = body.get("model")
    if isinstance(requested, str) and requested:
        return requested
    return default
