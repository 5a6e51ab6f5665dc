"""Health probing: is a freshly started server answering yet?

A :data:`Probe` asks once (real: an HTTP GET, see :func:`http_probe`);
:func:`poll_health` asks again and again, on a cadence that adapts to how long
the server has been starting, until it answers 200 or a deadline passes.
Each probe has its own time-out (never past the deadline), so a server that
accepts connections and never answers cannot stall a start; when the deadline
passes, the verdict says what the last probe saw ("connection refused",
"status 404", "no answer within 5s").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, cast

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeout
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
#: a probe given less time than this (the deadline's last moment) does not
#: replace what an earlier probe saw in the time-out message
_SQUEEZED = 0.25


def poll_delay(elapsed: float) -> float:
    """The pause before the next health probe, ``elapsed`` seconds into a start."""
    return min(max(elapsed * POLL_BACKOFF_FRACTION, POLL_FIRST_DELAY), POLL_MAX_DELAY)


class _Discard(Protocol):
    """Reads no body: the status is all a probe needs, so the connection is
    closed at once (a server streaming a body forever holds nothing)."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        pass


class HealthVerdict(NamedTuple):
    """How :func:`poll_health` ended: healthy, or not by the deadline and
    what the last probe saw ("" when none could run)."""

    healthy: bool
    last_seen: str = ""


def describe_probe_failure(error: BaseException, timeout: float) -> str:
    """What a probe that failed with ``error`` saw, in a few words."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (DeferredTimeout, ConnectTimeout)):
        return f"no answer within {round(timeout, 2):g}s"
    if isinstance(error, ConnectingCancelledError):  # our time-out, while connecting
        return f"not connected within {round(timeout, 2):g}s"
    if isinstance(error, DNSLookupError):
        return f"host name not found ({error})"
    reasons = getattr(error, "reasons", None)  # the HTTP client's ResponseFailed & co
    if reasons:
        if any(r.check(CancelledError) for r in reasons):
            # The request was cancelled by the probe's time-out.
            return f"no answer within {round(timeout, 2):g}s"
        if any(r.check(ConnectionClosed) for r in reasons):
            return "connection closed without an HTTP response"
        return "; ".join(str(r.value) for r in reasons)
    if isinstance(error, ConnectError):
        return str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


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
) -> HealthVerdict:
    """Probe ``url`` until it answers 200 or ``deadline`` passes.

    Cancelling stops at once with :class:`CancelledError`, whatever the probe
    in progress fails with when cancelled."""
    began = clock.seconds()
    last_seen = ""
    while True:
        remaining = deadline - clock.seconds()
        if remaining <= 0:
            return HealthVerdict(False, last_seen)
        timeout = min(PROBE_TIMEOUT, remaining)
        attempt = maybeDeferred(probe, url, timeout).addTimeout(timeout, clock)
        try:
            status = await _cancelled_as_such(attempt)
        except CancelledError:
            raise
        except Exception as e:
            # A probe squeezed into the deadline's last moment saw nothing:
            # what the one before it saw says more ("status 503", not "no
            # answer within 0s").
            if not (last_seen and timeout < _SQUEEZED):
                last_seen = describe_probe_failure(e, timeout)
            log.debug("{model} health probe failed: {error!r}", model=model_id, error=e)
        else:
            if status == 200:
                return HealthVerdict(True)
            last_seen = f"status {status}"
        remaining = deadline - clock.seconds()
        if remaining <= 0:
            return HealthVerdict(False, last_seen)
        await deferLater(clock, min(poll_delay(clock.seconds() - began), remaining))
