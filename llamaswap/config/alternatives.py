"""Device alternatives: ``resources: {"gpu0|gpu1": 10GiB}`` (docs/placement.md).

A model may name one key of ``|``-separated resources: it holds the size on
whichever of them the placement planner picks at each start.  The choice
reaches the command as ``${DEVICE}`` (in ``cmd`` and ``env`` values; kept
through config load, substituted at spawn) and as ``CUDA_VISIBLE_DEVICES``
unless the model's ``env`` sets that itself.  The index is the resource
name's trailing digits (``gpu1`` -> ``1``, ``cuda0`` -> ``0``); every
alternative must have one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "DEVICE_MACRO",
    "Alternatives",
    "device_argv",
    "device_env",
    "device_index",
    "is_alternatives",
    "split_alternatives",
    "uses_device",
]

DEVICE_MACRO = "${DEVICE}"
VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
_TRAILING_DIGITS = re.compile(r".*?(\d+)")


@dataclass(frozen=True)
class Alternatives:
    """One model's device alternatives: the config key, the resources it
    may use (in the order written) and what it holds on the chosen one."""

    key: str
    names: tuple[str, ...]
    bytes: int
    source: str


def is_alternatives(key: str) -> bool:
    """Whether a footprint key names alternatives (``gpu0|gpu1``)."""
    return "|" in key


def split_alternatives(key: str) -> tuple[str, ...]:
    """``"gpu0 | gpu1"`` -> ``("gpu0", "gpu1")`` (blanks dropped)."""
    return tuple(part.strip() for part in key.split("|"))


def device_index(name: str) -> str | None:
    """The index a resource name stands for: its trailing digits without
    leading zeros (``gpu1`` -> ``"1"``), ``None`` when it has none."""
    match = _TRAILING_DIGITS.fullmatch(name)
    return str(int(match.group(1))) if match else None


def uses_device(values: Iterable[str]) -> bool:
    """Whether any of ``values`` contains ``${DEVICE}``."""
    return any(DEVICE_MACRO in value for value in values)


def device_argv(argv: Sequence[str], index: str | None) -> tuple[str, ...]:
    """``argv`` with ``${DEVICE}`` replaced by ``index`` (unchanged without one)."""
    if index is None:
        return tuple(argv)
    return tuple(arg.replace(DEVICE_MACRO, index) for arg in argv)


def device_env(env: Iterable[tuple[str, str]], index: str | None) -> list[tuple[str, str]]:
    """The model's ``env`` pairs for a start on device ``index``: ``${DEVICE}``
    substituted, and ``CUDA_VISIBLE_DEVICES=<index>`` first unless the
    model sets it itself (later pairs win)."""
    pairs = list(env)
    if index is None:
        return pairs
    pairs = [(name, value.replace(DEVICE_MACRO, index)) for name, value in pairs]
    if all(name != VISIBLE_DEVICES for name, _ in pairs):
        pairs.insert(0, (VISIBLE_DEVICES, index))
    return pairs
