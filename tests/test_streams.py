"""``/logs*``, ``/api/events`` and ``/api/inflight`` over real loopback sockets."""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from llamaswap.core.mailbox import drop_marker
from llamaswap.observe.events import EventBus
from llamaswap.observe.inflight import InflightTracker
from llamaswap.observe.logs import LogHub
from llamaswap.web.streams import KEEPALIVE, StreamsResource, streams_resource
from tests.support import listen, poll_until

MODELS = {"org/model-a": "org/model-a", "plain": "plain", "al": "plain"}


def dechunk(data: bytes) -> bytes:
    """The complete chunks of a chunked body received so far."""
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        size = int(data[pos:end].split(b";")[0], 16)
        start = end + 2
        if size == 0 or len(data) < start + size + 2:
            break
        out += data[start : start + size]
        pos = start + size + 2
    return bytes(out)


class RawClient(Protocol):
    """A minimal HTTP/1.1 client that keeps every byte it receives."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True

    def has_head(self) -> bool:
        return b"\r\n\r\n" in self.received

    @property
    def status(self) -> int:
        return int(bytes(self.received).split(b" ", 2)[1])

    @property
    def headers(self) -> dict[str, list[str]]:
        head = bytes(self.received).split(b"\r\n\r\n", 1)[0].decode("latin-1")
        found: dict[str, list[str]] = {}
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            found.setdefault(name.strip().lower(), []).append(value.strip())
        return found

    @property
    def body(self) -> bytes:
        raw = bytes(self.received).split(b"\r\n\r\n", 1)[1]
        if "chunked" in self.headers.get("transfer-encoding", [""])[0]:
            return dechunk(raw)
        return raw

    def ended(self) -> bool:
        """The chunked body's terminating chunk has arrived."""
        return self.has_head() and bytes(self.received).endswith(b"0\r\n\r\n")


class StreamsTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.hub = LogHub("proxy")
        self.bus = EventBus()
        self.inflight = InflightTracker(self.clock, self.bus)
        self.models = [{"id": "plain", "state": "ready"}]
        self.resource: StreamsResource = streams_resource(
            self.hub,
            self.bus,
            model_status=lambda: self.models,
            inflight=self.inflight,
            ui_config=lambda: {"activity": {"session_id": ["x-session"]}},
            active_profile=lambda: "fast",
            resolve_model=MODELS.get,
            clock=self.clock,
        )
        self.port = listen(self.resource)
        self.addCleanup(self.port.stopListening)
        self.clients: list[RawClient] = []
        self.addCleanup(self._disconnect_all)

    async def _disconnect_all(self) -> None:
        for client in self.clients:
            if not client.closed:
                client.transport.loseConnection()
        await poll_until(lambda: all(c.closed for c in self.clients))
        await poll_until(lambda: self.resource.open_streams == 0)
        self.inflight.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def request(
        self, path: str, method: str = "GET", headers: dict[str, str] | None = None
    ) -> RawClient:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        client = await connectProtocol(endpoint, RawClient())
        self.clients.append(client)
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if method == "POST":
            lines.append("Content-Length: 0")
        client.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await poll_until(client.has_head)
        return client

    async def wait_body(self, client: RawClient, expected: bytes) -> None:
        await poll_until(lambda: expected in client.body)

    # -- /api/events ----------------------------------------------------------

    async def test_events_initial_burst_live_event_and_headers(self) -> None:
        """The SSE stream sends the documented headers and initial burst in
        order, then live events, each double encoded."""
        self.hub.proxy.write(b"[INFO] proxy line\n")
        self.hub.model("plain").write(b"child output\n")
        self.inflight.add("plain", "/v1/completions", "POST", {}, "127.0.0.1")
        client = await self.request("/api/events")
        self.assertEqual(client.status, 200)
        headers = client.headers
        self.assertEqual(headers["content-type"], ["text/event-stream"])
        self.assertEqual(headers["cache-control"], ["no-cache"])
        self.assertEqual(headers["connection"], ["keep-alive"])
        self.assertEqual(headers["x-content-type-options"], ["nosniff"])
        self.assertEqual(headers["x-accel-buffering"], ["no"])
        await poll_until(lambda: client.body.count(b"\n\n") >= 6)
        self.bus.model_status([{"id": "plain", "state": "stopped"}])
        await poll_until(lambda: client.body.count(b"\n\n") >= 7)
        frames = client.body.split(b"\n\n")[:-1]
        decoded = []
        for frame in frames:
            event_line, data_line = frame.split(b"\n")
            self.assertEqual(event_line, b"event:message")
            self.assertTrue(data_line.startswith(b"data:{"))
            envelope = json.loads(data_line[len(b"data:") :])
            self.assertIsInstance(envelope["data"], str)
            decoded.append((envelope["type"], json.loads(envelope["data"])))
        self.assertEqual(
            [kind for kind, _ in decoded],
            [
                "logData",
                "logData",
                "modelStatus",
                "uiConfig",
                "profileChanged",
                "inflight",
                "modelStatus",
            ],
        )
        self.assertEqual(decoded[0][1], {"source": "proxy", "data": "[INFO] proxy line\n"})
        self.assertEqual(decoded[1][1], {"source": "upstream", "data": "child output\n"})
        self.assertEqual(decoded[2][1], [{"id": "plain", "state": "ready"}])
        self.assertEqual(decoded[3][1], {"activity": {"session_id": ["x-session"]}})
        self.assertEqual(decoded[4][1], {"active": "fast"})
        self.assertEqual(decoded[5][1]["operation"], "snapshot")
        self.assertEqual(decoded[5][1]["requests"][0]["req_path"], "/v1/completions")
        self.assertEqual(decoded[6][1], [{"id": "plain", "state": "stopped"}])

    async def test_events_keepalive(self) -> None:
        """An idle event stream gets a ``:keepalive`` comment every 15 s."""
        client = await self.request("/api/events")
        await poll_until(lambda: client.body.count(b"\n\n") >= 6)
        self.clock.advance(14)
        self.clock.advance(1)
        await poll_until(lambda: client.body.endswith(KEEPALIVE))
        self.clock.advance(15)
        await poll_until(lambda: client.body.count(KEEPALIVE) == 2)

    async def test_events_unsubscribe_on_disconnect(self) -> None:
        """A client going away unsubscribes it and stops the keepalive timer."""
        client = await self.request("/api/events")
        await poll_until(lambda: len(self.bus) == 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        client.transport.loseConnection()
        await poll_until(lambda: len(self.bus) == 0 and self.resource.open_streams == 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_close_all_ends_streams(self) -> None:
        """close_all() ends every open stream cleanly and unsubscribes it."""
        events = await self.request("/api/events")
        logs = await self.request("/logs/stream")
        await poll_until(lambda: self.resource.open_streams == 2)
        self.resource.close_all()
        await poll_until(lambda: events.ended() and logs.ended())
        self.assertEqual(len(self.bus), 0)
        self.assertEqual(self.hub.mux.subscriber_count, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_paused_event_stream_drops(self) -> None:
        """While the transport is full the subscription queues up to its cap
        and drops the rest; resuming delivers what was queued."""
        client = await self.request("/api/events")
        await poll_until(lambda: self.resource.open_streams == 1)
        (stream,) = self.resource._streams
        stream.pauseProducing()
        for index in range(1100):
            self.bus.activity(index)
        self.assertEqual(stream.subscription.queued, 1024)
        self.clock.advance(15)  # no keepalive into a backed-up stream
        stream.resumeProducing()
        await poll_until(lambda: b'{\\"id\\":1023}' in client.body)
        self.assertNotIn(b'{\\"id\\":1024}', client.body)
        self.assertNotIn(KEEPALIVE, client.body)

    # -- /logs ------------------------------------------------------------------

    async def test_logs_history_and_html_redirect(self) -> None:
        """/logs gives the mux history as text; HTML clients go to /ui/."""
        self.hub.proxy.write(b"[INFO] hello\n")
        self.hub.upstream.write(b"upstream only\n")  # proxy mode: not in mux
        client = await self.request("/logs", headers={"Connection": "close"})
        await poll_until(lambda: client.closed)
        self.assertEqual(client.status, 200)
        self.assertEqual(client.headers["content-type"], ["text/plain"])
        self.assertEqual(client.body, b"[INFO] hello\n")
        html = await self.request(
            "/logs", headers={"Accept": "text/html,*/*", "Connection": "close"}
        )
        await poll_until(lambda: html.closed)
        self.assertEqual(html.status, 302)
        self.assertEqual(html.headers["location"], ["/ui/"])

    async def test_log_stream_history_then_live(self) -> None:
        """A log stream sends the headers and history, then live chunks."""
        self.hub.proxy.write(b"old\n")
        client = await self.request("/logs/stream/proxy")
        headers = client.headers
        self.assertEqual(headers["content-type"], ["text/plain"])
        self.assertEqual(headers["transfer-encoding"], ["chunked"])
        self.assertEqual(headers["x-content-type-options"], ["nosniff"])
        self.assertEqual(headers["x-accel-buffering"], ["no"])
        await self.wait_body(client, b"old\n")
        self.hub.proxy.write(b"new\n")
        await self.wait_body(client, b"old\nnew\n")

    async def test_log_stream_no_history(self) -> None:
        """``?no-history`` skips the history, with or without a value."""
        self.hub.upstream.write(b"old\n")
        bare = await self.request("/logs/stream/upstream?no-history")
        valued = await self.request("/logs/stream/upstream?no-history=1")
        await poll_until(lambda: self.hub.upstream.subscriber_count == 2)
        self.hub.upstream.write(b"new\n")
        await self.wait_body(bare, b"new\n")
        await self.wait_body(valued, b"new\n")
        self.assertEqual(bare.body, b"new\n")
        self.assertEqual(valued.body, b"new\n")

    async def test_log_stream_models(self) -> None:
        """Model ids may contain slashes or be aliases; extra segments are ignored."""
        self.hub.model("org/model-a").write(b"a says hi\n")
        self.hub.model("plain").write(b"plain says hi\n")
        slashed = await self.request("/logs/stream/org/model-a")
        alias = await self.request("/logs/stream/al/extra/segments")
        await self.wait_body(slashed, b"a says hi\n")
        await self.wait_body(alias, b"plain says hi\n")
        self.assertEqual(slashed.body, b"a says hi\n")
        self.assertEqual(alias.body, b"plain says hi\n")

    async def test_log_stream_combined(self) -> None:
        """/logs/stream streams the mux monitor."""
        client = await self.request("/logs/stream?no-history")
        await poll_until(lambda: self.hub.mux.subscriber_count == 1)
        self.hub.proxy.write(b"via mux\n")
        await self.wait_body(client, b"via mux\n")

    async def test_log_stream_unknown_logger(self) -> None:
        """An unknown logger id is a 400 with llama-swap's message."""
        client = await self.request(
            "/logs/stream/nope", headers={"Accept": "text/plain", "Connection": "close"}
        )
        await poll_until(lambda: client.closed)
        self.assertEqual(client.status, 400)
        self.assertEqual(
            client.body,
            b"llama-swap: invalid logger. Use 'proxy', 'upstream' or a model's ID",
        )

    async def test_paused_log_stream_marks_drops(self) -> None:
        """A backed-up log stream drops chunks and marks the gap when it catches up."""
        client = await self.request("/logs/stream/proxy?no-history")
        await poll_until(lambda: self.resource.open_streams == 1)
        (stream,) = self.resource._streams
        stream.pauseProducing()
        for _ in range(1025):
            self.hub.proxy.write(b"x")
        stream.resumeProducing()
        self.hub.proxy.write(b"y")
        await self.wait_body(client, b"y")
        self.assertEqual(client.body, b"x" * 1024 + drop_marker(1) + b"y")

    async def test_log_stream_unsubscribes_on_disconnect(self) -> None:
        """Closing the client removes its log subscription."""
        client = await self.request("/logs/stream/proxy")
        await poll_until(lambda: self.hub.proxy.subscriber_count == 1)
        client.transport.loseConnection()
        await poll_until(lambda: self.hub.proxy.subscriber_count == 0)

    # -- /api/inflight ------------------------------------------------------------

    async def test_inflight_list_and_cancel(self) -> None:
        """GET lists requests in flight; POST .../cancel runs the canceller or 404s."""
        entry = self.inflight.add("plain", "/v1/completions", "POST", {}, "10.0.0.1")
        cancelled: list[bool] = []
        entry.set_canceller(lambda: cancelled.append(True))
        listing = await self.request("/api/inflight", headers={"Connection": "close"})
        await poll_until(lambda: listing.closed)
        (record,) = json.loads(listing.body)
        self.assertEqual(record["id"], entry.id)
        ok = await self.request(f"/api/inflight/{entry.id}/cancel", "POST", {"Connection": "close"})
        await poll_until(lambda: ok.closed)
        self.assertEqual((ok.status, json.loads(ok.body)), (200, {"msg": "ok"}))
        self.assertEqual(cancelled, [True])
        missing = await self.request(
            "/api/inflight/999/cancel", "POST", {"Accept": "text/plain", "Connection": "close"}
        )
        await poll_until(lambda: missing.closed)
        self.assertEqual(missing.status, 404)
        self.assertEqual(missing.body, b"llama-swap: inflight request not found")
        wrong = await self.request(
            f"/api/inflight/{entry.id}/cancel", headers={"Connection": "close"}
        )
        await poll_until(lambda: wrong.closed)
        self.assertEqual(wrong.status, 405)
        self.clock.advance(0)

    def test_handles(self) -> None:
        """handles() recognises exactly this resource's paths."""
        for path in (
            b"/logs",
            b"/logs/stream",
            b"/logs/stream/a/b",
            b"/api/events",
            b"/api/inflight",
            b"/api/inflight/3/cancel",
        ):
            self.assertTrue(StreamsResource.handles(path), path)
        for path in (b"/logsx", b"/logs/streamer", b"/api/inflight/3", b"/api/eventsx"):
            self.assertFalse(StreamsResource.handles(path), path)
