"""Log output, the same under ``twistd -n llamaswap`` and the ``llamaswap``
console script.

twistd's ``--logger`` option takes a factory of the log observer; ours
(:func:`observer`) writes twistd's usual text format to stdout (journal
lines with syslog priorities when stdout is connected to journald),
filtered by the config's ``logLevel`` (set once the config is loaded).  The
console script names it with ``--logger``; under ``twistd`` the plugin's
options name it too (:func:`adopt_twistd_logging`) unless the command line
chose a logger, so both print the same lines.  With ``--logfile`` or
``--syslog`` (or as a daemon) twistd's own destination is kept, filtered the
same way.

Stdout is written without blocking (:mod:`.console`): one writer carries
llamaswap's own lines and, with ``logToStdout: upstream|both``, the model
servers' output (:func:`stdout_writer`).  With ``logToStdout: upstream`` or
``none`` llamaswap's own lines below ERROR stay off stdout.
"""

from __future__ import annotations

import atexit
from collections.abc import MutableMapping
from typing import IO, Any, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
)
from zope.interface import implementer

from llamaswap.core.loglevels import parse_level
from llamaswap.service.console import ConsoleStream, ConsoleWriter
from llamaswap.service.journal import journald_observer

#: stdout's descriptor (``sys.stdout`` is twistd's log redirection while it runs).
STDOUT_FD = 1
#: the factory's importable name, for ``--logger``.
OBSERVER_NAME = "llamaswap.service.logsetup.observer"

_level_filter = LogLevelFilterPredicate(LogLevel.info)
#: twistd's options when :func:`adopt_twistd_logging` saw them.
_twistd_options: MutableMapping[str, Any] | None = None
_console: ConsoleWriter | None = None


def set_log_level(name: str) -> None:
    """Apply a config ``logLevel`` (debug/info/warn/error)."""
    _level_filter.defaultLogLevel = parse_level(name)
    _level_filter.clearLogLevels()


@implementer(ILogFilterPredicate)
class _StdoutModeFilter:
    """``logToStdout: upstream|none``: llamaswap's own lines reach stdout
    only from ERROR up (so a failure to start is still seen)."""

    own_lines = True

    def __call__(self, event: LogEvent) -> PredicateResult:
        if self.own_lines:
            return PredicateResult.maybe
        level = event.get("log_level")
        if level in (LogLevel.error, LogLevel.critical):
            return PredicateResult.maybe
        return PredicateResult.no


_mode_filter = _StdoutModeFilter()


def set_log_to_stdout(mode: str) -> None:
    """Apply a config ``logToStdout`` (read once: changing it needs a restart)."""
    _mode_filter.own_lines = mode not in ("upstream", "none")


def adopt_twistd_logging(server_options: MutableMapping[str, Any] | None) -> None:
    """Called from the plugin's options with twistd's: name :func:`observer`
    as the ``--logger`` unless the command line chose one."""
    global _twistd_options
    if server_options is None:
        return
    _twistd_options = server_options
    if not server_options.get("logger"):
        server_options["logger"] = OBSERVER_NAME


def stdout_writer(reactor: Any = None) -> ConsoleWriter:
    """The one non-blocking writer for stdout (made on first use; what is
    left in it is written, for a moment at most, once the reactor has stopped
    and when the process exits)."""
    global _console
    if _console is None:
        if reactor is None:
            from twisted.internet import reactor
        _console = ConsoleWriter(STDOUT_FD, reactor)
        # twistd may end by re-raising a stop signal (no atexit): write what
        # waits once the reactor has stopped, too.
        reactor.addSystemEventTrigger("after", "shutdown", _console.flush)
        atexit.register(_console.close)
    return _console


def write_stdout(data: bytes) -> None:
    """Write bytes to stdout through :func:`stdout_writer`."""
    stdout_writer().write(data)


def _to_stdout() -> bool:
    """Whether twistd would log to stdout (``-n`` without ``--logfile``/``--syslog``)."""
    options = _twistd_options
    if options is None:
        return True
    if options.get("syslog"):
        return False
    logfile = options.get("logfile")
    return bool(options.get("nodaemon")) and logfile in (None, "", "-")


def _twistd_destination() -> ILogObserver:
    """twistd's own observer for ``--logfile``/``--syslog``/daemon mode."""
    from twisted.scripts._twistd_unix import UnixAppLogger

    made = UnixAppLogger(_twistd_options)._getLogObserver()
    if ILogObserver.providedBy(made):
        return made
    from twisted.logger import LegacyLogObserverWrapper

    return LegacyLogObserverWrapper(made)


def observer() -> ILogObserver:
    """The observer factory for ``twistd --logger``: journal lines with
    priorities under systemd, twistd's text format otherwise, on stdout
    without blocking; filtered by ``logLevel`` and ``logToStdout``."""
    if not _to_stdout():
        return FilteringLogObserver(_twistd_destination(), [_level_filter])
    stream = ConsoleStream(stdout_writer())
    return FilteringLogObserver(
        journald_observer(cast(IO[str], stream)), [_level_filter, _mode_filter]
    )
