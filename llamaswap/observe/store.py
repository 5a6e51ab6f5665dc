"""Where activity rows live: the in-memory ring, or a SQLite file (``store.path``).

`IActivityStore` is the asynchronous face both stores show to the web layer:
every method returns a Deferred.  `MemoryActivityStore` wraps the
`llamaswap.observe.queries.ActivityLog` ring and answers at once.
`SqliteActivityStore` keeps every row in a SQLite file, as llama-swap's file
store does (never pruned), and runs each statement on the one worker thread of
an ``adbapi.ConnectionPool``, so the reactor never waits on the disk.

The SQLite schema is llama-swap's ``activity`` table (same column names, so a
llama-swap database file can be opened as is) plus one column, ``ts_precise``:
the exact epoch timestamp.  ``ts_created`` stays whole Unix seconds, which is
what filters and the ``time`` sort compare, exactly as `ActivityQuery` does.
Queries, sorting, paging and stats follow `ActivityLog` row for row: the same
`ActivityQuery` validation, the id as secondary sort key, and
`llamaswap.observe.queries.histogram` for the speed histograms.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from llamaswap.observe.activity import ActivityEntry
from llamaswap.observe.queries import (
    SORT_COLUMNS,
    ActivityLog,
    ActivityQuery,
    ActivityStats,
    histogram,
)
from llamaswap.observe.usage import TokenMetrics, Usage

__all__ = [
    "DEFAULT_MAX_IN_MEMORY",
    "IActivityStore",
    "MemoryActivityStore",
    "SqliteActivityStore",
    "StoreClosed",
    "open_store",
    "validate_store_path",
]

#: ``metricsMaxInMemory`` when absent or <= 0.
DEFAULT_MAX_IN_MEMORY = 1000

HasCapture = Callable[[int], bool]

log = Logger()


def _never_captured(_id: int) -> bool:
    return False


class StoreClosed(Exception):
    """The activity store was used after `IActivityStore.close`."""


class IActivityStore(Interface):
    """Activity rows, recorded and queried asynchronously."""

    persistent = Attribute("True when rows outlive the process (a file store).")

    def ready() -> Deferred[None]:
        """Fire when the store can take rows; fail if it cannot (e.g. not a database file)."""

    def add(
        *,
        model: str,
        req_path: str,
        resp_content_type: str,
        resp_status_code: int,
        usage: Usage,
        wall_ms: int,
        timestamp: float,
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred[ActivityEntry]:
        """Record one finished request (as `ActivityLog.add`); fire with its row and new id."""

    def select(query: ActivityQuery) -> Deferred[tuple[list[ActivityEntry], int]]:
        """One page of matching rows and the number of matching rows in all."""

    def stats(model: str | None = None) -> Deferred[ActivityStats]:
        """Totals and speed histograms over all rows, or over one model's."""

    def recent(n: int | None = None) -> Deferred[list[ActivityEntry]]:
        """The newest ``n`` rows, oldest first (``None``: the store's default window)."""

    def close() -> Deferred[None]:
        """Finish pending work and release the store; later calls fail with `StoreClosed`."""


# --------------------------------------------------------------------------
# In memory


@implementer(IActivityStore)
class MemoryActivityStore:
    """The `ActivityLog` ring behind the asynchronous interface; results are immediate."""

    persistent = False

    def __init__(self, log: ActivityLog) -> None:
        self.log = log
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise StoreClosed("activity store is closed")

    def ready(self) -> Deferred[None]:
        return succeed(None)

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
    ) -> Deferred[ActivityEntry]:
        if self._closed:
            return fail(StoreClosed("activity store is closed"))
        return succeed(
            self.log.add(
                model=model,
                req_path=req_path,
                resp_content_type=resp_content_type,
                resp_status_code=resp_status_code,
                usage=usage,
                wall_ms=wall_ms,
                timestamp=timestamp,
                metadata=metadata,
            )
        )

    def select(self, query: ActivityQuery) -> Deferred[tuple[list[ActivityEntry], int]]:
        if self._closed:
            return fail(StoreClosed("activity store is closed"))
        return succeed(self.log.select(query))

    def stats(self, model: str | None = None) -> Deferred[ActivityStats]:
        if self._closed:
            return fail(StoreClosed("activity store is closed"))
        return succeed(self.log.stats(model))

    def recent(self, n: int | None = None) -> Deferred[list[ActivityEntry]]:
        if self._closed:
            return fail(StoreClosed("activity store is closed"))
        return succeed(self.log.recent(n))

    def close(self) -> Deferred[None]:
        self._closed = True
        return succeed(None)


# --------------------------------------------------------------------------
# SQLite

_SCHEMA = """
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
if set(_SORT_SQL) != SORT_COLUMNS:  # pragma: no cover - guards activity.py changes
    raise ImportError("store._SORT_SQL is out of step with activity.SORT_COLUMNS")

_SELECT = (
    "SELECT id, COALESCE(ts_precise, ts_created), model_id, req_path, resp_content_type,"
    " resp_status_code, cache_tokens, draft_tokens, draft_acc_tokens, input_tokens,"
    " output_tokens, prompt_per_second, tokens_per_second, duration_ms, error_msg,"
    " metadata_json FROM activity"
)

_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)


def _int64(value: int) -> int:
    # Token counts come from upstream JSON and may be absurd; SQLite holds 64 bits.
    return min(max(int(value), _INT64_MIN), _INT64_MAX)


def _real(value: float) -> float:
    # NaN would be stored as NULL and break NOT NULL; speeds use -1 for "unknown".
    return float(value) if not math.isnan(value) else -1.0


_SURROGATE = re.compile("[\ud800-\udfff]")


def _sql_text(value: str) -> str:
    # Lone surrogates cannot be encoded for SQLite; store U+FFFD instead.
    return _SURROGATE.sub("\ufffd", value)


def _prepare_connection(conn: sqlite3.Connection) -> None:
    """Per-connection setup on the worker thread: WAL, busy timeout, schema."""
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.executescript(_SCHEMA)
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


def _insert(txn: adbapi.Transaction, entry: ActivityEntry) -> int:
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


def _select(txn: adbapi.Transaction, query: ActivityQuery) -> tuple[list[ActivityEntry], int]:
    where, args = _where(query)
    txn.execute("SELECT COUNT(*) FROM activity" + where, args)
    total: int = txn.fetchone()[0]
    offset = min((query.page - 1) * query.limit, _INT64_MAX)
    txn.execute(
        _SELECT + where + _order_by(query) + " LIMIT ? OFFSET ?", [*args, query.limit, offset]
    )
    return [_entry(row) for row in txn.fetchall()], total


def _stats(txn: adbapi.Transaction, model: str) -> ActivityStats:
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


def _recent(txn: adbapi.Transaction, n: int) -> list[ActivityEntry]:
    txn.execute(_SELECT + " ORDER BY id DESC LIMIT ?", (n,))
    rows = [_entry(row) for row in txn.fetchall()]
    rows.reverse()
    return rows


@implementer(IActivityStore)
class SqliteActivityStore:
    """Activity rows in a SQLite file (WAL), queried on one worker thread.

    Statements run in submission order on the pool's single thread, so ids
    follow the order of `add` calls; ``AUTOINCREMENT`` keeps ids increasing
    across restarts (an id is never reused).  The file is never pruned, as
    llama-swap's file store: `recent` without ``n`` returns the newest
    ``recent_limit`` rows, and `stats` reads every positive speed of the
    matching rows (one float per row, on the worker thread) for the
    histograms, as llama-swap does.

    ``has_capture`` is asked on the reactor thread when results arrive, so a
    non-thread-safe predicate such as ``CaptureCache.has`` is fine.  The
    Deferreds have no canceller: a statement that reached SQLite cannot be
    stopped, and each one is short.
    """

    persistent = True

    def __init__(
        self,
        path: str,
        reactor: IReactorCore,
        has_capture: HasCapture = _never_captured,
        recent_limit: int = DEFAULT_MAX_IN_MEMORY,
    ) -> None:
        self.path = path
        # Results come back through callFromThread; every real reactor provides it.
        self._threads = IReactorFromThreads(reactor)
        self._has_capture = has_capture
        self._recent_limit = recent_limit if recent_limit > 0 else DEFAULT_MAX_IN_MEMORY
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_prepare_connection,
            cp_reactor=reactor,
        )
        self._closing: Deferred[None] | None = None

    def __repr__(self) -> str:
        return f"<SqliteActivityStore {self.path!r}>"

    def _run(self, interaction: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._closing is not None:
            return fail(StoreClosed("activity store is closed"))
        result: Deferred[Any] = self._pool.runInteraction(interaction, *args)
        return result

    def _live(self, entries: list[ActivityEntry]) -> list[ActivityEntry]:
        return [dataclasses.replace(e, has_capture=self._has_capture(e.id)) for e in entries]

    def ready(self) -> Deferred[None]:
        return self._run(lambda _txn: None)

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
    ) -> Deferred[ActivityEntry]:
        entry = ActivityEntry(
            id=0,
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
        d = self._run(_insert, entry)
        d.addCallback(lambda row_id: dataclasses.replace(entry, id=row_id))
        return d

    def select(self, query: ActivityQuery) -> Deferred[tuple[list[ActivityEntry], int]]:
        d = self._run(_select, query)
        d.addCallback(lambda result: (self._live(result[0]), result[1]))
        return d

    def stats(self, model: str | None = None) -> Deferred[ActivityStats]:
        return self._run(_stats, (model or "").strip())

    def recent(self, n: int | None = None) -> Deferred[list[ActivityEntry]]:
        if n is None:
            n = self._recent_limit
        if n <= 0 and self._closing is None:
            return succeed([])
        d = self._run(_recent, min(n, _INT64_MAX))
        d.addCallback(self._live)
        return d

    def close(self) -> Deferred[None]:
        """Fire once queued statements have run and the connection is closed.

        The connection is closed on the worker thread (closing a WAL database
        checkpoints it, which is disk work); the reactor then only joins an
        idle thread.  Every call gets its own Deferred for the same closing.
        """
        if self._closing is None:
            self._closing = self._shut_down()
        waiter: Deferred[None] = Deferred()
        self._closing.addCallback(_relay_to, waiter)
        return waiter

    def _shut_down(self) -> Deferred[None]:
        # Before the reactor runs the pool has not started its thread yet; start
        # it now so that statements already queued run before the close.
        self._pool.start()
        d: Deferred[None] = threads.deferToThreadPool(
            self._threads, self._pool.threadpool, self._release_connection
        )
        d.addErrback(
            lambda failure: log.failure(
                "closing the activity store {path}", failure, path=self.path
            )
        )
        d.addCallback(lambda _: self._pool.close())
        return d

    def _release_connection(self) -> None:
        # Runs on the worker thread, which owns the connection.
        conn = self._pool.connections.get(self._pool.threadID())
        if conn is not None:
            self._pool.disconnect(conn)


def _relay_to(result: None, waiter: Deferred[None]) -> None:
    waiter.callback(None)
    return result


# --------------------------------------------------------------------------
# Configuration


def validate_store_path(raw: Any) -> str:
    """``store.path`` checked for a SQLite file store; ValueError with a one-line message.

    The path must be non-empty and not a directory; an existing file must be
    writable, and its directory must be writable too, because WAL mode
    creates ``-wal`` and ``-shm`` files beside the database.
    """
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise ValueError("store.path: must not be empty")
    if not isinstance(raw, str):
        raise ValueError("store.path: must be a string")
    if os.path.isdir(raw):
        raise ValueError(f"store.path: {raw} is a directory")
    if os.path.exists(raw) and not os.access(raw, os.R_OK | os.W_OK):
        raise ValueError(f"store.path: {raw} is not writable")
    parent = os.path.dirname(os.path.abspath(raw))
    if not os.path.isdir(parent):
        raise ValueError(f"store.path: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"store.path: directory {parent} is not writable")
    return raw


def _max_in_memory(raw: Any) -> int:
    if raw is None:
        return DEFAULT_MAX_IN_MEMORY
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ValueError("metricsMaxInMemory: must be an integer")
    return raw if raw > 0 else DEFAULT_MAX_IN_MEMORY


def open_store(
    document: Mapping[str, Any],
    reactor: IReactorCore,
    has_capture: HasCapture = _never_captured,
) -> IActivityStore:
    """The activity store the configuration asks for.

    ``store.path`` present: a `SqliteActivityStore` on that file (``store:``
    left empty counts as absent).  Otherwise the in-memory ring of
    ``metricsMaxInMemory`` rows (<= 0 means 1000).  Raises ValueError with a
    one-line message naming the key.  The path checks are a few ``stat``
    calls, made once at startup or reload.
    """
    max_rows = _max_in_memory(document.get("metricsMaxInMemory"))
    store = document.get("store")
    if store is None:
        return MemoryActivityStore(ActivityLog(max_rows, has_capture))
    if not isinstance(store, Mapping):
        raise ValueError("store: must be a mapping")
    path = validate_store_path(store.get("path"))
    return SqliteActivityStore(path, reactor, has_capture=has_capture, recent_limit=max_rows)
