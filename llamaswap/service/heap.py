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
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.application import service


def settle() -> None:
    """Collect, then freeze whatever survives (see the module docstring)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class HeapService(service.Service):
    """Settles the heap once the reactor runs; ``settle`` after each reload."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(settle)

    def stopService(self) -> Any:
        gc.unfreeze()  # whatever runs after us (twistd's own exit) sees a plain heap
        return super().stopService()
