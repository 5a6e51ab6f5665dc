"""`UsageParser`: one response body in, one `Usage` out, incrementally.

The proxy tees every chunk of a recorded response into a `UsageParser` while
it streams to the client; when the response ends, `UsageParser.finish` gives
the `Usage` that becomes the request's activity row.  Nothing here touches
the reactor or does I/O, and memory per request is bounded: the bytes are
read by `llamaswap.observe.bodies`, their meaning found by
`llamaswap.observe.usage`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llamaswap.observe.bodies import (
    JSON_CAP,
    SSE_LINE_CAP,
    TAIL_CAP,
    BoundedBody,
    DecompressionError,
    EventStreamLines,
    Inflater,
)
from llamaswap.observe.usage import (
    StreamUsage,
    Usage,
    body_usage,
    error_message,
    loads_strict,
    tail_usage,
)

__all__ = ["UsageParser"]


class UsageParser:
    """Incrementally parses one response body for activity metrics.

    Feed it every body chunk as it is forwarded (the proxy's tee observer),
    then call `finish` once when the response has ended (or was cut short):
    the partial body is parsed as far as it goes.  ``decoded_sink``, when
    given, receives the decoded body pieces (for a capture) as they are
    produced.

    What is kept, per body kind:

    * status 200 and ``text/event-stream``: only the current line (lines over
      ``line_cap`` are skipped) and the latest usage counts, ``timings`` and
      ``metrics`` objects.
    * anything else: nothing if the body does not start (after whitespace)
      with ``{`` or ``[``; otherwise the whole body up to ``json_cap``, parsed
      exactly as llama-swap does.  Past ``json_cap`` the head is dropped and
      only the last ``tail_cap`` bytes are kept; `finish` then takes, for each
      of ``usage``, ``timings`` and ``metrics``, the last ``"key": {...}`` in
      the tail that decodes as a complete JSON object (`last_object_for`).
      For a non-200 body over ``json_cap`` no message is extracted and the
      status text is used.
    """

    def __init__(
        self,
        path: str,
        status: int,
        content_type: str = "",
        content_encoding: str = "",
        *,
        decoded_sink: Callable[[bytes], None] | None = None,
        json_cap: int = JSON_CAP,
        tail_cap: int = TAIL_CAP,
        line_cap: int = SSE_LINE_CAP,
    ) -> None:
        self.path = path
        self.status = status
        self._decoded_sink = decoded_sink
        encoding = content_encoding.strip().lower()
        self._inflater = Inflater(encoding) if encoding in ("gzip", "x-gzip", "deflate") else None
        self._events: StreamUsage | None = None
        self._stream: EventStreamLines | None = None
        self._body: BoundedBody | None = None
        if status == 200 and "text/event-stream" in content_type.lower():
            self._events = StreamUsage()
            self._stream = EventStreamLines(line_cap, self._events.add_event)
        else:
            self._body = BoundedBody(json_cap, tail_cap)
        self._received = 0
        self._decode_error: str | None = None
        self._result: Usage | None = None

    @property
    def received_bytes(self) -> int:
        """Body bytes fed so far, as sent by the upstream (before decoding)."""
        return self._received

    @property
    def buffered_bytes(self) -> int:
        """Bytes the parser currently holds (for tests of the memory bound)."""
        held = self._stream.buffered if self._stream is not None else 0
        if self._body is not None:
            held += self._body.buffered
        return held

    def feed(self, chunk: bytes) -> None:
        """Take the next body chunk; never raises for bad data."""
        if self._result is not None or self._decode_error is not None or not chunk:
            return
        self._received += len(chunk)
        if self._inflater is None:
            self._on_decoded(chunk)
            return
        try:
            for piece in self._inflater.decode(chunk):
                self._on_decoded(piece)
        except DecompressionError as e:
            self._decode_error = str(e)

    def finish(self) -> Usage:
        """Parse what was received; later calls return the same `Usage`."""
        if self._result is None:
            self._result = self._finish()
        return self._result

    def _on_decoded(self, data: bytes) -> None:
        if self._decoded_sink is not None:
            self._decoded_sink(data)
        if self._stream is not None:
            self._stream.feed(data)
        elif self._body is not None:
            self._body.feed(data)

    def _finish(self) -> Usage:
        if self._inflater is not None and self._decode_error is None and self._received:
            try:
                for piece in self._inflater.finish():
                    self._on_decoded(piece)
            except DecompressionError as e:
                self._decode_error = str(e)
        if self.status != 200:
            return self._finish_failed()
        if self._received == 0:
            return Usage(warning="empty body")
        if self._decode_error is not None:
            return Usage(error_msg=f"response decompression failed: {self._decode_error}")
        if self._stream is not None and self._events is not None:
            self._stream.finish()
            return self._events.usage()
        assert self._body is not None
        return self._finish_body(self._body)

    def _finish_failed(self) -> Usage:
        if self._decode_error is not None:
            return Usage(error_msg=f"response decode failed: {self._decode_error}")
        body: Any = None
        assert self._body is not None
        if not self._body.overflowed and not self._body.not_json and self._body.buffered:
            try:
                body = loads_strict(self._body.value())
            except ValueError:
                body = None
        return Usage(error_msg=error_message(self.status, body))

    def _finish_body(self, body: BoundedBody) -> Usage:
        if body.not_json:
            return Usage(warning="response body is not JSON")
        if body.overflowed:
            return tail_usage(body.value())
        try:
            parsed = loads_strict(body.value())
        except ValueError:
            return Usage(warning="invalid JSON in response body")
        return body_usage(parsed, self.path)
