"""Placement safety nets around a start (docs/placement.md).

- After models were evicted to make room, memory is not always back at
  once (a driver frees device memory late, a process's pages take a moment
  to go): :func:`wait_for_room` waits, at most :data:`ROOM_WAIT` seconds,
  until a probe shows the target's footprint free.
- A start that dies with an out-of-memory message (:func:`out_of_memory`)
  had a footprint larger than planned: :func:`more_room` picks more idle
  models to evict before the one retry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llamaswap.scheduling.placement import PlacementPlanner, cheapest_cover

__all__ = ["ROOM_POLL", "ROOM_WAIT", "FreeProbe", "more_room", "out_of_memory", "wait_for_room"]

log = Logger()

#: seconds a start waits at most for evicted memory to show as free.
ROOM_WAIT = 10.0
#: seconds between probes while waiting.
ROOM_POLL = 0.5

#: fires with the free bytes per resource (``None``: no probe for it).
FreeProbe = Callable[[], defer.Deferred[Mapping[str, int | None]]]

_OUT_OF_MEMORY = re.compile(
    r"out of memory|failed to allocate|bad_alloc|cudaMalloc failed|"
    r"ErrorOutOfDeviceMemory|insufficient memory|unable to allocate",
    re.IGNORECASE,
)


def out_of_memory(message: str) -> bool:
    """Whether a start's failure (with its last output lines) says it ran
    out of memory (llama.cpp, CUDA, Vulkan, C++ allocation failures)."""
    return _OUT_OF_MEMORY.search(message) is not None


async def wait_for_room(
    needs: Mapping[str, int],
    probe: FreeProbe,
    clock: IReactorTime,
    *,
    timeout: float = ROOM_WAIT,
    poll: float = ROOM_POLL,
) -> bool:
    """Wait until ``probe`` shows ``needs`` (bytes per resource) free, at most
    ``timeout`` seconds; resources without a probe are not waited for.
    ``True`` when the room is there, ``False`` after the time-out."""
    deadline = clock.seconds() + timeout
    while True:
        try:
            free = await probe()
        except Exception as exc:
            log.warn("placement: free memory probe failed: {error}", error=str(exc))
            return False
        short = {
            name: amount
            for name, amount in needs.items()
            if amount > 0 and free.get(name) is not None and free[name] < amount  # type: ignore[operator]
        }
        if not short:
            return True
        if clock.seconds() >= deadline:
            return False
        await task.deferLater(clock, poll, lambda: None)


def more_room(
    planner: PlacementPlanner, target: str, running: frozenset[str], busy: frozenset[str]
) -> frozenset[str]:
    """Idle models (not pinned, not ``busy``) to evict after ``target`` ran out
    of memory while starting: the cheapest set freeing the target's
    footprint once more on every resource it holds (as if it needed twice
    what was planned; at least its footprint), or every such model when
    none is enough."""
    needs = planner.footprint(target)
    stay = running - {target}
    candidates = {
        model: planner.footprint(model)
        for model in stay - planner.pinned - busy
        if any(planner.footprint(model).get(name, 0) > 0 for name in needs)
    }
    if not candidates:
        return frozenset()
    used = dict.fromkeys(needs, 0)
    for model in stay:
        for name in needs:
            used[name] += planner.footprint(model).get(name, 0)
    # at least the target's footprint, even where the plan said it fitted twice
    short = {
        name: max(used[name] + 2 * amount - planner.totals.get(name, 0), amount)
        for name, amount in needs.items()
        if amount > 0
    }
    chosen = cheapest_cover(candidates, short, planner.reload_cost)
    return frozenset(candidates) if chosen is None else chosen
