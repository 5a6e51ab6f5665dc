"""Proxy tests over real loopback sockets."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaswap.upstream.client import UpstreamClient, UpstreamUnavailable, forward_headers
from llamaswap.web.errors import write_error
from llamaswap.web.site import LlamaSwapSite
from tests.support import base_url, free_port, listen, poll_until


class _Upstream(Resource):
    """A scriptable upstream: behaviour chosen by path."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.stream_requests: list[Any] = []
        self.seen_headers: list[Any] = []
        self.bodies: list[bytes] = []
        self.stream_lost = 0
        self.producer: _Firehose | None = None

    def render(self, request: Any) -> object:
        self.seen_headers.append(request.requestHeaders)
        body = request.content.read()
        self.bodies.append(body)
        if request.path == b"/echo":
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"x-digest", hashlib.sha256(body).hexdigest().encode())
            return body
        if request.path == b"/big":
            size = int(request.args[b"size"][0])
            request.setHeader(b"content-type", b"application/octet-stream")
            return _pattern(size)
        if request.path == b"/stream":
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"data: first\n\n")
            self.stream_requests.append(request)

            def lost(_: object) -> None:
                self.stream_lost += 1

            request.notifyFinish().addErrback(lost)
            return NOT_DONE_YET
        if request.path == b"/firehose":
            request.setHeader(b"content-type", b"application/octet-stream")
            self.producer = _Firehose(request, total=64 * 1024 * 1024)
            request.registerProducer(self.producer, True)
            self.producer.resumeProducing()
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"no such path"


class _Firehose:
    """A push producer writing 64 KiB chunks whenever it is not paused."""

    def __init__(self, request: Any, total: int) -> None:
        self.request = request
        self.total = total
        self.written = 0
        self.paused = False
        self.stopped = False
        self._chunk = b"x" * 65536

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.written < self.total:
            self.request.write(self._chunk)
            self.written += len(self._chunk)
        if self.written >= self.total and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.stopped = True


async def _settle() -> None:
    from twisted.internet import task

    await task.deferLater(reactor, 0.2, lambda: None)


def _pattern(size: int) -> bytes:
    block = bytes(range(256)) * 4096
    return (block * (size // len(block) + 1))[:size]


class _Front(Resource):
    """The proxy under test: forwards everything to one upstream."""

    isLeaf = True

    def __init__(self, client: UpstreamClient, upstream: str) -> None:
        super().__init__()
        self.client = client
        self.upstream = upstream.encode()

    def render(self, request: Any) -> object:
        body = request.content.read()
        headers = forward_headers(request.requestHeaders, client_ip="127.0.0.1")
        d = defer.Deferred.fromCoroutine(
            self.client.forward(request, self.upstream + request.uri, headers=headers, body=body)
        )

        def done(_: object) -> None:
            if not request.finished and not request._disconnected:
                request.finish()

        def failed(failure: Any) -> None:
            if failure.check(UpstreamUnavailable):
                write_error(request, 502, str(failure.value))
            elif not failure.check(defer.CancelledError):
                write_error(request, 500, failure.getErrorMessage())

        d.addCallbacks(done, failed)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET


class ProxyTests(TestCase):
    def setUp(self) -> None:
        self.upstream = _Upstream()
        self.upstream_port = listen(self.upstream)
        self.addCleanup(self.upstream_port.stopListening)
        self.client = UpstreamClient(reactor)
        self.addCleanup(self.client.close)
        front = _Front(self.client, base_url(self.upstream_port))
        self.front_port = listen(front, LlamaSwapSite)
        self.addCleanup(self.front_port.stopListening)
        self.front = base_url(self.front_port)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def test_large_body_both_ways(self) -> None:
        """A 10 MB request body and a 10 MB response body pass through intact."""
        body = os.urandom(10 * 1024 * 1024)
        response = await treq.post(self.front + "/echo", data=body, pool=self.pool)
        received = await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(hashlib.sha256(received).hexdigest(), hashlib.sha256(body).hexdigest())
        self.assertEqual(self.upstream.bodies[-1], body)

        response = await treq.get(self.front + "/big?size=10485760", pool=self.pool)
        received = await response.content()
        self.assertEqual(received, _pattern(10485760))
        self.assertEqual(response.length, 10485760)

    async def test_stream_is_incremental(self) -> None:
        """Each upstream event reaches the client before the next is sent,
        and event streams carry ``X-Accel-Buffering: no``."""
        response = await treq.get(self.front + "/stream", pool=self.pool, unbuffered=True)
        self.assertEqual(response.headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        await poll_until(lambda: b"".join(received) == b"data: first\n\n")
        upstream_request = self.upstream.stream_requests[0]
        upstream_request.write(b"data: second\n\n")
        await poll_until(lambda: b"".join(received).endswith(b"data: second\n\n"))
        upstream_request.finish()
        await done
        self.assertEqual(b"".join(received), b"data: first\n\ndata: second\n\n")

    async def test_client_disconnect_aborts_upstream(self) -> None:
        """A client that goes away mid-stream cancels the upstream request."""
        response = await treq.get(self.front + "/stream", pool=self.pool, unbuffered=True)
        received: list[bytes] = []
        d = treq.collect(response, received.append)
        await poll_until(lambda: received)
        d.addErrback(lambda f: f.trap(defer.CancelledError))
        d.cancel()
        response.original._transport.loseConnection()
        await poll_until(lambda: self.upstream.stream_lost == 1)

    async def test_slow_client_pauses_upstream(self) -> None:
        """While the client reads nothing, the upstream is paused after a
        bounded amount of buffering; everything arrives once it reads."""
        received = [0]
        connected: defer.Deferred[None] = defer.Deferred()

        class Slow(protocol.Protocol):
            def connectionMade(self) -> None:
                self.transport.write(
                    b"GET /firehose HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                self.transport.pauseProducing()
                connected.callback(None)

            def dataReceived(self, data: bytes) -> None:
                received[0] += len(data)

        slow = Slow()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.front_port.getHost().port), slow
        )
        await connected
        await poll_until(lambda: self.upstream.producer is not None)
        firehose = self.upstream.producer
        assert firehose is not None
        # Wait until the upstream has stopped writing for a while: buffers
        # along the way are full and the producer stays paused.
        deadline = reactor.seconds() + 15
        written = -1
        while firehose.written != written:
            self.assertLess(reactor.seconds(), deadline, "upstream never stopped writing")
            written = firehose.written
            await _settle()
        self.assertTrue(firehose.paused)
        self.assertLess(written, 32 * 1024 * 1024)
        slow.transport.resumeProducing()
        await poll_until(lambda: received[0] >= firehose.total, timeout=30)
        slow.transport.loseConnection()

    async def test_connection_refused_is_502_json(self) -> None:
        """An upstream that cannot be reached gives 502 with a JSON body."""
        client = UpstreamClient(reactor)
        self.addCleanup(client.close)
        front = listen(_Front(client, f"http://127.0.0.1:{free_port()}"), LlamaSwapSite)
        self.addCleanup(front.stopListening)
        response = await treq.post(
            base_url(front) + "/v1/chat/completions", data=b"{}", pool=self.pool
        )
        self.assertEqual(response.code, 502)
        payload = await response.json()
        self.assertEqual(payload["error"]["code"], "bad_gateway")

    async def test_hop_by_hop_headers_dropped(self) -> None:
        """Hop-by-hop request headers are not forwarded; X-Forwarded-For is set."""
        response = await treq.post(
            self.front + "/echo",
            data=b"hi",
            headers={b"Keep-Alive": [b"timeout=5"], b"X-Custom": [b"kept"], b"TE": [b"trailers"]},
            pool=self.pool,
        )
        await response.content()
        seen = self.upstream.seen_headers[-1]
        self.assertFalse(seen.hasHeader(b"keep-alive"))
        self.assertFalse(seen.hasHeader(b"te"))
        self.assertEqual(seen.getRawHeaders(b"x-custom"), [b"kept"])
        self.assertEqual(seen.getRawHeaders(b"x-forwarded-for"), [b"127.0.0.1"])

    async def test_pooled_connections_are_reused(self) -> None:
        """Sequential requests reuse one upstream connection."""
        peers = set()

        original = self.upstream.render

        def render(request: Any) -> object:
            peers.add(request.getClientAddress().port)
            return original(request)

        self.upstream.render = render  # type: ignore[method-assign]
        for _ in range(5):
            response = await treq.post(self.front + "/echo", data=b"x", pool=self.pool)
            await response.content()
        self.assertEqual(len(peers), 1)


class ForwardHeadersTests(SynchronousTestCase):
    def test_copy_keeps_order_values_and_names(self) -> None:
        """End-to-end headers are copied in order with every value; hop-by-hop
        ones, the headers ``Connection`` names, ``Content-Length`` and
        ``Expect`` are not; the copy is independent of the request's."""
        source = Headers()
        for name, value in [
            (b"Host", b"h"),
            (b"x-b", b"1"),
            (b"Connection", b"keep-alive, X-Private"),
            (b"X-B", b"2"),
            (b"X-Private", b"secret"),
            (b"Content-Length", b"3"),
            (b"Expect", b"100-continue"),
            (b"Authorization", b"Bearer k"),
            (b"Accept", b"text/event-stream"),
        ]:
            source.addRawHeader(name, value)
        out = forward_headers(source, client_ip="10.0.0.9", drop=[b"Authorization"])
        self.assertEqual(
            list(out.getAllRawHeaders()),
            [
                (b"Host", [b"h"]),
                (b"X-B", [b"1", b"2"]),
                (b"Accept", [b"text/event-stream"]),
                (b"X-Forwarded-For", [b"10.0.0.9"]),
            ],
        )
        out.addRawHeader(b"x-b", b"3")
        self.assertEqual(source.getRawHeaders(b"x-b"), [b"1", b"2"])
