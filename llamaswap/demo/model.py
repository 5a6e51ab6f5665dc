"""The demo's simulated model: settings, the reply it cycles, a slow load on
the clock, a one-slot prompt cache, and llama.cpp's ``timings``/``usage``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

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

# Floor for durations in timings, so tokens-per-second never divides by zero.
MIN_MS = 0.001

#: seconds between the reads of ``--load-file``.
LOAD_STEP = 0.05

_WORDISH = re.compile(r"\s*\S+")


def dumps(value: object) -> bytes:
    """Compact UTF-8 JSON, as llama-server writes it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class DemoSettings:
    """Everything the command line configures."""

    model: str = DEFAULT_MODEL
    reply: str = DEFAULT_REPLY
    startup_delay: float = 0.0
    tokens_per_second: float = 0.0
    max_tokens_default: int = DEFAULT_MAX_TOKENS
    #: MiB of memory allocated and touched at start and held (footprint tests).
    hold_mib: int = 0
    #: a file read while loading, at ``load_rate`` MiB/s (0: at once), as a
    #: server reads its weights; the load ends when the file is read.
    load_file: str | None = None
    load_rate: float = 0.0

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
        self.first_json: tuple[bytes, ...] = tuple(dumps(t) for t in tokens)
        self.later_json: tuple[bytes, ...] = tuple(dumps(t) for t in later)

    # -- loading -----------------------------------------------------------

    def start_loading(self) -> None:
        """Begin the simulated load; ``loaded`` flips after the delay."""
        if self.loaded or self._load_call is not None:
            return
        delay = self.settings.startup_delay
        log.info(
            "loading model {model} (simulated, {delay}s)", model=self.settings.model, delay=delay
        )
        if self.settings.load_file is not None:
            self._read_weights(self.settings.load_file, self.settings.load_rate)
        elif delay <= 0:
            self._finish_loading()
        else:
            self._load_call = self.clock.callLater(delay, self._finish_loading)

    def stop_loading(self) -> None:
        """Cancel a load still in progress (the server is going away)."""
        if self._load_call is not None and self._load_call.active():
            self._load_call.cancel()
        self._load_call = None

    def _read_weights(self, path: str, rate_mib: float) -> None:
        """Read ``path`` in steps of :data:`LOAD_STEP` seconds at ``rate_mib``
        MiB/s (a demo process, so plain blocking reads), then finish loading."""
        weights = open(path, "rb")  # noqa: SIM115 - closed when the read ends
        per_step = int(rate_mib * (1 << 20) * LOAD_STEP) if rate_mib > 0 else 1 << 30

        def step() -> None:
            if weights.read(per_step):
                self._load_call = self.clock.callLater(LOAD_STEP, step)
                return
            weights.close()
            self._finish_loading()

        self._load_call = self.clock.callLater(0, step)

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
