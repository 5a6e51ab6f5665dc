"""Prewarm: a waiting start reads its model's files into the page cache."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap.config.model import ModelConfig
from llamaswap.supervision.prewarm import Prewarm, model_files, prewarm_for
from tests.support import free_port, poll_until
from tests.test_service import ServiceTestCase, responder_model

MIB = 1 << 20


def now(work: Callable[[], int]) -> defer.Deferred[int]:
    """A thread seam that runs the work at once, on this thread."""
    return defer.succeed(work())


def files(test: SynchronousTestCase, *sizes: int) -> list[str]:
    folder = test.mktemp()
    os.makedirs(folder)
    paths = []
    for i, size in enumerate(sizes):
        path = os.path.join(folder, f"part{i}.gguf")
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        paths.append(path)
    return paths


class ModelFilesTests(SynchronousTestCase):
    def test_model_flag_of_the_command(self) -> None:
        config = ModelConfig(
            id="m", argv=("llama-server", "-m", "/w/a.gguf", "--port", "1"), cmd=""
        )
        self.assertEqual(model_files(config), ("/w/a.gguf",))
        config = ModelConfig(id="m", argv=("srv", "--model", "/w/b.gguf"), cmd="")
        self.assertEqual(model_files(config), ("/w/b.gguf",))
        config = ModelConfig(id="m", argv=("srv", "--model=/w/c.gguf"), cmd="")
        self.assertEqual(model_files(config), ("/w/c.gguf",))

    def test_files_list_wins(self) -> None:
        config = ModelConfig(id="m", argv=("srv", "-m", "/w/a"), cmd="", files=("/x/1", "/x/2"))
        self.assertEqual(model_files(config), ("/x/1", "/x/2"))

    def test_no_files_no_prewarm(self) -> None:
        self.assertIsNone(prewarm_for(ModelConfig(id="m", argv=("srv", "--port", "1"), cmd="")))


class PrewarmTests(SynchronousTestCase):
    def test_reads_every_file(self) -> None:
        paths = files(self, 3 * MIB + 5, MIB)
        prewarm = Prewarm(paths, budget=lambda: 1 << 40, run=now, chunk=MIB)
        self.assertEqual(self.successResultOf(prewarm.start()), 4 * MIB + 5)

    def test_never_more_than_the_ram_allows(self) -> None:
        paths = files(self, 2 * MIB, 2 * MIB)
        chunks: list[int] = []
        prewarm = Prewarm(paths, budget=lambda: 3 * MIB, run=now, chunk=MIB, on_chunk=chunks.append)
        self.assertEqual(self.successResultOf(prewarm.start()), 3 * MIB)
        self.assertEqual(sum(chunks), 3 * MIB)

    def test_concurrent_prewarms_share_the_ram(self) -> None:
        """A prewarm that starts while another reads gets what the first
        has not claimed; once the first is done, its claim is free again."""
        first_paths, second_paths = files(self, 2 * MIB), files(self, 2 * MIB)
        budget = lambda: 3 * MIB  # noqa: E731
        second = Prewarm(second_paths, budget=budget, run=now, chunk=MIB)
        started: list[defer.Deferred[int]] = []

        def after_chunk(n: int) -> None:
            if not started:
                started.append(second.start())

        first = Prewarm(first_paths, budget=budget, run=now, chunk=MIB, on_chunk=after_chunk)
        self.assertEqual(self.successResultOf(first.start()), 2 * MIB)
        self.assertEqual(self.successResultOf(started[0]), MIB)
        third = Prewarm(second_paths, budget=budget, run=now, chunk=MIB)
        self.assertEqual(self.successResultOf(third.start()), 2 * MIB)

    def test_no_ram_no_reading(self) -> None:
        prewarm = Prewarm(files(self, MIB), budget=lambda: 0, run=now, chunk=MIB)
        self.assertEqual(self.successResultOf(prewarm.start()), 0)

    def test_cancel_stops_between_chunks(self) -> None:
        paths = files(self, 4 * MIB, 4 * MIB)
        prewarm: Prewarm

        def after_chunk(n: int) -> None:
            if prewarm.read >= 2 * MIB:
                prewarm.cancel()

        prewarm = Prewarm(paths, budget=lambda: 1 << 40, run=now, chunk=MIB, on_chunk=after_chunk)
        self.assertEqual(self.successResultOf(prewarm.start()), 2 * MIB)
        self.assertTrue(prewarm.cancelled)

    def test_missing_file_is_skipped(self) -> None:
        paths = files(self, MIB)
        prewarm = Prewarm(["/nonexistent/x.gguf", *paths], budget=lambda: 1 << 40, run=now)
        self.assertEqual(self.successResultOf(prewarm.start()), MIB)
        self.assertEqual(len(prewarm.skipped), 1)
        self.assertIn("/nonexistent/x.gguf", prewarm.skipped[0])


class ThreadTests(TestCase):
    async def test_cancel_from_the_reactor_while_a_thread_reads(self) -> None:
        """The default seam reads in a thread; a cancel from the reactor
        thread ends it early."""
        paths = files(self, 8 * MIB)
        started = defer.Deferred[None]()
        gate = threading.Event()

        def after_chunk(n: int) -> None:
            if not gate.is_set():
                reactor.callFromThread(started.callback, None)
                gate.wait(10)

        prewarm = Prewarm(paths, budget=lambda: 1 << 40, chunk=MIB, on_chunk=after_chunk)
        done = prewarm.start()
        await started
        prewarm.cancel()
        gate.set()
        self.assertEqual(await done, MIB)


def slow_to_stop() -> dict[str, Any]:
    """A model whose stop takes about a second (its cmdStop waits, then kills)."""
    return responder_model(free_port(), cmdStop="sh -c 'sleep 1; kill -KILL ${PID}'")


class _HeldPrewarm(Prewarm):
    """A prewarm whose reading thread finishes only when the test says."""

    def __init__(self, paths: Any) -> None:
        self.finish: defer.Deferred[int] = defer.Deferred()
        super().__init__(paths, run=lambda work: self.finish)


class RouterPrewarmTests(ServiceTestCase):
    async def _slow_swap(self) -> tuple[str, list[Prewarm]]:
        """Model a is ready and slow to stop (it ignores SIGTERM); a request
        for b is sent and its swap waits for a's stop."""
        (weights,) = files(self, MIB)
        await self.start(
            {
                "a": slow_to_stop(),
                "b": responder_model(free_port(), files=[weights]),
            },
        )
        made: list[Prewarm] = []

        def factory(config: ModelConfig) -> Prewarm | None:
            prewarm = prewarm_for(config)
            if prewarm is not None:
                prewarm = _HeldPrewarm(prewarm.paths)
                made.append(prewarm)
            return prewarm

        self.router._prewarm_factory = factory
        response = await self.chat("a")
        await response.content()
        return weights, made

    async def test_evictions_draining_prewarm_the_target(self) -> None:
        weights, made = await self._slow_swap()
        pending = defer.ensureDeferred(self.chat("b"))
        await poll_until(lambda: bool(made))
        self.assertEqual(made[0].paths, (weights,))
        self.assertFalse(made[0].cancelled)
        response = await pending
        self.assertEqual(response.code, 200)
        await response.content()
        # The swap is over: the prewarm is called off.
        self.assertTrue(made[0].cancelled)
        made[0].finish.callback(0)
        await self.settled()

    async def test_queued_behind_another_swap_prewarms(self) -> None:
        """A request for c queued behind the swap to b (both evict a, which
        is slow to stop) prewarms c's files while it waits."""
        (weights,) = files(self, MIB)
        await self.start(
            {
                "a": slow_to_stop(),
                "b": responder_model(free_port()),
                "c": responder_model(free_port(), files=[weights]),
            },
        )
        made: dict[str, _HeldPrewarm] = {}

        def factory(config: ModelConfig) -> Prewarm | None:
            prewarm = prewarm_for(config)
            if prewarm is None:
                return None
            made[config.id] = _HeldPrewarm(prewarm.paths)
            return made[config.id]

        self.router._prewarm_factory = factory
        response = await self.chat("a")
        await response.content()
        to_b = defer.ensureDeferred(self.chat("b"))
        await poll_until(lambda: self.router.scheduler.is_swapping("b"))
        to_c = defer.ensureDeferred(self.chat("c"))
        await poll_until(lambda: "c" in made)
        self.assertEqual(self.router.scheduler.snapshot().queued, ("c",))
        self.assertEqual(made["c"].paths, (weights,))
        self.assertFalse(made["c"].cancelled)
        for pending in (to_b, to_c):
            answered = await pending
            await answered.content()
        self.assertTrue(made["c"].cancelled)  # its swap is over
        made["c"].finish.callback(0)
        await self.settled()

    async def test_prewarm_false_is_never_prewarmed(self) -> None:
        """b (``prewarm: false``) waits for a's slow stop and c queues behind
        it: c's files are read ahead, b's never are."""
        (b_weights,) = files(self, MIB)
        (c_weights,) = files(self, MIB)
        await self.start(
            {
                "a": slow_to_stop(),
                "b": responder_model(free_port(), files=[b_weights], prewarm=False),
                "c": responder_model(free_port(), files=[c_weights]),
            },
        )
        self.assertIsNone(prewarm_for(self.router.processes["b"].config))
        asked: list[str] = []
        made: dict[str, _HeldPrewarm] = {}

        def factory(config: ModelConfig) -> Prewarm | None:
            asked.append(config.id)
            made[config.id] = _HeldPrewarm(model_files(config))
            return made[config.id]

        self.router._prewarm_factory = factory
        response = await self.chat("a")
        await response.content()
        to_b = defer.ensureDeferred(self.chat("b"))
        await poll_until(lambda: self.router.scheduler.is_swapping("b"))
        to_c = defer.ensureDeferred(self.chat("c"))
        await poll_until(lambda: "c" in made)
        for pending in (to_b, to_c):
            answered = await pending
            self.assertEqual(answered.code, 200)
            await answered.content()
        self.assertEqual(asked, ["c"])
        made["c"].finish.callback(0)
        await self.settled()

    async def test_unload_cancels_the_prewarm(self) -> None:
        weights, made = await self._slow_swap()
        pending = defer.ensureDeferred(self.chat("b"))
        await poll_until(lambda: bool(made))
        await self.router.unload(["b"])
        self.assertTrue(made[0].cancelled)
        response = await pending
        self.assertNotEqual(response.code, 200)
        await response.content()
        made[0].finish.callback(0)
        await self.settled()

    async def test_real_prewarm_reads_in_a_thread(self) -> None:
        """Without a test seam: the files are read in a thread and the
        prewarm is gone once the swap is over."""
        (weights,) = files(self, 2 * MIB)
        await self.start(
            {
                "a": slow_to_stop(),
                "b": responder_model(free_port(), files=[weights]),
            },
        )
        made: list[Prewarm] = []

        def factory(config: ModelConfig) -> Prewarm | None:
            prewarm = prewarm_for(config)
            made.extend([prewarm] if prewarm is not None else [])
            return prewarm

        self.router._prewarm_factory = factory
        response = await self.chat("a")
        await response.content()
        pending = defer.ensureDeferred(self.chat("b"))
        await poll_until(lambda: bool(made))
        assert made[0].done is not None
        self.assertEqual(await made[0].done, 2 * MIB)
        response = await pending
        await response.content()
        self.assertEqual(self.router._prewarms, {})
        await self.settled()
