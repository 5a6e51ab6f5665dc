"""The simulated service: the real scheduler and planners on a virtual clock.

:class:`Simulation` is another implementation of the scheduler's effects
(:class:`~llamaswap.scheduling.IEffects`, as :class:`~llamaswap.supervision.
router.Router` is the real one): stopping a model takes ``stop_time``
seconds (0 by default), starting one makes it ready after its load time, a
granted request is done after its duration.  Everything happens on a
discrete-event clock: a heap of (time, order, action), so equal times run
in the order they were scheduled.  It feeds the placement planner's
:class:`~llamaswap.scheduling.placement.ReloadCosts` as the router does
(a load time when a start ends ready, a request per grant) and stops idle
models after their ``ttl`` as a model process does.

Simplifications, on purpose: a model serves any number of granted requests
at once, each in its own duration; starts never fail; no process is ever
slower to stop than ``stop_time``.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zope.interface import implementer

from llamaswap.config import Config
from llamaswap.config.resources import ASSUMED
from llamaswap.scheduling import IEffects, ISwapPlanner, Scheduler, Ticket
from llamaswap.scheduling.placement import PROXY_BYTES_PER_SECOND, PlacementPlanner, ReloadCosts
from llamaswap.simulate.trace import Request

__all__ = [
    "DEFAULT_LOAD_TIME",
    "ModelOutcome",
    "Outcome",
    "PolicyFactory",
    "Simulation",
    "Usage",
    "guessed_load_time",
    "load_times_for",
    "percentile",
]

#: seconds a model takes to load when nothing better is known.
DEFAULT_LOAD_TIME = 10.0
#: process states in which a model holds its footprint.
_HOLDING = frozenset({"starting", "ready", "stopping"})


def guessed_load_time(footprint: Mapping[str, int]) -> float:
    """The placement planner's guess for a model never started: its largest
    footprint at :data:`~llamaswap.scheduling.placement.PROXY_BYTES_PER_SECOND`."""
    return max(max(footprint.values(), default=0) / PROXY_BYTES_PER_SECOND, 0.1)


def load_times_for(
    configs: Sequence[Config],
    given: Mapping[str, float] | None = None,
    learned: Mapping[str, float] | None = None,
    default: float = DEFAULT_LOAD_TIME,
) -> dict[str, float]:
    """One load time per model of any of ``configs`` (the same model loads
    as fast whatever the config): ``given`` first, then ``learned`` (from
    the store), then the placement planner's guess from a footprint some
    config declares or estimates, then ``default``."""
    given, learned = dict(given or {}), dict(learned or {})
    times: dict[str, float] = {}
    for config in configs:
        resources = config.resources
        for model in config.models:
            if model in times:
                continue
            known = given.get(model, learned.get(model))
            if known is None and resources is not None:
                held = resources.footprints.get(model, {})
                if held and all(fp.source != ASSUMED for fp in held.values()):
                    known = guessed_load_time({name: fp.bytes for name, fp in held.items()})
            if known is not None:
                times[model] = known
    for config in configs:
        for model in config.models:
            times.setdefault(model, default)
    return times


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of ``values`` (``None`` when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


class Usage:
    """What the simulated service learns while it runs, for planners: the
    placement planner's reload costs and when each model was last granted a
    request (for the LRU policies of :mod:`.policies`)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.costs = ReloadCosts(clock)
        #: model -> virtual time of its latest grant
        self.last_used: dict[str, float] = {}

    def requested(self, model: str) -> None:
        self.costs.requested(model)
        self.last_used[model] = self.clock()


#: builds a planner that replaces the config's (the bench's baseline policies).
PolicyFactory = Callable[[Usage], ISwapPlanner]


@dataclass
class ModelOutcome:
    """One model's requests in a run."""

    requests: int = 0
    served: int = 0
    #: refused at admission (429: ``concurrencyLimit`` reached).
    rejected: int = 0
    failed: int = 0
    #: seconds from arrival to grant, per served request.
    waits: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "served": self.served,
            "rejected": self.rejected,
            "failed": self.failed,
            "wait_p50": percentile(self.waits, 50),
            "wait_p99": percentile(self.waits, 99),
            "wait_max": max(self.waits, default=None),
        }


@dataclass
class Outcome:
    """What one config did with a trace."""

    name: str
    #: model starts (the first load of a model counts too).
    swaps: int = 0
    #: seconds spent loading, summed over starts.
    load_seconds: float = 0.0
    #: models stopped while starting or ready, by reason (swap, memory, ttl).
    evictions: Counter[str] = field(default_factory=Counter)
    models: dict[str, ModelOutcome] = field(default_factory=dict)
    #: resource -> the most bytes reserved at once (models starting, ready or stopping).
    peak_reserved: dict[str, int] = field(default_factory=dict)
    #: resource -> bytes the machine has (what ``peak_reserved`` is measured against).
    totals: dict[str, int] = field(default_factory=dict)
    #: starts that left some resource reserved beyond its total (a real
    #: machine would have run out of memory: the count-LRU policy can).
    over_budget_starts: int = 0
    #: trace model names the config does not serve -> requests skipped.
    skipped: Counter[str] = field(default_factory=Counter)
    #: virtual seconds from the first arrival to the last event.
    duration: float = 0.0

    def all_waits(self) -> list[float]:
        return [wait for model in self.models.values() for wait in model.waits]

    def to_json(self) -> dict[str, Any]:
        waits = self.all_waits()
        return {
            "name": self.name,
            "swaps": self.swaps,
            "load_seconds": round(self.load_seconds, 3),
            "evictions": dict(sorted(self.evictions.items())),
            "wait_p50": percentile(waits, 50),
            "wait_p99": percentile(waits, 99),
            "models": {model: outcome.to_json() for model, outcome in sorted(self.models.items())},
            "peak_reserved": dict(self.peak_reserved),
            "totals": dict(self.totals),
            "over_budget_starts": self.over_budget_starts,
            "skipped": dict(sorted(self.skipped.items())),
            "duration": round(self.duration, 3),
        }


@dataclass(eq=False)
class _Pending:
    request: Request | None  # None: a preload
    arrival: float
    on_served: Callable[[], None] | None = None


@implementer(IEffects)
class Simulation:
    """Replays requests through ``config``'s scheduler and planners.

    ``load_times``: seconds per model (:func:`load_times_for`); a model not
    in it takes ``default_load_time``.  ``policy``: a planner
    to use instead of the config's.  ``footprints``/``totals``: what peak
    reserved is counted with (default: the config's ``resources``).
    """

    def __init__(
        self,
        config: Config,
        load_times: Mapping[str, float] | None = None,
        *,
        name: str = "",
        default_load_time: float = DEFAULT_LOAD_TIME,
        stop_time: float = 0.0,
        policy: PolicyFactory | None = None,
        footprints: Mapping[str, Mapping[str, int]] | None = None,
        totals: Mapping[str, int] | None = None,
    ) -> None:
        self.config = config
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = 0
        resources = config.resources
        if footprints is None and resources is not None:
            footprints = {model: resources.bytes_of(model) for model in resources.footprints}
        if totals is None and resources is not None:
            totals = resources.totals
        self._totals = dict(totals or {})
        self._footprints = {
            model: dict((footprints or {}).get(model, self._totals)) for model in config.models
        }
        given = dict(load_times or {})
        self.load_times = {model: given.get(model, default_load_time) for model in config.models}
        self._stop_time = stop_time
        self.usage = Usage(lambda: self.now)
        routing = config.routing
        if policy is not None:
            self.planner = policy(self.usage)
        elif isinstance(routing.planner, PlacementPlanner):
            self.planner = routing.planner.with_costs(self.usage.costs)
        else:
            self.planner = routing.planner
        self._state = dict.fromkeys(config.models, "stopped")
        self._in_flight: Counter[str] = Counter()
        #: model -> a counter bumped at every activity; a TTL timer fires only if unchanged
        self._activity: Counter[str] = Counter()
        self._pending: dict[Ticket, _Pending] = {}
        self.outcome = Outcome(name, totals=dict(self._totals))
        self.outcome.peak_reserved = dict.fromkeys(self._totals, 0)
        self.scheduler = Scheduler(
            self,
            self.planner,
            state_of=self._state.__getitem__,
            limits={m: c.concurrency_limit for m, c in config.models.items()},
            priorities=routing.priorities,
            name=routing.router,
            max_wait=routing.max_wait,
            clock=lambda: self.now,
        )

    def loaded(self) -> frozenset[str]:
        """The models holding their footprint now (starting, ready, stopping)."""
        return frozenset(model for model, state in self._state.items() if state in _HOLDING)

    # -- the clock --------------------------------------------------------------

    def call_at(self, when: float, action: Callable[[], None]) -> None:
        """Run ``action`` at virtual time ``when`` (after those scheduled
        before it for the same time)."""
        self._order += 1
        heapq.heappush(self._events, (max(when, self.now), self._order, action))

    def _run_events(self) -> None:
        while self._events:
            when, _, action = heapq.heappop(self._events)
            self.now = when
            action()

    # -- running a trace --------------------------------------------------------

    def run(self, requests: Iterable[Request]) -> Outcome:
        """Replay ``requests``: the config's preloads load first, then each
        request arrives at its time (relative to the first one)."""
        trace = sorted(requests, key=lambda request: request.arrival)
        self._preload(list(self.config.preload))
        self._run_events()
        if trace:
            start, first = self.now, trace[0].arrival
            for request in trace:
                self.call_at(
                    start + request.arrival - first, functools.partial(self._arrive, request)
                )
            self._run_events()
            self.outcome.duration = self.now - start
        return self.outcome

    def _preload(self, names: list[str]) -> None:
        """``hooks.on_startup.preload``, in order, one after the other (as
        the service does); counted as loads, not as requests."""
        while names:
            model = self.config.resolve(names.pop(0))
            if model is None:
                continue
            ticket = self.scheduler.admit(model)
            if ticket is None:
                continue
            self._pending[ticket] = _Pending(None, self.now, lambda: self._preload(names))
            self.scheduler.submit(ticket)
            return

    def _arrive(self, request: Request) -> None:
        model = self.config.resolve(request.model)
        if model is None:
            self.outcome.skipped[request.model] += 1
            return
        outcome = self.outcome.models.setdefault(model, ModelOutcome())
        outcome.requests += 1
        ticket = self.scheduler.admit(model)
        if ticket is None:
            outcome.rejected += 1
            return
        self._pending[ticket] = _Pending(request, self.now)
        self.scheduler.submit(ticket)

    # -- IEffects ---------------------------------------------------------------

    def grant(self, ticket: Ticket) -> bool:
        pending = self._pending.pop(ticket, None)
        if pending is None:
            return False
        model = ticket.model
        self._in_flight[model] += 1
        self._activity[model] += 1
        self.usage.requested(model)
        duration = 0.0
        if pending.request is not None:
            outcome = self.outcome.models[model]
            outcome.served += 1
            outcome.waits.append(self.now - pending.arrival)
            duration = pending.request.duration
        self.call_at(self.now + duration, lambda: self._served(ticket, pending))
        return True

    def fail(self, ticket: Ticket, message: str) -> None:
        pending = self._pending.pop(ticket, None)
        if pending is not None and pending.request is not None:
            self.outcome.models[ticket.model].failed += 1
        if pending is not None and pending.on_served is not None:
            self.call_at(self.now, pending.on_served)

    def queue_position(self, ticket: Ticket, position: int) -> None:
        pass

    def start_swap(self, target: str, evict: frozenset[str]) -> None:
        running = frozenset(m for m, s in self._state.items() if s != "stopped") - {target}
        explain = getattr(self.planner, "reasons", None)
        reasons: Mapping[str, str] = explain(target, running, evict) if explain else {}
        self.call_at(self.now, lambda: self._swap(target, evict, reasons))

    def stop_models(self, models: frozenset[str]) -> None:
        for model in sorted(models):
            self._stop(model, "unload", lambda: None)

    # -- the simulated processes ------------------------------------------------

    def _served(self, ticket: Ticket, pending: _Pending) -> None:
        model = ticket.model
        self._in_flight[model] -= 1
        if not self._in_flight[model]:
            del self._in_flight[model]
            self._arm_ttl(model)
        self.scheduler.serve_done(ticket)
        if pending.on_served is not None:
            pending.on_served()

    def _swap(self, target: str, evict: frozenset[str], reasons: Mapping[str, str]) -> None:
        left = [len(evict)]

        def stopped() -> None:
            left[0] -= 1
            if not left[0]:
                self._start(target)

        if not evict:
            self._start(target)
        for model in sorted(evict):
            self._stop(model, reasons.get(model, "swap"), stopped)

    def _stop(self, model: str, reason: str, then: Callable[[], None]) -> None:
        if self._state[model] == "stopped":
            then()
            return
        if self._state[model] != "stopping":
            self.outcome.evictions[reason] += 1
        self._set_state(model, "stopping")
        self._activity[model] += 1

        def done() -> None:
            if self._state[model] == "stopping":
                self._set_state(model, "stopped")
                self.scheduler.state_changed(model)
            then()

        self.call_at(self.now + self._stop_time, done)

    def _start(self, target: str) -> None:
        if self._state[target] == "ready":
            self.scheduler.swap_done(target, None)
            return
        load = self.load_times[target]
        self._set_state(target, "starting")

        def ready() -> None:
            self._set_state(target, "ready")
            self.outcome.swaps += 1
            self.outcome.load_seconds += load
            self.usage.costs.loaded(target, load)
            self.scheduler.swap_done(target, None)
            if not self._in_flight[target]:
                self._arm_ttl(target)

        self.call_at(self.now + load, ready)

    def _arm_ttl(self, model: str) -> None:
        """A ready model with no request in flight stops after ``ttl``
        seconds unless something happens to it meanwhile."""
        ttl = self.config.models[model].ttl
        self._activity[model] += 1
        if ttl <= 0:
            return
        mark = self._activity[model]

        def expire() -> None:
            if (
                self._activity[model] == mark
                and self._state[model] == "ready"
                and not self._in_flight[model]
            ):
                self._stop(model, "ttl", lambda: None)

        self.call_at(self.now + ttl, expire)

    def _set_state(self, model: str, state: str) -> None:
        self._state[model] = state
        if state != "starting":
            return
        reserved = dict.fromkeys(self._totals, 0)
        for other, held in self._state.items():
            if held in _HOLDING:
                for name, amount in self._footprints[other].items():
                    reserved[name] = reserved.get(name, 0) + amount
        peak = self.outcome.peak_reserved
        for name, amount in reserved.items():
            peak[name] = max(peak.get(name, 0), amount)
        if state == "starting" and any(
            amount > self._totals.get(name, 0) for name, amount in reserved.items()
        ):
            self.outcome.over_budget_starts += 1
