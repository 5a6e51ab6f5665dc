"""The event bus behind ``/api/events`` (the UI's live updates, as in llama-swap).

Publishers call :meth:`EventBus.publish` (or a typed helper) and never know
who listens.  Each event's payload is JSON-encoded once, and its SSE frame
built once, however many subscribers there are.  Every subscriber has a
bounded :class:`~llamaswap.core.mailbox.Mailbox`: a paused subscriber (a slow SSE
client) queues up to ``limit`` events, then events are dropped with one WARN
per episode, so a slow reader never grows memory or slows the publisher.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from llamaswap.core.mailbox import Mailbox, MailboxSubscription
from llamaswap.observe.logs import LogHub, LogMonitor

if TYPE_CHECKING:
    from llamaswap.config import Config
    from llamaswap.supervision.process import ModelProcess

log = Logger()

MODEL_STATUS = "modelStatus"
LOG_DATA = "logData"
ACTIVITY = "activity"
INFLIGHT = "inflight"
PROFILE_CHANGED = "profileChanged"
UI_CONFIG = "uiConfig"
#: the ``GET /api/resources`` body, whenever it changes (placement).
RESOURCES = "resources"
KINDS = frozenset(
    {MODEL_STATUS, LOG_DATA, ACTIVITY, INFLIGHT, PROFILE_CHANGED, UI_CONFIG, RESOURCES}
)

#: Events a subscriber may have queued before events are dropped (llama-swap: 1024).
SUBSCRIBER_LIMIT = 1024
#: Payload bytes a subscriber may have queued before events are dropped.
SUBSCRIBER_BYTES = 4 * 1024 * 1024


def to_json(value: Any) -> str:
    """Compact JSON, as Go's ``json.Marshal`` writes it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Event:
    """One published event; ``data`` is its payload already JSON-encoded."""

    kind: str
    data: str

    @classmethod
    def of(cls, kind: str, payload: Any) -> Event:
        return cls(kind, to_json(payload))

    def payload(self) -> Any:
        return json.loads(self.data)

    @cached_property
    def envelope(self) -> str:
        """``{"type":kind,"data":"<payload JSON as a string>"}`` (double encoded)."""
        return to_json({"type": self.kind, "data": self.data})

    @cached_property
    def sse(self) -> bytes:
        """The SSE frame: ``event:message\\ndata:<envelope>\\n\\n``."""
        return b"event:message\ndata:" + self.envelope.encode("utf-8") + b"\n\n"


class EventSubscription(MailboxSubscription[Event]):
    """A subscriber's bounded queue.  Calling it (or :meth:`close`) unsubscribes."""

    def __init__(
        self,
        bus: EventBus,
        callback: Callable[[Event], object],
        limit: int,
        max_bytes: int = SUBSCRIBER_BYTES,
    ) -> None:
        self._bus = bus
        self._mailbox: Mailbox[Event] = Mailbox(
            callback, max_items=max(1, limit), max_bytes=max_bytes, on_close=self._detach
        )
        self._dropping = False
        #: events dropped over the subscription's life.
        self.dropped = 0

    def offer(self, event: Event) -> None:
        if self._mailbox.put(event, len(event.data)):
            if self._dropping and not self._mailbox:
                self._dropping = False
            return
        if self._mailbox.closed:
            return
        self.dropped += 1
        if not self._dropping:
            # Set before logging: the WARN becomes a logData event that
            # comes straight back here and must be dropped quietly.
            self._dropping = True
            log.warn(
                "event subscriber is too slow; dropping {kind} events until it catches up",
                kind=event.kind,
            )

    def _detach(self) -> None:
        self._bus._remove(self)


class EventBus:
    """Fan-out of typed events to bounded subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[EventSubscription] = []

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(
        self,
        callback: Callable[[Event], object],
        limit: int = SUBSCRIBER_LIMIT,
        *,
        max_bytes: int = SUBSCRIBER_BYTES,
    ) -> EventSubscription:
        """Deliver future events to ``callback``; the result unsubscribes when called.

        While paused, at most ``limit`` events (and ``max_bytes`` of payload)
        are queued; later ones are dropped."""
        subscription = EventSubscription(self, callback, limit, max_bytes)
        self._subscribers.append(subscription)
        return subscription

    def publish(self, kind: str, payload: Any) -> Event | None:
        """Send ``payload`` to every subscriber; with none, nothing is even
        encoded (``None`` is returned)."""
        if not self._subscribers:
            return None
        event = Event.of(kind, payload)
        self.publish_event(event)
        return event

    def publish_event(self, event: Event) -> None:
        for subscription in tuple(self._subscribers):
            subscription.offer(event)

    def close(self) -> None:
        """Unsubscribe everyone (shutdown)."""
        for subscription in tuple(self._subscribers):
            subscription.close()

    def _remove(self, subscription: EventSubscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    # -- typed helpers ------------------------------------------------------

    def model_status(self, models: Sequence[Mapping[str, Any]]) -> Event | None:
        return self.publish(MODEL_STATUS, list(models))

    def log_data(self, source: str, text: str) -> Event | None:
        return self.publish(LOG_DATA, log_data_payload(source, text))

    def activity(self, activity_id: int) -> Event | None:
        return self.publish(ACTIVITY, {"id": activity_id})

    def inflight(self, payload: Mapping[str, Any]) -> Event | None:
        return self.publish(INFLIGHT, dict(payload))

    def profile_changed(self, active: str | None) -> Event | None:
        return self.publish(PROFILE_CHANGED, {"active": active})

    def ui_config(self, config: Mapping[str, Any]) -> Event | None:
        return self.publish(UI_CONFIG, dict(config))

    def resources(self, report: Mapping[str, Any]) -> Event | None:
        return self.publish(RESOURCES, dict(report))


# -- payloads ----------------------------------------------------------------


def log_data_payload(source: str, text: str) -> dict[str, str]:
    return {"source": source, "data": text}


def inflight_snapshot(requests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"operation": "snapshot", "requests": list(requests)}


def inflight_upsert(request: Mapping[str, Any]) -> dict[str, Any]:
    return {"operation": "upsert", "request": dict(request)}


def inflight_remove(request_id: str) -> dict[str, Any]:
    return {"operation": "remove", "id": request_id}


def ui_config_payload(config: Config) -> dict[str, Any]:
    """The ``uiConfig`` payload: the session-id header names (``ui.activity.session_id``)."""
    return {"activity": {"session_id": list(config.ui_session_headers)}}


def model_status_records(
    config: Config, processes: Mapping[str, ModelProcess]
) -> list[dict[str, Any]]:
    """The ``modelStatus`` payload: every local model sorted by id, as llama-swap sends it."""
    records = []
    for model_id in sorted(config.models):
        model = config.models[model_id]
        process = processes.get(model_id)
        record: dict[str, Any] = {
            "id": model_id,
            "name": model.name,
            "description": model.description,
            "state": process.state.value if process is not None else "stopped",
            "unlisted": model.unlisted,
            "peerID": "",
        }
        if model.aliases:
            record["aliases"] = list(model.aliases)
        records.append(record)
    return records


# -- sources -------------------------------------------------------------------


def bridge_logs(hub: LogHub, bus: EventBus) -> Callable[[], None]:
    """Publish every proxy and upstream log chunk as a ``logData`` event.

    Bytes are decoded incrementally, so a UTF-8 character split across two
    chunks is not mangled.  Returns a function that stops the bridge.
    """

    def follow(source: str, monitor: LogMonitor) -> Callable[[], None]:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")

        def publish(data: bytes) -> None:
            text = decoder.decode(data)
            if text:
                bus.log_data(source, text)

        return monitor.subscribe(publish)

    stops = [follow("proxy", hub.proxy), follow("upstream", hub.upstream)]

    def stop() -> None:
        for unsubscribe in stops:
            unsubscribe()

    return stop


def follow_processes(
    bus: EventBus,
    processes: Iterable[ModelProcess],
    model_status: Callable[[], Sequence[Mapping[str, Any]]],
) -> None:
    """Publish ``modelStatus`` on every state change of ``processes``."""

    def changed(process: ModelProcess, old: object, new: object) -> None:
        bus.model_status(model_status())

    for process in processes:
        process.add_state_listener(changed)
