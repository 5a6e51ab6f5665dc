"""Reading activity rows: queries, pages, stats, and the in-memory ring.

`ActivityQuery` is a validated ``/api/metrics/activity`` query (built from
request arguments by `parse_activity_query`, with llama-swap's error
messages); `activity_page_json` is the page it answers with.
`ActivityStats` is ``/api/metrics/stats``.  `ActivityLog` keeps the newest
rows in memory and answers both; the SQLite store answers the same
queries in SQL, with the same sort columns and the same `histogram`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from llamaswap.core.text import as_text
from llamaswap.observe.activity import ActivityEntry
from llamaswap.observe.usage import Usage

__all__ = [
    "MAX_LIMIT",
    "SORT_COLUMNS",
    "ActivityLog",
    "ActivityQuery",
    "ActivityStats",
    "Histogram",
    "activity_page_json",
    "histogram",
    "parse_activity_query",
    "parse_rfc3339",
]


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


def parse_activity_query(args: Mapping[Any, Sequence[str | bytes]]) -> ActivityQuery:
    """An `ActivityQuery` from query arguments (``request.args`` works as is).

    Raises ValueError with the message llama-swap answers with ``400``.
    """
    params: dict[str, list[str]] = {}
    for key, values in args.items():
        params.setdefault(as_text(key), []).extend(as_text(v) for v in values)

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


#: Whether the row with this id has a capture (e.g. ``CaptureCache.has``).
HasCapture = Callable[[int], bool]


def never_captured(_id: int) -> bool:
    """``has_capture`` when nothing is captured."""
    return False


class ActivityLog:
    """The newest ``max_rows`` activity rows in memory, with ids from 1 upward.

    ``has_capture`` (e.g. ``CaptureCache.has``) is asked live whenever rows are
    read, so a row whose capture was evicted reads ``has_capture: false``.
    """

    def __init__(self, max_rows: int = 1000, has_capture: HasCapture = never_captured) -> None:
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
        entry = ActivityEntry.finished(
            id=self._next_id,
            model=model,
            req_path=req_path,
            resp_content_type=resp_content_type,
            resp_status_code=resp_status_code,
            usage=usage,
            wall_ms=wall_ms,
            timestamp=timestamp,
            metadata=metadata,
        )
        self._next_id += 1
        self._rows.append(entry)
        return entry

    def _live(self, entries: Iterable[ActivityEntry]) -> list[ActivityEntry]:
        return [dataclasses.replace(e, has_capture=self._has_capture(e.id)) for e in entries]

    def select(self, query: ActivityQuery) -> tuple[list[ActivityEntry], int]:
        """One page of the rows matching ``query``, and how many match in all."""
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
