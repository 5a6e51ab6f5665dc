"""The one table of log levels: config names, ``LogLevel`` values, labels,
syslog priorities and order.

The config's ``logLevel`` names a level (``debug``, ``info``, ``warn``,
``error``); the proxy log labels lines ``[DEBUG]`` ... ``[ERROR]``; both the
proxy log and twistd's own output filter by it; journal lines carry its syslog
priority.  All of them read this table.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

from twisted.logger import LogLevel

__all__ = ["LEVELS", "label", "logs_info", "parse_level", "rank", "syslog_priority"]

#: ``logLevel`` names, in increasing severity, and their ``LogLevel``.
LEVELS: Mapping[str, LogLevel] = MappingProxyType(
    {
        "debug": LogLevel.debug,
        "info": LogLevel.info,
        "warn": LogLevel.warn,
        "error": LogLevel.error,
    }
)
#: Other spellings accepted for a level.
_ALIASES: Mapping[str, LogLevel] = {"warning": LogLevel.warn}
#: Per level, in increasing severity: the proxy log's line label and the
#: syslog priority journald reads from a ``<N>`` line prefix.  llama-swap has
#: no CRITICAL, so Twisted's critical is labelled ERROR.
_TABLE: Mapping[LogLevel, tuple[str, int]] = MappingProxyType(
    {
        LogLevel.debug: ("DEBUG", 7),
        LogLevel.info: ("INFO", 6),
        LogLevel.warn: ("WARN", 4),
        LogLevel.error: ("ERROR", 3),
        LogLevel.critical: ("ERROR", 2),
    }
)
_ORDER = tuple(_TABLE)


def parse_level(value: str | LogLevel) -> LogLevel:
    """A config ``logLevel`` as a ``LogLevel``; unknown names mean info, as in llama-swap."""
    if isinstance(value, str):
        name = value.strip().lower()
        return LEVELS.get(name) or _ALIASES.get(name, LogLevel.info)
    return value


def label(level: LogLevel) -> str:
    """The ``[LABEL]`` of a proxy log line; INFO for anything unknown."""
    entry = _TABLE.get(level)
    return entry[0] if entry is not None else "INFO"


def rank(level: LogLevel) -> int:
    """Position in increasing severity, for filtering (unknown counts as info)."""
    return _ORDER.index(level) if level in _ORDER else 1


@functools.lru_cache(maxsize=16)
def logs_info(log_level: str) -> bool:
    """Whether a config ``logLevel`` lets info lines (the access log) through."""
    return rank(parse_level(log_level)) <= rank(LogLevel.info)


def syslog_priority(level: LogLevel) -> int:
    """The syslog priority of a journal line (``<6>`` for info); info for
    anything unknown."""
    entry = _TABLE.get(level)
    return entry[1] if entry is not None else 6
