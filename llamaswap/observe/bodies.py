"""Reading a response body with bounded memory, as it streams past.

The proxy tees every chunk of a recorded response into a parser while it
streams to the client; memory per request stays bounded (a client's answer
can be arbitrarily long):

* `Inflater` decodes gzip/deflate in pieces of at most `INFLATE_PIECE`
  bytes, so a small compressed chunk never expands into a large buffer;
* `EventStreamLines` reads a ``text/event-stream`` line by line as it
  arrives, keeping one line of at most `SSE_LINE_CAP` bytes;
* `BoundedBody` keeps any other body whole up to `JSON_CAP`, after which
  only its last `TAIL_CAP` bytes are kept.

What the bytes *mean* is not decided here (`llamaswap.observe.usage`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "INFLATE_PIECE",
    "JSON_CAP",
    "SSE_LINE_CAP",
    "TAIL_CAP",
    "BoundedBody",
    "DecompressionError",
    "EventStreamLines",
    "Inflater",
    "narrow_accept_encoding",
]

#: A non-event-stream body is kept whole (and parsed as JSON) up to this size.
JSON_CAP = 1024 * 1024
#: Beyond `JSON_CAP`, only this many trailing bytes are kept for the usage search.
TAIL_CAP = 64 * 1024
#: An event-stream line longer than this is skipped (its bytes are not kept).
SSE_LINE_CAP = 1024 * 1024
#: Decompressed output is produced in pieces of at most this size, so a small
#: compressed chunk can never expand into a large buffer.
INFLATE_PIECE = 64 * 1024


# --------------------------------------------------------------------------
# Incremental decompression


class DecompressionError(Exception):
    """The response's Content-Encoding could not be decoded."""


class Inflater:
    """Incremental gzip/deflate decoding with bounded output pieces.

    ``deflate`` is accepted both as zlib-wrapped data (what RFC 9110 means) and
    as raw DEFLATE (what some servers send, and all Go's reader accepts): the
    first two bytes decide.  Concatenated gzip members are decoded in turn.
    """

    def __init__(self, encoding: str) -> None:
        self._gzip = encoding in ("gzip", "x-gzip")
        self._sniff = b""
        self._inflate: Any = zlib.decompressobj(16 + zlib.MAX_WBITS) if self._gzip else None
        self._done = False

    def decode(self, data: bytes) -> Iterator[bytes]:
        if self._inflate is None:
            self._sniff += data
            if len(self._sniff) < 2:
                return
            data, self._sniff = self._sniff, b""
            self._inflate = zlib.decompressobj(
                zlib.MAX_WBITS if _looks_like_zlib(data) else -zlib.MAX_WBITS
            )
        yield from self._run(data)

    def _run(self, data: bytes) -> Iterator[bytes]:
        while data and not self._done:
            try:
                out = self._inflate.decompress(data, INFLATE_PIECE)
                while out:
                    yield out
                    if len(out) < INFLATE_PIECE and not self._inflate.unconsumed_tail:
                        break
                    out = self._inflate.decompress(self._inflate.unconsumed_tail, INFLATE_PIECE)
            except zlib.error as e:
                raise DecompressionError(str(e)) from e
            if not self._inflate.eof:
                return
            if not self._gzip:
                self._done = True  # bytes after the end of a deflate stream are ignored
                return
            # A gzip body may hold several members; bytes after one start the next.
            data = self._inflate.unused_data
            if data:
                self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def finish(self) -> Iterator[bytes]:
        if self._inflate is None:
            if self._sniff:
                self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                data, self._sniff = self._sniff, b""
                yield from self._run(data)
            else:
                return
        if not self._done and not self._inflate.eof:
            raise DecompressionError("unexpected EOF")


def _looks_like_zlib(head: bytes) -> bool:
    cmf, flg = head[0], head[1]
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and ((cmf << 8) | flg) % 31 == 0


# --------------------------------------------------------------------------
# Bounded readers


class EventStreamLines:
    """Reads the ``data:`` lines of a text/event-stream as they arrive.

    ``on_data`` gets the payload of every non-empty ``data:`` line other than
    ``[DONE]``.  Only the current line is kept; a line longer than
    ``line_cap`` is skipped whole (and counted in ``skipped_lines``).
    """

    def __init__(self, line_cap: int, on_data: Callable[[bytes], None]) -> None:
        self._line_cap = line_cap
        self._on_data = on_data
        self._line = bytearray()
        self._skipping = False
        self.skipped_lines = 0

    @property
    def buffered(self) -> int:
        return len(self._line)

    def feed(self, data: bytes) -> None:
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if self._skipping:
                self._skipping = False
            elif len(self._line) + end - start > self._line_cap:
                self._line.clear()
                self.skipped_lines += 1
            elif self._line:
                self._line += data[start:end]
                line = bytes(self._line)
                self._line.clear()
                self._on_line(line)
            else:
                self._on_line(data[start:end])
            start = end + 1
        if start < len(data) and not self._skipping:
            if len(self._line) + len(data) - start > self._line_cap:
                self._line.clear()
                self._skipping = True
                self.skipped_lines += 1
            else:
                self._line += data[start:]

    def finish(self) -> None:
        """The stream ended: a last line without a newline still counts."""
        if self._line and not self._skipping:
            line = bytes(self._line)
            self._line.clear()
            self._on_line(line)

    def _on_line(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data and data != b"[DONE]":
            self._on_data(data)


class BoundedBody:
    """Keeps a body whole up to ``cap`` bytes, then only its last ``tail_cap`` bytes."""

    def __init__(self, cap: int, tail_cap: int) -> None:
        self._cap = cap
        self._tail_cap = tail_cap
        self._buffer = bytearray()
        self.overflowed = False
        self.not_json = False
        self._seen_start = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        if self.not_json:
            return
        if not self._seen_start:
            stripped = data.lstrip(b" \t\r\n")
            if not stripped:
                return  # leading whitespace only; JSON may still follow
            self._seen_start = True
            if stripped[:1] not in (b"{", b"["):
                # Not a JSON object or array (audio, images, text): nothing to
                # parse, so nothing to keep.
                self.not_json = True
                return
        limit = self._tail_cap if self.overflowed else self._cap
        if len(self._buffer) + len(data) <= limit:
            self._buffer += data
            return
        self.overflowed = True
        if len(data) >= self._tail_cap:
            self._buffer[:] = data[-self._tail_cap :]
        else:
            self._buffer += data
            del self._buffer[: len(self._buffer) - self._tail_cap]

    def value(self) -> bytes:
        return bytes(self._buffer)


# --------------------------------------------------------------------------
# What the upstream may send


def narrow_accept_encoding(value: bytes | None) -> bytes | None:
    """Keep only the gzip/deflate entries (with their parameters) of Accept-Encoding.

    ``None`` (no header) and an empty header are returned unchanged.  A header
    naming only other codings becomes ``b""``: the caller must send it empty,
    not drop it, because a missing Accept-Encoding means "any coding".
    """
    if not value:
        return value
    kept = []
    for part in value.split(b","):
        entry = part.strip()
        coding = entry.split(b";", 1)[0].strip().lower()
        if coding in (b"gzip", b"deflate"):
            kept.append(entry)
    return b", ".join(kept)
