"""Tests for llamaswap.observe.store: the memory and SQLite activity stores and `open_store`."""

from __future__ import annotations

import itertools
import os
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import yaml
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from llamaswap.config import ConfigError, load_config_text
from llamaswap.observe.activity import ActivityEntry
from llamaswap.observe.queries import SORT_COLUMNS, ActivityLog, ActivityQuery, HasCapture
from llamaswap.observe.store import (
    IActivityStore,
    MemoryActivityStore,
    SqliteActivityStore,
    StoreClosed,
    open_store,
    validate_store_path,
)
from llamaswap.observe.usage import TokenMetrics, Usage

JSON = "application/json"
SSE = "text/event-stream"


def open_from(document: dict[str, Any], has_capture: HasCapture | None = None) -> IActivityStore:
    """`open_store` for the ``store`` of the config ``document`` loads to
    (ConfigError when the document is refused at load)."""
    store = load_config_text(yaml.safe_dump(document), environ={}).store
    if has_capture is None:
        return open_store(store, reactor)
    return open_store(store, reactor, has_capture)


#: llama-swap's own schema (its 00001 migration plus the later ``src`` column).
LLAMA_SWAP_SCHEMA = """
CREATE TABLE activity (
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
    src TEXT NOT NULL DEFAULT ''
);
"""


def row_fields(i: int) -> dict[str, Any]:
    """Varied rows: ties in every sort column, several per second, -1 and 0 figures."""
    models = ["m1", "m2", "m1", "m3", "Ω-model", "m2"]
    speeds = [12.5, -1.0, 0.0, 40.0, 12.5, 7.25]
    tokens = TokenMetrics(
        cache_tokens=[-1, 0, 5, 5, 120, -1][i % 6],
        draft_tokens=[-1, 3, 3, -1][i % 4],
        draft_acc_tokens=[-1, 2, 1, -1][i % 4],
        input_tokens=(i * 7) % 11,
        output_tokens=(i * 5) % 4,
        prompt_per_second=speeds[i % 6],
        tokens_per_second=speeds[(i + 2) % 6],
    )
    return dict(
        model=models[i % 6],
        req_path=["/v1/chat/completions", "/v1/messages", "/infill"][i % 3],
        resp_content_type=[JSON, SSE][i % 2],
        resp_status_code=[200, 200, 503, 400][i % 4],
        usage=Usage(
            tokens=tokens,
            timings_duration_ms=[0, 900][i % 2],
            error_msg="" if i % 4 < 2 else f"error {i}",
        ),
        wall_ms=(i * 37) % 500,
        timestamp=1_700_000_000 + i // 3 + (i % 3) * 0.125,
        metadata={"fifo_priority": str(i % 3)} if i % 2 else None,
    )


def queries() -> Iterator[ActivityQuery]:
    """Every sort column both ways, plus filters and paging."""
    for sort, order in itertools.product(sorted(SORT_COLUMNS), ("asc", "desc")):
        yield ActivityQuery(sort=sort, order=order, limit=7, page=2)
        yield ActivityQuery(sort=sort, order=order, limit=999)
    base = 1_700_000_000
    for fields in (
        dict(models=("m1", "m3")),
        dict(models=(" m2 ", "")),
        dict(models=("Ω-model",)),
        dict(models=("missing",)),
        dict(start=base + 2.9, end=base + 4.0),
        dict(start=base + 3.5),
        dict(end=base + 1.0),
        dict(min_id=4, max_id=9),
        dict(min_id=20),
        dict(max_id=2**70),
        dict(models=("m1",), min_id=3, start=base + 1, sort="time", order="asc"),
        dict(page=3, limit=10),
        dict(page=10**12, limit=999),
        dict(sort="prompt_speed", order="ASC", limit=3, page=4),
    ):
        yield ActivityQuery(**fields)  # type: ignore[arg-type]


class MemoryStoreTests(SynchronousTestCase):
    """The ring behind the asynchronous interface."""

    def test_provides_interface(self) -> None:
        """MemoryActivityStore provides IActivityStore and is not persistent."""
        store = MemoryActivityStore(ActivityLog())
        self.assertTrue(verifyObject(IActivityStore, store))
        self.assertFalse(store.persistent)

    def test_results_are_immediate(self) -> None:
        """Every method fires at once with what the ring answers."""
        store = MemoryActivityStore(ActivityLog(has_capture=lambda i: i == 2))
        entries = [self.successResultOf(store.add(**row_fields(i))) for i in range(3)]
        self.assertEqual([e.id for e in entries], [1, 2, 3])
        rows, total = self.successResultOf(store.select(ActivityQuery()))
        self.assertEqual(([r.id for r in rows], total), ([3, 2, 1], 3))
        self.assertEqual([r.has_capture for r in rows], [False, True, False])
        self.assertEqual(self.successResultOf(store.stats()).total_requests, 3)
        self.assertEqual([e.id for e in self.successResultOf(store.recent(2))], [2, 3])
        self.assertIsNone(self.successResultOf(store.ready()))

    def test_closed_store_fails(self) -> None:
        """After close, every call fails with StoreClosed; close can be repeated."""
        store = MemoryActivityStore(ActivityLog())
        self.assertIsNone(self.successResultOf(store.close()))
        self.failureResultOf(store.add(**row_fields(0)), StoreClosed)
        self.failureResultOf(store.select(ActivityQuery()), StoreClosed)
        self.failureResultOf(store.stats(), StoreClosed)
        self.failureResultOf(store.recent(), StoreClosed)
        self.assertIsNone(self.successResultOf(store.close()))


class OpenStoreTests(SynchronousTestCase):
    """`open_store` and the ``store.path`` checks."""

    def test_memory_by_default(self) -> None:
        """Without ``store``, the ring of metricsMaxInMemory rows; <= 0 means 1000."""
        for document, cap in [
            ({}, 1000),
            ({"metricsMaxInMemory": 2}, 2),
            ({"metricsMaxInMemory": 0}, 1000),
            ({"metricsMaxInMemory": -5}, 1000),
            ({"store": None, "metricsMaxInMemory": 3}, 3),
        ]:
            store = open_from(document)
            self.assertIsInstance(store, MemoryActivityStore)
            for i in range(cap + 1):
                store.add(**row_fields(i))
            assert isinstance(store, MemoryActivityStore)
            self.assertEqual(len(store.log), cap)

    def test_has_capture_passed_to_memory_store(self) -> None:
        """The capture predicate reaches the ring."""
        store = open_from({}, has_capture=lambda i: True)
        store.add(**row_fields(0))
        self.assertTrue(self.successResultOf(store.recent())[0].has_capture)

    def test_bad_paths(self) -> None:
        """Empty, non-string, directory and missing-directory paths are one-line errors:
        the shape is refused when the config loads, the file when it is opened."""
        tmp = self.mktemp()
        os.makedirs(tmp)
        missing = os.path.join(tmp, "nope", "activity.db")
        at_load: list[tuple[Any, str]] = [
            ({"store": {}}, "store.path: must not be empty"),
            ({"store": {"path": ""}}, "store.path: must not be empty"),
            ({"store": {"path": "   "}}, "store.path: must not be empty"),
            ({"store": {"path": 5}}, "store.path: must be a string"),
            ({"store": "file.db"}, "store: must be a mapping"),
            ({"metricsMaxInMemory": "many"}, "metricsMaxInMemory: must be an integer"),
            ({"metricsMaxInMemory": True}, "metricsMaxInMemory: must be an integer"),
        ]
        for document, message in at_load:
            with self.assertRaises(ConfigError) as refused:
                open_from(document)
            self.assertEqual(refused.exception.problems, (message,))
            self.assertNotIn("\n", message)
        at_open: list[tuple[Any, str]] = [
            ({"store": {"path": tmp}}, f"store.path: {tmp} is a directory"),
            (
                {"store": {"path": missing}},
                f"store.path: directory {os.path.dirname(os.path.abspath(missing))} does not exist",
            ),
        ]
        for document, message in at_open:
            with self.assertRaises(ValueError) as caught:
                open_from(document)
            self.assertEqual(str(caught.exception), message)
            self.assertNotIn("\n", message)

    def test_unwritable_directory(self) -> None:
        """A directory the process cannot write to is refused (WAL needs it)."""
        if os.geteuid() == 0:
            raise self.skipTest("root can write anywhere")
        tmp = self.mktemp()
        os.makedirs(tmp)
        os.chmod(tmp, 0o555)
        self.addCleanup(os.chmod, tmp, 0o755)
        path = os.path.join(tmp, "activity.db")
        with self.assertRaises(ValueError) as caught:
            validate_store_path(path)
        self.assertEqual(
            str(caught.exception), f"store.path: directory {os.path.abspath(tmp)} is not writable"
        )

    def test_valid_path_accepted(self) -> None:
        """A new file in a writable directory is accepted as given."""
        tmp = self.mktemp()
        os.makedirs(tmp)
        path = os.path.join(tmp, "activity.db")
        self.assertEqual(validate_store_path(path), path)


class SqliteStoreTests(TestCase):
    """The SQLite file store, on a real worker thread."""

    def open(self, path: str, has_capture: Callable[[int], bool] = lambda _id: False) -> Any:
        store = SqliteActivityStore(path, reactor, has_capture=has_capture)
        self.addCleanup(store.close)
        return store

    def db_path(self) -> str:
        tmp = self.mktemp()
        os.makedirs(tmp)
        return os.path.join(tmp, "activity.db")

    async def test_round_trip_across_restart(self) -> None:
        """Rows survive close and reopen exactly; ids keep increasing; the file uses WAL."""
        path = self.db_path()
        store = self.open(path)
        self.assertTrue(verifyObject(IActivityStore, store))
        self.assertTrue(store.persistent)
        added = [await store.add(**row_fields(i)) for i in range(5)]
        self.assertEqual([e.id for e in added], [1, 2, 3, 4, 5])
        await store.close()
        with self.assertRaises(StoreClosed):
            await store.recent()

        reopened = self.open(path)
        self.assertEqual(await reopened.recent(), added)
        self.assertEqual(added[1].timestamp, 1_700_000_000.125)  # sub-second kept
        self.assertEqual(added[1].to_json()["timestamp"], "2023-11-14T22:13:20.125Z")
        self.assertEqual(dict(added[1].metadata), {"fifo_priority": "1"})
        self.assertEqual(added[2].error_msg, "error 2")
        later = await reopened.add(**row_fields(5))
        self.assertEqual(later.id, 6)
        await reopened.close()
        with sqlite3.connect(path) as conn:
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        conn.close()

    async def test_ids_never_reused(self) -> None:
        """Deleting the newest rows does not hand their ids out again (AUTOINCREMENT)."""
        path = self.db_path()
        store = self.open(path)
        for i in range(3):
            await store.add(**row_fields(i))
        await store.close()
        with sqlite3.connect(path) as conn:
            conn.execute("DELETE FROM activity WHERE id >= 2")
        conn.close()
        reopened = self.open(path)
        self.assertEqual((await reopened.add(**row_fields(3))).id, 4)

    async def test_query_parity_with_memory(self) -> None:
        """Filters, every sort column and paging give what the ring gives for the same rows."""
        captured = {2, 5, 11}
        memory = MemoryActivityStore(ActivityLog(has_capture=captured.__contains__))
        sqlite = self.open(self.db_path(), has_capture=captured.__contains__)
        for i in range(20):
            expected = await memory.add(**row_fields(i))
            self.assertEqual(await sqlite.add(**row_fields(i)), expected)
        for query in queries():
            self.assertEqual(await sqlite.select(query), await memory.select(query), query)
        for n in (None, 0, -3, 1, 5, 50):
            self.assertEqual(await sqlite.recent(n), await memory.recent(n), n)
        captured.add(3)  # has_capture is asked when rows are read
        rows, _ = await sqlite.select(ActivityQuery(min_id=3, max_id=3))
        self.assertTrue(rows[0].has_capture)

    async def test_stats_parity_with_memory(self) -> None:
        """Totals and histograms match the ring, overall and per model."""
        memory = MemoryActivityStore(ActivityLog())
        sqlite = self.open(self.db_path())
        for model in (None, "m1", " m1 ", "m2", "", "missing"):
            self.assertEqual(await sqlite.stats(model), await memory.stats(model), model)
        for i in range(40):
            await memory.add(**row_fields(i))
            await sqlite.add(**row_fields(i))
        for model in (None, "m1", " m1 ", "m2", "Ω-model", "", "missing"):
            self.assertEqual(await sqlite.stats(model), await memory.stats(model), model)
        stats = await sqlite.stats()
        self.assertEqual(stats.total_requests, 40)
        self.assertIsNotNone(stats.gen_histogram)

    async def test_recent_window(self) -> None:
        """Without n, recent returns the newest recent_limit rows, oldest first."""
        store = SqliteActivityStore(self.db_path(), reactor, recent_limit=3)
        self.addCleanup(store.close)
        for i in range(5):
            await store.add(**row_fields(i))
        self.assertEqual([e.id for e in await store.recent()], [3, 4, 5])
        self.assertEqual([e.id for e in await store.recent(10)], [1, 2, 3, 4, 5])

    async def test_opens_llama_swap_database(self) -> None:
        """A file written by llama-swap opens as is: its rows read back, new rows follow."""
        path = self.db_path()
        with sqlite3.connect(path) as conn:
            conn.executescript(LLAMA_SWAP_SCHEMA)
            conn.execute(
                "INSERT INTO activity (ts_created, model_id, req_path, resp_content_type,"
                " resp_status_code, input_tokens, output_tokens, prompt_per_second,"
                " tokens_per_second, duration_ms, metadata_json)"
                " VALUES (1718000000, 'llama', '/v1/chat/completions', ?, 200, 5, 6, 1.5,"
                " 2.5, 120, ?)",
                (SSE, '{"fifo_priority":"10"}'),
            )
        conn.close()
        store = self.open(path)
        [old] = await store.recent()
        self.assertEqual(
            old,
            ActivityEntry(
                id=1,
                timestamp=1718000000.0,
                model="llama",
                req_path="/v1/chat/completions",
                resp_content_type=SSE,
                resp_status_code=200,
                tokens=TokenMetrics(0, 0, 0, 5, 6, 1.5, 2.5),
                duration_ms=120,
                metadata={"fifo_priority": "10"},
            ),
        )
        new = await store.add(**row_fields(1))
        self.assertEqual(new.id, 2)
        self.assertEqual((await store.recent())[-1], new)

    async def test_not_a_database(self) -> None:
        """A file that is not SQLite fails ready() and queries; close still works."""
        path = self.db_path()
        with open(path, "wb") as f:
            f.write(b"this is not a database file, not at all" * 100)
        store = self.open(path)
        with self.assertRaises(sqlite3.DatabaseError):
            await store.ready()
        with self.assertRaises(sqlite3.DatabaseError):
            await store.add(**row_fields(0))
        await store.close()

    async def test_close_waits_for_pending_writes(self) -> None:
        """Rows added just before close are written; every close call fires."""
        path = self.db_path()
        store = self.open(path)
        pending = [store.add(**row_fields(i)) for i in range(10)]
        first, second = store.close(), store.close()
        await first
        await second
        self.assertEqual([(await d).id for d in pending], list(range(1, 11)))
        with sqlite3.connect(path) as conn:
            self.assertEqual(conn.execute("SELECT COUNT(*) FROM activity").fetchone()[0], 10)
        conn.close()

    async def test_odd_values_are_stored(self) -> None:
        """Huge counts are clamped to 64 bits and unencodable text replaced, not rejected."""
        store = self.open(self.db_path())
        fields = row_fields(0)
        fields["model"] = "bad\udcffname"
        fields["usage"] = Usage(tokens=TokenMetrics(input_tokens=10**30, prompt_per_second=1.0))
        entry = await store.add(**fields)
        [row] = await store.recent()
        self.assertEqual(row.id, entry.id)
        self.assertEqual(row.model, "bad\ufffdname")
        self.assertEqual(row.tokens.input_tokens, 2**63 - 1)

    async def test_open_store_gives_sqlite(self) -> None:
        """store.path selects the file store, with the capture predicate."""
        path = self.db_path()
        store = open_from({"store": {"path": path}}, has_capture=lambda i: True)
        self.addCleanup(store.close)
        self.assertIsInstance(store, SqliteActivityStore)
        await store.add(**row_fields(0))
        self.assertTrue((await store.recent())[0].has_capture)
        self.assertTrue(os.path.exists(path))
