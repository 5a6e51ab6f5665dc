"""A small ``Content-Type`` parser for the hot path (RFC 9110 §8.3).

Twisted parses a POST's ``Content-Type`` with the stdlib ``email`` package,
which costs more than the rest of reading the request; llamaswap only needs
the media type and a parameter or two (``boundary``, ``charset``).  The
media type and parameter names come back lower-cased; parameter values keep
their case (a multipart boundary is case-sensitive) with quoted strings
unquoted.  Anything unparseable yields an empty media type, never an error.
"""

from __future__ import annotations

from typing import NamedTuple

#: RFC 9110 ``tchar``: the bytes a token may contain.
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_WS = b" \t"


class ContentType(NamedTuple):
    """A parsed ``Content-Type``: ``media_type`` is ``b""`` when missing or malformed."""

    media_type: bytes
    params: dict[bytes, bytes]

    def param(self, name: bytes) -> bytes | None:
        return self.params.get(name.lower())


_EMPTY = ContentType(b"", {})


def _is_token(value: bytes) -> bool:
    return bool(value) and all(c in _TCHAR for c in value)


def parse_content_type(value: bytes | None) -> ContentType:
    """Parse ``type/subtype *( OWS ";" OWS name=value )``.

    A malformed media type gives ``ContentType(b"", {})``; a malformed
    parameter is skipped (as browsers and Go's ``mime.ParseMediaType`` in
    its lenient uses do), later ones are still read.  The first occurrence
    of a parameter wins.
    """
    if not value:
        return _EMPTY
    head, sep, rest = value.partition(b";")
    media = head.strip(_WS).lower()
    kind, slash, sub = media.partition(b"/")
    if not slash or not _is_token(kind) or not _is_token(sub):
        return _EMPTY
    params: dict[bytes, bytes] = {}
    if sep:
        _parse_params(rest, params)
    return ContentType(media, params)


def _parse_params(text: bytes, params: dict[bytes, bytes]) -> None:
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in b" \t;":
            i += 1
        if i >= n:
            return
        eq = text.find(b"=", i)
        semi = text.find(b";", i)
        if eq == -1 or (semi != -1 and semi < eq):
            # "name" without "=value": skip to the next parameter
            i = n if semi == -1 else semi + 1
            continue
        name = text[i:eq].strip(_WS).lower()
        i = eq + 1
        if i < n and text[i] == 0x22:  # quoted-string
            value = bytearray()
            i += 1
            closed = False
            while i < n:
                c = text[i]
                if c == 0x5C and i + 1 < n:  # quoted-pair
                    value.append(text[i + 1])
                    i += 2
                    continue
                if c == 0x22:
                    closed = True
                    i += 1
                    break
                value.append(c)
                i += 1
            if not closed:
                return  # unterminated: nothing after it can be trusted
            end = text.find(b";", i)
            i = n if end == -1 else end
            if _is_token(name) and name not in params:
                params[name] = bytes(value)
            continue
        end = text.find(b";", i)
        raw = text[i : n if end == -1 else end].strip(_WS)
        i = n if end == -1 else end
        if _is_token(name) and _is_token(raw) and name not in params:
            params[name] = raw


def media_type(value: bytes | None) -> bytes:
    """Just the lower-cased media type (``b""`` when missing or malformed)."""
    if not value:
        return b""
    head = value.split(b";", 1)[0].strip(_WS).lower()
    kind, slash, sub = head.partition(b"/")
    if not slash or not _is_token(kind) or not _is_token(sub):
        return b""
    return head
