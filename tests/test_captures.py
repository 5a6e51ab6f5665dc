"""Tests for llamaswap.observe.captures: building, compressing, storing and reading captures."""

from __future__ import annotations

import base64
import gzip
import random
import threading
from collections.abc import Callable

import cbor2
import zstandard
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from llamaswap.observe.captures import (
    REDACTED,
    Capture,
    CaptureBuffer,
    CaptureCache,
    CaptureEncoder,
    CaptureFields,
    build_capture,
    fields_for,
    flatten_headers,
)
from llamaswap.observe.queries import ActivityLog
from llamaswap.observe.recording import ActivityRecorder
from llamaswap.observe.store import MemoryActivityStore
from llamaswap.observe.usage import Usage
from llamaswap.observe.usageparser import UsageParser
from tests.support import poll_until

REQ_BODY = b'{"model":"llama","messages":[{"role":"user","content":"hi"}]}'
RESP_BODY = b'{"choices":[{"message":{"content":"hello"}}],"usage":{"prompt_tokens":3}}'


def capture(id: int, resp_body: bytes | None = RESP_BODY, status: int = 200) -> Capture:
    return build_capture(
        id=id,
        req_path="/v1/chat/completions",
        req_headers={"Content-Type": "application/json", "Authorization": "Bearer sk-secret"},
        req_body=REQ_BODY,
        resp_status=status,
        resp_headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        resp_body=resp_body,
    )


def noise(size: int, seed: int) -> bytes:
    """Incompressible bytes, so compressed sizes are predictable."""
    return random.Random(seed).randbytes(size)


class BuildCaptureTests(SynchronousTestCase):
    """build_capture applies masks, redaction and the non-200 rule."""

    def test_redaction_of_sensitive_headers(self) -> None:
        """Credential headers are replaced by [REDACTED], whatever their case."""
        flat = flatten_headers(
            {
                "authorization": "Bearer sk-1",
                "PROXY-AUTHORIZATION": "Basic x",
                "Cookie": "a=b",
                "set-cookie": "c=d",
                "X-API-KEY": "k",
                "api-key": "azure",
                "x-goog-api-key": "g",
                "content-type": "application/json",
            }
        )
        self.assertEqual(
            flat,
            {
                "Authorization": REDACTED,
                "Proxy-Authorization": REDACTED,
                "Cookie": REDACTED,
                "Set-Cookie": REDACTED,
                "X-Api-Key": REDACTED,
                "Api-Key": REDACTED,
                "X-Goog-Api-Key": REDACTED,
                "Content-Type": "application/json",
            },
        )

    def test_twisted_headers_flatten_to_first_value(self) -> None:
        """A Twisted Headers object flattens to canonical names and first values."""
        headers = Headers(
            {
                b"accept": [b"text/event-stream", b"application/json"],
                b"x-api-key": [b"secret"],
            }
        )
        self.assertEqual(
            flatten_headers(headers),
            {"Accept": "text/event-stream", "X-Api-Key": REDACTED},
        )
        self.assertEqual(flatten_headers([(b"x-a", [b"1"]), ("X-A", "2")]), {"X-A": "1"})
        self.assertEqual(flatten_headers(None), {})

    def test_success_capture_keeps_everything(self) -> None:
        """A 200 capture on a chat path keeps all four parts; Content-Encoding is dropped."""
        built = capture(7)
        self.assertEqual(built.id, 7)
        self.assertEqual(built.req_body, REQ_BODY)
        self.assertEqual(built.resp_body, RESP_BODY)
        self.assertEqual(
            built.req_headers, {"Content-Type": "application/json", "Authorization": REDACTED}
        )
        self.assertEqual(built.resp_headers, {"Content-Type": "application/json"})

    def test_non_200_capture_has_no_response_body(self) -> None:
        """A failed request keeps request parts and response headers, never the body."""
        built = capture(8, resp_body=b'{"error":"boom"}', status=503)
        self.assertIsNone(built.resp_body)
        self.assertEqual(built.req_body, REQ_BODY)
        self.assertEqual(built.resp_headers, {"Content-Type": "application/json"})

    def test_path_masks(self) -> None:
        """Audio and image routes keep only the parts llama-swap keeps."""
        expected = {
            "/v1/audio/speech": (True, True, True, False),
            "/v1/audio/voices": (True, False, True, True),
            "/v1/audio/transcriptions": (True, False, True, True),
            "/v1/images/generations": (True, True, True, False),
            "/v1/images/edits": (True, False, True, False),
            "/sdapi/v1/txt2img": (True, True, True, False),
            "/sdapi/v1/img2img": (True, False, True, False),
            "/v1/embeddings": (True, True, True, True),
        }
        for path, kept in expected.items():
            built = build_capture(
                id=1,
                req_path=path,
                req_headers={"A": "b"},
                req_body=b"req",
                resp_status=200,
                resp_headers={"C": "d"},
                resp_body=b"resp",
            )
            present = (
                built.req_headers is not None,
                built.req_body is not None,
                built.resp_headers is not None,
                built.resp_body is not None,
            )
            self.assertEqual(present, kept, path)
        self.assertEqual(fields_for("/v1/chat/completions"), CaptureFields.ALL)

    def test_explicit_fields(self) -> None:
        """An explicit mask overrides the path's."""
        built = build_capture(
            id=1,
            req_path="/v1/chat/completions",
            req_headers={},
            req_body=b"x",
            resp_status=200,
            resp_headers={},
            resp_body=b"y",
            fields=CaptureFields.REQ_HEADERS,
        )
        self.assertEqual(
            (built.req_headers, built.req_body, built.resp_headers, built.resp_body),
            ({}, None, None, None),
        )


class CaptureBufferTests(SynchronousTestCase):
    """CaptureBuffer keeps a body up to its cap."""

    def test_cap_and_truncation(self) -> None:
        """Writes past the cap are cut and the buffer says it truncated."""
        buffer = CaptureBuffer(cap=10)
        buffer.write(b"12345")
        buffer.write(b"6789")
        self.assertFalse(buffer.truncated)
        buffer.write(b"abc")
        buffer.write(b"def")
        self.assertEqual(
            (buffer.getvalue(), len(buffer), buffer.truncated), (b"123456789a", 10, True)
        )

    def test_decoded_body_from_parser(self) -> None:
        """As the parser's decoded sink it captures the decompressed body."""
        buffer = CaptureBuffer()
        parser = UsageParser(
            "/v1/chat/completions", 200, "application/json", "gzip", decoded_sink=buffer.write
        )
        encoded = gzip.compress(RESP_BODY)
        parser.feed(encoded[:5])
        parser.feed(encoded[5:])
        self.assertEqual(parser.finish().tokens.input_tokens, 3)
        self.assertEqual(buffer.getvalue(), RESP_BODY)

    def test_truncated_body_is_marked_in_capture(self) -> None:
        """A truncated body is stored as far as it went and flagged in the capture."""
        buffer = CaptureBuffer(cap=4)
        buffer.write(b"abcdefgh")
        built = build_capture(
            id=3,
            req_path="/v1/completions",
            req_headers={},
            req_body=b"",
            resp_status=200,
            resp_headers={},
            resp_body=buffer,
        )
        cache = CaptureCache(1 << 20)
        self.assertTrue(cache.add(built))
        stored = cache.get(3)
        assert stored is not None
        self.assertEqual(base64.b64decode(stored["resp_body"]), b"abcd")
        self.assertIs(stored["resp_body_truncated"], True)
        self.assertEqual(stored["req_body"], "")


class CaptureCacheTests(SynchronousTestCase):
    """CaptureCache stores zstd CBOR under a byte budget."""

    def test_round_trip(self) -> None:
        """get() returns the capture with bodies as base64 strings and nulls for absent parts."""
        cache = CaptureCache(1 << 20)
        self.assertTrue(cache.add(capture(1)))
        self.assertTrue(cache.add(capture(2, status=500)))
        self.assertEqual(
            cache.get(1),
            {
                "id": 1,
                "req_path": "/v1/chat/completions",
                "req_headers": {"Content-Type": "application/json", "Authorization": REDACTED},
                "req_body": base64.b64encode(REQ_BODY).decode(),
                "resp_headers": {"Content-Type": "application/json"},
                "resp_body": base64.b64encode(RESP_BODY).decode(),
            },
        )
        failed = cache.get(2)
        assert failed is not None
        self.assertIsNone(failed["resp_body"])
        self.assertIsNone(cache.get(99))

    def test_stored_form_is_zstd_cbor(self) -> None:
        """The stored bytes are a zstd frame holding a CBOR map with byte-string bodies."""
        cache = CaptureCache(1 << 20)
        cache.add(capture(5))
        data = cache.compressed(5)
        assert data is not None
        self.assertEqual(data[:4], b"\x28\xb5\x2f\xfd")
        record = cbor2.loads(zstandard.ZstdDecompressor().decompress(data))
        self.assertEqual(record["resp_body"], RESP_BODY)
        self.assertEqual(cache.size, len(data))

    def test_fifo_eviction_by_compressed_size(self) -> None:
        """The oldest captures go first until a new one fits the budget."""
        cache = CaptureCache(budget_bytes=10_000)
        for i in range(1, 4):
            self.assertTrue(cache.add(capture(i, resp_body=noise(3000, i))))
        self.assertEqual(len(cache), 3)
        self.assertTrue(cache.add(capture(4, resp_body=noise(3000, 4))))
        self.assertNotIn(1, cache)
        self.assertEqual([i for i in range(1, 5) if cache.has(i)], [2, 3, 4])
        self.assertLessEqual(cache.size, 10_000)
        self.assertTrue(cache.add(capture(5, resp_body=noise(6500, 5))))
        self.assertEqual([i for i in range(1, 6) if i in cache], [4, 5])
        self.assertLessEqual(cache.size, 10_000)

    def test_oversized_capture_is_rejected(self) -> None:
        """A capture larger than the whole budget is refused and evicts nothing."""
        cache = CaptureCache(budget_bytes=5_000)
        self.assertTrue(cache.add(capture(1)))
        before = cache.size
        self.assertFalse(cache.add(capture(2, resp_body=noise(6000, 2))))
        self.assertNotIn(2, cache)
        self.assertIn(1, cache)
        self.assertEqual(cache.size, before)

    def test_compressible_body_larger_than_budget_fits(self) -> None:
        """The budget counts compressed bytes, so a repetitive large body can fit."""
        cache = CaptureCache(budget_bytes=5_000)
        self.assertTrue(cache.add(capture(1, resp_body=b"a" * 100_000)))

    def test_replacing_an_id(self) -> None:
        """Adding the same id again replaces it and its size."""
        cache = CaptureCache(budget_bytes=10_000)
        cache.add(capture(1, resp_body=noise(3000, 1)))
        cache.add(capture(1, resp_body=b"small"))
        self.assertEqual(len(cache), 1)
        self.assertEqual(cache.size, len(cache.compressed(1) or b""))

    def test_activity_rows_see_evictions(self) -> None:
        """With the cache as the log's predicate, evicted captures read has_capture false."""
        cache = CaptureCache(budget_bytes=4_000)
        log = ActivityLog(has_capture=cache.has)
        for i in range(3):
            entry = log.add(
                model="m",
                req_path="/v1/chat/completions",
                resp_content_type="application/json",
                resp_status_code=200,
                usage=Usage(),
                wall_ms=1,
                timestamp=float(i),
            )
            self.assertTrue(cache.add(capture(entry.id, resp_body=noise(1500, i))))
        self.assertEqual([r.has_capture for r in log.recent()], [False, True, True])


class CountingPool(ThreadPool):
    """A real pool that counts the jobs it is given."""

    jobs = 0

    def callInThreadWithCallback(self, *args: object, **kwargs: object) -> None:
        self.jobs += 1
        super().callInThreadWithCallback(*args, **kwargs)  # type: ignore[arg-type]


class CaptureEncoderTests(TestCase):
    """Captures are encoded off the reactor thread, through a bounded queue
    (issue 11.7)."""

    def built(self, id: int, threads: list[threading.Thread]) -> Callable[[], Capture]:
        def build() -> Capture:
            threads.append(threading.current_thread())
            return capture(id)

        return build

    async def test_encoded_in_the_pool_then_stored(self) -> None:
        """``add_later`` builds and compresses in a pool thread, then stores
        on the reactor thread; the Deferred fires once it is stored."""
        encoder = CaptureEncoder(reactor)
        self.addCleanup(encoder.stop)
        cache = CaptureCache(1 << 20, encoder)
        threads: list[threading.Thread] = []
        await cache.add_later(7, "/v1/chat/completions", self.built(7, threads))
        same = CaptureCache(1 << 20)
        same.add(capture(7))
        self.assertEqual(cache.get(7), same.get(7))
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.main_thread())

    async def test_full_queue_drops_with_a_log_line(self) -> None:
        """While ``max_pending`` captures wait, another is dropped: counted,
        logged, and its Deferred fires at once; the waiting ones are stored
        once the pool runs."""
        pool = ThreadPool(0, 1, name="test-captures")  # not started: jobs wait
        encoder = CaptureEncoder(reactor, max_pending=2, pool=pool)
        cache = CaptureCache(1 << 20, encoder)
        threads: list[threading.Thread] = []
        waiting = [cache.add_later(i, "/v1/completions", self.built(i, threads)) for i in (1, 2)]
        with capturedLogs() as events:
            dropped = cache.add_later(3, "/v1/completions", self.built(3, threads))
        self.assertTrue(dropped.called)
        self.assertEqual(cache.dropped, 1)
        self.assertEqual(encoder.pending, 2)
        self.assertEqual(len(events), 1)
        self.assertIn("capture 3 for /v1/completions dropped", formatEvent(events[0]))
        self.assertEqual(events[0]["log_level"], LogLevel.warn)
        self.assertEqual(threads, [])
        pool.start()
        self.addCleanup(pool.stop)
        for d in waiting:
            await d
        self.assertEqual([i for i in (1, 2, 3) if i in cache], [1, 2])
        self.assertEqual(encoder.pending, 0)
        await cache.add_later(4, "/v1/completions", self.built(4, threads))  # room again
        self.assertIn(4, cache)

    async def test_stop_ends_the_threads(self) -> None:
        """``close`` (service stop) stops the pool's threads; later captures
        are not encoded (and not counted as dropped)."""
        encoder = CaptureEncoder(reactor)
        cache = CaptureCache(1 << 20, encoder)
        await cache.add_later(1, "/v1/completions", lambda: capture(1))
        self.assertTrue(any("llamaswap-captures" in t.name for t in threading.enumerate()))
        cache.close()
        self.assertFalse(any("llamaswap-captures" in t.name for t in threading.enumerate()))
        await cache.add_later(2, "/v1/completions", lambda: capture(2))
        self.assertNotIn(2, cache)
        self.assertEqual(cache.dropped, 0)

    async def test_captures_close_together_go_as_one_batch(self) -> None:
        """Captures submitted within the batch window reach the pool as one
        job and come back together; each is stored as if encoded alone."""
        pool = CountingPool(0, 2, name="test-batches")
        pool.start()
        self.addCleanup(pool.stop)
        cache = CaptureCache(1 << 20, CaptureEncoder(reactor, pool=pool, batch_delay=0.05))
        stored = [
            cache.add_later(i, "/v1/completions", lambda i=i: capture(i, resp_body=noise(300, i)))
            for i in range(1, 6)
        ]
        for d in stored:
            await d
        self.assertEqual(pool.jobs, 1)
        alone = CaptureCache(1 << 20)
        for i in range(1, 6):
            alone.add(capture(i, resp_body=noise(300, i)))
            self.assertEqual(cache.get(i), alone.get(i))

    async def test_a_full_batch_goes_at_once(self) -> None:
        """``batch_size`` captures go to the pool without waiting out the
        window (and the window's timer is cancelled)."""
        pool = CountingPool(0, 1, name="test-batches")
        pool.start()
        self.addCleanup(pool.stop)
        encoder = CaptureEncoder(reactor, pool=pool, batch_delay=3600, batch_size=3)
        cache = CaptureCache(1 << 20, encoder)
        stored = [cache.add_later(i, "/v1/completions", lambda i=i: capture(i)) for i in (1, 2, 3)]
        for d in stored:
            await d
        self.assertEqual(pool.jobs, 1)
        self.assertEqual([i in cache for i in (1, 2, 3)], [True, True, True])
        self.assertEqual(encoder.pending, 0)

    async def test_one_failing_capture_spares_its_batch(self) -> None:
        """A capture whose building fails is logged; the others in its batch
        are stored."""

        def broken() -> Capture:
            raise ValueError("no body")

        encoder = CaptureEncoder(reactor)
        self.addCleanup(encoder.stop)
        cache = CaptureCache(1 << 20, encoder)
        with capturedLogs() as events:
            stored = [
                cache.add_later(1, "/v1/completions", lambda: capture(1)),
                cache.add_later(2, "/v1/completions", broken),
                cache.add_later(3, "/v1/completions", lambda: capture(3)),
            ]
            for d in stored:
                await d
        self.assertEqual([i in cache for i in (1, 2, 3)], [True, False, True])
        self.assertEqual(encoder.pending, 0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertIn("capture 2 for /v1/completions", formatEvent(events[-1]))

    async def test_too_large_is_logged(self) -> None:
        """A capture larger than the whole budget is logged, not stored."""
        encoder = CaptureEncoder(reactor)
        self.addCleanup(encoder.stop)
        cache = CaptureCache(100, encoder)
        with capturedLogs() as events:
            await cache.add_later(1, "/v1/completions", lambda: capture(1))
        self.assertNotIn(1, cache)
        self.assertIn("exceeds captureBuffer", formatEvent(events[-1]))


class _Response:
    """What ``Recording.on_response`` reads of an upstream response."""

    code = 200
    headers = Headers({b"content-type": [b"application/json"]})


class RecorderCaptureTests(TestCase):
    async def test_activity_announced_once_its_capture_is_stored(self) -> None:
        """The activity row is stored at once; its capture is encoded in the
        pool, and the activity is announced only once the capture is there
        (a UI that follows the event finds it)."""
        pool = ThreadPool(0, 1, name="test-recorder")
        cache = CaptureCache(1 << 20, CaptureEncoder(reactor, pool=pool))
        store = MemoryActivityStore(ActivityLog(has_capture=cache.has))
        announced: list[int] = []
        clock = Clock()
        recorder = ActivityRecorder(clock, store, cache, on_entry=lambda e: announced.append(e.id))
        recording = recorder.begin(
            model="m",
            req_path="/v1/chat/completions",
            req_headers=Headers({b"authorization": [b"Bearer sk-secret"]}),
            req_body=REQ_BODY,
        )
        recording.on_response(_Response())(RESP_BODY)  # type: ignore[arg-type]
        recording.finish()
        clock.advance(0)
        clock.advance(0)
        rows = store.log.recent()
        self.assertEqual(len(rows), 1)
        self.assertFalse(rows[0].has_capture)
        self.assertEqual(announced, [])
        pool.start()
        self.addCleanup(pool.stop)
        await poll_until(lambda: bool(announced))
        self.assertEqual(announced, [rows[0].id])
        stored = cache.get(rows[0].id)
        assert stored is not None
        self.assertEqual(stored["req_headers"], {"Authorization": REDACTED})
        self.assertEqual(base64.b64decode(stored["resp_body"]), RESP_BODY)
