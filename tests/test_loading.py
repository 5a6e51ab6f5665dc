"""Tests for the loading-state stream (reference §7, SPEC decision 6)."""

from __future__ import annotations

import json
import random
from typing import Any

import treq
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaswap.upstream.client import UpstreamClient, UpstreamUnavailable, copy_response_headers
from llamaswap.web.errors import write_error
from llamaswap.web.loading import (
    CHUNK,
    REMARKS,
    TICK,
    LoadingStream,
    relay_body_only,
    sse_piece,
    typed_pieces,
    wants_loading_stream,
)
from llamaswap.web.site import LlamaSwapSite
from tests.support import base_url, free_port, listen

PAUSE = CHUNK / 75


class FakeRequest:
    """Records what a :class:`twisted.web.server.Request` would send."""

    def __init__(self) -> None:
        self.method = b"POST"
        self.code = 200
        self.requestHeaders = Headers()
        self.responseHeaders = Headers()
        self.written: list[bytes] = []
        self.finished = False
        self._disconnected = False
        self.startedWriting = False
        self.producer: Any = None
        self._notifications: list[defer.Deferred[None]] = []

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        if self.startedWriting:
            raise AssertionError("status set after the headers were sent")
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        if self.startedWriting:
            raise AssertionError("header set after the headers were sent")
        self.responseHeaders.setRawHeaders(name, [value])

    def getHeader(self, name: bytes) -> bytes | None:
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("write after finish")
        if self._disconnected:
            return
        self.startedWriting = True
        self.written.append(data)

    def finish(self) -> None:
        if self.finished:
            raise RuntimeError("finished twice")
        self.finished = True
        notifications, self._notifications = self._notifications, []
        for d in notifications:
            d.callback(None)

    def notifyFinish(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._notifications.append(d)
        return d

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def disconnect(self) -> None:
        self._disconnected = True
        notifications, self._notifications = self._notifications, []
        for d in notifications:
            d.errback(Failure(ConnectionLost()))

    # -- reading what was sent ----------------------------------------------

    def body(self) -> bytes:
        return b"".join(self.written)

    def events(self) -> list[bytes]:
        """The SSE ``data:`` payloads, in order."""
        frames = self.body().split(b"\n\n")
        assert frames[-1] == b"", "the stream must end on an event boundary"
        out = []
        for frame in frames[:-1]:
            assert frame.startswith(b"data: "), frame
            out.append(frame[len(b"data: ") :])
        return out

    def pieces(self) -> list[str]:
        """The ``reasoning_content`` of every loading event."""
        out = []
        for event in self.events():
            if event == b"[DONE]":
                continue
            parsed = json.loads(event)
            if "choices" in parsed:
                out.append(parsed["choices"][0]["delta"]["reasoning_content"])
        return out

    def text(self) -> str:
        return "".join(self.pieces())


class FixedRandom(random.Random):
    """Remarks in their listed order, and always the same wait."""

    def __init__(self, pick: str = "low") -> None:
        super().__init__(0)
        self.pick = pick

    def shuffle(self, x: Any) -> None:  # type: ignore[override]
        pass

    def randint(self, a: int, b: int) -> int:
        return a if self.pick == "low" else b


HEADER = "━━━━━\nllamaswap loading model: m1\n"


class Harness:
    """A started loading stream on a fake request and a clock."""

    def __init__(self, pick: str = "low", **kwargs: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.start = self.clock.seconds()
        self.request = FakeRequest()
        self.stream = LoadingStream(self.request, "m1", self.clock, rng=FixedRandom(pick), **kwargs)
        self.stream.start()

    def until(self, offset: float, step: float = 0.01) -> None:
        """Advance to ``offset`` seconds after start() in small steps:
        ``Clock.advance`` runs only one link of a ``callLater`` chain per call."""
        target = self.start + offset
        while self.clock.seconds() + step < target:
            self.clock.advance(step)
        self.clock.advance(max(0.0, target - self.clock.seconds()))


class WantsLoadingStreamTests(SynchronousTestCase):
    def test_streaming_chat_completion_for_unready_model(self) -> None:
        """A streaming chat completion for an enabled, unready model gets one."""
        self.assertTrue(wants_loading_stream(True, True, b"/v1/chat/completions", False))
        self.assertTrue(wants_loading_stream(True, True, b"/v1/chat/completions?x=1", False))

    def test_any_missing_condition_disables_it(self) -> None:
        """Not streaming, disabled, ready, or another path: no loading stream."""
        self.assertFalse(wants_loading_stream(False, True, b"/v1/chat/completions", False))
        self.assertFalse(wants_loading_stream(True, False, b"/v1/chat/completions", False))
        self.assertFalse(wants_loading_stream(True, True, b"/v1/chat/completions", True))
        for path in (b"/v1/completions", b"/v1/messages", b"/v1/responses", b"/chat/completions"):
            self.assertFalse(wants_loading_stream(True, True, path, False), path)


class FramingTests(SynchronousTestCase):
    def test_piece_is_one_sse_event(self) -> None:
        """A piece is exactly ``data: {"choices":[{"delta":{"reasoning_content":…}}]}``
        and a blank line, with no other fields."""
        self.assertEqual(
            sse_piece('a"b'),
            b'data: {"choices":[{"delta":{"reasoning_content":"a\\"b"}}]}\n\n',
        )
        self.assertEqual(
            sse_piece("━━━━━"),
            b'data: {"choices":[{"delta":{"reasoning_content":"' + "━━━━━".encode() + b'"}}]}\n\n',
        )

    def test_typed_pieces_chunk_text_and_split_newlines(self) -> None:
        """Text is cut into 5-character chunks paused len/75 s apart (none
        after the last of a run) and newlines are pieces of their own."""
        self.assertEqual(
            typed_pieces("abcdefghijkl\nxy"),
            [("abcde", 5 / 75), ("fghij", 5 / 75), ("kl", 0.0), ("\n", 0.0), ("xy", 0.0)],
        )


class StartTests(SynchronousTestCase):
    def test_headers_committed_with_accel_buffering_off(self) -> None:
        """start() commits 200 with the event-stream headers, X-Accel-Buffering included."""
        h = Harness()
        headers = h.request.responseHeaders
        self.assertEqual(h.request.code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-cache"])
        self.assertEqual(headers.getRawHeaders(b"connection"), [b"keep-alive"])
        self.assertEqual(headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        self.assertTrue(h.request.startedWriting)
        h.stream.stop()

    def test_connection_close_is_kept(self) -> None:
        """A response Twisted already marked ``Connection: close`` keeps it."""
        clock = Clock()
        request = FakeRequest()
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        stream = LoadingStream(request, "m1", clock, rng=FixedRandom())
        stream.start()
        self.assertEqual(request.responseHeaders.getRawHeaders(b"connection"), [b"close"])
        stream.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_header_is_typed(self) -> None:
        """The header lines are typed 5 characters at a time, ~67 ms apart."""
        h = Harness()
        self.assertEqual(h.request.pieces(), ["━━━━━", "\n", "llama"])
        h.clock.advance(PAUSE)
        self.assertEqual(h.request.pieces()[-1], "swap ")
        h.until(0.5)
        self.assertEqual(h.request.text(), HEADER)
        self.assertEqual(h.request.pieces()[-2:], ["m1", "\n"])
        h.stream.stop()

    def test_ticks_write_dots(self) -> None:
        """Every 750 ms with nothing else to say, one ``.`` is written."""
        h = Harness(pick="high")
        h.until(TICK * 3 + 0.1)
        self.assertEqual(h.request.text(), HEADER + "...")
        h.stream.stop()

    def test_disconnected_before_start_writes_nothing(self) -> None:
        """A client already gone gets no headers, no bytes and no timers."""
        clock = Clock()
        request = FakeRequest()
        request._disconnected = True
        stream = LoadingStream(request, "m1", clock, rng=FixedRandom())
        stream.start()
        self.assertEqual(request.written, [])
        self.assertEqual(clock.getDelayedCalls(), [])


class RemarkTests(SynchronousTestCase):
    def test_first_remark_after_two_seconds_at_the_earliest(self) -> None:
        """With the shortest draw (2 s), the first remark is the first tick at
        or after 2 s: two dots, then a newline, the remark and a space."""
        h = Harness(pick="low")
        h.until(2.2)
        self.assertEqual(h.request.text(), HEADER + "..")
        h.until(2.95)
        self.assertEqual(h.request.text(), HEADER + "..\n" + REMARKS[0] + " ")
        h.stream.stop()

    def test_first_remark_after_five_seconds_at_the_latest(self) -> None:
        """With the longest draw (5 s), six dots come first (ticks up to 4.5 s)."""
        h = Harness(pick="high")
        h.until(5.2)
        self.assertEqual(h.request.text(), HEADER + "......")
        h.until(5.95)
        self.assertEqual(h.request.text(), HEADER + "......\n" + REMARKS[0] + " ")
        h.stream.stop()

    def test_later_remarks_five_to_nine_seconds_apart(self) -> None:
        """After a remark, the next waits 5 s (shortest draw): the remark
        written at 2.25 s is followed by the next at the 7.5 s tick."""
        h = Harness(pick="low")
        h.until(7.45)
        self.assertNotIn(REMARKS[1], h.request.text())
        h.until(8.2)
        after_first = h.request.text().split(REMARKS[0] + " ", 1)[1]
        self.assertEqual(after_first, "......\n" + REMARKS[1] + " ")
        h.stream.stop()

    def test_remarks_fit_in_a_tick(self) -> None:
        """Every remark is typed in less than one tick, and there are plenty."""
        self.assertGreaterEqual(len(REMARKS), 40)
        for remark in REMARKS:
            pauses = sum(pause for _, pause in typed_pieces(f"\n{remark} "))
            self.assertLess(pauses, TICK, remark)

    def test_remarks_are_shuffled_per_request(self) -> None:
        """The remark order comes from the injected random source."""
        clock = Clock()
        order = []
        for seed in (1, 2):
            request = FakeRequest()
            stream = LoadingStream(request, "m1", clock, rng=random.Random(seed))
            order.append(list(stream._remarks))
        self.assertEqual(sorted(order[0]), sorted(REMARKS))
        self.assertNotEqual(order[0], order[1])


class QueuePositionTests(SynchronousTestCase):
    def test_pushed_position_shown_on_next_tick(self) -> None:
        """A queue position replaces the next dot: newline, ``Queue position: #N``, space."""
        h = Harness(pick="high")
        h.until(0.8)
        h.stream.set_queue_position(3)
        h.stream.set_queue_position(2)  # the latest value wins
        h.until(2.2)
        self.assertEqual(h.request.text(), HEADER + ".\nQueue position: #2 ")
        self.assertEqual(h.stream.progress()["queue_position"], 2)
        h.stream.stop()

    def test_polled_position_shown_once(self) -> None:
        """A polled position is shown when it changes, not on every tick."""
        position: list[int | None] = [4]
        h = Harness(pick="high", queue_position=lambda: position[0])
        h.until(2.3)
        self.assertEqual(h.request.text(), HEADER + "\nQueue position: #4 ..")
        position[0] = 1
        h.until(3.6)
        self.assertIn("Queue position: #4 ..\nQueue position: #1 ", h.request.text())
        h.stream.stop()

    def test_position_resets_remark_timer(self) -> None:
        """A queue message counts as a message: the next remark waits 5 s more."""
        h = Harness(pick="low")
        h.stream.set_queue_position(1)
        h.until(6.7)  # position at 0.75 s, remark due at 5.75 s: the 6 s tick
        self.assertEqual(
            h.request.text(),
            HEADER + "\nQueue position: #1 ......\n" + REMARKS[0] + " ",
        )
        h.stream.stop()


class LoadProgressTests(SynchronousTestCase):
    def test_each_new_tenth_is_typed_with_the_time_left(self) -> None:
        """The model's load percent replaces a dot when it reaches a new
        tenth (with ``eta_s`` as the time left); the snapshot carries both."""
        loading: list[dict[str, float | None] | None] = [{"percent": 4.0, "eta_s": None}]
        h = Harness(pick="high", load_progress=lambda: loading[0])
        h.until(0.8)
        loading[0] = {"percent": 23.5, "eta_s": 6.4}
        h.until(1.6)
        loading[0] = {"percent": 27.0, "eta_s": 5.0}  # same tenth: a dot
        h.until(2.3)
        self.assertEqual(h.request.text(), HEADER + ".\nLoaded 24%, about 6 s left .")
        self.assertEqual(h.stream.progress()["percent"], 27.0)
        self.assertEqual(h.stream.progress()["eta_s"], 5.0)
        loading[0] = None  # ready: nothing more to say about the load
        h.until(3.1)
        self.assertTrue(h.request.text().endswith(" .."))
        h.stream.stop()


class FinishTests(SynchronousTestCase):
    def test_done_line_has_real_elapsed_time(self) -> None:
        """finish() writes the completion lines with the time since start()."""
        h = Harness(pick="high")
        h.until(3.456)
        d = h.stream.finish()
        self.successResultOf(d)
        self.assertTrue(h.request.text().endswith("\nDone! (3.46s)\n━━━━━\n \n"))
        self.assertAlmostEqual(h.stream.elapsed(), 3.456)

    def test_completion_lines_are_typed_pieces(self) -> None:
        """The completion lines use the same 5-character framing."""
        h = Harness(pick="high")
        h.until(TICK + 0.05)
        h.request.written.clear()
        h.until(1.4)
        h.stream.finish()
        self.assertEqual(
            h.request.pieces(),
            ["\n", "Done!", " (1.4", "0s)", "\n", "━━━━━", "\n", " ", "\n"],
        )

    def test_unfinished_typing_is_flushed_first(self) -> None:
        """A message still being typed is completed before the Done! lines,
        at once: the answer does not wait for the animation."""
        h = Harness()
        h.stream.finish()
        self.assertEqual(h.request.text(), HEADER + "\nDone! (0.00s)\n━━━━━\n \n")

    def test_nothing_written_after_finish(self) -> None:
        """After finish() the loader is fenced: no timer is left and nothing
        more is written, so the upstream answer can follow."""
        h = Harness()
        h.until(TICK * 2 + 0.1)
        self.successResultOf(h.stream.finish())
        self.assertEqual(h.clock.getDelayedCalls(), [])
        count = len(h.request.written)
        h.stream.set_queue_position(5)
        h.until(30)
        self.successResultOf(h.stream.finish())
        self.successResultOf(h.stream.fail("late"))
        self.assertEqual(len(h.request.written), count)
        self.assertFalse(h.request.finished)
        h.request.write(b"data: upstream\n\n")
        self.assertEqual(h.request.events()[-1], b"upstream")

    def test_progress_snapshot(self) -> None:
        """progress() reports model, state, queue position and elapsed seconds."""
        h = Harness()
        h.until(1.234)
        self.assertEqual(
            h.stream.progress(),
            {"model": "m1", "state": "loading", "queue_position": None, "elapsed_s": 1.23},
        )
        h.stream.finish()
        h.clock.advance(10)
        self.assertEqual(h.stream.progress()["elapsed_s"], 1.23)


class FailTests(SynchronousTestCase):
    def test_error_event_after_done_lines(self) -> None:
        """fail() writes the Done! lines, one SSE event with the OpenAI-style
        error object, ``data: [DONE]``, and finishes the request."""
        h = Harness(pick="high")
        h.until(2)
        self.successResultOf(h.stream.fail("unspecific error: health check timed out"))
        self.assertTrue(h.request.finished)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        events = h.request.events()
        self.assertEqual(events[-1], b"[DONE]")
        self.assertEqual(
            json.loads(events[-2]),
            {
                "src": "llama-swap",
                "error": {
                    "message": "unspecific error: health check timed out",
                    "type": "server_error",
                    "param": None,
                    "code": "internal_error",
                },
            },
        )
        self.assertTrue(h.request.text().endswith("\nDone! (2.00s)\n━━━━━\n \n"))

    def test_fail_before_start_is_a_plain_error(self) -> None:
        """Without a started stream, fail() answers with a normal error response."""
        request = FakeRequest()
        stream = LoadingStream(request, "m1", Clock(), rng=FixedRandom())
        self.successResultOf(stream.fail("boom"))
        self.assertEqual(request.code, 500)
        self.assertEqual(json.loads(request.body())["error"]["message"], "boom")
        self.assertTrue(request.finished)

    def test_fail_after_disconnect_writes_nothing(self) -> None:
        """A failure for a client already gone writes and finishes nothing."""
        h = Harness()
        h.request.disconnect()
        count = len(h.request.written)
        self.successResultOf(h.stream.fail("boom"))
        self.assertEqual(len(h.request.written), count)
        self.assertFalse(h.request.finished)


class DisconnectTests(SynchronousTestCase):
    def test_disconnect_stops_all_timers(self) -> None:
        """A client that goes away mid-typing stops the ticker and the typing
        at once; finish() then writes nothing."""
        h = Harness()
        self.assertNotEqual(h.clock.getDelayedCalls(), [])
        h.request.disconnect()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        count = len(h.request.written)
        h.until(5)
        self.successResultOf(h.stream.finish())
        self.assertEqual(len(h.request.written), count)

    def test_stop_abandons_silently(self) -> None:
        """stop() (request cancelled) cancels every timer and writes nothing more."""
        h = Harness()
        count = len(h.request.written)
        h.stream.stop()
        h.stream.stop()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.until(2)
        self.assertEqual(len(h.request.written), count)


class _Response:
    """The parts of an ``IResponse`` that ``copy_response_headers`` reads."""

    def __init__(self, code: int, content_type: bytes) -> None:
        self.code = code
        self.phrase = b"X"
        self.headers = Headers({b"content-type": [content_type], b"content-length": [b"10"]})


class RelayBodyOnlyTests(SynchronousTestCase):
    def started(self) -> FakeRequest:
        h = Harness()
        h.stream.finish()
        return h.request

    def test_upstream_headers_do_not_touch_the_response(self) -> None:
        """Upstream status and headers land in the wrapper; its body bytes
        are appended to the already-started stream."""
        request = self.started()
        relay = relay_body_only(request)
        copy_response_headers(_Response(200, b"text/event-stream"), relay)
        relay.responseHeaders.setRawHeaders(b"content-length", [b"10"])
        relay.write(b'data: {"x":1}\n\n')
        relay.finish()
        self.assertEqual(relay.code, 200)
        self.assertEqual(request.code, 200)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-length"), None)
        self.assertEqual(request.events()[-1], b'{"x":1}')
        self.assertTrue(request.finished)

    def test_upstream_error_becomes_error_event(self) -> None:
        """An upstream error body becomes one SSE error event plus ``[DONE]``,
        keeping the upstream's message and a type matching its status."""
        request = self.started()
        relay = relay_body_only(request)
        copy_response_headers(_Response(400, b"application/json"), relay)
        relay.write(b'{"error":{"message":"context too ')
        relay.write(b'long","type":"invalid_request_error"}}')
        relay.finish()
        events = request.events()
        self.assertEqual(events[-1], b"[DONE]")
        error = json.loads(events[-2])["error"]
        self.assertEqual(error["message"], "context too long")
        self.assertEqual(error["type"], "invalid_request_error")
        self.assertEqual(relay.code, 400)

    def test_error_bodies_read_like_activity_rows(self) -> None:
        """The error event's message is found as an activity row's is
        (``error``, ``message``, ``detail``); other bodies are shown as text."""
        for body, message in [
            (b'{"error":"model is loading"}', "model is loading"),
            (b'{"message":" slow down "}', "slow down"),
            (b'{"detail":"Not Found"}', "Not Found"),
            (b'{"error":{"message":""},"message":"fallback"}', "fallback"),
            (b"llama-swap: no such model", "no such model"),
            (b"", "upstream answered with status 503"),
        ]:
            request = self.started()
            relay = relay_body_only(request)
            copy_response_headers(_Response(503, b"application/json"), relay)
            relay.write(body)
            relay.finish()
            error = json.loads(request.events()[-2])["error"]
            self.assertEqual(error["message"], message, body)

    def test_proxy_error_becomes_error_event(self) -> None:
        """``write_error`` through the wrapper (502, upstream unreachable)
        also ends the stream with an SSE error event, not raw JSON."""
        request = self.started()
        request.requestHeaders.setRawHeaders(b"accept", [b"text/plain"])
        relay = relay_body_only(request)
        write_error(relay, 502, "upstream m1 unavailable: connection refused")
        events = request.events()
        self.assertEqual(events[-1], b"[DONE]")
        error = json.loads(events[-2])["error"]
        self.assertEqual(error["message"], "upstream m1 unavailable: connection refused")
        self.assertEqual(error["code"], "bad_gateway")
        self.assertTrue(request.finished)

    def test_producer_calls_reach_the_request(self) -> None:
        """Backpressure registration goes to the real request."""
        request = self.started()
        relay = relay_body_only(request)
        producer = object()
        relay.registerProducer(producer, True)
        self.assertIs(request.producer, producer)
        relay.unregisterProducer()
        self.assertIsNone(request.producer)


class _Upstream(Resource):
    """Answers ``/ok`` with a two-event stream and ``/bad`` with a JSON 400."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        if request.path == b"/ok":
            request.setHeader(b"content-type", b"text/event-stream")
            return b'data: {"answer":1}\n\ndata: [DONE]\n\n'
        request.setResponseCode(400)
        request.setHeader(b"content-type", b"application/json")
        return b'{"error":{"message":"bad prompt","type":"invalid_request_error"}}'


class _LoadingFront(Resource):
    """Shows a loading stream for a moment, then relays to ``upstream``."""

    isLeaf = True

    def __init__(self, client: UpstreamClient, upstream: bytes) -> None:
        super().__init__()
        self.client = client
        self.upstream = upstream

    def render(self, request: Any) -> object:
        stream = LoadingStream(request, "m1", reactor, rng=FixedRandom())
        stream.start()
        d = defer.Deferred.fromCoroutine(self._serve(request, stream))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    async def _serve(self, request: Any, stream: LoadingStream) -> None:
        await task.deferLater(reactor, 0.1, lambda: None)
        await stream.finish()
        relay = relay_body_only(request)
        try:
            await self.client.forward(
                relay, self.upstream + request.uri, headers=Headers(), body=b""
            )
        except UpstreamUnavailable as exc:
            write_error(relay, 502, str(exc))
            return
        relay.finish()


class LoopbackTests(TestCase):
    """The loading stream and the relay wrapper on real sockets."""

    def front(self, upstream: bytes) -> str:
        client = UpstreamClient(reactor)
        self.addCleanup(client.close)
        port = listen(_LoadingFront(client, upstream), LlamaSwapSite)
        self.addCleanup(port.stopListening)
        return base_url(port)

    def setUp(self) -> None:
        upstream = listen(_Upstream())
        self.addCleanup(upstream.stopListening)
        self.upstream = base_url(upstream).encode()
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def test_upstream_answer_follows_the_loading_lines(self) -> None:
        """The client gets one 200 event stream: loading lines, Done!, then
        the upstream's own events, with no stray upstream headers."""
        response = await treq.post(self.front(self.upstream) + "/ok", pool=self.pool)
        body = await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), None)
        request = FakeRequest()
        request.written.append(body)
        self.assertTrue(request.text().startswith(HEADER))
        self.assertIn("\nDone! (0.", request.text())
        self.assertEqual(request.events()[-2:], [b'{"answer":1}', b"[DONE]"])

    async def test_upstream_error_is_an_sse_error_event(self) -> None:
        """An upstream 400 after the stream began arrives as an SSE error event."""
        response = await treq.post(self.front(self.upstream) + "/bad", pool=self.pool)
        body = await response.content()
        self.assertEqual(response.code, 200)
        request = FakeRequest()
        request.written.append(body)
        events = request.events()
        self.assertEqual(events[-1], b"[DONE]")
        self.assertEqual(json.loads(events[-2])["error"]["message"], "bad prompt")

    async def test_unreachable_upstream_is_an_sse_error_event(self) -> None:
        """A refused upstream connection after the stream began ends it with
        an SSE 502 error event."""
        dead = f"http://127.0.0.1:{free_port()}".encode()
        response = await treq.post(self.front(dead) + "/ok", pool=self.pool)
        body = await response.content()
        request = FakeRequest()
        request.written.append(body)
        error = json.loads(request.events()[-2])["error"]
        self.assertEqual(error["code"], "bad_gateway")
