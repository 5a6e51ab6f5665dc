"""Applying a model's (or peer's) request filters to a JSON body (llama-swap §4.6 in docs/design.md).

The filters were parsed and checked at load (:mod:`llamaswap.config.filters`);
here they rewrite one request body, in llama-swap's order, editing the bytes
in place (:mod:`llamaswap.core.jsonedit`) so everything else the client sent
stays byte for byte.  The ``model`` parameter is never stripped or set here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from llamaswap.config.filters import ModelFilters, is_protected
from llamaswap.core.jsonedit import delete_path, set_path

__all__ = ["apply_filters"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _sorted_settable(params: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    return ((key, params[key]) for key in sorted(params) if not is_protected(key))


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
