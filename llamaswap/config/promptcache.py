"""``promptCacheDir`` and ``promptCacheMaxBytes``: where the prompt caches
of ``promptCache: true`` models are kept, and how many bytes they may take.

The saving and restoring is :mod:`llamaswap.supervision.promptcache`; here
are only the settings, read from the document with their problems.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamaswap.config.problems import describe
from llamaswap.config.settings import parse_size

__all__ = ["DEFAULT_PROMPT_CACHE_MAX_BYTES", "PromptCacheSettings", "read_prompt_cache"]

#: ``promptCacheMaxBytes`` when unset: 8 GiB for every model's saved slots.
DEFAULT_PROMPT_CACHE_MAX_BYTES = 8 * 1024**3


@dataclass(frozen=True)
class PromptCacheSettings:
    """The prompt cache's folder (``None``: a ``prompt-cache`` folder in
    llamaswap's state directory, chosen when the service is built) and its
    bound in bytes (least recently used files go first)."""

    dir: str | None = None
    max_bytes: int = DEFAULT_PROMPT_CACHE_MAX_BYTES


def read_prompt_cache(document: Mapping[str, Any]) -> tuple[PromptCacheSettings, list[str]]:
    """``promptCacheDir`` and ``promptCacheMaxBytes``, and the problems found."""
    problems = []
    folder = document.get("promptCacheDir")
    if folder is not None and (not isinstance(folder, str) or not folder.strip()):
        problems.append(f"promptCacheDir: must be a folder path, got {describe(folder)}")
        folder = None
    raw = document.get("promptCacheMaxBytes")
    max_bytes = DEFAULT_PROMPT_CACHE_MAX_BYTES
    if raw is not None:
        size = parse_size(raw)
        if size is None or size <= 0:
            problems.append(
                "promptCacheMaxBytes: must be a positive size in bytes or with a unit "
                f"such as 512MiB or 8GiB, got {describe(raw)}"
            )
        else:
            max_bytes = size
    return PromptCacheSettings(folder.strip() if folder else None, max_bytes), problems
