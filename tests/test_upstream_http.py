"""The proxy client's edges over real loopback sockets: when a request is
re-sent (only the stale keep-alive case), which headers cross (hop-by-hop
dropped both ways, HEAD/204/304 kept as the upstream sent them) and the
response-header time-out."""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaswap.config import load_config_text
from llamaswap.service.wiring import build_service
from llamaswap.upstream.client import UpstreamClient, UpstreamUnavailable, forward_headers
from llamaswap.web.errors import write_error
from llamaswap.web.site import LlamaSwapSite
from tests.scripted import OK, Script, serve
from tests.scripted import _Connection as _ScriptedConnection
from tests.support import PYTHON, base_url, listen, poll_until


class _Front(Resource):
    """The proxy under test: forwards everything to one upstream, counting
    re-sent requests."""

    isLeaf = True

    def __init__(self, client: UpstreamClient, upstream: str) -> None:
        super().__init__()
        self.client = client
        self.upstream = upstream.encode()
        self.retries = 0

    def retried(self) -> None:
        self.retries += 1

    def render(self, request: Any) -> object:
        body = request.content.read()
        headers = forward_headers(request.requestHeaders, client_ip="127.0.0.1")
        d = defer.Deferred.fromCoroutine(
            self.client.forward(
                request,
                self.upstream + request.uri,
                headers=headers,
                body=body,
                on_retry=self.retried,
            )
        )

        def done(_: object) -> None:
            if not request.finished and not request._disconnected:
                request.finish()

        def failed(failure: Any) -> None:
            if failure.check(UpstreamUnavailable):
                write_error(request, failure.value.status, str(failure.value))
            elif not failure.check(defer.CancelledError):
                write_error(request, 500, failure.getErrorMessage())

        d.addCallbacks(done, failed)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET


class _Raw(Protocol):
    """A client that sends raw bytes and collects the answer."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = b""
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(self.received)


class UpstreamEdgeCase(TestCase):
    timeout = 30

    def front_for(self, script: Script, **client_options: Any) -> str:
        upstream = serve(script)
        self.addCleanup(upstream.stopListening)
        self.client = UpstreamClient(reactor, **client_options)
        self.addCleanup(self.client.close)
        self.front = _Front(self.client, base_url(upstream))
        port = listen(self.front, LlamaSwapSite)
        self.addCleanup(port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.front_port = port
        return base_url(port)

    async def raw(self, data: bytes) -> bytes:
        """Send ``data`` to the front as is; the whole answer (ends at close)."""
        client = _Raw(data)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.front_port.getHost().port)
        await connectProtocol(endpoint, client)
        return await client.closed


class RetryTests(UpstreamEdgeCase):
    async def test_stale_keep_alive_is_resent_once(self) -> None:
        """A reused connection the upstream closes as the request arrives (no
        response byte) is re-sent once, on a new connection, and counted."""
        script = Script([OK, "close", OK])
        front = self.front_for(script)
        first = await treq.post(front + "/v1/chat/completions", data=b"{}", pool=self.pool)
        self.assertEqual(await first.content(), b"ok")
        second = await treq.post(front + "/v1/chat/completions", data=b'{"n":2}', pool=self.pool)
        self.assertEqual(second.code, 200)
        self.assertEqual(await second.content(), b"ok")
        self.assertEqual([s.connection for s in script.seen], [1, 1, 2])
        self.assertEqual([s.body for s in script.seen], [b"{}", b'{"n":2}', b'{"n":2}'])
        self.assertEqual(self.front.retries, 1)

    async def test_get_follows_the_same_rule(self) -> None:
        """A GET on a stale reused connection is re-sent once (not by
        Twisted's own retry: counted); a second failure is a 502."""
        script = Script([OK, "close", "close", OK])
        front = self.front_for(script)
        first = await treq.get(front + "/v1/models", pool=self.pool)
        await first.content()
        second = await treq.get(front + "/v1/models", pool=self.pool)
        self.assertEqual(second.code, 502)
        payload = await second.json()
        self.assertEqual(payload["error"]["code"], "bad_gateway")
        self.assertEqual([s.connection for s in script.seen], [1, 1, 2])
        self.assertEqual(self.front.retries, 1)

    async def test_fresh_connection_dying_is_502_never_resent(self) -> None:
        """A new connection killed while the request is in progress is a 502
        JSON error; the upstream saw the request exactly once."""
        script = Script(["abort", OK])
        front = self.front_for(script)
        response = await treq.post(
            front + "/v1/chat/completions", data=b'{"model":"m"}', pool=self.pool
        )
        self.assertEqual(response.code, 502)
        payload = await response.json()
        self.assertEqual(payload["error"]["code"], "bad_gateway")
        self.assertEqual(len(script.seen), 1)
        self.assertEqual(script.connections, 1)
        self.assertEqual(self.front.retries, 0)

    async def test_fresh_connection_killed_mid_body_is_502_never_resent(self) -> None:
        """Killed while the request body is still being sent: 502, one request."""
        script = Script(["abort-early", OK])
        front = self.front_for(script)
        body = b"x" * (8 * 1024 * 1024)
        response = await treq.post(front + "/v1/audio/transcriptions", data=body, pool=self.pool)
        self.assertEqual(response.code, 502)
        await response.content()
        self.assertEqual(len(script.seen), 1)
        self.assertLess(len(script.seen[0].body), len(body))
        self.assertEqual(script.connections, 1)
        self.assertEqual(self.front.retries, 0)

    async def test_fresh_connection_closed_cleanly_is_not_resent(self) -> None:
        """Also a clean close of a new connection before any response byte
        (the case a stale connection looks like) is not re-sent."""
        script = Script(["close", OK])
        front = self.front_for(script)
        response = await treq.post(front + "/v1/completions", data=b"{}", pool=self.pool)
        self.assertEqual(response.code, 502)
        await response.content()
        self.assertEqual(len(script.seen), 1)
        self.assertEqual(self.front.retries, 0)

    async def test_reused_connection_dying_after_response_bytes_is_not_resent(self) -> None:
        """Once a response byte arrived the upstream has the request: a
        reused connection that breaks then is a 502, never re-sent."""
        script = Script([OK, b"HTTP/1.1 200 OK\r\nContent-Len", OK])
        front = self.front_for(script)
        first = await treq.get(front + "/x", pool=self.pool)
        await first.content()
        second = await treq.get(front + "/x", pool=self.pool)
        self.assertEqual(second.code, 502)
        await second.content()
        self.assertEqual([s.connection for s in script.seen], [1, 1])
        self.assertEqual(self.front.retries, 0)


def _head_and_headers(answer: bytes) -> tuple[bytes, dict[bytes, list[bytes]]]:
    """The status line and headers (lower-case names) of a raw HTTP answer."""
    head = answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in head[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return head[0], headers


class RefusedTests(TestCase):
    async def test_what_agent_refuses_is_unavailable_not_raised(self) -> None:
        """A method or URL that Twisted's ``Agent`` refuses to send (it
        raises at once) fails the send's Deferred with
        ``UpstreamUnavailable``, as any failed send does: nothing raises
        from ``send`` itself."""
        client = UpstreamClient(reactor)
        self.addCleanup(client.close)
        for method, url in ((b"GE T", b"http://127.0.0.1:1/"), (b"GET", b"http://127.0.0.1:1/a b")):
            d = client.send(method, url, headers=Headers(), body=b"")
            await self.assertFailure(d, UpstreamUnavailable)


class HeaderTests(UpstreamEdgeCase):
    async def exchange(self, upstream_answer: bytes, request: bytes) -> tuple[bytes, dict]:
        self.script = Script([upstream_answer])
        self.front_for(self.script)
        return _head_and_headers(await self.raw(request))

    async def test_head_keeps_upstream_content_length(self) -> None:
        """HEAD: the upstream's Content-Length and Content-Type are relayed
        as sent; nothing is made up."""
        status, headers = await self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1234\r\nETag: "v1"\r\n\r\n',
            b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(headers[b"content-length"], [b"1234"])
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertEqual(headers[b"etag"], [b'"v1"'])
        self.assertEqual(self.script.seen[0].head.split(b" ")[0], b"HEAD")

    async def test_head_without_length_gets_none(self) -> None:
        """HEAD answered without Content-Length (or Content-Type): neither is
        invented, in particular no ``Content-Length: 0``."""
        status, headers = await self.exchange(
            b"HTTP/1.1 200 OK\r\nX-Upstream: yes\r\n\r\n",
            b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertNotIn(b"content-length", headers)
        self.assertNotIn(b"content-type", headers)
        self.assertNotIn(b"transfer-encoding", headers)
        self.assertEqual(headers[b"x-upstream"], [b"yes"])

    async def test_204_keeps_headers(self) -> None:
        """204: the upstream's headers, no Content-Length or Content-Type added."""
        status, headers = await self.exchange(
            b"HTTP/1.1 204 No Content\r\nX-Request-Id: 42\r\n\r\n",
            b"DELETE /v1/files/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(status, b"HTTP/1.1 204 No Content")
        self.assertEqual(headers[b"x-request-id"], [b"42"])
        self.assertNotIn(b"content-length", headers)
        self.assertNotIn(b"content-type", headers)
        self.assertNotIn(b"transfer-encoding", headers)

    async def test_304_keeps_headers(self) -> None:
        """304: validators and caching headers pass, nothing is added."""
        status, headers = await self.exchange(
            b'HTTP/1.1 304 Not Modified\r\nETag: "abc"\r\nCache-Control: max-age=5\r\n\r\n',
            b'GET /ui/x HTTP/1.1\r\nHost: x\r\nIf-None-Match: "abc"\r\nConnection: close\r\n\r\n',
        )
        self.assertEqual(status, b"HTTP/1.1 304 Not Modified")
        self.assertEqual(headers[b"etag"], [b'"abc"'])
        self.assertEqual(headers[b"cache-control"], [b"max-age=5"])
        self.assertNotIn(b"content-length", headers)
        self.assertNotIn(b"content-type", headers)

    async def test_304_keeps_upstream_content_length(self) -> None:
        """A 304 may state the length of the representation it stands for:
        the upstream's value is kept, not replaced by 0."""
        status, headers = await self.exchange(
            b'HTTP/1.1 304 Not Modified\r\nETag: "abc"\r\nContent-Length: 512\r\n\r\n',
            b'GET /ui/x HTTP/1.1\r\nHost: x\r\nIf-None-Match: "abc"\r\nConnection: close\r\n\r\n',
        )
        self.assertEqual(status, b"HTTP/1.1 304 Not Modified")
        self.assertEqual(headers[b"content-length"], [b"512"])

    async def test_hop_by_hop_dropped_from_response(self) -> None:
        """Hop-by-hop response headers, and those the upstream's Connection
        header names, do not reach the client."""
        status, headers = await self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
            b"Connection: X-Upstream-Hop, keep-alive\r\nKeep-Alive: timeout=5\r\n"
            b"X-Upstream-Hop: secret\r\nProxy-Authenticate: Basic\r\n"
            b"Proxy-Connection: keep-alive\r\nTrailer: X-T\r\nUpgrade: h2c\r\n"
            b"X-End: kept\r\n\r\nok",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(headers[b"x-end"], [b"kept"])
        for name in (
            b"x-upstream-hop",
            b"keep-alive",
            b"proxy-authenticate",
            b"proxy-connection",
            b"trailer",
            b"upgrade",
        ):
            self.assertNotIn(name, headers)
        self.assertEqual(headers.get(b"connection"), [b"close"])  # our own, to the client

    async def test_hop_by_hop_dropped_from_request(self) -> None:
        """Hop-by-hop request headers, and those the client's Connection
        header names, do not reach the upstream."""
        await self.exchange(
            OK,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Connection: X-Client-Hop, close\r\nX-Client-Hop: secret\r\n"
            b"Keep-Alive: 300\r\nProxy-Authorization: Basic eDp5\r\n"
            b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n"
            b"Upgrade: websocket-not-really\r\nX-End: kept\r\n\r\n{}",
        )
        seen = self.script.seen[0]
        self.assertEqual(seen.header(b"x-end"), [b"kept"])
        self.assertEqual(seen.body, b"{}")
        for name in (
            b"x-client-hop",
            b"keep-alive",
            b"proxy-authorization",
            b"proxy-connection",
            b"te",
            b"trailer",
            b"upgrade",
        ):
            self.assertEqual(seen.header(name), [], name)
        # The connection to the upstream is ours: keep-alive, not the client's close.
        self.assertNotIn(b"close", b" ".join(seen.header(b"connection")).lower())

    async def test_expect_continue_not_forwarded(self) -> None:
        """``Expect: 100-continue`` was answered by us (the body is read
        whole first): the upstream gets the body, not the expectation."""
        await self.exchange(
            OK,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n{}",
        )
        seen = self.script.seen[0]
        self.assertEqual(seen.header(b"expect"), [])
        self.assertEqual(seen.body, b"{}")


class TimeoutTests(UpstreamEdgeCase):
    async def test_response_header_timeout_is_504_and_aborts(self) -> None:
        """No response headers within the time-out: 504 JSON, and the upstream
        connection is aborted."""
        clock = Clock()
        script = Script(["hang"])
        front = self.front_for(script, response_header_timeout=60, clock=clock)
        pending = treq.post(front + "/v1/chat/completions", data=b"{}", pool=self.pool)
        await poll_until(lambda: len(script.seen) == 1)
        clock.advance(59)
        self.assertEqual(script.lost, 0)
        clock.advance(1)
        response = await pending
        self.assertEqual(response.code, 504)
        payload = await response.json()
        self.assertEqual(payload["error"]["code"], "gateway_timeout")
        self.assertIn("no response headers within 60s", payload["error"]["message"])
        await poll_until(lambda: script.lost == 1)
        self.assertEqual(len(script.seen), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_response_in_time_cancels_the_timer(self) -> None:
        clock = Clock()
        script = Script([OK])
        front = self.front_for(script, response_header_timeout=60, clock=clock)
        response = await treq.get(front + "/v1/models", pool=self.pool)
        self.assertEqual(await response.content(), b"ok")
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_tls_handshake_timeout_aborts(self) -> None:
        """An https upstream that accepts but never completes the handshake
        is cut after the TLS handshake time-out: 502, connection closed."""
        clock = Clock()
        script = Script(["hang"])
        upstream = serve(script)
        self.addCleanup(upstream.stopListening)
        client = UpstreamClient(reactor, tls_handshake_timeout=10, clock=clock)
        self.addCleanup(client.close)
        front = _Front(client, f"https://127.0.0.1:{upstream.getHost().port}")
        port = listen(front, LlamaSwapSite)
        self.addCleanup(port.stopListening)
        pending = treq.get(base_url(port) + "/v1/models", pool=HTTPConnectionPool(reactor, False))
        await poll_until(lambda: script.connections == 1 and clock.getDelayedCalls())
        clock.advance(10)
        response = await pending
        self.assertEqual(response.code, 502)
        await response.content()
        await poll_until(lambda: script.lost == 1)

    async def test_tls_handshake_done_cancels_the_timer(self) -> None:
        """Once the TLS handshake succeeds, its time-out timer is cancelled
        (and so is one of a connection lost before its handshake ends)."""
        from twisted.internet import ssl
        from twisted.internet.endpoints import wrapClientTLS

        from llamaswap.core.twistedweb import tls_handshake_pending
        from llamaswap.upstream.client import _TunedEndpoint

        certificate = ssl.KeyPair.generate().selfSignedCert(1, CN="upstream")
        server = reactor.listenSSL(
            0, Factory.forProtocol(Protocol), certificate.options(), interface="127.0.0.1"
        )
        self.addCleanup(server.stopListening)
        clock = Clock()
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", server.getHost().port)
        # No verification: this is about the timer, not about trust.
        endpoint = _TunedEndpoint(wrapClientTLS(ssl.CertificateOptions(), tcp), clock, 0, 10)
        protocol = await endpoint.connect(Factory.forProtocol(Protocol))
        self.addCleanup(protocol.transport.abortConnection)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        await poll_until(lambda: not tls_handshake_pending(protocol.transport))
        self.assertEqual(clock.getDelayedCalls(), [])

        script = Script(["hang"])
        silent = serve(script)
        self.addCleanup(silent.stopListening)
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", silent.getHost().port)
        endpoint = _TunedEndpoint(wrapClientTLS(ssl.CertificateOptions(), tcp), clock, 0, 10)
        protocol = await endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        protocol.transport.abortConnection()
        await poll_until(lambda: not clock.getDelayedCalls())

    async def test_keepalive_sets_socket_options(self) -> None:
        """``keepalive`` turns TCP keep-alive on with that period, for plain
        and TLS connections."""
        import socket

        from twisted.web.client import URI

        from llamaswap.core.endpoints import UpstreamEndpoints
        from llamaswap.upstream.client import _TunedEndpoints

        script = Script([OK])
        upstream = serve(script)
        self.addCleanup(upstream.stopListening)
        clock = Clock()
        endpoints = _TunedEndpoints(UpstreamEndpoints(reactor), clock, 7, 10)
        for scheme in (b"http", b"https"):
            uri = URI.fromBytes(b"%s://127.0.0.1:%d/" % (scheme, upstream.getHost().port))
            protocol = await endpoints.endpointForURI(uri).connect(Factory.forProtocol(Protocol))
            self.addCleanup(protocol.transport.abortConnection)
            tcp = protocol.transport.transport if scheme == b"https" else protocol.transport
            handle = tcp.getHandle()
            self.assertEqual(handle.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
            if hasattr(socket, "TCP_KEEPIDLE"):
                self.assertEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 7)
                self.assertEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL), 7)
        clock.advance(10)  # the TLS handshake time-out ends the TLS connection

    async def test_keepalive_on_lean_client_connections(self) -> None:
        """Plain-HTTP requests go through the lean client: its connections
        are made by the same tuned endpoints (TCP keep-alive on)."""
        import socket

        front = self.front_for(Script([OK]), keepalive=7)
        response = await treq.get(front + "/v1/models", pool=self.pool)
        self.assertEqual(await response.content(), b"ok")
        [idle] = self.client._agent._idle.values()
        handle = idle[0].transport.getHandle()
        self.assertEqual(handle.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            self.assertEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 7)


class ServiceTests(TestCase):
    """The whole service: peer time-outs applied, retries in /metrics."""

    timeout = 30

    async def start(self, peer: dict[str, Any]) -> str:
        document = {
            "models": {"local": {"cmd": f"{PYTHON} -c pass", "proxy": "http://127.0.0.1:9"}},
            "peers": {"box": {"models": ["m"], "check": {"interval": 0}, **peer}},
        }
        config = load_config_text(json.dumps(document), environ=dict(os.environ))
        service = build_service(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = listen(service.app.resource(), LlamaSwapSite)
        self.addCleanup(port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        return base_url(port)

    async def post(self, url: str) -> Any:
        return await treq.post(
            url + "/v1/chat/completions",
            data=b'{"model": "box/m", "messages": []}',
            headers={b"content-type": [b"application/json"]},
            pool=self.pool,
        )

    async def test_retry_counted_in_metrics(self) -> None:
        """A stale keep-alive re-send is counted per model in /metrics."""
        script = Script([OK, "close", OK])
        upstream = serve(script)
        self.addCleanup(upstream.stopListening)
        url = await self.start({"proxy": base_url(upstream)})
        for _ in range(2):
            response = await self.post(url)
            self.assertEqual(await response.content(), b"ok")
        self.assertEqual([s.connection for s in script.seen], [1, 1, 2])
        metrics = await (await treq.get(url + "/metrics", pool=self.pool)).text()
        self.assertIn('llamaswap_upstream_retries_total{model="box/m"} 1.0', metrics)

    async def test_peer_response_header_timeout_applied(self) -> None:
        """``timeouts.responseHeader`` of a peer cuts a peer that never answers:
        504 JSON after that many seconds, the peer connection closed."""
        script = Script(["hang"])
        upstream = serve(script)
        self.addCleanup(upstream.stopListening)
        url = await self.start({"proxy": base_url(upstream), "timeouts": {"responseHeader": 1}})
        started = reactor.seconds()
        response = await self.post(url)
        self.assertEqual(response.code, 504)
        payload = await response.json()
        self.assertEqual(payload["error"]["code"], "gateway_timeout")
        self.assertGreaterEqual(reactor.seconds() - started, 1)
        await poll_until(lambda: script.lost == 1)

    async def test_model_response_header_timeout_applied(self) -> None:
        """``models.<id>.timeouts.responseHeader`` cuts a local model's server
        that never answers: 504 JSON after that many seconds, the connection
        closed; a model without ``timeouts`` keeps waiting."""
        script = Script(["hang"])
        upstream = serve(script)
        self.addCleanup(upstream.stopListening)
        sleeper = f"{PYTHON} -c 'import time; time.sleep(60)'"
        model = {"cmd": sleeper, "proxy": base_url(upstream), "checkEndpoint": "none"}
        document = {
            "models": {
                "quick": {**model, "timeouts": {"responseHeader": 1}},
                "patient": model,
            }
        }
        config = load_config_text(json.dumps(document), environ=dict(os.environ))
        service = build_service(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = listen(service.app.resource(), LlamaSwapSite)
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        started = reactor.seconds()
        response = await treq.post(
            base_url(port) + "/v1/chat/completions",
            data=b'{"model": "quick", "messages": []}',
            headers={b"content-type": [b"application/json"]},
            pool=pool,
        )
        self.assertEqual(response.code, 504)
        payload = await response.json()
        self.assertEqual(payload["error"]["code"], "gateway_timeout")
        self.assertGreaterEqual(reactor.seconds() - started, 1)
        await poll_until(lambda: script.lost == 1)
        routing = service.app._routing
        self.assertIsNone(routing.model_client("patient"))
        self.assertEqual(routing.model_client("quick")._response_header_timeout, 1)


class PeerClientTests(TestCase):
    def test_reload_with_new_timeouts_replaces_the_client(self) -> None:
        """A reload that changes a peer's ``timeouts`` gets a client built
        with them; an unchanged peer keeps its client (and pool)."""
        from llamaswap.web.routing import Routing

        def config(response_header: int) -> Any:
            document = {
                "models": {"local": {"cmd": "x", "proxy": "http://127.0.0.1:9"}},
                "peers": {
                    "box": {
                        "proxy": "http://127.0.0.1:9",
                        "models": ["m"],
                        "timeouts": {"responseHeader": response_header},
                    },
                    "other": {"proxy": "http://127.0.0.1:9", "models": ["o"]},
                },
            }
            return load_config_text(json.dumps(document), environ={})

        routing = Routing(config(5), None, reactor)  # type: ignore[arg-type]
        self.addCleanup(routing.close)
        first, other = routing.peer_client("box"), routing.peer_client("other")
        self.assertEqual(first._response_header_timeout, 5)
        routing.reconfigure(config(5))
        self.assertIs(routing.peer_client("box"), first)
        routing.reconfigure(config(7))
        self.assertIsNot(routing.peer_client("box"), first)
        self.assertEqual(routing.peer_client("box")._response_header_timeout, 7)
        self.assertIs(routing.peer_client("other"), other)

    async def test_reload_removing_a_peer_closes_its_connections(self) -> None:
        """A reload that removes a peer closes its client: the idle pooled
        connection now, one in use once its request is done."""
        from llamaswap.web.routing import Routing

        idle, busy = Script([OK]), Script(["hang"])
        held: list[_ScriptedConnection] = []

        def hold() -> _ScriptedConnection:
            held.append(_ScriptedConnection(busy))
            return held[-1]

        upstreams = [
            serve(idle),
            reactor.listenTCP(0, Factory.forProtocol(hold), interface="127.0.0.1"),
        ]
        for upstream in upstreams:
            self.addCleanup(upstream.stopListening)

        def config(*peers: str) -> Any:
            urls = dict(zip(("idle", "busy"), map(base_url, upstreams), strict=True))
            document = {
                "models": {"local": {"cmd": "x", "proxy": "http://127.0.0.1:9"}},
                "peers": {p: {"proxy": urls[p], "models": [p]} for p in peers},
            }
            return load_config_text(json.dumps(document), environ={})

        routing = Routing(config("idle", "busy"), None, reactor)  # type: ignore[arg-type]
        self.addCleanup(routing.close)
        fronts = {}
        for name in ("idle", "busy"):
            port = listen(
                _Front(routing.peer_client(name), base_url(upstreams[name == "busy"])),
                LlamaSwapSite,
            )
            self.addCleanup(port.stopListening)
            fronts[name] = base_url(port)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(fronts["idle"] + "/x", pool=pool)
        self.assertEqual(await response.content(), b"ok")
        pending = treq.get(fronts["busy"] + "/x", pool=pool)
        await poll_until(lambda: len(busy.seen) == 1)
        self.assertEqual((idle.lost, busy.lost), (0, 0))
        routing.reconfigure(config())
        await poll_until(lambda: idle.lost == 1)
        self.assertRaises(KeyError, routing.peer_client, "idle")
        self.assertEqual(busy.lost, 0)
        held[0].transport.write(OK)
        response = await pending
        self.assertEqual(await response.content(), b"ok")
        await poll_until(lambda: busy.lost == 1)

    def test_reload_keeps_replaces_and_drops_model_clients(self) -> None:
        """A model's own client (it configures ``timeouts``) is kept by a
        reload that leaves them alone, replaced when they change, and
        dropped when they go (the model then uses the shared client)."""
        from llamaswap.web.routing import Routing

        def config(timeouts: dict[str, int] | None) -> Any:
            model: dict[str, Any] = {"cmd": "x", "proxy": "http://127.0.0.1:9"}
            if timeouts is not None:
                model["timeouts"] = timeouts
            return load_config_text(json.dumps({"models": {"m": model}}), environ={})

        routing = Routing(config({"responseHeader": 5}), None, reactor)  # type: ignore[arg-type]
        self.addCleanup(routing.close)
        first = routing.model_client("m")
        assert first is not None
        routing.reconfigure(config({"responseHeader": 5}))
        self.assertIs(routing.model_client("m"), first)
        routing.reconfigure(config({"responseHeader": 7}))
        second = routing.model_client("m")
        assert second is not None
        self.assertIsNot(second, first)
        self.assertEqual(second._response_header_timeout, 7)
        routing.reconfigure(config(None))
        self.assertIsNone(routing.model_client("m"))
