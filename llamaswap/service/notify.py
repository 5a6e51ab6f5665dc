"""sd_notify(3): readiness, reload, status, watchdog and stopping
notifications to systemd.

* :class:`Notifier` speaks the protocol itself: one datagram of
  ``KEY=VALUE`` lines to the AF_UNIX socket named by ``NOTIFY_SOCKET``
  (``@name`` is an abstract socket), sent without blocking.  Without that
  variable every call does nothing.
* :class:`SystemdNotifyService` sends ``READY=1`` once the service tree has
  started and the reactor runs, ``STATUS=`` lines when told, ``WATCHDOG=1``
  pings and ``STOPPING=1``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

log = Logger()

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


class NotifyReactor(Protocol):
    """What :class:`SystemdNotifyService` needs of the reactor: time (the
    watchdog) and a call once it runs."""

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> Any: ...

    def seconds(self) -> float: ...

    def callWhenRunning(self, callable: Callable[..., Any], *args: Any, **kw: Any) -> Any: ...


class SystemdNotifyService(service.Service):
    """Tells systemd about the service tree's life.

    Add it to the tree after the web endpoint service, so ``READY=1`` goes out
    once we listen (endpoint services listen synchronously for tcp, unix and
    systemd endpoints); in a :class:`SequentialMultiService` it is then also
    the first to stop, sending ``STOPPING=1`` before anything else happens.

    twistd starts the service tree before the reactor runs, and the reactor
    installs its SIGTERM/SIGINT handlers only as it starts running: a
    ``READY=1`` sent from ``startService`` would let systemd stop us while a
    SIGTERM still kills the process outright (no ``STOPPING=1``, children
    left behind).  So ``READY=1`` waits for ``callWhenRunning``, which runs
    after the handlers are installed.
    """

    name = "systemd-notify"  # type: ignore[assignment]

    def __init__(
        self, notifier: Notifier, reactor: NotifyReactor, status_source: Callable[[], str]
    ) -> None:
        self._notifier = notifier
        self._reactor = reactor
        self._status_source = status_source
        self._watchdog: LoopingCall | None = None
        self._announced = False

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._announce_ready)

    def _announce_ready(self) -> None:
        """The reactor runs, with its signal handlers: tell systemd we are up."""
        if not self.running or self._announced:
            return  # stopped before the reactor ran, or a restart's second call
        self._announced = True
        self._notifier.ready(self._status())
        interval = self._notifier.watchdog_interval
        if interval:
            log.info("pinging the systemd watchdog every {interval}s", interval=interval)
            self._watchdog = LoopingCall(self._notifier.watchdog)
            self._watchdog.clock = self._reactor  # type: ignore[assignment]  # an IReactorTime
            self._watchdog.start(interval, now=False).addErrback(
                lambda failure: log.failure("systemd watchdog pings stopped", failure)
            )

    def update_status(self) -> None:
        """Send a fresh ``STATUS=`` line (call it when the status changes)."""
        if self._announced and self._notifier.enabled:
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
        self._announced = False
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
