"""The placement planner: models run side by side while their footprints fit.

Every model holds a footprint while it is loaded (bytes per named resource:
``gpu0``, ``ram``, ...); the machine has a total per resource.  To load a
target, the planner first applies the configured group or matrix rules (the
``base`` planner: extra constraints), then, if what stays plus the target
does not fit, evicts more: the set of idle models that frees enough of every
resource the target is short of at the lowest expected reload cost.

Reload cost of a model = its load time (learned, else a proxy from its
footprint) × its recent request rate (plus a small floor, so that a model
nobody asked for lately is cheap but never free).  Models in ``pinned``
(members of persistent groups) are never evicted for memory; the config
check makes sure every model fits beside them.  Models in ``busy`` (serving
requests, starting, or already being evicted by another swap) are evicted
only if no idle set makes room; the scheduler then sees a busy victim and
queues the request until it drains (a model serving requests is never
stopped).

The search is a depth-first branch and bound over the candidates, cheapest
first, seeded with the greedy cover and pruned by cost and by what the
remaining candidates could still free: exact for the handful of models a
machine holds, and bounded (:data:`SEARCH_BUDGET` nodes) for many.  It runs
only when the target does not fit, over the models that hold some of a
resource the target is short of.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

from zope.interface import implementer

from llamaswap.scheduling.planner import IBusyAwarePlanner, ISwapPlanner

__all__ = [
    "GIB",
    "PlacementPlanner",
    "ReloadCosts",
    "cheapest_cover",
]

GIB = 1024**3
#: bytes loaded per second when a model's load time is not known yet.
PROXY_BYTES_PER_SECOND = 2 * GIB
#: the request rate (per second) every model has at least.
RATE_FLOOR = 1e-4
#: the time constant (seconds) of the decaying request rate.
RATE_TIME_CONSTANT = 600.0

Footprint = Mapping[str, int]
_NOTHING: Footprint = MappingProxyType({})


class ReloadCosts:
    """What the planner learns at run time: load times, request rates and
    measured footprints.

    Fed by the router (``loaded`` when a start ends ready, ``requested`` per
    granted request) and the footprint meter (``measured``); ``clock`` gives
    seconds.  Pure: no reactor, no I/O."""

    def __init__(
        self, clock: Callable[[], float], time_constant: float = RATE_TIME_CONSTANT
    ) -> None:
        self._clock = clock
        self._tau = time_constant
        self._load: dict[str, float] = {}
        #: model -> (decayed request count, when it was last updated)
        self._count: dict[str, tuple[float, float]] = {}
        #: model -> bytes per resource its processes were measured holding
        self._measured: dict[str, Mapping[str, int]] = {}

    def measured(self, model: str, footprint: Mapping[str, int] | None) -> None:
        """``model``'s processes hold ``footprint`` (bytes per resource; the
        planner uses the larger of it and the configured one); ``None``
        forgets it (the model's command changed)."""
        if footprint is None:
            self._measured.pop(model, None)
        else:
            self._measured[model] = MappingProxyType(dict(footprint))

    def measured_of(self, model: str) -> Mapping[str, int]:
        """What ``model`` was measured holding (empty when never measured)."""
        return self._measured.get(model, _NOTHING)

    def loaded(self, model: str, seconds: float) -> None:
        """A start of ``model`` took ``seconds`` (the latest one counts most)."""
        previous = self._load.get(model)
        self._load[model] = seconds if previous is None else 0.5 * (previous + seconds)

    def requested(self, model: str) -> None:
        """One request for ``model`` was granted now."""
        now = self._clock()
        count, since = self._count.get(model, (0.0, now))
        self._count[model] = (count * math.exp(-(now - since) / self._tau) + 1.0, now)

    def load_seconds(self, model: str) -> float | None:
        """The learned load time, ``None`` before the first start."""
        return self._load.get(model)

    def rate(self, model: str) -> float:
        """Recent requests per second (exponentially decaying)."""
        entry = self._count.get(model)
        if entry is None:
            return 0.0
        count, since = entry
        return count * math.exp(-(self._clock() - since) / self._tau) / self._tau


#: search nodes one decision may visit; past that the best set found so far
#: (at worst the greedy one) is taken, so a decision never stalls the reactor.
SEARCH_BUDGET = 20_000


def cheapest_cover(
    candidates: Mapping[str, Footprint],
    short: Mapping[str, int],
    cost: Callable[[str], float],
    budget: int = SEARCH_BUDGET,
) -> frozenset[str] | None:
    """The set of ``candidates`` whose footprints add up to at least
    ``short`` (bytes per resource) at the lowest summed ``cost``.  ``None``
    when even all of them are not enough.

    Branch and bound over the candidates that hold some of a short resource,
    cheapest first (then by name), seeded with the greedy cover; among sets
    of equal cost the first found wins.  Exact unless more than ``budget``
    nodes would be visited; then the best set found so far is returned."""
    need = {name: amount for name, amount in short.items() if amount > 0}
    if not need:
        return frozenset()
    useful = sorted(
        (
            (cost(model), model, tuple(footprint.get(r, 0) for r in need))
            for model, footprint in candidates.items()
            if any(footprint.get(r, 0) > 0 for r in need)
        ),
        key=lambda item: (item[0], item[1]),
    )
    amounts = tuple(need.values())
    width = len(amounts)
    # suffix[i][k]: what candidates i.. can free of resource k at most
    suffix = [[0] * width for _ in range(len(useful) + 1)]
    for index in range(len(useful) - 1, -1, -1):
        held = useful[index][2]
        suffix[index] = [suffix[index + 1][k] + held[k] for k in range(width)]
    if any(suffix[0][k] < amounts[k] for k in range(width)):
        return None
    # the greedy cover: cheapest first, each model that still helps
    greedy: list[str] = []
    spent = 0.0
    missing = list(amounts)
    for price, model, held in useful:
        if any(missing[k] > 0 and held[k] > 0 for k in range(width)):
            greedy.append(model)
            spent += price
            missing = [missing[k] - held[k] for k in range(width)]
            if all(amount <= 0 for amount in missing):
                break
    best: list[tuple[float, tuple[str, ...]]] = [(spent, tuple(greedy))]
    chosen: list[str] = []
    visits = [budget]

    def walk(index: int, spent: float, missing: tuple[int, ...]) -> None:
        if spent >= best[0][0] or visits[0] <= 0:
            return
        visits[0] -= 1
        if all(amount <= 0 for amount in missing):
            best[0] = (spent, tuple(chosen))
            return
        if index == len(useful) or any(suffix[index][k] < missing[k] for k in range(width)):
            return
        price, model, held = useful[index]
        if any(missing[k] > 0 and held[k] > 0 for k in range(width)):
            chosen.append(model)
            walk(index + 1, spent + price, tuple(missing[k] - held[k] for k in range(width)))
            chosen.pop()
        walk(index + 1, spent, missing)

    walk(0, 0.0, amounts)
    return frozenset(best[0][1])


@implementer(IBusyAwarePlanner)
class PlacementPlanner:
    """Evictions so that every resource has room for the target.

    ``totals``: bytes per resource.  ``footprints``: model -> bytes per
    resource (a model not listed holds all of every resource: it runs alone).
    ``base``: the group or matrix rules applied first.  ``pinned``: never
    evicted for memory.  ``costs``: learned load times and request rates
    (without it every model's cost is its footprint-size proxy).
    """

    def __init__(
        self,
        totals: Mapping[str, int],
        footprints: Mapping[str, Footprint],
        base: ISwapPlanner,
        pinned: frozenset[str] = frozenset(),
        costs: ReloadCosts | None = None,
        *,
        asleep: Mapping[str, Footprint] | None = None,
        alternatives: Mapping[str, tuple[tuple[str, ...], int]] | None = None,
    ) -> None:
        self.totals = MappingProxyType(dict(totals))
        self.footprints = MappingProxyType(
            {model: MappingProxyType(dict(fp)) for model, fp in footprints.items()}
        )
        self.base = base
        self.pinned = frozenset(pinned)
        self.costs = costs
        #: what models with a sleep tier hold while asleep (issue 14)
        self.asleep = MappingProxyType(
            {model: MappingProxyType(dict(fp)) for model, fp in (asleep or {}).items()}
        )
        #: the models asleep now (set by the router; asked at each decision)
        self.sleeping: Callable[[], frozenset[str]] = frozenset
        #: model -> (the resources it may be placed on, bytes it holds there)
        #: on top of its footprint (device alternatives, ``"gpu0|gpu1"``)
        self.alternatives = MappingProxyType(dict(alternatives or {}))
        #: model -> the alternative it holds (running) or will hold (the
        #: target of the last decision); the router shares its own dict so
        #: placements outlive a reload.
        self.placed: dict[str, str] = {}

    def with_costs(self, costs: ReloadCosts) -> PlacementPlanner:
        """The same planner, pricing evictions with ``costs``."""
        return PlacementPlanner(
            self.totals,
            self.footprints,
            self.base,
            self.pinned,
            costs,
            asleep=self.asleep,
            alternatives=self.alternatives,
        )

    def device_of(self, model: str) -> str | None:
        """The alternative ``model`` is placed on (``None`` without alternatives)."""
        choice = self.alternatives.get(model)
        if choice is None:
            return None
        placed = self.placed.get(model)
        return placed if placed in choice[0] else choice[0][0]

    def _configured(self, model: str, device: str | None = None) -> Footprint:
        """The configured footprint, with the alternative's share on
        ``device`` (default: where ``model`` is placed)."""
        configured = self.footprints.get(model, self.totals)
        choice = self.alternatives.get(model)
        if choice is None:
            return configured
        on = device if device is not None else self.device_of(model)
        assert on is not None
        held = dict(configured)
        held[on] = held.get(on, 0) + choice[1]
        return held

    def footprint(self, model: str) -> Footprint:
        """Bytes per resource ``model`` holds while loaded: the configured
        footprint, or the measured one where larger (capped at the total)."""
        configured = self._configured(model)
        measured = self.costs.measured_of(model) if self.costs is not None else _NOTHING
        if not measured:
            return configured
        choice = self.alternatives.get(model)
        if choice is not None:
            # measured on one alternative, the same on any: the largest seen
            # counts where it is placed; the others' figures are stale
            device = self.device_of(model)
            assert device is not None
            seen = {n: a for n, a in measured.items() if n not in choice[0]}
            seen[device] = max(measured.get(name, 0) for name in choice[0])
            measured = seen
        return {
            name: max(amount, min(measured.get(name, 0), self.totals.get(name, 0)))
            for name, amount in configured.items()
        }

    def reload_cost(self, model: str) -> float:
        """Expected cost of evicting ``model``: load seconds × request rate."""
        footprint = self.footprint(model)
        size = max(footprint.values(), default=0)
        proxy = max(size / PROXY_BYTES_PER_SECOND, 0.1)
        costs = self.costs
        if costs is None:
            return proxy
        load = costs.load_seconds(model)
        return (proxy if load is None else load) * (costs.rate(model) + RATE_FLOOR)

    def asleep_footprint(self, model: str) -> Footprint:
        """Bytes per resource ``model`` holds while asleep."""
        return self.asleep.get(model, {})

    def shortfall(
        self, models: frozenset[str], sleepers: frozenset[str] = frozenset()
    ) -> dict[str, int]:
        """Bytes per resource by which ``models`` together (with ``sleepers``
        asleep) exceed the machine (only resources that are over)."""
        used = dict.fromkeys(self.totals, 0)
        for model in models:
            for name, amount in self.footprint(model).items():
                used[name] = used.get(name, 0) + amount
        for model in sleepers - models:
            for name, amount in self.asleep_footprint(model).items():
                used[name] = used.get(name, 0) + amount
        return {
            name: amount - self.totals.get(name, 0)
            for name, amount in used.items()
            if amount > self.totals.get(name, 0)
        }

    def evict_set(self, target: str, running: frozenset[str]) -> frozenset[str]:
        return self.evict_set_around(target, running, frozenset())

    def evict_set_around(
        self, target: str, running: frozenset[str], busy: frozenset[str]
    ) -> frozenset[str]:
        evict = frozenset(self.base.evict_set(target, running)) - {target}
        if target in running:
            return evict  # it holds its footprint already
        choice = self.alternatives.get(target)
        if choice is None:
            found = self._room(target, running, busy, evict)
            if found is None:
                raise AssertionError(f"{target!r} is larger than the machine")  # checked at load
            return evict | found[1]
        # device alternatives: the one needing the cheapest evictions (idle
        # victims before busy ones; then the fewest), then the most room
        # left, then the first written
        best: tuple[tuple[int, float, int, int, int], str, frozenset[str]] | None = None
        devices = choice[0]
        if target in self.sleeping() and self.placed.get(target) in devices:
            devices = (self.placed[target],)  # a wake stays where it sleeps
        for position, device in enumerate(devices):
            if self._configured(target, device).get(device, 0) > self.totals.get(device, 0):
                continue  # too small for it
            self.placed[target] = device
            found = self._room(target, running, busy, evict)
            if found is None:
                continue  # even evicting everything leaves too little there
            tier, more = found
            stay = running - evict - more - {target}
            used = sum(self.footprint(m).get(device, 0) for m in stay | {target})
            key = (
                tier,
                sum(self.reload_cost(m) for m in more),
                len(more),
                used - self.totals.get(device, 0),
                position,
            )
            if best is None or key < best[0]:
                best = (key, device, more)
        assert best is not None, f"{target!r} fits no alternative"  # checked at load
        self.placed[target] = best[1]
        return evict | best[2]

    def _room(
        self, target: str, running: frozenset[str], busy: frozenset[str], evict: frozenset[str]
    ) -> tuple[int, frozenset[str]] | None:
        """The further evictions that make room for ``target`` beside
        ``running`` less ``evict``, and which pool they came from (0: idle
        models, 1: busy ones too, 2: pinned ones too); ``None`` when even
        all of them are not enough."""
        stay = running - evict - {target}
        sleepers = self.sleeping() - running - {target}
        short = self.shortfall(stay | {target}, sleepers)
        if not short:
            return 0, frozenset()
        footprints = {model: self.footprint(model) for model in stay - self.pinned}
        # a sleeping model frees what it holds asleep when it is stopped
        footprints.update({m: self.asleep_footprint(m) for m in sleepers - self.pinned})
        idle = {model: fp for model, fp in footprints.items() if model not in busy}
        pools = (idle, footprints, {model: self.footprint(model) for model in stay})
        for tier, pool in enumerate(pools):
            # the last pool (pinned too) is only reached if the config check
            # was bypassed: never over budget wins over never evicting pins
            more = cheapest_cover(pool, short, self.reload_cost)
            if more is not None:
                return tier, more
        return None

    def sleep_is_enough(
        self, target: str, running: frozenset[str], evict: frozenset[str], asleep: frozenset[str]
    ) -> bool:
        """Whether ``target`` fits once ``evict`` are gone but ``asleep`` of
        them (and the models asleep now) stay, asleep."""
        stay = running - evict - {target}
        sleepers = (self.sleeping() | asleep) - stay - {target}
        return not self.shortfall(stay | {target}, sleepers)

    def reasons(
        self, target: str, running: frozenset[str], evict: frozenset[str]
    ) -> dict[str, str]:
        """Why each of ``evict`` goes: ``swap`` (the group or matrix rules)
        or ``memory`` (to make room)."""
        by_rules = frozenset(self.base.evict_set(target, running))
        return {model: "swap" if model in by_rules else "memory" for model in evict}
