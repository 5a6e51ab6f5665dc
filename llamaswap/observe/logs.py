"""Log monitors: a bounded history ring plus live subscribers that never block.

A :class:`LogMonitor` keeps the last ``HISTORY_BYTES`` written to it, writes
every chunk through to its sinks, and hands it to live subscribers.  Each
subscriber has its own bounded :class:`~llamaswap.core.mailbox.Mailbox`:
while the subscriber is paused (an HTTP client that reads slowly) chunks
queue up to a bound and are then dropped, and the next chunk it does get is
preceded by a ``— N bytes dropped —`` marker.  The writer (a child's stdout
pipe, the logging system) is never held up by a reader.

:class:`LogHub` owns llama-swap's three long-lived monitors (``proxy``,
``upstream`` and the combined ``mux``), wired by ``logToStdout``, the
per-model monitors, and the ``twisted.logger`` observer that turns
llamaswap's own log events into ``[LEVEL] message`` lines.  The text of
those lines and of the access log is :mod:`llamaswap.observe.logformat`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import tzinfo

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from zope.interface import implementer

from llamaswap.core.loglevels import parse_level, rank
from llamaswap.core.mailbox import ByteSink, Mailbox, MailboxSubscription, drop_marker
from llamaswap.observe.logformat import proxy_line

#: Bytes of history each monitor keeps (llama-swap: 100 KiB).
HISTORY_BYTES = 100 * 1024
#: Chunks a paused log subscriber may have queued before chunks are dropped.
SUBSCRIBER_CHUNKS = 1024
#: Bytes a paused log subscriber may have queued before chunks are dropped.
SUBSCRIBER_BYTES = 1024 * 1024

LOG_TO_STDOUT_MODES = ("proxy", "upstream", "both", "none")

Subscriber = Callable[[bytes], None]


class LogSubscription(MailboxSubscription[bytes]):
    """One live reader of a :class:`LogMonitor`.

    Calling it (or :meth:`close`) unsubscribes.  :meth:`pause` and
    :meth:`resume` follow the reader's flow control.
    """

    def __init__(
        self,
        monitor: LogMonitor,
        deliver: Subscriber,
        *,
        max_chunks: int = SUBSCRIBER_CHUNKS,
        max_bytes: int = SUBSCRIBER_BYTES,
    ) -> None:
        self._monitor = monitor
        self._mailbox: Mailbox[bytes] = Mailbox(
            deliver, max_items=max_chunks, max_bytes=max_bytes, on_close=self._detach
        )
        #: bytes dropped since the last delivered (or queued) chunk.
        self.pending_dropped = 0
        #: bytes dropped over the subscription's life.
        self.dropped_total = 0

    def offer(self, data: bytes) -> None:
        """Called by the monitor for every chunk written."""
        if self.pending_dropped:
            marked = drop_marker(self.pending_dropped) + data
            if self._mailbox.put(marked, len(marked)):
                self.pending_dropped = 0
                return
        elif self._mailbox.put(data, len(data)):
            return
        if not self._mailbox.closed:
            self.pending_dropped += len(data)
            self.dropped_total += len(data)

    def _detach(self) -> None:
        self._monitor._remove(self)


# --------------------------------------------------------------------------
# Monitors


class LogMonitor:
    """Keeps the last ``history_bytes`` written, writes through, fans chunks out."""

    def __init__(
        self,
        name: str,
        history_bytes: int = HISTORY_BYTES,
        sinks: Iterable[ByteSink] = (),
    ) -> None:
        self.name = name
        self._limit = history_bytes
        #: the ring, allocated on the first write.
        self._ring: bytearray | None = None
        self._pos = 0
        self._full = False
        self._subscribers: list[LogSubscription] = []
        self._sinks: tuple[ByteSink, ...] = tuple(sinks)

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._record(data)
        for subscriber in tuple(self._subscribers):
            subscriber.offer(data)
        for sink in self._sinks:
            sink.write(data)

    def _record(self, data: bytes) -> None:
        limit = self._limit
        if limit <= 0:
            return
        if self._ring is None:
            self._ring = bytearray(limit)
        ring = self._ring
        size = len(data)
        if size >= limit:
            ring[:] = data[-limit:]
            self._pos = 0
            self._full = True
            return
        end = self._pos + size
        if end <= limit:
            ring[self._pos : end] = data
        else:
            first = limit - self._pos
            ring[self._pos :] = data[:first]
            ring[: size - first] = data[first:]
        if end >= limit:
            self._full = True
        self._pos = end % limit

    def history(self) -> bytes:
        if self._ring is None:
            return b""
        if not self._full:
            return bytes(self._ring[: self._pos])
        return bytes(self._ring[self._pos :]) + bytes(self._ring[: self._pos])

    def clear(self) -> None:
        """Forget the history (subscribers stay)."""
        self._ring = None
        self._pos = 0
        self._full = False

    def subscribe(
        self,
        subscriber: Subscriber,
        *,
        max_chunks: int = SUBSCRIBER_CHUNKS,
        max_bytes: int = SUBSCRIBER_BYTES,
    ) -> LogSubscription:
        """Add a live subscriber; the result, when called, removes it."""
        subscription = LogSubscription(self, subscriber, max_chunks=max_chunks, max_bytes=max_bytes)
        self._subscribers.append(subscription)
        return subscription

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def _remove(self, subscription: LogSubscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    def tail_lines(self, count: int) -> list[str]:
        """The last ``count`` non-empty lines of history, decoded leniently."""
        text = self.history().decode("utf-8", "replace")
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-count:]


class _CallableSink:
    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write

    def write(self, data: bytes) -> None:
        try:
            self._write(data)
        except OSError:
            pass  # a closed stdout must not break logging


@implementer(ILogObserver)
class ProxyLogObserver:
    """Renders ``twisted.logger`` events into the proxy monitor.

    Events from llamaswap's own namespaces (``llamaswap...``) are kept at or
    above ``level``; events from other code (Twisted itself) only from WARN
    up, so Twisted's chatter does not drown the UI's proxy log.
    """

    def __init__(
        self,
        monitor: LogMonitor,
        level: str | LogLevel = LogLevel.info,
        *,
        time_format: str = "",
        tz: tzinfo | None = None,
        namespace: str = "llamaswap",
    ) -> None:
        self.monitor = monitor
        self.level = parse_level(level)
        self.time_format = time_format
        self.tz = tz
        self._namespace = namespace

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        if not isinstance(level, type(LogLevel.info)):
            return
        if rank(level) < rank(self.level):
            return
        namespace = str(event.get("log_namespace") or "")
        own = namespace == self._namespace or namespace.startswith(self._namespace + ".")
        if not own and rank(level) < rank(LogLevel.warn):
            return
        message = formatEvent(event) or ""
        failure = event.get("log_failure")
        if failure is not None:
            try:
                message = f"{message}\n{failure.getTraceback().rstrip()}"
            except Exception:
                pass
        when = event.get("log_time")
        self.monitor.write(
            proxy_line(
                level,
                message,
                when=float(when) if isinstance(when, int | float) else 0.0,
                time_format=self.time_format,
                tz=self.tz,
            )
        )


# --------------------------------------------------------------------------
# The hub


class LogHub:
    """The proxy, upstream and mux monitors wired per ``logToStdout``,
    plus one monitor per model process writing into ``upstream``.

    ============  =================  ====================  ============
    logToStdout   proxy writes to    upstream writes to    mux writes to
    ============  =================  ====================  ============
    proxy         mux                (nothing)             stdout
    upstream      (nothing)          mux                   stdout
    both          mux                mux                   stdout
    none          (nothing)          (nothing)             (nothing)
    ============  =================  ====================  ============

    Every monitor keeps its own history and subscribers whatever the mode.
    ``stdout`` is the writer for "stdout" (``None``: nothing is written).
    An unknown mode behaves like ``proxy``.
    """

    def __init__(
        self,
        log_to_stdout: str = "proxy",
        stdout: Callable[[bytes], None] | None = None,
        time_format: str = "",
        *,
        tz: tzinfo | None = None,
    ) -> None:
        mode = log_to_stdout if log_to_stdout in LOG_TO_STDOUT_MODES else "proxy"
        self.log_to_stdout = mode
        self.time_format = time_format
        self.tz = tz
        mux_sinks: list[ByteSink] = []
        if stdout is not None and mode != "none":
            mux_sinks.append(_CallableSink(stdout))
        self.mux = LogMonitor("mux", sinks=mux_sinks)
        self.proxy = LogMonitor("proxy", sinks=(self.mux,) if mode in ("proxy", "both") else ())
        self.upstream = LogMonitor(
            "upstream", sinks=(self.mux,) if mode in ("upstream", "both") else ()
        )
        self._models: dict[str, LogMonitor] = {}
        self._observers: list[ProxyLogObserver] = []

    def model(self, model_id: str) -> LogMonitor:
        """The model's process log (created on first use), writing into ``upstream``."""
        monitor = self._models.get(model_id)
        if monitor is None:
            monitor = self._models[model_id] = LogMonitor(model_id, sinks=(self.upstream,))
        return monitor

    @property
    def models(self) -> Mapping[str, LogMonitor]:
        return dict(self._models)

    def retain_models(self, model_ids: Iterable[str]) -> None:
        """Forget the monitors of models not in ``model_ids`` (after a reload)."""
        keep = set(model_ids)
        for model_id in [m for m in self._models if m not in keep]:
            del self._models[model_id]

    def monitor(self, name: str) -> LogMonitor | None:
        """``""`` → mux, ``proxy``, ``upstream``, else a model's monitor if known."""
        if name == "":
            return self.mux
        if name == "proxy":
            return self.proxy
        if name == "upstream":
            return self.upstream
        return self._models.get(name)

    def proxy_observer(self, level_filter: str | LogLevel = LogLevel.info) -> ProxyLogObserver:
        """An ``ILogObserver`` writing llamaswap's log events to the proxy monitor."""
        observer = ProxyLogObserver(
            self.proxy, level_filter, time_format=self.time_format, tz=self.tz
        )
        self._observers.append(observer)
        return observer

    def set_log_level(self, level: str | LogLevel) -> None:
        """Apply a (reloaded) ``logLevel`` to every observer made by this hub."""
        for observer in self._observers:
            observer.level = parse_level(level)

    def set_time_format(self, time_format: str) -> None:
        """Apply a (reloaded) ``logTimeFormat``."""
        self.time_format = time_format
        for observer in self._observers:
            observer.time_format = time_format
