"""Small helpers shared by every part of config validation: describing a
bad value, warning about unknown keys, checking an upstream URL."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

from llamaswap.config.macros import format_value


def describe(value: Any) -> str:
    """A value as a problem line shows it: ``'abc'``, ``a mapping``, ``3``."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if value is None:
        return "null"
    return format_value(value)


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def unknown_key_warnings(entry: Mapping[str, Any], known: Collection[str], path: str) -> list[str]:
    """One warning per key of ``entry`` that is not ``known``, with a
    "did you mean" when a known key is close."""
    lines = []
    for key in entry:
        if key in known:
            continue
        close = did_you_mean(str(key), known)
        hint = f' (did you mean "{close}"?)' if close else ""
        lines.append(f"{join_path(path, str(key))}: unknown key{hint}")
    return lines


def did_you_mean(key: str, known: Collection[str]) -> str | None:
    """The known key closest to ``key`` (case aside), if one is close."""
    by_lower = {name.lower(): name for name in known}
    close = difflib.get_close_matches(key.lower(), list(by_lower), n=1)
    return by_lower[close[0]] if close else None


def missing_server_message(entry: Mapping[str, Any], known: Collection[str]) -> str:
    """Why a model entry with neither ``cmd`` nor ``proxy`` cannot serve,
    naming a misspelt key that was probably meant to be one of them."""
    message = (
        "needs cmd (the command that starts its server) or proxy"
        " (the URL of a server that is already running)"
    )
    for key in entry:
        if key not in known and did_you_mean(str(key), known) in ("cmd", "cmdStop", "proxy"):
            meant = did_you_mean(str(key), known)
            meant = "cmd" if meant == "cmdStop" else meant
            return f'{message}; "{key}" is not a key: did you mean "{meant}"?'
    return message


def in_file(source: str | None, problems: Collection[str]) -> list[str]:
    """``problems`` of reading a file, each naming ``source`` in place of the
    generic ``config:`` prefix."""
    if source is None:
        return list(problems)
    return [f"{source}: {p.removeprefix('config: ')}" for p in problems]


def url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable http(s) base URL, or ``None``."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        return f"invalid URL {url!r}: {e}"
    if parts.scheme not in ("http", "https"):
        return f"invalid URL {url!r}: scheme must be http or https"
    if not parts.hostname:
        return f"invalid URL {url!r}: missing host"
    return None
