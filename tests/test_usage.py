"""Tests for reading token usage out of responses: llamaswap.observe.usageparser,
with its byte readers (observe.bodies) and JSON extraction (observe.usage)."""

from __future__ import annotations

import gzip
import json
import os
import random
import zlib
from collections.abc import Iterable, Iterator

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.observe.bodies import (
    INFLATE_PIECE,
    JSON_CAP,
    SSE_LINE_CAP,
    TAIL_CAP,
    narrow_accept_encoding,
)
from llamaswap.observe.usage import TokenMetrics, Usage, last_object_for
from llamaswap.observe.usageparser import UsageParser
from tests.test_activity import tokens

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "activity")
SSE = "text/event-stream"
JSON = "application/json"


def fixture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


def parse(
    chunks: Iterable[bytes],
    path: str = "/v1/chat/completions",
    status: int = 200,
    content_type: str = JSON,
    content_encoding: str = "",
) -> Usage:
    parser = UsageParser(path, status, content_type, content_encoding)
    for chunk in chunks:
        parser.feed(chunk)
    return parser.finish()


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


class ApiStyleTests(SynchronousTestCase):
    """Token figures from real-shaped bodies of every supported API style."""

    def test_openai_chat_stream_with_include_usage(self) -> None:
        """The final usage chunk of a chat stream gives input, output and cached tokens."""
        usage = parse([fixture("openai_chat_stream_usage.sse")], content_type=SSE)
        self.assertEqual(usage, Usage(tokens=tokens(1187, 42, cache=1024)))

    def test_openai_chat_stream_without_usage(self) -> None:
        """A stream without usage gives the minimal row (all zero) and a warning."""
        usage = parse([fixture("openai_chat_stream_no_usage.sse")], content_type=SSE)
        self.assertEqual(usage.tokens, TokenMetrics())
        self.assertEqual(usage.error_msg, "")
        self.assertIn("no usage", usage.warning)

    def test_openai_chat_json(self) -> None:
        """A non-streaming chat completion reads top-level usage; cached 0 is kept."""
        usage = parse([fixture("openai_chat.json")])
        self.assertEqual(usage, Usage(tokens=tokens(1117, 46, cache=0)))

    def test_completions_json(self) -> None:
        """A legacy completion without cache details reports cached −1."""
        usage = parse([fixture("openai_completions.json")], path="/v1/completions")
        self.assertEqual(usage, Usage(tokens=tokens(5, 7)))

    def test_completions_stream(self) -> None:
        """A legacy completion stream takes usage from its last chunk."""
        usage = parse(
            [fixture("openai_completions_stream.sse")], path="/v1/completions", content_type=SSE
        )
        self.assertEqual(usage, Usage(tokens=tokens(5, 4)))

    def test_responses_api_stream(self) -> None:
        """Responses API events carry usage at response.usage with input_tokens_details."""
        usage = parse([fixture("responses_stream.sse")], path="/v1/responses", content_type=SSE)
        self.assertEqual(usage, Usage(tokens=tokens(37, 11, cache=12)))

    def test_anthropic_messages_stream(self) -> None:
        """message_start gives input and cache reads; message_delta's output overrides."""
        usage = parse(
            [fixture("anthropic_messages_stream.sse")],
            path="/v1/messages",
            content_type="text/event-stream; charset=utf-8",
        )
        self.assertEqual(usage, Usage(tokens=tokens(472, 15, cache=2048)))

    def test_anthropic_messages_json(self) -> None:
        """A non-streaming Anthropic message reads input/output/cache_read tokens."""
        usage = parse([fixture("anthropic_messages.json")], path="/v1/messages")
        self.assertEqual(usage, Usage(tokens=tokens(2095, 503, cache=1800)))

    def test_llamacpp_stream_timings(self) -> None:
        """llama.cpp timings override usage: counts, speeds, cache_n, drafts, duration."""
        usage = parse([fixture("llamacpp_chat_stream_timings.sse")], content_type=SSE)
        self.assertEqual(
            usage,
            Usage(
                tokens=tokens(54, 58, 256, 881.86, 46.98, draft=40, accepted=31),
                timings_duration_ms=1295,
            ),
        )
        self.assertEqual(usage.duration_ms(100), 1295)
        self.assertEqual(usage.duration_ms(5000), 5000)

    def test_llamacpp_completion_json(self) -> None:
        """The native /completion body's timings are read; without drafts they stay −1."""
        usage = parse([fixture("llamacpp_completion.json")], path="/completion")
        self.assertEqual(usage, Usage(tokens=tokens(9, 3, 2, 592.1, 74.07), timings_duration_ms=55))

    def test_timings_draft_needs_both_counts(self) -> None:
        """draft_n without draft_n_accepted leaves both draft figures at −1."""
        body = json.dumps({"timings": {"prompt_n": 1, "predicted_n": 2, "draft_n": 5}})
        usage = parse([body.encode()])
        self.assertEqual((usage.tokens.draft_tokens, usage.tokens.draft_acc_tokens), (-1, -1))
        self.assertEqual(usage.tokens.cache_tokens, -1)

    def test_infill_array_timings_from_last_element(self) -> None:
        """/infill answers with an array; timings come from its last element."""
        usage = parse([fixture("infill.json")], path="/infill")
        self.assertEqual(
            usage, Usage(tokens=tokens(20, 9, 8, 666.7, 75.0), timings_duration_ms=150)
        )

    def test_array_outside_infill_has_no_usage(self) -> None:
        """An array body on another path gives the minimal row."""
        usage = parse([fixture("infill.json")], path="/v1/completions")
        self.assertEqual(usage.tokens, TokenMetrics())

    def test_vllm_metrics_json(self) -> None:
        """vLLM metrics give draft counts and speeds from TTFT and mean ITL."""
        usage = parse([fixture("vllm_chat.json")])
        self.assertEqual(
            usage, Usage(tokens=tokens(120, 10, 80, 2000.0, 80.0, draft=24, accepted=17))
        )

    def test_vllm_metrics_stream(self) -> None:
        """In a stream, metrics of the last chunk count; half a spec-decoding object is ignored."""
        usage = parse([fixture("vllm_chat_stream.sse")], content_type=SSE)
        self.assertEqual(usage, Usage(tokens=tokens(64, 2, -1, 1280.0, 125.0)))

    def test_later_events_override_only_informative_values(self) -> None:
        """Zero input/output never overwrite earlier counts; cached ≥ 0 does."""
        stream = (
            b'data: {"usage":{"prompt_tokens":10,"completion_tokens":3,'
            b'"prompt_tokens_details":{"cached_tokens":4}}}\n\n'
            b'data: {"usage":{"prompt_tokens":0,"completion_tokens":0,'
            b'"prompt_tokens_details":{"cached_tokens":0}}}\n\n'
        )
        self.assertEqual(parse([stream], content_type=SSE).tokens, tokens(10, 3, cache=0))

    def test_stream_skips_non_data_and_bad_json(self) -> None:
        """Comments, event lines, [DONE] and non-JSON data lines are skipped."""
        stream = (
            b": keep-alive\n"
            b"event: x\n"
            b'data: not json {"usage": 1}\n'
            b'data: {"usage": {"prompt_tokens": NaN}}\n'
            b"data:[DONE]\n"
            b'data:{"usage":{"input_tokens":7,"output_tokens":8}}'
        )
        self.assertEqual(parse([stream], content_type=SSE).tokens, tokens(7, 8))

    def test_nonfinite_speed_is_unknown(self) -> None:
        """A huge float speed that overflows to infinity is recorded as −1."""
        body = b'{"timings":{"prompt_n":1,"predicted_n":1,"prompt_per_second":1e400}}'
        self.assertEqual(parse([body]).tokens.prompt_per_second, -1.0)

    def test_empty_and_non_json_bodies(self) -> None:
        """Empty, invalid and binary bodies give the minimal row with a warning only."""
        for body in (b"", b"{not json", b"\x00\x01RIFF....WAVEfmt ", b'"just a string"'):
            usage = parse([body] if body else [], path="/v1/audio/speech")
            self.assertEqual(usage.tokens, TokenMetrics())
            self.assertEqual(usage.error_msg, "")
            self.assertTrue(usage.warning)

    def test_finish_is_idempotent_and_feed_after_finish_ignored(self) -> None:
        """finish() returns the same value twice; later chunks change nothing."""
        parser = UsageParser("/v1/chat/completions", 200, JSON, "")
        parser.feed(fixture("openai_completions.json"))
        first = parser.finish()
        parser.feed(b"garbage")
        self.assertIs(parser.finish(), first)


class ChunkBoundaryTests(SynchronousTestCase):
    """Results do not depend on where the body is split into chunks."""

    def assert_split_invariant(self, body: bytes, **kwargs: str) -> None:
        whole = parse([body], **kwargs)
        for i in range(len(body) + 1):
            self.assertEqual(parse([body[:i], body[i:]], **kwargs), whole, f"split at {i}")
        self.assertEqual(parse([body[i : i + 1] for i in range(len(body))], **kwargs), whole)
        rng = random.Random(1234)
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(body)), 6))
            pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
            self.assertEqual(parse(pieces, **kwargs), whole)

    def test_anthropic_stream_split_at_every_byte(self) -> None:
        """The Anthropic stream parses identically when split at every byte position."""
        body = fixture("anthropic_messages_stream.sse")
        self.assert_split_invariant(body, path="/v1/messages", content_type=SSE)
        self.assertEqual(
            parse([body], path="/v1/messages", content_type=SSE).tokens,
            tokens(472, 15, cache=2048),
        )

    def test_crlf_stream_split_at_every_byte(self) -> None:
        """CRLF line endings work and split anywhere (even between CR and LF)."""
        body = fixture("llamacpp_chat_stream_timings.sse").replace(b"\n", b"\r\n")
        self.assert_split_invariant(body, content_type=SSE)
        self.assertEqual(parse([body], content_type=SSE).tokens.draft_acc_tokens, 31)

    def test_json_body_split_at_every_byte(self) -> None:
        """A JSON body with leading whitespace parses the same however it is split."""
        body = b"  \n" + fixture("vllm_chat.json")
        self.assert_split_invariant(body)

    def test_gzip_stream_split_at_every_byte(self) -> None:
        """A gzip-encoded stream decodes incrementally whatever the split."""
        body = gzip.compress(fixture("responses_stream.sse"))
        self.assert_split_invariant(
            body, path="/v1/responses", content_type=SSE, content_encoding="gzip"
        )
        self.assertEqual(
            parse([body], path="/v1/responses", content_type=SSE, content_encoding="gzip").tokens,
            tokens(37, 11, cache=12),
        )


class EncodingTests(SynchronousTestCase):
    """Content-Encoding gzip and deflate are decoded as the body streams."""

    def test_gzip_json(self) -> None:
        """A gzip JSON body is decoded; the header value is case- and space-insensitive."""
        body = gzip.compress(fixture("openai_chat.json"))
        usage = parse([body[:10], body[10:]], content_encoding=" GZIP ")
        self.assertEqual(usage.tokens, tokens(1117, 46, cache=0))

    def test_deflate_zlib_wrapped(self) -> None:
        """deflate as RFC 9110 means it (zlib-wrapped) is decoded."""
        body = zlib.compress(fixture("anthropic_messages_stream.sse"))
        usage = parse([body], content_type=SSE, content_encoding="deflate")
        self.assertEqual(usage.tokens, tokens(472, 15, cache=2048))

    def test_deflate_raw(self) -> None:
        """deflate sent as a raw DEFLATE stream (no zlib header) is decoded too."""
        body = raw_deflate(fixture("vllm_chat.json"))
        usage = parse([body[:1], body[1:]], content_encoding="deflate")
        self.assertEqual(usage.tokens.draft_tokens, 24)

    def test_multi_member_gzip(self) -> None:
        """Concatenated gzip members are decoded in turn, even across chunks."""
        text = fixture("openai_chat_stream_usage.sse")
        body = gzip.compress(text[:300]) + gzip.compress(text[300:])
        for split in range(0, len(body) + 1, 7):
            usage = parse([body[:split], body[split:]], content_type=SSE, content_encoding="gzip")
            self.assertEqual(usage.tokens, tokens(1187, 42, cache=1024))

    def test_corrupt_gzip(self) -> None:
        """A body that is not gzip gives the minimal row with a decompression error."""
        usage = parse([b"this is not gzip at all"], content_encoding="gzip")
        self.assertEqual(usage.tokens, TokenMetrics())
        self.assertTrue(usage.error_msg.startswith("response decompression failed: "))

    def test_truncated_gzip(self) -> None:
        """A gzip body cut short fails as llama-swap's reader does (unexpected EOF)."""
        body = gzip.compress(fixture("openai_chat.json"))
        usage = parse([body[:-12]], content_encoding="gzip")
        self.assertEqual(usage.error_msg, "response decompression failed: unexpected EOF")
        self.assertEqual(usage.tokens, TokenMetrics())

    def test_empty_compressed_body(self) -> None:
        """An empty body with an encoding is just empty, not a decompression failure."""
        usage = parse([], content_encoding="gzip")
        self.assertEqual((usage.tokens, usage.error_msg), (TokenMetrics(), ""))

    def test_unknown_encoding_is_passed_through(self) -> None:
        """An encoding we cannot decode is parsed as is (and so usually yields nothing)."""
        usage = parse([fixture("openai_completions.json")], content_encoding="identity")
        self.assertEqual(usage.tokens, tokens(5, 7))

    def test_decompression_output_comes_in_bounded_pieces(self) -> None:
        """A tiny compressed chunk expanding 1000-fold is decoded in bounded pieces."""
        pieces: list[int] = []
        body = gzip.compress(b"{" + b" " * (20 * 1024 * 1024) + b'"usage":{"prompt_tokens":3}}')
        parser = UsageParser(
            "/v1/chat/completions", 200, JSON, "gzip", decoded_sink=lambda d: pieces.append(len(d))
        )
        parser.feed(body)
        self.assertLessEqual(max(pieces), INFLATE_PIECE)
        self.assertLessEqual(parser.buffered_bytes, JSON_CAP)
        self.assertEqual(parser.finish().tokens.input_tokens, 3)


class BoundedMemoryTests(SynchronousTestCase):
    """Internal buffers never grow with the response size."""

    def test_fifty_megabyte_json_body(self) -> None:
        """A 50 MB JSON body keeps ≤ JSON_CAP, then ≤ TAIL_CAP, and usage is found in the tail."""
        head = b'{"id":"x","choices":[{"message":{"content":"'
        tail = (
            b'"}}],"usage":{"prompt_tokens":123,"completion_tokens":45678,'
            b'"prompt_tokens_details":{"cached_tokens":100}},'
            b'"timings":{"prompt_n":123,"predicted_n":45678,"prompt_per_second":900.5,'
            b'"predicted_per_second":33.25,"prompt_ms":100,"predicted_ms":1400000}}'
        )
        filler = (b'lorem ipsum \\"usage\\": {} dolor ' * 2048)[: 64 * 1024]
        total = 50 * 1024 * 1024

        def chunks() -> Iterator[bytes]:
            yield head
            sent = len(head)
            while sent < total:
                yield filler
                sent += len(filler)
            yield tail

        parser = UsageParser("/v1/chat/completions", 200, JSON, "")
        peak = 0
        for chunk in chunks():
            parser.feed(chunk)
            peak = max(peak, parser.buffered_bytes)
            if parser.received_bytes > JSON_CAP + len(chunk):
                self.assertLessEqual(parser.buffered_bytes, TAIL_CAP)
        self.assertLessEqual(peak, JSON_CAP)
        self.assertGreater(parser.received_bytes, total)
        usage = parser.finish()
        self.assertEqual(usage.tokens, tokens(123, 45678, 100, 900.5, 33.25))
        self.assertEqual(usage.timings_duration_ms, 1400100)

    def test_big_body_without_usage_in_tail(self) -> None:
        """A body over the cap with no usage in its tail gives the minimal row."""
        parser = UsageParser("/v1/chat/completions", 200, JSON, "")
        parser.feed(b"[" + b"1," * (JSON_CAP // 2 + 10))
        parser.feed(b"1]")
        self.assertLessEqual(parser.buffered_bytes, TAIL_CAP)
        usage = parser.finish()
        self.assertEqual(usage.tokens, TokenMetrics())
        self.assertIn("tail", usage.warning)

    def test_large_event_stream(self) -> None:
        """A 20 MB stream with a 3 MB event line keeps at most one capped line."""
        event = b'data: {"choices":[{"delta":{"content":"' + b"y" * 8000 + b'"}}]}\n\n'
        giant = b'data: {"usage":{"prompt_tokens":999999},"pad":"' + b"z" * (3 << 20) + b'"}\n'
        final = b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":22}}\n\n'
        parser = UsageParser("/v1/chat/completions", 200, SSE, "")
        peak = 0

        def feed(data: bytes) -> None:
            nonlocal peak
            for i in range(0, len(data), 4096):
                parser.feed(data[i : i + 4096])
                peak = max(peak, parser.buffered_bytes)

        for _ in range(1200):
            feed(event)
        feed(giant)
        for _ in range(1200):
            feed(event)
        feed(final + b"data: [DONE]\n\n")
        self.assertLessEqual(peak, SSE_LINE_CAP)
        self.assertEqual(parser.finish().tokens, tokens(11, 22))

    def test_binary_body_is_not_kept(self) -> None:
        """A body that cannot be JSON is not buffered at all."""
        parser = UsageParser("/v1/audio/speech", 200, "audio/mpeg", "")
        parser.feed(b"ID3\x04\x00" + b"\xff" * 100000)
        self.assertEqual(parser.buffered_bytes, 0)

    def test_last_object_for_takes_last_complete_object(self) -> None:
        """The tail search skips usage-like text in strings and takes the last real object."""
        tail = (
            b'xt ends here, \\"usage\\": {\\"prompt_tokens\\": 1}"}],'
            b'"usage" : {"prompt_tokens":5},"x":{"usage":{"prompt_tokens":9,"n":{"a":"}"}}}}'
        )
        self.assertEqual(last_object_for(tail, "usage"), {"prompt_tokens": 9, "n": {"a": "}"}})
        self.assertIsNone(last_object_for(b'"usage":{"prompt_tokens":1', "usage"))
        self.assertIsNone(last_object_for(b'"usage": 5', "usage"))


class ErrorResponseTests(SynchronousTestCase):
    """Non-200 responses: zero tokens and a readable error_msg."""

    def error_for(self, body: bytes, status: int, encoding: str = "") -> str:
        usage = parse([body], status=status, content_encoding=encoding)
        self.assertEqual(usage.tokens, TokenMetrics())
        return usage.error_msg

    def test_error_message_paths(self) -> None:
        """error.message, error, message and detail are tried in that order."""
        cases = [
            ("error_openai.json", 400, "This model's maximum context length is 8192 tokens."),
            ("error_llamacpp.json", 503, "Loading model"),
            ("error_string.json", 404, "model 'foo' not found, try pulling it first"),
            ("error_message.json", 404, "The model `bar` does not exist."),
            ("error_detail.json", 404, "Not Found"),
            ("error_anthropic.json", 529, "Overloaded"),
        ]
        for name, status, expected in cases:
            self.assertTrue(self.error_for(fixture(name), status).startswith(expected), name)

    def test_blank_messages_fall_through(self) -> None:
        """A blank or non-string value is skipped in favour of the next path."""
        body = b'{"error": {"message": "   "}, "message": 42, "detail": " real one "}'
        self.assertEqual(self.error_for(body, 422), "real one")

    def test_status_text_fallback(self) -> None:
        """Without a message the status and its reason phrase are used."""
        self.assertEqual(self.error_for(b"<html>bad gateway</html>", 502), "502 Bad Gateway")
        self.assertEqual(self.error_for(b"", 500), "500 Internal Server Error")
        self.assertEqual(self.error_for(b'{"error": {"code": 1}}', 503), "503 Service Unavailable")
        self.assertEqual(self.error_for(b"{}", 599), "HTTP 599")

    def test_long_message_is_cut(self) -> None:
        """Messages over 500 characters are cut to 500 plus '...'."""
        body = json.dumps({"error": {"message": "e" * 2000}}).encode()
        self.assertEqual(self.error_for(body, 400), "e" * 500 + "...")

    def test_compressed_error_body(self) -> None:
        """A gzip or deflate error body is decoded before the message is looked up."""
        self.assertEqual(
            self.error_for(gzip.compress(fixture("error_llamacpp.json")), 503, "gzip"),
            "Loading model",
        )
        self.assertEqual(
            self.error_for(raw_deflate(fixture("error_detail.json")), 404, "deflate"),
            "Not Found",
        )

    def test_undecodable_error_body(self) -> None:
        """A corrupt encoded error body is reported as a decode failure."""
        message = self.error_for(b"definitely not gzip", 500, "gzip")
        self.assertTrue(message.startswith("response decode failed: "), message)

    def test_error_event_stream_is_not_parsed_for_usage(self) -> None:
        """A non-200 event stream gets zero tokens and the status text."""
        usage = parse([fixture("openai_chat_stream_usage.sse")], status=500, content_type=SSE)
        self.assertEqual(
            (usage.tokens, usage.error_msg), (TokenMetrics(), "500 Internal Server Error")
        )


class AcceptEncodingTests(SynchronousTestCase):
    """narrow_accept_encoding keeps only what the parser can decode."""

    def test_narrowing(self) -> None:
        """gzip/deflate entries survive with their parameters; others go."""
        self.assertEqual(narrow_accept_encoding(b"gzip, deflate, br, zstd"), b"gzip, deflate")
        self.assertEqual(
            narrow_accept_encoding(b"br;q=1.0, GZip;q=0.8 ,zstd, deflate ; q=0.1"),
            b"GZip;q=0.8, deflate ; q=0.1",
        )
        self.assertEqual(narrow_accept_encoding(b"br, *"), b"")
        self.assertIsNone(narrow_accept_encoding(None))
        self.assertEqual(narrow_accept_encoding(b""), b"")
