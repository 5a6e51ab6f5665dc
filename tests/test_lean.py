"""Tests for llamaswap.upstream.lean: the relay's lean HTTP/1.1 client.

The response parser is fed through Twisted's ``StringTransport`` in every
possible split; pooling and the real-socket path are covered by the proxy
tests (tests/test_proxy.py), which go through it for every ``http://`` URL.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from llamaswap.upstream.lean import LeanAgent, StaleConnection, _Connection


class _Body(Protocol):
    transport: Any = None

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.ended = reason


class _Endpoint:
    """Connects a protocol to a fresh StringTransport at once."""

    def __init__(self) -> None:
        self.transports: list[StringTransport] = []
        self.protocols: list[Any] = []

    def endpointForURI(self, uri: Any) -> _Endpoint:
        return self

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        return defer.succeed(protocol)


class _Fallback:
    def __init__(self) -> None:
        self.requests: list[bytes] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Any:
        self.requests.append(uri)
        return defer.succeed(None)


class _Bytes:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)


class LeanAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = _Endpoint()
        self.fallback = _Fallback()
        self.agent = LeanAgent(self.clock, self.endpoint, self.fallback, idle_timeout=90)

    def request(
        self,
        method: bytes = b"POST",
        body: bytes | None = b"{}",
        url: bytes = b"http://127.0.0.1:8080/v1/x?a=1",
    ) -> defer.Deferred[Any]:
        headers = Headers({b"content-type": [b"application/json"]})
        return self.agent.request(method, url, headers, _Bytes(body) if body is not None else None)

    def conn(self, index: int = -1) -> tuple[_Connection, StringTransport]:
        return self.endpoint.protocols[index], self.endpoint.transports[index]

    def respond(self, data: bytes, index: int = -1) -> None:
        self.conn(index)[0].dataReceived(data)

    def test_request_bytes(self) -> None:
        self.request()
        sent = self.conn()[1].value()
        self.assertEqual(
            sent,
            b"POST /v1/x?a=1 HTTP/1.1\r\nContent-Length: 2\r\nHost: 127.0.0.1:8080\r\n"
            b"Content-Type: application/json\r\n\r\n{}",
        )

    def test_get_without_body_has_no_length_and_keeps_host(self) -> None:
        headers = Headers({b"host": [b"client.example"]})
        self.agent.request(b"GET", b"http://127.0.0.1:8080", headers, None)
        self.assertEqual(self.conn()[1].value(), b"GET / HTTP/1.1\r\nHost: client.example\r\n\r\n")

    def test_https_other_producers_and_unsafe_request_lines_go_to_the_fallback(self) -> None:
        self.agent.request(b"GET", b"https://h/x", Headers(), None)
        self.agent.request(b"POST", b"http://h/y", Headers(), object())  # type: ignore[arg-type]
        self.agent.request(b"GET", b"http://h/a b\r\nX: y", Headers(), None)
        self.agent.request(b"G T", b"http://h/", Headers(), None)
        self.assertEqual(
            self.fallback.requests,
            [b"https://h/x", b"http://h/y", b"http://h/a b\r\nX: y", b"http://h/"],
        )
        self.assertEqual(self.endpoint.protocols, [])

    def test_content_length_and_reuse(self) -> None:
        d = self.request()
        self.respond(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhel"
        )
        response = self.successResultOf(d)
        self.assertEqual((response.code, response.phrase, response.length), (200, b"OK", 5))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        # As with Agent, connection-control headers are not the content's.
        self.assertFalse(response.headers.hasHeader(b"content-length"))
        body = _Body()
        response.deliverBody(body)
        self.assertEqual(body.data, [b"hel"])
        self.assertIsNone(body.ended)
        self.respond(b"lo")
        self.assertEqual(b"".join(body.data), b"hello")
        assert body.ended is not None
        body.ended.trap(ResponseDone)
        # The connection went back to the pool: the next request reuses it.
        self.request()
        self.assertEqual(len(self.endpoint.protocols), 1)

    def test_a_burst_of_64_keeps_its_connections(self) -> None:
        """64 requests at once, answered together, leave 64 idle connections
        that the next 64 requests reuse (a cap of 32 closed and reopened a
        third of them under the yardstick's c=64); beyond ``max_per_host``
        a released connection is closed."""
        for _burst in range(2):
            answered = [self.request() for _ in range(64)]
            for index in range(len(self.endpoint.protocols) - 64, len(self.endpoint.protocols)):
                self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", index)
            for d in answered:
                self.assertEqual(self.successResultOf(d).code, 200)
            self.assertEqual(len(self.endpoint.protocols), 64)
        self.assertTrue(all(not t.disconnecting for t in self.endpoint.transports))
        agent = LeanAgent(self.clock, self.endpoint, self.fallback, max_per_host=2)
        self.agent = agent
        answered = [self.request() for _ in range(3)]
        for index in (-1, -2, -3):
            self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", index)
        self.assertEqual([t.disconnecting for t in self.endpoint.transports[-3:]].count(True), 1)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=40))
    def test_chunked_in_any_split(self, cuts: list[int]) -> None:
        self.setUp()
        d = self.request()
        wire = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        body = _Body()
        pos = 0
        for cut in cuts + [len(wire)]:
            piece = wire[pos : pos + cut]
            pos += len(piece)
            if piece:
                self.respond(piece)
            if d.called and body.transport is None:
                response = self.successResultOf(d)
                self.assertIs(response.length, UNKNOWN_LENGTH)
                response.deliverBody(body)
        self.assertEqual(b"".join(body.data), b"hello 0123456789")
        assert body.ended is not None
        body.ended.trap(ResponseDone)
        self.assertEqual(self.agent._idle[b"http://127.0.0.1:8080"], [self.conn()[0]])

    def test_body_delivered_late_is_buffered(self) -> None:
        d = self.request()
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        body = _Body()
        self.successResultOf(d).deliverBody(body)
        self.assertEqual(body.data, [b"abc"])
        assert body.ended is not None
        body.ended.trap(ResponseDone)

    def test_interim_response_is_skipped(self) -> None:
        d = self.request()
        self.respond(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(self.successResultOf(d).code, 201)

    def test_no_body_for_head_and_204(self) -> None:
        d = self.request(b"HEAD", None)
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
        self.assertEqual(self.successResultOf(d).length, 0)
        d = self.request()
        self.assertEqual(len(self.endpoint.protocols), 1)
        self.respond(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.successResultOf(d).length, 0)

    def test_until_close_body_ends_with_potential_data_loss(self) -> None:
        d = self.request()
        self.respond(b"HTTP/1.1 200 OK\r\n\r\nsome")
        body = _Body()
        self.successResultOf(d).deliverBody(body)
        self.conn()[0].connectionLost(Failure(ConnectionDone()))
        self.assertEqual(body.data, [b"some"])
        assert body.ended is not None
        body.ended.trap(PotentialDataLoss)

    def test_short_body_fails(self) -> None:
        d = self.request()
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
        body = _Body()
        self.successResultOf(d).deliverBody(body)
        self.conn()[0].connectionLost(Failure(ConnectionLost()))
        assert body.ended is not None
        body.ended.trap(ResponseFailed)

    def test_connection_closed_before_any_byte(self) -> None:
        """A new connection closed before any response byte: the request may
        have reached the upstream, so this is not a stale connection."""
        d = self.request()
        self.conn()[0].connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(failure.value.reasons[0].check(ConnectionDone))

    def reused(self) -> defer.Deferred[Any]:
        """A request sent on a pooled connection that served one before."""
        d = self.request()
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        d = self.request()
        self.assertEqual(len(self.endpoint.protocols), 1)
        return d

    def test_reused_connection_closed_before_any_byte_is_stale(self) -> None:
        """The upstream closed (or reset) a pooled connection while the
        request was on its way: :class:`StaleConnection`, for the client to
        send the request again on a new connection."""
        for reason in (ConnectionDone(), ConnectionLost()):
            self.setUp()
            d = self.reused()
            self.conn()[0].connectionLost(Failure(reason))
            self.failureResultOf(d, StaleConnection)

    def test_reused_connection_failing_after_a_byte_is_not_stale(self) -> None:
        d = self.reused()
        self.respond(b"HTTP/1.1 2")
        self.conn()[0].connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ResponseFailed)

    def test_reused_connection_aborted_by_us_is_not_stale(self) -> None:
        d = self.reused()
        self.conn()[0].connectionLost(Failure(ConnectionAborted()))
        self.failureResultOf(d, ResponseNeverReceived)

    def test_new_connections_never_take_a_pooled_one(self) -> None:
        """``new_connections()`` sends on a new connection, which joins the
        pool afterwards; what the lean client does not send goes to its own
        fallback."""
        fallback = _Fallback()
        fresh = self.agent.new_connections(fallback)
        d = self.request()
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        d = fresh.request(b"POST", b"http://127.0.0.1:8080/v1/x", Headers(), _Bytes(b"{}"))
        self.assertEqual(len(self.endpoint.protocols), 2)
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        self.assertEqual(len(self.agent._idle[b"http://127.0.0.1:8080"]), 2)
        fresh.request(b"GET", b"https://h/x", Headers(), None)
        self.assertEqual((fallback.requests, self.fallback.requests), ([b"https://h/x"], []))

    def test_connection_control_headers_kept_apart(self) -> None:
        """``Connection``, ``Content-Length`` and the like are in
        ``response.control``, not in ``response.headers``; a HEAD response's
        ``Content-Length`` is the content's (in ``headers``, as with Agent)."""
        d = self.request(b"GET", None)
        self.respond(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 512\r\n"
            b"Connection: X-Hop\r\nconnection: keep-alive\r\nX-Hop: 1\r\n\r\n"
        )
        response = self.successResultOf(d)
        self.assertEqual(
            response.control,
            {b"content-length": [b"512"], b"connection": [b"X-Hop", b"keep-alive"]},
        )
        self.assertEqual(list(response.headers.getAllRawHeaders()), [(b"X-Hop", [b"1"])])
        d = self.request(b"HEAD", None)
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"99"])
        self.assertEqual(response.control, {})

    def test_retire_closes_idle_now_and_busy_when_done(self) -> None:
        first, second = self.request(), self.request()
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0)
        self.successResultOf(first)
        self.agent.retire()
        self.assertTrue(self.conn(0)[1].disconnecting)
        self.assertFalse(self.conn(1)[1].disconnecting)
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 1)
        self.successResultOf(second)
        self.assertTrue(self.conn(1)[1].disconnecting)
        self.assertEqual(self.agent._idle[b"http://127.0.0.1:8080"], [])

    def test_no_idle_limit(self) -> None:
        """An idle time-out of ``None`` or 0 keeps pooled connections open."""
        for idle_timeout in (None, 0):
            self.agent = LeanAgent(
                self.clock, self.endpoint, self.fallback, idle_timeout=idle_timeout
            )
            d = self.request()
            self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            self.successResultOf(d)
            self.assertEqual(self.clock.getDelayedCalls(), [])
            self.clock.advance(10**9)
            self.assertFalse(self.conn()[1].disconnecting)

    def test_bad_status_line(self) -> None:
        d = self.request()
        self.respond(b"SPDY/9 200 OK\r\n\r\n")
        self.failureResultOf(d, ResponseFailed)
        self.assertTrue(self.conn()[1].disconnecting or self.conn()[1].disconnected)

    def test_bad_chunk_size_fails_the_body(self) -> None:
        d = self.request()
        self.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        body = _Body()
        self.successResultOf(d).deliverBody(body)
        self.respond(b"zz\r\n")
        assert body.ended is not None
        body.ended.trap(ResponseFailed)

    def test_connection_close_is_not_pooled(self) -> None:
        d = self.request()
        self.respond(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        self.assertTrue(self.conn()[1].disconnecting)
        self.request()
        self.assertEqual(len(self.endpoint.protocols), 2)

    def test_http10_without_keep_alive_is_not_pooled(self) -> None:
        d = self.request()
        self.respond(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).version, (b"HTTP", 1, 0))
        self.assertTrue(self.conn()[1].disconnecting)

    def test_cancel_aborts_the_connection(self) -> None:
        d = self.request()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(self.conn()[1].disconnecting or self.conn()[1].disconnected)

    def test_producer_pauses_and_stops_the_upstream(self) -> None:
        d = self.request()
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        body = _Body()
        self.successResultOf(d).deliverBody(body)
        producer = body.transport
        transport = self.conn()[1]
        producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        producer.pauseProducing()
        producer.stopProducing()
        self.assertTrue(transport.disconnecting or transport.disconnected)

    def test_paused_connection_is_resumed_before_reuse(self) -> None:
        d = self.request()
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        body = _Body()
        self.successResultOf(d).deliverBody(body)
        body.transport.pauseProducing()
        self.respond(b"ok")
        self.assertEqual(self.conn()[1].producerState, "producing")

    def test_idle_connections_close_after_the_timeout(self) -> None:
        d = self.request()
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        self.clock.advance(89)
        self.assertFalse(self.conn()[1].disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.conn()[1].disconnecting)
        self.assertEqual(self.agent._idle[b"http://127.0.0.1:8080"], [])

    def test_unexpected_bytes_on_an_idle_connection_drop_it(self) -> None:
        d = self.request()
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        self.respond(b"junk")
        self.assertEqual(self.agent._idle[b"http://127.0.0.1:8080"], [])
        self.request()
        self.assertEqual(len(self.endpoint.protocols), 2)
