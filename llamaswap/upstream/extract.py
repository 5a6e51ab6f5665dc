"""Finding the requested model in a request, and rewriting it, byte-exactly.

Extraction follows llama-swap: ``GET`` reads the query, JSON bodies the
top-level ``model`` member, multipart bodies the ``model`` form field,
anything else an urlencoded body field, falling back to the query.  A body
declared multipart or urlencoded that does not parse is reported as
``malformed``; when no model is found, ``missing`` says why in words a client
can act on.  Rewrites edit only the bytes of the ``model`` value: a JSON rewrite
never re-serialises the rest of the document (number formats, key order and
escapes stay as the client sent them); JSON bodies are read with
`llamaswap.core.jsonedit`, the scanner filters edit bodies with.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote_plus

from llamaswap.core.jsonedit import top_level_members


@dataclass(frozen=True)
class Extracted:
    model: str
    streaming: bool
    #: why ``model`` is empty, in words for the client ("" when a model was found).
    missing: str = ""
    #: the ``Content-Type`` says form or multipart and the body does not parse.
    malformed: bool = False


def _shown(content_type: bytes) -> str:
    """``Content-Type: ...`` as an error message quotes it."""
    if not content_type.strip():
        return "no Content-Type"
    text = content_type.decode("latin-1").strip()
    return "Content-Type: " + (text if len(text) <= 100 else text[:100] + "...")


def _unreadable(what: str, content_type: bytes, reason: str) -> str:
    return f"the request body could not be read as {what} ({_shown(content_type)}): {reason}"


def _json_problem(body: bytes) -> str:
    """Why ``body`` is not a JSON object (the error path only)."""
    if not body.strip():
        return "the body is empty"
    try:
        value = json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError included
        return str(exc)
    if isinstance(value, dict):
        return "the body is not a JSON object llamaswap can read"
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return f"the body is {kinds.get(type(value), 'a number')}, not a JSON object"


#: a ``%`` not followed by two hex digits: not urlencoded.
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, str):
        return value.strip().lower() in ("1", "t", "true")
    return False


def _scalar_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return ""


def _parse_form(body: bytes) -> dict[bytes, list[bytes]]:
    """A urlencoded body's fields, byte for byte: raw non-ASCII bytes (curl
    sends UTF-8 as is) and percent-escapes both survive.  ``parse_qs`` on
    bytes would raise on the first non-ASCII byte."""
    fields = parse_qs(body.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    return {k.encode("latin-1"): [v.encode("latin-1") for v in vs] for k, vs in fields.items()}


def _query_value(args: dict[bytes, list[bytes]], key: bytes) -> str:
    values = args.get(key)
    return values[0].decode("utf-8", "replace") if values else ""


def extract_model(
    method: bytes, content_type: bytes, body: bytes, query: dict[bytes, list[bytes]]
) -> Extracted:
    """The requested model name and streaming flag; when there is no model,
    ``missing`` says why (and ``malformed`` that a declared form does not
    parse)."""
    if method == b"GET" or method == b"HEAD":
        model = _query_value(query, b"model")
        missing = "" if model else 'no model given: the query has no "model" parameter'
        return Extracted(model, _query_value(query, b"stream") == "true", missing)
    ctype = content_type.lower()
    if b"application/json" in ctype:
        top = _json_object(body)
        if top is None:
            return Extracted("", False, _unreadable("JSON", content_type, _json_problem(body)))
        model = _scalar_text(top.get("model"))
        return Extracted(
            model,
            _truthy(top.get("stream")),
            "" if model else 'no model given: the JSON body\'s "model" is missing or empty',
        )
    if b"multipart/form-data" in ctype:
        parts, problem = _scan(content_type, body)
        if problem:
            return Extracted(
                "", False, _unreadable("multipart/form-data", content_type, problem), True
            )
        fields = _fields(parts, body, (b"model", b"stream"))
        model = fields.get(b"model", b"").decode("utf-8", "replace") or _query_value(
            query, b"model"
        )
        missing = (
            ""
            if model
            else 'no model given: the multipart form has no "model" field '
            'and the query no "model" parameter'
        )
        return Extracted(model, fields.get(b"stream", b"") == b"true", missing)
    if b"application/x-www-form-urlencoded" in ctype:
        bad = _BAD_ESCAPE.search(body)
        if bad:
            at = bad.start()
            escape = json.dumps(body[at : at + 3].decode("latin-1"))
            problem = f"invalid percent-escape {escape} at byte {at}"
            return Extracted("", False, _unreadable("a form", content_type, problem), True)
    form = _parse_form(body) if body else {}
    model = _query_value(form, b"model") or _query_value(query, b"model")
    stream = (_query_value(form, b"stream") or _query_value(query, b"stream")) == "true"
    if model:
        missing = ""
    elif b"application/x-www-form-urlencoded" in ctype:
        missing = 'no model given: the form has no "model" field and the query no "model" parameter'
    elif not body:
        missing = 'no model given: the request has no body and the query no "model" parameter'
    else:
        missing = (
            f"the request body could not be read as JSON or a form ({_shown(content_type)}); "
            'send a JSON body with a "model" member and Content-Type: application/json'
        )
    return Extracted(model, stream, missing)


def _json_object(body: bytes) -> dict[str, Any] | None:
    """``body`` parsed, when it is a UTF-8 JSON object (as `json_top_level`
    reads it, at the C parser's speed: no offsets are needed here)."""
    try:
        value = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError included
        return None
    return value if isinstance(value, dict) else None


def json_top_level(body: bytes) -> dict[str, tuple[object, int, int]] | None:
    """Top-level members of a JSON object: name -> (value, start, end).

    Offsets index the UTF-8 *text*; ``None`` when the body is not a JSON
    object.  Later duplicates win, as in ``json.loads``.
    """
    try:
        return top_level_members(body.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        return None


def replace_json_model(body: bytes, model: str) -> bytes:
    """``body`` with its top-level ``model`` value set to ``model``.

    Every other byte is kept.  A body without a ``model`` member gets one
    inserted first; a body that is not a JSON object is returned unchanged.
    """
    text = body.decode("utf-8", "strict") if body else ""
    try:
        members = top_level_members(text)
    except ValueError:
        return body
    encoded = json.dumps(model, ensure_ascii=False)
    if "model" in members:
        _, start, end = members["model"]
        return (text[:start] + encoded + text[end:]).encode("utf-8")
    brace = text.index("{")
    sep = "," if members else ""
    return (text[: brace + 1] + '"model":' + encoded + sep + text[brace + 1 :]).encode("utf-8")


_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?', re.IGNORECASE)
_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)


def _scan(content_type: bytes, body: bytes) -> tuple[list[tuple[bytes, int, int]], str]:
    """The parts of a multipart body as (name, content_start, content_end),
    and why the body does not parse ("" when it does)."""
    found = _BOUNDARY.search(content_type)
    if not found:
        return [], "the Content-Type has no boundary"
    delimiter = b"--" + found.group(1).strip()
    parts: list[tuple[bytes, int, int]] = []
    pos = body.find(delimiter)
    if pos == -1:
        return [], "the body is empty" if not body else "the body does not contain the boundary"
    while True:
        header_start = pos + len(delimiter)
        if body[header_start : header_start + 2] == b"--":
            return parts, ""
        header_end = body.find(b"\r\n\r\n", header_start)
        if header_end == -1:
            return parts, "a part's headers do not end"
        nxt = body.find(b"\r\n" + delimiter, header_end + 4)
        if nxt == -1:
            return parts, "the body ends before the closing boundary"
        headers = body[header_start:header_end]
        disposition = next(
            (
                line
                for line in headers.split(b"\r\n")
                if line.lower().startswith(b"content-disposition:")
            ),
            b"",
        )
        name = _NAME.search(disposition)
        if name:
            parts.append((name.group(1), header_end + 4, nxt))
        pos = nxt + 2


def _parts(content_type: bytes, body: bytes) -> list[tuple[bytes, int, int]]:
    """The parts of a multipart body that could be read."""
    return _scan(content_type, body)[0]


def _fields(
    parts: list[tuple[bytes, int, int]], body: bytes, names: tuple[bytes, ...]
) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for name, start, end in parts:
        if name in names and name not in out:
            out[name] = body[start:end]
    return out


def multipart_fields(
    content_type: bytes, body: bytes, names: tuple[bytes, ...]
) -> dict[bytes, bytes]:
    """Values of the named (small, non-file) fields of a multipart body."""
    return _fields(_parts(content_type, body), body, names)


def replace_multipart_model(content_type: bytes, body: bytes, model: str) -> bytes:
    """``body`` with the content of its ``model`` part replaced, in place."""
    for name, start, end in _parts(content_type, body):
        if name == b"model":
            return body[:start] + model.encode("utf-8") + body[end:]
    return body


def replace_form_model(body: bytes, model: str) -> bytes:
    """An urlencoded body with ``model`` replaced (other pairs kept verbatim)."""
    pairs = body.split(b"&") if body else []
    new = b"model=" + quote_plus(model).encode()
    out = [new if p.split(b"=", 1)[0] == b"model" else p for p in pairs]
    if new not in out:
        out.append(new)
    return b"&".join(out)
