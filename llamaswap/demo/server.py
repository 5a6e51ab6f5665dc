"""A small OpenAI-compatible server that looks like llama.cpp's llama-server.

It needs no GPU and no model file: replies are a fixed text cycled to the
requested length, so a newcomer can watch llamaswap start, health-check,
proxy and swap "models". It is also the fast upstream for benchmarks, so the
request path is lean: one leaf resource with a dispatch table, JSON fragments
and escaped reply tokens prepared at start-up, and streamed tokens written in
batches by a push producer that pauses when the client reads slowly.

Run it with ``python -m llamaswap.demo --port 8081`` (or the
``llamaswap-demo-upstream`` console script).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import math
import re
import secrets
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from llamaswap import __version__

log = Logger()

DEFAULT_MODEL = "demo"
DEFAULT_REPLY = (
    "Hello from demo model {model}! I am the llamaswap demo upstream, "
    "a stand-in for llama-server that needs no GPU and no model file."
)
DEFAULT_MAX_TOKENS = 16
EMBEDDING_SIZE = 16
CONTEXT_SIZE = 1 << 20
BUILD_INFO = "b0-llamaswap-demo"

# With no pacing, this many tokens go out per write; then the reactor gets a
# turn so one long stream cannot starve the other connections.
BATCH_TOKENS = 64
# Floor for durations in timings, so tokens-per-second never divides by zero.
MIN_MS = 0.001

_JSON_TYPE = b"application/json; charset=utf-8"
_SSE_TYPE = b"text/event-stream"
_WORDISH = re.compile(r"\s*\S+")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def error_body(code: int, message: str) -> bytes:
    """The llama-server error envelope, as bytes."""
    error = {"code": code, "message": message, "type": _ERROR_TYPES.get(code, "server_error")}
    return _dumps({"error": error})


def _dumps(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class BadRequest(Exception):
    """A client error, answered with a 400 JSON error envelope."""


# --------------------------------------------------------------------------
# Settings and the simulated model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSettings:
    """Everything the command line configures."""

    model: str = DEFAULT_MODEL
    reply: str = DEFAULT_REPLY
    startup_delay: float = 0.0
    tokens_per_second: float = 0.0
    max_tokens_default: int = DEFAULT_MAX_TOKENS

    def reply_text(self) -> str:
        """The reply with ``{model}`` replaced by the model name."""
        return self.reply.replace("{model}", self.model)


@dataclass(frozen=True)
class PromptEval:
    """How a prompt was "evaluated": its size and how much the cache covered."""

    prompt_tokens: int
    cache_n: int
    received_at: float

    @property
    def prompt_n(self) -> int:
        return self.prompt_tokens - self.cache_n


def make_timings(
    prompt: PromptEval, prompt_done_at: float, predicted_n: int, finished_at: float
) -> dict[str, float | int]:
    """A llama.cpp ``timings`` object for one generation."""
    prompt_ms = max((prompt_done_at - prompt.received_at) * 1000.0, MIN_MS)
    predicted_ms = max((finished_at - prompt_done_at) * 1000.0, MIN_MS)
    prompt_n = prompt.prompt_n
    return {
        "cache_n": prompt.cache_n,
        "prompt_n": prompt_n,
        "prompt_ms": round(prompt_ms, 3),
        "prompt_per_token_ms": round(prompt_ms / prompt_n, 3) if prompt_n else 0.0,
        "prompt_per_second": round(prompt_n * 1000.0 / prompt_ms, 3),
        "predicted_n": predicted_n,
        "predicted_ms": round(predicted_ms, 3),
        "predicted_per_token_ms": round(predicted_ms / predicted_n, 3) if predicted_n else 0.0,
        "predicted_per_second": round(predicted_n * 1000.0 / predicted_ms, 3),
    }


def make_usage(prompt: PromptEval, completion_tokens: int) -> dict[str, Any]:
    """An OpenAI ``usage`` object as llama-server reports it."""
    return {
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt.prompt_tokens,
        "total_tokens": prompt.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": prompt.cache_n},
    }


def split_tokens(text: str) -> list[str]:
    """Split text into word-ish tokens that keep their leading whitespace."""
    return _WORDISH.findall(text)


def pseudo_embedding(item: object) -> list[float]:
    """A deterministic, L2-normalised vector derived from a hash of the input."""
    source = item if isinstance(item, str) else json.dumps(item, separators=(",", ":"))
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    raw = [value / 32767.5 - 1.0 for value in struct.unpack("<16H", digest)]
    norm = math.sqrt(sum(value * value for value in raw)) or 1.0
    return [value / norm for value in raw]


class DemoModel:
    """The simulated model: readiness, reply tokens and a one-slot prompt cache.

    Loading takes ``startup_delay`` seconds on ``clock`` from
    ``start_loading``; everything the request path needs per token is
    prepared here once.
    """

    def __init__(self, settings: DemoSettings, clock: IReactorTime) -> None:
        self.settings = settings
        self.clock = clock
        self.loaded = False
        self._load_call: IDelayedCall | None = None
        self._load_waiters: list[Deferred[None]] = []
        self._cached_prompt: list[str] = []

        tokens = split_tokens(settings.reply_text())
        if not tokens:
            raise ValueError("the reply text must contain at least one word")
        later = list(tokens)
        if not later[0][:1].isspace():
            # When the reply repeats, its first word follows the last one.
            later[0] = " " + later[0]
        self.first_tokens: tuple[str, ...] = tuple(tokens)
        self.later_tokens: tuple[str, ...] = tuple(later)
        self._first_text = "".join(tokens)
        self._later_text = "".join(later)
        # JSON string literals (with quotes) of each token, for SSE templates.
        self.first_json: tuple[bytes, ...] = tuple(_dumps(t) for t in tokens)
        self.later_json: tuple[bytes, ...] = tuple(_dumps(t) for t in later)

    # -- loading -----------------------------------------------------------

    def start_loading(self) -> None:
        """Begin the simulated load; ``loaded`` flips after the delay."""
        if self.loaded or self._load_call is not None:
            return
        delay = self.settings.startup_delay
        log.info(
            "loading model {model} (simulated, {delay}s)", model=self.settings.model, delay=delay
        )
        if delay <= 0:
            self._finish_loading()
        else:
            self._load_call = self.clock.callLater(delay, self._finish_loading)

    def stop_loading(self) -> None:
        """Cancel a load still in progress (the server is going away)."""
        if self._load_call is not None and self._load_call.active():
            self._load_call.cancel()
        self._load_call = None

    def when_loaded(self) -> Deferred[None]:
        """A Deferred that fires once the model has loaded."""
        if self.loaded:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._load_waiters.append(waiter)
        return waiter

    def _finish_loading(self) -> None:
        self._load_call = None
        self.loaded = True
        log.info("model loaded: {model}", model=self.settings.model)
        waiters, self._load_waiters = self._load_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- generation --------------------------------------------------------

    def evaluate(self, words: list[str]) -> PromptEval:
        """Account for a prompt, reusing the longest prefix of the previous one."""
        prompt_tokens = max(1, len(words))
        common = 0
        for old, new in zip(self._cached_prompt, words, strict=False):
            if old != new:
                break
            common += 1
        self._cached_prompt = words
        # llama.cpp always evaluates at least the last prompt token.
        cache_n = min(common, prompt_tokens - 1)
        return PromptEval(prompt_tokens, cache_n, self.clock.seconds())

    def text(self, count: int) -> str:
        """The first ``count`` tokens of the cycled reply, joined."""
        size = len(self.first_tokens)
        if count <= size:
            return "".join(self.first_tokens[:count])
        repeats, rest = divmod(count - size, size)
        return self._first_text + self._later_text * repeats + "".join(self.later_tokens[:rest])

    def token_json(self, index: int) -> bytes:
        """Token ``index`` of the cycled reply as a JSON string literal."""
        size = len(self.first_json)
        return self.first_json[index] if index < size else self.later_json[index % size]


# --------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------


class StreamTarget(Protocol):
    """The part of a request a ``TokenStream`` writes to."""

    def write(self, data: bytes) -> None: ...

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def finish(self) -> None: ...

    def notifyFinish(self) -> Deferred[None]: ...


@implementer(IPushProducer)
class TokenStream:
    """Writes ``count`` token events to a request, then the closing events.

    Tokens are paced on ``clock`` at ``tokens_per_second`` (0: in batches, as
    fast as the client reads). As a push producer it stops generating while
    the transport is paused, and for good when the client goes away.
    """

    def __init__(
        self,
        request: StreamTarget,
        clock: IReactorTime,
        count: int,
        tokens_per_second: float,
        render_tokens: Callable[[int, int], bytes],
        render_end: Callable[[float, float], bytes],
    ) -> None:
        self._request = request
        self._clock = clock
        self._count = count
        self._tps = tokens_per_second
        self._render_tokens = render_tokens
        self._render_end = render_end
        self._sent = 0
        self._started_at = 0.0
        self._paused = False
        self._done = False
        self._call: IDelayedCall | None = None

    @property
    def sent(self) -> int:
        """How many tokens have been written so far."""
        return self._sent

    def start(self) -> None:
        """Register with the request and write what is due now."""
        self._started_at = self._clock.seconds()
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(self._client_gone)
        self._pump()

    # -- IPushProducer -------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        self._cancel_call()

    def resumeProducing(self) -> None:
        if self._done or not self._paused:
            return
        self._paused = False
        # Not re-entrantly: we may be inside the transport's write path.
        self._schedule(0.0)

    def stopProducing(self) -> None:
        self._abort()

    # -- internals -----------------------------------------------------------

    def _pump(self) -> None:
        self._call = None
        if self._done or self._paused:
            return
        if self._tps > 0:
            elapsed = self._clock.seconds() - self._started_at
            due = min(self._count, int(elapsed * self._tps + 1e-9))
        else:
            due = min(self._count, self._sent + BATCH_TOKENS)
        if due > self._sent:
            start, self._sent = self._sent, due
            self._request.write(self._render_tokens(start, due))
            if self._done:  # the write noticed the client had gone
                return
        if self._sent >= self._count:
            self._finish()
        elif not self._paused:
            if self._tps > 0:
                next_at = self._started_at + (self._sent + 1) / self._tps
                self._schedule(max(0.0, next_at - self._clock.seconds()))
            else:
                self._schedule(0.0)

    def _schedule(self, delay: float) -> None:
        if self._call is None:
            self._call = self._clock.callLater(delay, self._pump)

    def _cancel_call(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _finish(self) -> None:
        self._done = True
        self._request.write(self._render_end(self._started_at, self._clock.seconds()))
        self._request.unregisterProducer()
        self._request.finish()

    def _abort(self) -> None:
        """The client went away: stop generating and forget pending timers."""
        if not self._done:
            self._done = True
            log.info(
                "client disconnected, generation cancelled after {sent}/{count} tokens",
                sent=self._sent,
                count=self._count,
            )
        self._cancel_call()

    def _client_gone(self, reason: Failure) -> None:
        self._abort()


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

Handler = Callable[[Request], bytes | int]


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


class DemoResource(Resource):
    """The whole HTTP API as one leaf resource with a dispatch table."""

    isLeaf = True

    def __init__(self, model: DemoModel) -> None:
        super().__init__()
        self._model = model
        self._settings = model.settings
        self._clock = model.clock
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(8)

        created = int(self._clock.seconds())
        name = self._settings.model
        self._health_ok = _dumps({"status": "ok"})
        self._loading = error_body(503, "Loading model")
        self._models_body = _dumps(
            {
                "models": [
                    {"name": name, "model": name, "type": "model", "capabilities": ["completion"]}
                ],
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": created,
                        "owned_by": "llamacpp",
                        "meta": {"n_ctx_train": CONTEXT_SIZE, "n_embd": EMBEDDING_SIZE},
                    }
                ],
            }
        )
        self._props_body = _dumps(
            {
                "default_generation_settings": {
                    "n_ctx": CONTEXT_SIZE,
                    "params": {"n_predict": self._settings.max_tokens_default},
                },
                "total_slots": 1,
                "model_alias": name,
                "model_path": name,
                "build_info": BUILD_INFO,
            }
        )

        chat: dict[bytes, Handler] = {b"POST": self._chat}
        completions: dict[bytes, Handler] = {b"POST": self._completions}
        embeddings: dict[bytes, Handler] = {b"POST": self._embeddings}
        health: dict[bytes, Handler] = {b"GET": self._health}
        models: dict[bytes, Handler] = {b"GET": self._models}
        self._routes: dict[bytes, dict[bytes, Handler]] = {
            b"/health": health,
            b"/v1/health": health,
            b"/v1/models": models,
            b"/models": models,
            b"/props": {b"GET": self._props},
            b"/v1/chat/completions": chat,
            b"/chat/completions": chat,
            b"/v1/completions": completions,
            b"/completions": completions,
            b"/completion": {b"POST": self._native_completion},
            b"/v1/embeddings": embeddings,
            b"/embeddings": embeddings,
        }
        # Like llama-server, these answer while the model is still loading.
        self._while_loading = {b"/health", b"/v1/health", b"/v1/models", b"/models"}

    # -- dispatch ----------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"server", b"llama.cpp")
        path = request.path
        routes = self._routes.get(path)
        if routes is None:
            return self._error(request, 404, "File Not Found")
        method = b"GET" if request.method == b"HEAD" else request.method
        handler = routes.get(method)
        if handler is None:
            request.setHeader(b"allow", b", ".join(routes))
            return self._error(request, 405, "Method Not Allowed")
        if not self._model.loaded and path not in self._while_loading:
            return self._json(request, 503, self._loading)
        try:
            return handler(request)
        except BadRequest as error:
            return self._error(request, 400, str(error))

    @staticmethod
    def _json(request: Request, code: int, body: bytes) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", _JSON_TYPE)
        return body

    def _error(self, request: Request, code: int, message: str) -> bytes:
        return self._json(request, code, error_body(code, message))

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        raw = request.content.read() if request.content is not None else b""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise BadRequest(f"Invalid JSON body: {error}") from None
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object")
        return body

    def _max_tokens(self, body: dict[str, Any], keys: Sequence[str]) -> tuple[int, bool]:
        """The number of tokens to generate, and whether the client capped it."""
        for key in keys:
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f'"{key}" must be an integer')
            if value == -1:
                break
            if value < 0:
                raise BadRequest(f'"{key}" must be -1 or a non-negative integer')
            if value > CONTEXT_SIZE:
                raise BadRequest(f'"{key}" exceeds the context size ({CONTEXT_SIZE})')
            return value, True
        return self._settings.max_tokens_default, False

    def _model_name(self, body: dict[str, Any]) -> str:
        # llama-server echoes the requested model name.
        requested = body.get("model")
        if isinstance(requested, str) and requested:
            return requested
        return self._settings.model

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-{self._id_prefix}{next(self._ids):08x}"

    def _stream_headers(self, request: Request) -> None:
        request.setHeader(b"content-type", _SSE_TYPE)
        request.setHeader(b"cache-control", b"no-cache")

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
        self._stream_headers(request)
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

    # -- simple endpoints ----------------------------------------------------

    def _health(self, request: Request) -> bytes:
        if self._model.loaded:
            return self._json(request, 200, self._health_ok)
        return self._json(request, 503, self._loading)

    def _models(self, request: Request) -> bytes:
        return self._json(request, 200, self._models_body)

    def _props(self, request: Request) -> bytes:
        return self._json(request, 200, self._props_body)

    # -- chat completions ----------------------------------------------------

    def _chat(self, request: Request) -> bytes | int:
        body = self._body(request)
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
                return self._json(request, 200, _dumps(payload))

            return self._after(request, count, respond)

        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        meta = b'"created":%d,"id":"%s","model":%s,"system_fingerprint":"%s",' % (
            created,
            completion_id.encode(),
            _dumps(model),
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
            timings = _dumps(make_timings(prompt, started_at, count, finished_at))
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
                    + _dumps(make_usage(prompt, count))
                    + b',"timings":'
                    + timings
                    + b"}\n\n"
                )
            return end + b"data: [DONE]\n\n"

        return self._stream(request, role, count, render_tokens, render_end)

    # -- text completions ----------------------------------------------------

    def _completions(self, request: Request) -> bytes | int:
        """OpenAI ``/v1/completions``."""
        body = self._body(request)
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
                return self._json(request, 200, _dumps(payload))

            return self._after(request, count, respond)

        meta = (
            b'"created":%d,"model":%s,"system_fingerprint":"%s","object":"text_completion","id":"%s"'
            % (
                created,
                _dumps(model),
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
                + _dumps(make_usage(prompt, count))
                + b',"timings":'
                + _dumps(make_timings(prompt, started_at, count, finished_at))
                + b"}\n\ndata: [DONE]\n\n"
            )

        return self._stream(request, b"", count, render_tokens, render_end)

    def _native_completion(self, request: Request) -> bytes | int:
        """llama.cpp's own ``/completion`` (``content``/``stop`` fields, no [DONE])."""
        body = self._body(request)
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
                return self._json(request, 200, _dumps(payload))

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
            return b"data: " + _dumps(final("", started_at, finished_at)) + b"\n\n"

        return self._stream(request, b"", count, render_tokens, render_end)

    # -- embeddings ----------------------------------------------------------

    def _embeddings(self, request: Request) -> bytes:
        body = self._body(request)
        source = body.get("input", body.get("content"))
        if source is None:
            raise BadRequest('"input" or "content" must be provided')
        if isinstance(source, str) or (
            isinstance(source, list) and source and all(isinstance(t, int) for t in source)
        ):
            items: list[object] = [source]
        elif isinstance(source, list) and source:
            items = list(source)
        else:
            raise BadRequest('"input" must be a string or a non-empty array')
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadRequest('"encoding_format" must be "float" or "base64"')

        data: list[dict[str, Any]] = []
        prompt_tokens = 0
        for index, item in enumerate(items):
            if isinstance(item, str):
                if not item:
                    raise BadRequest("Input content cannot be empty")
                prompt_tokens += max(1, len(item.split()))
            elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
                prompt_tokens += len(item)
            else:
                raise BadRequest('each "input" item must be a non-empty string or token array')
            vector = pseudo_embedding(item)
            embedding: list[float] | str
            if encoding == "base64":
                packed = struct.pack(f"<{len(vector)}f", *vector)
                embedding = base64.b64encode(packed).decode("ascii")
            else:
                embedding = vector
            data.append({"embedding": embedding, "index": index, "object": "embedding"})
        payload = {
            "model": self._model_name(body),
            "object": "list",
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            "data": data,
        }
        return self._json(request, 200, _dumps(payload))


class DemoSite(Site):
    """The demo's HTTP site: loading starts when it starts listening.

    It logs one line per finished request, like llama-server.
    """

    noisy = False

    def __init__(self, model: DemoModel) -> None:
        super().__init__(DemoResource(model))
        self.model = model

    def startFactory(self) -> None:
        super().startFactory()
        self.model.start_loading()

    def stopFactory(self) -> None:
        self.model.stop_loading()
        super().stopFactory()

    def log(self, request: Request) -> None:  # type: ignore[override]
        client = request.getClientAddress()
        log.info(
            "request: {method} {path} {client} {code}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
            client=getattr(client, "host", "-"),
            code=request.code,
        )


def make_site(settings: DemoSettings, clock: IReactorTime) -> DemoSite:
    """Build the demo site; the model starts loading when the site listens."""
    return DemoSite(DemoModel(settings, clock))


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
        return value

    return parse


def _port(text: str) -> int:
    value = _non_negative(int)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text}")
    return int(value)


def _reply(text: str) -> str:
    if not text.split():
        raise argparse.ArgumentTypeError("the reply must contain at least one word")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamaswap-demo-upstream",
        description=(
            "A fake llama-server: an OpenAI-compatible endpoint that needs no GPU and "
            "no model file, for trying llamaswap and for benchmarks."
        ),
    )
    parser.add_argument("--port", type=_port, required=True, help="TCP port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="model name to report (default %(default)s)"
    )
    parser.add_argument(
        "--startup-delay",
        type=_non_negative(float),
        default=0.0,
        metavar="SECONDS",
        help="simulated model load time; /health answers 503 until it has passed",
    )
    parser.add_argument(
        "--tokens-per-second",
        type=_non_negative(float),
        default=0.0,
        metavar="N",
        help="generation speed (default 0: as fast as possible)",
    )
    parser.add_argument(
        "--reply",
        type=_reply,
        default=DEFAULT_REPLY,
        metavar="TEXT",
        help="reply text, cycled to the requested length; {model} is replaced by the model name",
    )
    parser.add_argument(
        "--max-tokens-default",
        type=_non_negative(int),
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help="tokens generated when a request sets no limit (default %(default)s)",
    )
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> tuple[DemoSettings, str, int]:
    """Parse the command line into settings, the host and the port."""
    args = build_parser().parse_args(argv)
    settings = DemoSettings(
        model=args.model,
        reply=args.reply,
        startup_delay=args.startup_delay,
        tokens_per_second=args.tokens_per_second,
        max_tokens_default=args.max_tokens_default,
    )
    return settings, args.host, args.port


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo server until SIGTERM/SIGINT; returns the exit status."""
    settings, host, port = parse_settings(argv)
    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stdout, timeFormat="%Y-%m-%d %H:%M:%S")],
        redirectStandardIO=False,
    )
    log.info(
        "llamaswap demo upstream {version} (imitating llama-server), model {model}",
        version=__version__,
        model=settings.model,
    )
    site = make_site(settings, reactor)
    try:
        listening = reactor.listenTCP(port, site, interface=host)  # type: ignore[arg-type]
    except CannotListenError as error:
        log.error("couldn't bind HTTP server socket: {error}", error=error)
        return 1
    bound: Any = listening.getHost()
    log.info(
        "HTTP server is listening, hostname: {host}, port: {port}", host=bound.host, port=bound.port
    )
    display_host = f"[{bound.host}]" if ":" in bound.host else bound.host
    # llama-server prints this line only once the model is ready.
    site.model.when_loaded().addCallback(
        lambda _: log.info(
            "server is listening on http://{host}:{port} - starting the main loop",
            host=display_host,
            port=bound.port,
        )
    )
    reactor.run()
    log.info("server stopped")
    return 0
