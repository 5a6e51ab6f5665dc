"""Running under systemd: readiness and status notifications, an orderly
graceful stop, and log lines journald understands.

* :class:`Notifier` speaks the sd_notify(3) protocol itself: one datagram of
  ``KEY=VALUE`` lines to the AF_UNIX socket named by ``NOTIFY_SOCKET``
  (``@name`` is an abstract socket), sent without blocking.  Without that
  variable every call does nothing.
* :class:`SystemdNotifyService` sends ``READY=1`` when the service tree has
  started, ``STATUS=`` lines when told, ``WATCHDOG=1`` pings and
  ``STOPPING=1``.
* :class:`ShutdownGrace`, :class:`DrainService` and
  :class:`SequentialMultiService` give SIGTERM its order: stop listening, wait
  (bounded) for in-flight requests, then stop the model processes.  A second
  SIGTERM or SIGINT cuts the wait short.
* :func:`journald_observer` is a ``twistd --logger`` factory writing
  ``<priority>``-prefixed lines when stdout is connected to the journal.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from types import FrameType
from typing import IO, Any, Protocol

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    eventAsText,
    formatEvent,
)

log = Logger()

#: How long a stop waits for in-flight requests before stopping the models.
DEFAULT_GRACE_SECONDS = 10.0

_ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _socket_address(value: str) -> str | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value, or ``None``."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _status_lines(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.splitlines()),)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or
    ``None`` when the watchdog is off or meant for another process."""
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner.strip() != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000


class Notifier:
    """Sends sd_notify messages to the service manager.

    Sends never block: the socket is non-blocking and a message that cannot
    be sent now (systemd's queue is full, the socket is gone) is dropped and
    logged.  Each method returns whether the message went out.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        watchdog_interval: float | None = None,
        monotonic_usec: Callable[[], int] = _monotonic_usec,
    ) -> None:
        self._address = _socket_address(address) if address else None
        if address and self._address is None:
            log.warn(
                "ignoring NOTIFY_SOCKET={address}: not an absolute path or @name",
                address=address,
            )
        #: seconds between watchdog pings, when systemd asked for them.
        self.watchdog_interval = watchdog_interval if self._address is not None else None
        self._monotonic_usec = monotonic_usec
        self._socket: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        pid: int | None = None,
        unset: bool = True,
    ) -> Notifier:
        """A notifier for the socket systemd gave us (none: a no-op one).

        With ``unset`` (the default) the variables are removed from
        ``environ`` so the model processes we spawn cannot notify in our name
        or inherit our watchdog.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        interval = watchdog_interval(env, os.getpid() if pid is None else pid)
        if unset:
            for name in _ENVIRONMENT:
                env.pop(name, None)
        return cls(address, watchdog_interval=interval)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments as one notification."""
        if self._address is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8")
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(message, self._address)
        except OSError as error:
            # Warn once per run of failures; the watchdog would repeat it.
            level = LogLevel.debug if self._failing else LogLevel.warn
            log.emit(
                level,
                "systemd notification dropped ({error}): {notification!r}",
                error=error.strerror or error,
                notification=message[:200],
            )
            self._failing = True
            return False
        self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup or a reload finished."""
        return self.send("READY=1", *_status_lines(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload begins; follow with :meth:`ready` once it is done.

        ``MONOTONIC_USEC`` is what ``Type=notify-reload`` requires to tell
        this reload from an earlier one."""
        return self.send(
            "RELOADING=1", f"MONOTONIC_USEC={self._monotonic_usec()}", *_status_lines(status)
        )

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status_lines(status))

    def status(self, text: str) -> bool:
        return self.send(*_status_lines(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class _HasState(Protocol):
    @property
    def state(self) -> str: ...


def running_models_status(processes: Mapping[str, _HasState]) -> str:
    """A ``STATUS=`` text naming the models that are not stopped (``state``
    is a :class:`llamaswap.supervision.process.ProcessState`, a ``str``)."""
    active = [
        f"{model} ({process.state})"
        for model, process in sorted(processes.items())
        if process.state not in ("stopped", "shutdown")
    ]
    return "running " + ", ".join(active) if active else "no model running"


class SystemdNotifyService(service.Service):
    """Tells systemd about the service tree's life.

    Add it to the tree after the web endpoint service, so ``READY=1`` goes out
    once we listen (endpoint services listen synchronously for tcp, unix and
    systemd endpoints); in a :class:`SequentialMultiService` it is then also
    the first to stop, sending ``STOPPING=1`` before anything else happens.
    """

    name = "systemd-notify"  # type: ignore[assignment]

    def __init__(
        self, notifier: Notifier, clock: IReactorTime, status_source: Callable[[], str]
    ) -> None:
        self._notifier = notifier
        self._clock = clock
        self._status_source = status_source
        self._watchdog: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._notifier.ready(self._status())
        interval = self._notifier.watchdog_interval
        if interval:
            log.info("pinging the systemd watchdog every {interval}s", interval=interval)
            self._watchdog = LoopingCall(self._notifier.watchdog)
            self._watchdog.clock = self._clock
            self._watchdog.start(interval, now=False).addErrback(
                lambda failure: log.failure("systemd watchdog pings stopped", failure)
            )

    def update_status(self) -> None:
        """Send a fresh ``STATUS=`` line (call it when the status changes)."""
        if self.running and self._notifier.enabled:
            self._notifier.status(self._status())

    def reload(self, operation: Callable[[], Awaitable[object] | object]) -> Deferred[None]:
        """Run ``operation`` (a config reload) between ``RELOADING=1`` and
        ``READY=1``; fires with its outcome.  A failed reload still ends with
        ``READY=1``: the previous configuration keeps running."""
        return Deferred.fromCoroutine(self._reload(operation))

    async def _reload(self, operation: Callable[[], Awaitable[object] | object]) -> None:
        self._notifier.reloading("reloading the configuration")
        try:
            await defer.maybeDeferred(operation)
        except Exception as error:
            self._notifier.ready(f"reload failed ({error}); {self._status()}")
            raise
        self._notifier.ready(self._status())

    def stopService(self) -> None:
        super().stopService()
        if self._watchdog is not None:
            if self._watchdog.running:
                self._watchdog.stop()
            self._watchdog = None
        self._notifier.stopping("stopping")

    def _status(self) -> str:
        try:
            return self._status_source()
        except Exception:
            log.failure("status for systemd failed")
            return "running"


# -- graceful stop ------------------------------------------------------------


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

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._trigger is not None:
            assert self._reactor is not None
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        return self._grace.wait(self._in_flight, self._describe)


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


# -- logging ------------------------------------------------------------------

_PRIORITIES = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def is_journal_stream(stream: IO[Any], journal_stream: str | None) -> bool:
    """Whether ``stream`` is the journal connection systemd described in
    ``JOURNAL_STREAM`` (``device:inode``)."""
    if not journal_stream:
        return False
    try:
        device, inode = (int(part) for part in journal_stream.split(":"))
        status = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (status.st_dev, status.st_ino) == (device, inode)


def format_journal_event(event: Mapping[str, Any]) -> str | None:
    """One event as journal lines: each line prefixed with its syslog
    priority (``<6>``), no timestamp (journald adds its own), no colours."""
    text = eventAsText(
        dict(event), includeTraceback=True, includeTimestamp=False, includeSystem=False
    )
    if not text:
        return None
    priority = _PRIORITIES.get(event.get("log_level", LogLevel.info), 6)
    system = event.get("log_system") or event.get("log_namespace") or "-"
    lines = _ANSI.sub("", text).splitlines() or [""]
    first = f"<{priority}>[{system}] {lines[0]}\n"
    return first + "".join(f"<{priority}>{line}\n" for line in lines[1:])


def journald_observer(
    stream: IO[str] | None = None, environ: Mapping[str, str] | None = None
) -> ILogObserver:
    """A log observer factory for ``twistd --logger``: journal lines when
    stdout is the journal (``JOURNAL_STREAM`` matches), twistd's usual text
    lines otherwise."""
    out = sys.stdout if stream is None else stream
    env = os.environ if environ is None else environ
    if is_journal_stream(out, env.get("JOURNAL_STREAM")):
        return FileLogObserver(out, format_journal_event)
    return FileLogObserver(out, format_text_event)


_stamp_cache: list[Any] = [None, ""]


def _stamp(when: float) -> str:
    """twistd's ``2026-01-02T03:04:05+0000``, formatted once per second."""
    second = int(when)
    if _stamp_cache[0] != second:
        _stamp_cache[0] = second
        _stamp_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
    return _stamp_cache[1]


def format_text_event(event: LogEvent) -> str | None:
    """twistd's classic text line (``<time> [<system>] <message>``), with
    the timestamp cached per second: every request logs an access line."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = (text + "\n" if text else "") + failure.getTraceback()
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
    body = text.replace("\n", "\n\t")
    return f"{_stamp(event.get('log_time') or time.time())} [{system}] {body}\n"
