"""Bounded delivery to one consumer that may be paused.

A :class:`Mailbox` hands items to its consumer at once, or queues a bounded
number of them while the consumer is paused (an HTTP client that reads
slowly); beyond the bound items are refused, so a writer is never held up
and memory never grows.  Log subscriptions and event-bus subscriptions are
both built on it (:class:`MailboxSubscription`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from twisted.logger import Logger

__all__ = ["ByteSink", "Mailbox", "MailboxSubscription", "drop_marker"]

log = Logger()

T = TypeVar("T")


class ByteSink(Protocol):
    """Anything bytes can be written to (a log monitor, a stdout writer)."""

    def write(self, data: bytes, /) -> object: ...


class Mailbox(Generic[T]):
    """Hands items to ``deliver``, queueing a bounded number while paused.

    While not paused and nothing is queued, :meth:`put` delivers at once.
    While paused, items queue up to ``max_items`` (and ``max_bytes`` of the
    ``size`` given to :meth:`put`); beyond that :meth:`put` refuses them and
    returns ``False``.  :meth:`resume` delivers the queue in order.  A
    ``deliver`` that raises closes the mailbox (it is logged once).
    """

    def __init__(
        self,
        deliver: Callable[[T], object],
        *,
        max_items: int,
        max_bytes: int | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._deliver = deliver
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._on_close = on_close
        self._queue: deque[tuple[T, int]] = deque()
        self._queued_bytes = 0
        self._delivering = False
        self.paused = False
        self.closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def has_room(self, size: int = 0) -> bool:
        if self.closed:
            return False
        if not self._queue:
            return True  # an empty queue always takes one item, whatever its size
        if len(self._queue) >= self._max_items:
            return False
        return self._max_bytes is None or self._queued_bytes + size <= self._max_bytes

    def put(self, item: T, size: int = 0) -> bool:
        """Deliver or queue ``item``; ``False`` if it was dropped."""
        if self.closed:
            return False
        if not self.has_room(size):
            return False
        self._queue.append((item, size))
        self._queued_bytes += size
        self._drain()
        return True

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._drain()

    def close(self) -> None:
        """Stop delivering and forget what is queued; idempotent."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._queued_bytes = 0
        if self._on_close is not None:
            self._on_close()

    def _drain(self) -> None:
        if self._delivering:
            return  # the outer loop delivers it, keeping order
        self._delivering = True
        try:
            while self._queue and not self.paused and not self.closed:
                item, size = self._queue.popleft()
                self._queued_bytes -= size
                try:
                    self._deliver(item)
                except Exception:
                    self.close()
                    log.failure("subscriber failed; removed")
        finally:
            self._delivering = False


def drop_marker(count: int) -> bytes:
    """What precedes the first chunk delivered after ``count`` bytes were dropped."""
    return f"\n— {count} bytes dropped —\n".encode()


class MailboxSubscription(Generic[T]):
    """A subscriber's handle on its :class:`Mailbox`: flow control and
    unsubscribing.  Calling it (or :meth:`close`) unsubscribes."""

    _mailbox: Mailbox[T]

    @property
    def paused(self) -> bool:
        return self._mailbox.paused

    @property
    def queued(self) -> int:
        return len(self._mailbox)

    def pause(self) -> None:
        self._mailbox.pause()

    def resume(self) -> None:
        self._mailbox.resume()

    def close(self) -> None:
        self._mailbox.close()

    def __call__(self) -> None:
        self.close()

    def _detach(self) -> None:
        """Remove this subscription from its source (the mailbox closed)."""
        raise NotImplementedError
