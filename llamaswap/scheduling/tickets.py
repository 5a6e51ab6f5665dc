"""Tickets (admitted requests) and the queue they wait in for a swap.

The queue keeps priority order, publishes each queued ticket's 1-based
position when it changes, and decides the ``max_wait`` hold-back on the fast
path (fairness, docs/design.md, difference 3).  Pure, like the scheduler
that owns it (llama-swap §6.4–§6.9 in docs/design.md).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


class TicketStage(enum.Enum):
    """Where an admitted request is in its life."""

    ADMITTED = "admitted"  # reservation held, not submitted yet
    QUEUED = "queued"
    WAITING = "waiting"  # waiting on an active swap for its model
    GRANTED = "granted"  # being served; ends with serve_done
    DONE = "done"  # served, failed, refused or cancelled; reservation released


@dataclass(eq=False)
class Ticket:
    """One admitted request.  Identity semantics: two tickets for the same
    model are different requests."""

    model: str
    priority: int
    _stage: TicketStage = field(default=TicketStage.ADMITTED, init=False)
    _reserved: bool = field(default=True, init=False, repr=False)
    _position: int = field(default=0, init=False, repr=False)
    _queued_at: float | None = field(default=None, init=False, repr=False)

    @property
    def stage(self) -> TicketStage:
        return self._stage


class TicketQueue:
    """Queued tickets in priority order (FIFO within a priority).

    ``publish(ticket, position)`` is told every queued ticket's new 1-based
    position.  With ``max_wait`` (seconds, read from ``clock``), a request
    queued that long holds back requests for other models queued after it.
    """

    def __init__(
        self,
        publish: Callable[[Ticket, int], None],
        *,
        max_wait: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._publish = publish
        self._max_wait = max_wait
        self._clock = clock
        self._tickets: list[Ticket] = []
        #: during a drain, the tickets not yet re-routed
        self._draining: list[Ticket] = []

    def __len__(self) -> int:
        return len(self._tickets)

    def __iter__(self) -> Iterator[Ticket]:
        return iter(self._tickets)

    def push(self, ticket: Ticket) -> None:
        """Queue before the first ticket of strictly lower priority."""
        index = next(
            (i for i, queued in enumerate(self._tickets) if queued.priority < ticket.priority),
            len(self._tickets),
        )
        self._tickets.insert(index, ticket)
        ticket._stage = TicketStage.QUEUED
        if self._clock is not None:
            ticket._queued_at = self._clock()
        self.publish_positions()

    def remove(self, ticket: Ticket) -> None:
        """Take a queued ticket out (positions are published by the next drain)."""
        self._tickets.remove(ticket)

    def discard(self, models: frozenset[str], removed: Callable[[Ticket], None]) -> None:
        """Take out the tickets for ``models``, calling ``removed`` for each in
        queue order; the queue shows them until every call is made."""
        kept = []
        for ticket in self._tickets:
            if ticket.model in models:
                removed(ticket)
            else:
                kept.append(ticket)
        self._tickets = kept

    def take_all(self) -> list[Ticket]:
        """Empty the queue, returning what it held in order."""
        tickets, self._tickets = self._tickets, []
        return tickets

    def drain(self, route: Callable[[Ticket], bool]) -> None:
        """Re-route queued tickets in order with ``route`` (``False``: it
        stays queued); blocked ones keep their order."""
        pending, self._tickets = self._tickets, []
        for index, ticket in enumerate(pending):
            # what is still queued behind this ticket, for held_back
            self._draining = pending[index + 1 :]
            if not route(ticket):
                self._tickets.append(ticket)
        self._draining = []
        self.publish_positions()

    def publish_positions(self) -> None:
        for position, ticket in enumerate(self._tickets, 1):
            if ticket._position != position:
                ticket._position = position
                self._publish(ticket, position)

    def held_back(self, ticket: Ticket) -> bool:
        """Whether ``ticket`` must not take the fast path because a request
        for another model, queued before it, has waited ``max_wait``
        (fairness, docs/design.md, difference 3).  "Queued before" (not "ahead in the
        queue"): a higher-priority request must not overtake an expired one,
        and of two expired requests the older is never held by the newer."""
        if self._max_wait is None or self._clock is None:
            return False
        now = self._clock()
        deadline = now - self._max_wait
        since = ticket._queued_at if ticket._queued_at is not None else now
        return any(
            other.model != ticket.model
            and other._queued_at is not None
            and other._queued_at <= deadline
            and other._queued_at < since
            for other in (*self._tickets, *self._draining)
        )
