"""The sleep tier: a model put to sleep instead of stopped, woken by a request."""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet.defer import Deferred, succeed

from llamaswap.config.fields import Report
from llamaswap.config.sleep import SleepConfig, read_sleep
from llamaswap.supervision.process import ModelProcess, ProcessState, StartError
from tests.test_process import ProcessTestCase

S = ProcessState


class FakeCaller:
    """The sleep tier's HTTP calls: recorded; answered with ``status`` at
    once, or held (``status`` None) until the test answers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.status: int | None = 200
        self.held: list[Deferred[int]] = []

    def __call__(self, method: str, url: str, timeout: float) -> Deferred[int]:
        self.calls.append((method, url))
        if self.status is None:
            d: Deferred[int] = Deferred()
            self.held.append(d)
            return d
        return succeed(self.status)


class SleepConfigTests(ProcessTestCase):
    def test_defaults_are_vllm_calls(self) -> None:
        report = Report()
        config = read_sleep(True, "models.m.sleep", report)
        self.assertEqual(config, SleepConfig(("POST /sleep?level=1",), ("POST /wake_up",), 0))
        self.assertEqual(report.errors, [])

    def test_problems_name_the_key(self) -> None:
        report = Report()
        read_sleep({"enter": ["sleep"], "ttl": -1, "wake": []}, "models.m.sleep", report)
        self.assertEqual(
            report.errors,
            [
                "models.m.sleep.enter: 'sleep' is not METHOD /path (e.g. POST /sleep?level=1)",
                "models.m.sleep.wake: must name at least one call, e.g. POST /wake_up",
                "models.m.sleep.ttl: must be >= 0, got -1",
            ],
        )
        report = Report()
        read_sleep("yes", "models.m.sleep", report)
        self.assertIn("models.m.sleep: must be a mapping", report.errors[0])


class SleepTestCase(ProcessTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.caller = FakeCaller()
        self.evictions: list[str] = []

    def sleepy(self, ttl: int = 0, sleep_ttl: int = 0, **overrides: Any) -> ModelProcess:
        from tests.test_process import model_config

        process = ModelProcess(
            model_config(
                check_endpoint=None,
                ttl=ttl,
                sleep=SleepConfig(ttl=sleep_ttl),
                **overrides,
            ),
            clock=self.clock,
            health_check_timeout=15,
            output=self.monitor,
            environ={"PATH": "/bin"},
            probe=self.probe,
            launcher=self.launcher,
            sleep_caller=self.caller,
        )
        process.add_state_listener(lambda p, old, new: self.events.append((old, new)))
        process.add_eviction_listener(lambda p, reason: self.evictions.append(reason))
        return process

    def asleep(self, **kwargs: Any) -> ModelProcess:
        process = self.sleepy(**kwargs)
        self.successResultOf(process.make_ready())
        self.successResultOf(process.sleep(reason="swap"))
        return process


class SleepTests(SleepTestCase):
    def test_sleep_and_wake_keep_the_same_child(self) -> None:
        """sleep() sends the enter calls to the proxy URL; the child lives on
        (state sleeping, same pid); make_ready() wakes it with the wake calls."""
        process = self.asleep()
        child = self.launcher.children[0]
        self.assertEqual(process.state, S.SLEEPING)
        self.assertEqual(self.caller.calls, [("POST", "http://127.0.0.1:5800/sleep?level=1")])
        self.assertEqual(process.pid, child.pid)
        self.assertEqual(child.signals, [])
        self.assertEqual(self.evictions, ["swap"])
        self.successResultOf(process.make_ready())
        self.assertEqual(process.state, S.READY)
        self.assertEqual(self.caller.calls[-1], ("POST", "http://127.0.0.1:5800/wake_up"))
        self.assertEqual(len(self.launcher.children), 1)
        self.assertEqual(
            self.events,
            [
                (S.STOPPED, S.STARTING),
                (S.STARTING, S.READY),
                (S.READY, S.SLEEPING),
                (S.SLEEPING, S.STARTING),
                (S.STARTING, S.READY),
            ],
        )

    def test_without_sleep_tier_sleep_is_stop(self) -> None:
        process, child = self.ready()
        process.sleep()
        self.assertEqual(process.state, S.STOPPING)
        self.assertEqual(child.signals, [signal.SIGTERM])

    def test_sleep_while_stopped_does_nothing(self) -> None:
        process = self.sleepy()
        self.successResultOf(process.sleep())
        self.assertEqual(process.state, S.STOPPED)
        self.assertEqual(self.caller.calls, [])

    def test_failed_sleep_stops_the_child(self) -> None:
        process = self.sleepy()
        self.successResultOf(process.make_ready())
        child = self.launcher.children[0]
        self.caller.status = 500
        done = process.sleep()
        self.assertNoResult(done)
        self.assertEqual(process.state, S.STOPPING)
        self.assertEqual(child.signals, [signal.SIGTERM])
        child.exit(0)
        self.successResultOf(done)
        self.assertEqual(process.state, S.STOPPED)
        self.assertIn("could not sleep (POST /sleep?level=1: answered 500)", self.logged())

    def test_request_while_falling_asleep_wakes_it_after(self) -> None:
        process = self.sleepy()
        self.successResultOf(process.make_ready())
        self.caller.status = None
        asleep = process.sleep()
        ready = process.make_ready()
        self.assertNoResult(ready)
        self.caller.status = 200
        self.caller.held[0].callback(200)
        self.successResultOf(asleep)
        self.successResultOf(ready)
        self.assertEqual(process.state, S.READY)
        self.assertEqual([url.rsplit("/", 1)[1] for _, url in self.caller.calls][-1], "wake_up")

    def test_failed_wake_restarts(self) -> None:
        """A wake call that fails stops the child and starts a new one; the
        request waiting for it is answered by the new one."""
        process = self.asleep()
        old = self.launcher.children[0]
        self.caller.status = 503
        ready = process.make_ready()
        self.assertNoResult(ready)
        self.assertEqual(process.state, S.STOPPING)
        self.assertEqual(old.signals, [signal.SIGTERM])
        old.exit(0)
        self.successResultOf(ready)
        self.assertEqual(process.state, S.READY)
        self.assertEqual(len(self.launcher.children), 2)
        self.assertIn("could not wake (POST /wake_up: answered 503); restarting it", self.logged())

    def test_stop_while_sleeping(self) -> None:
        process = self.asleep()
        child = self.launcher.children[0]
        stopped = process.stop(reason="unload")
        self.assertEqual(child.signals, [signal.SIGTERM])
        child.exit(0)
        self.successResultOf(stopped)
        self.assertEqual(process.state, S.STOPPED)
        self.assertEqual(self.evictions, ["swap", "unload"])
        self.assert_no_timers()

    def test_crash_while_sleeping(self) -> None:
        process = self.asleep()
        self.launcher.children[0].exit(1)
        self.assertEqual(process.state, S.STOPPED)
        self.assertEqual(self.evictions, ["swap", "crash"])

    def test_death_while_waking_fails_the_waiters_as_died(self) -> None:
        process = self.asleep()
        self.caller.status = None
        ready = process.make_ready()
        self.launcher.children[0].exit(1)
        error = self.failureResultOf(ready, StartError).value
        self.assertTrue(error.died)

    def test_stop_while_waking_aborts(self) -> None:
        process = self.asleep()
        self.caller.status = None
        ready = process.make_ready()
        process.stop()
        self.assertEqual(self.failureResultOf(ready, StartError).value.message, "aborted")
        self.launcher.children[0].exit(0)
        self.assertEqual(process.state, S.STOPPED)


class SleepTTLTests(SleepTestCase):
    def test_ttl_sends_to_sleep_then_sleep_ttl_stops(self) -> None:
        process = self.sleepy(ttl=60, sleep_ttl=600)
        self.successResultOf(process.make_ready())
        self.clock.advance(60)
        self.assertEqual(process.state, S.SLEEPING)
        self.assertIn("going to sleep, TTL of 60s reached", self.logged())
        self.clock.advance(599)
        self.assertEqual(process.state, S.SLEEPING)
        self.clock.advance(1)
        self.assertEqual(process.state, S.STOPPING)
        self.assertIn("sleep TTL of 600s reached", self.logged())
        self.launcher.children[0].exit(0)
        self.assertEqual(self.evictions, ["ttl", "ttl"])
        self.assert_no_timers()

    def test_waking_disarms_the_sleep_ttl(self) -> None:
        process = self.asleep(sleep_ttl=10)
        self.successResultOf(process.make_ready())
        self.clock.advance(100)
        self.assertEqual(process.state, S.READY)

    def test_no_sleep_ttl_sleeps_for_ever(self) -> None:
        process = self.asleep()
        self.assert_no_timers()
        self.assertEqual(process.state, S.SLEEPING)
