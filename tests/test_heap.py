"""Tests for llamaswap.service.heap: the collector's full passes stay short."""

from __future__ import annotations

import gc
import json
import weakref

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from llamaswap.service.heap import YOUNG_THRESHOLD, HeapService, settle
from llamaswap.service.tap import Options, makeService


class Node:
    other: Node | None = None


class SettleTests(TestCase):
    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)

    async def test_settle_freezes_what_lives(self) -> None:
        """Once the reactor runs, what is alive is moved out of the
        collector's sight; stopping gives it back."""
        heap = HeapService(reactor)
        heap.startService()
        await deferLater(reactor, 0, lambda: None)
        self.assertGreater(gc.get_freeze_count(), 1000)
        heap.stopService()
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_young_threshold_raised_while_running(self) -> None:
        """The young generation's threshold is `YOUNG_THRESHOLD` while the
        service runs (the older ones untouched), and what it was after."""
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        gc.set_threshold(700, 10, 10)
        heap = HeapService(reactor)
        heap.startService()
        self.assertEqual(gc.get_threshold(), (YOUNG_THRESHOLD, 10, 10))
        heap.stopService()
        self.assertEqual(gc.get_threshold(), (700, 10, 10))

    def test_a_later_settle_collects_garbage_an_earlier_one_froze(self) -> None:
        """A cycle frozen while alive that became garbage (a reload replaced
        it) is collected by the next settle, not kept for good."""
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        settle()
        del a, b
        gc.collect()
        self.assertIsNotNone(gone(), "frozen objects are not collected")
        settle()
        self.assertIsNone(gone())

    def test_twistd_service_settles_after_start_and_reloads(self) -> None:
        """``makeService`` (what ``twistd -n llamaswap`` and ``llamaswap``
        run) has the heap service, and a reload settles again."""
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"models": {"a": {"cmd": "true", "proxy": "http://127.0.0.1:9"}}}, f)
        options = Options()
        options.parseOptions(["-c", path, "--listen", "tcp:0:interface=127.0.0.1"])
        top = makeService(options)
        self.assertTrue(any(isinstance(s, HeapService) for s in top))
        core = next(s for s in top if hasattr(s, "reload_listeners"))
        gc.unfreeze()
        for listener in core.reload_listeners:
            listener(core.config)
        self.assertGreater(gc.get_freeze_count(), 1000)
