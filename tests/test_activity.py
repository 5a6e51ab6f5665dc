"""Tests for activity rows and their queries: llamaswap.observe.activity and
llamaswap.observe.queries (the activity ring, queries, pages and stats)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.observe.activity import ActivityEntry, format_timestamp
from llamaswap.observe.queries import (
    ActivityLog,
    ActivityQuery,
    activity_page_json,
    histogram,
    parse_activity_query,
    parse_rfc3339,
)
from llamaswap.observe.usage import TokenMetrics, Usage

SSE = "text/event-stream"
JSON = "application/json"


def tokens(
    input_tokens: int,
    output_tokens: int,
    cache: int = -1,
    prompt_speed: float = -1.0,
    gen_speed: float = -1.0,
    draft: int = -1,
    accepted: int = -1,
) -> TokenMetrics:
    return TokenMetrics(
        cache_tokens=cache,
        draft_tokens=draft,
        draft_acc_tokens=accepted,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        prompt_per_second=prompt_speed,
        tokens_per_second=gen_speed,
    )


def usage_of(
    input_tokens: int = 0,
    output_tokens: int = 0,
    cache: int = -1,
    prompt_speed: float = -1.0,
    gen_speed: float = -1.0,
    error_msg: str = "",
) -> Usage:
    return Usage(
        tokens=tokens(input_tokens, output_tokens, cache, prompt_speed, gen_speed),
        error_msg=error_msg,
    )


def filled_log(has_capture: Callable[[int], bool] = lambda _id: False) -> ActivityLog:
    """Four rows, ids 1..4 at t=1000..1003, models m1/m2/m1/m3."""
    log = ActivityLog(has_capture=has_capture)
    for i, model in enumerate(["m1", "m2", "m1", "m3"]):
        log.add(
            model=model,
            req_path="/v1/chat/completions" if i % 2 else "/v1/messages",
            resp_content_type=JSON,
            resp_status_code=200,
            usage=usage_of(10 * (i + 1), [5, 9, 1, 9][i], prompt_speed=float(4 - i)),
            wall_ms=100 * (4 - i),
            timestamp=1000 + i + 0.25,
        )
    return log


def run_query(log: ActivityLog, **fields: Any) -> tuple[list[ActivityEntry], int]:
    """``log``'s answer to the `ActivityQuery` made of ``fields``."""
    return log.select(ActivityQuery(**fields))


def ids(rows: Iterable[object]) -> list[int]:
    return [row.id for row in rows]  # type: ignore[attr-defined]


class ActivityLogTests(SynchronousTestCase):
    """The activity ring: rows, ids, queries, validation and stats."""

    def test_add_assigns_ids_and_builds_row(self) -> None:
        """Rows get ids from 1; duration is max(wall, timings); error and metadata kept."""
        log = ActivityLog()
        first = log.add(
            model="llama",
            req_path="/v1/chat/completions",
            resp_content_type=SSE,
            resp_status_code=200,
            usage=Usage(tokens=tokens(5, 6), timings_duration_ms=900),
            wall_ms=120,
            timestamp=1718000000.5,
            metadata={"fifo_priority": "10"},
        )
        second = log.add(
            model="llama",
            req_path="/v1/chat/completions",
            resp_content_type=JSON,
            resp_status_code=503,
            usage=Usage(error_msg="Loading model"),
            wall_ms=40,
            timestamp=1718000001,
        )
        self.assertEqual((first.id, second.id), (1, 2))
        self.assertEqual((first.duration_ms, second.duration_ms), (900, 40))
        self.assertEqual(
            first.to_json(),
            {
                "id": 1,
                "timestamp": "2024-06-10T06:13:20.5Z",
                "model": "llama",
                "req_path": "/v1/chat/completions",
                "resp_content_type": SSE,
                "resp_status_code": 200,
                "tokens": {
                    "cache_tokens": -1,
                    "draft_tokens": -1,
                    "draft_acc_tokens": -1,
                    "input_tokens": 5,
                    "output_tokens": 6,
                    "prompt_per_second": -1.0,
                    "tokens_per_second": -1.0,
                },
                "duration_ms": 900,
                "has_capture": False,
                "metadata": {"fifo_priority": "10"},
            },
        )
        row = second.to_json()
        self.assertEqual(row["error_msg"], "Loading model")
        self.assertNotIn("metadata", row)
        self.assertNotIn("error_msg", first.to_json())
        self.assertEqual(row["timestamp"], "2024-06-10T06:13:21Z")

    def test_ring_keeps_newest_rows(self) -> None:
        """Beyond max_rows the oldest rows go; ids keep increasing."""
        log = ActivityLog(max_rows=3)
        for i in range(5):
            log.add(
                model="m",
                req_path="/v1/completions",
                resp_content_type=JSON,
                resp_status_code=200,
                usage=Usage(),
                wall_ms=1,
                timestamp=float(i),
            )
        self.assertEqual(len(log), 3)
        self.assertEqual(ids(log.recent()), [3, 4, 5])
        self.assertEqual(ids(log.recent(2)), [4, 5])
        self.assertEqual(log.recent(0), [])

    def test_filters(self) -> None:
        """Models (OR), inclusive time and id bounds, combined with AND (as llama-swap's tests)."""
        log = filled_log()
        cases = [
            (dict(models=["m1", "m3"]), [4, 3, 1]),
            (dict(models=["m2"]), [2]),
            (dict(models=[" ", "m2 "]), [2]),
            (dict(min_id=2, max_id=3), [3, 2]),
            (dict(min_id=4), [4]),
            (dict(max_id=2), [2, 1]),
            (dict(models=["m1"], min_id=2), [3]),
            (dict(start=1002.0), [4, 3]),
            (dict(end=1001.0), [2, 1]),
            (dict(start=1001.0, end=1002.0), [3, 2]),
            (dict(start=1000.0, end=1003.0, models=["m1"]), [3, 1]),
            (dict(start=1000.0, min_id=3), [4, 3]),
            ({}, [4, 3, 2, 1]),
        ]
        for kwargs, expected in cases:
            rows, total = run_query(log, **kwargs)
            self.assertEqual((ids(rows), total), (expected, len(expected)), kwargs)

    def test_sort_and_order(self) -> None:
        """Every sort column works; ties fall back to id in the same direction."""
        log = filled_log()
        self.assertEqual(ids(run_query(log, sort="generated", order="asc")[0]), [3, 1, 2, 4])
        self.assertEqual(ids(run_query(log, sort="generated", order="DESC")[0]), [4, 2, 1, 3])
        self.assertEqual(ids(run_query(log, sort="model", order="asc")[0]), [1, 3, 2, 4])
        self.assertEqual(ids(run_query(log, sort="duration", order="asc")[0]), [4, 3, 2, 1])
        self.assertEqual(ids(run_query(log, sort="prompt_speed")[0]), [1, 2, 3, 4])
        self.assertEqual(ids(run_query(log, sort="time", order="asc")[0]), [1, 2, 3, 4])
        self.assertEqual(ids(run_query(log, sort="req_path", order="asc")[0]), [2, 4, 1, 3])
        for column in (
            "id",
            "resp_status_code",
            "resp_content_type",
            "cached",
            "prompt",
            "drafted",
            "gen_speed",
        ):
            rows, total = run_query(log, sort=column)
            self.assertEqual((len(rows), total), (4, 4), column)

    def test_paging(self) -> None:
        """limit and page select a window; total counts every match."""
        log = filled_log()
        query = ActivityQuery(limit=3, page=2)
        rows, total = log.select(query)
        self.assertEqual((ids(rows), total), ([1], 4))
        page = activity_page_json(rows, total, query)
        self.assertEqual(
            {k: v for k, v in page.items() if k != "data"},
            {"page": 2, "limit": 3, "total": 4, "total_pages": 2},
        )
        self.assertEqual(page["data"][0]["id"], 1)
        empty = activity_page_json([], 0, ActivityQuery())
        self.assertEqual((empty["data"], empty["total_pages"]), ([], 0))
        self.assertEqual(run_query(log, page=9), ([], 4))

    def test_validation_messages(self) -> None:
        """Invalid arguments raise ValueError with llama-swap's 400 messages."""
        log = filled_log()
        cases = [
            (dict(limit=0), "limit must be between 1 and 999"),
            (dict(limit=1000), "limit must be between 1 and 999"),
            (dict(page=0), "page must be >= 1"),
            (dict(min_id=0), "min_id must be >= 1"),
            (dict(max_id=-1), "max_id must be >= 1"),
            (dict(min_id=9, max_id=2), "min_id must be <= max_id"),
            (dict(start=2.0, end=1.0), "start must be before end"),
            (dict(sort="bogus"), "invalid sort column"),
            (dict(order="up"), "order must be asc or desc"),
        ]
        for kwargs, message in cases:
            with self.assertRaises(ValueError) as raised:
                run_query(log, **kwargs)  # type: ignore[arg-type]
            self.assertEqual(str(raised.exception), message)
        self.assertEqual(len(run_query(log, limit=999)[0]), 4)

    def test_parse_query_arguments(self) -> None:
        """Query arguments as Twisted gives them (bytes lists) become an ActivityQuery."""
        query = parse_activity_query(
            {
                b"model": [b"m1", b"m3", b" "],
                b"start": [b"2024-06-10T06:13:20Z"],
                b"end": [b"2024-06-10T08:13:20.123456789+02:00"],
                b"min_id": [b"2"],
                b"limit": [b"10"],
                b"page": [b"3"],
                b"sort": [b"gen_speed"],
                b"order": [b"ASC"],
            }
        )
        assert query.end is not None
        self.assertAlmostEqual(query.end, 1718000000.123456, places=5)
        self.assertEqual(
            dataclasses.replace(query, end=None),
            ActivityQuery(
                models=("m1", "m3"),
                start=1718000000.0,
                min_id=2,
                limit=10,
                page=3,
                sort="gen_speed",
                order="asc",
            ),
        )
        self.assertEqual(parse_activity_query({}), ActivityQuery())

    def test_parse_query_errors(self) -> None:
        """Bad argument text raises the messages llama-swap answers with."""
        cases = [
            ({"min_id": ["abc"]}, "min_id must be >= 1"),
            ({"max_id": ["0"]}, "max_id must be >= 1"),
            ({"min_id": ["-1"]}, "min_id must be >= 1"),
            ({"min_id": ["9"], "max_id": ["2"]}, "min_id must be <= max_id"),
            ({"start": ["nonsense"]}, "invalid 'start' timestamp, use RFC3339 format"),
            ({"end": ["2026-01-01"]}, "invalid 'end' timestamp, use RFC3339 format"),
            (
                {"start": ["2026-02-01T00:00:00Z"], "end": ["2026-01-01T00:00:00Z"]},
                "start must be before end",
            ),
            ({"limit": ["ten"]}, "invalid limit"),
            ({"limit": ["0"]}, "limit must be between 1 and 999"),
            ({"page": ["x"]}, "page must be >= 1"),
            ({"sort": ["nope"]}, "invalid sort column"),
            ({"order": ["sideways"]}, "order must be asc or desc"),
        ]
        for args, message in cases:
            with self.assertRaises(ValueError) as raised:
                parse_activity_query(args)
            self.assertEqual(str(raised.exception), message, args)

    def test_rfc3339(self) -> None:
        """RFC 3339 timestamps parse with zones and fractions; other forms are refused."""
        self.assertEqual(parse_rfc3339("1970-01-01T00:00:10Z"), 10.0)
        self.assertEqual(parse_rfc3339("1970-01-01t01:00:10.5+01:00"), 10.5)
        for bad in ("1970-01-01", "1970-01-01T00:00:10", "1970-01-01 00:00:10Z", "yesterday"):
            self.assertRaises(ValueError, parse_rfc3339, bad)
        self.assertEqual(format_timestamp(10.0), "1970-01-01T00:00:10Z")
        self.assertEqual(format_timestamp(10.25), "1970-01-01T00:00:10.25Z")

    def test_has_capture_is_live(self) -> None:
        """has_capture comes from the predicate at read time, not from when the row was added."""
        captured = {2, 3}
        log = filled_log(has_capture=lambda i: i in captured)
        self.assertEqual([r.has_capture for r in log.recent()], [False, True, True, False])
        captured.discard(2)
        rows, _ = run_query(log, min_id=2, max_id=2)
        self.assertFalse(rows[0].has_capture)

    def test_stats_totals(self) -> None:
        """Totals per model; only positive cache counts are summed (as llama-swap's test)."""
        log = ActivityLog()
        for model, usage in [
            ("m1", usage_of(1, 2, 1, 10, 20)),
            ("m1", usage_of(3, 4, -1, 30, 40)),
            ("m2", usage_of(5, 6, -1, 50, 0)),
        ]:
            log.add(
                model=model,
                req_path="/v1/chat/completions",
                resp_content_type=JSON,
                resp_status_code=200,
                usage=usage,
                wall_ms=1,
                timestamp=1.0,
            )
        stats = log.stats(model=" m1 ").to_json()
        self.assertEqual(
            (
                stats["total_requests"],
                stats["total_input_tokens"],
                stats["total_output_tokens"],
                stats["total_cache_tokens"],
            ),
            (2, 4, 6, 1),
        )
        self.assertIsNotNone(stats["prompt_histogram"])
        self.assertIsNotNone(stats["gen_histogram"])
        everything = log.stats().to_json()
        self.assertEqual(everything["total_requests"], 3)
        self.assertEqual(everything["gen_histogram"]["bins"], [1, 0, 0, 0, 1])
        self.assertEqual(log.stats("m2").to_json()["gen_histogram"], None)
        self.assertEqual(
            ActivityLog().stats().to_json(),
            {
                "total_requests": 0,
                "total_input_tokens": 0,
                "total_output_tokens": 0,
                "total_cache_tokens": 0,
                "prompt_histogram": None,
                "gen_histogram": None,
            },
        )

    def test_histogram(self) -> None:
        """Sturges bins clamped to 5..20, single bin for equal values, interpolated percentiles."""
        self.assertIsNone(histogram([]))
        single = histogram([7.0, 7.0, 7.0])
        assert single is not None
        self.assertEqual(
            single.to_json(),
            {
                "bins": [3],
                "min": 7.0,
                "max": 7.0,
                "binSize": 0.0,
                "p50": 7.0,
                "p95": 7.0,
                "p99": 7.0,
            },
        )
        values = [float(v) for v in range(1, 101)]
        hundred = histogram(values)
        assert hundred is not None
        self.assertEqual(len(hundred.bins), 8)  # ceil(log2 100) + 1
        self.assertEqual(sum(hundred.bins), 100)
        self.assertAlmostEqual(hundred.bin_size, 99 / 8)
        self.assertAlmostEqual(hundred.p50, 50.5)
        self.assertAlmostEqual(hundred.p95, 95.05)
        self.assertAlmostEqual(hundred.p99, 99.01)
        many = histogram([float(v) for v in range(600_000)])
        assert many is not None
        self.assertEqual(len(many.bins), 20)
        two = histogram([1.0, 2.0])
        assert two is not None
        self.assertEqual((two.bins, two.p50), ((1, 0, 0, 0, 1), 1.5))
