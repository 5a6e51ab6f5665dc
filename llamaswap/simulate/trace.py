"""Request traces: what the simulator replays.

Two formats, told apart by the file's first bytes:

- the activity store's SQLite file (``store.path``; llama-swap's ``activity``
  table, :mod:`llamaswap.observe.activitysql`): one request per row, arriving
  at its timestamp.  The row's ``duration_ms`` is wall time from arrival to
  the end of the response, waiting included; where the upstream reported its
  speeds (llama.cpp ``timings``), the serving time is computed from them
  (prompt tokens not from the cache ÷ prompt speed + generated tokens ÷
  generation speed) and the rest is what the request waited.
- JSON lines: ``{"model": "a", "arrival": 12.5, "duration": 3.0}`` per line,
  seconds (``arrival`` on any origin, e.g. epoch seconds).

Load times "learned from the store": a request that waited a second or more
most likely waited for its model to start, so a model's load time is the
median of those waits (:func:`learned_load_times`).  A rough figure: give
``--load-time`` where you know better.
"""

from __future__ import annotations

import json
import math
import sqlite3
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Request", "TraceError", "learned_load_times", "read_trace", "service_seconds"]

_SQLITE_MAGIC = b"SQLite format 3\x00"
#: a wait at least this long (seconds) is taken for a wait on a model start.
LOAD_WAIT_THRESHOLD = 1.0


class TraceError(Exception):
    """The trace cannot be read; the message is one line naming the file."""


@dataclass(frozen=True)
class Request:
    """One request of a trace: ``duration`` seconds of serving once granted."""

    model: str
    arrival: float
    duration: float
    #: seconds it waited before being served, when the trace says (store rows
    #: with upstream timings); ``None`` otherwise.
    waited: float | None = None


def read_trace(path: str) -> list[Request]:
    """The requests of the trace at ``path``, by arrival (file order among
    equal arrivals)."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace ({exc.strerror or exc})") from None
    requests = _read_store(path) if head == _SQLITE_MAGIC else _read_json_lines(path)
    return sorted(requests, key=lambda request: request.arrival)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _read_json_lines(path: str) -> list[Request]:
    requests = []
    try:
        with open(path, encoding="utf-8") as stream:
            lines = list(stream)
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError:
            raise TraceError(
                f"{where}: not JSON (expected one object per line, or the store's SQLite file)"
            ) from None
        if not isinstance(row, dict):
            raise TraceError(f'{where}: expected an object {{"model", "arrival", "duration"}}')
        model = row.get("model")
        if not isinstance(model, str) or not model:
            raise TraceError(f"{where}: model must be a non-empty string")
        arrival = _number(row.get("arrival"))
        if arrival is None:
            raise TraceError(f"{where}: arrival must be a number of seconds")
        duration = _number(row.get("duration"))
        if duration is None or duration < 0:
            raise TraceError(f"{where}: duration must be a number of seconds >= 0")
        requests.append(Request(model, arrival, duration))
    return requests


def service_seconds(
    duration_ms: int,
    input_tokens: int,
    cache_tokens: int,
    output_tokens: int,
    prompt_per_second: float,
    tokens_per_second: float,
) -> float | None:
    """The serving time of a store row from the upstream's speeds, ``None``
    when it reported none (at most the row's wall time)."""
    if tokens_per_second <= 0 and prompt_per_second <= 0:
        return None
    seconds = 0.0
    if tokens_per_second > 0 and output_tokens > 0:
        seconds += output_tokens / tokens_per_second
    prompt = input_tokens - max(cache_tokens, 0)
    if prompt_per_second > 0 and prompt > 0:
        seconds += prompt / prompt_per_second
    return min(seconds, max(duration_ms, 0) / 1000)


def _read_store(path: str) -> list[Request]:
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise TraceError(f"{path}: cannot open the store ({exc})") from None
    try:
        rows = connection.execute(
            "SELECT COALESCE(ts_precise, ts_created), model_id, duration_ms, input_tokens,"
            " cache_tokens, output_tokens, prompt_per_second, tokens_per_second"
            " FROM activity ORDER BY id"
        ).fetchall()
    except sqlite3.Error as exc:
        raise TraceError(f"{path}: not an activity store ({exc})") from None
    finally:
        connection.close()
    requests = []
    for arrival, model, duration_ms, prompt, cached, output, pps, tps in rows:
        wall = max(int(duration_ms or 0), 0) / 1000
        served = service_seconds(
            int(duration_ms or 0),
            int(prompt or 0),
            int(cached or 0),
            int(output or 0),
            float(pps or 0),
            float(tps or 0),
        )
        if served is None:
            requests.append(Request(str(model), float(arrival), wall))
        else:
            requests.append(Request(str(model), float(arrival), served, wall - served))
    return requests


def learned_load_times(requests: Iterable[Request]) -> dict[str, float]:
    """Per model, the median of the waits of at least
    :data:`LOAD_WAIT_THRESHOLD` seconds (models without one are absent)."""
    waits: defaultdict[str, list[float]] = defaultdict(list)
    for request in requests:
        if request.waited is not None and request.waited >= LOAD_WAIT_THRESHOLD:
            waits[request.model].append(request.waited)
    return {model: statistics.median(found) for model, found in sorted(waits.items())}
