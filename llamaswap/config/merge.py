"""Merging ``--config`` and ``--config-dir`` documents (llama-swap §1.2 in docs/design.md).

Each source is parsed on its own (``${env.X}`` substituted first); the parsed
documents are merged here, in order, into one document that then goes through
the single-file loader.  Rules, node by node:

* mapping + mapping merges recursively; sequence + sequence concatenates;
* scalar + scalar must be identical (same value and type), else
  ``conflict at "<path>"``; ``null`` on either side yields to the other;
  any other pair of kinds is a conflict;
* under the identity maps (``models``, ``groups``, ...) each child names one
  entity, so a child key defined by two sources is an error
  ``duplicate <map> "<key>" found in <file>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["IDENTITY_MAPS", "config_dir_files", "config_sources", "merge_documents"]

#: dotted paths whose children are identity-keyed (one entity per key).
IDENTITY_MAPS = frozenset(
    {
        "models",
        "groups",
        "profiles",
        "selectors",
        "peers",
        "matrix",
        "routing.router.settings.groups",
        "routing.router.settings.matrix",
    }
)

_YAML_SUFFIXES = (".yml", ".yaml")


def _quote(text: str) -> str:
    """Go's ``%q`` for the strings that occur in paths and keys."""
    return json.dumps(text, ensure_ascii=False)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, (list, tuple)):
        return "sequence"
    return "scalar"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def merge_documents(sources: list[tuple[str, Any]]) -> dict[str, Any]:
    """Merge parsed config documents, given as ``(file name, document)`` in order.

    ``None`` documents (empty or comment-only files) are skipped; with nothing
    left the result is ``{}`` (a config of defaults).  The inputs are not
    modified.  Raises ``ValueError`` with a one-line message naming the path
    and the file that introduced the problem.
    """
    merged: dict[str, Any] | None = None
    for name, document in sources:
        if document is None:
            continue
        if not isinstance(document, Mapping):
            raise ValueError(f"config {name}: top-level YAML must be a mapping")
        if merged is None:
            merged = _copy(document)
        else:
            merged = _merge_mappings(merged, document, "", name)
    return merged if merged is not None else {}


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(item) for item in value]
    return value


def _merge_mappings(
    dst: Mapping[str, Any], src: Mapping[str, Any], path: str, source: str
) -> dict[str, Any]:
    out = dict(dst)  # dst is already our own copy; values are replaced, not mutated
    for key, src_value in src.items():
        child = _join(path, str(key))
        if key not in out:
            out[key] = _copy(src_value)
        elif child in IDENTITY_MAPS:
            out[key] = _merge_identity(out[key], src_value, child, str(key), source)
        else:
            out[key] = _merge_values(out[key], src_value, child, source)
    return out


def _merge_identity(dst: Any, src: Any, path: str, map_name: str, source: str) -> Any:
    if dst is None or src is None:
        return _copy(src) if dst is None else dst
    if not isinstance(dst, Mapping) or not isinstance(src, Mapping):
        raise ValueError(f"conflict at {_quote(path)}: expected a mapping, introduced by {source}")
    out = dict(dst)
    for key, value in src.items():
        if key in out:
            raise ValueError(
                f"duplicate {map_name} {_quote(str(key))} found in {source}"
                " (already defined in another config source)"
            )
        out[key] = _copy(value)
    return out


def _merge_values(dst: Any, src: Any, path: str, source: str) -> Any:
    dst_kind, src_kind = _kind(dst), _kind(src)
    if dst_kind == "null":
        return _copy(src)
    if src_kind == "null":
        return dst
    if dst_kind == src_kind == "mapping":
        return _merge_mappings(dst, src, path, source)
    if dst_kind == src_kind == "sequence":
        return [*dst, *_copy(src)]
    if dst_kind == src_kind == "scalar":
        # type() as well as ==: 1, 1.0 and true are different YAML scalars.
        if type(dst) is type(src) and dst == src:
            return dst
        raise ValueError(
            f"conflict at {_quote(path)}: {source} sets a different value than a previous source"
        )
    raise ValueError(
        f"conflict at {_quote(path)}: incompatible YAML node kinds"
        f" ({dst_kind} vs {src_kind}) introduced by {source}"
    )


def config_dir_files(directory: str) -> list[str]:
    """The ``*.yml``/``*.yaml`` files directly in ``directory``, sorted by name.

    Subdirectories are not entered (nor directories whose name ends in
    ``.yaml``).  Raises ``OSError`` if the directory cannot be read.
    """
    with os.scandir(directory) as entries:
        names = [
            entry.name
            for entry in entries
            if entry.name.endswith(_YAML_SUFFIXES) and not entry.is_dir()
        ]
    return [os.path.join(directory, name) for name in sorted(names)]


def config_sources(config: str | None, config_dir: str | None) -> list[str]:
    """The files to load, in merge order: ``config`` first, then the directory's.

    Raises ``ValueError`` when neither is given or when ``config`` is also one
    of the directory's files (it would be merged with itself).
    """
    if not config and not config_dir:
        raise ValueError("at least one of --config or --config-dir must be provided")
    files = config_dir_files(config_dir) if config_dir else []
    if config:
        absolute = os.path.abspath(config)
        if any(os.path.abspath(path) == absolute for path in files):
            raise ValueError(
                f"--config path {config} is also present in --config-dir {config_dir};"
                " remove it from one"
            )
        files.insert(0, config)
    return files
