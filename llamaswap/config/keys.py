"""``apiKeys``: the keys clients must present, checked at load.

The request-time check (digests compared in constant time) lives in
:mod:`llamaswap.web.auth`; this module only turns the configured value into
strings and reports what is wrong with it.
"""

from __future__ import annotations

from typing import Any

from llamaswap.config.macros import format_value

__all__ = ["api_key_strings", "validate_api_keys"]


def validate_api_keys(raw: Any) -> list[str]:
    """Problems with an ``apiKeys`` value, one line each naming ``apiKeys[i]``."""
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        return ["apiKeys: must be a list of strings"]
    problems = []
    for index, value in enumerate(raw):
        path = f"apiKeys[{index}]"
        if isinstance(value, (dict, list, tuple)):
            problems.append(f"{path}: must be a string")
            continue
        key = "" if value is None else _scalar(value)
        if key == "":
            problems.append(f"{path}: empty api key")
        elif any(char.isspace() for char in key):
            problems.append(f"{path}: api key cannot contain spaces")
    return problems


def api_key_strings(raw: Any) -> tuple[str, ...]:
    """The keys of a valid ``apiKeys`` value as strings.

    YAML may type a key as a number (``apiKeys: [12345]``); llama-swap reads
    it as its text, and so do we.
    """
    if not raw:
        return ()
    return tuple(_scalar(value) for value in raw)


def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else format_value(value)
