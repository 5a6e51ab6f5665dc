"""Log monitors: a bounded history ring plus live subscribers.

A monitor never blocks its writer: subscribers are plain callables invoked
synchronously on the reactor thread and must not do blocking work (the HTTP
log streams hand the bytes to ``request.write``, which only buffers).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

HISTORY_BYTES = 100 * 1024

Subscriber = Callable[[bytes], None]


class LogMonitor:
    """Keeps the last ``HISTORY_BYTES`` written and fans chunks out."""

    def __init__(
        self, name: str, history_bytes: int = HISTORY_BYTES, sinks: tuple[LogMonitor, ...] = ()
    ) -> None:
        self.name = name
        self._limit = history_bytes
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._subscribers: list[Subscriber] = []
        self._sinks = list(sinks)

    def add_sink(self, sink: LogMonitor) -> None:
        self._sinks.append(sink)

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._size += len(data)
        while self._size > self._limit and len(self._chunks) > 1:
            self._size -= len(self._chunks.popleft())
        if self._size > self._limit:
            only = self._chunks.pop()[-self._limit :]
            self._chunks.append(only)
            self._size = len(only)
        for subscriber in tuple(self._subscribers):
            subscriber(data)
        for sink in self._sinks:
            sink.write(data)

    def history(self) -> bytes:
        return b"".join(self._chunks)

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a live subscriber; returns a function that removes it."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def tail_lines(self, count: int) -> list[str]:
        """The last ``count`` non-empty lines of history, decoded leniently."""
        text = self.history().decode("utf-8", "replace")
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-count:]
