"""Health probing: is a freshly started server answering yet?

A :data:`Probe` asks once (real: an HTTP GET, see :func:`http_probe`);
:func:`poll_health` asks again and again, on a cadence that adapts to how long
the server has been starting, until it answers 200 or a deadline passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent

from llamaswap.core.endpoints import UpstreamEndpoints

log = Logger()

T = TypeVar("T")

#: ``probe(url, timeout)``: fires with the HTTP status code ``url`` answered.
Probe = Callable[[str, float], Deferred[int]]

#: health polling: first probe right after spawn, then these sleeps, doubling.
POLL_FIRST_DELAY = 0.01
POLL_MAX_DELAY = 0.25
#: Health polls wait a tenth of the time spent so far (within the bounds
#: above): a server that takes T to start is seen ready by T * 1.1 at worst,
#: while a slow loader is not polled more than four times a second.
POLL_BACKOFF_FRACTION = 0.1
#: upper bound for one health probe (also bounded by the remaining deadline).
PROBE_TIMEOUT = 5.0


def poll_delay(elapsed: float) -> float:
    """The pause before the next health probe, ``elapsed`` seconds into a start."""
    return min(max(elapsed * POLL_BACKOFF_FRACTION, POLL_FIRST_DELAY), POLL_MAX_DELAY)


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


def http_probe(reactor: Any) -> Probe:
    """A probe that GETs a URL and returns the status code (body discarded).

    ``reactor`` provides ``IReactorTime`` and ``IReactorTCP``."""
    # Not persistent: each probe on a fresh connection, as a client would.
    agent = Agent.usingEndpointFactory(reactor, UpstreamEndpoints(reactor))

    def probe(url: str, timeout: float) -> Deferred[int]:
        def status(response: Any) -> int:
            response.deliverBody(_Discard())
            return cast(int, response.code)

        return agent.request(b"GET", url.encode("utf-8")).addCallback(status)

    return probe


def _cancelled_as_such(d: Deferred[T]) -> Deferred[T]:
    """``d``, except that cancelling the result always fails it with
    :class:`CancelledError` (an Agent request fails with another error)."""

    def cancel(outer: Deferred[T]) -> None:
        outer.errback(CancelledError())
        d.cancel()

    outer: Deferred[T] = Deferred(cancel)

    def forward(result: T | Failure) -> None:
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

    d.addBoth(forward)
    return outer


async def poll_health(
    clock: IReactorTime, probe: Probe, url: str, deadline: float, model_id: str
) -> bool:
    """Probe ``url`` until it answers 200 (True) or ``deadline`` passes (False).

    Cancelling stops at once with :class:`CancelledError`, whatever the probe
    in progress fails with when cancelled."""
    began = clock.seconds()
    while True:
        remaining = deadline - clock.seconds()
        if remaining <= 0:
            return False
        timeout = min(PROBE_TIMEOUT, remaining)
        attempt = maybeDeferred(probe, url, timeout).addTimeout(timeout, clock)
        try:
            if await _cancelled_as_such(attempt) == 200:
                return True
        except CancelledError:
            raise
        except Exception as e:
            log.debug("{model} health probe failed: {error!r}", model=model_id, error=e)
        remaining = deadline - clock.seconds()
        if remaining <= 0:
            return False
        await deferLater(clock, min(poll_delay(clock.seconds() - began), remaining))
