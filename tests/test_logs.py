"""Log monitors, the log hub's routing, proxy line format and the access log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from llamaswap.core.mailbox import Mailbox, drop_marker
from llamaswap.observe.logformat import (
    TIME_LAYOUTS,
    access_log_line,
    client_ip,
    format_time,
    go_duration,
    proxy_line,
    request_access_line,
    skip_access_log,
)
from llamaswap.observe.logs import HISTORY_BYTES, LogHub, LogMonitor

#: 2006-01-02 15:04:05.123456 UTC, Go's reference time (with microseconds).
REFERENCE = datetime(2006, 1, 2, 15, 4, 5, 123456, tzinfo=UTC).timestamp()
MST = timezone(timedelta(hours=-7), "MST")


class RingTests(SynchronousTestCase):
    def test_history_keeps_everything_below_the_limit(self) -> None:
        """Below the limit the history is every byte written, in order."""
        monitor = LogMonitor("m", history_bytes=10)
        monitor.write(b"abc")
        monitor.write(b"def")
        self.assertEqual(monitor.history(), b"abcdef")

    def test_wrap_around_keeps_the_last_bytes(self) -> None:
        """Writing past the limit keeps exactly the most recent bytes."""
        monitor = LogMonitor("m", history_bytes=10)
        for chunk in (b"0123", b"4567", b"89ab", b"cd"):
            monitor.write(chunk)
        self.assertEqual(monitor.history(), b"456789abcd")
        monitor.write(b"e")
        self.assertEqual(monitor.history(), b"56789abcde")

    def test_chunk_larger_than_the_ring(self) -> None:
        """A chunk bigger than the ring leaves only its own tail."""
        monitor = LogMonitor("m", history_bytes=4)
        monitor.write(b"xy")
        monitor.write(b"0123456789")
        self.assertEqual(monitor.history(), b"6789")
        monitor.write(b"ab")
        self.assertEqual(monitor.history(), b"89ab")

    def test_default_ring_is_100_kib(self) -> None:
        """The default history is llama-swap's 100 KiB."""
        monitor = LogMonitor("m")
        monitor.write(b"x" * (HISTORY_BYTES + 7))
        monitor.write(b"end")
        history = monitor.history()
        self.assertEqual(len(history), 100 * 1024)
        self.assertTrue(history.endswith(b"xend"))

    def test_empty_and_cleared(self) -> None:
        """A fresh or cleared monitor has no history."""
        monitor = LogMonitor("m")
        self.assertEqual(monitor.history(), b"")
        monitor.write(b"a\n\nb\n")
        self.assertEqual(monitor.tail_lines(5), ["a", "b"])
        monitor.clear()
        self.assertEqual(monitor.history(), b"")

    def test_sinks_receive_every_chunk(self) -> None:
        """Chunks are written through to sinks, including other monitors."""
        upstream = LogMonitor("upstream")
        model = LogMonitor("m", sinks=(upstream,))
        model.write(b"hello\n")
        self.assertEqual(upstream.history(), b"hello\n")


class SubscriberTests(SynchronousTestCase):
    def test_live_subscriber_gets_chunks_and_unsubscribes(self) -> None:
        """A subscriber gets each chunk at once; calling the subscription removes it."""
        monitor = LogMonitor("m")
        got: list[bytes] = []
        unsubscribe = monitor.subscribe(got.append)
        monitor.write(b"one")
        unsubscribe()
        monitor.write(b"two")
        self.assertEqual(got, [b"one"])
        self.assertEqual(monitor.subscriber_count, 0)

    def test_blocked_subscriber_drops_with_marker(self) -> None:
        """A paused subscriber queues up to its bound, then drops; the next
        delivered chunk is preceded by the dropped-bytes marker."""
        monitor = LogMonitor("m")
        got: list[bytes] = []
        subscription = monitor.subscribe(got.append, max_chunks=2)
        subscription.pause()
        for chunk in (b"a", b"b", b"ccc", b"dddd"):
            monitor.write(chunk)
        self.assertEqual(got, [])
        self.assertEqual(subscription.pending_dropped, 7)
        subscription.resume()
        self.assertEqual(got, [b"a", b"b"])
        monitor.write(b"e")
        self.assertEqual(got, [b"a", b"b", drop_marker(7) + b"e"])
        self.assertEqual(drop_marker(7), "\n— 7 bytes dropped —\n".encode())
        self.assertEqual(monitor.history(), b"abcccdddde")

    def test_byte_bound(self) -> None:
        """The queue is bounded in bytes as well as chunks."""
        monitor = LogMonitor("m")
        got: list[bytes] = []
        subscription = monitor.subscribe(got.append, max_chunks=100, max_bytes=5)
        subscription.pause()
        monitor.write(b"1234")
        monitor.write(b"56")
        subscription.resume()
        self.assertEqual(got, [b"1234"])
        self.assertEqual(subscription.dropped_total, 2)

    def test_slow_subscriber_never_blocks_others(self) -> None:
        """One paused subscriber does not hold up another one."""
        monitor = LogMonitor("m")
        fast: list[bytes] = []
        slow = monitor.subscribe(lambda data: None, max_chunks=1)
        slow.pause()
        monitor.subscribe(fast.append)
        for index in range(50):
            monitor.write(b"%d" % index)
        self.assertEqual(len(fast), 50)

    def test_pause_during_delivery_keeps_order(self) -> None:
        """A consumer that pauses while being written to gets the rest in order."""
        got: list[int] = []
        box: Mailbox[int] = Mailbox(lambda item: None, max_items=10)

        def deliver(item: int) -> None:
            got.append(item)
            if item == 1:
                box.pause()

        box._deliver = deliver
        box.pause()
        for item in (1, 2, 3):
            box.put(item)
        box.resume()
        self.assertEqual(got, [1])
        box.resume()
        self.assertEqual(got, [1, 2, 3])

    def test_failing_subscriber_is_removed(self) -> None:
        """A subscriber that raises is removed; the writer carries on."""
        monitor = LogMonitor("m")

        def broken(data: bytes) -> None:
            raise ValueError("boom")

        monitor.subscribe(broken)
        monitor.write(b"x")
        monitor.write(b"y")
        self.assertEqual(monitor.subscriber_count, 0)
        self.assertEqual(monitor.history(), b"xy")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class HubRoutingTests(SynchronousTestCase):
    #: mode -> (proxy reaches mux, upstream reaches mux, mux reaches stdout)
    TABLE = {
        "proxy": (True, False, True),
        "upstream": (False, True, True),
        "both": (True, True, True),
        "none": (False, False, False),
        "bogus": (True, False, True),
    }

    def test_routing_table(self) -> None:
        """Every logToStdout mode routes proxy/upstream/mux as in §9.1."""
        for mode, (proxy_to_mux, upstream_to_mux, mux_to_stdout) in self.TABLE.items():
            out: list[bytes] = []
            hub = LogHub(mode, out.append)
            hub.proxy.write(b"P")
            hub.model("m").write(b"U")
            expected_mux = (b"P" if proxy_to_mux else b"") + (b"U" if upstream_to_mux else b"")
            self.assertEqual(hub.mux.history(), expected_mux, mode)
            self.assertEqual(b"".join(out), expected_mux if mux_to_stdout else b"", mode)
            # Each source keeps its own history whatever the mode.
            self.assertEqual(hub.proxy.history(), b"P", mode)
            self.assertEqual(hub.upstream.history(), b"U", mode)
            self.assertEqual(hub.model("m").history(), b"U", mode)

    def test_without_stdout_nothing_is_printed(self) -> None:
        """With no stdout writer the mux still keeps history."""
        hub = LogHub("both")
        hub.proxy.write(b"x")
        self.assertEqual(hub.mux.history(), b"x")

    def test_model_monitors(self) -> None:
        """model() returns one monitor per id; retain_models forgets the others."""
        hub = LogHub()
        self.assertIs(hub.model("a"), hub.model("a"))
        hub.model("b")
        hub.retain_models(["a"])
        self.assertEqual(list(hub.models), ["a"])
        self.assertIs(hub.monitor(""), hub.mux)
        self.assertIs(hub.monitor("proxy"), hub.proxy)
        self.assertIsNone(hub.monitor("b"))


class ProxyLineTests(SynchronousTestCase):
    def _hub_with_logger(
        self, level: str = "info", time_format: str = ""
    ) -> tuple[LogHub, Logger, Any]:
        hub = LogHub("proxy", time_format=time_format, tz=UTC)
        publisher = LogPublisher()
        observer = hub.proxy_observer(level)
        publisher.addObserver(observer)
        return hub, Logger(namespace="llamaswap.test", observer=publisher), observer

    def test_observer_interface(self) -> None:
        """proxy_observer gives an ILogObserver."""
        verifyObject(ILogObserver, LogHub().proxy_observer())

    def test_levels_and_format(self) -> None:
        """Events render as ``[LEVEL] message``; logLevel filters lower levels."""
        hub, log, _ = self._hub_with_logger("info")
        log.debug("hidden")
        log.info("{model} Health check passed on {url}", model="m", url="http://x")
        log.warn("careful")
        log.error("bad")
        log.critical("worse")
        self.assertEqual(
            hub.proxy.history(),
            b"[INFO] m Health check passed on http://x\n"
            b"[WARN] careful\n[ERROR] bad\n[ERROR] worse\n",
        )

    def test_level_changes_apply(self) -> None:
        """set_log_level applies to observers already made."""
        hub, log, _ = self._hub_with_logger("info")
        hub.set_log_level("debug")
        log.debug("now visible")
        hub.set_log_level("error")
        log.warn("now hidden")
        self.assertEqual(hub.proxy.history(), b"[DEBUG] now visible\n")

    def test_other_namespaces_only_from_warn(self) -> None:
        """Twisted's own INFO chatter stays out; its warnings get in."""
        hub = LogHub()
        observer = hub.proxy_observer("debug")
        observer({"log_level": LogLevel.info, "log_namespace": "twisted.web", "log_format": "x"})
        observer({"log_level": LogLevel.warn, "log_namespace": "twisted.web", "log_format": "y"})
        self.assertEqual(hub.proxy.history(), b"[WARN] y\n")

    def test_failure_traceback_is_included(self) -> None:
        """log.failure lines carry the traceback after the message."""
        hub, log, _ = self._hub_with_logger()
        try:
            raise KeyError("gone")
        except KeyError:
            log.failure("lookup failed", Failure())
        text = hub.proxy.history().decode()
        self.assertTrue(text.startswith("[ERROR] lookup failed\n"))
        self.assertIn("KeyError", text)

    def test_time_format_prefix(self) -> None:
        """With logTimeFormat the line starts with the formatted time and a space."""
        hub, log, observer = self._hub_with_logger(time_format="rfc3339")
        observer(
            {
                "log_level": LogLevel.info,
                "log_namespace": "llamaswap",
                "log_format": "started",
                "log_time": REFERENCE,
            }
        )
        self.assertEqual(hub.proxy.history(), b"2006-01-02T15:04:05Z [INFO] started\n")
        hub.set_time_format("")
        log.info("plain")
        self.assertTrue(hub.proxy.history().endswith(b"\n[INFO] plain\n"))

    def test_unknown_time_format_means_no_timestamp(self) -> None:
        """An unknown layout name logs without a timestamp."""
        self.assertEqual(
            proxy_line(LogLevel.warn, "x", when=REFERENCE, time_format="iso"), b"[WARN] x\n"
        )

    def test_go_layouts(self) -> None:
        """Every Go layout name renders like Go's formatter."""
        expected = {
            "ansic": "Mon Jan  2 15:04:05 2006",
            "unixdate": "Mon Jan  2 15:04:05 UTC 2006",
            "rubydate": "Mon Jan 02 15:04:05 +0000 2006",
            "rfc822": "02 Jan 06 15:04 UTC",
            "rfc822z": "02 Jan 06 15:04 +0000",
            "rfc850": "Monday, 02-Jan-06 15:04:05 UTC",
            "rfc1123": "Mon, 02 Jan 2006 15:04:05 UTC",
            "rfc1123z": "Mon, 02 Jan 2006 15:04:05 +0000",
            "rfc3339": "2006-01-02T15:04:05Z",
            "rfc3339nano": "2006-01-02T15:04:05.123456Z",
            "kitchen": "3:04PM",
            "stamp": "Jan  2 15:04:05",
            "stampmilli": "Jan  2 15:04:05.123",
            "stampmicro": "Jan  2 15:04:05.123456",
            "stampnano": "Jan  2 15:04:05.123456000",
        }
        self.assertEqual(set(expected), set(TIME_LAYOUTS))
        for name, text in expected.items():
            self.assertEqual(format_time(name, REFERENCE, UTC), text, name)
        self.assertEqual(format_time("RFC3339", REFERENCE, UTC), "2006-01-02T15:04:05Z")

    def test_go_layouts_with_offsets(self) -> None:
        """Zone names and offsets follow the given time zone."""
        self.assertEqual(format_time("rfc3339", REFERENCE, MST), "2006-01-02T08:04:05-07:00")
        self.assertEqual(format_time("rfc1123", REFERENCE, MST), "Mon, 02 Jan 2006 08:04:05 MST")
        self.assertEqual(format_time("rubydate", REFERENCE, MST), "Mon Jan 02 08:04:05 -0700 2006")
        self.assertEqual(format_time("kitchen", REFERENCE, MST), "8:04AM")
        whole = datetime(2006, 1, 2, 15, 4, 5, tzinfo=UTC).timestamp()
        self.assertEqual(format_time("rfc3339nano", whole, UTC), "2006-01-02T15:04:05Z")


class _FinishedRequest:
    """The parts of a finished twisted.web request the access log reads."""

    method = b"GET"
    clientproto = b"HTTP/1.1"

    def __init__(self, path: bytes, headers: dict[bytes, bytes], code: int, sent: int) -> None:
        self.path = path
        self._headers = headers
        self.code = code
        self.sentLength = sent

    def getHeader(self, name: bytes) -> bytes | None:
        return self._headers.get(name)

    def getClientAddress(self) -> Any:
        return IPv4Address("TCP", "127.0.0.1", 4242)


class AccessLogTests(SynchronousTestCase):
    def test_line_format(self) -> None:
        """The access line matches llama-swap's format."""
        self.assertEqual(
            access_log_line(
                client="10.0.0.1",
                method="POST",
                path="/v1/chat/completions",
                proto="HTTP/1.1",
                status=200,
                body_bytes=1234,
                user_agent="curl/8.0",
                duration=1.52,
            ),
            'Request 10.0.0.1 "POST /v1/chat/completions HTTP/1.1" 200 1234 "curl/8.0" 1.52s',
        )

    def test_client_ip_precedence(self) -> None:
        """X-Forwarded-For's first entry, then X-Real-IP, then the peer."""
        self.assertEqual(client_ip("1.1.1.1, 2.2.2.2", "3.3.3.3", "4.4.4.4"), "1.1.1.1")
        self.assertEqual(client_ip(" 1.1.1.1 ", None, "4.4.4.4"), "1.1.1.1")
        self.assertEqual(client_ip(None, " 3.3.3.3", "4.4.4.4"), "3.3.3.3")
        self.assertEqual(client_ip("", "", "4.4.4.4"), "4.4.4.4")

    def test_skip_list(self) -> None:
        """Health polling, performance and metrics paths are not logged."""
        for path in ("/wol-health", "/api/performance", "/api/performance?x", "/metrics"):
            self.assertTrue(skip_access_log(path), path)
        for path in ("/health", "/api/events", "/v1/models"):
            self.assertFalse(skip_access_log(path), path)

    def test_go_durations(self) -> None:
        """Durations print as Go's time.Duration.String does."""
        cases = {
            0: "0s",
            450e-9: "450ns",
            12.5e-6: "12.5µs",
            0.35: "350ms",
            0.0015: "1.5ms",
            1.52: "1.52s",
            2.0: "2s",
            60.0: "1m0s",
            61.5: "1m1.5s",
            3600.0: "1h0m0s",
            3723.25: "1h2m3.25s",
            -0.5: "-500ms",
        }
        for seconds, text in cases.items():
            self.assertEqual(go_duration(seconds), text, seconds)

    def test_line_from_request(self) -> None:
        """request_access_line reads a Twisted request; skipped paths give None."""
        request = _FinishedRequest(
            b"/v1/models", {b"x-real-ip": b"9.9.9.9", b"user-agent": b"ua"}, 404, 19
        )
        self.assertEqual(
            request_access_line(request, duration=0.001),
            'Request 9.9.9.9 "GET /v1/models HTTP/1.1" 404 19 "ua" 1ms',
        )
        request.path = b"/metrics"
        self.assertIsNone(request_access_line(request, duration=0.001))
