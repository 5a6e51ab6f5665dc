"""Reloads: coalescing of overlapping reloads and reloads that fail."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError
from llamaswap.service.reload import Coalescing
from llamaswap.supervision.process import ProcessState
from tests.support import free_port, poll_until
from tests.test_service import ServiceTestCase, responder_model


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


class ReloadWhileStartingTests(ServiceTestCase):
    async def start_from_file(self, models: dict[str, Any]) -> str:
        handle, path = tempfile.mkstemp(suffix=".yaml")
        os.close(handle)
        self.addCleanup(os.unlink, path)
        self.write(path, models)
        await self.start(models)
        self.service.sources = (path, None)
        return path

    def write(self, path: str, models: dict[str, Any]) -> None:
        with open(path, "w") as f:
            json.dump({"healthCheckTimeout": 15, "models": models}, f)

    async def test_waiters_of_a_changed_starting_model_get_the_new_process(self) -> None:
        """A reload that changes a model while it is starting lets the
        requests waiting for it wait for the new process: they are answered
        by it, not failed with the aborted start."""
        port = free_port()
        path = await self.start_from_file({"a": responder_model(port, "--startup-delay", "1")})
        waiting = defer.ensureDeferred(self.chat("a"))
        await poll_until(lambda: self.state("a") is ProcessState.STARTING)
        old = self.router.processes["a"]
        self.write(path, {"a": responder_model(port, "--print", "second-config")})
        await self.service.reload()
        response = await waiting
        body = await response.json()
        self.assertEqual(response.code, 200, body)
        new = self.router.processes["a"]
        self.assertIsNot(new, old)
        self.assertEqual(body["pid"], new.pid)
        self.assertEqual(old.state, ProcessState.STOPPED)
        self.assertIn(b"second-config", self.service.logs.model("a").history())
        await self.settled()
