"""Running under systemd: readiness and status notifications
(:mod:`.notify`), an orderly graceful stop (:mod:`.shutdown`) and log lines
journald understands (:mod:`.journal`).

This module gathers their public names in one place; ``twistd
--logger=llamaswap.service.systemd.journald_observer`` (docs/deploy.md)
names the journal observer through it.
"""

from __future__ import annotations

from llamaswap.service.journal import (
    format_journal_event,
    format_text_event,
    is_journal_stream,
    journald_observer,
)
from llamaswap.service.notify import (
    Notifier,
    SystemdNotifyService,
    running_models_status,
    watchdog_interval,
)
from llamaswap.service.shutdown import (
    DEFAULT_GRACE_SECONDS,
    STOP_SIGNALS,
    DrainService,
    SequentialMultiService,
    ShutdownGrace,
    ShutdownReactor,
    hurry_on_signals,
)

__all__ = [
    "DEFAULT_GRACE_SECONDS",
    "STOP_SIGNALS",
    "DrainService",
    "Notifier",
    "SequentialMultiService",
    "ShutdownGrace",
    "ShutdownReactor",
    "SystemdNotifyService",
    "format_journal_event",
    "format_text_event",
    "hurry_on_signals",
    "is_journal_stream",
    "journald_observer",
    "running_models_status",
    "watchdog_interval",
]
