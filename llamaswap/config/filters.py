"""Per-model request filters and ``useModelName`` (reference §4.6).

A model's (or peer's) ``filters`` mapping becomes a :class:`ModelFilters`
value at config time; :func:`apply_filters` rewrites a JSON request body with
it, in llama-swap's order, editing the body in place (:mod:`llamaswap.core.jsonedit`).
The ``model`` parameter is protected: no filter may strip or set it (nor any
path below it), so routing always sees what the client or ``useModelName``
put there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from llamaswap.core.jsonedit import delete_path, encode_value, set_path, split_path

__all__ = [
    "PROTECTED_PARAMS",
    "ModelFilters",
    "apply_filters",
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
    return tuple(sorted(name for name in names if name and not _protected(name)))


def _protected(path: str) -> bool:
    """Whether ``path`` is, or lies under, a protected parameter."""
    try:
        return split_path(path)[0] in PROTECTED_PARAMS
    except ValueError:
        return False  # not a path at all; reported when the config is parsed


def _sorted_settable(params: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    return ((key, params[key]) for key in sorted(params) if not _protected(key))


def apply_filters(
    body: bytes, filters: ModelFilters, requested_name: str, use_model_name: str = ""
) -> bytes:
    """``body`` rewritten by ``filters`` for a request that asked for ``requested_name``.

    Order (§4.6): ``useModelName`` sets ``model``; ``stripParams`` deletes;
    ``setParams`` sets in sorted key order; ``setParamsByID[requested_name]``
    sets in sorted key order, overriding ``setParams``.  Raises ``ValueError``
    (one line, for a 500 answer) when the body is not a JSON object or a
    value cannot be written.
    """
    by_id = filters.set_params_by_id.get(requested_name, _EMPTY)
    if not (use_model_name or filters.strip_params or filters.set_params or by_id):
        return body
    if use_model_name:
        body = _edit(body, "rewriting model name in JSON", set_path, "model", use_model_name)
    for path in filters.strip_params:
        body = _edit(body, f"stripping parameter {path} from request", delete_path, path)
    for source in (filters.set_params, by_id):
        for path, value in _sorted_settable(source):
            body = _edit(body, f"setting parameter {path} in request", set_path, path, value)
    return body


def _edit(body: bytes, doing: str, edit: Callable[..., bytes], *args: Any) -> bytes:
    """``edit(body, *args)``, its ValueError prefixed with what was being done."""
    try:
        return edit(body, *args)
    except ValueError as e:
        raise ValueError(f"error {doing}: {e}") from None


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
