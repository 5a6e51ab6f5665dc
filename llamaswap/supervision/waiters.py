"""Callers waiting for one outcome, each free to give up on its own."""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred

T = TypeVar("T")


class Waiters(Generic[T]):
    """Callers waiting for one outcome; a caller's cancel only detaches it."""

    def __init__(self) -> None:
        self._pending: list[Deferred[T]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def wait(self) -> Deferred[T]:
        """A new Deferred for the outcome; cancelling it detaches only this caller."""
        d: Deferred[T] = Deferred(self._pending.remove)
        self._pending.append(d)
        return d

    def fire(self, result: T) -> None:
        """Give every current waiter ``result``; later callers wait for the next one."""
        pending, self._pending = self._pending, []
        for d in pending:
            d.callback(result)

    def fail(self, error: Exception) -> None:
        """Fail every current waiter with ``error``."""
        pending, self._pending = self._pending, []
        for d in pending:
            d.errback(error)
