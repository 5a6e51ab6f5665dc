"""Tests for the leaf helpers in llamaswap.core: text, log levels, Twisted internals."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import _HTTP11ClientFactory
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from llamaswap.core.loglevels import LEVELS, label, parse_level, rank
from llamaswap.core.text import as_text
from llamaswap.core.twistedweb import (
    after_flush,
    disconnected,
    quiet_http_client_factories,
    transport_paused,
)


class TextTests(SynchronousTestCase):
    def test_as_text(self) -> None:
        """Bytes are decoded as UTF-8 with bad bytes replaced; str passes through."""
        self.assertEqual(as_text(b"caf\xc3\xa9"), "café")
        self.assertEqual(as_text(b"a\xffb"), "a\ufffdb")
        self.assertEqual(as_text("x"), "x")


class LogLevelTests(SynchronousTestCase):
    def test_config_names(self) -> None:
        """The config's level names, in increasing severity, map to LogLevels."""
        self.assertEqual(list(LEVELS), ["debug", "info", "warn", "error"])
        self.assertEqual([parse_level(name) for name in LEVELS], list(LEVELS.values()))

    def test_lenient_parsing(self) -> None:
        """Case and spaces are ignored, ``warning`` means warn, unknown means info."""
        self.assertIs(parse_level(" DEBUG "), LogLevel.debug)
        self.assertIs(parse_level("warning"), LogLevel.warn)
        self.assertIs(parse_level("loud"), LogLevel.info)
        self.assertIs(parse_level(LogLevel.error), LogLevel.error)

    def test_labels_and_order(self) -> None:
        """Critical shows as ERROR (llama-swap has no CRITICAL); order follows severity."""
        self.assertEqual(
            [label(level) for level in LogLevel.iterconstants()],
            ["DEBUG", "INFO", "WARN", "ERROR", "ERROR"],
        )
        ranks = [rank(level) for level in LogLevel.iterconstants()]
        self.assertEqual(ranks, sorted(ranks))


class TwistedWebTests(SynchronousTestCase):
    def test_disconnected(self) -> None:
        """A request is disconnected once its connection is lost; an object
        without Twisted's flag counts as connected."""
        request = Request(DummyChannel())
        self.assertFalse(disconnected(request))
        request.connectionLost(Failure(ConnectionError("gone")))
        self.assertTrue(disconnected(request))
        self.assertFalse(disconnected(object()))

    def test_transport_paused(self) -> None:
        """Follows the channel's wait for its transport; no channel, not paused."""
        request = Request(DummyChannel())
        self.assertFalse(transport_paused(request))
        request.channel._waitingForTransport = True
        self.assertTrue(transport_paused(request))
        request.channel = None
        self.assertFalse(transport_paused(request))

    def test_quiet_http_client_factories(self) -> None:
        """Twisted's pooled HTTP client factories stop logging each connection."""
        self.patch(_HTTP11ClientFactory, "noisy", True)
        quiet_http_client_factories()
        self.assertFalse(_HTTP11ClientFactory.noisy)

    def test_after_flush_runs_after_calls_due_now(self) -> None:
        """The call is scheduled from a delayed call, so it runs after the
        calls already due, even those scheduled after it."""
        clock = Clock()
        calls: list[str] = []
        after_flush(clock, calls.append, "late")
        clock.callLater(0, calls.append, "now")
        self.assertEqual(calls, [])
        clock.advance(0)
        self.assertEqual(calls, ["now", "late"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_after_flush_calls_of_one_pass_share_delayed_calls(self) -> None:
        """Calls made in one pass cost one pair of delayed calls, run in
        order, and one that fails is logged without stopping the rest."""
        clock = Clock()
        calls: list[str] = []

        def fail() -> None:
            raise ValueError("boom")

        after_flush(clock, calls.append, "a")
        after_flush(clock, fail)
        after_flush(clock, calls.append, "b")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        self.assertEqual(calls, ["a", "b"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        after_flush(clock, calls.append, "c")
        clock.advance(0)
        self.assertEqual(calls, ["a", "b", "c"])
