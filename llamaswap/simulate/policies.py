"""The other tools' eviction policies, as planners for the simulator only.

What ``bench/placement.py`` compares ours with (docs/placement.md): both
are LRU, fed by the simulation's :class:`~llamaswap.simulate.engine.Usage`
(when each model was last granted a request).  Idle models go before busy
ones (a busy victim makes the scheduler wait, as for our planner).

- :class:`CountLRUPlanner`: llama.cpp's router (``--models-max N``): at most
  ``limit`` models loaded; the least recently used go first.  It knows no
  sizes, so a count that fits the largest models wastes room for small ones.
- :class:`MemoryLRUPlanner`: large-model-proxy: every model declares what it
  holds per resource; the least recently used models holding a resource the
  target is short of are stopped until it fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from zope.interface import implementer

from llamaswap.scheduling.planner import IBusyAwarePlanner
from llamaswap.simulate.engine import Usage

__all__ = ["CountLRUPlanner", "MemoryLRUPlanner"]


def _lru(usage: Usage, busy: frozenset[str]) -> Callable[[str], tuple[bool, float, str]]:
    """Idle before busy, then least recently granted first, then by name."""

    def key(model: str) -> tuple[bool, float, str]:
        return (model in busy, usage.last_used.get(model, -math.inf), model)

    return key


@implementer(IBusyAwarePlanner)
class CountLRUPlanner:
    """At most ``limit`` models loaded; the least recently used make room."""

    def __init__(self, limit: int, usage: Usage) -> None:
        if limit < 1:
            raise ValueError(f"the model count limit must be >= 1, got {limit}")
        self.limit = limit
        self.usage = usage

    def evict_set(self, target: str, running: frozenset[str]) -> frozenset[str]:
        return self.evict_set_around(target, running, frozenset())

    def evict_set_around(
        self, target: str, running: frozenset[str], busy: frozenset[str]
    ) -> frozenset[str]:
        if target in running:
            return frozenset()
        others = running - {target}
        excess = len(others) + 1 - self.limit
        if excess <= 0:
            return frozenset()
        return frozenset(sorted(others, key=_lru(self.usage, busy))[:excess])

    def reasons(
        self, target: str, running: frozenset[str], evict: frozenset[str]
    ) -> dict[str, str]:
        return dict.fromkeys(evict, "swap")


@implementer(IBusyAwarePlanner)
class MemoryLRUPlanner:
    """Least recently used models holding what the target is short of stop
    until it fits.  ``footprints``: bytes per resource per model (a model
    not listed holds the whole machine)."""

    def __init__(
        self,
        totals: Mapping[str, int],
        footprints: Mapping[str, Mapping[str, int]],
        usage: Usage,
    ) -> None:
        self.totals = dict(totals)
        self.footprints = {model: dict(fp) for model, fp in footprints.items()}
        self.usage = usage

    def footprint(self, model: str) -> Mapping[str, int]:
        return self.footprints.get(model, self.totals)

    def _short(self, models: set[str]) -> set[str]:
        used: dict[str, int] = {}
        for model in models:
            for name, amount in self.footprint(model).items():
                used[name] = used.get(name, 0) + amount
        return {name for name, amount in used.items() if amount > self.totals.get(name, 0)}

    def evict_set(self, target: str, running: frozenset[str]) -> frozenset[str]:
        return self.evict_set_around(target, running, frozenset())

    def evict_set_around(
        self, target: str, running: frozenset[str], busy: frozenset[str]
    ) -> frozenset[str]:
        if target in running:
            return frozenset()
        stay = set(running - {target})
        evict: set[str] = set()
        for model in sorted(stay, key=_lru(self.usage, busy)):
            short = self._short(stay | {target})
            if not short:
                break
            if any(self.footprint(model).get(name, 0) > 0 for name in short):
                stay.discard(model)
                evict.add(model)
        return frozenset(evict)

    def reasons(
        self, target: str, running: frozenset[str], evict: frozenset[str]
    ) -> dict[str, str]:
        return dict.fromkeys(evict, "memory")
