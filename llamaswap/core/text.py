"""Text from values that arrive as either ``str`` or ``bytes``.

Twisted hands header names and values, query arguments and paths over as
``bytes``, while fakes, mappings and our own callers often pass ``str``.
Where such a value is only shown (a row, a capture, an event), it is decoded
as UTF-8 with undecodable bytes replaced: showing must never fail.
"""

from __future__ import annotations

__all__ = ["as_text", "count_of"]


def as_text(value: str | bytes) -> str:
    """``value`` as ``str``: bytes decoded as UTF-8 (invalid bytes replaced), str as is."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def count_of(count: int, noun: str) -> str:
    """``1 model``, ``2 models``, ``0 models``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
