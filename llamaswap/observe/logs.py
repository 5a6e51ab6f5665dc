"""Log monitors: a bounded history ring plus live subscribers that never block.

A :class:`LogMonitor` keeps the last ``HISTORY_BYTES`` written to it, writes
every chunk through to its sinks, and hands it to live subscribers.  Each
subscriber has its own bounded :class:`Mailbox`: while the subscriber is
paused (an HTTP client that reads slowly) chunks queue up to a bound and are
then dropped, and the next chunk it does get is preceded by a
``— N bytes dropped —`` marker.  The writer (a child's stdout pipe, the
logging system) is never held up by a reader.

:class:`LogHub` owns llama-swap's three long-lived monitors (``proxy``,
``upstream`` and the combined ``mux``), wired by ``logToStdout`` (reference
§9.1), the per-model monitors, and the ``twisted.logger`` observer that turns
llamaswap's own log events into ``[LEVEL] message`` lines.  The access-log
line format (§9.3) lives here too.
"""

from __future__ import annotations

import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, tzinfo
from typing import Any, Generic, Protocol, TypeVar

from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from zope.interface import implementer

log = Logger()

#: Bytes of history each monitor keeps (llama-swap: 100 KiB).
HISTORY_BYTES = 100 * 1024
#: Chunks a paused log subscriber may have queued before chunks are dropped.
SUBSCRIBER_CHUNKS = 1024
#: Bytes a paused log subscriber may have queued before chunks are dropped.
SUBSCRIBER_BYTES = 1024 * 1024

LOG_TO_STDOUT_MODES = ("proxy", "upstream", "both", "none")

T = TypeVar("T")

Subscriber = Callable[[bytes], None]


class ByteSink(Protocol):
    def write(self, data: bytes, /) -> object: ...


# --------------------------------------------------------------------------
# Bounded delivery


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

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

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
        self._sinks: list[ByteSink] = list(sinks)

    def add_sink(self, sink: ByteSink) -> None:
        self._sinks.append(sink)

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


def write_stdout(data: bytes) -> None:
    """Write to the process's stdout (what ``LogHub(stdout=write_stdout)`` uses)."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


# --------------------------------------------------------------------------
# Proxy line format


_LEVEL_ORDER = (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical)
_LEVEL_NAMES = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARN",
    LogLevel.error: "ERROR",
    LogLevel.critical: "ERROR",
}
_LEVELS_BY_NAME = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
}


def parse_level(value: str | LogLevel) -> LogLevel:
    """A config ``logLevel`` as a ``LogLevel``; unknown names mean info, as in llama-swap."""
    if isinstance(value, str):
        return _LEVELS_BY_NAME.get(value.strip().lower(), LogLevel.info)
    return value


def _rank(level: LogLevel) -> int:
    return _LEVEL_ORDER.index(level) if level in _LEVEL_ORDER else 1


_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _zone_name(dt: datetime) -> str:
    name = dt.tzname() or ""
    if name and not name.startswith(("UTC+", "UTC-", "+", "-")):
        return name
    return _offset(dt, colon=False)  # Go prints -0700 when no abbreviation is known


def _offset(dt: datetime, *, colon: bool, z: bool = False) -> str:
    delta = dt.utcoffset()
    minutes = int(delta.total_seconds() // 60) if delta is not None else 0
    if z and minutes == 0:
        return "Z"
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{mins:02d}" if colon else f"{sign}{hours:02d}{mins:02d}"


def _fraction(dt: datetime, digits: int, trim: bool) -> str:
    text = f"{dt.microsecond:06d}000"[:digits]
    if trim:
        text = text.rstrip("0")
        return "." + text if text else ""
    return "." + text


_TOKENS: dict[str, Callable[[datetime], str]] = {
    "Mon": lambda dt: _DAYS[dt.weekday()][:3],
    "Monday": lambda dt: _DAYS[dt.weekday()],
    "Jan": lambda dt: _MONTHS[dt.month - 1],
    "01": lambda dt: f"{dt.month:02d}",
    "02": lambda dt: f"{dt.day:02d}",
    "_2": lambda dt: f"{dt.day:2d}",
    "2006": lambda dt: f"{dt.year:04d}",
    "06": lambda dt: f"{dt.year % 100:02d}",
    "15": lambda dt: f"{dt.hour:02d}",
    "3": lambda dt: str(dt.hour % 12 or 12),
    "04": lambda dt: f"{dt.minute:02d}",
    "05": lambda dt: f"{dt.second:02d}",
    "PM": lambda dt: "PM" if dt.hour >= 12 else "AM",
    "MST": _zone_name,
    "-0700": lambda dt: _offset(dt, colon=False),
    "Z07:00": lambda dt: _offset(dt, colon=True, z=True),
    ".000": lambda dt: _fraction(dt, 3, False),
    ".000000": lambda dt: _fraction(dt, 6, False),
    ".000000000": lambda dt: _fraction(dt, 9, False),
    ".999999999": lambda dt: _fraction(dt, 9, True),
}

#: Go's named layouts (``time.ANSIC`` ...), as ``{token}`` templates.
TIME_LAYOUTS: Mapping[str, str] = {
    "ansic": "{Mon} {Jan} {_2} {15}:{04}:{05} {2006}",
    "unixdate": "{Mon} {Jan} {_2} {15}:{04}:{05} {MST} {2006}",
    "rubydate": "{Mon} {Jan} {02} {15}:{04}:{05} {-0700} {2006}",
    "rfc822": "{02} {Jan} {06} {15}:{04} {MST}",
    "rfc822z": "{02} {Jan} {06} {15}:{04} {-0700}",
    "rfc850": "{Monday}, {02}-{Jan}-{06} {15}:{04}:{05} {MST}",
    "rfc1123": "{Mon}, {02} {Jan} {2006} {15}:{04}:{05} {MST}",
    "rfc1123z": "{Mon}, {02} {Jan} {2006} {15}:{04}:{05} {-0700}",
    "rfc3339": "{2006}-{01}-{02}T{15}:{04}:{05}{Z07:00}",
    "rfc3339nano": "{2006}-{01}-{02}T{15}:{04}:{05}{.999999999}{Z07:00}",
    "kitchen": "{3}:{04}{PM}",
    "stamp": "{Jan} {_2} {15}:{04}:{05}",
    "stampmilli": "{Jan} {_2} {15}:{04}:{05}{.000}",
    "stampmicro": "{Jan} {_2} {15}:{04}:{05}{.000000}",
    "stampnano": "{Jan} {_2} {15}:{04}:{05}{.000000000}",
}
_TOKEN = re.compile(r"\{([^}]+)\}")


def format_time(layout_name: str, when: float, tz: tzinfo | None = None) -> str | None:
    """``when`` (Unix seconds) in the Go layout named ``layout_name``
    (case-insensitive); ``None`` for an empty or unknown name."""
    template = TIME_LAYOUTS.get(layout_name.strip().lower())
    if template is None:
        return None
    dt = datetime.fromtimestamp(when, tz) if tz is not None else datetime.fromtimestamp(when)
    if dt.tzinfo is None:
        dt = dt.astimezone()
    return _TOKEN.sub(lambda m: _TOKENS[m.group(1)](dt), template)


def proxy_line(
    level: LogLevel,
    message: str,
    *,
    when: float = 0.0,
    time_format: str = "",
    tz: tzinfo | None = None,
) -> bytes:
    """One proxy log line: ``[<timestamp> ][LEVEL] message\\n``."""
    line = f"[{_LEVEL_NAMES.get(level, 'INFO')}] {message}\n"
    stamp = format_time(time_format, when, tz) if time_format else None
    if stamp is not None:
        line = f"{stamp} {line}"
    return line.encode("utf-8", "replace")


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

    def __call__(self, event: Mapping[str, Any]) -> None:
        level = event.get("log_level")
        if not isinstance(level, type(LogLevel.info)):
            return
        if _rank(level) < _rank(self.level):
            return
        namespace = str(event.get("log_namespace") or "")
        own = namespace == self._namespace or namespace.startswith(self._namespace + ".")
        if not own and _rank(level) < _rank(LogLevel.warn):
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
    """The proxy, upstream and mux monitors wired per ``logToStdout`` (§9.1),
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

    def find_model(self, model_id: str) -> LogMonitor | None:
        return self._models.get(model_id)

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


# --------------------------------------------------------------------------
# Access log (§9.3)

#: Path prefixes left out of the access log (polled often).
ACCESS_LOG_SKIPS = ("/wol-health", "/api/performance", "/metrics")


def skip_access_log(path: str) -> bool:
    return path.startswith(ACCESS_LOG_SKIPS)


def client_ip(forwarded_for: str | None, real_ip: str | None, peer: str) -> str:
    """First ``X-Forwarded-For`` entry, else ``X-Real-IP``, else the socket peer."""
    if forwarded_for:
        return forwarded_for.split(",", 1)[0].strip()
    if real_ip:
        return real_ip.strip()
    return peer


def _frac(value: int, precision: int) -> str:
    whole, frac = divmod(value, 10**precision)
    digits = f"{frac:0{precision}d}".rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


def go_duration(seconds: float) -> str:
    """A duration as Go's ``time.Duration.String`` prints it (``1.52s``, ``350ms``)."""
    nanos = round(seconds * 1e9)
    sign = "-" if nanos < 0 else ""
    u = abs(nanos)
    if u == 0:
        return "0s"
    if u < 1_000:
        return f"{sign}{u}ns"
    if u < 1_000_000:
        return f"{sign}{_frac(u, 3)}µs"
    if u < 1_000_000_000:
        return f"{sign}{_frac(u, 6)}ms"
    whole, frac = divmod(u, 1_000_000_000)
    text = f"{_frac(whole % 60 * 1_000_000_000 + frac, 9)}s"
    minutes = whole // 60
    if minutes:
        text = f"{minutes % 60}m{text}"
        hours = minutes // 60
        if hours:
            text = f"{hours}h{text}"
    return sign + text


def access_log_line(
    *,
    client: str,
    method: str,
    path: str,
    proto: str,
    status: int,
    body_bytes: int,
    user_agent: str,
    duration: float,
) -> str:
    """``Request <ip> "<METHOD> <path> <proto>" <status> <bytes> "<ua>" <duration>``."""
    return (
        f'Request {client} "{method} {path} {proto}" {status} {body_bytes} '
        f'"{user_agent}" {go_duration(duration)}'
    )


def _header(request: Any, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if isinstance(value, bytes) else value


def request_access_line(request: Any, *, duration: float) -> str | None:
    """The access-log line for a finished Twisted ``request``, or ``None``
    for a skipped path.  Uses ``request.code`` and ``request.sentLength``."""
    path = request.path.decode("utf-8", "replace")
    if skip_access_log(path):
        return None
    peer = getattr(request.getClientAddress(), "host", None) or ""
    return access_log_line(
        client=client_ip(
            _header(request, b"x-forwarded-for"), _header(request, b"x-real-ip"), peer
        ),
        method=request.method.decode("latin-1"),
        path=path,
        proto=(request.clientproto or b"HTTP/1.1").decode("latin-1"),
        status=int(request.code),
        body_bytes=int(request.sentLength),
        user_agent=_header(request, b"user-agent") or "",
        duration=duration,
    )
