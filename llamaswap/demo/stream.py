"""Streamed replies: a push producer writing token events in batches or at
a paced rate, pausing while the client reads slowly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

# With no pacing, this many tokens go out per write; then the reactor gets a
# turn so one long stream cannot starve the other connections.
BATCH_TOKENS = 64


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
