"""What a response said about its token use: values and extraction from JSON.

`Usage` is what one response told us (token counts, speeds, an error
message); `TokenMetrics` is the ``tokens`` object of an activity row.  The
functions here read them out of already decoded JSON, across the API styles
llama-swap understands: OpenAI ``usage`` (chat, completions, responses),
Anthropic ``usage``, llama.cpp ``timings`` and vLLM ``metrics``, with
gjson's lenient number conversions.  Nothing here sees raw bytes: the
incremental reading of a body is `llamaswap.observe.usageparser`'s.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

__all__ = [
    "ERROR_MSG_CAP",
    "MINIMAL_TOKENS",
    "StreamUsage",
    "TokenMetrics",
    "Usage",
    "body_usage",
    "error_message",
    "last_object_for",
    "loads_strict",
    "tail_usage",
    "upstream_error_text",
]

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


def loads_strict(data: bytes | str) -> Any:
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
# Reading decoded JSON, with gjson's lenient conversions


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


_TAIL_KEYS = {
    key: re.compile(r'"' + key + r'"\s*:\s*(?=\{)') for key in ("usage", "timings", "metrics")
}


def last_object_for(tail: bytes, key: str) -> dict[str, Any] | None:
    """The last ``"key": {...}`` object that is complete, valid JSON in ``tail``.

    Used for bodies over ``JSON_CAP``, where only the tail is kept: like the Rust
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
# Whole bodies, stream events and tails


class StreamUsage:
    """The usage figures of an event stream, gathered event by event.

    Later events win: counts that are reported (above 0, or a cached count
    of 0 and up) replace earlier ones, and the last ``timings`` and
    ``metrics`` objects are kept.
    """

    def __init__(self) -> None:
        self.input = 0
        self.output = 0
        self.cached = -1
        self.found = False
        self.timings: dict[str, Any] | None = None
        self.metrics: dict[str, Any] | None = None

    def add_event(self, data: bytes) -> None:
        """Take the payload of one ``data:`` line; anything that is not a
        JSON object carrying usage, timings or metrics is ignored."""
        if not any(key in data for key in _INTERESTING):
            return  # cannot hold usage, timings or metrics; skip the JSON parse
        try:
            event = loads_strict(data)
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

    def usage(self) -> Usage:
        """The stream's `Usage` (a warning only, when no event carried any)."""
        if not self.found:
            return Usage(warning="no usage, timings or metrics found in event stream")
        return _build_usage(self.input, self.output, self.cached, self.timings, self.metrics)


def body_usage(parsed: Any, path: str) -> Usage:
    """The `Usage` of a whole, decoded JSON response body to ``path``.

    ``/infill`` answers with an array whose last element holds the timings.
    """
    usage = _get_object(parsed, "usage")
    timings = _get_object(parsed, "timings")
    metrics = _get_object(parsed, "metrics")
    if path.startswith("/infill") and isinstance(parsed, list) and parsed:
        timings = _get_object(parsed[-1], "timings")
    if usage is None and timings is None and metrics is None:
        return Usage(warning="no usage, timings or metrics in response body")
    counts = _usage_tokens(usage)
    return _build_usage(counts.input, counts.output, counts.cached, timings, metrics)


def tail_usage(tail: bytes) -> Usage:
    """The `Usage` found in the last bytes of a body too large to keep whole."""
    usage = last_object_for(tail, "usage")
    timings = last_object_for(tail, "timings")
    metrics = last_object_for(tail, "metrics")
    if usage is None and timings is None and metrics is None:
        return Usage(warning="response body over the parse cap; no usage found in its tail")
    counts = _usage_tokens(usage)
    return _build_usage(counts.input, counts.output, counts.cached, timings, metrics)


# --------------------------------------------------------------------------
# Error bodies


def upstream_error_text(body: Any) -> str | None:
    """The message in a decoded upstream error body, or ``None``.

    Looks, in order, at ``error.message`` (OpenAI's envelope), ``error`` (a
    bare string), ``message`` and ``detail`` (FastAPI); the first non-blank
    string wins, stripped.  The one reader of error bodies: activity rows and
    the loading stream's error event both use it.
    """
    for path in _ERROR_PATHS:
        exists, value = _get(body, path)
        if exists and isinstance(value, str) and value.strip():
            return value.strip()
    return None


def error_message(status: int, body: Any) -> str:
    """The ``error_msg`` of a non-200 row: a message from the JSON body (cut
    to `ERROR_MSG_CAP` characters), else the status."""
    message = upstream_error_text(body)
    if message is not None:
        if len(message) > ERROR_MSG_CAP:
            message = message[:ERROR_MSG_CAP] + "..."
        return message
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"
