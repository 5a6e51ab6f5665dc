"""Keeping the cyclic garbage collector's full passes short.

Everything alive once llamaswap has started (modules, classes, the parsed
configuration, the service tree: tens of thousands of objects) lives until
it stops, yet every full pass of CPython's cyclic collector walks all of it
again: about 40 ms on the 2-core machine kind, during which no request moves
(the yardstick's c=16 p99 was ~50 ms because of it).  `settle` collects once
and then moves what survives out of the collector's sight (``gc.freeze``), so
later full passes walk only what requests and the recent-activity rings
create.  It runs once the reactor runs and again after each reload, first
taking back what the previous settle froze, so that garbage cycles among
objects a reload replaced are still collected.

The young generation's threshold is raised too (`YOUNG_THRESHOLD`).  A
young pass runs once the tracked objects allocated exceed those freed by
the threshold; with CPython's 700, a burst of concurrent requests crosses
it many times a second (about 165 young passes a second at 1,600 req/s),
each walking the objects of the requests still in flight, only to find
almost nothing to free (a request leaves well under one object in a
garbage cycle) and to promote the rest to the older generations, which
then walk them again: about 5% of the process's CPU time under load.
With `YOUNG_THRESHOLD` a young pass runs every few seconds instead, and the
garbage cycles it frees wait at most that many allocations longer.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.application import service

#: tracked allocations (net of frees) that start a young collection: CPython's
#: default is 700 (see the module docstring)
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Collect, then freeze whatever survives (see the module docstring)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class HeapService(service.Service):
    """Settles the heap once the reactor runs, and raises the young
    generation's threshold to `YOUNG_THRESHOLD`; ``settle`` after each
    reload.  Stopping gives back the collector's thresholds and the frozen
    objects."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._thresholds: tuple[int, int, int] | None = None

    def startService(self) -> None:
        super().startService()
        self._thresholds = gc.get_threshold()
        young, *older = self._thresholds
        gc.set_threshold(max(young, YOUNG_THRESHOLD), *older)
        self._reactor.callWhenRunning(settle)

    def stopService(self) -> Any:
        # whatever runs after us (twistd's own exit) sees a plain collector
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None
        gc.unfreeze()
        return super().stopService()
