"""Activity rows in SQLite: the schema, and the statements the SQLite store runs.

The schema is llama-swap's ``activity`` table (same column names, so a
llama-swap database file can be opened as is) plus one column,
``ts_precise``: the exact epoch timestamp.  ``ts_created`` stays whole Unix
seconds, which is what filters and the ``time`` sort compare, exactly as
`ActivityQuery` does.  Queries, sorting, paging and stats follow
`ActivityLog` row for row: the same `ActivityQuery` validation, the id as
secondary sort key, and the same `histogram`.

Each statement function takes an ``adbapi`` transaction and runs on the
store's worker thread (see `llamaswap.observe.store.SqliteActivityStore`).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from twisted.enterprise import adbapi

from llamaswap.observe.activity import ActivityEntry
from llamaswap.observe.queries import SORT_COLUMNS, ActivityQuery, ActivityStats, histogram
from llamaswap.observe.usage import TokenMetrics

__all__ = [
    "INT64_MAX",
    "SCHEMA",
    "insert_entry",
    "keep_footprint",
    "read_footprints",
    "prepare_connection",
    "read_stats",
    "recent_entries",
    "select_entries",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS activity (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_created INTEGER NOT NULL,
    model_id TEXT NOT NULL,
    req_path TEXT NOT NULL DEFAULT '',
    resp_content_type TEXT NOT NULL DEFAULT '',
    resp_status_code INTEGER NOT NULL DEFAULT 0,
    cache_tokens INTEGER NOT NULL DEFAULT 0,
    draft_tokens INTEGER NOT NULL DEFAULT 0,
    draft_acc_tokens INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    prompt_per_second REAL NOT NULL DEFAULT 0,
    tokens_per_second REAL NOT NULL DEFAULT 0,
    duration_ms INTEGER NOT NULL DEFAULT 0,
    error_msg TEXT NOT NULL DEFAULT '',
    metadata_json TEXT NOT NULL DEFAULT '',
    ts_precise REAL
);
CREATE INDEX IF NOT EXISTS idx_activity_created_id
    ON activity (ts_created DESC, id DESC);
CREATE INDEX IF NOT EXISTS idx_activity_model_created_id
    ON activity (model_id, ts_created DESC, id DESC);
CREATE TABLE IF NOT EXISTS footprints (
    model_id TEXT NOT NULL,
    command TEXT NOT NULL,
    resource TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (model_id, command, resource)
);
"""

#: Sort keys of `ActivityQuery` -> columns.  Only these names reach SQL text.
_SORT_SQL: Mapping[str, str] = MappingProxyType(
    {
        "id": "id",
        "time": "ts_created",
        "model": "model_id",
        "req_path": "req_path",
        "resp_status_code": "resp_status_code",
        "resp_content_type": "resp_content_type",
        "cached": "cache_tokens",
        "prompt": "input_tokens",
        "generated": "output_tokens",
        "drafted": "draft_tokens",
        "prompt_speed": "prompt_per_second",
        "gen_speed": "tokens_per_second",
        "duration": "duration_ms",
    }
)
if set(_SORT_SQL) != SORT_COLUMNS:  # pragma: no cover - guards queries.py changes
    raise ImportError("activitysql._SORT_SQL is out of step with queries.SORT_COLUMNS")

_SELECT_ENTRIES = (
    "SELECT id, COALESCE(ts_precise, ts_created), model_id, req_path, resp_content_type,"
    " resp_status_code, cache_tokens, draft_tokens, draft_acc_tokens, input_tokens,"
    " output_tokens, prompt_per_second, tokens_per_second, duration_ms, error_msg,"
    " metadata_json FROM activity"
)

INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)


def _int64(value: int) -> int:
    # Token counts come from upstream JSON and may be absurd; SQLite holds 64 bits.
    return min(max(int(value), _INT64_MIN), INT64_MAX)


def _real(value: float) -> float:
    # NaN would be stored as NULL and break NOT NULL; speeds use -1 for "unknown".
    return float(value) if not math.isnan(value) else -1.0


_SURROGATE = re.compile("[\ud800-\udfff]")


def _sql_text(value: str) -> str:
    # Lone surrogates cannot be encoded for SQLite; store U+FFFD instead.
    return _SURROGATE.sub("\ufffd", value)


def prepare_connection(conn: sqlite3.Connection) -> None:
    """Per-connection setup on the worker thread: WAL, busy timeout, schema."""
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.executescript(SCHEMA)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(activity)")}
    if "ts_precise" not in columns:  # a database file written by llama-swap
        conn.execute("ALTER TABLE activity ADD COLUMN ts_precise REAL")
    conn.commit()


def _where(query: ActivityQuery) -> tuple[str, list[Any]]:
    conditions: list[str] = []
    args: list[Any] = []
    if query.models:
        conditions.append(f"model_id IN ({', '.join('?' * len(query.models))})")
        args.extend(_sql_text(m) for m in query.models)
    if query.start is not None:
        conditions.append("ts_created >= ?")
        args.append(_int64(math.floor(query.start)))
    if query.end is not None:
        conditions.append("ts_created <= ?")
        args.append(_int64(math.floor(query.end)))
    if query.min_id is not None:
        conditions.append("id >= ?")
        args.append(_int64(query.min_id))
    if query.max_id is not None:
        conditions.append("id <= ?")
        args.append(_int64(query.max_id))
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), args


def _order_by(query: ActivityQuery) -> str:
    column, direction = _SORT_SQL[query.sort], query.order.upper()
    if column == "id":
        return f" ORDER BY id {direction}"
    return f" ORDER BY {column} {direction}, id {direction}"


def _metadata(text: str | None) -> Mapping[str, str]:
    if not text:
        return MappingProxyType({})
    try:
        value = json.loads(text)
    except ValueError:
        return MappingProxyType({})
    if not isinstance(value, dict):
        return MappingProxyType({})
    return MappingProxyType({str(k): str(v) for k, v in value.items()})


def _entry(row: Sequence[Any]) -> ActivityEntry:
    return ActivityEntry(
        id=row[0],
        timestamp=float(row[1]),
        model=row[2],
        req_path=row[3],
        resp_content_type=row[4],
        resp_status_code=row[5],
        tokens=TokenMetrics(
            cache_tokens=row[6],
            draft_tokens=row[7],
            draft_acc_tokens=row[8],
            input_tokens=row[9],
            output_tokens=row[10],
            prompt_per_second=float(row[11]),
            tokens_per_second=float(row[12]),
        ),
        duration_ms=row[13],
        error_msg=row[14],
        metadata=_metadata(row[15]),
    )


def insert_entry(txn: adbapi.Transaction, entry: ActivityEntry) -> int:
    tokens = entry.tokens
    txn.execute(
        "INSERT INTO activity (ts_created, ts_precise, model_id, req_path,"
        " resp_content_type, resp_status_code, cache_tokens, draft_tokens,"
        " draft_acc_tokens, input_tokens, output_tokens, prompt_per_second,"
        " tokens_per_second, duration_ms, error_msg, metadata_json)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            _int64(math.floor(entry.timestamp)),
            entry.timestamp,
            _sql_text(entry.model),
            _sql_text(entry.req_path),
            _sql_text(entry.resp_content_type),
            _int64(entry.resp_status_code),
            _int64(tokens.cache_tokens),
            _int64(tokens.draft_tokens),
            _int64(tokens.draft_acc_tokens),
            _int64(tokens.input_tokens),
            _int64(tokens.output_tokens),
            _real(tokens.prompt_per_second),
            _real(tokens.tokens_per_second),
            _int64(entry.duration_ms),
            _sql_text(entry.error_msg),
            _sql_text(json.dumps(dict(entry.metadata))) if entry.metadata else "",
        ),
    )
    row_id: int = txn.lastrowid
    return row_id


def select_entries(
    txn: adbapi.Transaction, query: ActivityQuery
) -> tuple[list[ActivityEntry], int]:
    where, args = _where(query)
    txn.execute("SELECT COUNT(*) FROM activity" + where, args)
    total: int = txn.fetchone()[0]
    offset = min((query.page - 1) * query.limit, INT64_MAX)
    txn.execute(
        _SELECT_ENTRIES + where + _order_by(query) + " LIMIT ? OFFSET ?",
        [*args, query.limit, offset],
    )
    return [_entry(row) for row in txn.fetchall()], total


def read_stats(txn: adbapi.Transaction, model: str) -> ActivityStats:
    where, args = (" WHERE model_id = ?", [_sql_text(model)]) if model else ("", [])
    txn.execute(
        "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),"
        " COALESCE(SUM(CASE WHEN cache_tokens > 0 THEN cache_tokens ELSE 0 END), 0)"
        " FROM activity" + where,
        args,
    )
    count, input_tokens, output_tokens, cache_tokens = txn.fetchone()
    speeds = " AND " if where else " WHERE "
    txn.execute(
        "SELECT prompt_per_second, tokens_per_second FROM activity"
        + where
        + speeds
        + "(prompt_per_second > 0 OR tokens_per_second > 0)",
        args,
    )
    prompt: list[float] = []
    gen: list[float] = []
    for prompt_speed, gen_speed in txn.fetchall():
        if prompt_speed > 0:
            prompt.append(prompt_speed)
        if gen_speed > 0:
            gen.append(gen_speed)
    return ActivityStats(
        total_requests=count,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        total_cache_tokens=cache_tokens,
        prompt_histogram=histogram(prompt),
        gen_histogram=histogram(gen),
    )


def recent_entries(txn: adbapi.Transaction, n: int) -> list[ActivityEntry]:
    txn.execute(_SELECT_ENTRIES + " ORDER BY id DESC LIMIT ?", (n,))
    rows = [_entry(row) for row in txn.fetchall()]
    rows.reverse()
    return rows


# --------------------------------------------------------------------------
# Measured footprints (the placement planner's, per model and command)


def read_footprints(txn: adbapi.Transaction) -> dict[tuple[str, str], dict[str, int]]:
    """Every kept footprint: (model, command hash) -> resource -> bytes."""
    txn.execute("SELECT model_id, command, resource, bytes FROM footprints")
    kept: dict[tuple[str, str], dict[str, int]] = {}
    for model, command, resource, amount in txn.fetchall():
        kept.setdefault((model, command), {})[resource] = int(amount)
    return kept


def keep_footprint(
    txn: adbapi.Transaction, model: str, command: str, footprint: Mapping[str, int]
) -> None:
    """Replace what is kept for ``model`` and ``command`` by ``footprint``."""
    txn.execute("DELETE FROM footprints WHERE model_id = ? AND command = ?", (model, command))
    txn.executemany(
        "INSERT INTO footprints (model_id, command, resource, bytes) VALUES (?, ?, ?, ?)",
        [(model, command, name, _int64(amount)) for name, amount in sorted(footprint.items())],
    )
