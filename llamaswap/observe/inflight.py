"""Requests in flight, published as ``inflight`` events (the UI's live request list).

Every tracked request is upserted when it arrives and when its response
headers are written, upserted again as response bytes flow (at most once per
``THROTTLE`` seconds per request, with a trailing update so the last count is
never lost), and removed when it ends.  Operations wait in an outbox that is
published on the next reactor turn; if more than ``OUTBOX_LIMIT`` pile up the
queued operations are discarded and one full snapshot is published instead,
so a burst of traffic costs a bounded amount of memory and events.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from llamaswap.core.text import as_text
from llamaswap.observe.captures import HeaderSource, flatten_headers
from llamaswap.observe.events import EventBus, inflight_remove, inflight_snapshot, inflight_upsert

log = Logger()

#: Minimum seconds between two byte-count upserts of one request.
THROTTLE = 0.25
#: Operations that may wait for publication before a snapshot replaces them.
OUTBOX_LIMIT = 128


def _timestamp(seconds: float) -> str:
    """RFC 3339 with microseconds, UTC."""
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


class InflightEntry:
    """One request in flight.  Mutable: the tracker updates its response side."""

    __slots__ = (
        "id",
        "started",
        "model",
        "req_path",
        "method",
        "_req_source",
        "_req_flat",
        "remote_ip",
        "_resp_source",
        "_resp_flat",
        "resp_bytes",
        "metadata",
        "_canceller",
        "_last_publish",
        "_trailing",
        "_removed",
    )

    def __init__(
        self,
        entry_id: str,
        started: float,
        model: str,
        req_path: str,
        method: str,
        req_headers: HeaderSource | None,
        remote_ip: str,
        metadata: Mapping[str, Any] | None,
    ) -> None:
        self.id = entry_id
        self.started = started
        self.model = model
        self.req_path = req_path
        self.method = method
        # Headers are flattened (and redacted) only when someone looks: most
        # requests are never shown to anyone.
        self._req_source = req_headers
        self._req_flat: dict[str, str] | None = None
        self.remote_ip = remote_ip
        self._resp_source: HeaderSource | None = None
        self._resp_flat: dict[str, str] | None = {}
        self.resp_bytes = 0
        self.metadata = dict(metadata) if metadata else None
        self._canceller: Callable[[], object] | None = None
        self._last_publish: float | None = None
        self._trailing: IDelayedCall | None = None
        self._removed = False

    @property
    def timestamp(self) -> str:
        return _timestamp(self.started)

    @property
    def req_headers(self) -> dict[str, str]:
        if self._req_flat is None:
            self._req_flat = flatten_headers(self._req_source)
        return self._req_flat

    @property
    def resp_headers(self) -> dict[str, str]:
        if self._resp_flat is None:
            self._resp_flat = flatten_headers(self._resp_source)
        return self._resp_flat

    @resp_headers.setter
    def resp_headers(self, headers: HeaderSource | None) -> None:
        self._resp_source = headers
        self._resp_flat = None

    def set_canceller(self, canceller: Callable[[], object] | None) -> None:
        """What ``POST /api/inflight/{id}/cancel`` calls (e.g. cancel the serve Deferred)."""
        self._canceller = canceller

    def to_json(self, now: float) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": self.id,
            "timestamp": self.timestamp,
            "model": self.model,
            "req_path": self.req_path,
            "method": self.method,
            "req_headers": dict(self.req_headers),
            "remote_ip": self.remote_ip,
            "resp_headers": dict(self.resp_headers),
            "resp_bytes": self.resp_bytes,
            "elapsed_ms": max(0, int((now - self.started) * 1000)),
        }
        if self.metadata:
            record["metadata"] = dict(self.metadata)
        return record


class InflightTracker:
    """Tracks requests in flight and publishes their changes on ``bus``."""

    def __init__(
        self,
        clock: IReactorTime,
        bus: EventBus,
        *,
        throttle: float = THROTTLE,
        outbox_limit: int = OUTBOX_LIMIT,
    ) -> None:
        self._clock = clock
        self._bus = bus
        self._throttle = throttle
        self._outbox_limit = outbox_limit
        self._ids = itertools.count(1)
        self._entries: dict[str, InflightEntry] = {}
        #: queued operations: an entry to upsert, or the id of a removed one.
        self._outbox: list[InflightEntry | str] = []
        self._snapshot_due = False
        self._flush_call: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, entry_id: str) -> InflightEntry | None:
        return self._entries.get(entry_id)

    # -- the request side ---------------------------------------------------

    def add(
        self,
        model: str,
        req_path: str | bytes,
        method: str | bytes,
        req_headers: HeaderSource | None,
        remote_ip: str | bytes | None,
        metadata: Mapping[str, Any] | None = None,
    ) -> InflightEntry:
        entry = InflightEntry(
            str(next(self._ids)),
            self._clock.seconds(),
            model,
            as_text(req_path),
            as_text(method),
            req_headers,
            as_text(remote_ip or ""),
            metadata,
        )
        self._entries[entry.id] = entry
        self._upsert(entry)
        return entry

    def response_started(self, entry: InflightEntry, resp_headers: HeaderSource | None) -> None:
        if entry._removed:
            return
        entry.resp_headers = resp_headers
        self._upsert(entry)

    def add_bytes(self, entry: InflightEntry, count: int) -> None:
        """Count response bytes; upserts are throttled per request."""
        if entry._removed or count <= 0:
            return
        entry.resp_bytes += count
        if entry._trailing is not None:
            return  # the trailing update will carry this count
        now = self._clock.seconds()
        last = entry._last_publish
        if last is None or now - last >= self._throttle:
            self._upsert(entry)
            return
        entry._trailing = self._clock.callLater(
            last + self._throttle - now, self._trailing_update, entry
        )

    def remove(self, entry: InflightEntry) -> None:
        if entry._removed:
            return
        entry._removed = True
        self._cancel_trailing(entry)
        entry._canceller = None
        self._entries.pop(entry.id, None)
        self._enqueue(entry.id)

    def cancel(self, entry_id: str) -> bool:
        """Run the request's canceller; ``False`` if no such request is in flight."""
        entry = self._entries.get(entry_id)
        if entry is None:
            return False
        canceller = entry._canceller
        if canceller is not None:
            try:
                canceller()
            except Exception:
                log.failure("cancelling in-flight request {id} failed", id=entry_id)
        return True

    def snapshot(self) -> list[dict[str, Any]]:
        now = self._clock.seconds()
        return [entry.to_json(now) for entry in self._entries.values()]

    def close(self) -> None:
        """Cancel every pending timer and forget queued operations (shutdown, reload)."""
        for entry in self._entries.values():
            self._cancel_trailing(entry)
        self._outbox.clear()
        self._snapshot_due = False
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    # -- publication ----------------------------------------------------------

    def _upsert(self, entry: InflightEntry) -> None:
        self._cancel_trailing(entry)
        entry._last_publish = self._clock.seconds()
        self._enqueue(entry)

    def _trailing_update(self, entry: InflightEntry) -> None:
        entry._trailing = None
        if not entry._removed:
            self._upsert(entry)

    @staticmethod
    def _cancel_trailing(entry: InflightEntry) -> None:
        if entry._trailing is not None:
            if entry._trailing.active():
                entry._trailing.cancel()
            entry._trailing = None

    def _enqueue(self, subject: InflightEntry | str) -> None:
        if not len(self._bus):
            return  # nobody listens; a new subscriber starts from a snapshot
        if not self._snapshot_due:
            if len(self._outbox) >= self._outbox_limit:
                self._outbox.clear()
                self._snapshot_due = True
            else:
                self._outbox.append(subject)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        if self._snapshot_due:
            self._snapshot_due = False
            self._outbox.clear()
            self._bus.inflight(inflight_snapshot(self.snapshot()))
            return
        outbox, self._outbox = self._outbox, []
        now = self._clock.seconds()
        for subject in outbox:
            if isinstance(subject, InflightEntry):
                self._bus.inflight(inflight_upsert(subject.to_json(now)))
            else:
                self._bus.inflight(inflight_remove(subject))
