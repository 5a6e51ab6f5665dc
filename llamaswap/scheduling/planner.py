"""Swap planners: which running models must stop before a target may run."""

from __future__ import annotations

from zope.interface import Interface, implementer


class ISwapPlanner(Interface):
    """Decides the eviction footprint of a swap; pure, no side effects."""

    def evict_set(target: str, running: frozenset[str]) -> frozenset[str]:
        """Models that must stop before ``target`` may run (never contains
        ``target``).  ``running`` is every live process plus the targets of
        other swaps already under way; it may contain ``target`` itself."""


@implementer(ISwapPlanner)
class SingleModelPlanner:
    """One model at a time (llama-swap's default with no groups): every
    other running model is evicted."""

    def evict_set(self, target: str, running: frozenset[str]) -> frozenset[str]:
        return running - {target}


class IBusyAwarePlanner(ISwapPlanner):
    """A planner that can choose its victims around busy models."""

    def evict_set_around(
        target: str, running: frozenset[str], busy: frozenset[str]
    ) -> frozenset[str]:
        """As :meth:`ISwapPlanner.evict_set`, evicting models of ``busy``
        (serving requests, starting, or already being evicted) only when no
        set of idle ones would do; the scheduler then waits for them."""
