"""The small top-level settings other layers act on: logging, the activity
store, captures, listing, ``upstream.ignorePaths``, startup preloads and the
UI's session headers.

Each reader takes the macro-expanded document and returns a typed value (and
the problem lines, for the keys that can be wrong); the loader keeps the
values on :class:`~llamaswap.config.model.Config`.  The lenient readings
(``logToStdout: 0`` meaning the default, any non-list ``session_id`` meaning
the defaults) are llamaswap's long-standing behaviour, kept as they were.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamaswap.config.problems import describe

__all__ = [
    "DEFAULT_CAPTURE_BUFFER_MIB",
    "DEFAULT_IGNORE_PATHS",
    "DEFAULT_MAX_IN_MEMORY",
    "DEFAULT_MAX_REQUEST_BODY_SIZE",
    "DEFAULT_SESSION_HEADERS",
    "StoreConfig",
    "default_ignore_paths",
    "read_capture_buffer",
    "read_ignore_paths",
    "read_include_aliases",
    "read_log_time_format",
    "read_log_to_stdout",
    "read_max_request_body_size",
    "read_performance_disabled",
    "read_preload",
    "read_session_headers",
    "read_store",
    "parse_size",
]

#: rows the in-memory activity ring keeps (``metricsMaxInMemory`` <= 0 or unset).
DEFAULT_MAX_IN_MEMORY = 1000
#: MiB of compressed request captures kept when ``captureBuffer`` is unset.
DEFAULT_CAPTURE_BUFFER_MIB = 5
#: bytes of one request body when ``maxRequestBodySize`` is unset (audio uploads are large).
DEFAULT_MAX_REQUEST_BODY_SIZE = 64 * 1024 * 1024
#: ``upstream.ignorePaths`` when unset or empty: static files are not model requests.
DEFAULT_IGNORE_PATHS = (r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$",)
#: ``ui.activity.session_id`` when the config does not set it.
DEFAULT_SESSION_HEADERS = ("X-Session-ID", "X-Litellm-Session-Id")


def _section(document: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``document[key]`` when it is a mapping, else empty (these keys were
    always read leniently)."""
    value = document.get(key)
    return value if isinstance(value, Mapping) else {}


def read_log_to_stdout(document: Mapping[str, Any]) -> str:
    """``logToStdout``: which logs reach stdout; unset or empty is ``proxy``."""
    return str(document.get("logToStdout") or "proxy")


def read_log_time_format(document: Mapping[str, Any]) -> str:
    """``logTimeFormat``: a time prefix for log lines; "" = none."""
    return str(document.get("logTimeFormat") or "")


def read_capture_buffer(document: Mapping[str, Any]) -> int:
    """``captureBuffer`` in MiB; 0 (also for anything but a positive integer)
    disables captures."""
    budget = document.get("captureBuffer", DEFAULT_CAPTURE_BUFFER_MIB)
    return int(budget) if isinstance(budget, int) and budget > 0 else 0


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_size(value: Any) -> int | None:
    """A size in bytes: an integer, or a number with a unit (``B``, ``KB``,
    ``MB``, ``GB`` in powers of 1000, ``KiB``, ``MiB``, ``GiB`` in powers of
    1024, any case); ``None`` when ``value`` is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    found = _SIZE.fullmatch(value)
    if found is None or found.group(2).lower() not in _SIZE_UNITS:
        return None
    return int(float(found.group(1)) * _SIZE_UNITS[found.group(2).lower()])


def read_max_request_body_size(document: Mapping[str, Any]) -> tuple[int, list[str]]:
    """``maxRequestBodySize``: the most bytes one request body may have, and
    the problems found."""
    raw = document.get("maxRequestBodySize")
    if raw is None:
        return DEFAULT_MAX_REQUEST_BODY_SIZE, []
    size = parse_size(raw)
    if size is None or size <= 0:
        return DEFAULT_MAX_REQUEST_BODY_SIZE, [
            "maxRequestBodySize: must be a positive size in bytes or with a unit "
            f"such as 1MiB or 64MB, got {describe(raw)}"
        ]
    return size, []


def read_performance_disabled(document: Mapping[str, Any]) -> bool:
    """``performance.disabled: true`` turns the system metrics off."""
    return _section(document, "performance").get("disabled") is True


def read_include_aliases(document: Mapping[str, Any]) -> bool:
    """``includeAliasesInList: true`` lists every alias in ``/v1/models``."""
    return document.get("includeAliasesInList") is True


def read_session_headers(document: Mapping[str, Any]) -> tuple[str, ...]:
    """``ui.activity.session_id``: header names trimmed, empties dropped,
    de-duplicated case-insensitively; an explicit ``[]`` disables them."""
    names = _section(_section(document, "ui"), "activity").get("session_id")
    if not isinstance(names, list | tuple):
        names = DEFAULT_SESSION_HEADERS
    seen: set[str] = set()
    kept: list[str] = []
    for name in names:
        text = str(name).strip()
        if text and text.lower() not in seen:
            seen.add(text.lower())
            kept.append(text)
    return tuple(kept)


def default_ignore_paths() -> tuple[re.Pattern[str], ...]:
    """:data:`DEFAULT_IGNORE_PATHS`, compiled."""
    return tuple(re.compile(pattern) for pattern in DEFAULT_IGNORE_PATHS)


def read_ignore_paths(
    document: Mapping[str, Any],
) -> tuple[tuple[re.Pattern[str], ...], list[str]]:
    """``upstream.ignorePaths`` compiled (a non-empty list replaces the
    default) and the problems found."""
    patterns = _section(document, "upstream").get("ignorePaths")
    if not patterns:
        return default_ignore_paths(), []
    if not isinstance(patterns, list):
        return default_ignore_paths(), [
            "upstream.ignorePaths: must be a list of regular expressions"
        ]
    compiled = []
    problems = []
    for index, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(str(pattern)))
        except re.error as exc:
            problems.append(f"upstream.ignorePaths[{index}]: invalid regular expression: {exc}")
    return tuple(compiled), problems


def read_preload(document: Mapping[str, Any]) -> tuple[tuple[str, ...], list[str]]:
    """``hooks.on_startup.preload``: model names to load at start, in order."""
    names = _section(_section(document, "hooks"), "on_startup").get("preload")
    if not names:
        return (), []
    if not isinstance(names, list):
        return (), ["hooks.on_startup.preload: must be a list of model names"]
    return tuple(str(name).strip() for name in names), []


@dataclass(frozen=True)
class StoreConfig:
    """``store`` and ``metricsMaxInMemory``: where activity rows are kept."""

    #: the SQLite file of the activity store; ``None`` = the in-memory ring.
    path: str | None = None
    #: rows kept in memory: the ring's size, or the SQLite store's recent cache.
    max_in_memory: int = DEFAULT_MAX_IN_MEMORY


def read_store(document: Mapping[str, Any]) -> tuple[StoreConfig, list[str]]:
    """The activity store the config asks for and the problems found.

    ``store.path`` present: that SQLite file (``store:`` left empty counts as
    absent).  ``metricsMaxInMemory`` <= 0 means the default.  Whether the
    file can be written is checked when the store is opened, on the machine
    that runs it."""
    problems = []
    max_rows = document.get("metricsMaxInMemory")
    if max_rows is None:
        max_rows = DEFAULT_MAX_IN_MEMORY
    elif isinstance(max_rows, bool) or not isinstance(max_rows, int):
        problems.append("metricsMaxInMemory: must be an integer")
        max_rows = DEFAULT_MAX_IN_MEMORY
    elif max_rows <= 0:
        max_rows = DEFAULT_MAX_IN_MEMORY
    store = document.get("store")
    if store is None:
        return StoreConfig(None, max_rows), problems
    if not isinstance(store, Mapping):
        return StoreConfig(None, max_rows), [*problems, "store: must be a mapping"]
    path = store.get("path")
    if path is None or (isinstance(path, str) and not path.strip()):
        problems.append("store.path: must not be empty")
    elif not isinstance(path, str):
        problems.append("store.path: must be a string")
    else:
        return StoreConfig(path, max_rows), problems
    return StoreConfig(None, max_rows), problems
