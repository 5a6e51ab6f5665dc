"""An orderly graceful stop: SIGTERM stops listening, waits (bounded) for
in-flight requests, then stops the model processes.  A second SIGTERM or
SIGINT cuts the wait short.

:class:`ShutdownGrace` is the bounded wait, :class:`DrainService` puts it in
the service tree, and :class:`SequentialMultiService` stops the tree's
children one after another so the order holds.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llamaswap.scheduling import SchedulerSnapshot

log = Logger()

#: How long a stop waits for in-flight requests before stopping the models.
DEFAULT_GRACE_SECONDS = 10.0


class ShutdownGrace:
    """The stop budget for in-flight requests.

    :meth:`wait` fires once ``in_flight()`` reaches 0 or ``grace_seconds``
    have passed, whichever comes first; :meth:`hurry` (a repeated stop
    signal) shortens what is left of the grace, before or during the wait.
    """

    def __init__(
        self,
        clock: IReactorTime,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        *,
        poll_interval: float = 0.1,
        report_interval: float = 2.0,
    ) -> None:
        self._clock = clock
        self.grace_seconds = grace_seconds
        self._poll_interval = poll_interval
        self._report_interval = report_interval
        #: the most the wait may last (lowered by :meth:`hurry`).
        self._allowance = grace_seconds
        self._drain: _Drain | None = None
        self._over = False

    @property
    def waiting(self) -> bool:
        return self._drain is not None

    def wait(
        self, in_flight: Callable[[], int], describe: Callable[[], str] | None = None
    ) -> Deferred[None]:
        """Wait for ``in_flight()`` to reach 0, at most the grace.

        ``describe()`` names what is in flight, for the logs.  Cancelling
        stops the wait and its timers.
        """
        if self._drain is not None:
            raise RuntimeError("already waiting for in-flight requests")
        count = in_flight()
        if count == 0:
            log.info("no requests in flight")
            return defer.succeed(None)
        if self._allowance <= 0:
            log.warn(
                "not waiting for {count} in-flight requests{detail}",
                count=count,
                detail=_detail(describe),
            )
            return defer.succeed(None)
        log.info(
            "stopped accepting connections; waiting up to {seconds:g}s for {count}"
            " in-flight requests to finish{detail}",
            seconds=self._allowance,
            count=count,
            detail=_detail(describe),
        )
        done: Deferred[None] = Deferred(lambda _: None if self._end() else None)
        poll = LoopingCall(self._poll)
        poll.clock = self._clock
        now = self._clock.seconds()
        self._drain = _Drain(
            in_flight=in_flight,
            describe=describe,
            done=done,
            poll=poll,
            timer=self._clock.callLater(self._allowance, self._expire),
            next_report=now + self._report_interval,
        )
        poll.start(self._poll_interval, now=False)
        return done

    def hurry(self, reason: str = "stop requested again", remaining: float = 0.0) -> None:
        """Cut what is left of the grace to at most ``remaining`` seconds."""
        self._allowance = min(self._allowance, remaining)
        drain = self._drain
        if drain is None:
            if self._over:
                log.info(
                    "{reason}: no longer waiting for requests; the model processes are"
                    " stopping (each within its unloadTimeout)",
                    reason=reason,
                )
            else:
                log.info(
                    "{reason}: shutdown grace cut to {seconds:g}s",
                    reason=reason,
                    seconds=self._allowance,
                )
            return
        left = drain.timer.getTime() - self._clock.seconds()
        if remaining >= left:
            return
        count = drain.in_flight()
        if remaining <= 0:
            log.warn(
                "{reason}: no longer waiting for {count} in-flight requests{detail}",
                reason=reason,
                count=count,
                detail=_detail(drain.describe),
            )
            self._finish()
            return
        log.info(
            "{reason}: waiting at most {seconds:g}s more for {count} in-flight requests",
            reason=reason,
            seconds=remaining,
            count=count,
        )
        drain.timer.reset(remaining)

    def _poll(self) -> None:
        drain = self._drain
        if drain is None:
            return
        count = drain.in_flight()
        if count == 0:
            log.info("in-flight requests finished")
            self._finish()
            return
        now = self._clock.seconds()
        if now >= drain.next_report:
            drain.next_report = now + self._report_interval
            log.info(
                "still waiting for {count} in-flight requests ({left:.0f}s of grace left){detail}",
                count=count,
                left=max(0.0, drain.timer.getTime() - now),
                detail=_detail(drain.describe),
            )

    def _expire(self) -> None:
        drain = self._drain
        if drain is None:
            return
        log.warn(
            "shutdown grace is over: stopping with {count} requests still in flight{detail}",
            count=drain.in_flight(),
            detail=_detail(drain.describe),
        )
        self._finish()

    def _end(self) -> _Drain | None:
        """Stop the timers; returns the finished wait."""
        drain, self._drain = self._drain, None
        if drain is None:
            return None
        if drain.poll.running:
            drain.poll.stop()
        if drain.timer.active():
            drain.timer.cancel()
        self._over = True
        return drain

    def _finish(self) -> None:
        drain = self._end()
        if drain is not None:
            drain.done.callback(None)


class _Drain:
    """One wait in progress."""

    __slots__ = ("in_flight", "describe", "done", "poll", "timer", "next_report")

    def __init__(
        self,
        *,
        in_flight: Callable[[], int],
        describe: Callable[[], str] | None,
        done: Deferred[None],
        poll: LoopingCall,
        timer: IDelayedCall,
        next_report: float,
    ) -> None:
        self.in_flight = in_flight
        self.describe = describe
        self.done = done
        self.poll = poll
        self.timer = timer
        self.next_report = next_report


def _detail(describe: Callable[[], str] | None) -> str:
    if describe is None:
        return ""
    try:
        text = describe()
    except Exception:
        log.failure("describing in-flight requests failed")
        return ""
    return f" ({text})" if text else ""


class ShutdownReactor(Protocol):
    """What :class:`DrainService` needs of the reactor."""

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> Any: ...

    def removeSystemEventTrigger(self, triggerID: Any) -> None: ...

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kw: Any) -> None: ...


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: logged when the shutdown begins (after the first Ctrl-C or SIGTERM).
SECOND_SIGNAL_HINT = (
    "shutting down: finishing requests in flight, then stopping the models;"
    " press Ctrl-C again (or send SIGTERM again) to stop at once"
)


def hurry_on_signals(
    reactor: ShutdownReactor, grace: ShutdownGrace, signums: Sequence[int] = STOP_SIGNALS
) -> Callable[[], None]:
    """Make ``signums`` call :meth:`ShutdownGrace.hurry` from now on.

    Meant for after the first stop signal: twistd's own handlers turned it
    into ``reactor.stop()``; calling them again would only log
    ``ReactorNotRunning``.  Must run in the main thread.  Returns a function
    restoring the previous handlers.
    """

    def handle(signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(grace.hurry, f"{signal.Signals(signum).name} received again")

    previous = {signum: signal.signal(signum, handle) for signum in signums}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


class DrainService(service.Service):
    """Waits for in-flight requests when stopped, at most the grace.

    Put it in a :class:`SequentialMultiService` after the service owning the
    model processes and before the web endpoint, so stopping runs: stop
    listening, drain, stop the models.  With a ``reactor``, once the reactor
    begins to shut down, SIGTERM and SIGINT shorten the grace
    (:func:`hurry_on_signals`).
    """

    name = "drain"  # type: ignore[assignment]

    def __init__(
        self,
        grace: ShutdownGrace,
        in_flight: Callable[[], int],
        *,
        describe: Callable[[], str] | None = None,
        reactor: ShutdownReactor | None = None,
        signums: Sequence[int] = STOP_SIGNALS,
    ) -> None:
        self._grace = grace
        self._in_flight = in_flight
        self._describe = describe
        self._reactor = reactor
        self._signums = tuple(signums)
        self._trigger: Any = None

    def startService(self) -> None:
        super().startService()
        if self._reactor is not None and self._trigger is None:
            # A "before shutdown" trigger added now runs ahead of twistd's
            # stopService trigger, which twistd adds after starting the tree.
            self._trigger = self._reactor.addSystemEventTrigger(
                "before", "shutdown", self._shutdown_began
            )

    def _shutdown_began(self) -> None:
        self._trigger = None
        assert self._reactor is not None
        try:
            hurry_on_signals(self._reactor, self._grace, self._signums)
        except ValueError as error:  # not the main thread
            log.warn("repeated stop signals will not hurry shutdown: {error}", error=error)
        else:
            log.info(SECOND_SIGNAL_HINT)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._trigger is not None:
            assert self._reactor is not None
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        return self._grace.wait(self._in_flight, self._describe)


def relayed_requests(
    snapshot: Callable[[], SchedulerSnapshot],
) -> tuple[Callable[[], int], Callable[[], str]]:
    """What a stop drains: ``(count, describe)`` of the requests being
    relayed to an upstream (granted, in flight).  Requests only waiting for a
    model to start (queued, or behind a swap or the startup preload) are not
    waited for: stopping the models answers them ``503``, and a load that
    nobody would use is not worth the grace."""

    def count() -> int:
        return sum(snapshot().in_flight.values())

    def describe() -> str:
        return ", ".join(f"{m}: {n}" for m, n in sorted(snapshot().in_flight.items()))

    return count, describe


class SequentialMultiService(service.MultiService):
    """A ``MultiService`` that stops its children one at a time, the last
    added first, each once the previous one's stop has finished.

    (``MultiService`` stops them all at once, so the models would be stopped
    while requests still stream from them.)
    """

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {service} failed", service=child.name or child)
