"""Finding the requested model in a request, and rewriting it, byte-exactly.

Extraction follows llama-swap: ``GET`` reads the query, JSON bodies the
top-level ``model`` member, multipart bodies the ``model`` form field,
anything else an urlencoded body field, falling back to the query.  Rewrites edit only the bytes of the ``model`` value: a JSON rewrite
never re-serialises the rest of the document (number formats, key order and
escapes stay as the client sent them); JSON bodies are read with
`llamaswap.core.jsonedit`, the scanner filters edit bodies with.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, quote_plus

from llamaswap.core.jsonedit import top_level_members


@dataclass(frozen=True)
class Extracted:
    model: str
    streaming: bool


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


def _query_value(args: dict[bytes, list[bytes]], key: bytes) -> str:
    values = args.get(key)
    return values[0].decode("utf-8", "replace") if values else ""


def extract_model(
    method: bytes, content_type: bytes, body: bytes, query: dict[bytes, list[bytes]]
) -> Extracted:
    """The requested model name and streaming flag ("" when none)."""
    if method == b"GET" or method == b"HEAD":
        return Extracted(_query_value(query, b"model"), _query_value(query, b"stream") == "true")
    ctype = content_type.lower()
    if b"application/json" in ctype:
        top = json_top_level(body)
        if top is None:
            return Extracted("", False)
        member = top.get("model")
        return Extracted(
            _scalar_text(member[0]) if member else "",
            bool(top.get("stream")) and _truthy(top["stream"][0]),
        )
    if b"multipart/form-data" in ctype:
        fields = multipart_fields(content_type, body, (b"model", b"stream"))
        model = fields.get(b"model", b"").decode("utf-8", "replace") or _query_value(
            query, b"model"
        )
        return Extracted(model, fields.get(b"stream", b"") == b"true")
    form = parse_qs(body, keep_blank_values=True) if body else {}
    model = _query_value(form, b"model") or _query_value(query, b"model")
    stream = (_query_value(form, b"stream") or _query_value(query, b"stream")) == "true"
    return Extracted(model, stream)


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


def _parts(content_type: bytes, body: bytes):
    """Yield (name, content_start, content_end) for each multipart part."""
    found = _BOUNDARY.search(content_type)
    if not found:
        return
    delimiter = b"--" + found.group(1).strip()
    pos = body.find(delimiter)
    while pos != -1:
        header_start = pos + len(delimiter)
        if body[header_start : header_start + 2] == b"--":
            return
        header_end = body.find(b"\r\n\r\n", header_start)
        if header_end == -1:
            return
        nxt = body.find(b"\r\n" + delimiter, header_end + 4)
        if nxt == -1:
            return
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
            yield name.group(1), header_end + 4, nxt
        pos = nxt + 2


def multipart_fields(
    content_type: bytes, body: bytes, names: tuple[bytes, ...]
) -> dict[bytes, bytes]:
    """Values of the named (small, non-file) fields of a multipart body."""
    out: dict[bytes, bytes] = {}
    for name, start, end in _parts(content_type, body):
        if name in names and name not in out:
            out[name] = body[start:end]
    return out


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
