"""Log lines for twistd's ``--logger``: ``<priority>``-prefixed lines
journald understands when stdout is connected to the journal, twistd's
classic text lines otherwise.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    eventAsText,
    formatEvent,
)

from llamaswap.core.loglevels import syslog_priority
from llamaswap.observe.logformat import safe_text

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
    priority (``<6>``), no timestamp (journald adds its own), no colours;
    lines after the first start with a tab (:func:`safe_text`)."""
    text = eventAsText(
        dict(event), includeTraceback=True, includeTimestamp=False, includeSystem=False
    )
    if not text:
        return None
    priority = syslog_priority(event.get("log_level", LogLevel.info))
    system = event.get("log_system") or event.get("log_namespace") or "-"
    lines = safe_text(_ANSI.sub("", text).rstrip("\n")).split("\n")
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
    body = safe_text(text)
    return f"{_stamp(event.get('log_time') or time.time())} [{system}] {body}\n"
