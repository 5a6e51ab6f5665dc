"""Where activity rows live: the in-memory ring, or a SQLite file (``store.path``).

`IActivityStore` is the asynchronous face both stores show to the web layer:
every method returns a Deferred.  `MemoryActivityStore` wraps the
`llamaswap.observe.queries.ActivityLog` ring and answers at once.
`SqliteActivityStore` keeps every row in a SQLite file, as llama-swap's file
store does (never pruned), and runs each statement on the one worker thread of
an ``adbapi.ConnectionPool``, so the reactor never waits on the disk.

The SQLite schema (llama-swap's ``activity`` table) and the statements,
which answer queries and stats row for row as `ActivityLog` does, are
`llamaswap.observe.activitysql`'s.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from llamaswap.config.settings import DEFAULT_MAX_IN_MEMORY, StoreConfig
from llamaswap.observe.activity import ActivityEntry
from llamaswap.observe.activitysql import (
    INT64_MAX,
    insert_entry,
    keep_footprint,
    prepare_connection,
    read_footprints,
    read_stats,
    recent_entries,
    select_entries,
)
from llamaswap.observe.queries import (
    ActivityLog,
    ActivityQuery,
    ActivityStats,
    HasCapture,
    never_captured,
)
from llamaswap.observe.usage import Usage

__all__ = [
    "IActivityStore",
    "MemoryActivityStore",
    "SqliteActivityStore",
    "StoreClosed",
    "open_store",
    "validate_store_path",
]

log = Logger()


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

    def footprints() -> Deferred[dict[tuple[str, str], dict[str, int]]]:
        """Every measured footprint kept: (model, command hash) -> resource -> bytes."""

    def keep_footprint(model: str, command: str, footprint: Mapping[str, int]) -> Deferred[None]:
        """Keep ``footprint`` (bytes per resource) for ``model`` run by ``command``."""

    def close() -> Deferred[None]:
        """Finish pending work and release the store; later calls fail with `StoreClosed`."""

    def load_times() -> Deferred[dict[str, float]]:
        """Model id -> its learned load time in seconds (see `add_load_time`)."""

    def add_load_time(model: str, seconds: float) -> Deferred[None]:
        """Learn one load of ``model`` (ready after ``seconds``): the learned
        time moves half way towards it (`learned_load_time`)."""


def learned_load_time(old: float | None, seconds: float) -> float:
    """The learned load time after a load of ``seconds``: the mean of the
    old one and the new one, so a changed disk or cache shows within a few loads."""
    return seconds if old is None else (old + seconds) / 2


_LOAD_TIMES_TABLE = (
    "CREATE TABLE IF NOT EXISTS load_times (model TEXT PRIMARY KEY, seconds REAL NOT NULL)"
)


def _read_load_times(txn: Any) -> dict[str, float]:
    txn.execute(_LOAD_TIMES_TABLE)
    txn.execute("SELECT model, seconds FROM load_times")
    return {model: float(seconds) for model, seconds in txn.fetchall()}


def _write_load_time(txn: Any, model: str, seconds: float) -> None:
    txn.execute(_LOAD_TIMES_TABLE)
    txn.execute("SELECT seconds FROM load_times WHERE model = ?", (model,))
    row = txn.fetchone()
    learned = learned_load_time(None if row is None else float(row[0]), seconds)
    txn.execute(
        "INSERT OR REPLACE INTO load_times (model, seconds) VALUES (?, ?)", (model, learned)
    )


# --------------------------------------------------------------------------
# In memory


@implementer(IActivityStore)
class MemoryActivityStore:
    """The `ActivityLog` ring behind the asynchronous interface; results are immediate."""

    persistent = False

    def __init__(self, log: ActivityLog) -> None:
        self.log = log
        self._closed = False
        self._footprints: dict[tuple[str, str], dict[str, int]] = {}
        self._load_times: dict[str, float] = {}

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

    def footprints(self) -> Deferred[dict[tuple[str, str], dict[str, int]]]:
        if self._closed:
            return fail(StoreClosed("activity store is closed"))
        return succeed({key: dict(held) for key, held in self._footprints.items()})

    def keep_footprint(
        self, model: str, command: str, footprint: Mapping[str, int]
    ) -> Deferred[None]:
        if self._closed:
            return fail(StoreClosed("activity store is closed"))
        self._footprints[(model, command)] = dict(footprint)
        return succeed(None)

    def close(self) -> Deferred[None]:
        self._closed = True
        return succeed(None)

    def load_times(self) -> Deferred[dict[str, float]]:
        return succeed(dict(self._load_times))

    def add_load_time(self, model: str, seconds: float) -> Deferred[None]:
        self._load_times[model] = learned_load_time(self._load_times.get(model), seconds)
        return succeed(None)


# --------------------------------------------------------------------------
# SQLite


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
        has_capture: HasCapture = never_captured,
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
            cp_openfun=prepare_connection,
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
        entry = ActivityEntry.finished(
            id=0,  # SQLite assigns it
            model=model,
            req_path=req_path,
            resp_content_type=resp_content_type,
            resp_status_code=resp_status_code,
            usage=usage,
            wall_ms=wall_ms,
            timestamp=timestamp,
            metadata=metadata,
        )
        d = self._run(insert_entry, entry)
        d.addCallback(lambda row_id: dataclasses.replace(entry, id=row_id))
        return d

    def select(self, query: ActivityQuery) -> Deferred[tuple[list[ActivityEntry], int]]:
        d = self._run(select_entries, query)
        d.addCallback(lambda result: (self._live(result[0]), result[1]))
        return d

    def stats(self, model: str | None = None) -> Deferred[ActivityStats]:
        return self._run(read_stats, (model or "").strip())

    def recent(self, n: int | None = None) -> Deferred[list[ActivityEntry]]:
        if n is None:
            n = self._recent_limit
        if n <= 0 and self._closing is None:
            return succeed([])
        d = self._run(recent_entries, min(n, INT64_MAX))
        d.addCallback(self._live)
        return d

    def footprints(self) -> Deferred[dict[tuple[str, str], dict[str, int]]]:
        return self._run(read_footprints)

    def keep_footprint(
        self, model: str, command: str, footprint: Mapping[str, int]
    ) -> Deferred[None]:
        return self._run(keep_footprint, model, command, dict(footprint))

    def load_times(self) -> Deferred[dict[str, float]]:
        return self._run(_read_load_times)

    def add_load_time(self, model: str, seconds: float) -> Deferred[None]:
        return self._run(_write_load_time, model, seconds)

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


def validate_store_path(path: str) -> str:
    """``store.path`` checked for a SQLite file store; ValueError with a one-line message.

    The path must not be a directory; an existing file must be writable, and
    its directory must be writable too, because WAL mode creates ``-wal`` and
    ``-shm`` files beside the database.  (Its shape was checked at load.)
    """
    if os.path.isdir(path):
        raise ValueError(f"store.path: {path} is a directory")
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        raise ValueError(f"store.path: {path} is not writable")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"store.path: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"store.path: directory {parent} is not writable")
    return path


def open_store(
    store: StoreConfig,
    reactor: IReactorCore,
    has_capture: HasCapture = never_captured,
) -> IActivityStore:
    """The activity store the configuration asks for.

    ``store.path`` set: a `SqliteActivityStore` on that file.  Otherwise the
    in-memory ring of ``metricsMaxInMemory`` rows.  Raises ValueError with a
    one-line message naming the key when the file cannot be used.  The path
    checks are a few ``stat`` calls, made once at startup.
    """
    if store.path is None:
        return MemoryActivityStore(ActivityLog(store.max_in_memory, has_capture))
    path = validate_store_path(store.path)
    return SqliteActivityStore(
        path, reactor, has_capture=has_capture, recent_limit=store.max_in_memory
    )
