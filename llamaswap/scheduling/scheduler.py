"""The request scheduler: admission, queueing, collation and swap decisions.

A pure state machine (llama-swap §6.4–§6.9 in docs/design.md).  It owns reservations, in-flight
counts, the priority queue and the set of active swaps; it reads process state
live through ``state_of`` and acts only through :class:`IEffects`.  It does no
I/O, imports no reactor and logs nothing.

Effects may re-enter the scheduler (a grant can synchronously finish the
request, a failure can make a client retry).  Every mutating call is therefore
a step on an internal run queue: a call made while another step runs is
performed after it, in call order, so a decision never sees a half-applied
state change.  Queries and :meth:`Scheduler.admit` answer immediately.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import cast

from zope.interface import Interface

from llamaswap.scheduling.planner import IBusyAwarePlanner, ISwapPlanner
from llamaswap.scheduling.tickets import Ticket, TicketQueue, TicketStage

__all__ = [
    "IEffects",
    "Scheduler",
    "SchedulerSnapshot",
    "ShuttingDown",
    "Ticket",
    "TicketStage",
    "UnknownModel",
]

#: process states in which a model occupies nothing and need not be evicted.
#: a sleeping model (issue 14's sleep tier) holds no place under the rules;
#: the placement planner counts what it holds asleep.
_IDLE_STATES = frozenset({"stopped", "shutdown", "sleeping"})


class IEffects(Interface):
    """Everything the scheduler does to the world.  The router implements it.

    Calls happen on the reactor thread and may re-enter the scheduler.  They
    must not raise: the implementation handles and logs its own failures.
    """

    def start_swap(target: str, evict: frozenset[str]) -> None:
        """Stop ``evict`` (all idle), then make ``target`` ready.  Every call
        must be answered by exactly one ``Scheduler.swap_done(target, error)``
        (also when the start was aborted by an unload or shutdown), and
        answers for the same target must come in call order."""

    def grant(ticket: Ticket) -> bool:
        """Hand the model to the waiting request; ``False`` if the request is
        gone (nothing was handed over)."""

    def fail(ticket: Ticket, message: str) -> None:
        """Answer the request with an error (500 ``unspecific error: <message>``)."""

    def queue_position(ticket: Ticket, position: int) -> None:
        """The queued ticket's 1-based position changed."""

    def stop_models(models: frozenset[str]) -> None:
        """Unload: stop these processes now."""


class UnknownModel(Exception):
    """The model is not handled by this scheduler (404)."""


class ShuttingDown(Exception):
    """The scheduler has been shut down; the message is the error text."""


@dataclass
class _Swap:
    """An active swap: its eviction footprint and the tickets waiting on it."""

    evict: frozenset[str]
    waiters: list[Ticket]


@dataclass(frozen=True)
class SchedulerSnapshot:
    """A point-in-time view for introspection (events, metrics, UI)."""

    #: models of the queued tickets, in queue order.
    queued: tuple[str, ...]
    #: active swap target -> models it evicts.
    swaps: Mapping[str, frozenset[str]]
    #: active swap target -> number of waiting tickets.
    waiting: Mapping[str, int]
    in_flight: Mapping[str, int]
    reserved: Mapping[str, int]


class _Steps:
    """The scheduler's run queue: a step requested while another runs is
    performed after it, in call order, so no step sees a half-applied one."""

    def __init__(self) -> None:
        self._steps: deque[Callable[[], None]] = deque()
        self._stepping = False

    def __call__(self, step: Callable[[], None]) -> None:
        """Perform ``step`` now, or after the running step if re-entered."""
        self._steps.append(step)
        if self._stepping:
            return
        self._stepping = True
        try:
            while self._steps:
                self._steps.popleft()()
        finally:
            self._stepping = False


class Scheduler:
    """FIFO scheduler with priorities, collation and parallel disjoint swaps.

    ``limits`` maps every handled model to its admission limit (queued +
    waiting + served).  ``priorities`` orders the queue (default 0).  With
    ``max_wait`` (seconds, read from ``clock``), once a queued request for some
    model has waited that long, requests for other ready models stop taking
    the fast path, so the waiting swap happens when in-flight work drains.
    """

    def __init__(
        self,
        effects: IEffects,
        planner: ISwapPlanner,
        state_of: Callable[[str], str],
        limits: Mapping[str, int],
        priorities: Mapping[str, int] | None = None,
        name: str = "group",
        *,
        max_wait: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if any(limit < 1 for limit in limits.values()):
            raise ValueError(f"concurrency limits must be >= 1: {dict(limits)!r}")
        if max_wait is not None and clock is None:
            raise ValueError("max_wait needs a clock")
        self._effects = effects
        self._planner = planner
        self._busy_aware = IBusyAwarePlanner.providedBy(planner)
        self._state_of = state_of
        self._limits = MappingProxyType(dict(limits))
        self._priorities = MappingProxyType(dict(priorities or {}))
        self.name = name
        self._reserved: Counter[str] = Counter()
        self._in_flight: Counter[str] = Counter()
        self._swaps: dict[str, _Swap] = {}
        # targets of forgotten swaps whose swap_done is still to come
        self._stale: Counter[str] = Counter()
        self._queue = TicketQueue(effects.queue_position, max_wait=max_wait, clock=clock)
        self._run = _Steps()
        self._closing = False

    # -- requests -----------------------------------------------------------

    def admit(self, model: str) -> Ticket | None:
        """Reserve a slot for a request (step 2 of §6.4).  ``None`` when the
        model is at its limit (429).  Raises :class:`UnknownModel` and, after
        :meth:`shutdown`, :class:`ShuttingDown`."""
        if model not in self._limits:
            raise UnknownModel(model)
        if self._closing:
            raise ShuttingDown(self._shutdown_message)
        if self._reserved[model] >= self._limits[model]:
            return None
        self._reserved[model] += 1
        return Ticket(model, self._priorities.get(model, 0))

    def submit(self, ticket: Ticket) -> None:
        """Route an admitted ticket (steps 3–7): join, grant, queue or swap.
        A ticket cancelled before submission is ignored."""
        self._run(lambda: self._on_submit(ticket))

    def cancel(self, ticket: Ticket) -> None:
        """The client went away before being granted: drop the ticket and
        release its reservation.  No-op once granted or ended."""
        self._run(lambda: self._on_cancel(ticket))

    def serve_done(self, ticket: Ticket) -> None:
        """A granted request finished; call exactly once per granted ticket."""
        self._run(lambda: self._on_serve_done(ticket))

    # -- world events ---------------------------------------------------------

    def swap_done(self, target: str, error: str | None) -> None:
        """The swap to ``target`` finished: grant its waiters in arrival order
        (or fail each with ``error``), then drain the queue."""
        self._run(lambda: self._on_swap_done(target, error))

    def state_changed(self, model: str) -> None:
        """A process changed state outside the scheduler (TTL stop, crash)."""
        self._run(self._drain)

    def unload(self, models: Iterable[str] | None = None) -> None:
        """Stop ``models`` (all when ``None``), failing whoever waits for them."""
        targets = frozenset(self._limits if models is None else models).intersection(self._limits)
        self._run(lambda: self._on_unload(targets))

    def is_swapping(self, target: str) -> bool:
        """Whether a swap to ``target`` is active (not finished or forgotten)."""
        return target in self._swaps

    def reconfigure(
        self,
        limits: Mapping[str, int],
        priorities: Mapping[str, int] | None = None,
        planner: ISwapPlanner | None = None,
    ) -> None:
        """Adopt a reloaded configuration.  Waiting and queued requests for
        models that are gone fail; in-flight ones finish and are counted down
        as usual.  Models that stay keep their queue places and counts."""
        if any(limit < 1 for limit in limits.values()):
            raise ValueError(f"concurrency limits must be >= 1: {dict(limits)!r}")
        self._run(lambda: self._on_reconfigure(limits, priorities, planner))

    def _on_reconfigure(
        self,
        limits: Mapping[str, int],
        priorities: Mapping[str, int] | None,
        planner: ISwapPlanner | None,
    ) -> None:
        removed = frozenset(self._limits) - frozenset(limits)
        message = f"{self.name}: model removed by a configuration reload"
        for target in sorted(removed & self._swaps.keys()):
            self._forget_swap(target, message)
        self._queue.discard(removed, lambda ticket: self._fail(ticket, message))
        self._limits = MappingProxyType(dict(limits))
        if priorities is not None:
            self._priorities = MappingProxyType(dict(priorities))
        if planner is not None:
            self._planner = planner
            self._busy_aware = IBusyAwarePlanner.providedBy(planner)
        self._drain()

    def shutdown(self) -> None:
        """Fail every waiting and queued request; refuse new ones."""
        self._closing = True
        self._run(self._on_shutdown)

    # -- introspection --------------------------------------------------------

    @property
    def closing(self) -> bool:
        """:meth:`shutdown` has been called."""
        return self._closing

    def in_flight(self, model: str) -> int:
        return self._in_flight[model]

    def reserved(self, model: str) -> int:
        return self._reserved[model]

    def queue_length(self) -> int:
        return len(self._queue)

    def snapshot(self) -> SchedulerSnapshot:
        return SchedulerSnapshot(
            queued=tuple(ticket.model for ticket in self._queue),
            swaps=MappingProxyType({t: swap.evict for t, swap in self._swaps.items()}),
            waiting=MappingProxyType({t: len(swap.waiters) for t, swap in self._swaps.items()}),
            in_flight=MappingProxyType(+self._in_flight),
            reserved=MappingProxyType(+self._reserved),
        )

    # -- steps ----------------------------------------------------------------

    @property
    def _shutdown_message(self) -> str:
        return f"{self.name} is shutting down"

    def _on_submit(self, ticket: Ticket) -> None:
        if ticket._stage is TicketStage.DONE:
            return
        assert ticket._stage is TicketStage.ADMITTED, f"submitted twice: {ticket!r}"
        if self._closing:
            self._fail(ticket, self._shutdown_message)
        elif not self._route(ticket):
            self._queue.push(ticket)

    def _on_cancel(self, ticket: Ticket) -> None:
        stage = ticket._stage
        if stage is TicketStage.QUEUED:
            self._queue.remove(ticket)
        elif stage is TicketStage.WAITING:
            self._swaps[ticket.model].waiters.remove(ticket)
        elif stage is not TicketStage.ADMITTED:
            return
        self._end(ticket)
        if stage is TicketStage.QUEUED:
            # positions moved, and a max_wait hold on the fast path may be gone
            self._drain()

    def _on_serve_done(self, ticket: Ticket) -> None:
        assert ticket._stage is TicketStage.GRANTED, f"serve_done without a grant: {ticket!r}"
        self._in_flight[ticket.model] -= 1
        remaining = self._in_flight[ticket.model]
        assert remaining >= 0
        if remaining == 0:
            del self._in_flight[ticket.model]
        self._end(ticket)
        if remaining == 0:
            self._drain()

    def _on_swap_done(self, target: str, error: str | None) -> None:
        if self._stale[target]:
            # the answer to a swap forgotten by unload or shutdown
            self._stale[target] -= 1
            if not self._stale[target]:
                del self._stale[target]
        else:
            swap = self._swaps.pop(target, None)
            for ticket in swap.waiters if swap is not None else ():
                if error is None:
                    self._grant(ticket)
                else:
                    self._fail(ticket, error)
        self._drain()

    def _on_unload(self, targets: frozenset[str]) -> None:
        message = f"{self.name}: model unloaded"
        for target in sorted(targets & self._swaps.keys()):
            self._forget_swap(target, message)
        self._queue.discard(targets, lambda ticket: self._fail(ticket, message))
        if targets:
            self._effects.stop_models(targets)
        self._drain()

    def _on_shutdown(self) -> None:
        for target in list(self._swaps):
            self._forget_swap(target, self._shutdown_message)
        for ticket in self._queue.take_all():
            self._fail(ticket, self._shutdown_message)

    # -- decisions ------------------------------------------------------------

    def _route(self, ticket: Ticket) -> bool:
        """Steps 3–7 of §6.4 for one ticket; ``False`` when it must queue."""
        model = ticket.model
        swap = self._swaps.get(model)
        if swap is not None:
            swap.waiters.append(ticket)
            ticket._stage = TicketStage.WAITING
            return True
        evict = self._plan(model)
        assert model not in evict, f"planner evicts its own target {model!r}"
        if self._collides(model, evict):
            return False
        if not evict and self._state_of(model) == "ready":
            if self._queue.held_back(ticket):
                return False
            self._grant(ticket)
            return True
        if any(self._in_flight[victim] for victim in evict):
            return False  # busy models are never evicted
        self._swaps[model] = _Swap(evict, [ticket])
        ticket._stage = TicketStage.WAITING
        self._effects.start_swap(model, evict)
        return True

    def _plan(self, target: str) -> frozenset[str]:
        """The planner's evictions for ``target``; a busy-aware planner (the
        placement planner) hears which models are serving, starting or being
        evicted already, so it chooses idle victims where it can."""
        running = self._running(target)
        if self._busy_aware:
            busy = set(self._in_flight) | self._swaps.keys()
            for swap in self._swaps.values():
                busy |= swap.evict
            planner = cast(IBusyAwarePlanner, self._planner)  # checked once, when set
            return frozenset(planner.evict_set_around(target, running, frozenset(busy)))
        return frozenset(self._planner.evict_set(target, running))

    def _running(self, target: str) -> frozenset[str]:
        """Live processes plus the targets of other active swaps."""
        live = {model for model in self._limits if self._state_of(model) not in _IDLE_STATES}
        if self._state_of(target) == "stopping":
            # Restarting a model that is still stopping must still evict what
            # cannot run beside it (llama-swap skips that: a quirk).
            live.discard(target)
        return frozenset(live | (self._swaps.keys() - {target}))

    def _collides(self, target: str, evict: frozenset[str]) -> bool:
        """Whether a swap to ``target`` evicting ``evict`` would clash with an
        active swap: it would stop that swap's target, be stopped by it, or
        share a victim.  With nothing to evict this is "someone evicts us"."""
        return any(
            other in evict or target in swap.evict or not evict.isdisjoint(swap.evict)
            for other, swap in self._swaps.items()
            if other != target
        )

    def _drain(self) -> None:
        """Re-route queued tickets in order; blocked ones keep their order."""
        self._queue.drain(self._route)

    # -- ticket endings -------------------------------------------------------

    def _grant(self, ticket: Ticket) -> None:
        """Hand over the model; count it in flight only if the hand-off landed."""
        ticket._stage = TicketStage.GRANTED
        if self._effects.grant(ticket):
            self._in_flight[ticket.model] += 1
        else:
            self._end(ticket)

    def _fail(self, ticket: Ticket, message: str) -> None:
        self._end(ticket)
        self._effects.fail(ticket, message)

    def _forget_swap(self, target: str, message: str) -> None:
        """Drop an active swap, failing its waiters; its answer will be ignored."""
        swap = self._swaps.pop(target)
        self._stale[target] += 1
        for ticket in swap.waiters:
            self._fail(ticket, message)

    def _end(self, ticket: Ticket) -> None:
        """Release the ticket's reservation; exactly once per ticket."""
        assert ticket._reserved, f"reservation released twice: {ticket!r}"
        ticket._reserved = False
        ticket._stage = TicketStage.DONE
        self._reserved[ticket.model] -= 1
        assert self._reserved[ticket.model] >= 0
        if not self._reserved[ticket.model]:
            del self._reserved[ticket.model]
