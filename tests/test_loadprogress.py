"""Real loading progress: bytes read by the server, llama-server's dots,
learned load times, and the ``percent``/``eta_s`` of ``loadingProgress``."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap.observe.events import Event
from llamaswap.observe.queries import ActivityLog
from llamaswap.observe.store import MemoryActivityStore, SqliteActivityStore
from llamaswap.service.progress import estimate_eta
from llamaswap.supervision.loadmeter import file_sizes, group_bytes_read, log_percent
from tests.support import PYTHON, REPO, free_port, poll_until
from tests.test_service import ServiceTestCase

MIB = 1 << 20


def weights(test: SynchronousTestCase, size: int) -> str:
    folder = test.mktemp()
    os.makedirs(folder)
    path = os.path.join(folder, "model.gguf")
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


READER = """
import sys
f = open(sys.argv[1], "rb")
f.read(int(sys.argv[2]))
print("read", flush=True)
sys.stdin.read()
"""


MAPPER = """
import mmap, sys
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
m.madvise(mmap.MADV_RANDOM)  # no readahead: only touched pages are resident
total = sum(m[i] for i in range(0, int(sys.argv[2]), mmap.PAGESIZE))
print("mapped", flush=True)
sys.stdin.read()
"""


class GroupBytesReadTests(SynchronousTestCase):
    def test_bytes_a_real_process_group_read(self) -> None:
        """A child in its own group that read 3 of 8 MiB of the file (from
        the page cache: its descriptor's offset counts) shows 3 MiB."""
        path = weights(self, 8 * MIB)
        child = subprocess.Popen(
            [sys.executable, "-c", READER, path, str(3 * MIB)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.stdin.close)  # type: ignore[union-attr]
        self.assertEqual(child.stdout.readline(), b"read\n")  # type: ignore[union-attr]
        sizes = file_sizes([path])
        self.assertEqual(sum(sizes.values()), 8 * MIB)
        read = group_bytes_read(child.pid, sizes)
        self.assertGreaterEqual(read, 3 * MIB)
        self.assertLess(read, 8 * MIB)

    def test_pages_a_real_process_mapped(self) -> None:
        """An mmap loader (llama.cpp's default) that touched 3 of 8 MiB of
        the file's pages shows 3 MiB, even when they came from the page cache."""
        path = weights(self, 8 * MIB)
        child = subprocess.Popen(
            [sys.executable, "-c", MAPPER, path, str(3 * MIB)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.stdin.close)  # type: ignore[union-attr]
        self.assertEqual(child.stdout.readline(), b"mapped\n")  # type: ignore[union-attr]
        read = group_bytes_read(child.pid, file_sizes([path]))
        self.assertGreaterEqual(read, 3 * MIB)
        self.assertLess(read, 8 * MIB)

    def test_missing_group_reads_nothing(self) -> None:
        path = weights(self, MIB)
        self.assertEqual(group_bytes_read(2**22 + 7, file_sizes([path])), 0)
        self.assertEqual(file_sizes(["/nonexistent/model.gguf"]), {})


class LogPercentTests(SynchronousTestCase):
    def test_llama_server_dots(self) -> None:
        lines = [
            "load_tensors: offloading 0 repeating layers to GPU",
            "load_tensors:   CPU_Mapped model buffer size =  4437.80 MiB",
            "." * 42,
        ]
        self.assertEqual(log_percent(lines), 42.0)
        self.assertEqual(log_percent([*lines[:2], "." * 130]), 100.0)

    def test_nothing_recognisable(self) -> None:
        self.assertIsNone(log_percent(["main: HTTP server is listening", "..x"]))


class EstimateTests(SynchronousTestCase):
    def test_learned_time_first(self) -> None:
        self.assertEqual(estimate_eta(3.0, 50.0, learned=10.0), 7.0)
        self.assertEqual(estimate_eta(12.0, 50.0, learned=10.0), 0.0)

    def test_extrapolated_from_percent(self) -> None:
        self.assertEqual(estimate_eta(2.0, 25.0, learned=None), 6.0)
        self.assertIsNone(estimate_eta(2.0, None, learned=None))
        self.assertIsNone(estimate_eta(2.0, 0.0, learned=None))


class LearnedLoadTimeTests(TestCase):
    def test_memory_store(self) -> None:
        store = MemoryActivityStore(ActivityLog())
        store.add_load_time("a", 4.0)
        store.add_load_time("a", 2.0)
        self.assertEqual(self.successResultOf(store.load_times()), {"a": 3.0})

    async def test_sqlite_store_keeps_them_across_restarts(self) -> None:
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "activity.db")
        store = SqliteActivityStore(path, reactor)
        await store.add_load_time("a", 8.0)
        await store.add_load_time("a", 4.0)
        await store.add_load_time("b", 1.5)
        await store.close()
        reopened = SqliteActivityStore(path, reactor)
        self.addCleanup(reopened.close)
        self.assertEqual(await reopened.load_times(), {"a": 6.0, "b": 1.5})


class DemoLoadTests(ServiceTestCase):
    timeout = 90

    async def test_progress_of_a_server_reading_its_weights(self) -> None:
        """A demo upstream reads an 8 MiB file at 4 MiB/s before it is
        healthy: ``loadingProgress`` shows a rising percent between 0 and
        100, the load time is learned, and the next load has an ``eta_s``."""
        path = weights(self, 8 * MIB)
        port = free_port()
        await self.start(
            {
                "slow": {
                    "cmd": (
                        f"{PYTHON} -m llamaswap.demo --host 127.0.0.1 --port {port} "
                        f"--load-file {path} --load-rate 4"
                    ),
                    "proxy": f"http://127.0.0.1:{port}",
                    "env": [f"PYTHONPATH={REPO}"],
                    "files": [path],
                }
            }
        )
        seen: list[dict[str, Any]] = []

        def heard(event: Event) -> None:
            if event.kind == "loadingProgress":
                seen.extend(m for m in event.payload()["models"] if m["id"] == "slow")

        self.addCleanup(self.service.bus.subscribe(heard).close)
        response = await self.chat("slow")
        self.assertEqual(response.code, 200)
        await response.content()
        percents = [m["percent"] for m in seen if m.get("percent") is not None]
        self.assertTrue(any(0 < p < 100 for p in percents), seen)
        self.assertEqual(percents, sorted(percents))
        self.assertTrue(all(p <= 99 for p in percents))
        learned = self.service.loading.learned["slow"]
        self.assertGreater(learned, 1.0)
        # The learned time gives the next load its ETA from the first event.
        await self.router.unload(["slow"])
        seen.clear()
        pending = defer.ensureDeferred(self.chat("slow"))
        await poll_until(lambda: any(m.get("eta_s") is not None for m in seen), timeout=20)
        first = next(m for m in seen if m.get("eta_s") is not None)
        self.assertLessEqual(first["eta_s"], round(learned, 1))
        await (await pending).content()
        await self.settled()
