"""Running under systemd: sd_notify, the graceful stop, journald lines, the
unit files and socket activation."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import treq
from twisted.application import service
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from llamaswap.config.model import Config
from llamaswap.service.journal import format_journal_event, journald_observer
from llamaswap.service.notify import (
    Notifier,
    SystemdNotifyService,
    running_models_status,
    watchdog_interval,
)
from llamaswap.service.shutdown import (
    DEFAULT_GRACE_SECONDS,
    DrainService,
    SequentialMultiService,
    ShutdownGrace,
    hurry_on_signals,
    relayed_requests,
)
from tests.support import PYTHON, REPO, free_port, poll_until

ETC = os.path.join(REPO, "etc")


def short_tempdir(case: SynchronousTestCase) -> str:
    """An absolute temporary directory with a short path (AF_UNIX socket
    paths are limited to 108 bytes, trial's temp paths can be longer)."""
    path = tempfile.mkdtemp(prefix="lsw-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


class DatagramSink:
    """A bound AF_UNIX datagram socket, read without blocking."""

    def __init__(self, address: str) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(address)
        self.socket.setblocking(False)

    def messages(self) -> list[str]:
        """Every datagram queued so far (sends to a local socket are queued
        before ``sendto`` returns)."""
        out = []
        while True:
            try:
                out.append(self.socket.recv(4096).decode())
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.socket.close()


def sink_in(case: SynchronousTestCase) -> tuple[DatagramSink, str]:
    path = os.path.join(short_tempdir(case), "notify")
    sink = DatagramSink(path)
    case.addCleanup(sink.close)
    return sink, path


def notifier_for(case: SynchronousTestCase, path: str, **kw: Any) -> Notifier:
    notifier = Notifier(path, monotonic_usec=lambda: 123456789, **kw)
    case.addCleanup(notifier.close)
    return notifier


class NotifierTests(SynchronousTestCase):
    def test_without_notify_socket_nothing_is_sent(self) -> None:
        """Without NOTIFY_SOCKET the notifier is disabled and every call is a
        no-op returning False."""
        notifier = Notifier.from_environment({})
        self.assertFalse(notifier.enabled)
        self.assertIsNone(notifier.watchdog_interval)
        for send in (notifier.ready, notifier.reloading, notifier.stopping, notifier.watchdog):
            self.assertFalse(send())
        self.assertFalse(notifier.status("x"))

    def test_from_environment_hides_the_socket_from_children(self) -> None:
        """The notify and watchdog variables are removed from the environment
        model processes inherit; ``unset=False`` leaves them."""
        sink, path = sink_in(self)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "PATH": "/bin"}
        notifier = Notifier.from_environment(env, pid=1)
        self.addCleanup(notifier.close)
        self.assertEqual(env, {"PATH": "/bin"})
        self.assertTrue(notifier.ready())
        self.assertEqual(sink.messages(), ["READY=1"])
        kept = {"NOTIFY_SOCKET": path}
        Notifier.from_environment(kept, unset=False)
        self.assertEqual(kept, {"NOTIFY_SOCKET": path})

    def test_message_formats(self) -> None:
        """Each method sends one datagram of KEY=VALUE lines; RELOADING=1
        carries MONOTONIC_USEC and STATUS is kept on one line."""
        sink, path = sink_in(self)
        notifier = notifier_for(self, path)
        self.assertTrue(notifier.ready("running a (ready)"))
        notifier.status("two\nlines")
        notifier.reloading()
        notifier.stopping("stopping")
        notifier.watchdog()
        self.assertEqual(
            sink.messages(),
            [
                "READY=1\nSTATUS=running a (ready)",
                "STATUS=two lines",
                "RELOADING=1\nMONOTONIC_USEC=123456789",
                "STOPPING=1\nSTATUS=stopping",
                "WATCHDOG=1",
            ],
        )

    def test_monotonic_usec_is_the_monotonic_clock(self) -> None:
        """By default MONOTONIC_USEC is CLOCK_MONOTONIC in microseconds, as
        systemd compares it with its own."""
        sink, path = sink_in(self)
        notifier = Notifier(path)
        self.addCleanup(notifier.close)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        [message] = sink.messages()
        usec = int(re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", message).group(1))  # type: ignore[union-attr]
        self.assertTrue(before <= usec <= after, (before, usec, after))

    def test_abstract_socket(self) -> None:
        """A NOTIFY_SOCKET starting with @ names a socket in the abstract
        namespace."""
        name = f"llamaswap-test-{os.getpid()}-{time.monotonic_ns()}"
        sink = DatagramSink("\0" + name)
        self.addCleanup(sink.close)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.ready())
        self.assertEqual(sink.messages(), ["READY=1"])

    def test_unusable_address_is_ignored(self) -> None:
        """A NOTIFY_SOCKET that is neither an absolute path nor @name (a
        relative path, vsock:) disables the notifier with a warning."""
        with capturedLogs() as events:
            notifier = Notifier("relative/notify")
        self.assertFalse(notifier.enabled)
        self.assertIn("ignoring NOTIFY_SOCKET", formatEvent(events[0]))

    def test_missing_socket_is_logged_not_raised(self) -> None:
        """Sending to a socket that is gone returns False and warns once, not
        on every watchdog ping."""
        path = os.path.join(short_tempdir(self), "gone")
        notifier = notifier_for(self, path)
        with capturedLogs() as events:
            self.assertFalse(notifier.ready())
            self.assertFalse(notifier.watchdog())
        levels = [event["log_level"] for event in events]
        self.assertEqual(levels, [LogLevel.warn, LogLevel.debug])
        self.assertIn("READY=1", formatEvent(events[0]))

    def test_send_never_blocks(self) -> None:
        """When systemd does not read its socket, sends fail at once instead
        of blocking the reactor."""
        sink, path = sink_in(self)
        notifier = notifier_for(self, path)
        deadline = time.monotonic() + 10
        results = []
        with capturedLogs():
            while len(results) < 100_000 and (not results or results[-1]):
                results.append(notifier.watchdog())
                self.assertLess(time.monotonic(), deadline)
        self.assertFalse(results[-1])
        self.assertTrue(results[0])
        self.assertEqual(set(sink.messages()), {"WATCHDOG=1"})
        self.assertTrue(notifier.ready())
        self.assertEqual(sink.messages()[-1], "READY=1")


class WatchdogIntervalTests(SynchronousTestCase):
    def test_half_of_watchdog_usec(self) -> None:
        """Pings go out every half of WATCHDOG_USEC, for our pid only."""
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42), 15.0)
        self.assertEqual(
            watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}, 42), 1.0
        )
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, 42))
        for bad in ({}, {"WATCHDOG_USEC": "x"}, {"WATCHDOG_USEC": "0"}):
            self.assertIsNone(watchdog_interval(bad, 42))

    def test_no_watchdog_without_socket(self) -> None:
        """WATCHDOG_USEC without NOTIFY_SOCKET schedules nothing."""
        notifier = Notifier.from_environment({"WATCHDOG_USEC": "2000000"})
        self.assertIsNone(notifier.watchdog_interval)


class FakeProcess:
    def __init__(self, state: str) -> None:
        self.state = state


class NotifyServiceTests(SynchronousTestCase):
    def make(
        self, *, watchdog: float | None = None, status: Callable[[], str] = lambda: "idle"
    ) -> tuple[SystemdNotifyService, DatagramSink, MemoryReactorClock]:
        sink, path = sink_in(self)
        clock = MemoryReactorClock()
        clock.running = True
        notifier = notifier_for(self, path, watchdog_interval=watchdog)
        return SystemdNotifyService(notifier, clock, status), sink, clock

    def test_ready_waits_for_the_reactor_to_run(self) -> None:
        """Started before the reactor runs (as twistd does), the service
        sends READY=1 and starts the watchdog only once the reactor runs, when
        its signal handlers are in place; status lines wait too."""
        sink, path = sink_in(self)
        reactor = MemoryReactorClock()
        notifier = notifier_for(self, path, watchdog_interval=1.0)
        notify = SystemdNotifyService(notifier, reactor, lambda: "idle")
        notify.startService()
        notify.update_status()
        self.assertEqual(sink.messages(), [])
        self.assertEqual(reactor.getDelayedCalls(), [])
        reactor.run()
        self.assertEqual(sink.messages(), ["READY=1\nSTATUS=idle"])
        self.assertEqual(len(reactor.getDelayedCalls()), 1)
        notify.stopService()
        self.assertEqual(sink.messages(), ["STOPPING=1\nSTATUS=stopping"])
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_stopped_before_the_reactor_ran(self) -> None:
        """A service stopped before the reactor ran never says READY=1."""
        sink, path = sink_in(self)
        reactor = MemoryReactorClock()
        notify = SystemdNotifyService(notifier_for(self, path), reactor, lambda: "idle")
        notify.startService()
        notify.stopService()
        reactor.run()
        self.assertEqual(sink.messages(), ["STOPPING=1\nSTATUS=stopping"])

    def test_watchdog_pings_every_interval(self) -> None:
        """With a watchdog interval, WATCHDOG=1 goes out once per interval
        after READY=1, and stopping leaves no timer behind."""
        notify, sink, clock = self.make(watchdog=1.5)
        notify.startService()
        self.assertEqual(sink.messages(), ["READY=1\nSTATUS=idle"])
        clock.advance(1.4)
        self.assertEqual(sink.messages(), [])
        clock.advance(0.1)
        self.assertEqual(sink.messages(), ["WATCHDOG=1"])
        clock.pump([1.5, 1.5])
        self.assertEqual(sink.messages(), ["WATCHDOG=1", "WATCHDOG=1"])
        notify.stopService()
        self.assertEqual(sink.messages(), ["STOPPING=1\nSTATUS=stopping"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_watchdog_no_timer(self) -> None:
        """Without a watchdog interval nothing is scheduled."""
        notify, sink, clock = self.make()
        notify.startService()
        self.assertEqual(clock.getDelayedCalls(), [])
        notify.stopService()

    def test_update_status_while_running(self) -> None:
        """update_status sends the status source's text, and only while the
        service runs."""
        processes = {"b": FakeProcess("stopped"), "a": FakeProcess("starting")}
        notify, sink, _ = self.make(status=lambda: running_models_status(processes))
        notify.update_status()
        notify.startService()
        processes["a"].state = "ready"
        processes["b"].state = "starting"
        notify.update_status()
        notify.stopService()
        notify.update_status()
        self.assertEqual(
            sink.messages(),
            [
                "READY=1\nSTATUS=running a (starting)",
                "STATUS=running a (ready), b (starting)",
                "STOPPING=1\nSTATUS=stopping",
            ],
        )

    def test_reload_success_and_failure(self) -> None:
        """A reload is bracketed by RELOADING=1 and READY=1; a failed one
        still ends with READY=1 (the old config runs on) and fails the
        returned Deferred."""
        notify, sink, _ = self.make()
        notify.startService()
        sink.messages()
        pending: defer.Deferred[None] = defer.Deferred()
        d = notify.reload(lambda: pending)
        self.assertEqual(
            sink.messages(),
            ["RELOADING=1\nMONOTONIC_USEC=123456789\nSTATUS=reloading the configuration"],
        )
        self.assertNoResult(d)
        pending.callback(None)
        self.successResultOf(d)
        self.assertEqual(sink.messages(), ["READY=1\nSTATUS=idle"])

        async def broken() -> None:
            raise ValueError("models.a.ttl: must be >= 0")

        failure = self.failureResultOf(notify.reload(broken), ValueError)
        self.assertIn("ttl", str(failure.value))
        self.assertEqual(
            sink.messages()[1],
            "READY=1\nSTATUS=reload failed (models.a.ttl: must be >= 0); idle",
        )

    def test_broken_status_source(self) -> None:
        """A status source that raises is logged; READY=1 still goes out."""

        def broken() -> str:
            raise RuntimeError("bug")

        notify, sink, _ = self.make(status=broken)
        with capturedLogs() as events:
            notify.startService()
        self.assertEqual(sink.messages(), ["READY=1\nSTATUS=running"])
        [failed] = [e for e in events if "log_failure" in e]
        self.assertEqual(formatEvent(failed), "status for systemd failed")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class Collector(DatagramProtocol):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.messages.append(datagram.decode())


class NotifyThroughReactorTests(TestCase):
    timeout = 20

    async def test_start_reload_stop_order(self) -> None:
        """Read through a reactor datagram port, the service tree announces
        READY=1 after the services before it started, then status,
        RELOADING=1/READY=1 and finally STOPPING=1 before the others stop."""
        path = os.path.join(short_tempdir(self), "notify")
        collector = Collector()
        port = reactor.listenUNIXDatagram(path, collector)
        self.addCleanup(port.stopListening)
        events: list[str] = []

        class Recording(service.Service):
            def startService(self) -> None:
                super().startService()
                events.append(f"start {self.name}")

            def stopService(self) -> None:
                super().stopService()
                events.append(f"stop {self.name}")

        top = SequentialMultiService()
        core, web = Recording(), Recording()
        core.setName("core")
        web.setName("web")
        core.setServiceParent(top)
        web.setServiceParent(top)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
        self.addCleanup(notifier.close)

        def status() -> str:
            return f"after {events[-1]}"

        notify = SystemdNotifyService(notifier, reactor, status)
        notify.setServiceParent(top)
        top.startService()
        # READY=1 goes out once the reactor runs (at once when it already does).
        await poll_until(lambda: len(collector.messages) >= 1, timeout=5)
        notify.update_status()
        await notify.reload(lambda: None)
        await top.stopService()
        await poll_until(lambda: len(collector.messages) >= 5, timeout=5)
        self.assertEqual(
            [m.split("\n") for m in collector.messages],
            [
                ["READY=1", "STATUS=after start web"],
                ["STATUS=after start web"],
                [
                    "RELOADING=1",
                    collector.messages[2].split("\n")[1],
                    "STATUS=reloading the configuration",
                ],
                ["READY=1", "STATUS=after start web"],
                ["STOPPING=1", "STATUS=stopping"],
            ],
        )
        self.assertRegex(collector.messages[2], r"\nMONOTONIC_USEC=\d+\n")
        self.assertEqual(events, ["start core", "start web", "stop web", "stop core"])


class ShutdownGraceTests(SynchronousTestCase):
    def test_nothing_in_flight(self) -> None:
        """With no request in flight the wait is over at once."""
        clock = Clock()
        self.successResultOf(ShutdownGrace(clock).wait(lambda: 0))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_fires_when_in_flight_reaches_zero(self) -> None:
        """The wait ends soon after the last in-flight request finishes,
        before the grace is over, and leaves no timer."""
        clock = Clock()
        count = [2]
        d = ShutdownGrace(clock, grace_seconds=10).wait(lambda: count[0])
        clock.advance(3)
        self.assertNoResult(d)
        count[0] = 0
        clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_fires_at_the_end_of_the_grace(self) -> None:
        """Requests still in flight when the grace is over do not hold up the
        stop any longer."""
        clock = Clock()
        d = ShutdownGrace(clock, grace_seconds=10).wait(lambda: 1)
        clock.advance(9.95)
        self.assertNoResult(d)
        clock.advance(0.05)
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_second_signal_ends_the_wait(self) -> None:
        """hurry() (a second SIGTERM/SIGINT) ends the wait at once."""
        clock = Clock()
        grace = ShutdownGrace(clock)
        d = grace.wait(lambda: 3)
        clock.advance(1)
        self.assertTrue(grace.waiting)
        grace.hurry("SIGTERM received again")
        self.successResultOf(d)
        self.assertFalse(grace.waiting)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_hurry_shortens_what_is_left(self) -> None:
        """hurry(remaining=2) leaves at most 2 more seconds; a longer
        remaining does not extend the grace."""
        clock = Clock()
        grace = ShutdownGrace(clock, grace_seconds=10)
        d = grace.wait(lambda: 1)
        clock.advance(1)
        grace.hurry(remaining=2)
        grace.hurry(remaining=5)
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(clock.seconds(), 3)

    def test_hurry_before_the_wait(self) -> None:
        """A second signal that comes before the wait begins shortens it."""
        clock = Clock()
        grace = ShutdownGrace(clock, grace_seconds=10)
        grace.hurry(remaining=1)
        d = grace.wait(lambda: 1)
        clock.advance(1)
        self.successResultOf(d)
        grace = ShutdownGrace(clock)
        grace.hurry()
        self.successResultOf(grace.wait(lambda: 4))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_stops_the_timers(self) -> None:
        """Cancelling the wait fails it with CancelledError and leaves no
        timer."""
        clock = Clock()
        d = ShutdownGrace(clock).wait(lambda: 1)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_logs_say_what_is_waited_for(self) -> None:
        """The logs name the grace, the in-flight count and the description,
        report progress, and say when the grace ran out."""
        clock = Clock()
        grace = ShutdownGrace(clock, grace_seconds=5, report_interval=2)
        with capturedLogs() as events:
            d = grace.wait(lambda: 2, describe=lambda: "a: 2")
            clock.pump([0.5] * 10)
            self.successResultOf(d)
            grace.hurry()
        lines = [formatEvent(e) for e in events]
        self.assertEqual(
            lines[0],
            "stopped accepting connections; waiting up to 5s for 2 in-flight requests"
            " to finish (a: 2)",
        )
        self.assertIn("still waiting for 2 in-flight requests (3s of grace left) (a: 2)", lines)
        self.assertIn(
            "shutdown grace is over: stopping with 2 requests still in flight (a: 2)", lines
        )
        self.assertIn("model processes are stopping", lines[-1])

    def test_default_grace(self) -> None:
        """The default grace is 10 seconds."""
        self.assertEqual(ShutdownGrace(Clock()).grace_seconds, DEFAULT_GRACE_SECONDS)
        self.assertEqual(DEFAULT_GRACE_SECONDS, 10)


class RelayedRequestsTests(SynchronousTestCase):
    def test_counts_only_requests_being_relayed(self) -> None:
        """A stop drains the requests in flight to an upstream, not those
        reserved while they wait for a model to start."""
        from llamaswap.scheduling import SchedulerSnapshot

        snapshot = SchedulerSnapshot(
            queued=("b",),
            swaps={"c": frozenset()},
            waiting={"c": 2},
            in_flight={"a": 1},
            reserved={"a": 1, "b": 1, "c": 2},
        )
        count, describe = relayed_requests(lambda: snapshot)
        self.assertEqual((count(), describe()), (1, "a: 1"))


class Step(service.Service):
    """A child service recording its stop; ``hold`` keeps the stop pending."""

    def __init__(self, name: str, log: list[str], hold: defer.Deferred[None] | None = None):
        self.setName(name)
        self._log = log
        self._hold = hold

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        self._log.append(f"stop {self.name}")
        return self._hold


class FakeShutdownReactor:
    """Records system event triggers; runs callFromThread at once."""

    def __init__(self) -> None:
        self.triggers: dict[int, Callable[[], None]] = {}

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> int:
        assert (phase, eventType) == ("before", "shutdown")
        handle = len(self.triggers) + 1
        self.triggers[handle] = callable
        return handle

    def removeSystemEventTrigger(self, triggerID: int) -> None:
        del self.triggers[triggerID]

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kw: Any) -> None:
        callable(*args, **kw)


class StopOrderTests(SynchronousTestCase):
    def test_children_stop_one_at_a_time_last_first(self) -> None:
        """A SequentialMultiService stops the last child first and each one
        only after the previous stop finished; a failing stop is logged and
        does not stop the rest."""
        stops: list[str] = []
        hold: defer.Deferred[None] = defer.Deferred()
        top = SequentialMultiService()
        Step("core", stops).setServiceParent(top)
        Step("web", stops, hold).setServiceParent(top)

        class Broken(service.Service):
            def stopService(self) -> None:
                raise RuntimeError("broken stop")

        Broken().setServiceParent(top)
        top.startService()
        d = top.stopService()
        self.assertEqual(stops, ["stop web"])
        self.assertNoResult(d)
        hold.callback(None)
        self.assertEqual(stops, ["stop web", "stop core"])
        self.successResultOf(d)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop_listening_then_drain_then_stop_models(self) -> None:
        """In the llamaswap tree, SIGTERM stops the listener first, then
        waits for in-flight requests, and only then stops the models."""
        clock = Clock()
        stops: list[str] = []
        in_flight = [1]
        top = SequentialMultiService()
        Step("core", stops).setServiceParent(top)
        DrainService(ShutdownGrace(clock), lambda: in_flight[0]).setServiceParent(top)
        Step("web", stops).setServiceParent(top)
        top.startService()
        d = top.stopService()
        self.assertEqual(stops, ["stop web"])
        clock.advance(5)
        self.assertNoResult(d)
        in_flight[0] = 0
        clock.advance(0.1)
        self.assertEqual(stops, ["stop web", "stop core"])
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_drain_trigger_lives_with_the_service(self) -> None:
        """The drain adds its before-shutdown trigger when started and
        removes it when stopped without a reactor shutdown (as in tests)."""
        fake = FakeShutdownReactor()
        drain = DrainService(ShutdownGrace(Clock()), lambda: 0, reactor=fake)
        drain.startService()
        self.assertEqual(len(fake.triggers), 1)
        self.successResultOf(drain.stopService())
        self.assertEqual(fake.triggers, {})

    def test_shutdown_makes_stop_signals_hurry(self) -> None:
        """When the reactor begins to shut down, the drain's trigger makes
        the stop signals hurry the grace instead of stopping the reactor
        again."""
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        fake = FakeShutdownReactor()
        clock = Clock()
        drain = DrainService(
            ShutdownGrace(clock), lambda: 1, reactor=fake, signums=[signal.SIGUSR1]
        )
        drain.startService()
        [trigger] = fake.triggers.values()
        trigger()
        d = drain.stopService()
        self.assertNoResult(d)
        handler = signal.getsignal(signal.SIGUSR1)
        assert callable(handler)
        handler(signal.SIGUSR1, None)
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])


class SignalTests(TestCase):
    timeout = 10

    async def test_repeated_signal_hurries_the_grace(self) -> None:
        """A real signal delivered after hurry_on_signals ends the wait
        through the reactor; restoring puts the old handler back."""
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        grace = ShutdownGrace(reactor, grace_seconds=30)
        waited = grace.wait(lambda: 1)
        self.addCleanup(lambda: None if waited.called else waited.cancel())
        restore = hurry_on_signals(reactor, grace, [signal.SIGUSR1])
        os.kill(os.getpid(), signal.SIGUSR1)
        await poll_until(lambda: waited.called, timeout=5)
        restore()
        self.assertEqual(signal.getsignal(signal.SIGUSR1), previous)


class JournaldTests(SynchronousTestCase):
    def stream(self) -> tuple[Any, str]:
        path = os.path.join(short_tempdir(self), "out")
        stream = open(path, "w+")
        self.addCleanup(stream.close)
        status = os.fstat(stream.fileno())
        return stream, f"{status.st_dev}:{status.st_ino}"

    def test_journal_lines_carry_the_priority(self) -> None:
        """Connected to the journal, each line starts with its syslog
        priority and has no timestamp and no colour codes; a traceback's
        lines carry the priority too."""
        stream, journal = self.stream()
        observer = journald_observer(stream, {"JOURNAL_STREAM": journal})
        log = Logger(namespace="llamaswap.test", observer=observer)
        log.debug("d {n}", n=1)
        log.info("started {model}", model="a")
        log.warn("\x1b[31mred\x1b[0m warning")
        log.error("e")
        log.critical("c")
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("boom")
        stream.seek(0)
        lines = stream.read().splitlines()
        self.assertEqual(
            lines[:6],
            [
                "<7>[llamaswap.test] d 1",
                "<6>[llamaswap.test] started a",
                "<4>[llamaswap.test] red warning",
                "<3>[llamaswap.test] e",
                "<2>[llamaswap.test] c",
                "<2>[llamaswap.test] boom",
            ],
        )
        # Lines after an entry's first start with a tab: none passes for an entry.
        self.assertEqual(lines[6], "<2>\tTraceback (most recent call last):")
        self.assertTrue(all(line.startswith("<2>\t") for line in lines[6:]), lines)
        self.assertIn("<2>\tbuiltins.ZeroDivisionError: division by zero", lines)

    def test_legacy_events_use_their_system(self) -> None:
        """Events from twisted.python.log name their system; events with no
        level count as info."""
        line = format_journal_event(
            {"log_format": "hello", "log_system": "HTTPChannel,0,127.0.0.1", "log_time": 0}
        )
        self.assertEqual(line, "<6>[HTTPChannel,0,127.0.0.1] hello\n")

    def test_plain_text_without_the_journal(self) -> None:
        """Without JOURNAL_STREAM, or when it names another file (stdout
        redirected by a child of the service), lines are twistd's usual
        timestamped text."""
        for env in ({}, {"JOURNAL_STREAM": "1:2"}, {"JOURNAL_STREAM": "junk"}):
            stream, _ = self.stream()
            journald_observer(stream, env)(
                {
                    "log_format": "hi",
                    "log_level": LogLevel.info,
                    "log_namespace": "ns",
                    "log_time": 0.0,
                }
            )
            stream.seek(0)
            text = stream.read()
            self.assertRegex(text, r"^\d{4}-\d\d-\d\dT.* \[ns#info\] hi\n$")

    def test_factory_takes_no_arguments(self) -> None:
        """twistd --logger calls the factory with no arguments."""
        self.assertTrue(callable(journald_observer()))


def unit_sections(path: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections as key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    with open(path) as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                current = sections.setdefault(line.strip("[]"), {})
                continue
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match is not None, value
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


class UnitFileTests(SynchronousTestCase):
    service_path = os.path.join(ETC, "llamaswap.service")
    socket_path = os.path.join(ETC, "llamaswap.socket")

    def test_service_settings(self) -> None:
        """The service is Type=notify, adopts the socket unit's listener,
        stops its children itself and keeps GPU devices reachable."""
        unit = unit_sections(self.service_path)["Service"]
        self.assertEqual(unit["Type"], ["notify"])
        self.assertEqual(unit["KillMode"], ["mixed"])
        self.assertEqual(unit["Restart"], ["on-failure"])
        self.assertEqual(unit["ExecReload"], ["/bin/kill -HUP $MAINPID"])
        [exec_start] = unit["ExecStart"]
        self.assertTrue(exec_start.startswith("/opt/llamaswap/bin/llamaswap -c "), exec_start)
        self.assertIn("--listen systemd:domain=INET:index=0", exec_start)
        self.assertEqual(unit["User"], ["llamaswap"])
        self.assertEqual(unit["SupplementaryGroups"], ["video render"])
        self.assertEqual(unit["NoNewPrivileges"], ["yes"])
        self.assertEqual(unit["ProtectSystem"], ["strict"])
        for device_lock in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock"):
            self.assertNotIn(device_lock, unit)
        socket_unit = unit_sections(self.socket_path)["Socket"]
        self.assertEqual(socket_unit["ListenStream"], ["127.0.0.1:8080"])

    def test_stop_timeout_covers_our_stop_budget(self) -> None:
        """TimeoutStopSec leaves room for the shutdown grace plus the default
        unloadTimeout before systemd sends SIGKILL."""
        unit = unit_sections(self.service_path)["Service"]
        [timeout] = unit["TimeoutStopSec"]
        unload = {f.name: f.default for f in dataclasses.fields(Config)}["unload_timeout"]
        assert isinstance(unload, int)
        self.assertGreater(seconds(timeout), DEFAULT_GRACE_SECONDS + unload)

    def test_units_pass_systemd_analyze_verify(self) -> None:
        """systemd-analyze verify accepts both units without a warning
        (ExecStart pointed at this Python, as /opt/llamaswap does not exist
        here)."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze not installed (Debian package: systemd)")
        if not os.access("/bin/kill", os.X_OK):
            raise SkipTest("ExecReload's /bin/kill is missing (Debian package: procps)")
        directory = short_tempdir(self)
        for path in (self.service_path, self.socket_path):
            with open(path) as f:
                text = f.read()
            text = text.replace("/opt/llamaswap/bin/llamaswap", f"{PYTHON} -m llamaswap")
            with open(os.path.join(directory, os.path.basename(path)), "w") as f:
                f.write(text)
        import subprocess

        result = subprocess.run(
            [analyze, "verify", "--man=no", "llamaswap.socket", "llamaswap.service"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
        )
        output = result.stdout + result.stderr
        about_us = [line for line in output.splitlines() if "llamaswap" in line]
        self.assertEqual((result.returncode, about_us), (0, []), output)


class ActivatedLlamaswap:
    """llamaswap started the way the socket unit starts it:
    systemd-socket-activate binds the port, waits for a connection, then
    execs llamaswap with LISTEN_FDS; one demo model ``m``."""

    def __init__(
        self,
        case: TestCase,
        activate: str,
        demo_args: tuple[str, ...] = (),
        notify_path: str | None = None,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.model_port = free_port()
        listen_port = free_port()
        self.url = f"http://127.0.0.1:{listen_port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        directory = short_tempdir(case)
        config_path = os.path.join(directory, "config.yaml")
        demo = " ".join(
            [PYTHON, "-m", "llamaswap.demo", "--host", "127.0.0.1"]
            + ["--port", str(self.model_port), "--model", "m", *demo_args]
        )
        config = {
            "healthCheckTimeout": 30,
            "models": {"m": {"cmd": demo, "proxy": f"http://127.0.0.1:{self.model_port}"}},
        }
        with open(config_path, "w") as f:
            json.dump(config, f)
        # systemd-socket-activate passes on only PATH, HOME, TERM, USER and
        # what -E sets.
        argv = [activate, "-l", f"{listen_host}:{listen_port}", "--fdname=http"]
        argv += ["-E", f"PYTHONPATH={REPO}"]
        if notify_path is not None:
            argv += ["-E", f"NOTIFY_SOCKET={notify_path}"]
        argv += [PYTHON, "-m", "llamaswap", "-c", config_path]
        argv += ["--listen", "systemd:domain=INET:index=0"]
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self._output: list[bytes] = []
        ended, output = self.ended, self._output

        class Watch(protocol.ProcessProtocol):
            def outReceived(self, data: bytes) -> None:
                output.append(data)

            errReceived = outReceived

            def processEnded(self, reason: Failure) -> None:
                ended.callback(reason.value)

        self.transport = reactor.spawnProcess(
            Watch(), argv[0], argv, env=dict(os.environ), path=REPO
        )
        case.addCleanup(self._kill_leftover)

    def _kill_leftover(self) -> defer.Deferred[Any] | None:
        if self.ended.called:
            return None
        self.transport.signalProcess("KILL")
        return self.ended

    @property
    def output(self) -> str:
        return b"".join(self._output).decode(errors="replace")

    async def listening(self) -> None:
        await poll_until(lambda: "Listening on" in self.output, timeout=10)

    async def chat(self, **extra: Any) -> Any:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
        return await treq.post(
            self.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={b"content-type": [b"application/json"]},
            pool=self.pool,
            timeout=30,
            unbuffered=True,
        )

    async def exit_code(self, timeout: float = 30) -> int:
        status = await self.ended.addTimeout(timeout, reactor)
        return int(status.exitCode)


class SocketActivationTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            raise SkipTest("systemd-socket-activate not installed (Debian package: systemd)")
        self.activate = activate

    async def test_socket_activated_end_to_end(self) -> None:
        """Socket-activated llamaswap answers /health and a chat completion
        (starting the demo model) on the inherited socket, and SIGTERM stops
        it and its model within the deadline, exiting 0."""
        server = ActivatedLlamaswap(self, self.activate)
        await server.listening()
        try:
            # This first connection makes systemd-socket-activate exec
            # llamaswap; it waits in the backlog until llamaswap accepts.
            health = await treq.get(server.url + "/health", pool=server.pool, timeout=30)
            self.assertEqual((health.code, await health.text()), (200, "OK"))
            chat = await server.chat()
            self.assertEqual(chat.code, 200)
            answer = await chat.json()
        except Exception:
            self.fail("request failed; llamaswap said:\n" + server.output)
        self.assertEqual(answer["model"], "m")
        self.assertTrue(answer["choices"][0]["message"]["content"])
        server.transport.signalProcess("TERM")
        self.assertEqual(await server.exit_code(), 0, server.output)
        deadline = reactor.seconds() + 5
        while await _accepts(server.model_port):
            self.assertLess(reactor.seconds(), deadline, "the model server outlived llamaswap")
            await poll_until(lambda: True)

    async def test_exposure_warning_follows_the_inherited_socket(self) -> None:
        """With no apiKeys, a socket-activated listener on the wildcard
        address gets the "reachable from other hosts" warning; one on
        loopback does not (decided from the inherited socket's address)."""
        warning = "reachable from other hosts and no apiKeys are configured"
        for host, warned in (("0.0.0.0", True), ("127.0.0.1", False)):
            with self.subTest(host=host):
                server = ActivatedLlamaswap(self, self.activate, listen_host=host)
                await server.listening()
                health = await treq.get(server.url + "/health", pool=server.pool, timeout=30)
                self.assertEqual(health.code, 200, server.output)
                await health.content()
                self.assertEqual(warning in server.output, warned, server.output)
                server.transport.signalProcess("TERM")
                self.assertEqual(await server.exit_code(), 0, server.output)

    async def test_notifies_systemd(self) -> None:
        """llamaswap sends READY=1 before it answers, a status line naming
        the running model, and STOPPING=1 on SIGTERM."""
        path = os.path.join(short_tempdir(self), "notify")
        collector = Collector()
        port = reactor.listenUNIXDatagram(path, collector)
        self.addCleanup(port.stopListening)
        server = ActivatedLlamaswap(self, self.activate, notify_path=path)
        await server.listening()
        health = await treq.get(server.url + "/health", pool=server.pool, timeout=30)
        await health.content()
        self.assertTrue(collector.messages[0].startswith("READY=1\n"), collector.messages)
        chat = await server.chat()
        await chat.content()
        server.transport.signalProcess("TERM")
        self.assertEqual(await server.exit_code(), 0, server.output)
        await poll_until(lambda: any("STOPPING=1" in m for m in collector.messages), timeout=5)
        self.assertIn("STATUS=running m (ready)", collector.messages)
        self.assertTrue(collector.messages[-1].startswith("STOPPING=1"), collector.messages)

    async def test_sigterm_lets_a_stream_finish(self) -> None:
        """On SIGTERM a response that is streaming runs to its end before the
        model is stopped; then llamaswap exits 0."""
        server = ActivatedLlamaswap(self, self.activate, ("--tokens-per-second", "20"))
        await server.listening()
        response = await server.chat(stream=True, max_tokens=30)
        self.assertEqual(response.code, 200, server.output)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        await poll_until(lambda: bool(chunks), timeout=10)
        server.transport.signalProcess("TERM")
        await done
        self.assertTrue(b"".join(chunks).rstrip().endswith(b"data: [DONE]"))
        self.assertEqual(await server.exit_code(), 0, server.output)
        self.assertIn("waiting up to 10s for 1 in-flight requests", server.output)
        self.assertIn("in-flight requests finished", server.output)

    async def test_second_sigterm_cuts_the_grace(self) -> None:
        """A second SIGTERM while llamaswap waits for a long stream ends the
        wait at once: it stops the model and exits well within the grace."""
        server = ActivatedLlamaswap(self, self.activate, ("--tokens-per-second", "2"))
        await server.listening()
        response = await server.chat(stream=True, max_tokens=200)
        chunks: list[bytes] = []
        stream = treq.collect(response, chunks.append)
        stream.addErrback(lambda _: None)  # cut off when llamaswap exits
        await poll_until(lambda: bool(chunks), timeout=10)
        server.transport.signalProcess("TERM")
        await poll_until(lambda: "in-flight requests to finish" in server.output, timeout=10)
        second = reactor.seconds()
        server.transport.signalProcess("TERM")
        self.assertEqual(await server.exit_code(), 0, server.output)
        self.assertLess(reactor.seconds() - second, 8, server.output)
        self.assertIn(
            "SIGTERM received again: no longer waiting for 1 in-flight requests", server.output
        )
        await stream


async def _accepts(port: int) -> bool:
    """Whether something accepts connections on the loopback ``port``."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
    try:
        connected = await endpoint.connect(Factory.forProtocol(Protocol))
    except Exception:
        return False
    connected.transport.loseConnection()
    return True


if sys.platform != "linux":  # pragma: no cover
    skip = "systemd integration is Linux only"


class TextFormatTests(SynchronousTestCase):
    def test_same_as_twistd_classic_text(self) -> None:
        """The cached-timestamp text format writes exactly twistd's lines."""
        import time as _time

        from twisted.logger import LogLevel, formatEventAsClassicLogText

        from llamaswap.service.journal import format_text_event

        now = _time.time()
        events = [
            {
                "log_format": "hi {x}",
                "x": 1,
                "log_time": now,
                "log_namespace": "a.b",
                "log_level": LogLevel.warn,
            },
            {
                "log_format": "two\nlines",
                "log_time": now,
                "log_system": "-",
                "log_level": LogLevel.info,
            },
        ]
        for event in events:
            self.assertEqual(format_text_event(event), formatEventAsClassicLogText(event))
        self.assertIsNone(format_text_event({"log_format": "", "log_time": now}))
