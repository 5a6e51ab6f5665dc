"""Issue 15 points 1 and 2: peer health (probes, backoff, 503 for a down
peer, recovery without a reload) and replicas (loaded first, then fewest in
flight, the next replica when no connection could be made)."""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaswap.config import load_config_text
from llamaswap.config.peers import PeerCheck, Peers, read_peers
from llamaswap.service.wiring import build_service
from llamaswap.upstream.peerhealth import PeerHealth
from llamaswap.web.site import LlamaSwapSite
from tests.support import base_url, listen, poll_until

JSON = b"application/json"


def _peers(raw: dict[str, Any]) -> Peers:
    peers, problems, _ = read_peers({"peers": raw}, (), {})
    assert not problems, problems
    return peers


class CheckConfigTests(SynchronousTestCase):
    def _read(self, check: Any) -> tuple[Peers, list[str], list[str]]:
        return read_peers(
            {"peers": {"p": {"proxy": "http://h:1", "models": ["m"], "check": check}}}, (), {}
        )

    def test_defaults(self) -> None:
        """Without ``check`` a peer is probed every 5 s, 2 s each, backing off to 30 s."""
        peers = _peers({"p": {"proxy": "http://h:1", "models": ["m"]}})
        self.assertEqual(peers.peers["p"].check, PeerCheck(5.0, 2.0, 30.0))

    def test_override(self) -> None:
        peers, problems, warnings = self._read({"interval": 1, "timeout": 0.5, "maxInterval": 4})
        self.assertEqual((problems, warnings), ([], []))
        self.assertEqual(peers.peers["p"].check, PeerCheck(1.0, 0.5, 4.0))

    def test_interval_zero_disables(self) -> None:
        peers, problems, _ = self._read({"interval": 0})
        self.assertEqual(problems, [])
        self.assertEqual(peers.peers["p"].check.interval, 0)

    def test_problems(self) -> None:
        """Each bad value is one line naming its key."""
        self.assertEqual(
            self._read({"interval": -1, "timeout": 0, "maxInterval": "x"})[1],
            [
                "peers.p.check.interval: must be >= 0, got -1",
                "peers.p.check.timeout: must be > 0, got 0",
                "peers.p.check.maxInterval: must be a number of seconds, got 'x'",
            ],
        )
        self.assertEqual(self._read([1])[1], ["peers.p.check: must be a mapping, got a list"])

    def test_unknown_key_warned(self) -> None:
        warnings = self._read({"intervall": 1})[2]
        self.assertEqual(len(warnings), 1)
        self.assertIn("peers.p.check.intervall", warnings[0])


class FakeNode(Resource):
    """A peer: /health, /running with ``loaded`` models ready, and a chat
    endpoint that answers with its name (or holds the request open)."""

    isLeaf = True

    def __init__(self, name: str, loaded: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.name = name
        self.loaded = loaded
        self.health_code = 200
        self.chats: list[dict[str, Any]] = []
        self.hold = False
        self.held: list[Any] = []

    def render(self, request: Any) -> object:
        path = request.path
        if path == b"/health":
            request.setResponseCode(self.health_code)
            return b"OK"
        if path == b"/running":
            request.setHeader(b"content-type", JSON)
            running = [{"model": m, "state": "ready"} for m in self.loaded]
            return json.dumps({"running": running}).encode()
        body = json.loads(request.content.read())
        self.chats.append(body)
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        request.setHeader(b"content-type", JSON)
        return json.dumps({"node": self.name, "model": body["model"]}).encode()


class Node:
    """A fake peer listening on a loopback port that can go away and come back."""

    def __init__(self, test: TestCase, name: str, loaded: tuple[str, ...] = ()) -> None:
        self.resource = FakeNode(name, loaded)
        self.port = listen(self.resource)
        self.number = self.port.getHost().port
        self.url = base_url(self.port)
        test.addCleanup(lambda: self.port.stopListening() if self.port is not None else None)

    async def stop(self) -> None:
        port, self.port = self.port, None
        await port.stopListening()

    def start(self) -> None:
        from twisted.web.server import Site

        site = Site(self.resource)
        site.noisy = False
        self.port = reactor.listenTCP(self.number, site, interface="127.0.0.1")


class ProbeTests(TestCase):
    """Probes over real loopback sockets; their timing on a Clock."""

    def setUp(self) -> None:
        self.node = Node(self, "a", loaded=("m",))
        self.clock = Clock()
        self.changes: list[tuple[str, bool | None]] = []
        self.health = PeerHealth(
            reactor, clock=self.clock, on_change=lambda s: self.changes.append((s.peer_id, s.up))
        )
        self.health.reconfigure(
            _peers(
                {
                    "a": {
                        "proxy": self.node.url,
                        "models": ["m", "n"],
                        "check": {"interval": 5, "timeout": 2, "maxInterval": 30},
                    }
                }
            )
        )
        self.addCleanup(self.health.stop)

    async def _probe_due(self) -> None:
        """Advance the clock to the next probe and wait for its result."""
        status = self.health.status("a")
        assert status is not None and status.next_probe is not None
        self.clock.advance(status.next_probe - self.clock.seconds())
        loop = self.health._loops["a"]
        if loop.probing is not None:
            await loop.probing

    async def test_up_loaded_down_backoff_recovery(self) -> None:
        """Unknown until probed (and available); up with its loaded models;
        down when it stops answering, probed again after 5, 10, 20, 30, 30 s;
        up again at the first answer, with no reload."""
        self.assertTrue(self.health.available("a"))
        self.assertIsNone(self.health.status("a").up)
        self.health.start()
        await self._probe_due()
        status = self.health.status("a")
        self.assertEqual((status.up, status.loaded), (True, frozenset({"m"})))
        self.assertTrue(self.health.loaded("a", "m"))
        self.assertFalse(self.health.loaded("a", "n"))
        self.assertEqual(status.next_probe, self.clock.seconds() + 5)

        await self.node.stop()
        gaps = []
        for _ in range(5):
            before = self.clock.seconds()
            await self._probe_due()
            gaps.append(self.clock.seconds() - before)
            self.assertFalse(self.health.available("a"))
        self.assertEqual(gaps, [5, 5, 10, 20, 30])
        self.assertEqual(self.health.status("a").next_probe - self.clock.seconds(), 30)
        self.assertEqual(self.health.retry_after("a"), 30)
        self.assertIn("refused", self.health.status("a").error)

        self.node.start()
        await self._probe_due()
        self.assertTrue(self.health.status("a").up)
        self.assertEqual(self.changes, [("a", True), ("a", False), ("a", True)])
        self.assertEqual(self.health.status("a").next_probe - self.clock.seconds(), 5)

    async def test_unhealthy_status_is_down(self) -> None:
        """A /health that answers 5xx is down; one that answers 404 (a
        server without /health) is there, so up."""
        self.node.resource.health_code = 503
        self.health.start()
        await self._probe_due()
        self.assertEqual(self.health.status("a").error, "/health answered 503")
        self.node.resource.health_code = 404
        await self._probe_due()
        self.assertTrue(self.health.status("a").up)

    async def test_probe_timeout(self) -> None:
        """A peer that accepts but never answers is down after ``timeout``."""
        connected: list[bytes] = []

        class Silent(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                connected.append(data)

        silent = protocol.Factory.forProtocol(Silent)
        port = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.health.reconfigure(
            _peers({"a": {"proxy": base_url(port), "models": ["m"], "check": {"timeout": 2}}})
        )
        self.health.start()
        self.clock.advance(0)
        probing = self.health._loops["a"].probing
        await poll_until(lambda: bool(connected))
        self.clock.advance(2)
        await probing
        self.assertEqual(self.health.status("a").error, "no answer within 2s")

    async def test_passive_marks(self) -> None:
        """A failed connect marks the peer down at once; a response marks it up."""
        self.health.start()
        await self._probe_due()
        self.health.connect_failed("a", "refused")
        self.assertFalse(self.health.available("a"))
        self.assertEqual(self.health.retry_after("a"), 5)
        self.health.responded("a")
        self.assertTrue(self.health.available("a"))

    def test_reconfigure_keeps_and_forgets(self) -> None:
        """A reload that keeps a peer keeps its status; a removed peer is forgotten."""
        status = self.health.status("a")
        self.health.reconfigure(
            _peers(
                {
                    "a": {
                        "proxy": self.node.url,
                        "models": ["m"],
                        "check": {"interval": 5, "timeout": 2, "maxInterval": 30},
                    }
                }
            )
        )
        self.assertIs(self.health.status("a"), status)
        self.health.reconfigure(Peers())
        self.assertIsNone(self.health.status("a"))


class FrontTests(TestCase):
    """A real llamaswap front (its web app on a loopback port) with real
    peers: routing by health, replicas, failover before sending."""

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def front(self, peers: dict[str, Any], models: dict[str, Any] | None = None) -> None:
        document = {"peers": peers, "models": models or {}}
        config = load_config_text(json.dumps(document), environ=dict(os.environ))
        self.service = build_service(config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.health = self.service.app.peer_health
        port = listen(self.service.app.resource(), LlamaSwapSite)
        self.addCleanup(port.stopListening)
        self.url = base_url(port)

    timeout = 60

    async def chat(self, model: str) -> tuple[int, Any, Any]:
        response = await treq.post(
            self.url + "/v1/chat/completions",
            data=json.dumps({"model": model, "messages": []}).encode(),
            headers={b"content-type": [JSON]},
            pool=self.pool,
        )
        body = await response.content()
        return response.code, response.headers, json.loads(body)

    async def models(self) -> dict[str, Any]:
        response = await treq.get(self.url + "/v1/models", pool=self.pool)
        return {r["id"]: r for r in json.loads(await response.content())["data"]}

    async def test_down_peer_is_503_with_retry_after(self) -> None:
        """A request only a down peer could serve is a 503 at once, with
        Retry-After; /v1/models lists its models as unavailable; a probe that
        finds it back makes it serve again."""
        node = Node(self, "a")
        self.front({"a": {"proxy": node.url, "models": ["m"]}})
        await self.health.probe("a")
        self.assertEqual((await self.models())["a/m"]["meta"]["llamaswap"]["peer"], {"state": "up"})
        await node.stop()
        await self.health.probe("a")
        started = reactor.seconds()
        for name in ("m", "a/m"):
            code, headers, body = await self.chat(name)
            self.assertEqual(code, 503)
            self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"5"])
            self.assertIn("peer down: a (", body["error"]["message"])
        self.assertLess(reactor.seconds() - started, 1)
        record = (await self.models())["a/m"]
        self.assertEqual(record["status"], {"value": "unavailable"})
        self.assertEqual(record["meta"]["llamaswap"]["peer"]["state"], "down")
        node.start()
        await self.health.probe("a")
        code, _, body = await self.chat("m")
        self.assertEqual((code, body["node"]), (200, "a"))

    async def test_loaded_replica_first(self) -> None:
        """Among replicas, the one with the model loaded wins; FQNs pin."""
        a, b = Node(self, "a"), Node(self, "b", loaded=("m",))
        self.front({"a": {"proxy": a.url, "models": ["m"]}, "b": {"proxy": b.url, "models": ["m"]}})
        await self.health.probe("a")
        await self.health.probe("b")
        self.assertEqual((await self.models())["b/m"]["status"], {"value": "loaded"})
        for _ in range(3):
            self.assertEqual((await self.chat("m"))[2], {"node": "b", "model": "m"})
        self.assertEqual((await self.chat("a/m"))[2], {"node": "a", "model": "m"})

    async def test_least_in_flight(self) -> None:
        """With none loaded, a replica busy with a request is passed over."""
        a, b = Node(self, "a"), Node(self, "b")
        self.front({"a": {"proxy": a.url, "models": ["m"]}, "b": {"proxy": b.url, "models": ["m"]}})
        a.resource.hold = True
        held = defer.ensureDeferred(self.chat("m"))
        await poll_until(lambda: len(a.resource.held) == 1)
        self.assertEqual((await self.chat("m"))[2]["node"], "b")
        a.resource.held[0].write(b'{"node": "a"}')
        a.resource.held[0].finish()
        self.assertEqual((await held)[2], {"node": "a"})

    async def test_next_replica_when_connect_fails(self) -> None:
        """A replica that refuses the connection is skipped for the next one
        (nothing was sent), and marked down for the requests after."""
        a, b = Node(self, "a", loaded=("m",)), Node(self, "b")
        self.front({"a": {"proxy": a.url, "models": ["m"]}, "b": {"proxy": b.url, "models": ["m"]}})
        await self.health.probe("a")
        await a.stop()
        code, _, body = await self.chat("m")
        self.assertEqual((code, body["node"]), (200, "b"))
        self.assertFalse(self.health.available("a"))
        self.assertEqual(len(b.resource.chats), 1)

    async def test_no_second_replica_after_sending(self) -> None:
        """A replica that took the request and then broke the connection is
        a 502: the request never goes to another replica."""
        received: list[bytes] = []

        class Breaks(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)
                self.transport.loseConnection()

        breaking = reactor.listenTCP(0, protocol.Factory.forProtocol(Breaks), interface="127.0.0.1")
        self.addCleanup(breaking.stopListening)
        b = Node(self, "b")
        self.front(
            {
                "a": {"proxy": base_url(breaking), "models": ["m"], "check": {"interval": 0}},
                "b": {"proxy": b.url, "models": ["m"]},
            }
        )
        code, _, body = await self.chat("m")
        self.assertEqual(code, 502)
        self.assertTrue(received)
        self.assertEqual(b.resource.chats, [])

    async def test_local_replica(self) -> None:
        """A local model that is also a peer's: the peer that has it loaded
        serves while the local one is not loaded; local wins ties."""
        a = Node(self, "a", loaded=("m",))
        model = {"cmd": "nothing ${PORT}", "proxy": "http://127.0.0.1:9"}
        self.front({"a": {"proxy": a.url, "models": ["m"]}}, {"m": model})
        await self.health.probe("a")
        self.health.status("a").up = None  # not probed yet: local first
        code, _, _ = await self.chat("m")
        self.assertGreaterEqual(code, 500)  # the local "nothing" does not start
        self.assertEqual(a.resource.chats, [])
        await self.health.probe("a")
        self.assertEqual((await self.chat("m"))[2], {"node": "a", "model": "m"})

    async def test_broken_stream_ends_with_error_event(self) -> None:
        """An event stream whose peer dies mid-way ends with one SSE error
        event after what had arrived."""

        class DiesMidStream(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                    b'10\r\ndata: {"a": 1}\n\n\r\n'
                )
                self.transport.loseConnection()

        dying = reactor.listenTCP(
            0, protocol.Factory.forProtocol(DiesMidStream), interface="127.0.0.1"
        )
        self.addCleanup(dying.stopListening)
        self.front({"a": {"proxy": base_url(dying), "models": ["m"], "check": {"interval": 0}}})
        response = await treq.post(
            self.url + "/v1/chat/completions",
            data=b'{"model": "m", "stream": true}',
            headers={b"content-type": [JSON]},
            pool=self.pool,
        )
        self.assertEqual(response.code, 200)
        text = (await response.content()).decode()
        first, second = text.split("\n\n")[:2]
        self.assertEqual(first, 'data: {"a": 1}')
        error = json.loads(second.removeprefix("data: "))["error"]
        self.assertIn("upstream ended the stream early", error["message"])
