"""Time-outs of a model's start and stop that must hold: a hung ``cmdStop``
is killed at the stop deadline, a health probe that never gets an answer
cannot stall a start, and a failed health check says what the last probe
saw."""

from __future__ import annotations

import os
import re
import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from llamaswap.observe.logs import LogMonitor
from llamaswap.supervision.health import describe_probe_failure, http_probe, poll_health
from llamaswap.supervision.launcher import ProcessGroupLauncher
from llamaswap.supervision.process import ModelProcess, ProcessState, StartError
from tests.scripted import Script, serve
from tests.support import PYTHON, free_port, poll_until
from tests.test_process import (
    ProcessTestCase,
    capture_logs,
    is_gone,
    model_config,
    responder_config,
    within,
)

S = ProcessState


class StopCommandTests(ProcessTestCase):
    def test_hung_cmd_stop_killed_at_deadline(self) -> None:
        """A cmdStop still running when the stop's time budget is spent is
        SIGKILLed (its group) together with the model."""
        process, child = self.ready(cmd_stop="stopper ${PID}")
        done = process.stop(3)
        stopper = self.launcher.children[1]
        self.clock.pump([0.25] * 11)
        self.assertEqual(stopper.signals, [])
        self.clock.pump([0.25])
        self.assertEqual(child.signals, [signal.SIGKILL])
        child.exit(signum=signal.SIGKILL)
        self.assertEqual(stopper.signals, [signal.SIGKILL])
        self.assertNoResult(done)
        stopper.exit(signum=signal.SIGKILL)
        self.successResultOf(done)
        self.assertTrue(stopper.released)
        self.assertIn("cmdStop (pid 1002) still running at the stop deadline", self.logged())
        self.assertNotIn("cmdStop exited with", self.logged())
        self.assert_no_timers()

    def test_cmd_stop_outliving_the_model_is_killed_at_deadline(self) -> None:
        """The model exits at once but cmdStop hangs: the stop ends when
        cmdStop is killed at the deadline, not before (no orphan)."""
        process, child = self.ready(cmd_stop="stopper ${PID}")
        done = process.stop(2)
        stopper = self.launcher.children[1]
        child.exit(0)
        self.assertNoResult(done)
        self.assertEqual(process.state, S.STOPPING)
        self.clock.pump([0.25] * 8)
        self.assertEqual(stopper.signals, [signal.SIGKILL])
        stopper.exit(signum=signal.SIGKILL)
        self.successResultOf(done)
        self.assertEqual(process.state, S.STOPPED)
        self.assert_no_timers()

    def test_prompt_cmd_stop_is_not_killed(self) -> None:
        process, child = self.ready(cmd_stop="stopper ${PID}")
        done = process.stop(2)
        stopper = self.launcher.children[1]
        stopper.exit(0)
        child.exit(0)
        self.successResultOf(done)
        self.assertEqual(stopper.signals, [])
        self.assert_no_timers()


class HealthMessageTests(ProcessTestCase):
    def fail_start(self, health_check_timeout: float = 15) -> str:
        process = self.make(health_check_timeout=health_check_timeout)
        waiter = process.make_ready()
        self.clock.pump([0.25] * int(health_check_timeout * 4 + 4))
        message: str = self.failureResultOf(waiter, StartError).value.message
        self.launcher.children[0].exit(0)
        return message

    def test_last_status_is_named(self) -> None:
        """A server answering 404 (wrong checkEndpoint): the error and the log
        line say so, with the URL probed."""
        self.probe.answer = 404
        message = self.fail_start()
        expected = (
            "health check timed out after 15s "
            "(last probe on http://127.0.0.1:5800/health: status 404)"
        )
        self.assertEqual(message, expected)
        self.assertIn(f"m start failed: {expected}", self.logged())

    def test_refused_is_named(self) -> None:
        self.probe.answer = ConnectionRefusedError()
        self.assertIn(": connection refused)", self.fail_start())

    def test_unanswered_probe_is_named(self) -> None:
        """A probe that never gets an answer: its own time-out ends it, and
        the error says how long it waited."""
        message = self.fail_start(health_check_timeout=7)
        self.assertTrue(message.endswith(": no answer within 1.75s)"), message)
        self.assertEqual(
            [(round(when, 2), round(timeout, 2)) for when, _, timeout, _ in self.probe.calls],
            [(0.0, 5.0), (5.25, 1.75)],
        )


class SqueezedProbeTests(SynchronousTestCase):
    def test_squeezed_last_probe_keeps_what_was_seen(self) -> None:
        """A probe started in the deadline's last moment (a loaded machine)
        sees nothing; the message keeps the earlier probes' "status 503"
        instead of "no answer within 0s"."""
        from twisted.internet.defer import Deferred, ensureDeferred, succeed
        from twisted.internet.task import Clock

        clock = Clock()
        deadline = 1.0

        def probe(url: str, timeout: float) -> Deferred[int]:
            if deadline - clock.seconds() < 0.1:
                return Deferred()  # never answers: its own time-out ends it
            return succeed(503)

        verdict = ensureDeferred(poll_health(clock, probe, "http://h/health", deadline, "m"))
        for _ in range(200):
            clock.advance(0.01)
        result = self.successResultOf(verdict)
        self.assertFalse(result.healthy)
        self.assertEqual(result.last_seen, "status 503")


class DescribeProbeFailureTests(SynchronousTestCase):
    def test_words(self) -> None:
        """Each way a probe fails has a short description for the error."""
        cases = [
            (ConnectionRefusedError(), "connection refused"),
            (DeferredTimeout(), "no answer within 1.5s"),
            (ResponseNeverReceived([Failure(CancelledError())]), "no answer within 1.5s"),
            (ConnectingCancelledError(None), "not connected within 1.5s"),
            (
                ResponseNeverReceived([Failure(ConnectionDone())]),
                "connection closed without an HTTP response",
            ),
            (DNSLookupError("nohost"), "host name not found (DNS lookup failed: nohost.)"),
            (ValueError("odd"), "ValueError: odd"),
        ]
        for error, words in cases:
            self.assertEqual(describe_probe_failure(error, 1.5), words)
        self.assertIn(
            "bad", describe_probe_failure(ResponseFailed([Failure(ValueError("bad"))]), 1)
        )


def _sleeper(port: int, **overrides: Any) -> Any:
    """A model whose process runs but whose ``proxy`` is ``port``."""
    argv = (PYTHON, "-c", "import time; time.sleep(60)")
    values: dict[str, Any] = {
        "id": "sleeper",
        "argv": argv,
        "cmd": " ".join(argv),
        "proxy": f"http://127.0.0.1:{port}",
    }
    values.update(overrides)
    return model_config(**values)


class RealTimeoutTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.monitor = LogMonitor("m")
        self.log_events: list[dict[str, Any]] = []
        capture_logs(self, self.log_events)

    def make(self, config: Any, health_check_timeout: float = 20) -> ModelProcess:
        process = ModelProcess(
            config,
            clock=reactor,
            health_check_timeout=health_check_timeout,
            output=self.monitor,
            environ=os.environ,
            probe=http_probe(reactor),
            launcher=ProcessGroupLauncher(reactor),
        )
        self.addCleanup(process.shutdown, 1)
        return process

    async def failed_start(self, process: ModelProcess) -> str:
        try:
            await within(process.make_ready(), 20)
        except StartError as e:
            return e.message
        self.fail("start did not fail")

    async def test_hung_probe_cannot_stall_start(self) -> None:
        """A server that accepts the health probe's connection and never
        answers: the start fails at healthCheckTimeout, saying so, and the
        probe's connection is closed."""
        script = Script(["hang"])
        server = serve(script)
        self.addCleanup(server.stopListening)
        process = self.make(_sleeper(server.getHost().port), health_check_timeout=1)
        started = reactor.seconds()
        message = await self.failed_start(process)
        self.assertLess(reactor.seconds() - started, 3)
        self.assertTrue(
            message.startswith("health check timed out after 1s (last probe on"), message
        )
        self.assertTrue(message.endswith("/health: no answer within 1s)"), message)
        self.assertEqual(len(script.seen), 1)
        await poll_until(lambda: script.lost == script.connections)

    async def test_refused_real_probe_is_named(self) -> None:
        process = self.make(_sleeper(free_port()), health_check_timeout=1)
        message = await self.failed_start(process)
        self.assertTrue(message.endswith("/health: connection refused)"), message)
        logged = "\n".join(formatEvent(e) for e in self.log_events)
        self.assertIn("sleeper start failed: health check timed out after 1s", logged)
        self.assertIn("connection refused", logged)

    async def test_hung_cmd_stop_leaves_no_orphan(self) -> None:
        """A real cmdStop that hangs is killed with the model when
        unloadTimeout is spent; no process of either is left."""
        cmd_stop = (
            f"{PYTHON} -c \"import os, time; print('STOPPER', os.getpid(), flush=True);"
            f' time.sleep(60)"'
        )
        process = self.make(responder_config(free_port(), cmd_stop=cmd_stop))
        await within(process.make_ready(), 20)
        pid = process.pid
        assert pid is not None
        started = reactor.seconds()
        stopping = process.stop(1)
        await poll_until(lambda: re.search(r"STOPPER \d+\n", self.monitor.history().decode()))
        stopper = int(re.findall(r"STOPPER (\d+)", self.monitor.history().decode())[0])
        await within(stopping, 15)
        self.assertGreaterEqual(reactor.seconds() - started, 1)
        self.assertEqual(process.state, S.STOPPED)
        self.assertTrue(is_gone(pid))
        self.assertTrue(is_gone(stopper))

    async def test_probe_reads_no_body(self) -> None:
        """A probe takes the status and closes its connection: a server that
        streams a body forever holds no probe connection open."""
        script = Script([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"])
        server = serve(script)
        self.addCleanup(server.stopListening)
        url = f"http://127.0.0.1:{server.getHost().port}/health"
        self.assertEqual(await within(http_probe(reactor)(url, 5), 10), 200)
        await poll_until(lambda: script.lost == 1)
