"""Tests for llamaswap.web.limits: what one client can make llamaswap hold.

Real loopback sockets against a listening :class:`LlamaSwapSite`; the
client is a raw byte-level protocol so that bodies can be announced and not
sent, chunked, or cut short.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from zope.interface import implementer

from llamaswap.config import ConfigError, load_config_text
from llamaswap.config.settings import DEFAULT_MAX_REQUEST_BODY_SIZE
from llamaswap.web import limits
from llamaswap.web.limits import HEAD_TIMEOUT, IDLE_TIMEOUT, MAX_HEADERS, TOTAL_HEADERS_SIZE
from llamaswap.web.site import LlamaSwapRequest, LlamaSwapSite
from tests.support import ServiceProcess, free_port, poll_until

LIMIT = 1000


class _Echo(Resource):
    """Answers with the size of the body it was given."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def render(self, request: Any) -> bytes:
        size = len(request.content.read())
        self.sizes.append(size)
        return b"%d" % size


class _Client(Protocol):
    """Sends raw bytes; keeps every byte received; ``done`` fires on close."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(bytes(self.received))


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


def _chunked(body: bytes, size: int) -> bytes:
    out = b""
    for start in range(0, len(body), size):
        part = body[start : start + size]
        out += b"%x\r\n" % len(part) + part + b"\r\n"
    return out + b"0\r\n\r\n"


class BodyLimitTests(TestCase):
    """``maxRequestBodySize`` holds against every way of sending a body."""

    def setUp(self) -> None:
        self.resource = _Echo()
        self.limit = LIMIT
        self.peaks: list[int] = []
        peaks = self.peaks

        class Probe(LlamaSwapRequest):
            def handleContentChunk(self, data: bytes) -> None:
                super().handleContentChunk(data)
                assert self.content is not None
                peaks.append(self.content.tell())

        site = LlamaSwapSite(self.resource, reactor, max_request_body_size=lambda: self.limit)
        site.requestFactory = Probe
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    async def _exchange(self, *writes: bytes) -> bytes:
        """Connect, write each piece, return all bytes until the server closes."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        client = await connectProtocol(endpoint, _Client())
        for data in writes:
            client.transport.write(data)
        timeout = reactor.callLater(10, client.transport.abortConnection)
        try:
            return await client.done
        finally:
            if timeout.active():
                timeout.cancel()

    async def test_oversized_content_length_refused_at_once(self) -> None:
        """A ``Content-Length`` over the limit gets 413 with the JSON error
        envelope before any body byte is sent, and the connection is closed;
        no resource sees the request."""
        raw = await self._exchange(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
        )
        status, headers, body = _parse(raw)
        self.assertEqual(status, 413)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(int(headers["content-length"]), len(body))
        error = json.loads(body)
        self.assertEqual(error["src"], "llama-swap")
        self.assertEqual(
            error["error"]["message"],
            "request body of 1000000000 bytes exceeds maxRequestBodySize (1000 bytes)",
        )
        self.assertEqual(error["error"]["code"], "request_too_large")
        self.assertEqual(self.resource.sizes, [])
        self.assertEqual(self.peaks, [])

    async def test_expect_continue_not_invited(self) -> None:
        """A client asking ``Expect: 100-continue`` for an oversized body is
        told 413, never invited to send it."""
        raw = await self._exchange(
            b"POST /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
        )
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw)
        self.assertNotIn(b"100 Continue", raw)

    async def test_oversized_body_sent_anyway(self) -> None:
        """A client that sends its oversized body regardless still reads the
        413 (no reset), and nothing of the body is buffered."""
        raw = await self._exchange(
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 200000\r\n\r\n", b"x" * 200000
        )
        self.assertEqual(_parse(raw)[0], 413)
        self.assertEqual(self.resource.sizes, [])
        self.assertEqual(self.peaks, [])

    async def test_chunked_over_limit_cut(self) -> None:
        """A chunked body is cut with 413 once it passes the limit; the
        buffer never held more than the limit."""
        body = b"y" * (LIMIT * 50)
        raw = await self._exchange(
            b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            _chunked(body, 300),
        )
        status, _, payload = _parse(raw)
        self.assertEqual(status, 413)
        self.assertEqual(
            json.loads(payload)["error"]["message"],
            "chunked request body exceeds maxRequestBodySize (1000 bytes)",
        )
        self.assertEqual(self.resource.sizes, [])
        self.assertTrue(self.peaks)
        self.assertLessEqual(max(self.peaks), LIMIT)

    async def test_at_limit_accepted(self) -> None:
        """Exactly ``maxRequestBodySize`` bytes are accepted, with a length
        or chunked."""
        body = b"z" * LIMIT
        raw = await self._exchange(
            b"POST /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % LIMIT + body
        )
        self.assertEqual(_parse(raw)[0], 200)
        self.assertEqual(_parse(raw)[2], b"1000")
        raw = await self._exchange(
            b"POST /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(body, 128)
        )
        self.assertEqual(_parse(raw)[0], 200)
        self.assertEqual(self.resource.sizes, [LIMIT, LIMIT])
        self.assertLessEqual(max(self.peaks), LIMIT)

    async def test_limit_read_per_request(self) -> None:
        """The limit is the one of the config being served: a reload that
        changes it applies to the next request."""
        self.limit = 10
        raw = await self._exchange(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n")
        self.assertEqual(_parse(raw)[0], 413)
        self.limit = 20
        raw = await self._exchange(
            b"POST /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Length: 11\r\n\r\n"
            + b"a" * 11
        )
        self.assertEqual(_parse(raw)[0], 200)

    async def test_text_plain_client(self) -> None:
        """The 413 follows the client's ``Accept`` like every llamaswap error."""
        raw = await self._exchange(
            b"POST /x HTTP/1.1\r\nHost: h\r\nAccept: text/plain\r\nContent-Length: 1001\r\n\r\n"
        )
        status, headers, body = _parse(raw)
        self.assertEqual(status, 413)
        self.assertEqual(headers["content-type"], "text/plain; charset=utf-8")
        self.assertEqual(
            body, b"llama-swap: request body of 1001 bytes exceeds maxRequestBodySize (1000 bytes)"
        )

    async def test_too_many_headers(self) -> None:
        """More than ``MAX_HEADERS`` headers: 400 and closed; exactly that
        many are served."""
        many = b"".join(b"X-H%d: v\r\n" % n for n in range(MAX_HEADERS - 2))
        raw = await self._exchange(
            b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n" + many + b"\r\n"
        )
        self.assertEqual(_parse(raw)[0], 200)
        many = b"".join(b"X-H%d: v\r\n" % n for n in range(MAX_HEADERS))
        raw = await self._exchange(b"GET /x HTTP/1.1\r\nHost: h\r\n" + many + b"\r\n")
        self.assert_bad_request(raw)

    async def test_headers_too_large(self) -> None:
        """A head over ``TOTAL_HEADERS_SIZE`` bytes: 400 and closed."""
        lines = b"".join(b"X-Pad%d: %s\r\n" % (n, b"p" * 1000) for n in range(20))
        self.assertGreater(len(lines), TOTAL_HEADERS_SIZE)
        raw = await self._exchange(b"GET /x HTTP/1.1\r\nHost: h\r\n" + lines + b"\r\n")
        self.assert_bad_request(raw)
        self.assertEqual(self.resource.sizes, [])

    async def test_single_line_too_long(self) -> None:
        """One header line over Twisted's line limit: the same JSON 400
        (Twisted alone would close without a word)."""
        raw = await self._exchange(
            b"GET /x HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n"
        )
        self.assert_bad_request(raw)

    async def test_malformed_requests(self) -> None:
        """Whatever Twisted's parser rejects is answered with a JSON 400."""
        for raw in (
            b"NONSENSE\r\n\r\n",
            b"GET /x HTTP/1.1\r\nNo colon here\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: ten\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ):
            with self.subTest(raw=raw):
                self.assert_bad_request(await self._exchange(raw))
        self.assertEqual(self.resource.sizes, [])

    async def test_connection_close_among_tokens(self) -> None:
        """``Connection: close`` closes the connection after the response
        however the client lists its tokens (Twisted splits on spaces only)."""
        for header in (
            b"Connection: close, X-Foo\r\n",
            b"Connection: X-Foo,close\r\n",
            b"Connection: keep-alive\r\nConnection: close\r\n",
        ):
            with self.subTest(header=header):
                endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
                client = await connectProtocol(endpoint, _Client())
                client.transport.write(b"GET /x HTTP/1.1\r\nHost: h\r\n" + header + b"\r\n")
                aborted: list[bool] = []

                def abort(client: _Client = client, aborted: list[bool] = aborted) -> None:
                    aborted.append(True)
                    client.transport.abortConnection()

                timeout = reactor.callLater(5, abort)
                raw = await client.done
                if timeout.active():
                    timeout.cancel()
                self.assertEqual(aborted, [], "the server kept the connection open")
                status, headers, body = _parse(raw)
                self.assertEqual((status, body), (200, b"0"))
                self.assertEqual(headers["connection"], "close")

    def assert_bad_request(self, raw: bytes) -> None:
        status, headers, body = _parse(raw)
        self.assertEqual(status, 400)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(
            json.loads(body)["error"],
            {
                "message": "malformed HTTP request, or a request head over 100 headers "
                "or 16384 bytes",
                "type": "invalid_request_error",
                "param": None,
                "code": "bad_request",
            },
        )


@implementer(IHalfCloseableProtocol)
class _HalfClosingClient(_Client):
    """Keeps its side open after the server's FIN and keeps sending: once the
    server has closed its side too, a write is answered with a reset."""

    eof = False

    def readConnectionLost(self) -> None:
        self.eof = True
        self.sending = LoopingCall(self.transport.write, b"more body " * 100)
        self.sending.start(0.05)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.eof and self.sending.running:
            self.sending.stop()
        super().connectionLost(reason)

    def writeConnectionLost(self) -> None:
        pass


class LingerTests(TestCase):
    async def test_refused_connection_lingers_then_closes(self) -> None:
        """After a 413 the server half-closes at once (the client reads the
        answer and EOF), discards what the client still sends, and closes
        the connection ``LINGER`` seconds later."""
        self.patch(limits, "LINGER", 0.2)
        site = LlamaSwapSite(_Echo(), reactor, max_request_body_size=lambda: 10)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await connectProtocol(endpoint, _HalfClosingClient())
        client.transport.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n")
        await poll_until(lambda: client.eof)
        self.assertEqual(_parse(bytes(client.received))[0], 413)
        self.assertNoResult(client.done)
        started = reactor.seconds()
        timeout = reactor.callLater(10, client.transport.abortConnection)
        await client.done
        if timeout.active():
            timeout.cancel()
        self.assertLess(reactor.seconds() - started, 5)


class ChannelBoundsTests(SynchronousTestCase):
    """The Site sets its bounds explicitly (Twisted's defaults could change)."""

    def _channel(self, clock: Clock) -> tuple[Any, StringTransport]:
        site = LlamaSwapSite(_Echo(), reactor=clock)
        site.reactor = clock  # the channels' time-outs run on it
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_bounds_set(self) -> None:
        """Header count, head size and idle time-out are llamaswap's own, and
        the body limit defaults to 64 MiB."""
        protocol, _ = self._channel(Clock())
        channel = protocol._channel
        self.assertEqual(channel.maxHeaders, MAX_HEADERS)
        self.assertEqual(channel.totalHeadersSize, TOTAL_HEADERS_SIZE)
        self.assertEqual(channel.timeOut, IDLE_TIMEOUT)
        self.assertEqual(channel.site.max_request_body_size, DEFAULT_MAX_REQUEST_BODY_SIZE)
        self.assertEqual(DEFAULT_MAX_REQUEST_BODY_SIZE, 64 * 1024 * 1024)
        protocol.connectionLost(None)

    def test_idle_connection_closed(self) -> None:
        """A kept-alive connection that sends nothing after a response is
        closed after ``IDLE_TIMEOUT`` seconds."""
        clock = Clock()
        protocol, transport = self._channel(clock)
        protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)

    def assert_head_timed_out(self, transport: StringTransport) -> None:
        self.assertTrue(transport.disconnecting)
        raw = transport.value()
        status, headers, body = _parse(raw[raw.index(b"HTTP/1.1 408 ") :])
        self.assertEqual(status, 408)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(
            json.loads(body)["error"]["message"],
            f"request head not received within {HEAD_TIMEOUT:g} s",
        )

    def test_slow_head_closed(self) -> None:
        """A client sending its head one byte at a time, each well within the
        idle time-out, is answered 408 and closed ``HEAD_TIMEOUT`` seconds
        after the accept; so is one that sends nothing at all."""
        for step in (IDLE_TIMEOUT - 1, HEAD_TIMEOUT / 3):
            with self.subTest(step=step):
                clock = Clock()
                protocol, transport = self._channel(clock)
                for byte in b"POST /x HTTP/1.1\r\nHost: h\r\n":
                    if clock.seconds() + step >= HEAD_TIMEOUT:
                        break
                    clock.advance(step)
                    protocol.dataReceived(bytes([byte]))
                self.assertFalse(transport.disconnecting)
                clock.advance(HEAD_TIMEOUT - clock.seconds())
                self.assert_head_timed_out(transport)
                protocol.connectionLost(None)
        clock = Clock()
        protocol, transport = self._channel(clock)
        clock.advance(HEAD_TIMEOUT)
        self.assert_head_timed_out(transport)
        protocol.connectionLost(None)
        clock.advance(0)  # the access log line
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_head_deadline_counts_from_first_byte(self) -> None:
        """After a response, the next request's head deadline runs from its
        first byte (the wait before it is the idle time-out's business)."""
        clock = Clock()
        protocol, transport = self._channel(clock)
        protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        clock.advance(IDLE_TIMEOUT - 1)
        protocol.dataReceived(b"G")
        clock.advance(HEAD_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"ET /x HTTP/1.1\r\nHost: h\r\n")
        clock.advance(1)
        self.assert_head_timed_out(transport)
        protocol.connectionLost(None)

    def test_head_deadline_not_on_body(self) -> None:
        """The deadline covers the head only: a body sent slowly (each piece
        within the idle time-out) is read (the deadline's timer, still
        pending, fires and does nothing), and no timer outlives the
        connection."""
        clock = Clock()
        protocol, transport = self._channel(clock)
        protocol.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\n")
        for byte in b"body":
            clock.advance(HEAD_TIMEOUT)
            protocol.dataReceived(bytes([byte]))
        self.assertFalse(transport.disconnecting)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value())
        self.assertTrue(transport.value().endswith(b"4"))
        protocol.connectionLost(None)
        clock.advance(0)  # the access log line
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_one_deadline_timer_per_connection(self) -> None:
        """Requests on a kept-alive connection move one timer rather than
        making and cancelling one each; when it fires between heads, nothing
        happens."""
        clock = Clock()
        protocol, transport = self._channel(clock)
        for _ in range(3):
            protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
            clock.advance(1)
        timers = [c for c in clock.getDelayedCalls() if c.func.__name__ == "expired"]
        self.assertEqual(len(timers), 1)
        clock.advance(HEAD_TIMEOUT)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 "), 3)
        protocol.connectionLost(None)

    def test_refused_on_other_transports_closed_at_once(self) -> None:
        """A transport that is not a plain socket (TLS, tests) cannot be
        half-closed: after the 413 it is closed at once."""
        protocol, transport = self._channel(Clock())
        protocol._channel.site._max_request_body_size = lambda: 10
        protocol.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)


class ConfigTests(SynchronousTestCase):
    """``maxRequestBodySize`` in the config file."""

    def test_sizes(self) -> None:
        """Bytes, or a number with a decimal or binary unit, any case."""
        for text, size in [
            ("", 64 * 1024 * 1024),
            ("maxRequestBodySize: 1000\n", 1000),
            ("maxRequestBodySize: 1MiB\n", 1024 * 1024),
            ("maxRequestBodySize: 64MB\n", 64_000_000),
            ("maxRequestBodySize: '2 gib'\n", 2 * 1024**3),
            ("maxRequestBodySize: 1.5KiB\n", 1536),
            ("maxRequestBodySize: 10kb\n", 10_000),
            ("maxRequestBodySize: 512B\n", 512),
        ]:
            with self.subTest(text=text):
                self.assertEqual(load_config_text(text).max_request_body_size, size)

    def test_bad_values(self) -> None:
        """A bad value is one config error naming the key and the value."""
        for value, shown in [
            ("lots", "'lots'"),
            ("10 parsecs", "'10 parsecs'"),
            ("0", "0"),
            ("-5", "-5"),
            ("true", "true"),
            ("[1]", "a list"),
        ]:
            with self.subTest(value=value):
                with self.assertRaises(ConfigError) as raised:
                    load_config_text(f"maxRequestBodySize: {value}\n")
                self.assertEqual(
                    raised.exception.problems,
                    (
                        "maxRequestBodySize: must be a positive size in bytes or with a unit "
                        f"such as 1MiB or 64MB, got {shown}",
                    ),
                )

    def test_known_key(self) -> None:
        """``maxRequestBodySize`` draws no unknown-key warning."""
        self.assertEqual(load_config_text("maxRequestBodySize: 1MiB\n").warnings, ())


class ServiceTests(TestCase):
    timeout = 60

    async def test_running_service_applies_config(self) -> None:
        """``llamaswap -c FILE`` refuses bodies over the file's
        ``maxRequestBodySize`` with 413, on every path, before any
        authentication or routing."""
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write("maxRequestBodySize: 1KiB\napiKeys: [sekrit]\nmodels: {}\n")
        self.addCleanup(os.unlink, f.name)
        port = free_port()
        running = ServiceProcess(["-m", "llamaswap", "-c", f.name], port)
        self.addCleanup(lambda: running.ended)
        self.addCleanup(running.transport.signalProcess, "TERM")
        await running.wait_up()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        for path in (b"/v1/chat/completions", b"/api/models/unload", b"/nowhere"):
            client = await connectProtocol(endpoint, _Client())
            client.transport.write(
                b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1025\r\n\r\n" % path
            )
            status, _, body = _parse(await client.done)
            self.assertEqual(status, 413, path)
            self.assertEqual(
                json.loads(body)["error"]["message"],
                "request body of 1025 bytes exceeds maxRequestBodySize (1024 bytes)",
            )
