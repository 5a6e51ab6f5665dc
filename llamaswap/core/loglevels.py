"""The one table of log levels: config names, ``LogLevel`` values, labels and order.

The config's ``logLevel`` names a level (``debug``, ``info``, ``warn``,
``error``); the proxy log labels lines ``[DEBUG]`` ... ``[ERROR]``; both the
proxy log and twistd's own output filter by it.  All of them read this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from twisted.logger import LogLevel

__all__ = ["LEVELS", "label", "parse_level", "rank"]

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
#: Line labels; llama-swap has no CRITICAL, so Twisted's critical shows as ERROR.
_LABELS: Mapping[LogLevel, str] = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARN",
    LogLevel.error: "ERROR",
    LogLevel.critical: "ERROR",
}
_ORDER = (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical)


def parse_level(value: str | LogLevel) -> LogLevel:
    """A config ``logLevel`` as a ``LogLevel``; unknown names mean info, as in llama-swap."""
    if isinstance(value, str):
        name = value.strip().lower()
        return LEVELS.get(name) or _ALIASES.get(name, LogLevel.info)
    return value


def label(level: LogLevel) -> str:
    """The ``[LABEL]`` of a proxy log line; INFO for anything unknown."""
    return _LABELS.get(level, "INFO")


def rank(level: LogLevel) -> int:
    """Position in increasing severity, for filtering (unknown counts as info)."""
    return _ORDER.index(level) if level in _ORDER else 1
