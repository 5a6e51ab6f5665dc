"""Reloads: coalescing of overlapping reloads and reloads that fail."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError
from llamaswap.service.reload import Coalescing


class ScriptedWork:
    """Work whose runs are Deferreds the test fires one by one."""

    def __init__(self) -> None:
        self.runs: list[defer.Deferred[None]] = []

    def __call__(self) -> defer.Deferred[None]:
        run: defer.Deferred[None] = defer.Deferred()
        self.runs.append(run)
        return run


class CoalescingTests(SynchronousTestCase):
    def test_call_while_running_runs_once_more(self) -> None:
        """Calls made while a run is going share it and ask for exactly one
        more run after it."""
        work = ScriptedWork()
        coalesce = Coalescing(work)
        first = coalesce()
        second = coalesce()
        third = coalesce()
        self.assertEqual(len(work.runs), 1)
        work.runs[0].callback(None)
        self.assertEqual(len(work.runs), 2)
        self.assertNoResult(first)
        work.runs[1].callback(None)
        for d in (first, second, third):
            self.assertIsNone(self.successResultOf(d))
        coalesce()
        self.assertEqual(len(work.runs), 3)

    def test_failed_run_does_not_drop_the_one_queued_behind_it(self) -> None:
        """A run that fails (a broken config file) is still followed by the
        run asked for meanwhile (the fixed file), and the shared result is
        that last run's."""
        work = ScriptedWork()
        coalesce = Coalescing(work)
        first = coalesce()
        second = coalesce()
        work.runs[0].errback(ConfigError(["models.a.ttl: must be >= -1"]))
        self.assertEqual(len(work.runs), 2, "the queued reload was dropped")
        work.runs[1].callback(None)
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))

    def test_failure_of_the_last_run_is_reported(self) -> None:
        """When the last run fails, every caller sees its failure, and the
        next call starts afresh."""
        work = ScriptedWork()
        coalesce = Coalescing(work)
        first = coalesce()
        work.runs[0].errback(ConfigError(["broken"]))
        self.failureResultOf(first, ConfigError)
        again = coalesce()
        self.assertEqual(len(work.runs), 2)
        work.runs[1].callback(None)
        self.successResultOf(again)
