"""What a relayed response's bytes wait for (llamaswap.upstream.client's
relay, over real loopback sockets): each piece is on its way to the client
before the observer (usage parsing, capture, byte counts) sees it, and the
body's end before the coroutines that serve the request unwind."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaswap.upstream.client import UpstreamClient, forward_headers
from llamaswap.web.site import LlamaSwapSite
from tests.support import base_url, listen, poll_until, unsent

EVENTS = [b'data: {"n":%d}\n\n' % n for n in range(3)] + [b"data: [DONE]\n\n"]


class _Streaming(Resource):
    """An upstream writing one event every 10 ms, the last one with the
    body's end (one read for the proxy)."""

    isLeaf = True

    def render(self, request: Any) -> object:
        request.setHeader(b"content-type", b"text/event-stream")

        def event(n: int) -> None:
            if request._disconnected:
                return
            request.write(EVENTS[n])
            if n == len(EVENTS) - 1:
                request.finish()
            else:
                reactor.callLater(0.01, event, n + 1)

        event(0)
        return NOT_DONE_YET


class _Front(Resource):
    """Forwards to the upstream; the observer and the end of the relay note
    what had been written, and what was still buffered, at that moment."""

    isLeaf = True

    def __init__(self, client: UpstreamClient, upstream: bytes) -> None:
        super().__init__()
        self.client = client
        self.upstream = upstream
        #: per observed piece: (its bytes, bytes written so far, bytes buffered)
        self.seen: list[tuple[bytes, int, int]] = []
        #: when the relay returned: (bytes written, bytes buffered)
        self.ended: defer.Deferred[tuple[int, int]] = defer.Deferred()

    def render(self, request: Any) -> object:
        transport = request.channel.transport

        def on_response(response: Any) -> Any:
            def observe(data: bytes) -> None:
                self.seen.append((data, request.sentLength, unsent(transport)))

            return observe

        async def relay() -> None:
            await self.client.forward(
                request,
                self.upstream,
                headers=forward_headers(request.requestHeaders, client_ip="127.0.0.1"),
                body=b"",
                on_response=on_response,
            )
            self.ended.callback((request.sentLength, unsent(transport)))
            request.finish()

        defer.Deferred.fromCoroutine(relay()).addErrback(self.ended.errback)
        return NOT_DONE_YET


class _Reader(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class RelayOrderTests(TestCase):
    async def _relay(self) -> tuple[_Front, _Reader, tuple[int, int]]:
        upstream = listen(_Streaming())
        self.addCleanup(upstream.stopListening)
        client = UpstreamClient(reactor)
        self.addCleanup(client.close)
        front = _Front(client, base_url(upstream).encode() + b"/stream")
        port = listen(front, LlamaSwapSite)
        self.addCleanup(port.stopListening)
        reader = _Reader()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await connectProtocol(endpoint, reader)
        self.addCleanup(reader.transport.loseConnection)
        ended = await front.ended
        return front, reader, ended

    async def test_each_piece_is_sent_before_it_is_observed(self) -> None:
        """The observer sees a piece once the client's connection has it
        written out: already counted as written, nothing left buffered.  (It
        may see the last one after the relay returned: right after the read
        that brought it, before anything queued later.)"""
        front, _, _ = await self._relay()
        await poll_until(lambda: len(front.seen) == len(EVENTS), timeout=5)
        self.assertEqual(b"".join(data for data, _, _ in front.seen), b"".join(EVENTS))
        written = 0
        for data, sent, buffered in front.seen:
            written += len(data)
            self.assertGreaterEqual(sent, written)
            self.assertEqual(buffered, 0)

    async def test_the_body_s_end_is_out_before_the_relay_returns(self) -> None:
        """When the relay returns (before the caller's own ending work), the
        whole body has left: nothing of it waits for the end of the read."""
        _, reader, (sent, buffered) = await self._relay()
        self.assertEqual(sent, len(b"".join(EVENTS)))
        self.assertEqual(buffered, 0)
        await poll_until(lambda: EVENTS[-1] in reader.received, timeout=5)
