"""Per-model request filters and ``useModelName`` (llama-swap §4.6 in docs/design.md).

A model's (or peer's) ``filters`` mapping becomes a :class:`ModelFilters`
value at config time, checked once; :mod:`llamaswap.upstream.filters`
applies it to request bodies.  The ``model`` parameter is protected: no
filter may strip or set it (nor any path below it), so routing always sees
what the client or ``useModelName`` put there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from llamaswap.core.jsonedit import encode_value, split_path

__all__ = [
    "PROTECTED_PARAMS",
    "ModelFilters",
    "is_protected",
    "parse_filters",
    "sanitize_strip_params",
]

#: Parameters no filter may strip or set.
PROTECTED_PARAMS = frozenset({"model"})

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty_map() -> Mapping[str, Any]:
    return _EMPTY


@dataclass(frozen=True)
class ModelFilters:
    """The ``filters`` of one model or peer, sanitised."""

    #: paths to delete: trimmed, de-duplicated, empties and ``model`` removed, sorted.
    strip_params: tuple[str, ...] = ()
    #: path -> value to set (any JSON value); ``model`` is skipped when applied.
    set_params: Mapping[str, Any] = field(default_factory=_empty_map)
    #: requested model name -> (path -> value), applied after ``set_params``.
    set_params_by_id: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty_map)

    @property
    def is_empty(self) -> bool:
        """True when applying these filters can never change a body."""
        return not (self.strip_params or self.set_params or self.set_params_by_id)


def sanitize_strip_params(value: str) -> tuple[str, ...]:
    """A ``stripParams`` comma list as llama-swap reads it."""
    names = {name.strip() for name in value.split(",")}
    return tuple(sorted(name for name in names if name and not is_protected(name)))


def is_protected(path: str) -> bool:
    """Whether ``path`` is, or lies under, a protected parameter."""
    try:
        return split_path(path)[0] in PROTECTED_PARAMS
    except ValueError:
        return False  # not a path at all; reported when the config is parsed


# --- parsing ---


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "null"
    return repr(value)


def _thaw(value: Any) -> Any:
    """Plain dicts and lists (config documents may hold read-only mappings)."""
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(item) for item in value]
    return value


def _params(raw: Any, path: str, problems: list[str]) -> Mapping[str, Any]:
    """A ``setParams``-style mapping, checked: dot-paths valid, values JSON."""
    if raw is None:
        return _EMPTY
    if not isinstance(raw, Mapping):
        problems.append(f"{path}: must be a mapping, got {_describe(raw)}")
        return _EMPTY
    out: dict[str, Any] = {}
    for key, value in raw.items():
        key_path = f"{path}.{key}"
        if not isinstance(key, str):
            problems.append(f"{key_path}: parameter names must be strings")
            continue
        try:
            split_path(key)
            encode_value(_thaw(value))
        except ValueError as e:
            problems.append(f"{key_path}: {e}")
            continue
        out[key] = _thaw(value)
    return MappingProxyType(out)


def _strip_list(raw: Mapping[str, Any], path: str, problems: list[str]) -> tuple[str, ...]:
    value = raw.get("stripParams")
    key = "stripParams"
    if value is None or value == "":
        legacy = raw.get("strip_params")
        if legacy is not None and legacy != "":
            value, key = legacy, "strip_params"
    if value is None:
        return ()
    if not isinstance(value, str):
        problems.append(f"{path}.{key}: must be a comma-separated string, got {_describe(value)}")
        return ()
    names = sanitize_strip_params(value)
    for name in names:
        try:
            split_path(name)
        except ValueError as e:
            problems.append(f"{path}.{key}: {e}")
    return names


def parse_filters(raw: Any, key_path: str) -> tuple[ModelFilters, list[str]]:
    """A ``filters`` mapping (``None`` = none) as :class:`ModelFilters`.

    Problems come back as one line each naming the key path under
    ``key_path`` (e.g. ``models.a.filters.setParams: must be a mapping``);
    the filters returned then hold whatever parts were valid.
    """
    problems: list[str] = []
    if raw is None:
        return ModelFilters(), problems
    if not isinstance(raw, Mapping):
        problems.append(f"{key_path}: must be a mapping, got {_describe(raw)}")
        return ModelFilters(), problems
    strip = _strip_list(raw, key_path, problems)
    set_params = _params(raw.get("setParams"), f"{key_path}.setParams", problems)
    by_id_raw = raw.get("setParamsByID")
    by_id: dict[str, Mapping[str, Any]] = {}
    if by_id_raw is not None and not isinstance(by_id_raw, Mapping):
        problems.append(f"{key_path}.setParamsByID: must be a mapping, got {_describe(by_id_raw)}")
    elif by_id_raw is not None:
        for name, params in by_id_raw.items():
            parsed = _params(params, f"{key_path}.setParamsByID.{name}", problems)
            if parsed:
                by_id[str(name)] = parsed
    return ModelFilters(strip, set_params, MappingProxyType(by_id)), problems
