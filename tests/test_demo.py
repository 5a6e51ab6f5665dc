"""Tests for the demo upstream, ``llamaswap.demo``."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import struct
import sys
from collections.abc import Callable
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ProcessDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface.verify import verifyObject

from llamaswap.demo.model import DemoModel, DemoSettings, pseudo_embedding
from llamaswap.demo.resource import make_site
from llamaswap.demo.server import parse_settings
from llamaswap.demo.stream import BATCH_TOKENS, TokenStream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


class FakeTarget:
    """A request stand-in that records what a ``TokenStream`` does to it."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.finished = False
        self._waiters: list[Deferred[None]] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def finish(self) -> None:
        self.finished = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def notifyFinish(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def lose_connection(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(Failure(ConnectionDone()))

    def text(self) -> str:
        return b"".join(self.written).decode()


def render_tokens(start: int, stop: int) -> bytes:
    return b"".join(b"<%d>" % index for index in range(start, stop))


def render_end(started_at: float, finished_at: float) -> bytes:
    return b"<end %g>" % (finished_at - started_at)


def sse_events(body: bytes) -> list[str]:
    """The ``data:`` payloads of an event stream, in order."""
    events = []
    for block in body.decode("utf-8").split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    return events


async def poll_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait on the real reactor until ``predicate()`` holds; fail after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await task.deferLater(reactor, 0.01, lambda: None)


class DemoServerMixin:
    """Serves a demo site on an ephemeral loopback port for one test."""

    def serve(self, settings: DemoSettings, clock: Clock | None = None) -> str:
        site = make_site(settings, clock if clock is not None else reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        return f"http://127.0.0.1:{port.getHost().port}"

    async def post_json(self, url: str, body: object) -> tuple[int, bytes]:
        response = await self.http.post(
            url, data=json.dumps(body).encode(), headers={b"content-type": [b"application/json"]}
        )
        return response.code, await treq.content(response)

    async def get(self, url: str) -> tuple[int, bytes]:
        response = await self.http.get(url)
        return response.code, await treq.content(response)


# --------------------------------------------------------------------------
# pure parts, on a Clock
# --------------------------------------------------------------------------


class TokenStreamTests(SynchronousTestCase):
    def test_is_push_producer(self) -> None:
        """A token stream provides IPushProducer, so transports can pause it."""
        stream = TokenStream(FakeTarget(), Clock(), 1, 0, render_tokens, render_end)
        self.assertTrue(verifyObject(IPushProducer, stream))

    def test_paced_tokens(self) -> None:
        """With tokens-per-second set, token k is written (k+1)/tps after the start."""
        clock, target = Clock(), FakeTarget()
        TokenStream(target, clock, 3, 10.0, render_tokens, render_end).start()
        self.assertEqual(target.written, [])
        clock.advance(0.1)
        self.assertEqual(target.text(), "<0>")
        clock.advance(0.1)
        self.assertEqual(target.text(), "<0><1>")
        clock.advance(0.1)
        self.assertEqual(target.text(), "<0><1><2><end 0.3>")
        self.assertTrue(target.finished)
        self.assertIsNone(target.producer)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_late_timer_catches_up(self) -> None:
        """A timer that fires late writes every token that has fallen due."""
        clock, target = Clock(), FakeTarget()
        TokenStream(target, clock, 4, 10.0, render_tokens, render_end).start()
        clock.advance(0.35)
        self.assertEqual(target.text(), "<0><1><2>")
        clock.advance(0.06)
        self.assertTrue(target.finished)

    def test_unpaced_batches(self) -> None:
        """Unpaced, tokens go out in batches with a reactor turn between them."""
        clock, target = Clock(), FakeTarget()
        count = BATCH_TOKENS * 2 + 1
        TokenStream(target, clock, count, 0, render_tokens, render_end).start()
        self.assertEqual(len(target.written), 1)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        self.assertEqual(len(target.written), 3 + 1)
        self.assertTrue(target.finished)
        self.assertEqual(target.text().count("<"), count + 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_pause_and_resume(self) -> None:
        """While paused nothing is generated; resuming carries on where it stopped."""
        clock, target = Clock(), FakeTarget()
        stream = TokenStream(target, clock, 3, 10.0, render_tokens, render_end)
        stream.start()
        clock.advance(0.1)
        stream.pauseProducing()
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(1.0)
        self.assertEqual(target.text(), "<0>")
        stream.resumeProducing()
        clock.advance(0)
        self.assertEqual(target.text(), "<0><1><2><end 1.1>")
        self.assertTrue(target.finished)

    def test_client_disconnect_stops_generation(self) -> None:
        """When the client goes away no more tokens are written and no timer is left."""
        clock, target = Clock(), FakeTarget()
        stream = TokenStream(target, clock, 100, 10.0, render_tokens, render_end)
        stream.start()
        clock.advance(0.2)
        target.lose_connection()
        clock.advance(10)
        self.assertEqual(stream.sent, 2)
        self.assertEqual(target.text(), "<0><1>")
        self.assertFalse(target.finished)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_producing(self) -> None:
        """stopProducing from the transport ends generation like a disconnect."""
        clock, target = Clock(), FakeTarget()
        stream = TokenStream(target, clock, 1000, 0, render_tokens, render_end)
        stream.start()
        stream.stopProducing()
        clock.advance(0)
        self.assertEqual(stream.sent, BATCH_TOKENS)
        self.assertEqual(clock.getDelayedCalls(), [])


class DemoModelTests(SynchronousTestCase):
    def test_reply_cycles_with_a_space(self) -> None:
        """The reply repeats to the requested length, with a space where it wraps."""
        model = DemoModel(DemoSettings(model="m", reply="One two."), Clock())
        self.assertEqual(model.text(0), "")
        self.assertEqual(model.text(1), "One")
        self.assertEqual(model.text(5), "One two. One two. One")
        self.assertEqual(model.token_json(2), b'" One"')

    def test_reply_names_the_model(self) -> None:
        """The default reply mentions the model name, so users see who answered."""
        model = DemoModel(DemoSettings(model="qwen-7b"), Clock())
        self.assertIn("qwen-7b", model.text(len(model.first_tokens)))

    def test_loading_takes_the_startup_delay(self) -> None:
        """The model is loaded only once the start-up delay has passed."""
        clock = Clock()
        model = DemoModel(DemoSettings(startup_delay=2.0), clock)
        loaded = model.when_loaded()
        model.start_loading()
        clock.advance(1.9)
        self.assertFalse(model.loaded)
        self.assertNoResult(loaded)
        clock.advance(0.1)
        self.assertTrue(model.loaded)
        self.successResultOf(loaded)

    def test_stop_loading_cancels_timer(self) -> None:
        """Stopping the site while loading leaves no timer behind."""
        clock = Clock()
        model = DemoModel(DemoSettings(startup_delay=2.0), clock)
        model.start_loading()
        model.stop_loading()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_prompt_cache(self) -> None:
        """A repeated prompt prefix counts as cached, but at least one token is evaluated."""
        model = DemoModel(DemoSettings(), Clock())
        first = model.evaluate("a b c d".split())
        self.assertEqual((first.prompt_tokens, first.cache_n), (4, 0))
        second = model.evaluate("a b c d".split())
        self.assertEqual((second.prompt_tokens, second.cache_n, second.prompt_n), (4, 3, 1))
        third = model.evaluate("a b x".split())
        self.assertEqual(third.cache_n, 2)

    def test_embedding_is_deterministic_and_normalised(self) -> None:
        """Pseudo-embeddings depend only on the input and have unit length."""
        first = pseudo_embedding("hello")
        self.assertEqual(first, pseudo_embedding("hello"))
        self.assertNotEqual(first, pseudo_embedding("world"))
        self.assertEqual(len(first), 16)
        self.assertAlmostEqual(math.fsum(v * v for v in first), 1.0)


class CommandLineTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Only --port is required; the rest has llama-server-like defaults."""
        settings, host, port = parse_settings(["--port", "8081"])
        self.assertEqual((host, port), ("127.0.0.1", 8081))
        self.assertEqual(settings, DemoSettings())

    def test_all_options(self) -> None:
        """Every option lands in the settings."""
        settings, host, port = parse_settings(
            [
                "--port=0",
                "--host=::1",
                "--model=m1",
                "--startup-delay=1.5",
                "--tokens-per-second=30",
                "--reply=hi {model}",
                "--max-tokens-default=4",
            ]
        )
        self.assertEqual((host, port), ("::1", 0))
        self.assertEqual(settings, DemoSettings("m1", "hi {model}", 1.5, 30.0, 4))
        self.assertEqual(settings.reply_text(), "hi m1")

    def test_rejects_bad_values(self) -> None:
        """Negative numbers, bad ports and empty replies are usage errors."""
        for argv in (
            [],
            ["--port", "70000"],
            ["--port", "1", "--startup-delay", "-1"],
            ["--port", "1", "--tokens-per-second", "nan"],
            ["--port", "1", "--reply", "  "],
        ):
            with self.assertRaises(SystemExit, msg=argv):
                parse_settings(argv)


# --------------------------------------------------------------------------
# HTTP over loopback
# --------------------------------------------------------------------------


class HealthTests(DemoServerMixin, TestCase):
    async def test_health_503_until_loaded(self) -> None:
        """/health answers 503 "Loading model" until the start-up delay has passed, then 200."""
        clock = Clock()
        url = self.serve(DemoSettings(startup_delay=5.0), clock)
        code, body = await self.get(url + "/health")
        self.assertEqual(code, 503)
        self.assertEqual(
            json.loads(body),
            {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
        )
        clock.advance(5.0)
        code, body = await self.get(url + "/health")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ok"}))

    async def test_inference_waits_for_load_but_models_does_not(self) -> None:
        """While loading, inference endpoints answer 503 and /v1/models lists the model."""
        clock = Clock()
        url = self.serve(DemoSettings(model="m1", startup_delay=1.0), clock)
        code, body = await self.post_json(url + "/v1/chat/completions", {"messages": []})
        self.assertEqual(code, 503)
        code, body = await self.get(url + "/v1/models")
        self.assertEqual(code, 200)
        listing = json.loads(body)
        self.assertEqual(listing["object"], "list")
        self.assertEqual([m["id"] for m in listing["data"]], ["m1"])

    async def test_polling_with_real_delay(self) -> None:
        """On the real reactor, a small start-up delay ends and /health turns 200."""
        url = self.serve(DemoSettings(startup_delay=0.2))
        codes: list[int] = []

        async def healthy() -> bool:
            code, _ = await self.get(url + "/health")
            codes.append(code)
            return code == 200

        deadline = reactor.seconds() + 10
        while not await healthy():
            self.assertLess(reactor.seconds(), deadline, "never became healthy")
            await task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(codes[0], 503)


class ChatTests(DemoServerMixin, TestCase):
    async def test_non_streaming(self) -> None:
        """A chat completion carries the reply, usage and llama.cpp timings."""
        url = self.serve(DemoSettings(model="m1", max_tokens_default=6))
        code, body = await self.post_json(
            url + "/v1/chat/completions",
            {"model": "alias-1", "messages": [{"role": "user", "content": "tell me a joke"}]},
        )
        self.assertEqual(code, 200)
        reply = json.loads(body)
        self.assertEqual(reply["object"], "chat.completion")
        self.assertEqual(reply["model"], "alias-1")
        choice = reply["choices"][0]
        self.assertEqual(choice["finish_reason"], "stop")
        self.assertEqual(choice["message"]["role"], "assistant")
        self.assertEqual(choice["message"]["content"], "Hello from demo model m1! I")
        usage = reply["usage"]
        self.assertEqual(
            usage,
            {
                "completion_tokens": 6,
                "prompt_tokens": 4,
                "total_tokens": 10,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        )
        timings = reply["timings"]
        self.assertEqual((timings["prompt_n"], timings["predicted_n"]), (4, 6))
        self.assertEqual(timings["cache_n"], 0)
        for key in ("prompt_ms", "prompt_per_second", "predicted_ms", "predicted_per_second"):
            self.assertGreater(timings[key], 0)

    async def test_max_tokens_and_cache(self) -> None:
        """max_tokens sets the length (finish "length"); a repeated prompt is cached."""
        url = self.serve(DemoSettings())
        request = {"messages": [{"role": "user", "content": "a b c"}], "max_tokens": 40}
        await self.post_json(url + "/v1/chat/completions", request)
        code, body = await self.post_json(url + "/v1/chat/completions", request)
        reply = json.loads(body)
        self.assertEqual(reply["choices"][0]["finish_reason"], "length")
        self.assertEqual(reply["usage"]["completion_tokens"], 40)
        self.assertEqual(reply["usage"]["prompt_tokens_details"]["cached_tokens"], 2)
        self.assertEqual(reply["timings"]["cache_n"], 2)

    async def test_streaming(self) -> None:
        """A streamed chat is a role delta, one delta per token, a final chunk, usage, [DONE]."""
        url = self.serve(DemoSettings(model="m1"))
        code, body = await self.post_json(
            url + "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_tokens": 5,
                "stream_options": {"include_usage": True},
            },
        )
        self.assertEqual(code, 200)
        events = sse_events(body)
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(event) for event in events[:-1]]
        self.assertEqual(len(chunks), 1 + 5 + 1 + 1)
        self.assertTrue(all(c["object"] == "chat.completion.chunk" for c in chunks))
        self.assertEqual(len({c["id"] for c in chunks}), 1)
        self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
        content = "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:6])
        self.assertEqual(content, "Hello from demo model m1!")
        final = chunks[6]
        self.assertEqual(final["choices"][0]["finish_reason"], "length")
        self.assertEqual(final["timings"]["predicted_n"], 5)
        self.assertNotIn("usage", final)
        usage_chunk = chunks[7]
        self.assertEqual(usage_chunk["choices"], [])
        self.assertEqual(usage_chunk["usage"]["completion_tokens"], 5)
        self.assertEqual(usage_chunk["usage"]["total_tokens"], 6)

    async def test_streaming_without_usage(self) -> None:
        """Without include_usage the stream has timings but no usage, like llama-server."""
        url = self.serve(DemoSettings(max_tokens_default=3))
        response = await self.http.post(
            url + "/v1/chat/completions",
            data=json.dumps(
                {"messages": [{"role": "user", "content": "hi"}], "stream": True}
            ).encode(),
        )
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        events = sse_events(await treq.content(response))
        chunks = [json.loads(event) for event in events[:-1]]
        self.assertEqual(len(chunks), 1 + 3 + 1)
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")
        self.assertIn("timings", chunks[-1])
        self.assertFalse(any("usage" in chunk for chunk in chunks))

    async def test_paced_response_waits_for_generation(self) -> None:
        """With tokens-per-second, a non-streamed reply comes after max_tokens/tps seconds."""
        clock = Clock()
        url = self.serve(DemoSettings(tokens_per_second=10.0), clock)
        pending = Deferred.fromCoroutine(
            self.post_json(
                url + "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
        )
        await poll_until(lambda: bool(clock.getDelayedCalls()))
        self.assertNoResult(pending)
        clock.advance(0.2)
        code, body = await pending
        self.assertEqual(code, 200)
        self.assertAlmostEqual(json.loads(body)["timings"]["predicted_per_second"], 10.0)


class CompletionTests(DemoServerMixin, TestCase):
    async def test_completion(self) -> None:
        """/v1/completions returns a text_completion with usage and timings."""
        url = self.serve(DemoSettings(model="m1"))
        code, body = await self.post_json(
            url + "/v1/completions", {"prompt": "once upon a time", "max_tokens": 3}
        )
        self.assertEqual(code, 200)
        reply = json.loads(body)
        self.assertEqual(reply["object"], "text_completion")
        self.assertEqual(reply["choices"][0]["text"], "Hello from demo")
        self.assertEqual(reply["usage"]["prompt_tokens"], 4)
        self.assertEqual(reply["usage"]["completion_tokens"], 3)
        self.assertEqual(reply["timings"]["predicted_n"], 3)

    async def test_streamed_completion_ends_with_usage(self) -> None:
        """A streamed /v1/completions always ends with usage, then [DONE]."""
        url = self.serve(DemoSettings())
        code, body = await self.post_json(
            url + "/v1/completions", {"prompt": "hi", "max_tokens": 4, "stream": True}
        )
        events = sse_events(body)
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(event) for event in events[:-1]]
        self.assertEqual(len(chunks), 5)
        self.assertEqual("".join(c["choices"][0]["text"] for c in chunks), "Hello from demo model")
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 4)
        self.assertEqual(chunks[-1]["timings"]["predicted_n"], 4)

    async def test_native_completion(self) -> None:
        """/completion speaks llama.cpp's own format, streamed without [DONE]."""
        url = self.serve(DemoSettings())
        code, body = await self.post_json(url + "/completion", {"prompt": "hi", "n_predict": 2})
        reply = json.loads(body)
        self.assertEqual((reply["content"], reply["stop"]), ("Hello from", True))
        self.assertEqual(reply["tokens_predicted"], 2)
        self.assertEqual(reply["timings"]["predicted_n"], 2)
        self.assertEqual(reply["usage"]["completion_tokens"], 2)

        code, body = await self.post_json(
            url + "/completion", {"prompt": "hi", "n_predict": 2, "stream": True}
        )
        chunks = [json.loads(event) for event in sse_events(body)]
        self.assertEqual([c["stop"] for c in chunks], [False, False, True])
        self.assertEqual("".join(c["content"] for c in chunks), "Hello from")
        self.assertIn("timings", chunks[-1])


class EmbeddingTests(DemoServerMixin, TestCase):
    async def test_deterministic(self) -> None:
        """The same input always gets the same vector; a list gets one per item."""
        url = self.serve(DemoSettings(model="m1"))
        _, first = await self.post_json(url + "/v1/embeddings", {"input": "hello world"})
        _, again = await self.post_json(url + "/v1/embeddings", {"input": ["hello world", "x"]})
        first_reply, again_reply = json.loads(first), json.loads(again)
        self.assertEqual(first_reply["object"], "list")
        self.assertEqual(first_reply["model"], "m1")
        self.assertEqual(first_reply["usage"], {"prompt_tokens": 2, "total_tokens": 2})
        vector = first_reply["data"][0]["embedding"]
        self.assertEqual(len(vector), 16)
        self.assertEqual(again_reply["data"][0]["embedding"], vector)
        self.assertNotEqual(again_reply["data"][1]["embedding"], vector)
        self.assertEqual([item["index"] for item in again_reply["data"]], [0, 1])

    async def test_base64(self) -> None:
        """encoding_format base64 packs the same vector as little-endian float32."""
        url = self.serve(DemoSettings())
        _, body = await self.post_json(
            url + "/v1/embeddings", {"input": "hello", "encoding_format": "base64"}
        )
        packed = base64.b64decode(json.loads(body)["data"][0]["embedding"])
        decoded = struct.unpack("<16f", packed)
        for got, want in zip(decoded, pseudo_embedding("hello"), strict=True):
            self.assertAlmostEqual(got, want, places=6)


class ErrorTests(DemoServerMixin, TestCase):
    async def test_bad_json(self) -> None:
        """A body that is not JSON gets a 400 OpenAI-style error."""
        url = self.serve(DemoSettings())
        response = await self.http.post(url + "/v1/chat/completions", data=b"{nope")
        self.assertEqual(response.code, 400)
        error = json.loads(await treq.content(response))["error"]
        self.assertEqual((error["code"], error["type"]), (400, "invalid_request_error"))
        self.assertIn("Invalid JSON", error["message"])

    async def test_invalid_requests(self) -> None:
        """Missing messages or prompt, and a bad max_tokens, are 400s."""
        url = self.serve(DemoSettings())
        for path, body in (
            ("/v1/chat/completions", {}),
            ("/v1/chat/completions", [1, 2]),
            ("/v1/chat/completions", {"messages": [{"content": "x"}], "max_tokens": "3"}),
            ("/v1/completions", {}),
            ("/v1/embeddings", {"input": ""}),
        ):
            code, reply = await self.post_json(url + path, body)
            self.assertEqual(code, 400, (path, body))
            self.assertEqual(json.loads(reply)["error"]["code"], 400)

    async def test_unknown_path_and_method(self) -> None:
        """An unknown path is a 404 JSON error; a wrong method is a 405 with Allow."""
        url = self.serve(DemoSettings())
        code, body = await self.get(url + "/v1/nothing")
        self.assertEqual(code, 404)
        self.assertEqual(json.loads(body)["error"]["type"], "not_found_error")
        response = await self.http.get(url + "/v1/chat/completions")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])
        await treq.content(response)


# --------------------------------------------------------------------------
# the real command, as a child process
# --------------------------------------------------------------------------


class _Child(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[BaseException] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value)


class CommandTests(DemoServerMixin, TestCase):
    timeout = 60

    async def test_python_m_demo(self) -> None:
        """`python -m llamaswap.demo` serves the OpenAI SDK and exits cleanly on SIGTERM."""
        child = _Child()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        process = reactor.spawnProcess(
            child,
            sys.executable,
            [
                sys.executable,
                "-m",
                "llamaswap.demo",
                "--port=0",
                "--model=child-model",
                "--startup-delay=0.3",
            ],
            env=env,
            path=ROOT,
        )

        def kill_if_running() -> None:
            if process.pid is not None:
                process.signalProcess("KILL")

        self.addCleanup(kill_if_running)

        listening = re.compile(rb"HTTP server is listening, hostname: 127\.0\.0\.1, port: (\d+)")
        await poll_until(lambda: listening.search(child.output) is not None, timeout=30)
        match = listening.search(child.output)
        assert match is not None
        url = f"http://127.0.0.1:{int(match.group(1))}"
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

        deadline = reactor.seconds() + 15
        while (await self.get(url + "/health"))[0] != 200:
            self.assertLess(reactor.seconds(), deadline, "the demo never became healthy")
            await task.deferLater(reactor, 0.02, lambda: None)

        def ask() -> Any:
            from openai import OpenAI

            client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)
            try:
                return client.chat.completions.create(
                    model="child-model", messages=[{"role": "user", "content": "hello"}]
                )
            finally:
                client.close()

        completion = await deferToThread(ask)
        self.assertIn("child-model", completion.choices[0].message.content)
        self.assertEqual(completion.usage.completion_tokens, 16)

        process.signalProcess("TERM")
        reason = await child.ended.addTimeout(15, reactor)
        self.assertIsInstance(reason, ProcessDone, child.output.decode(errors="replace"))
        self.assertIn(b"model loaded", child.output)
        self.assertIn(b"request: POST /v1/chat/completions 127.0.0.1 200", child.output)
