"""The generating endpoints: OpenAI chat and text completions and
llama.cpp's native ``/completion``, answered whole or streamed as SSE."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from llamaswap.demo.model import BUILD_INFO, DemoModel, dumps, make_timings, make_usage
from llamaswap.demo.stream import TokenStream
from llamaswap.demo.web import (
    SSE_TYPE,
    BadRequest,
    json_response,
    read_body,
    requested_model,
    requested_tokens,
)


def _message_words(messages: list[Any]) -> list[str]:
    words: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object")
        content = message.get("content")
        if isinstance(content, str):
            words.extend(content.split())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    words.extend(part["text"].split())
    return words


def _prompt_words(prompt: object) -> list[str]:
    """Words of a completion prompt: a string, a token list, or a one-item list."""
    if isinstance(prompt, str):
        return prompt.split()
    if isinstance(prompt, list):
        if all(isinstance(item, int) for item in prompt):
            return [str(item) for item in prompt]
        if len(prompt) == 1:
            return _prompt_words(prompt[0])
        raise BadRequest("the demo server handles one prompt per request")
    raise BadRequest('"prompt" must be a string or an array of tokens')


class Generation:
    """Answers the completion requests for one :class:`DemoModel`."""

    def __init__(self, model: DemoModel) -> None:
        self._model = model
        self._settings = model.settings
        self._clock = model.clock
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(8)

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-{self._id_prefix}{next(self._ids):08x}"

    def _max_tokens(self, body: dict[str, Any], keys: tuple[str, ...]) -> tuple[int, bool]:
        return requested_tokens(body, keys, self._settings.max_tokens_default)

    def _model_name(self, body: dict[str, Any]) -> str:
        return requested_model(body, self._settings.model)

    def _after(self, request: Request, count: int, respond: Callable[[], bytes]) -> bytes | int:
        """Answer now, or after the simulated generation time when paced."""
        tps = self._settings.tokens_per_second
        if tps <= 0:
            return respond()

        def send() -> None:
            request.write(respond())
            request.finish()

        call = self._clock.callLater(count / tps, send)

        def cancel(reason: Failure) -> None:
            if call.active():
                call.cancel()

        request.notifyFinish().addErrback(cancel)
        return NOT_DONE_YET

    def _stream(
        self,
        request: Request,
        head: bytes,
        count: int,
        render_tokens: Callable[[int, int], bytes],
        render_end: Callable[[float, float], bytes],
    ) -> int:
        request.setHeader(b"content-type", SSE_TYPE)
        request.setHeader(b"cache-control", b"no-cache")
        request.write(head)
        TokenStream(
            request,
            self._clock,
            count,
            self._settings.tokens_per_second,
            render_tokens,
            render_end,
        ).start()
        return NOT_DONE_YET

    # -- chat completions ----------------------------------------------------

    def chat(self, request: Request) -> bytes | int:
        body = read_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest('"messages" is required and must be a non-empty array')
        words = _message_words(messages)
        count, capped = self._max_tokens(body, ("max_completion_tokens", "max_tokens"))
        finish_reason = "length" if capped else "stop"
        model = self._model_name(body)
        prompt = self._model.evaluate(words)
        completion_id = self._next_id("chatcmpl")
        created = int(prompt.received_at)

        if body.get("stream") is not True:

            def respond() -> bytes:
                now = self._clock.seconds()
                payload = {
                    "choices": [
                        {
                            "finish_reason": finish_reason,
                            "index": 0,
                            "message": {"role": "assistant", "content": self._model.text(count)},
                        }
                    ],
                    "created": created,
                    "model": model,
                    "system_fingerprint": BUILD_INFO,
                    "object": "chat.completion",
                    "usage": make_usage(prompt, count),
                    "id": completion_id,
                    "timings": make_timings(prompt, prompt.received_at, count, now),
                }
                return json_response(request, 200, dumps(payload))

            return self._after(request, count, respond)

        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        meta = b'"created":%d,"id":"%s","model":%s,"system_fingerprint":"%s",' % (
            created,
            completion_id.encode(),
            dumps(model),
            BUILD_INFO.encode(),
        )
        chunk_tail = b"}}]," + meta + b'"object":"chat.completion.chunk"}\n\n'
        token_head = b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":'
        role = (
            b'data: {"choices":[{"finish_reason":null,"index":0,"delta":'
            b'{"role":"assistant","content":null'
        ) + chunk_tail
        token_json = self._model.token_json

        def render_tokens(start: int, stop: int) -> bytes:
            parts: list[bytes] = []
            for index in range(start, stop):
                parts += (token_head, token_json(index), chunk_tail)
            return b"".join(parts)

        def render_end(started_at: float, finished_at: float) -> bytes:
            timings = dumps(make_timings(prompt, started_at, count, finished_at))
            end = (
                b'data: {"choices":[{"finish_reason":"%s","index":0,"delta":{}}],'
                % finish_reason.encode()
                + meta
                + b'"object":"chat.completion.chunk","timings":'
                + timings
                + b"}\n\n"
            )
            if include_usage:
                end += (
                    b'data: {"choices":[],'
                    + meta
                    + b'"object":"chat.completion.chunk","usage":'
                    + dumps(make_usage(prompt, count))
                    + b',"timings":'
                    + timings
                    + b"}\n\n"
                )
            return end + b"data: [DONE]\n\n"

        return self._stream(request, role, count, render_tokens, render_end)

    # -- text completions ----------------------------------------------------

    def completions(self, request: Request) -> bytes | int:
        """OpenAI ``/v1/completions``."""
        body = read_body(request)
        if "prompt" not in body:
            raise BadRequest('"prompt" must be provided')
        words = _prompt_words(body["prompt"])
        count, capped = self._max_tokens(body, ("max_tokens",))
        finish_reason = "length" if capped else "stop"
        model = self._model_name(body)
        prompt = self._model.evaluate(words)
        completion_id = self._next_id("cmpl")
        created = int(prompt.received_at)

        if body.get("stream") is not True:

            def respond() -> bytes:
                now = self._clock.seconds()
                payload = {
                    "choices": [
                        {
                            "text": self._model.text(count),
                            "index": 0,
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                    "created": created,
                    "model": model,
                    "system_fingerprint": BUILD_INFO,
                    "object": "text_completion",
                    "usage": make_usage(prompt, count),
                    "id": completion_id,
                    "timings": make_timings(prompt, prompt.received_at, count, now),
                }
                return json_response(request, 200, dumps(payload))

            return self._after(request, count, respond)

        meta = (
            b'"created":%d,"model":%s,"system_fingerprint":"%s","object":"text_completion","id":"%s"'
            % (
                created,
                dumps(model),
                BUILD_INFO.encode(),
                completion_id.encode(),
            )
        )
        token_head = b'data: {"choices":[{"text":'
        token_tail = b',"index":0,"logprobs":null,"finish_reason":null}],' + meta + b"}\n\n"
        token_json = self._model.token_json

        def render_tokens(start: int, stop: int) -> bytes:
            parts: list[bytes] = []
            for index in range(start, stop):
                parts += (token_head, token_json(index), token_tail)
            return b"".join(parts)

        def render_end(started_at: float, finished_at: float) -> bytes:
            # Streamed completions always end with usage, like llama-server.
            return (
                b'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"%s"}],'
                % finish_reason.encode()
                + meta
                + b',"usage":'
                + dumps(make_usage(prompt, count))
                + b',"timings":'
                + dumps(make_timings(prompt, started_at, count, finished_at))
                + b"}\n\ndata: [DONE]\n\n"
            )

        return self._stream(request, b"", count, render_tokens, render_end)

    def native_completion(self, request: Request) -> bytes | int:
        """llama.cpp's own ``/completion`` (``content``/``stop`` fields, no [DONE])."""
        body = read_body(request)
        if "prompt" not in body:
            raise BadRequest('"prompt" must be provided')
        words = _prompt_words(body["prompt"])
        count, capped = self._max_tokens(body, ("n_predict", "max_tokens"))
        stop_type = "limit" if capped else "eos"
        model = self._model_name(body)
        prompt = self._model.evaluate(words)

        def final(content: str, started_at: float, finished_at: float) -> dict[str, Any]:
            return {
                "index": 0,
                "content": content,
                "tokens": [],
                "id_slot": 0,
                "stop": True,
                "model": model,
                "tokens_predicted": count,
                "tokens_evaluated": prompt.prompt_tokens,
                "generation_settings": {"n_predict": count},
                "has_new_line": "\n" in content,
                "truncated": False,
                "stop_type": stop_type,
                "stopping_word": "",
                "tokens_cached": prompt.prompt_tokens + count,
                "usage": make_usage(prompt, count),
                "timings": make_timings(prompt, started_at, count, finished_at),
            }

        if body.get("stream") is not True:

            def respond() -> bytes:
                payload = final(self._model.text(count), prompt.received_at, self._clock.seconds())
                return json_response(request, 200, dumps(payload))

            return self._after(request, count, respond)

        token_head = b'data: {"index":0,"content":'
        token_tail = b',"tokens":[],"stop":false,"id_slot":-1,"tokens_predicted":'
        evaluated = b',"tokens_evaluated":%d}\n\n' % prompt.prompt_tokens
        token_json = self._model.token_json

        def render_tokens(start: int, stop: int) -> bytes:
            parts: list[bytes] = []
            for index in range(start, stop):
                parts += (token_head, token_json(index), token_tail, b"%d" % (index + 1), evaluated)
            return b"".join(parts)

        def render_end(started_at: float, finished_at: float) -> bytes:
            return b"data: " + dumps(final("", started_at, finished_at)) + b"\n\n"

        return self._stream(request, b"", count, render_tokens, render_end)
