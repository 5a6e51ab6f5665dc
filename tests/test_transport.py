"""Socket options and write coalescing on real loopback connections
(llamaswap.core.transport, llamaswap.core.twistedweb.coalesce_writes)."""

from __future__ import annotations

import socket
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from zope.interface import implementer

from llamaswap.core.transport import fixed_addresses, no_delay
from llamaswap.core.twistedweb import after_flush, after_this_read, coalesce_writes
from llamaswap.upstream.lean import LeanAgent
from llamaswap.web.site import LlamaSwapSite
from tests.support import poll_until, unsent


class Sink(Protocol):
    """Keeps what arrives; ``lost`` fires when the connection closes."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.made: defer.Deferred[Any] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


def _nodelay(transport: Any) -> int:
    return int(transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


class Pair:
    """A loopback connection: ``client`` writes, ``server`` receives."""

    async def open(self, case: TestCase) -> None:
        self.server = Sink()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: self.server)
        )
        case.addCleanup(port.stopListening)
        self.client = Sink()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(lambda: self.client)
        )
        self.transport = await self.client.made
        await self.server.made

        def close() -> defer.Deferred[None]:
            self.transport.abortConnection()
            return defer.gatherResults([self.client.lost, self.server.lost]).addCallback(
                lambda _: None
            )

        case.addCleanup(close)


class NoDelayTests(TestCase):
    async def test_sets_tcp_nodelay(self) -> None:
        pair = Pair()
        await pair.open(self)
        self.assertEqual(_nodelay(pair.transport), 0)
        no_delay(pair.transport)
        self.assertEqual(_nodelay(pair.transport), 1)

    def test_leaves_other_transports(self) -> None:
        """A transport without the option (a Unix socket, a test double) is
        left alone."""
        no_delay(object())

    async def test_accepted_connections_have_it(self) -> None:
        """Connections llamaswap's site accepts send small pieces at once
        (and coalesce their writes)."""
        seen: list[tuple[int, bool]] = []

        class Probe(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                seen.append(
                    (_nodelay(request.transport), "startWriting" in vars(request.transport))
                )
                return b"ok"

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            LlamaSwapSite(Probe(), reactor)
        )
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(f"http://127.0.0.1:{port.getHost().port}/", pool=pool)
        self.assertEqual(await response.content(), b"ok")
        self.assertEqual(seen, [(1, True)])


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


def _bookkeeping(transport: Any) -> tuple[Any, list[int], defer.Deferred[None]]:
    """A call for ``after_flush`` that notes how many bytes ``transport``
    still buffers when it runs, and fires a Deferred."""
    seen: list[int] = []
    done: defer.Deferred[None] = defer.Deferred()

    def bookkeeping() -> None:
        seen.append(unsent(transport))
        done.callback(None)

    return bookkeeping, seen, done


class CoalesceWritesTests(TestCase):
    async def test_writes_of_a_pass_leave_together_without_epoll(self) -> None:
        """Writes made in one reactor pass go out at its end, and the
        transport is never registered with the reactor for writing."""
        pair = Pair()
        await pair.open(self)
        coalesce_writes(pair.transport)
        pair.transport.write(b"HTTP/1.1 200 OK\r\n")
        pair.transport.writeSequence([b"a: b\r\n", b"\r\n"])
        pair.transport.write(b"body")
        self.assertNotIn(pair.transport, reactor.getWriters())
        await poll_until(lambda: len(pair.server.received) == 29, timeout=5)
        self.assertEqual(bytes(pair.server.received), b"HTTP/1.1 200 OK\r\na: b\r\n\r\nbody")
        self.assertNotIn(pair.transport, reactor.getWriters())

    async def test_after_flush_rides_on_the_write_flush(self) -> None:
        """Bookkeeping queued with ``after_flush`` while coalesced writes wait
        runs right after they are sent, with no delayed call of its own."""
        pair = Pair()
        await pair.open(self)
        coalesce_writes(pair.transport)
        pair.transport.write(b"response")
        scheduled = len(reactor.getDelayedCalls())
        bookkeeping, buffered, done = _bookkeeping(pair.transport)
        after_flush(reactor, bookkeeping)
        self.assertEqual(len(reactor.getDelayedCalls()), scheduled)
        await done
        self.assertEqual(buffered, [0])
        await poll_until(lambda: bytes(pair.server.received) == b"response", timeout=5)

    async def test_a_stopping_reactor_takes_twisted_s_own_path(self) -> None:
        """Once ``reactor.stop()`` was called, writes register with the
        reactor as usual: its writers get an I/O pass before it disconnects
        everything, where a delayed call made in the last pass never runs."""
        pair = Pair()
        await pair.open(self)
        coalesce_writes(pair.transport)
        self.patch(reactor, "_stopped", True)
        pair.transport.write(b"503")
        self.assertIn(pair.transport, reactor.getWriters())
        await poll_until(lambda: bytes(pair.server.received) == b"503", timeout=5)

    async def test_what_the_socket_does_not_take_goes_to_epoll(self) -> None:
        """More than the socket buffers hold: the rest is written when the
        socket drains, a streaming producer is paused and resumed, and every
        byte arrives in order."""
        pair = Pair()
        await pair.open(self)
        coalesce_writes(pair.transport)
        producer = Producer()
        pair.transport.registerProducer(producer, True)
        self.addCleanup(pair.transport.unregisterProducer)
        pair.server.transport.pauseProducing()  # nobody reads: the buffers fill
        data = bytes(range(256)) * (64 * 1024)  # 16 MiB
        pair.transport.write(data)
        self.assertEqual(producer.paused, 1)
        await poll_until(lambda: pair.transport in reactor.getWriters(), timeout=5)
        pair.server.transport.resumeProducing()
        await poll_until(lambda: len(pair.server.received) == len(data), timeout=30)
        self.assertEqual(bytes(pair.server.received), data)
        await poll_until(lambda: pair.transport not in reactor.getWriters(), timeout=5)
        self.assertEqual(producer.resumed, 1)

    async def test_a_cancelled_flush_does_not_stall_later_writes(self) -> None:
        """If the flush's delayed call is cancelled from outside (trial's
        cleanup does that to a test that ends with one pending), the next
        write schedules another and everything waiting goes out."""
        pair = Pair()
        await pair.open(self)
        coalesce_writes(pair.transport)
        pair.transport.write(b"first ")
        (flush,) = [c for c in reactor.getDelayedCalls() if c.func.__name__ == "_flush"]
        flush.cancel()
        pair.transport.write(b"second")
        await poll_until(lambda: bytes(pair.server.received) == b"first second", timeout=5)

    async def test_lose_connection_after_writing(self) -> None:
        """``loseConnection`` right after a write still delivers it, then
        closes."""
        pair = Pair()
        await pair.open(self)
        coalesce_writes(pair.transport)
        pair.transport.write(b"last words")
        pair.transport.loseConnection()
        await pair.server.lost
        self.assertEqual(bytes(pair.server.received), b"last words")

    async def test_peer_gone_is_a_lost_connection(self) -> None:
        """Writing to a connection the peer reset ends in ``connectionLost``
        (the reactor's own handling), not an error in the flush."""
        pair = Pair()
        await pair.open(self)
        coalesce_writes(pair.transport)
        pair.server.transport.abortConnection()
        await pair.server.lost
        for _ in range(50):
            if pair.client.lost.called:
                break
            pair.transport.write(b"x" * 65536)
            await poll_until(lambda: True)
        await pair.client.lost
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_what_a_read_writes_leaves_when_the_read_returns(self) -> None:
        """Writes made while handling a read go out as soon as the read is
        handled, with no delayed call; bookkeeping queued meanwhile runs
        right after them."""
        pair = Pair()
        await pair.open(self)
        coalesce_writes(pair.transport)
        scheduled: list[int] = []
        bookkeeping, buffered, done = _bookkeeping(pair.transport)

        def answer(data: bytes) -> None:
            pair.transport.write(b"pong")
            after_flush(reactor, bookkeeping)
            calls = reactor.getDelayedCalls()
            scheduled.append(len([c for c in calls if c.func.__name__ == "_flush"]))

        pair.client.dataReceived = answer  # type: ignore[method-assign]
        pair.server.transport.write(b"ping")
        await done
        self.assertEqual((scheduled, buffered), ([0], [0]))
        await poll_until(lambda: bytes(pair.server.received) == b"pong", timeout=5)

    async def test_after_this_read_runs_once_the_read_s_writes_are_out(self) -> None:
        """``after_this_read`` called while a read is handled runs its call
        right after that read's writes went out; outside a read it does
        nothing and says so (the caller then calls at once)."""
        pair = Pair()
        await pair.open(self)
        coalesce_writes(pair.transport)
        self.assertFalse(after_this_read(reactor, self.fail, "outside a read"))
        bookkeeping, buffered, done = _bookkeeping(pair.transport)
        queued: list[bool] = []

        def answer(data: bytes) -> None:
            pair.transport.write(b"pong")
            queued.append(after_this_read(reactor, bookkeeping))

        pair.client.dataReceived = answer  # type: ignore[method-assign]
        pair.server.transport.write(b"ping")
        await done
        self.assertEqual((queued, buffered), ([True], [0]))
        await poll_until(lambda: bytes(pair.server.received) == b"pong", timeout=5)

    async def test_applied_once(self) -> None:
        pair = Pair()
        await pair.open(self)
        coalesce_writes(pair.transport)
        first = pair.transport.startWriting
        coalesce_writes(pair.transport)
        self.assertIs(pair.transport.startWriting, first)


class UpstreamConnectionTests(TestCase):
    async def test_lean_client_connections_have_both(self) -> None:
        """Connections to upstreams (the lean client's) send small pieces at
        once and coalesce their writes."""
        server = Sink()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: server)
        )
        self.addCleanup(port.stopListening)
        connected: list[Any] = []

        class Endpoints:
            def endpointForURI(self, uri: Any) -> Any:
                endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
                connect = endpoint.connect

                def spy(factory: Any) -> Any:
                    return connect(factory).addCallback(lambda p: connected.append(p) or p)

                endpoint.connect = spy  # type: ignore[method-assign]
                return endpoint

        agent = LeanAgent(reactor, Endpoints(), fallback=None)  # type: ignore[arg-type]
        url = f"http://127.0.0.1:{port.getHost().port}/v1/models".encode()
        with capturedLogs() as events:
            answered = agent.request(b"GET", url, Headers())
            await poll_until(lambda: b"\r\n\r\n" in server.received, timeout=5)
        # A connection is not announced in the log ("Starting factory ...").
        self.assertEqual([e for e in events if "factory" in formatEvent(e).lower()], [])
        transport = connected[0].transport
        self.assertEqual(_nodelay(transport), 1)
        self.assertIn("startWriting", vars(transport))
        server.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        )
        response = await answered
        self.assertEqual(response.code, 200)
        await treq.content(response)
        server.transport.loseConnection()
        await server.lost
        await poll_until(lambda: not transport.connected, timeout=5)


class FixedAddressesTests(TestCase):
    async def test_asks_the_kernel_once(self) -> None:
        """The addresses are the transport's own, the same objects on every
        call, still given after the socket is closed."""
        pair = Pair()
        await pair.open(self)
        host, peer = pair.transport.getHost(), pair.transport.getPeer()
        fixed_addresses(pair.transport)
        self.assertEqual((pair.transport.getHost(), pair.transport.getPeer()), (host, peer))
        self.assertIs(pair.transport.getHost(), pair.transport.getHost())
        self.assertIs(pair.transport.getPeer(), pair.transport.getPeer())
        pair.transport.abortConnection()
        await pair.client.lost
        self.assertEqual(pair.transport.getHost(), host)

    def test_leaves_other_transports(self) -> None:
        """A wrapper (a ``haproxy:`` endpoint's learns the client's address
        after its connection is made), TLS or a test double is left as it is."""

        class Wrapper:
            peer = "before"

            def getHost(self) -> str:
                return "host"

            def getPeer(self) -> str:
                return self.peer

        wrapper = Wrapper()
        fixed_addresses(wrapper)
        wrapper.peer = "from the PROXY header"
        self.assertEqual(wrapper.getPeer(), "from the PROXY header")

    async def test_accepted_connections_have_it(self) -> None:
        """Requests on one keep-alive connection of llamaswap's site see the
        connection's addresses, asked for once."""
        seen: list[tuple[Any, Any, bool]] = []

        class Probe(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                seen.append(
                    (
                        request.getHost(),
                        request.getClientAddress(),
                        "getHost" in vars(request.transport),
                    )
                )
                return b"ok"

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            LlamaSwapSite(Probe())
        )
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        url = f"http://127.0.0.1:{port.getHost().port}/"
        for _ in range(2):
            response = await treq.get(url, pool=pool)
            self.assertEqual(await response.content(), b"ok")
        self.assertEqual(len(seen), 2)
        (host, client, fixed), (host2, client2, _) = seen
        self.assertTrue(fixed)
        self.assertIs(host, host2)
        self.assertIs(client, client2)
        self.assertEqual((host.host, host.port), ("127.0.0.1", port.getHost().port))
        self.assertEqual(client.host, "127.0.0.1")
