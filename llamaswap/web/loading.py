"""The loading-state stream (``sendLoadingState``, llama-swap §7).

While a streaming chat completion waits for its model to load, the client
gets a ``200 text/event-stream`` at once and watches the load "typed" into
``reasoning_content`` deltas: a header, then every 750 ms a dot, a queue
position or a friendly remark.  Once the model is granted, :meth:`finish`
writes the ``Done!`` lines and fences the loader off, so the upstream's
answer can be appended to the same stream.  :meth:`fail` ends the stream with
one SSE error event (docs/design.md, difference 6).

Headers are committed before the upstream answers, so the proxy must not set
status or headers later: :func:`relay_body_only` wraps the request for that.
"""

from __future__ import annotations

import enum
import json
import random
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from llamaswap.observe.usage import upstream_error_text
from llamaswap.web.errors import json_envelope, write_error
from llamaswap.web.requestinfo import client_gone

log = Logger()

#: Path prefixes that get a loading stream (after ``/v`` stripping).
LOADING_PATHS = (b"/v1/chat/completions",)
#: Seconds between ticks (a dot, a queue position or a remark).
TICK = 0.75
#: Characters "typed" per second; chunks are ``max(3, 75 // 15)`` characters.
TYPING_SPEED = 75
CHUNK = max(3, TYPING_SPEED // 15)
#: Seconds of dots before the first remark (inclusive range), then between remarks.
FIRST_REMARK = (2, 5)
LATER_REMARK = (5, 9)
#: Upstream error bodies kept to build the in-stream error event.
ERROR_BODY_CAP = 64 * 1024

RULE = "━━━━━"

#: Shuffled per request and cycled.  Keep them short: one is typed within a tick.
REMARKS = (
    "Warming up the tensors...",
    "Unpacking a few billion parameters.",
    "Stretching the attention heads.",
    "Pouring weights into memory, carefully.",
    "Counting layers. Lost count. Recounting.",
    "Brewing a fresh pot of embeddings.",
    "The GPU fans are cheering you on.",
    "Almost there. Probably.",
    "Teaching the model your name. Just kidding.",
    "Dusting off the vocabulary.",
    "Loading wisdom, one shard at a time.",
    "Fluffing the KV cache pillows.",
    "Reticulating splines, the neural way.",
    "Good things come to those who wait.",
    "Your question is next in line.",
    "Aligning the matrices neatly.",
    "Checking the model has had its coffee.",
    "Mapping memory like a cartographer.",
    "Tokenizer is doing warm-up stretches.",
    "The context window is being washed.",
    "Summoning the feed-forward layers.",
    "Quantized, but full of ideas.",
    "Untangling a very long rope of floats.",
    "Polishing the softmax until it shines.",
    "Nearly ready to think out loud.",
    "Shuffling through a deck of weights.",
    "The model is putting its shoes on.",
    "Filling VRAM with good intentions.",
    "Patience is a fine hyperparameter.",
    "Gathering thoughts from the disk.",
    "Waking the layers, gently.",
    "Thanks for waiting, it's worth it.",
    "Loading the part that knows things.",
    "Rolling out the red carpet for tokens.",
    "Reading the manual one more time.",
    "Humming a tune to pass the time.",
    "Lining up the attention heads for a photo.",
    "Convincing the bits to cooperate.",
    "Spinning up the thinking machine.",
    "One moment, tidying up the weights.",
    "The server says it's nearly dressed.",
    "Still here, still loading, still friendly.",
)


def wants_loading_stream(
    streaming: bool, send_loading_state: bool, upstream_path: bytes, ready: bool
) -> bool:
    """Whether a request gets a loading stream (§7.1): a streaming chat
    completion for a model with ``sendLoadingState`` that is not ready yet.
    ``upstream_path`` is the stripped path; a query string is ignored."""
    if not (streaming and send_loading_state) or ready:
        return False
    path = upstream_path.partition(b"?")[0]
    return path.startswith(LOADING_PATHS)


def sse_piece(text: str) -> bytes:
    """One loading event: ``text`` as a ``reasoning_content`` delta."""
    payload = {"choices": [{"delta": {"reasoning_content": text}}]}
    return (
        b"data: "
        + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        + (b"\n\n")
    )


def typed_pieces(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into typed pieces, each with the pause that follows it:
    chunks of :data:`CHUNK` characters pause ``len/TYPING_SPEED`` seconds
    except the last of a run; newlines are pieces of their own."""
    pieces: list[tuple[str, float]] = []
    lines = text.split("\n")
    for index, line in enumerate(lines):
        chunks = [line[i : i + CHUNK] for i in range(0, len(line), CHUNK)]
        for number, chunk in enumerate(chunks):
            last = number == len(chunks) - 1
            pieces.append((chunk, 0.0 if last else len(chunk) / TYPING_SPEED))
        if index < len(lines) - 1:
            pieces.append(("\n", 0.0))
    return pieces


def _completion_text(elapsed_s: float) -> str:
    return f"\nDone! ({elapsed_s:.2f}s)\n{RULE}\n \n"


class _Phase(enum.Enum):
    NEW = "new"
    LOADING = "loading"
    #: finished, failed or abandoned: the loader never writes again
    FENCED = "fenced"


class LoadingStream:
    """Streams loading progress into ``request`` until the model is granted.

    ``queue_position``, when given, is polled on every tick (e.g.
    ``lambda: router.queue_position_of(ticket)``); :meth:`set_queue_position`
    pushes a position instead.  ``rng`` picks remark order and timing."""

    def __init__(
        self,
        request: Any,
        model_id: str,
        clock: IReactorTime,
        *,
        rng: random.Random | None = None,
        queue_position: Callable[[], int | None] | None = None,
        load_progress: Callable[[], Mapping[str, float | None] | None] | None = None,
    ) -> None:
        self.model_id = model_id
        #: the model's ``percent``/``eta_s`` (``None`` while not loading);
        #: each new tenth of the load is typed as a message.
        self._load_progress = load_progress
        self._shown_tenth = 0
        self._request = request
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._poll_position = queue_position
        self._phase = _Phase.NEW
        self._started_at = 0.0
        self._ended_at: float | None = None
        self._remarks = list(REMARKS)
        self._rng.shuffle(self._remarks)
        self._next_remark = 0
        self._last_message_at = 0.0
        self._remark_after = 0.0
        self._pending_position: int | None = None
        self._shown_position: int | None = None
        self._queue: deque[tuple[str, float]] = deque()
        self._typing: IDelayedCall | None = None
        self._ticker: LoopingCall | None = None

    # -- public ---------------------------------------------------------------

    def start(self) -> None:
        """Commit ``200 text/event-stream`` and start typing."""
        if self._phase is not _Phase.NEW:
            return
        self._phase = _Phase.LOADING
        self._started_at = self._last_message_at = self._clock.seconds()
        self._remark_after = self._rng.randint(*FIRST_REMARK)
        request = self._request
        request.notifyFinish().addBoth(self._request_ended)
        if self._client_gone():
            self._fence()
            return
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        if not request.responseHeaders.hasHeader(b"connection"):
            # Twisted already set "close" when the connection will not persist.
            request.setHeader(b"connection", b"keep-alive")
        request.setHeader(b"x-accel-buffering", b"no")
        self._type(f"{RULE}\nllamaswap loading model: {self.model_id}\n")
        ticker = self._ticker = LoopingCall(self._tick)
        ticker.clock = self._clock
        ticker.start(TICK, now=False).addErrback(self._ticker_failed)

    def set_queue_position(self, position: int | None) -> None:
        """The request's 1-based queue position changed (latest wins)."""
        if position is None or position == self._shown_position:
            self._pending_position = None
        else:
            self._pending_position = position

    def elapsed(self) -> float:
        """Seconds since :meth:`start` (frozen once the stream ended)."""
        if self._phase is _Phase.NEW:
            return 0.0
        end = self._ended_at if self._ended_at is not None else self._clock.seconds()
        return end - self._started_at

    def progress(self) -> dict[str, Any]:
        """A snapshot for ``/api/events`` and the in-flight list."""
        return {
            "model": self.model_id,
            "state": "loading",
            "queue_position": (
                self._pending_position
                if self._pending_position is not None
                else self._shown_position
            ),
            "elapsed_s": round(self.elapsed(), 2),
            **(self._loading() or {}),
        }

    def _loading(self) -> Mapping[str, float | None] | None:
        return self._load_progress() if self._load_progress is not None else None

    def _load_message(self) -> str | None:
        """``Loaded 40%, about 6 s left`` when the load reached a new tenth."""
        loading = self._loading()
        percent = loading.get("percent") if loading else None
        if loading is None or percent is None or int(percent // 10) <= self._shown_tenth:
            return None
        self._shown_tenth = int(percent // 10)
        eta = loading.get("eta_s")
        left = f", about {eta:.0f} s left" if eta is not None else ""
        return f"Loaded {percent:.0f}%{left}"

    def finish(self, elapsed_s: float | None = None) -> defer.Deferred[None]:
        """The model was granted: write the ``Done!`` lines (with the real
        time since :meth:`start` unless ``elapsed_s`` is given) and fence the
        loader.  Fires once everything is written and no timer is left; from
        then on the loader never writes to the request again."""
        self._complete(elapsed_s)
        return defer.succeed(None)

    def fail(
        self, message: str, *, status: int = 500, code: str | None = None
    ) -> defer.Deferred[None]:
        """The request will not be served: after the ``Done!`` lines, send one
        SSE event holding the error envelope, then ``[DONE]``, and finish the
        request.  Before :meth:`start`, answer with a normal error response."""
        if self._phase is _Phase.NEW:
            self._fence()
            write_error(self._request, status, message, code)
            return defer.succeed(None)
        if self._complete(None):
            request = self._request
            request.write(b"data: " + json_envelope(status, message, code) + b"\n\n")
            request.write(b"data: [DONE]\n\n")
            request.finish()
        return defer.succeed(None)

    def stop(self) -> None:
        """Abandon the stream without writing anything more (the request was
        cancelled); idempotent."""
        self._fence()

    # -- ticking and typing -----------------------------------------------------

    def _tick(self) -> None:
        if self._typing is not None or self._queue:
            return  # still typing the last message: skip this tick
        if self._poll_position is not None:
            self.set_queue_position(self._poll_position())
        now = self._clock.seconds()
        if self._pending_position is not None:
            self._shown_position = self._pending_position
            self._pending_position = None
            self._message(f"Queue position: #{self._shown_position}", now)
        elif (loaded := self._load_message()) is not None:
            self._message(loaded, now)
        elif now - self._last_message_at >= self._remark_after:
            remark = self._remarks[self._next_remark % len(self._remarks)]
            self._next_remark += 1
            self._message(remark, now)
        else:
            self._type(".")

    def _message(self, text: str, now: float) -> None:
        self._last_message_at = now
        self._remark_after = self._rng.randint(*LATER_REMARK)
        self._type(f"\n{text} ")

    def _type(self, text: str) -> None:
        self._queue.extend(typed_pieces(text))
        if self._typing is None:
            self._pump()

    def _pump(self) -> None:
        self._typing = None
        while self._queue:
            piece, pause = self._queue.popleft()
            self._request.write(sse_piece(piece))
            if pause and self._queue:
                self._typing = self._clock.callLater(pause, self._pump)
                return

    # -- ending -----------------------------------------------------------------

    def _complete(self, elapsed_s: float | None) -> bool:
        """Flush what is left to type plus the completion lines, without
        pauses (the answer should not wait for an animation), and fence.
        Returns whether the client is still there to write to."""
        if self._phase is not _Phase.LOADING:
            self._fence()
            return False
        self._stop_timers()
        self._ended_at = self._clock.seconds()
        if self._client_gone():
            self._fence()
            return False
        seconds = self._ended_at - self._started_at if elapsed_s is None else elapsed_s
        pieces = [*self._queue, *typed_pieces(_completion_text(seconds))]
        self._fence()
        self._request.write(b"".join(sse_piece(piece) for piece, _ in pieces))
        return True

    def _fence(self) -> None:
        self._stop_timers()
        self._queue.clear()
        if self._phase is _Phase.LOADING and self._ended_at is None:
            self._ended_at = self._clock.seconds()
        self._phase = _Phase.FENCED

    def _stop_timers(self) -> None:
        if self._typing is not None:
            if self._typing.active():
                self._typing.cancel()
            self._typing = None
        ticker, self._ticker = self._ticker, None
        if ticker is not None and ticker.running:
            ticker.stop()

    def _client_gone(self) -> bool:
        return client_gone(self._request)

    def _request_ended(self, result: object) -> None:
        """The request finished or the client went away: stop at once."""
        if self._phase is _Phase.LOADING and self._client_gone():
            log.debug("{model}: loading stream closed by the client", model=self.model_id)
            self._fence()
        # A disconnect arrives as a Failure: expected here, so it is swallowed.

    def _ticker_failed(self, failure: Failure) -> None:
        log.failure("loading stream for {model} failed", failure, model=self.model_id)
        self._fence()


class CommittedResponse:
    """The request as the proxy sees it after a loading stream committed the
    status and headers.

    The upstream's status and headers land in a scratch ``responseHeaders``
    (``code`` keeps the upstream status, for the activity row); body bytes
    go straight to the client.  An error status (>= 400, not an event
    stream) has its body kept, up to :data:`ERROR_BODY_CAP`, and turned into
    one SSE error event plus ``[DONE]`` on :meth:`finish` (docs/design.md, difference 6)."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self.responseHeaders = Headers()
        self.code = 200
        self._error: bytearray | None = None

    # -- what the proxy and the error helpers use ---------------------------------

    @property
    def method(self) -> bytes:
        return bytes(self._request.method)

    @property
    def finished(self) -> bool:
        return bool(self._request.finished)

    @property
    def _disconnected(self) -> bool:
        # Read by client_gone() when this wrapper stands in for the request.
        return client_gone(self._request)

    @property
    def startedWriting(self) -> bool:
        return True

    def getHeader(self, name: bytes) -> bytes | None:
        """A *request* header, as on :class:`twisted.web.server.Request`."""
        header: bytes | None = self._request.getHeader(name)
        return header

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self._error = bytearray() if code >= 400 else None

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._request.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._request.unregisterProducer()

    def write(self, data: bytes) -> None:
        if self._error is not None and not self._streams_events():
            room = ERROR_BODY_CAP - len(self._error)
            if room > 0:
                self._error += data[:room]
            return
        self._request.write(data)

    def finish(self) -> None:
        if self._error is not None and not self._streams_events():
            if not self._disconnected and not self.finished:
                message = _error_message(bytes(self._error), self.code)
                self._request.write(b"data: " + json_envelope(self.code, message) + b"\n\n")
                self._request.write(b"data: [DONE]\n\n")
        self._error = None
        if not self.finished:
            self._request.finish()

    def _streams_events(self) -> bool:
        types = self.responseHeaders.getRawHeaders(b"content-type") or []
        return any(b"text/event-stream" in value for value in types)


def relay_body_only(request: Any) -> CommittedResponse:
    """Wrap ``request`` for ``UpstreamClient.forward`` once a loading stream
    has committed the response: see :class:`CommittedResponse`."""
    return CommittedResponse(request)


def _error_message(body: bytes, status: int) -> str:
    """The message of an upstream error body: what `upstream_error_text`
    finds in a JSON body, else the body as plain text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    message = upstream_error_text(parsed)
    if message is not None:
        return message
    if text.startswith("llama-swap: "):
        text = text[len("llama-swap: ") :]
    return text or f"upstream answered with status {status}"
