"""The early path (llamaswap.web.early): a plain inference request is sent to
its model before Twisted reads it, and is served exactly as the usual path
would serve it.  Real service, real child process, real loopback sockets;
the model's server is a recording HTTP server in the test process."""

from __future__ import annotations

import json
import os
import signal
import socket
from typing import Any

import treq
from twisted.internet import defer, protocol, reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from llamaswap.config import load_config_text
from llamaswap.core.twistedweb import HOLD_BODY, HOLD_FOR, one_pass_heads
from llamaswap.service.wiring import build_service
from llamaswap.web import early
from llamaswap.web.early import plain_body
from llamaswap.web.site import LlamaSwapSite
from tests.support import PYTHON, ServiceProcess, free_port, poll_until
from tests.test_twistd import TWISTD

#: a child process that only has to stay alive: the model's "server" is the
#: recording server below, which answers its health check
SLEEPER = f'{PYTHON} -c "import time; time.sleep(600)"'
KEY = "sk-early-test-key"


class _Recorder(protocol.Protocol):
    """One upstream connection: records what arrives, answers each request
    (``hold`` in the body: only once released)."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.buffer = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            body, self.buffer = rest[:length], rest[length:]
            self.factory.requests.append(head + b"\r\n\r\n" + body)
            if head.startswith(b"GET /health"):
                self._answer(b'{"status":"ok"}')
            elif b"hold" in body:
                self.factory.held.append(self)
            else:
                self._answer(b'{"answer":%d}' % len(self.factory.requests))

    def _answer(self, body: bytes) -> None:
        self.factory.answered.append(self)
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    def release(self) -> None:
        self._answer(b'{"released":true}')

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class _RecorderFactory(protocol.Factory):
    protocol = _Recorder

    def __init__(self) -> None:
        self.connections: list[_Recorder] = []
        self.requests: list[bytes] = []
        self.held: list[_Recorder] = []
        #: the connection of each answer, in order
        self.answered: list[_Recorder] = []

    def inference(self) -> list[bytes]:
        return [r for r in self.requests if not r.startswith(b"GET /health")]


class _Client(protocol.Protocol):
    """Writes each request in one piece and collects the answers."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


def _request(body: bytes, *headers: bytes, path: bytes = b"/v1/chat/completions") -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )  # fmt: skip


class EarlyPathTests(TestCase):
    timeout = 60

    async def start(self, limit: int = 1, **globals_: Any) -> None:
        self.upstream = _RecorderFactory()
        port = reactor.listenTCP(0, self.upstream, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        model = {
            "cmd": SLEEPER,
            "proxy": f"http://127.0.0.1:{port.getHost().port}",
            "useModelName": "served-name",
            "concurrencyLimit": limit,
        }
        document = {"healthCheckTimeout": 15, **globals_, "models": {"a": model}}
        self.config = load_config_text(json.dumps(document), environ=dict(os.environ))
        self.service = build_service(self.config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.dispatcher = self.service.app.resource()
        #: what each early_start call returned (None: the usual path)
        self.early: list[Any] = []
        early_start = self.dispatcher.early_start

        def spy(*args: Any) -> Any:
            started = early_start(*args)
            self.early.append(started)
            return started

        self.dispatcher.early_start = spy
        self.site = LlamaSwapSite(self.dispatcher)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    async def connect(self) -> _Client:
        client = _Client()
        endpoint_d: defer.Deferred[Any] = protocol.ClientCreator(
            reactor, lambda: client
        ).connectTCP("127.0.0.1", self.port.getHost().port)
        transport = (await endpoint_d).transport
        self.addCleanup(lambda: transport.abortConnection() if transport.connected else None)
        return client

    async def exchange(self, *pieces: bytes) -> bytes:
        """Send a request (``Connection: close``) in ``pieces``, a reactor
        turn apart; the whole answer."""
        client = await self.connect()
        for index, piece in enumerate(pieces):
            if index:
                await _turn()
            client.transport.write(piece)
        await client.closed
        return client.data

    async def settled(self) -> None:
        scheduler = self.service.router.scheduler
        await poll_until(lambda: scheduler.reserved("a") == 0 and scheduler.in_flight("a") == 0)

    async def test_upstream_receives_the_same_bytes_either_way(self) -> None:
        """A request whole in one read goes the early path from its head;
        one whose body comes in a later read (as Python's ``http.client``
        writes it), once the body is read; with the early path off, the
        usual one.  The model's server receives the very same bytes (headers
        forwarded and dropped, Accept-Encoding narrowed, the llamaswap key
        removed, useModelName applied) and the client the same answer, also
        while the model is first started."""
        await self.start(apiKeys=[KEY])
        body = b'{"model":"a","messages":[{"role":"user","content":"hi"}]}'
        request = _request(
            body,
            b"Authorization: Bearer " + KEY.encode(),
            b"Accept-Encoding: gzip, br",
            b"X-Forwarded-For: 10.1.2.3",
            b"Connection: close, x-private",
            b"X-Private: secret",
            b"X-Kept: yes",
        )
        head, _, _ = request.partition(b"\r\n\r\n")
        answers = []
        # the first starts the model (admitted early, sent once it is ready)
        for pieces in ((request,), (request,), (head + b"\r\n\r\n", body)):
            answers.append(_without_date(await self.exchange(*pieces)))
            await self.settled()
        self.site.early_start = None
        answers.append(_without_date(await self.exchange(request)))
        await self.settled()
        *early_sent, usual = self.upstream.inference()
        for sent in early_sent:
            self.assertEqual(sent, usual)
        self.assertIn(b'"model":"served-name"', usual)
        self.assertIn(b"Accept-Encoding: gzip\r\n", usual)
        self.assertIn(b"X-Kept: yes\r\n", usual)
        self.assertIn(b"X-Forwarded-For: 10.1.2.3, 127.0.0.1\r\n", usual)
        self.assertNotIn(KEY.encode(), usual)
        self.assertNotIn(b"secret", usual)
        # (the split one's head is held back for its body: seen once, whole)
        started, sent, split = self.early
        self.assertIsNone(started.response)  # the model was starting: sent when ready
        self.assertIsNotNone(sent.response)  # ready: sent before Twisted read the request
        self.assertIsNotNone(split.response)  # sent once its body was read too
        self.assertEqual([a.split(b"\r\n", 1)[0] for a in answers], [b"HTTP/1.1 200 OK"] * 4)
        for answer in answers[:3]:
            self.assertEqual(answer.split(b"\r\n\r\n")[0], answers[3].split(b"\r\n\r\n")[0])
        page = await treq.get(
            f"http://127.0.0.1:{self.port.getHost().port}/api/metrics/activity",
            headers={b"authorization": [b"Bearer " + KEY.encode()]},
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        self.assertEqual((await page.json())["total"], 4)

    async def test_a_large_body_read_later_is_sent_once_read(self) -> None:
        """A head whose body is too large to hold it back for is read at once
        (the early starter declines it: no body yet); once Twisted has read
        the body the request goes the early path all the same."""
        await self.start()
        await self.exchange(_request(b'{"model":"a"}', b"Connection: close"))
        await self.settled()
        del self.early[:]
        body = b'{"model":"a","pad":"%s"}' % (b"x" * (HOLD_BODY + 1))
        head, _, _ = _request(body, b"Connection: close").partition(b"\r\n\r\n")
        answer = await self.exchange(head + b"\r\n\r\n", body)
        self.assertIn(b" 200 OK", answer.split(b"\r\n", 1)[0])
        declined, sent = self.early
        self.assertIsNone(declined)  # the head, without its body
        self.assertIsNotNone(sent.response)  # the whole request
        self.assertTrue(self.upstream.inference()[-1].endswith(body[-100:]))
        await self.settled()

    async def test_refused_requests_take_the_usual_path(self) -> None:
        """Without a valid key, for an unknown model, at the concurrency
        limit, or from a refused Host, nothing is sent early: the usual path
        answers as ever."""
        await self.start(apiKeys=[KEY])
        auth = b"Authorization: Bearer " + KEY.encode()
        good = b'{"model":"a"}'
        await self.exchange(_request(good, auth, b"Connection: close"))  # start the model
        await self.settled()
        # not plain enough: a query string, HTTP/1.0 (served the usual way)
        query = _request(good, auth, b"Connection: close", path=b"/v1/chat/completions?x=1")
        http10 = _request(good, auth).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        for request in (query, http10):
            answer = await self.exchange(request)
            self.assertIn(b" 200 OK", answer.split(b"\r\n", 1)[0], answer)
            await self.settled()
        self.assertEqual(self.early[1:], [None, None])
        del self.early[1:]
        held = await self.connect()
        held.transport.write(_request(b'{"model":"a","hold":1}', auth))
        await poll_until(lambda: len(self.upstream.held) == 1)
        cases = [
            (_request(good, b"Authorization: Bearer wrong", b"Connection: close"), b"401"),
            (_request(b'{"model":"nope"}', auth, b"Connection: close"), b"404"),
            (_request(good, auth, b"Connection: close"), b"429"),
        ]
        for request, status in cases:
            answer = await self.exchange(request)
            self.assertEqual(answer.split(b" ")[1], status, answer)
        self.upstream.held[0].release()
        self.assertIn(b'"released":true', await _read_until(held, b"}"))
        held.transport.loseConnection()
        await self.settled()
        self.assertEqual(self.early[2:], [None, None, None])
        self.assertEqual(len(self.upstream.inference()), 4)

    async def test_client_gone_aborts_the_early_request(self) -> None:
        """A client that leaves while its early-sent request runs: the
        upstream connection is aborted and the model's place released."""
        await self.start()
        await self.exchange(_request(b'{"model":"a"}', b"Connection: close"))
        await self.settled()
        client = await self.connect()
        client.transport.write(_request(b'{"model":"a","hold":1}'))
        await poll_until(lambda: len(self.upstream.held) == 1)
        self.assertIsNotNone(self.early[-1].response)
        client.transport.abortConnection()
        await poll_until(lambda: self.upstream.held[0].lost)
        await self.settled()

    async def test_core_yielded_only_when_alone(self) -> None:
        """The core is yielded to the woken upstream after an early send only
        when no other request is in flight here: under load the reactor has
        the others' work to do instead."""
        await self.start(limit=2)
        yields: list[None] = []
        self.patch(early, "_let_upstream_run", lambda: yields.append(None))
        await self.exchange(_request(b'{"model":"a"}', b"Connection: close"))  # start
        await self.settled()
        # two requests at once: two upstream connections in the pool after
        first, second = await self.connect(), await self.connect()
        for client in (first, second):
            client.transport.write(_request(b'{"model":"a","hold":1}'))
        await poll_until(lambda: len(self.upstream.held) == 2)
        for waiting in self.upstream.held:
            waiting.release()
        for client in (first, second):
            await _read_until(client, b"}")
            client.transport.loseConnection()
        await self.settled()
        del self.upstream.held[:], yields[:]
        held = await self.connect()
        held.transport.write(_request(b'{"model":"a","hold":1}'))
        await poll_until(lambda: len(self.upstream.held) == 1)
        self.assertIsNotNone(self.early[-1].response)
        self.assertEqual(len(yields), 1)  # alone: yielded
        answer = await self.exchange(_request(b'{"model":"a"}', b"Connection: close"))
        self.assertIn(b" 200 OK", answer.split(b"\r\n", 1)[0])
        self.assertIsNotNone(self.early[-1].response)  # sent early, beside the held one
        self.assertEqual(len(yields), 1)  # not yielded
        self.upstream.held[0].release()
        self.assertIn(b'"released":true', await _read_until(held, b"}"))
        held.transport.loseConnection()
        await self.settled()

    async def test_a_failure_before_the_coroutine_owns_it_undoes_it(self) -> None:
        """Should serving fail after the take-over but before the serving
        coroutine adopted the early admission, the read's end still undoes
        it: the client gets a 500, the upstream request is aborted and the
        model's place released."""
        await self.start()
        await self.exchange(_request(b'{"model":"a"}', b"Connection: close"))
        await self.settled()
        recorder = self.service.recorder
        begin = recorder.begin

        def broken(**kwargs: Any) -> Any:
            recorder.begin = begin
            raise RuntimeError("broken books")

        recorder.begin = broken
        pooled = self.upstream.answered[-1]
        answer = await self.exchange(_request(b'{"model":"a","hold":1}', b"Connection: close"))
        self.assertIn(b" 500 ", answer.split(b"\r\n", 1)[0])
        self.assertIsNotNone(self.early[-1].response)
        await poll_until(lambda: pooled.lost)
        await self.settled()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_a_request_not_taken_over_is_undone(self) -> None:
        """Were the dispatcher ever not to take over a request the early path
        began, the read's end undoes it: the upstream request is aborted and
        the model's place released (and it is logged as the bug it is)."""
        await self.start(limit=2)
        await self.exchange(_request(b'{"model":"a"}', b"Connection: close"))
        await self.settled()
        logged: list[str] = []

        def observe(event: Any) -> None:
            if event.get("log_level") is LogLevel.error:
                logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        render = self.dispatcher.render

        def forgetful(request: Any) -> object:
            request.early_start = None  # as if the take-over were skipped
            return render(request)

        self.dispatcher.render = forgetful  # type: ignore[method-assign]
        self.addCleanup(setattr, self.dispatcher, "render", render)
        client = await self.connect()
        client.transport.write(_request(b'{"model":"a","hold":1}', b"Connection: close"))
        # the early request's connection is aborted (what it had sent may
        # be dropped with it); the usual path sends it on a connection of its own
        pooled = self.upstream.answered[-1]  # the early request goes on it
        await poll_until(lambda: pooled.lost)
        self.assertIsNotNone(self.early[-1].response)
        await poll_until(lambda: bool([c for c in self.upstream.held if not c.lost]))
        live = [c for c in self.upstream.held if not c.lost]
        self.assertEqual(len(live), 1)
        live[0].release()
        await client.closed
        self.assertIn(b'"released":true', client.data)
        await self.settled()
        self.assertEqual(logged, ["a request sent early to a was not taken over; it is aborted"])


class PlainBodyTests(SynchronousTestCase):
    def test_only_a_body_framed_by_one_content_length(self) -> None:
        """The early path takes a body framed by exactly one matching
        Content-Length, within the limit, and nothing unusual asked."""
        body = b'{"model":"a"}'
        cases = [
            ({b"Content-Length": [b"13"]}, 100, True),
            ({b"content-length": [b"13"], b"Connection": [b"close"]}, 100, True),
            ({b"Content-Length": [b"13"]}, 12, False),
            ({b"Content-Length": [b"12"]}, 100, False),
            ({b"Content-Length": [b"13", b"13"]}, 100, False),
            ({b"Content-Length": [b"+13"]}, 100, False),
            ({}, 100, False),
            ({b"Content-Length": [b"13"], b"Transfer-Encoding": [b"chunked"]}, 100, False),
            ({b"Content-Length": [b"13"], b"Expect": [b"100-continue"]}, 100, False),
            ({b"Content-Length": [b"13"], b"upgrade": [b"websocket"]}, 100, False),
            ({b"Content-Length": [b"13"], b"Content-Encoding": [b"gzip"]}, 100, False),
        ]
        for raw, limit, plain in cases:
            with self.subTest(headers=raw, limit=limit):
                self.assertEqual(plain_body(Headers(raw), body, limit), plain)


class EarlyStartSettledTests(TestCase):
    """``one_pass_heads`` settles what its early starter began once the
    data that carried the request has been handled, whatever happened."""

    def test_settled_after_the_request_was_handled(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport
        from twisted.web.resource import Resource

        seen: list[str] = []

        class Root(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                seen.append(f"render {request.early_start.name}")
                return b"ok"

        class Started:
            def __init__(self, name: str) -> None:
                self.name = name

            def settle(self) -> None:
                seen.append(f"settle {self.name}")

        def early(channel: Any, method: bytes, target: bytes, *rest: Any) -> Any:
            seen.append(f"early {method.decode()} {target.decode()}")
            return Started("s1")

        site = LlamaSwapSite(Root(), reactor=Clock())
        site.early_start = early
        proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab")
        self.assertEqual(seen, ["early POST /x", "render s1", "settle s1"])
        proto.connectionLost(None)
        self.assertTrue(callable(one_pass_heads))


class HeldHeadTests(TestCase):
    """A POST head read without its (small) body is held back for one more
    read, at most ``HOLD_FOR`` seconds, so that the early starter sees the
    request whole (``one_pass_heads``)."""

    HEAD = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n"

    def setUp(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport
        from twisted.web.resource import Resource

        self.seen: list[str] = []
        seen = self.seen

        class Root(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                started = getattr(request, "early_start", None)
                seen.append(f"render {request.content.read().decode()} early={started is not None}")
                return b"ok"

        class Started:
            def settle(self) -> None:
                seen.append("settle")

        def early(channel: Any, method: bytes, target: bytes, v: bytes, h: Any, rest: bytes) -> Any:
            seen.append(f"early {rest.decode()!r}")
            return Started() if rest == b"ab" else None

        self.clock = Clock()
        site = LlamaSwapSite(Root(), reactor=self.clock)
        site.early_start = early
        self.proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.proto.callLater = self.clock.callLater
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def held(self) -> list[Any]:
        return [c for c in self.clock.getDelayedCalls() if c.getTime() == HOLD_FOR]

    def test_head_and_body_read_together(self) -> None:
        """The head waits for its body; the starter then sees both at once."""
        self.proto.dataReceived(self.HEAD)
        self.assertEqual(self.seen, [])
        self.assertEqual(len(self.held()), 1)
        self.proto.dataReceived(b"ab")
        self.assertEqual(self.seen, ["early 'ab'", "render ab early=True", "settle"])
        self.assertEqual(self.held(), [])
        self.assertIn(b"200 OK", self.transport.value())

    def test_released_after_hold_for(self) -> None:
        """A body that takes longer than ``HOLD_FOR``: the head is read the
        usual way then, and the starter sees the request once its body is read."""
        self.proto.dataReceived(self.HEAD)
        self.clock.advance(HOLD_FOR)
        self.assertEqual(self.seen, [])
        self.proto.dataReceived(b"a")
        self.proto.dataReceived(b"b")
        self.assertEqual(self.seen, ["early 'ab'", "render ab early=True", "settle"])
        self.assertIn(b"200 OK", self.transport.value())

    def test_body_still_short_after_one_more_read(self) -> None:
        """Held for one read only: what is still short of its body is read
        as usual, and the starter sees the request once its body is read."""
        self.proto.dataReceived(self.HEAD)
        self.proto.dataReceived(b"a")
        self.assertEqual(self.seen, ["early 'a'"])
        self.assertEqual(self.held(), [])
        self.proto.dataReceived(b"b")
        self.assertEqual(self.seen, ["early 'a'", "early 'ab'", "render ab early=True", "settle"])

    def test_not_held(self) -> None:
        """A GET, an ``Expect: 100-continue`` head, a body over ``HOLD_BODY``
        and a head whose body came with it are not held back."""
        heads = [
            b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (HOLD_BODY + 1),
            self.HEAD + b"ab",
        ]
        for head in heads:
            with self.subTest(head=head):
                del self.seen[:]
                self.setUp()
                self.proto.dataReceived(head)
                self.assertEqual(self.held(), [])
                self.assertTrue(self.seen and self.seen[0].startswith("early"), self.seen)

    def test_body_waiting_on_the_socket_is_read_at_once(self) -> None:
        """A body that arrived while the head was being read is read from
        the socket at once: nothing is held, and the starter sees it all."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        self.transport.socket = ours
        theirs.sendall(b"ab")
        self.proto.dataReceived(self.HEAD)
        self.assertEqual(self.held(), [])
        self.assertEqual(self.seen, ["early 'ab'", "render ab early=True", "settle"])
        self.proto.dataReceived(self.HEAD)  # nothing waits this time: held
        self.assertEqual(len(self.held()), 1)

    def test_client_gone_while_held(self) -> None:
        """A client that leaves while its head is held: nothing is read or
        answered, and the hold's timer is gone."""
        self.proto.dataReceived(self.HEAD)
        self.proto.connectionLost(None)
        self.assertEqual(self.held(), [])
        self.clock.advance(HOLD_FOR)
        self.assertEqual(self.seen, [])
        self.assertEqual(self.transport.value(), b"")


class TwistdEarlyPathTests(TestCase):
    """The early path as users run it: ``twistd -n llamaswap``, requests
    written whole, or head and then body, on one keep-alive connection,
    streamed and not."""

    timeout = 60

    async def test_keep_alive_stream_and_answer(self) -> None:
        port = free_port()
        model = {
            "cmd": f"{PYTHON} -m llamaswap.demo --host 127.0.0.1 --port {port} --model m",
            "proxy": f"http://127.0.0.1:{port}",
        }
        config = os.path.abspath(self.mktemp() + ".yaml")
        with open(config, "w") as f:
            json.dump({"models": {"m": model}}, f)
        running = ServiceProcess(
            [*TWISTD, "-n", "--pidfile=", "llamaswap", "-c", config], free_port()
        )
        self.addCleanup(_stopped, running)
        await running.wait_up()
        host, port = running.url.rsplit("/", 1)[1].split(":")
        sock = socket.create_connection((host, int(port)), timeout=30)
        self.addCleanup(sock.close)
        messages = [{"role": "user", "content": "hi"}]
        stream = json.dumps({"model": "m", "stream": True, "messages": messages}).encode()
        plain = json.dumps({"model": "m", "messages": messages}).encode()
        answers = []
        for body in (plain, stream, stream, plain):
            sock.sendall(_request(body))
            answers.append(await _read_response(sock))
        # the head, then the body, as Python's http.client writes them
        for body in (stream, plain):
            head, _, _ = _request(body).partition(b"\r\n\r\n")
            sock.sendall(head + b"\r\n\r\n")
            await _turn()
            sock.sendall(body)
            answers.append(await _read_response(sock))
        for answer in answers:
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK"), answer[:200])
        for streamed in (1, 2, 4):
            self.assertIn(b"data: [DONE]", answers[streamed])
        running.transport.signalProcess(signal.SIGTERM)
        await running.ended
        self.assertIn("shutdown complete", running.text())
        self.assertIn('"POST /v1/chat/completions HTTP/1.1" 200', running.text())
        self.assertNotIn("not taken over", running.text())


async def _stopped(running: ServiceProcess) -> None:
    if not running.ended.called:
        running.transport.signalProcess(signal.SIGTERM)
        await running.ended


async def _turn() -> None:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0.01, d.callback, None)
    await d


async def _read_until(client: _Client, end: bytes) -> bytes:
    await poll_until(lambda: client.data.rstrip().endswith(end))
    return client.data


def _without_date(answer: bytes) -> bytes:
    return b"\r\n".join(
        line for line in answer.split(b"\r\n") if not line.lower().startswith(b"date:")
    )


async def _read_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response (Content-Length or chunked) from ``sock``,
    read off the reactor thread."""
    from twisted.internet.threads import deferToThread

    def read() -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            data += _recv(sock)
        head, _, body = data.partition(b"\r\n\r\n")
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            while not body.endswith(b"0\r\n\r\n"):
                body += _recv(sock)
        else:
            length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += _recv(sock)
        return head + b"\r\n\r\n" + body

    return await deferToThread(read)


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("closed early")
    return chunk
