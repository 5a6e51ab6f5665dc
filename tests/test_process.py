"""Tests for llamaswap.supervision.process: the supervised child process of one model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psutil
from automat import NoTransition
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.process import ProcessReader
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from llamaswap.config.model import ModelConfig
from llamaswap.observe.logs import LogMonitor
from llamaswap.supervision import launcher as launcher_module
from llamaswap.supervision import lifecycle as lifecycle_module
from llamaswap.supervision import machine as machine_module
from llamaswap.supervision import process as process_module
from llamaswap.supervision import teardown as teardown_module
from llamaswap.supervision.health import http_probe
from llamaswap.supervision.launcher import (
    PYTHON_TRAMPOLINE,
    RESCAN_INTERVAL,
    ExitStatus,
    GroupLiveness,
    IChildProcess,
    IProcessLauncher,
    ProcessGroupLauncher,
    group_alive,
)
from llamaswap.supervision.lifecycle import LifecycleCore
from llamaswap.supervision.machine import LifecycleMachine
from llamaswap.supervision.process import ModelProcess, ProcessState, StartError
from llamaswap.supervision.teardown import KILL_WAIT
from tests.support import PYTHON, RESPONDER, free_port, poll_until

S = ProcessState


def capture_logs(test: SynchronousTestCase, events: list[dict[str, Any]]) -> None:
    """Send what the process, its state machine and its teardown log to ``events``."""
    for module in (process_module, lifecycle_module, machine_module, teardown_module):
        test.patch(module, "log", Logger(namespace=module.__name__, observer=events.append))


def model_config(**overrides: Any) -> ModelConfig:
    values: dict[str, Any] = {
        "id": "m",
        "argv": ("server", "--port", "5800"),
        "cmd": "server --port 5800",
        "proxy": "http://127.0.0.1:5800",
    }
    values.update(overrides)
    return ModelConfig(**values)


@implementer(IChildProcess)
class FakeChild:
    """A child whose exit and group membership the test controls."""

    def __init__(
        self,
        pid: int,
        argv: Sequence[str],
        env: Mapping[str, str],
        on_output: Callable[[bytes], None],
        on_exit: Callable[[ExitStatus], None],
    ) -> None:
        self.pid = pid
        self.argv = tuple(argv)
        self.env = dict(env)
        self._on_output = on_output
        self._on_exit = on_exit
        self.signals: list[int] = []
        self.leader_alive = True
        #: other members of the group (grandchildren) still running.
        self.members_alive = False
        self.released = False

    def signal_group(self, signum: int) -> None:
        self.signals.append(signum)

    def group_alive(self) -> bool:
        return self.leader_alive or self.members_alive

    def release(self) -> Deferred[None]:
        self.released = True
        return succeed(None)

    def write(self, data: bytes) -> None:
        self._on_output(data)

    def exit(self, code: int | None = 0, signum: int | None = None) -> None:
        self.leader_alive = False
        self._on_exit(ExitStatus(None if signum else code, signum))


@implementer(IProcessLauncher)
class FakeLauncher:
    """Records spawned children; programs named in ``missing`` fail to start."""

    def __init__(self) -> None:
        self.children: list[FakeChild] = []
        self.missing: set[str] = set()

    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        on_output: Callable[[bytes], None],
        on_exit: Callable[[ExitStatus], None],
    ) -> FakeChild:
        if argv[0] in self.missing:
            raise FileNotFoundError(f"no such program {argv[0]}")
        child = FakeChild(1001 + len(self.children), argv, env, on_output, on_exit)
        self.children.append(child)
        return child


class FakeProbe:
    """Health probe: records calls; answers ``status`` at once unless None."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.calls: list[tuple[float, str, float, Deferred[int]]] = []
        #: an int answers at once, an exception fails at once, None hangs.
        self.answer: int | Exception | None = None

    def __call__(self, url: str, timeout: float) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.calls.append((self._clock.seconds(), url, timeout, d))
        if isinstance(self.answer, Exception):
            d.errback(self.answer)
        elif self.answer is not None:
            d.callback(self.answer)
        return d

    def times(self) -> list[float]:
        return [round(when, 3) for when, _, _, _ in self.calls]


class ProcessTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.launcher = FakeLauncher()
        self.probe = FakeProbe(self.clock)
        self.monitor = LogMonitor("m")
        self.events: list[tuple[ProcessState, ProcessState]] = []
        self.log_events: list[dict[str, Any]] = []
        capture_logs(self, self.log_events)

    def make(self, health_check_timeout: float = 15, **overrides: Any) -> ModelProcess:
        process = ModelProcess(
            model_config(**overrides),
            clock=self.clock,
            health_check_timeout=health_check_timeout,
            output=self.monitor,
            environ={"PATH": "/bin"},
            probe=self.probe,
            launcher=self.launcher,
        )
        process.add_state_listener(self._seen)
        self.assertEqual(process.state_value, "stopped")
        return process

    def _seen(self, process: ModelProcess, old: ProcessState, new: ProcessState) -> None:
        # Listeners see the state, and its plain-string copy, already moved.
        assert process.state is new and process.state_value == new.value, (process, new)
        self.events.append((old, new))

    def ready(self, **overrides: Any) -> tuple[ModelProcess, FakeChild]:
        process = self.make(check_endpoint=None, **overrides)
        self.successResultOf(process.make_ready())
        return process, self.launcher.children[-1]

    def logged(self) -> str:
        return "\n".join(formatEvent(event) for event in self.log_events)

    def assert_no_timers(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FakesTests(ProcessTestCase):
    def test_fakes_provide_interfaces(self) -> None:
        """The fakes implement the launcher and child interfaces."""
        verifyObject(IProcessLauncher, self.launcher)
        process, child = self.ready()
        verifyObject(IChildProcess, child)


class StartTests(ProcessTestCase):
    def test_ready_right_after_spawn_without_health_check(self) -> None:
        """With no checkEndpoint the process is ready as soon as it is spawned."""
        process, child = self.ready()
        self.assertEqual(process.state, S.READY)
        self.assertEqual(process.pid, 1001)
        self.assertEqual(child.argv, ("server", "--port", "5800"))
        self.assertEqual(self.probe.calls, [])
        self.assertEqual(self.events, [(S.STOPPED, S.STARTING), (S.STARTING, S.READY)])

    def test_environment_is_environ_plus_model_env(self) -> None:
        """The child's environment is the given environ updated by env, later entries winning."""
        process = ModelProcess(
            model_config(check_endpoint=None, env=(("B", "3"), ("C", "4"), ("C", "5"))),
            clock=self.clock,
            health_check_timeout=15,
            output=self.monitor,
            environ={"A": "1", "B": "2"},
            probe=self.probe,
            launcher=self.launcher,
        )
        self.successResultOf(process.make_ready())
        self.assertEqual(self.launcher.children[0].env, {"A": "1", "B": "3", "C": "5"})

    def test_output_goes_to_log(self) -> None:
        """Child output is written to the model's log monitor as it arrives."""
        process, child = self.ready()
        child.write(b"hello ")
        child.write(b"world\n")
        self.assertEqual(self.monitor.history(), b"hello world\n")

    def test_health_polling_schedule(self) -> None:
        """The first probe runs right after spawn; later probes wait a tenth
        of the time spent so far, at least 10 ms and at most 250 ms."""
        self.probe.answer = ConnectionRefusedError()
        process = self.make()
        waiter = process.make_ready()
        sleeps = []
        for _ in range(60):
            (sleep,) = self.clock.getDelayedCalls()
            sleeps.append((self.clock.seconds(), sleep.getTime() - self.clock.seconds()))
            self.clock.advance(sleep.getTime() - self.clock.seconds())
        self.assertEqual([round(delay, 6) for _, delay in sleeps[:10]], [0.01] * 10)
        for elapsed, delay in sleeps:
            self.assertAlmostEqual(delay, min(max(elapsed * 0.1, 0.01), 0.25), places=9)
        self.assertAlmostEqual(sleeps[-1][1], 0.25, places=9)
        self.assertEqual(len(self.probe.calls), 61)
        self.assertEqual(self.probe.calls[0][:3], (0.0, "http://127.0.0.1:5800/health", 5.0))
        self.assertNoResult(waiter)
        self.probe.answer = 200
        self.clock.advance(0.25)
        self.successResultOf(waiter)
        self.assertEqual(process.state, S.READY)
        self.assertIn("m Health check passed on http://127.0.0.1:5800/health", self.logged())
        self.assert_no_timers()

    def test_probe_cancelled_with_another_error_still_aborts(self) -> None:
        """A probe whose cancellation fails with a non-CancelledError does not keep polling."""
        probe_calls: list[Deferred[int]] = []

        def probe(url: str, timeout: float) -> Deferred[int]:
            d: Deferred[int] = Deferred(lambda d: d.errback(RuntimeError("connect cancelled")))
            probe_calls.append(d)
            return d

        process = ModelProcess(
            model_config(),
            clock=self.clock,
            health_check_timeout=15,
            output=self.monitor,
            environ={},
            probe=probe,
            launcher=self.launcher,
        )
        waiter = process.make_ready()
        done = process.stop(0)
        self.failureResultOf(waiter, StartError)
        self.launcher.children[0].exit(signum=signal.SIGKILL)
        self.successResultOf(done)
        self.assertEqual(len(probe_calls), 1)
        self.assert_no_timers()

    def test_only_200_counts(self) -> None:
        """A non-200 answer is retried like a refused connection."""
        self.probe.answer = 503
        process = self.make()
        waiter = process.make_ready()
        self.clock.advance(0.01)
        self.assertNoResult(waiter)
        self.assertEqual(len(self.probe.calls), 2)
        self.probe.answer = 200
        self.clock.advance(0.02)
        self.successResultOf(waiter)

    def test_health_deadline_kills_child(self) -> None:
        """At the deadline the start fails and the child is stopped (TERM, KILL after 5 s)."""
        self.probe.answer = ConnectionRefusedError()
        process = self.make(health_check_timeout=15)
        waiter = process.make_ready()
        self.clock.pump([0.25] * 59)
        self.assertNoResult(waiter)
        self.clock.pump([0.25] * 2)
        failure = self.failureResultOf(waiter, StartError)
        self.assertEqual(
            failure.value.message,
            "health check timed out after 15s"
            " (last probe on http://127.0.0.1:5800/health: connection refused)",
        )
        child = self.launcher.children[0]
        self.assertEqual(process.state, S.STOPPING)
        self.assertEqual(child.signals, [signal.SIGTERM])
        self.clock.pump([0.25] * 20)
        self.assertEqual(child.signals, [signal.SIGTERM, signal.SIGKILL])
        child.exit(signum=signal.SIGKILL)
        self.assertEqual(process.state, S.STOPPED)
        self.assertEqual(
            self.events,
            [(S.STOPPED, S.STARTING), (S.STARTING, S.STOPPING), (S.STOPPING, S.STOPPED)],
        )
        self.assert_no_timers()

    def test_hanging_probe_is_bounded(self) -> None:
        """Each probe has its own timeout, capped by the time left before the deadline."""
        process = self.make(health_check_timeout=7)
        waiter = process.make_ready()
        self.clock.advance(5)
        self.assertTrue(self.probe.calls[0][3].called)
        self.clock.advance(0.25)
        self.clock.advance(1.75)
        self.failureResultOf(waiter, StartError)
        self.assertEqual(
            [(round(when, 2), round(timeout, 2)) for when, _, timeout, _ in self.probe.calls],
            [(0.0, 5.0), (5.25, 1.75)],
        )
        self.launcher.children[0].exit(signum=signal.SIGTERM)
        self.assert_no_timers()

    def test_premature_exit_fails_at_once_with_output(self) -> None:
        """A child that exits while starting fails the start at once, quoting its last lines."""
        process = self.make()
        waiter = process.make_ready()
        child = self.launcher.children[0]
        child.write(b"loading model\nerror: out of memory\n")
        child.exit(3)
        failure = self.failureResultOf(waiter, StartError)
        self.assertEqual(
            failure.value.message,
            "upstream command exited prematurely with exit code 3: "
            "loading model\nerror: out of memory",
        )
        self.assertEqual(process.state, S.STOPPED)
        self.assertEqual(process.pid, None)
        self.assertTrue(self.probe.calls[0][3].called)
        self.assertTrue(child.released)
        self.assertEqual(self.events, [(S.STOPPED, S.STARTING), (S.STARTING, S.STOPPED)])
        self.assert_no_timers()

    def test_premature_exit_by_signal(self) -> None:
        """A start killed by a signal names the signal."""
        process = self.make()
        waiter = process.make_ready()
        self.launcher.children[0].exit(signum=signal.SIGSEGV)
        failure = self.failureResultOf(waiter, StartError)
        self.assertEqual(
            failure.value.message, "upstream command exited prematurely with signal 11 (SIGSEGV)"
        )

    def test_spawn_failure(self) -> None:
        """A program that cannot be started fails the start immediately."""
        self.launcher.missing.add("server")
        process = self.make()
        failure = self.failureResultOf(process.make_ready(), StartError)
        self.assertEqual(
            failure.value.message,
            "failed to start command 'server --port 5800': no such program server",
        )
        self.assertEqual(process.state, S.STOPPED)
        self.assertEqual(self.events, [(S.STOPPED, S.STARTING), (S.STARTING, S.STOPPED)])

    def test_empty_command(self) -> None:
        """An empty argv fails with 'empty command'."""
        process = self.make(argv=())
        failure = self.failureResultOf(process.make_ready(), StartError)
        self.assertEqual(failure.value.message, "empty command")

    def test_not_found_on_path_with_real_launcher(self) -> None:
        """The real launcher looks argv[0] up in PATH before spawning and reports it."""
        process = ModelProcess(
            model_config(argv=("no-such-program-xyz", "-v")),
            clock=self.clock,
            health_check_timeout=15,
            output=self.monitor,
            environ={"PATH": "/nonexistent"},
            probe=self.probe,
            launcher=ProcessGroupLauncher(self.clock, trampoline=("unused",)),  # type: ignore[arg-type]
        )
        failure = self.failureResultOf(process.make_ready(), StartError)
        self.assertEqual(
            failure.value.message,
            "failed to start command 'no-such-program-xyz -v': "
            'exec: "no-such-program-xyz": executable file not found in $PATH',
        )

    def test_concurrent_make_ready_joins_one_start(self) -> None:
        """Callers arriving while starting join the same start; cancelling one detaches only it."""
        self.probe.answer = ConnectionRefusedError()
        process = self.make()
        first = process.make_ready()
        second = process.make_ready()
        third = process.make_ready()
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertEqual(len(self.launcher.children), 1)
        self.probe.answer = 200
        self.clock.advance(0.01)
        self.successResultOf(first)
        self.successResultOf(third)
        self.successResultOf(process.make_ready())
        self.assertEqual(len(self.launcher.children), 1)

    def test_start_goes_on_when_every_caller_detaches(self) -> None:
        """Cancelling the only waiter does not abort the start."""
        self.probe.answer = ConnectionRefusedError()
        process = self.make()
        waiter = process.make_ready()
        waiter.cancel()
        self.failureResultOf(waiter, CancelledError)
        self.probe.answer = 200
        self.clock.advance(0.01)
        self.assertEqual(process.state, S.READY)


class StopTests(ProcessTestCase):
    def test_normal_life_events(self) -> None:
        """A normal life emits stopped, starting, ready, stopping, stopped."""
        process, child = self.ready()
        done = process.stop()
        self.assertNoResult(done)
        self.assertEqual(child.signals, [signal.SIGTERM])
        child.exit(0)
        self.successResultOf(done)
        self.assertEqual(
            self.events,
            [
                (S.STOPPED, S.STARTING),
                (S.STARTING, S.READY),
                (S.READY, S.STOPPING),
                (S.STOPPING, S.STOPPED),
            ],
        )
        self.assertTrue(child.released)
        self.assertEqual(process.pid, None)
        self.assert_no_timers()

    def test_stop_is_idempotent(self) -> None:
        """Stopping a stopped process succeeds at once; concurrent stops share one."""
        process = self.make()
        self.successResultOf(process.stop())
        self.assertEqual(self.events, [])
        self.successResultOf(process.stop())
        process, child = self.ready()
        first, second = process.stop(), process.stop()
        self.assertEqual(child.signals, [signal.SIGTERM])
        self.assertNoResult(first)
        self.assertNoResult(second)
        child.exit(0)
        self.successResultOf(first)
        self.successResultOf(second)
        self.successResultOf(process.stop())

    def test_sigkill_after_timeout(self) -> None:
        """A child still alive after the graceful timeout gets SIGKILL to its group."""
        process, child = self.ready()
        done = process.stop(3)
        self.clock.pump([0.25] * 11)
        self.assertEqual(child.signals, [signal.SIGTERM])
        self.clock.pump([0.25] * 2)
        self.assertEqual(child.signals, [signal.SIGTERM, signal.SIGKILL])
        self.assertNoResult(done)
        child.exit(signum=signal.SIGKILL)
        self.successResultOf(done)
        self.assert_no_timers()

    def test_default_timeout_is_unload_timeout(self) -> None:
        """stop() without a timeout uses the model's unloadTimeout."""
        process, child = self.ready(unload_timeout=2)
        process.stop()
        self.clock.pump([0.25] * 7)
        self.assertEqual(child.signals, [signal.SIGTERM])
        self.clock.pump([0.25] * 2)
        self.assertEqual(child.signals, [signal.SIGTERM, signal.SIGKILL])
        child.exit(signum=signal.SIGKILL)

    def test_later_stop_brings_the_deadline_forward(self) -> None:
        """A stop with a shorter timeout during a stop kills sooner."""
        process, child = self.ready()
        process.stop(100)
        self.clock.advance(1)
        process.stop(1)
        self.clock.pump([0.25] * 5)
        self.assertEqual(child.signals, [signal.SIGTERM, signal.SIGKILL])
        child.exit(signum=signal.SIGKILL)
        self.assert_no_timers()

    def test_stop_waits_for_grandchildren(self) -> None:
        """The stop completes only once no member of the process group remains."""
        process, child = self.ready()
        child.members_alive = True
        done = process.stop(10)
        child.exit(0)
        self.clock.pump([0.25] * 4)
        self.assertNoResult(done)
        self.assertEqual(process.state, S.STOPPING)
        child.members_alive = False
        self.clock.advance(0.25)
        self.successResultOf(done)
        self.assertEqual(child.signals, [signal.SIGTERM])
        self.assert_no_timers()

    def test_grandchildren_get_sigkill(self) -> None:
        """Group members that outlive the leader past the timeout are SIGKILLed."""
        process, child = self.ready()
        child.members_alive = True
        done = process.stop(2)
        child.exit(0)
        self.clock.pump([0.25] * 9)
        self.assertEqual(child.signals, [signal.SIGTERM, signal.SIGKILL])
        child.members_alive = False
        self.clock.advance(0.25)
        self.successResultOf(done)
        self.assert_no_timers()

    def test_gives_up_on_unkillable_group(self) -> None:
        """If the group survives SIGKILL the stop still ends, bounded, with a warning."""
        process, child = self.ready()
        child.members_alive = True
        done = process.stop(1)
        child.exit(0)
        self.clock.pump([0.25] * 4)
        self.assertEqual(child.signals, [signal.SIGTERM, signal.SIGKILL])
        self.clock.pump([0.25] * int(KILL_WAIT * 4))
        self.successResultOf(done)
        self.assertEqual(process.state, S.STOPPED)
        self.assertIn("still alive 5.0s after SIGKILL", self.logged())
        self.assert_no_timers()

    def test_stop_while_starting_aborts(self) -> None:
        """Stopping a start in progress fails its waiters with 'aborted' and kills the child."""
        process = self.make()
        waiter = process.make_ready()
        done = process.stop(3)
        self.assertEqual(self.failureResultOf(waiter, StartError).value.message, "aborted")
        self.assertTrue(self.probe.calls[0][3].called)
        child = self.launcher.children[0]
        self.assertEqual(child.signals, [signal.SIGTERM])
        self.assertEqual(process.state, S.STOPPING)
        child.exit(signum=signal.SIGTERM)
        self.successResultOf(done)
        self.assertEqual(
            self.events,
            [(S.STOPPED, S.STARTING), (S.STARTING, S.STOPPING), (S.STOPPING, S.STOPPED)],
        )
        self.assert_no_timers()

    def test_make_ready_while_stopping_waits_then_starts(self) -> None:
        """A caller arriving during a stop waits for it to finish, then gets a fresh start."""
        process, child = self.ready()
        process.stop()
        waiter = process.make_ready()
        self.assertNoResult(waiter)
        self.assertEqual(len(self.launcher.children), 1)
        child.exit(0)
        self.successResultOf(waiter)
        self.assertEqual(len(self.launcher.children), 2)
        self.assertEqual(process.state, S.READY)
        self.assertEqual(
            self.events[-3:],
            [(S.STOPPING, S.STOPPED), (S.STOPPED, S.STARTING), (S.STARTING, S.READY)],
        )

    def test_stop_while_stopping_aborts_pending_start(self) -> None:
        """A stop requested while a start waits for a previous stop fails that waiter."""
        process, child = self.ready()
        process.stop()
        waiter = process.make_ready()
        process.stop()
        self.assertEqual(self.failureResultOf(waiter, StartError).value.message, "aborted")
        child.exit(0)
        self.assertEqual(process.state, S.STOPPED)
        self.assertEqual(len(self.launcher.children), 1)

    def test_no_restart_when_every_waiter_detached(self) -> None:
        """A start requested during a stop is dropped if its only caller gave up."""
        process, child = self.ready()
        process.stop()
        waiter = process.make_ready()
        waiter.cancel()
        self.failureResultOf(waiter, CancelledError)
        child.exit(0)
        self.assertEqual(process.state, S.STOPPED)
        self.assertEqual(len(self.launcher.children), 1)
        self.assert_no_timers()

    def test_cmd_stop_replaces_pid(self) -> None:
        """cmdStop runs with ${PID} replaced and the child's env, instead of SIGTERM."""
        process, child = self.ready(cmd_stop="docker stop --pid ${PID}\n# comment")
        done = process.stop(2)
        stopper = self.launcher.children[1]
        self.assertEqual(stopper.argv, ("docker", "stop", "--pid", "1001"))
        self.assertEqual(stopper.env, child.env)
        self.assertEqual(child.signals, [])
        stopper.write(b"stopping\n")
        stopper.exit(1)
        self.assertTrue(stopper.released)
        self.assertIn("m cmdStop exited with exit code 1", self.logged())
        self.assertIn(b"stopping\n", self.monitor.history())
        self.clock.pump([0.25] * 9)
        self.assertEqual(child.signals, [signal.SIGKILL])
        child.exit(signum=signal.SIGKILL)
        self.successResultOf(done)
        self.assert_no_timers()

    def test_cmd_stop_failure_falls_back_to_sigterm(self) -> None:
        """A cmdStop that cannot be started is logged and SIGTERM is sent instead."""
        self.launcher.missing.add("stopper")
        process, child = self.ready(cmd_stop="stopper ${PID}")
        process.stop()
        self.assertEqual(child.signals, [signal.SIGTERM])
        self.assertIn("cmdStop failed", self.logged())
        child.exit(0)


class CrashTests(ProcessTestCase):
    def test_crash_while_ready(self) -> None:
        """A ready child that exits is reported at once: STOPPED plus a warning with its output."""
        process, child = self.ready()
        child.write(b"serving\nGGML_ASSERT failed\n")
        child.exit(134)
        self.assertEqual(process.state, S.STOPPED)
        self.assertEqual(self.events[-1], (S.READY, S.STOPPED))
        logged = self.logged()
        self.assertIn("m upstream process exited unexpectedly with exit code 134", logged)
        self.assertIn("GGML_ASSERT failed", logged)
        self.assertTrue(child.released)
        self.assert_no_timers()

    def test_crash_leftovers_are_killed_before_restart(self) -> None:
        """Group members left by a crash are SIGKILLed and a new start waits for them."""
        process, child = self.ready()
        child.members_alive = True
        child.exit(signum=signal.SIGSEGV)
        self.assertEqual(child.signals, [signal.SIGKILL])
        waiter = process.make_ready()
        self.assertEqual(process.state, S.STARTING)
        self.assertEqual(len(self.launcher.children), 1)
        child.members_alive = False
        self.clock.advance(0.01)
        self.successResultOf(waiter)
        self.assertEqual(len(self.launcher.children), 2)
        self.assert_no_timers()

    def test_stop_after_crash_waits_for_leftovers(self) -> None:
        """stop() right after a crash fires only when the leftovers are gone."""
        process, child = self.ready()
        child.members_alive = True
        child.exit(1)
        done = process.stop()
        self.assertNoResult(done)
        child.members_alive = False
        self.clock.advance(0.01)
        self.successResultOf(done)


class TTLTests(ProcessTestCase):
    def test_unloads_after_ttl(self) -> None:
        """An idle ready model is stopped TTL seconds after it became ready."""
        process, child = self.ready(ttl=10)
        self.clock.advance(9.9)
        self.assertEqual(child.signals, [])
        self.clock.advance(0.1)
        self.assertEqual(child.signals, [signal.SIGTERM])
        self.assertIn("m Unloading model, TTL of 10s reached", self.logged())
        child.exit(0)
        self.assertEqual(process.state, S.STOPPED)
        self.assert_no_timers()

    def test_never_unloaded_right_after_loading(self) -> None:
        """The TTL counts from becoming ready, however long the start took."""
        self.probe.answer = ConnectionRefusedError()
        process = self.make(ttl=10, health_check_timeout=60)
        waiter = process.make_ready()
        self.clock.pump([0.25] * 80)
        self.probe.answer = 200
        self.clock.pump([0.25] * 2)
        self.successResultOf(waiter)
        self.clock.advance(9.5)
        self.assertEqual(process.state, S.READY)
        self.clock.advance(0.5)
        self.assertEqual(process.state, S.STOPPING)
        self.launcher.children[0].exit(0)

    def test_in_flight_blocks_ttl(self) -> None:
        """While requests are in flight the model is never unloaded; the TTL restarts when the last ends."""
        process, child = self.ready(ttl=10)
        self.clock.advance(5)
        process.request_started()
        process.request_started()
        self.assertEqual(process.in_flight, 2)
        self.clock.advance(100)
        process.request_finished()
        self.clock.advance(50)
        self.assertEqual(child.signals, [])
        process.request_finished()
        self.clock.advance(9.9)
        self.assertEqual(child.signals, [])
        self.clock.advance(0.1)
        self.assertEqual(child.signals, [signal.SIGTERM])
        child.exit(0)
        self.assert_no_timers()

    def test_request_resets_idle_clock(self) -> None:
        """A finished request restarts the idle clock."""
        process, child = self.ready(ttl=10)
        self.clock.advance(8)
        process.request_started()
        process.request_finished()
        self.clock.advance(8)
        self.assertEqual(child.signals, [])
        self.clock.advance(2)
        self.assertEqual(child.signals, [signal.SIGTERM])
        child.exit(0)

    def test_no_ttl_means_no_timer(self) -> None:
        """A model without TTL schedules nothing."""
        self.ready(ttl=0)
        self.assert_no_timers()

    def test_unbalanced_request_finished_is_ignored(self) -> None:
        """A request_finished without request_started is logged and does not go negative."""
        process = self.make()
        process.request_finished()
        self.assertEqual(process.in_flight, 0)
        self.assertIn("request_finished without request_started", self.logged())


class ShutdownTests(ProcessTestCase):
    def test_shutdown_from_ready(self) -> None:
        """Shutdown stops the child and ends in SHUTDOWN, refusing later starts."""
        process, child = self.ready()
        done = process.shutdown(2)
        self.assertNoResult(done)
        self.failureResultOf(process.make_ready(), StartError)
        child.exit(0)
        self.successResultOf(done)
        self.assertEqual(process.state, S.SHUTDOWN)
        self.assertEqual(self.events[-2:], [(S.READY, S.STOPPING), (S.STOPPING, S.SHUTDOWN)])
        failure = self.failureResultOf(process.make_ready(), StartError)
        self.assertEqual(failure.value.message, "process is shut down")
        self.successResultOf(process.shutdown(2))
        self.successResultOf(process.stop())
        self.assert_no_timers()

    def test_shutdown_from_stopped(self) -> None:
        """Shutting down a stopped process is immediate."""
        process = self.make()
        self.successResultOf(process.shutdown(1))
        self.assertEqual(self.events, [(S.STOPPED, S.SHUTDOWN)])

    def test_shutdown_while_starting_aborts(self) -> None:
        """Shutdown during a start fails its waiters with 'aborted'."""
        process = self.make()
        waiter = process.make_ready()
        done = process.shutdown(1)
        self.assertEqual(self.failureResultOf(waiter, StartError).value.message, "aborted")
        self.launcher.children[0].exit(signum=signal.SIGTERM)
        self.successResultOf(done)
        self.assertEqual(process.state, S.SHUTDOWN)


class ListenerTests(ProcessTestCase):
    def test_failing_listener_does_not_break_transitions(self) -> None:
        """A listener that raises is logged; other listeners and the transition proceed."""
        process = self.make(check_endpoint=None)

        def broken(p: ModelProcess, old: ProcessState, new: ProcessState) -> None:
            raise RuntimeError("boom")

        process.add_state_listener(broken)
        self.successResultOf(process.make_ready())
        self.assertEqual(process.state, S.READY)
        self.assertEqual(len(self.events), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 0)
        self.assertIn("state listener failed", self.logged())

    def test_listener_may_stop_on_starting(self) -> None:
        """A listener reacting to STARTING with stop() leaves a consistent STOPPED process."""
        process = self.make(check_endpoint=None)

        def stop_on_start(p: ModelProcess, old: ProcessState, new: ProcessState) -> None:
            if new is S.STARTING:
                p.stop()

        process.add_state_listener(stop_on_start)
        waiter = process.make_ready()
        self.assertEqual(self.failureResultOf(waiter, StartError).value.message, "aborted")
        self.assertEqual(process.state, S.STOPPED)
        self.assertEqual(self.launcher.children, [])


class MachineTests(ProcessTestCase):
    def test_inputs_outside_the_table_raise(self) -> None:
        """An input the table does not list for the current state is refused."""
        core = LifecycleCore(
            model_config(),
            clock=self.clock,
            launcher=self.launcher,
            probe=self.probe,
            output=self.monitor,
            health_check_timeout=15,
            environ={},
            publish=lambda old, new: None,
        )
        machine = LifecycleMachine(core)
        self.assertRaises(NoTransition, machine._ttl_expired)
        self.assertRaises(NoTransition, machine._unhealthy, StartError("late"))
        self.assertEqual(self.launcher.children, [])


class GroupAliveTests(SynchronousTestCase):
    def test_own_group_is_alive(self) -> None:
        """Our own process group has a live member."""
        self.assertTrue(group_alive(os.getpgrp()))

    def test_zombie_group_is_gone(self) -> None:
        """A group whose only member is an unreaped zombie is reported gone."""
        child = subprocess.Popen([PYTHON, "-c", "pass"], start_new_session=True)
        try:
            # Wait for the exit but leave the zombie in place.
            os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
            self.assertFalse(group_alive(child.pid))
        finally:
            child.wait()

    def test_missing_group_is_gone(self) -> None:
        """A group id no process uses is reported gone."""
        self.assertFalse(group_alive(2**30))


#: leads a group, forks a member that sleeps, prints its pid, then exits.
ORPHANING = (
    "import os, sys, time\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    time.sleep(60)\n"
    "    os._exit(0)\n"
    "print(pid, flush=True)\n"
)


class GroupLivenessTests(TestCase):
    """Polling a group's liveness does not walk all of /proc each time (11.7)."""

    timeout = 30

    async def test_polls_without_scanning_proc(self) -> None:
        """A real group whose leader exited and whose other member lives on:
        many polls cost at most one walk over /proc; the group is gone once
        that member is killed."""
        scans: list[int] = []
        real_pids = psutil.pids

        def counting_pids() -> list[int]:
            scans.append(1)
            return real_pids()

        self.patch(psutil, "pids", counting_pids)
        output = bytearray()
        exits: list[ExitStatus] = []
        child = ProcessGroupLauncher(reactor).spawn(
            [PYTHON, "-c", ORPHANING], dict(os.environ), output.extend, exits.append
        )
        self.addCleanup(child.release)
        self.addCleanup(child.signal_group, signal.SIGKILL)
        await poll_until(lambda: bool(exits) and output.endswith(b"\n"))
        member = int(output)
        self.assertEqual(os.getpgid(member), child.pid)
        for _ in range(50):
            self.assertTrue(child.group_alive())
        self.assertLessEqual(len(scans), 1)
        os.kill(member, signal.SIGKILL)
        await poll_until(lambda: not child.group_alive(), timeout=5)
        self.assertLessEqual(len(scans), 6)

    def test_rescan_interval_with_a_clock(self) -> None:
        """When every known member is gone but the group still answers, /proc
        is walked again at most every RESCAN_INTERVAL seconds; a group found
        empty stays gone."""
        scans: list[int] = []
        self.patch(launcher_module, "_scan_group", lambda pgid: scans.append(pgid) or set())
        self.patch(launcher_module, "_member_alive", lambda pid, pgid: False)
        clock = Clock()
        liveness = GroupLiveness(os.getpgrp(), clock.seconds)  # killpg succeeds
        self.assertFalse(liveness())  # scanned: no live member
        self.assertFalse(liveness())
        self.assertEqual(len(scans), 1)
        found = {12345}
        self.patch(launcher_module, "_scan_group", lambda pgid: scans.append(pgid) or set(found))
        liveness = GroupLiveness(os.getpgrp(), clock.seconds)
        self.assertTrue(liveness())  # scanned: 12345 (not alive by the patched check)
        self.assertTrue(liveness())  # 12345 gone, rescan too soon: still alive
        self.assertEqual(len(scans), 2)
        clock.advance(RESCAN_INTERVAL)
        found.clear()
        self.assertFalse(liveness())
        self.assertEqual(len(scans), 3)


# -- real children -----------------------------------------------------------


def is_gone(pid: int) -> bool:
    """True when ``pid`` no longer exists or is only a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def responder_config(port: int, *args: str, **overrides: Any) -> ModelConfig:
    argv = (PYTHON, RESPONDER, "--port", str(port), *args)
    values: dict[str, Any] = {
        "id": "resp",
        "argv": argv,
        "cmd": " ".join(argv),
        "proxy": f"http://127.0.0.1:{port}",
    }
    values.update(overrides)
    return ModelConfig(**values)


async def within(d: Deferred[Any], seconds: float) -> Any:
    """Await ``d``, failing the test after ``seconds``."""
    return await d.addTimeout(seconds, reactor)


class RealChildTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.monitor = LogMonitor("resp")
        self.log_events: list[dict[str, Any]] = []
        capture_logs(self, self.log_events)

    def make(
        self,
        config: ModelConfig,
        health_check_timeout: float = 20,
        launcher: IProcessLauncher | None = None,
    ) -> ModelProcess:
        process = ModelProcess(
            config,
            clock=reactor,
            health_check_timeout=health_check_timeout,
            output=self.monitor,
            environ=os.environ,
            probe=http_probe(reactor),
            launcher=launcher if launcher is not None else ProcessGroupLauncher(reactor),
        )
        self.addCleanup(process.shutdown, 1)
        return process

    def output(self) -> str:
        return self.monitor.history().decode()

    async def test_start_health_ready_and_stop(self) -> None:
        """A real child starts in its own process group, passes the health check and stops."""
        process = self.make(responder_config(free_port(), "--startup-delay", "0.2"))
        await within(process.make_ready(), 20)
        self.assertEqual(process.state, S.READY)
        pid = process.pid
        assert pid is not None
        self.assertEqual(os.getpgid(pid), pid)
        self.assertNotEqual(os.getpgid(pid), os.getpgrp())
        await within(process.stop(5), 10)
        self.assertEqual(process.state, S.STOPPED)
        self.assertTrue(is_gone(pid))
        self.assertIn(f"PID {pid}", self.output())

    async def test_python_trampoline(self) -> None:
        """The Python exec trampoline also makes the child a group leader with its argv intact."""
        launcher = ProcessGroupLauncher(reactor, trampoline=PYTHON_TRAMPOLINE)
        process = self.make(responder_config(free_port()), launcher=launcher)
        await within(process.make_ready(), 20)
        pid = process.pid
        assert pid is not None
        self.assertEqual(os.getpgid(pid), pid)
        await within(process.stop(5), 10)
        self.assertTrue(is_gone(pid))

    async def test_premature_exit_reports_output(self) -> None:
        """A child that dies during start fails it with its exit code and last output line."""
        config = responder_config(
            free_port(),
            "--print",
            "fatal: cannot load model",
            "--exit-after",
            "0",
            "--exit-code",
            "3",
        )
        process = self.make(config)
        try:
            await within(process.make_ready(), 20)
        except StartError as e:
            message = e.message
        else:
            self.fail("start did not fail")
        self.assertIn("upstream command exited prematurely with exit code 3", message)
        self.assertIn("fatal: cannot load model", message)
        self.assertEqual(process.state, S.STOPPED)

    async def test_health_timeout_kills_child(self) -> None:
        """A child that never turns healthy is killed when the health deadline passes."""
        config = responder_config(free_port(), "--startup-delay", "100")
        process = self.make(config, 1)
        try:
            await within(process.make_ready(), 20)
        except StartError as e:
            self.assertEqual(
                e.message,
                f"health check timed out after 1s (last probe on {config.proxy}/health: status 503)",
            )
        else:
            self.fail("start did not fail")
        pid = int(re.findall(r"PID (\d+)", self.output())[0])
        await poll_until(lambda: process.state is S.STOPPED, timeout=10)
        self.assertTrue(is_gone(pid))

    async def test_sigterm_ignored_then_sigkill(self) -> None:
        """A child ignoring SIGTERM is SIGKILLed once the stop timeout has passed."""
        process = self.make(responder_config(free_port(), "--ignore-sigterm"))
        await within(process.make_ready(), 20)
        pid = process.pid
        assert pid is not None
        started = reactor.seconds()
        await within(process.stop(0.5), 10)
        elapsed = reactor.seconds() - started
        self.assertGreaterEqual(elapsed, 0.5)
        self.assertLess(elapsed, 5)
        self.assertTrue(is_gone(pid))

    async def test_grandchild_is_killed(self) -> None:
        """After a stop no member of the group is alive, including a grandchild holding stdout."""
        process = self.make(responder_config(free_port(), "--spawn-grandchild"))
        await within(process.make_ready(), 20)
        await poll_until(lambda: "GRANDCHILD" in self.output(), timeout=10)
        grandchild = int(re.findall(r"GRANDCHILD (\d+)", self.output())[0])
        pid = process.pid
        assert pid is not None
        self.assertEqual(os.getpgid(grandchild), pid)
        await within(process.stop(0.5), 15)
        self.assertEqual(process.state, S.STOPPED)
        self.assertTrue(is_gone(pid))
        self.assertTrue(is_gone(grandchild))

    async def test_cmd_stop_with_pid(self) -> None:
        """cmdStop runs with ${PID} replaced; here it stops a child that ignores SIGTERM."""
        cmd_stop = f'{PYTHON} -c "import os, signal; os.kill(${{PID}}, signal.SIGINT)"'
        process = self.make(responder_config(free_port(), "--ignore-sigterm", cmd_stop=cmd_stop))
        await within(process.make_ready(), 20)
        pid = process.pid
        assert pid is not None
        started = reactor.seconds()
        await within(process.stop(30), 20)
        self.assertLess(reactor.seconds() - started, 20)
        self.assertTrue(is_gone(pid))
        await poll_until(lambda: "SIGINT" in self.output(), timeout=5)
        # cmdStop is never awaited; let it finish before the reactor check.
        await poll_until(
            lambda: not any(isinstance(r, ProcessReader) for r in reactor.getReaders()),
            timeout=10,
        )

    async def test_crash_while_ready(self) -> None:
        """A ready child that exits by itself is reported with its exit status and output."""
        events: list[tuple[ProcessState, ProcessState]] = []
        config = responder_config(
            free_port(), "--print", "about to crash", "--exit-after", "1.5", "--exit-code", "7"
        )
        process = self.make(config)
        process.add_state_listener(lambda p, old, new: events.append((old, new)))
        await within(process.make_ready(), 20)
        await poll_until(lambda: process.state is S.STOPPED, timeout=10)
        self.assertEqual(events[-1], (S.READY, S.STOPPED))
        logged = "\n".join(formatEvent(event) for event in self.log_events)
        self.assertIn("resp upstream process exited unexpectedly with exit code 7", logged)
        self.assertIn("about to crash", logged)

    async def test_shutdown_fires_after_child_is_gone(self) -> None:
        """shutdown() fires only once the child has exited, then the state is SHUTDOWN."""
        process = self.make(responder_config(free_port(), "--ignore-sigterm"))
        await within(process.make_ready(), 20)
        pid = process.pid
        assert pid is not None
        done = process.shutdown(0.3)
        self.assertFalse(done.called)
        self.assertFalse(is_gone(pid))
        await within(done, 10)
        self.assertTrue(is_gone(pid))
        self.assertEqual(process.state, S.SHUTDOWN)


class EvictionListenerTests(ProcessTestCase):
    def evictions_of(self, process: ModelProcess) -> list[str]:
        heard: list[str] = []
        process.add_eviction_listener(lambda p, reason: heard.append(reason))
        return heard

    def test_each_end_of_a_live_child_is_heard_once_with_its_reason(self) -> None:
        """stop() passes its reason on (default unload), a TTL expiry is
        ``ttl``, a ready child's death is ``crash``; stopping a process that
        is stopped or already stopping evicts nothing more."""
        process, child = self.ready(ttl=10)
        heard = self.evictions_of(process)
        process.stop(reason="swap")
        process.stop(reason="reload")
        child.exit(0)
        process.stop()
        self.assertEqual(heard, ["swap"])
        self.successResultOf(process.make_ready())
        self.clock.advance(10)
        self.launcher.children[-1].exit(0)
        self.successResultOf(process.make_ready())
        self.launcher.children[-1].exit(134)
        self.successResultOf(process.make_ready())
        process.stop()
        self.launcher.children[-1].exit(0)
        self.assertEqual(heard, ["swap", "ttl", "crash", "unload"])
        self.assert_no_timers()

    def test_stopping_a_start_is_an_eviction_a_failed_start_is_not(self) -> None:
        """A start aborted by stop() is evicted with the stop's reason; a
        start that fails on its own (the child died, the health check timed
        out) and a shutdown evict nothing."""
        process = self.make(health_check_timeout=1)
        heard = self.evictions_of(process)
        self.probe.answer = ConnectionRefusedError()
        waiter = process.make_ready()
        process.stop(reason="reload")
        self.failureResultOf(waiter, StartError)
        self.launcher.children[-1].exit(0)
        self.assertEqual(heard, ["reload"])
        waiter = process.make_ready()
        self.launcher.children[-1].exit(3)
        self.failureResultOf(waiter, StartError)
        waiter = process.make_ready()
        self.clock.pump([0.25] * 8)
        self.failureResultOf(waiter, StartError)
        self.launcher.children[-1].exit(0)
        self.assertEqual(process.state, S.STOPPED)
        self.probe.answer = 200
        self.successResultOf(process.make_ready())
        process.shutdown(5)
        self.launcher.children[-1].exit(0)
        self.assertEqual(process.state, S.SHUTDOWN)
        self.assertEqual(heard, ["reload"])
        self.assert_no_timers()
