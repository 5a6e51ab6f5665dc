"""Reloading the configuration: on SIGHUP, on a changed file, coalesced.

A reload re-reads the config sources (from a thread: parsing is file I/O)
and hands the new config to the service, which applies it without dropping
requests (docs/design.md, difference 4).  A reload asked for while one runs
is not dropped: one more follows, so the last change always wins.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaswap.config import Config, ConfigError
from llamaswap.config.loader import load_config_sources
from llamaswap.config.merge import config_dir_files
from llamaswap.service.systemd import SystemdNotifyService

log = Logger()

#: the config file and the config directory (``--config``, ``--config-dir``)
Sources = tuple[str | None, str | None]


async def read_sources(sources: Sources) -> Config:
    """Load ``sources`` from a thread; a rejected config is logged line by
    line, then its :class:`ConfigError` raised."""
    path, config_dir = sources
    try:
        return await threads.deferToThread(load_config_sources, path, config_dir)
    except ConfigError as exc:
        log.warn("failed to reload config; keeping the running one:")
        for problem in exc.problems:
            log.warn("  {problem}", problem=problem)
        raise


class Coalescing:
    """Runs ``work`` when called; a call while it runs asks for one more run
    after it, and shares the running Deferred.

    A run that fails does not drop the one asked for meanwhile (a broken
    config file, then the fixed one: the fixed one is applied); the shared
    Deferred has the outcome of the last run."""

    def __init__(self, work: Callable[[], Awaitable[None]]) -> None:
        self._work = work
        self._running: defer.Deferred[None] | None = None
        self._again = False

    def __call__(self) -> defer.Deferred[None]:
        if self._running is not None:
            self._again = True
            return self._running
        self._running = defer.Deferred.fromCoroutine(self._until_settled())
        return self._running

    async def _until_settled(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    await self._work()
                except Exception:
                    if not self._again:
                        raise
                    # Superseded by the run asked for meanwhile: report it here.
                    _reload_failed(Failure())
                if not self._again:
                    return
        finally:
            self._running = None


class Reloadable(Protocol):
    """What :class:`ReloadService` reloads: the running service."""

    sources: Sources

    def reload(self) -> defer.Deferred[None]: ...


def _reload_failed(failure: Failure) -> None:
    """A rejected config was already reported line by line; anything else is a bug."""
    if not failure.check(ConfigError):
        log.failure("reload failed", failure)


class ReloadService(service.Service):
    """Reloads on SIGHUP and, with ``--watch-config``, when a source changes.

    The watcher polls the sources' mtime and size every ``interval`` seconds
    (from a thread: ``stat`` is file I/O); the first poll is the baseline.
    """

    name = "reload"  # type: ignore[assignment]

    def __init__(
        self,
        core: Reloadable,
        reactor: Any,
        *,
        watch: bool = False,
        interval: float = 2.0,
        notify: SystemdNotifyService | None = None,
    ) -> None:
        self._core = core
        self._reactor = reactor
        self._watch = watch
        self._interval = interval
        self._notify = notify
        self._poller: task.LoopingCall | None = None
        self._seen: object = None
        self._previous_handler: Any = None

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
        if self._watch:
            self._poller = task.LoopingCall(self._poll)
            self._poller.clock = self._reactor
            self._poller.start(self._interval, now=True).addErrback(
                lambda f: log.failure("config watcher stopped", f)
            )

    def stopService(self) -> None:
        super().stopService()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        if self._poller is not None and self._poller.running:
            self._poller.stop()

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.trigger, "SIGHUP")

    def trigger(self, why: str) -> defer.Deferred[None]:
        log.info("reloading the configuration ({why})", why=why)
        if self._notify is not None:
            d = self._notify.reload(self._core.reload)
        else:
            d = self._core.reload()
        return d.addErrback(_reload_failed)

    async def _poll(self) -> None:
        path, config_dir = self._core.sources
        current = await threads.deferToThread(fingerprint, path, config_dir)
        previous, self._seen = self._seen, current
        if previous is not None and current != previous and current is not None:
            self.trigger("a config file changed")


def fingerprint(path: str | None, config_dir: str | None) -> object:
    """mtime and size of every config source; ``None`` when one is missing
    (a rename-style write in progress: wait for the next poll)."""
    files = []
    if path:
        files.append(path)
    if config_dir:
        try:
            files.extend(config_dir_files(config_dir))
        except OSError:
            return None
    result = []
    for name in files:
        try:
            stat = os.stat(name)
        except OSError:
            return None
        result.append((name, stat.st_mtime_ns, stat.st_size))
    return tuple(result)
