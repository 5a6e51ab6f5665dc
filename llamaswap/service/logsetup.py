"""Log output for the ``llamaswap`` console script.

twistd's ``--logger`` option takes a factory of the log observer; ours
writes twistd's usual text format to stdout (journal lines with syslog
priorities when stdout is connected to journald), filtered by the config's
``logLevel`` (set once the config is loaded).
"""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
)

from llamaswap.core.loglevels import parse_level
from llamaswap.service.systemd import journald_observer

_level_filter = LogLevelFilterPredicate(LogLevel.info)


def set_log_level(name: str) -> None:
    """Apply a config ``logLevel`` (debug/info/warn/error)."""
    _level_filter.defaultLogLevel = parse_level(name)
    _level_filter.clearLogLevels()


def observer() -> ILogObserver:
    """The observer factory for ``twistd --logger``: journal lines with
    priorities under systemd, twistd's text format otherwise."""
    return FilteringLogObserver(journald_observer(sys.stdout), [_level_filter])
