"""``models.<id>.sleep``: a cheaper tier than stopping (issue 14).

A model with ``sleep`` is put to sleep instead of stopped when a swap would
stop it, and woken by the next request for it; both are HTTP calls on the
model's proxy URL::

    sleep:
      enter: ["POST /sleep?level=1"]   # default (vLLM)
      wake: ["POST /wake_up"]          # default (vLLM)
      ttl: 3600                        # stop after this long asleep; 0 (default): never
      resources: {ram: 16GiB}          # its asleep footprint (placement)

Without ``resources`` the asleep footprint is nothing on devices and the
model's host memory (``ram``…) as when loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from llamaswap.config.fields import Fields, Report

__all__ = ["DEFAULT_ENTER", "DEFAULT_WAKE", "SLEEP_KEYS", "SleepConfig", "read_sleep"]

DEFAULT_ENTER = ("POST /sleep?level=1",)
DEFAULT_WAKE = ("POST /wake_up",)
SLEEP_KEYS = frozenset({"enter", "wake", "ttl", "resources"})
_CALL = re.compile(r"(GET|POST|PUT|DELETE|PATCH) (/\S*)")


@dataclass(frozen=True)
class SleepConfig:
    """A model's sleep tier, validated."""

    #: ``METHOD /path`` calls that put the server to sleep, in order.
    enter: tuple[str, ...] = DEFAULT_ENTER
    #: ``METHOD /path`` calls that wake it, in order.
    wake: tuple[str, ...] = DEFAULT_WAKE
    #: seconds asleep before the model is stopped; 0 = never.
    ttl: int = 0
    #: the asleep footprint as written (sizes per resource); ``None`` = default.
    resources: Mapping[str, Any] | None = field(default=None)


def split_call(call: str) -> tuple[str, str]:
    """``"POST /sleep?level=1"`` -> ``("POST", "/sleep?level=1")``."""
    method, _, path = call.partition(" ")
    return method, path


def _calls(fields: Fields, key: str, default: tuple[str, ...], report: Report) -> tuple[str, ...]:
    if fields.values.get(key) is None:
        return default
    calls = fields.strings(key)
    path = f"{fields.path}.{key}"
    if report.is_flagged(path):
        return default
    if not calls:
        report.error(path, "must name at least one call, e.g. POST /wake_up")
        return default
    for call in calls:
        if not _CALL.fullmatch(call.strip()):
            report.error(path, f"{call!r} is not METHOD /path (e.g. POST /sleep?level=1)")
            return default
    return tuple(call.strip() for call in calls)


def read_sleep(raw: Any, path: str, report: Report) -> SleepConfig | None:
    """The ``sleep`` entry at ``path``; ``None`` when absent.  ``sleep: true``
    means the defaults (vLLM's calls)."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return SleepConfig()
    if not isinstance(raw, Mapping):
        report.error(path, "must be a mapping with enter, wake, ttl, resources (or true)")
        return None
    report.unknown_keys(raw, SLEEP_KEYS, path)
    fields = Fields(raw, path, report)
    resources = raw.get("resources")
    if resources is not None and not isinstance(resources, Mapping):
        report.error(f"{path}.resources", "must be a mapping of resource name to size")
        resources = None
    return SleepConfig(
        enter=_calls(fields, "enter", DEFAULT_ENTER, report),
        wake=_calls(fields, "wake", DEFAULT_WAKE, report),
        ttl=fields.integer("ttl", 0, minimum=0),
        resources=MappingProxyType(dict(resources)) if resources is not None else None,
    )
