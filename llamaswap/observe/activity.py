"""Activity metrics: token usage parsed from streamed responses, and the activity ring.

The proxy tees every chunk of a recorded response into a `UsageParser` while
it streams to the client; when the response ends, `UsageParser.finish` gives a
`Usage` that `ActivityLog.add` turns into an `ActivityEntry` (one row of
``/api/metrics/activity``).  Nothing here touches the reactor or does I/O.

Memory per request is bounded (SPEC decision 7): Server-Sent Events are parsed
line by line as they arrive (one line of at most `SSE_LINE_CAP` bytes is kept);
other bodies are kept whole only up to `JSON_CAP`, after which only the last
`TAIL_CAP` bytes are kept and usage is searched for in that tail.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

#: A non-event-stream body is kept whole (and parsed as JSON) up to this size.
JSON_CAP = 1024 * 1024
#: Beyond `JSON_CAP`, only this many trailing bytes are kept for the usage search.
TAIL_CAP = 64 * 1024
#: An event-stream line longer than this is skipped (its bytes are not kept).
SSE_LINE_CAP = 1024 * 1024
#: Decompressed output is produced in pieces of at most this size, so a small
#: compressed chunk can never expand into a large buffer.
INFLATE_PIECE = 64 * 1024
#: Error messages extracted from non-200 bodies are cut to this many characters.
ERROR_MSG_CAP = 500

_USAGE_PATHS: tuple[tuple[str, ...], ...] = (
    ("usage",),
    ("response", "usage"),
    ("message", "usage"),
)
_INTERESTING = (b'"usage"', b'"timings"', b'"metrics"')
_ERROR_PATHS: tuple[tuple[str, ...], ...] = (
    ("error", "message"),
    ("error",),
    ("message",),
    ("detail",),
)


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are not JSON; treat a body containing them as invalid, as
    # llama-swap's validator does.
    raise ValueError(f"invalid JSON constant {name}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _loads(data: bytes | str) -> Any:
    """Strict JSON: raises ValueError on anything that is not one JSON value."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return _DECODER.decode(text)


# --------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class TokenMetrics:
    """The ``tokens`` object of an activity row; −1 means "not reported"."""

    cache_tokens: int = 0
    draft_tokens: int = 0
    draft_acc_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    prompt_per_second: float = 0.0
    tokens_per_second: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "cache_tokens": self.cache_tokens,
            "draft_tokens": self.draft_tokens,
            "draft_acc_tokens": self.draft_acc_tokens,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "prompt_per_second": self.prompt_per_second,
            "tokens_per_second": self.tokens_per_second,
        }


#: The "minimal row": every figure 0 (not −1), as llama-swap records when
#: nothing could be parsed.
MINIMAL_TOKENS = TokenMetrics()


@dataclass(frozen=True)
class Usage:
    """What one response told us, ready to become an activity row.

    ``timings_duration_ms`` is llama.cpp's ``prompt_ms + predicted_ms`` (0 when
    absent); the row's duration is the larger of it and the wall time.
    ``warning`` is a note for the log when nothing could be parsed; it is not
    part of the row.
    """

    tokens: TokenMetrics = MINIMAL_TOKENS
    timings_duration_ms: int = 0
    error_msg: str = ""
    warning: str = ""

    def duration_ms(self, wall_ms: int) -> int:
        return max(wall_ms, self.timings_duration_ms)


# --------------------------------------------------------------------------
# JSON helpers mirroring gjson's lenient conversions


def _get(obj: Any, path: Sequence[str]) -> tuple[bool, Any]:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return False, None
        obj = obj[key]
    return True, obj


def _get_object(obj: Any, key: str) -> dict[str, Any] | None:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, dict) else None


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return 0.0
    return 0.0


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    number = _as_float(value)
    return int(number) if math.isfinite(number) else 0


def _speed(value: float) -> float:
    return value if math.isfinite(value) else -1.0


@dataclass(frozen=True)
class _UsageTokens:
    input: int = 0
    output: int = 0
    cached: int = -1
    found: bool = False


def _usage_tokens(usage: Any) -> _UsageTokens:
    """Token counts from one usage object, across the API styles' field names."""
    if not isinstance(usage, dict):
        return _UsageTokens()
    found = False
    input_tokens = output_tokens = 0
    cached = -1
    for key in ("prompt_tokens", "input_tokens"):
        if key in usage:
            input_tokens, found = _as_int(usage[key]), True
            break
    for key in ("completion_tokens", "output_tokens"):
        if key in usage:
            output_tokens, found = _as_int(usage[key]), True
            break
    for path in (
        ("cache_read_input_tokens",),
        ("input_tokens_details", "cached_tokens"),
        ("prompt_tokens_details", "cached_tokens"),
    ):
        exists, value = _get(usage, path)
        if exists:
            cached, found = _as_int(value), True
            break
    return _UsageTokens(input_tokens, output_tokens, cached, found)


def _build_usage(
    input_tokens: int,
    output_tokens: int,
    cached: int,
    timings: dict[str, Any] | None,
    metrics: dict[str, Any] | None,
) -> Usage:
    """Combine usage counts with llama.cpp ``timings`` and vLLM ``metrics``."""
    prompt_speed = gen_speed = -1.0
    draft = accepted = -1
    timings_ms = 0
    if timings is not None:
        input_tokens = _as_int(timings.get("prompt_n"))
        output_tokens = _as_int(timings.get("predicted_n"))
        prompt_speed = _as_float(timings.get("prompt_per_second"))
        gen_speed = _as_float(timings.get("predicted_per_second"))
        total = _as_float(timings.get("prompt_ms")) + _as_float(timings.get("predicted_ms"))
        timings_ms = int(total) if math.isfinite(total) else 0
        if "cache_n" in timings:
            cached = _as_int(timings["cache_n"])
        if "draft_n" in timings and "draft_n_accepted" in timings:
            draft = _as_int(timings["draft_n"])
            accepted = _as_int(timings["draft_n_accepted"])
    if metrics is not None:
        spec = _get_object(metrics, "speculative_decoding")
        if spec is not None and "num_draft_tokens" in spec and "num_accepted_draft_tokens" in spec:
            draft = _as_int(spec["num_draft_tokens"])
            accepted = _as_int(spec["num_accepted_draft_tokens"])
        ttft = _as_float(metrics.get("time_to_first_token_ms"))
        if ttft > 0:
            prompt_speed = (input_tokens - max(cached, 0)) / (ttft / 1000)
        itl = _as_float(metrics.get("mean_itl_ms"))
        if itl > 0:
            gen_speed = 1000 / itl
    return Usage(
        tokens=TokenMetrics(
            cache_tokens=cached,
            draft_tokens=draft,
            draft_acc_tokens=accepted,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            prompt_per_second=_speed(prompt_speed),
            tokens_per_second=_speed(gen_speed),
        ),
        timings_duration_ms=timings_ms,
    )


def error_message(status: int, body: Any) -> str:
    """The ``error_msg`` of a non-200 row: a message from the JSON body, else the status."""
    for path in _ERROR_PATHS:
        exists, value = _get(body, path)
        if exists and isinstance(value, str) and value.strip():
            message = value.strip()
            if len(message) > ERROR_MSG_CAP:
                message = message[:ERROR_MSG_CAP] + "..."
            return message
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


_TAIL_KEYS = {
    key: re.compile(r'"' + key + r'"\s*:\s*(?=\{)') for key in ("usage", "timings", "metrics")
}


def last_object_for(tail: bytes, key: str) -> dict[str, Any] | None:
    """The last ``"key": {...}`` object that is complete, valid JSON in ``tail``.

    Used for bodies over `JSON_CAP`, where only the tail is kept: like the Rust
    seed's ``last_count_for``, the last occurrence wins, so an earlier
    usage-shaped string in generated content cannot shadow the real one.  The
    tail cannot tell nesting levels apart, so a nested ``"usage"`` object that
    comes after the top-level one would win; real responses end with their
    top-level usage/timings.
    """
    text = tail.decode("utf-8", errors="replace")
    for match in reversed(list(_TAIL_KEYS[key].finditer(text))):
        try:
            value, _ = _DECODER.raw_decode(text, match.end())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


# --------------------------------------------------------------------------
# Incremental decompression


class DecompressionError(Exception):
    """The response's Content-Encoding could not be decoded."""


class _Inflater:
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
# Body sinks


class _EventStream:
    """Reads ``data:`` lines of a text/event-stream as they arrive."""

    def __init__(self, line_cap: int) -> None:
        self._line_cap = line_cap
        self._line = bytearray()
        self._skipping = False
        self.input = 0
        self.output = 0
        self.cached = -1
        self.found = False
        self.timings: dict[str, Any] | None = None
        self.metrics: dict[str, Any] | None = None
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
        if self._line and not self._skipping:
            line = bytes(self._line)
            self._line.clear()
            self._on_line(line)

    def _on_line(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            return
        if not any(key in data for key in _INTERESTING):
            return  # cannot hold usage, timings or metrics; skip the JSON parse
        try:
            event = _loads(data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        for path in _USAGE_PATHS:
            exists, usage = _get(event, path)
            if not exists:
                continue
            counts = _usage_tokens(usage)
            if not counts.found:
                continue
            self.found = True
            if counts.input > 0:
                self.input = counts.input
            if counts.output > 0:
                self.output = counts.output
            if counts.cached >= 0:
                self.cached = counts.cached
        if (timings := _get_object(event, "timings")) is not None:
            self.timings = timings
            self.found = True
        if (metrics := _get_object(event, "metrics")) is not None:
            self.metrics = metrics
            self.found = True


class _BoundedBody:
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
# The parser


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
        self._inflater = _Inflater(encoding) if encoding in ("gzip", "x-gzip", "deflate") else None
        self._stream: _EventStream | None = None
        self._body: _BoundedBody | None = None
        if status == 200 and "text/event-stream" in content_type.lower():
            self._stream = _EventStream(line_cap)
        else:
            self._body = _BoundedBody(json_cap, tail_cap)
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
        if self._stream is not None:
            return self._finish_stream(self._stream)
        assert self._body is not None
        return self._finish_body(self._body)

    def _finish_failed(self) -> Usage:
        if self._decode_error is not None:
            return Usage(error_msg=f"response decode failed: {self._decode_error}")
        body: Any = None
        assert self._body is not None
        if not self._body.overflowed and not self._body.not_json and self._body.buffered:
            try:
                body = _loads(self._body.value())
            except ValueError:
                body = None
        return Usage(error_msg=error_message(self.status, body))

    @staticmethod
    def _finish_stream(stream: _EventStream) -> Usage:
        stream.finish()
        if not stream.found:
            return Usage(warning="no usage, timings or metrics found in event stream")
        return _build_usage(
            stream.input, stream.output, stream.cached, stream.timings, stream.metrics
        )

    def _finish_body(self, body: _BoundedBody) -> Usage:
        if body.not_json:
            return Usage(warning="response body is not JSON")
        if body.overflowed:
            return self._finish_tail(body.value())
        try:
            parsed = _loads(body.value())
        except ValueError:
            return Usage(warning="invalid JSON in response body")
        usage = _get_object(parsed, "usage")
        timings = _get_object(parsed, "timings")
        metrics = _get_object(parsed, "metrics")
        if self.path.startswith("/infill") and isinstance(parsed, list) and parsed:
            timings = _get_object(parsed[-1], "timings")
        if usage is None and timings is None and metrics is None:
            return Usage(warning="no usage, timings or metrics in response body")
        counts = _usage_tokens(usage)
        return _build_usage(counts.input, counts.output, counts.cached, timings, metrics)

    @staticmethod
    def _finish_tail(tail: bytes) -> Usage:
        usage = last_object_for(tail, "usage")
        timings = last_object_for(tail, "timings")
        metrics = last_object_for(tail, "metrics")
        if usage is None and timings is None and metrics is None:
            return Usage(warning="response body over the parse cap; no usage found in its tail")
        counts = _usage_tokens(usage)
        return _build_usage(counts.input, counts.output, counts.cached, timings, metrics)


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


# --------------------------------------------------------------------------
# Activity rows


def format_timestamp(seconds: float) -> str:
    """RFC 3339 in UTC with trailing fractional zeros trimmed (Go's RFC3339Nano)."""
    moment = datetime.fromtimestamp(seconds, UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


@dataclass(frozen=True)
class ActivityEntry:
    """One activity row (llama-swap's ``ActivityLogEntry``); ``timestamp`` is epoch seconds."""

    id: int
    timestamp: float
    model: str
    req_path: str
    resp_content_type: str
    resp_status_code: int
    tokens: TokenMetrics
    duration_ms: int
    has_capture: bool = False
    error_msg: str = ""
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``/api/metrics/activity`` and ``/api/metrics`` rows."""
        row: dict[str, Any] = {
            "id": self.id,
            "timestamp": format_timestamp(self.timestamp),
            "model": self.model,
            "req_path": self.req_path,
            "resp_content_type": self.resp_content_type,
            "resp_status_code": self.resp_status_code,
            "tokens": self.tokens.to_json(),
            "duration_ms": self.duration_ms,
            "has_capture": self.has_capture,
        }
        if self.error_msg:
            row["error_msg"] = self.error_msg
        if self.metadata:
            row["metadata"] = dict(self.metadata)
        return row


_SORT_KEYS: dict[str, Callable[[ActivityEntry], Any]] = {
    "id": lambda e: e.id,
    "time": lambda e: math.floor(e.timestamp),
    "model": lambda e: e.model,
    "req_path": lambda e: e.req_path,
    "resp_status_code": lambda e: e.resp_status_code,
    "resp_content_type": lambda e: e.resp_content_type,
    "cached": lambda e: e.tokens.cache_tokens,
    "prompt": lambda e: e.tokens.input_tokens,
    "generated": lambda e: e.tokens.output_tokens,
    "drafted": lambda e: e.tokens.draft_tokens,
    "prompt_speed": lambda e: e.tokens.prompt_per_second,
    "gen_speed": lambda e: e.tokens.tokens_per_second,
    "duration": lambda e: e.duration_ms,
}
SORT_COLUMNS = frozenset(_SORT_KEYS)
MAX_LIMIT = 999


@dataclass(frozen=True)
class ActivityQuery:
    """A validated activity query; invalid values raise ValueError with llama-swap's message.

    ``start``/``end`` are epoch seconds, compared at whole-second resolution
    and inclusive, as llama-swap's store does.  ``min_id``/``max_id`` are
    inclusive.
    """

    models: tuple[str, ...] = ()
    start: float | None = None
    end: float | None = None
    min_id: int | None = None
    max_id: int | None = None
    limit: int = 25
    page: int = 1
    sort: str = "id"
    order: str = "desc"

    def __post_init__(self) -> None:
        models = tuple(m.strip() for m in self.models if m.strip())
        object.__setattr__(self, "models", models)
        if self.start is not None and self.end is not None and self.start > self.end:
            raise ValueError("start must be before end")
        for name in ("min_id", "max_id"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.min_id is not None and self.max_id is not None and self.min_id > self.max_id:
            raise ValueError("min_id must be <= max_id")
        if not 1 <= self.limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
        if self.page < 1:
            raise ValueError("page must be >= 1")
        if self.sort not in _SORT_KEYS:
            raise ValueError("invalid sort column")
        order = self.order.lower()
        if order not in ("asc", "desc"):
            raise ValueError("order must be asc or desc")
        object.__setattr__(self, "order", order)

    def matches(self, entry: ActivityEntry) -> bool:
        if self.models and entry.model not in self.models:
            return False
        second = math.floor(entry.timestamp)
        if self.start is not None and second < math.floor(self.start):
            return False
        if self.end is not None and second > math.floor(self.end):
            return False
        if self.min_id is not None and entry.id < self.min_id:
            return False
        return self.max_id is None or entry.id <= self.max_id


_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})\Z"
)


def parse_rfc3339(text: str) -> float:
    """Epoch seconds of an RFC 3339 timestamp; ValueError for anything else."""
    match = _RFC3339.match(text)
    if match is None:
        raise ValueError(text)
    date, clock, fraction, zone = match.groups()
    micro = f".{(fraction + '000000')[:6]}" if fraction else ""
    zone = "+00:00" if zone in ("Z", "z") else zone
    return datetime.fromisoformat(f"{date}T{clock}{micro}{zone}").timestamp()


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def parse_activity_query(args: Mapping[Any, Sequence[str | bytes]]) -> ActivityQuery:
    """An `ActivityQuery` from query arguments (``request.args`` works as is).

    Raises ValueError with the message llama-swap answers with ``400``.
    """
    params: dict[str, list[str]] = {}
    for key, values in args.items():
        params.setdefault(_text(key), []).extend(_text(v) for v in values)

    def one(name: str) -> str:
        values = params.get(name)
        return values[0].strip() if values else ""

    def timestamp(name: str) -> float | None:
        raw = one(name)
        if not raw:
            return None
        try:
            return parse_rfc3339(raw)
        except ValueError:
            raise ValueError(f"invalid '{name}' timestamp, use RFC3339 format") from None

    def row_id(name: str) -> int | None:
        raw = one(name)
        if not raw:
            return None
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{name} must be >= 1")
        return value

    start, end = timestamp("start"), timestamp("end")
    if start is not None and end is not None and start > end:
        raise ValueError("start must be before end")
    min_id, max_id = row_id("min_id"), row_id("max_id")
    fields: dict[str, Any] = {}
    if raw := one("limit"):
        try:
            fields["limit"] = int(raw)
        except ValueError:
            raise ValueError("invalid limit") from None
    if raw := one("page"):
        try:
            fields["page"] = int(raw)
        except ValueError:
            raise ValueError("page must be >= 1") from None
    if raw := one("sort"):
        fields["sort"] = raw
    if raw := one("order"):
        fields["order"] = raw
    return ActivityQuery(
        models=tuple(params.get("model", ())),
        start=start,
        end=end,
        min_id=min_id,
        max_id=max_id,
        **fields,
    )


def activity_page_json(
    rows: Sequence[ActivityEntry], total: int, query: ActivityQuery
) -> dict[str, Any]:
    """The body of ``GET /api/metrics/activity``."""
    return {
        "data": [row.to_json() for row in rows],
        "page": query.page,
        "limit": query.limit,
        "total": total,
        "total_pages": math.ceil(total / query.limit) if total else 0,
    }


@dataclass(frozen=True)
class Histogram:
    """A speed histogram of ``/api/metrics/stats``."""

    bins: tuple[int, ...]
    min: float
    max: float
    bin_size: float
    p50: float
    p95: float
    p99: float

    def to_json(self) -> dict[str, Any]:
        return {
            "bins": list(self.bins),
            "min": self.min,
            "max": self.max,
            "binSize": self.bin_size,
            "p50": self.p50,
            "p95": self.p95,
            "p99": self.p99,
        }


def _percentile(ordered: Sequence[float], p: float) -> float:
    if len(ordered) == 1:
        return ordered[0]
    rank = p / 100 * (len(ordered) - 1)
    lower, upper = math.floor(rank), math.ceil(rank)
    return ordered[lower] + (rank - lower) * (ordered[upper] - ordered[lower])


def histogram(values: Sequence[float]) -> Histogram | None:
    """Histogram with clamp(ceil(log2 n)+1, 5, 20) bins; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    low, high = ordered[0], ordered[-1]
    p50, p95, p99 = (_percentile(ordered, p) for p in (50, 95, 99))
    if low == high:
        return Histogram((len(values),), low, high, 0.0, p50, p95, p99)
    count = min(20, max(5, math.ceil(math.log2(len(values))) + 1))
    size = (high - low) / count
    bins = [0] * count
    for value in values:
        bins[min(math.floor((value - low) / size), count - 1)] += 1
    return Histogram(tuple(bins), low, high, size, p50, p95, p99)


@dataclass(frozen=True)
class ActivityStats:
    """The body of ``GET /api/metrics/stats``."""

    total_requests: int
    total_input_tokens: int
    total_output_tokens: int
    total_cache_tokens: int
    prompt_histogram: Histogram | None
    gen_histogram: Histogram | None

    def to_json(self) -> dict[str, Any]:
        return {
            "total_requests": self.total_requests,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "total_cache_tokens": self.total_cache_tokens,
            "prompt_histogram": self.prompt_histogram and self.prompt_histogram.to_json(),
            "gen_histogram": self.gen_histogram and self.gen_histogram.to_json(),
        }


def _never_captured(_id: int) -> bool:
    return False


class ActivityLog:
    """The newest ``max_rows`` activity rows in memory, with ids from 1 upward.

    ``has_capture`` (e.g. ``CaptureCache.has``) is asked live whenever rows are
    read, so a row whose capture was evicted reads ``has_capture: false``.
    """

    def __init__(
        self, max_rows: int = 1000, has_capture: Callable[[int], bool] = _never_captured
    ) -> None:
        if max_rows <= 0:
            max_rows = 1000
        self._rows: deque[ActivityEntry] = deque(maxlen=max_rows)
        self._next_id = 1
        self._has_capture = has_capture

    def __len__(self) -> int:
        return len(self._rows)

    def add(
        self,
        *,
        model: str,
        req_path: str,
        resp_content_type: str,
        resp_status_code: int,
        usage: Usage,
        wall_ms: int,
        timestamp: float,
        metadata: Mapping[str, str] | None = None,
    ) -> ActivityEntry:
        """Record one finished request; returns its row with the assigned id."""
        entry = ActivityEntry(
            id=self._next_id,
            timestamp=timestamp,
            model=model,
            req_path=req_path,
            resp_content_type=resp_content_type,
            resp_status_code=resp_status_code,
            tokens=usage.tokens,
            duration_ms=usage.duration_ms(wall_ms),
            error_msg=usage.error_msg,
            metadata=MappingProxyType(dict(metadata or {})),
        )
        self._next_id += 1
        self._rows.append(entry)
        return entry

    def _live(self, entries: Iterable[ActivityEntry]) -> list[ActivityEntry]:
        return [dataclasses.replace(e, has_capture=self._has_capture(e.id)) for e in entries]

    def query(
        self,
        models: Sequence[str] = (),
        start: float | None = None,
        end: float | None = None,
        min_id: int | None = None,
        max_id: int | None = None,
        limit: int = 25,
        page: int = 1,
        sort: str = "id",
        order: str = "desc",
    ) -> tuple[list[ActivityEntry], int]:
        """One page of matching rows and the number of matching rows in all."""
        return self.select(
            ActivityQuery(tuple(models), start, end, min_id, max_id, limit, page, sort, order)
        )

    def select(self, query: ActivityQuery) -> tuple[list[ActivityEntry], int]:
        """`query` for an already built `ActivityQuery`."""
        matching = [e for e in self._rows if query.matches(e)]
        key = _SORT_KEYS[query.sort]
        # The id is the secondary key, in the same direction, so pages are stable.
        matching.sort(key=lambda e: (key(e), e.id), reverse=query.order == "desc")
        offset = (query.page - 1) * query.limit
        return self._live(matching[offset : offset + query.limit]), len(matching)

    def stats(self, model: str | None = None) -> ActivityStats:
        """Totals and speed histograms, over all rows or one model's."""
        wanted = (model or "").strip()
        rows = [e for e in self._rows if not wanted or e.model == wanted]
        prompt = [e.tokens.prompt_per_second for e in rows if e.tokens.prompt_per_second > 0]
        gen = [e.tokens.tokens_per_second for e in rows if e.tokens.tokens_per_second > 0]
        return ActivityStats(
            total_requests=len(rows),
            total_input_tokens=sum(e.tokens.input_tokens for e in rows),
            total_output_tokens=sum(e.tokens.output_tokens for e in rows),
            total_cache_tokens=sum(max(e.tokens.cache_tokens, 0) for e in rows),
            prompt_histogram=histogram(prompt),
            gen_histogram=histogram(gen),
        )

    def recent(self, n: int | None = None) -> list[ActivityEntry]:
        """The newest ``n`` rows (all when None), oldest first, for ``GET /api/metrics``."""
        rows = list(self._rows)
        if n is not None:
            rows = rows[-n:] if n > 0 else []
        return self._live(rows)
