"""Problem collection and typed reads of one mapping, for the loader.

A bad value is reported once, as one line naming its key path, and the
default is used so the rest of the document is still checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llamaswap.config.macros import format_value
from llamaswap.config.problems import describe, join_path, unknown_key_warnings

__all__ = ["YAML11_BOOLS", "Fields", "Report"]


@dataclass
class Report:
    """Problems found so far; ``flagged`` paths get no further type errors."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    flagged: set[str] = field(default_factory=set)

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")
        self.flagged.add(path)

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")

    def is_flagged(self, path: str) -> bool:
        return any(
            flagged == path or flagged.startswith((path + ".", path + "["))
            for flagged in self.flagged
        )

    def unknown_keys(self, values: Mapping[str, Any], known: frozenset[str], path: str) -> None:
        self.warnings.extend(unknown_key_warnings(values, known, path))


#: spellings yaml.v3 still decodes into a bool field.
YAML11_BOOLS = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "on", "On", "ON"), True),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "off", "Off", "OFF"), False),
}


@dataclass(frozen=True)
class Fields:
    """Typed reads from one mapping; a bad value is reported and the default used."""

    values: Mapping[str, Any]
    path: str
    report: Report

    def _raw(self, key: str) -> tuple[str, Any]:
        path = join_path(self.path, key)
        value = self.values.get(key)
        return path, None if self.report.is_flagged(path) else value

    def integer(self, key: str, default: int, minimum: int | None = None) -> int:
        path, value = self._raw(key)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.report.error(path, f"must be an integer, got {describe(value)}")
            return default
        if minimum is not None and value < minimum:
            self.report.error(path, f"must be >= {minimum}, got {value}")
            return default
        return value

    def boolean(self, key: str, default: bool | None) -> bool | None:
        path, value = self._raw(key)
        if value is None or isinstance(value, bool):
            return default if value is None else value
        if isinstance(value, str) and value in YAML11_BOOLS:
            return YAML11_BOOLS[value]
        self.report.error(path, f"must be true or false, got {describe(value)}")
        return default

    def string(self, key: str, default: str = "") -> str:
        path, value = self._raw(key)
        if value is None:
            return default
        if isinstance(value, dict | list):
            self.report.error(path, f"must be a string, got {describe(value)}")
            return default
        return value if isinstance(value, str) else format_value(value)

    def strings(self, key: str) -> tuple[str, ...]:
        path, value = self._raw(key)
        if value is None:
            return ()
        if not isinstance(value, list) or any(isinstance(item, dict | list) for item in value):
            self.report.error(path, f"must be a list of strings, got {describe(value)}")
            return ()
        return tuple(
            item if isinstance(item, str) else format_value(item)
            for item in value
            if item is not None
        )

    def mapping(self, key: str) -> dict[str, Any]:
        path, value = self._raw(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.report.error(path, f"must be a mapping, got {describe(value)}")
            return {}
        return value
