"""Byte-preserving reading and editing of a JSON object body.

A request body is edited where it stands: the bytes of the value being set or
the member being removed change, nothing else.  Number spellings (``1.50``,
``1e3``), key order, ``\\u00e9`` escapes and whitespace outside the edit stay
exactly as the client sent them, which a ``json.loads``/``json.dumps`` round
trip would not guarantee.

Paths use the dot notation of llama-swap's filters (gjson/sjson style):
``chat_template_kwargs.reasoning_effort`` names a nested member, ``\\.``
is a literal dot inside a name, and a decimal segment indexes an existing
array (``messages.0.content``).  Where a member name appears more than once
the last one is followed, as ``json.loads`` does; a leaf edit changes every
duplicate so that no parser sees a stale value.

This is the one JSON scanner that knows where each member's bytes are:
filters edit request bodies with it (`set_path`, `delete_path`), and the
proxy finds and rewrites the requested model with it (`top_level_members`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "delete_path",
    "encode_value",
    "get_path",
    "set_path",
    "split_path",
    "top_level_members",
]

_decoder = json.JSONDecoder()
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]
_WS = re.compile(r"[ \t\n\r]*")
_INDEX = re.compile(r"0|[1-9][0-9]*")


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


class _Member(NamedTuple):
    """One object member or array element, by offsets into the text.

    For array elements ``name`` is the decimal index and ``start`` equals
    ``value_start``; for object members ``start`` is the key's opening quote.
    ``value`` is the decoded value (decoding is how its end is found).  A
    tuple, not a dataclass: the proxy scans every request body's members.
    """

    name: str
    start: int
    value_start: int
    value_end: int
    value: Any


@dataclass(frozen=True)
class _Container:
    """An object or array: its brackets and its members in document order."""

    is_array: bool
    open: int
    close: int
    members: tuple[_Member, ...]

    def find(self, segment: str) -> list[_Member]:
        """Members named ``segment`` (for an array: the element at that index)."""
        if self.is_array:
            if _INDEX.fullmatch(segment) and int(segment) < len(self.members):
                return [self.members[int(segment)]]
            return []
        return [member for member in self.members if member.name == segment]


def split_path(dotted: str) -> tuple[str, ...]:
    """Path segments of ``dotted``; ``\\.`` escapes a dot and ``\\\\`` a backslash.

    Raises ``ValueError`` for an empty path or an empty segment.
    """
    segments: list[str] = []
    current: list[str] = []
    chars = iter(dotted)
    for char in chars:
        if char == "\\":
            current.append(next(chars, "\\"))
        elif char == ".":
            segments.append("".join(current))
            current = []
        else:
            current.append(char)
    segments.append("".join(current))
    if any(segment == "" for segment in segments):
        raise ValueError(f"invalid parameter path {dotted!r}")
    return tuple(segments)


def get_path(body: bytes, dotted: str, default: Any = _MISSING) -> Any:
    """The decoded value at ``dotted`` in the JSON object ``body``.

    Returns ``default`` when the path does not exist, or raises ``KeyError``
    if no default was given.  Raises ``ValueError`` if ``body`` is not a JSON
    object.
    """
    text = _text(body)
    found = _walk(text, split_path(dotted))
    if found is None:
        if default is _MISSING:
            raise KeyError(dotted)
        return default
    return found[1][-1].value


def set_path(body: bytes, dotted: str, value: object) -> bytes:
    """``body`` with the value at ``dotted`` set to ``value`` (any JSON value).

    An existing value's span is replaced in place.  A missing member is added
    as ``,"key":<json>`` after the object's last member (or right after ``{``
    for an empty object); missing intermediate objects are created, and an
    intermediate that is ``null`` or another scalar is replaced by one.  Raises
    ``ValueError`` if ``body`` is not a JSON object, ``value`` is not
    JSON-serialisable, or a segment under an array is not an index in range.
    """
    text = _text(body)
    segments = split_path(dotted)
    encoded = encode_value(value)
    container = _root(text)
    for depth, segment in enumerate(segments):
        found = container.find(segment)
        rest = segments[depth + 1 :]
        if not found:
            if container.is_array:
                raise ValueError(f"no array element {segment!r} for {dotted!r}")
            return _insert(text, container, segment, _nest(rest, encoded)).encode("utf-8")
        if not rest:
            edits = [(m.value_start, m.value_end, encoded) for m in found]
            return _apply(text, edits).encode("utf-8")
        member = found[-1]
        child = _container_at(text, member.value_start, member.value_end)
        if child is None:
            edits = [(member.value_start, member.value_end, _nest(rest, encoded))]
            return _apply(text, edits).encode("utf-8")
        container = child
    raise AssertionError("unreachable: a path has at least one segment")


def delete_path(body: bytes, dotted: str) -> bytes:
    """``body`` without the member (or array element) at ``dotted``.

    The member is removed with exactly one adjacent comma: a member followed
    by another loses everything up to that next member's key, the last member
    loses everything back to the end of the previous value.  A missing path
    returns ``body`` itself.  Raises ``ValueError`` if ``body`` is not a JSON
    object.
    """
    text = _text(body)
    segments = split_path(dotted)
    changed = False
    while True:
        found = _walk(text, segments)
        if found is None:
            break
        container, members = found
        text = _apply(text, [_removal(container, members[-1])])
        changed = True
        if container.is_array:
            break  # indices shift: a second pass would delete the next element
    return text.encode("utf-8") if changed else body


def top_level_members(text: str) -> dict[str, tuple[Any, int, int]]:
    """The top-level members of the JSON object ``text``: name -> (decoded
    value, start, end), the offsets spanning the value's text in ``text``.

    Later duplicates win, as in ``json.loads``.  Raises ``ValueError`` when
    ``text`` is not exactly one JSON object.
    """
    return {m.name: (m.value, m.value_start, m.value_end) for m in _root(text).members}


def encode_value(value: object) -> str:
    """Compact JSON text for ``value``; ``ValueError`` if it has none."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"not a JSON value ({e})") from None


# --- scanning ---


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"body is not UTF-8: {e.reason}") from None


def _skip(text: str, idx: int) -> int:
    return _WS.match(text, idx).end()  # type: ignore[union-attr]


def _root(text: str) -> _Container:
    start = _skip(text, 0)
    if text[start : start + 1] != "{":
        raise ValueError("body is not a JSON object")
    try:
        container = _scan(text, start)
    except (ValueError, IndexError) as e:
        raise ValueError(f"body is not a JSON object: {e}") from None
    if _skip(text, container.close + 1) != len(text):
        raise ValueError("body is not a JSON object: trailing data")
    return container


def _container_at(text: str, start: int, end: int) -> _Container | None:
    """The object or array whose (already validated) value spans start..end."""
    if text[start] not in "{[":
        return None
    container = _scan(text, start)
    assert container.close + 1 == end
    return container


def _scan(text: str, open_idx: int) -> _Container:
    """Member spans of the object/array opening at ``open_idx``.

    Values are delimited with ``raw_decode``, so nested containers are checked
    for validity but not split into spans until a path descends into them.
    """
    is_array = text[open_idx] == "["
    closer = "]" if is_array else "}"
    members: list[_Member] = []
    idx = _skip(text, open_idx + 1)
    if text[idx] == closer:
        return _Container(is_array, open_idx, idx, ())
    while True:
        start = idx
        if is_array:
            name = str(len(members))
        else:
            if text[idx] != '"':
                raise ValueError("expected a member name")
            name, idx = _scanstring(text, idx + 1)
            idx = _skip(text, idx)
            if text[idx] != ":":
                raise ValueError("expected ':'")
            idx = _skip(text, idx + 1)
        value, end = _decoder.raw_decode(text, idx)
        members.append(_Member(name, start, idx, end, value))
        idx = _skip(text, end)
        if text[idx] == ",":
            idx = _skip(text, idx + 1)
            continue
        if text[idx] == closer:
            return _Container(is_array, open_idx, idx, tuple(members))
        raise ValueError(f"expected ',' or '{closer}'")


def _walk(text: str, segments: Sequence[str]) -> tuple[_Container, list[_Member]] | None:
    """The container holding the leaf and the leaf's members, or ``None``."""
    container = _root(text)
    for depth, segment in enumerate(segments):
        found = container.find(segment)
        if not found:
            return None
        if depth == len(segments) - 1:
            return container, found
        member = found[-1]
        child = _container_at(text, member.value_start, member.value_end)
        if child is None:
            return None
        container = child
    return None


# --- editing ---


def _nest(segments: Sequence[str], encoded: str) -> str:
    """JSON text for ``encoded`` wrapped in one object per segment."""
    for segment in reversed(segments):
        encoded = "{" + encode_value(segment) + ":" + encoded + "}"
    return encoded


def _insert(text: str, container: _Container, name: str, encoded: str) -> str:
    member = encode_value(name) + ":" + encoded
    if container.members:
        end = container.members[-1].value_end
        return _apply(text, [(end, end, "," + member)])
    return _apply(text, [(container.open + 1, container.open + 1, member)])


def _removal(container: _Container, member: _Member) -> tuple[int, int, str]:
    """The span removing ``member`` with one adjacent comma."""
    members = container.members
    position = members.index(member)
    if len(members) == 1:
        return (member.start, member.value_end, "")
    if position + 1 < len(members):
        return (member.start, members[position + 1].start, "")
    return (members[position - 1].value_end, member.value_end, "")


def _apply(text: str, edits: Sequence[tuple[int, int, str]]) -> str:
    """Replace each (start, end) span with its text; spans must not overlap."""
    out = text
    for start, end, replacement in sorted(edits, reverse=True):
        out = out[:start] + replacement + out[end:]
    return out
