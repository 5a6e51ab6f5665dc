"""Log and event streams over HTTP: ``/logs*``, ``/api/events``, ``/api/inflight``.

Each open stream is a push producer registered with its request, so the
client's TCP backpressure pauses its subscription: while paused, the
subscription queues up to its bound and then drops (log streams mark the gap,
the event stream logs a WARN).  A stream ends, and unsubscribes, when the
client goes away or :meth:`StreamsResource.close_all` is called at shutdown.

The endpoints answer as llama-swap's do (the UI is shared); ``/api/events``
additionally sends a ``:keepalive`` comment every
``KEEPALIVE_INTERVAL`` seconds so idle streams survive proxies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from llamaswap.core.text import as_text
from llamaswap.core.twistedweb import disconnected, transport_paused
from llamaswap.observe.events import (
    INFLIGHT,
    LOG_DATA,
    MODEL_STATUS,
    PROFILE_CHANGED,
    UI_CONFIG,
    Event,
    EventBus,
    EventSubscription,
    inflight_snapshot,
    log_data_payload,
)
from llamaswap.observe.inflight import InflightTracker
from llamaswap.observe.logs import LogHub, LogMonitor, LogSubscription
from llamaswap.web.errors import method_not_allowed, render_error

log = Logger()

#: Seconds between ``:keepalive`` comments on ``/api/events``.
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE = b":keepalive\n\n"
INVALID_LOGGER = "invalid logger. Use 'proxy', 'upstream' or a model's ID"

_GET = (b"GET", b"HEAD")
_CANCEL = re.compile(rb"/api/inflight/([^/]+)/cancel")
_LOG_STREAM_HEADERS = (
    (b"content-type", b"text/plain"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-accel-buffering", b"no"),
)
_SSE_HEADERS = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"connection", b"keep-alive"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-accel-buffering", b"no"),
)

Subscription = LogSubscription | EventSubscription


@implementer(IPushProducer)
class _Stream:
    """One open streaming response, registered as its request's producer."""

    def __init__(self, owner: StreamsResource, request: Any, *, events: bool) -> None:
        self._owner = owner
        self.request = request
        self.events = events
        self.subscription: Subscription | None = None
        self.closed = False
        if disconnected(request):
            self.closed = True  # gone before we started: notifyFinish would never fire
            self.paused = False
            return
        # Twisted does not pause a producer registered while the transport
        # is already full, so start from the channel's state.
        self.paused = transport_paused(request)
        owner._opened(self)
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._request_done)

    def write(self, data: bytes) -> None:
        if not self.closed and not self.request.finished:
            self.request.write(data)

    def attach(self, subscription: Subscription) -> None:
        if self.closed:
            subscription.close()
            return
        self.subscription = subscription
        if self.paused:
            subscription.pause()

    # IPushProducer

    def pauseProducing(self) -> None:
        self.paused = True
        if self.subscription is not None:
            self.subscription.pause()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.subscription is not None:
            self.subscription.resume()

    def stopProducing(self) -> None:
        self.close(finish=False)

    def close(self, *, finish: bool = True) -> None:
        """Unsubscribe and, with ``finish``, end the response; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.subscription is not None:
            self.subscription.close()
        self._owner._closed(self)
        request = self.request
        if getattr(request, "channel", None) is not None and request.producer is self:
            request.unregisterProducer()
        if finish and not request.finished and not disconnected(request):
            request.finish()

    def _request_done(self, result: object) -> None:
        self.close(finish=False)


class StreamsResource(Resource):
    """Serves the streaming endpoints; ``request.path`` is the full path."""

    isLeaf = True

    def __init__(
        self,
        hub: LogHub,
        bus: EventBus,
        *,
        model_status: Callable[[], list[dict[str, Any]]],
        inflight: InflightTracker,
        ui_config: Callable[[], Mapping[str, Any]],
        active_profile: Callable[[], str | None],
        resolve_model: Callable[[str], str | None],
        clock: IReactorTime,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
    ) -> None:
        super().__init__()
        self._hub = hub
        self._bus = bus
        self._model_status = model_status
        self._inflight = inflight
        self._ui_config = ui_config
        self._active_profile = active_profile
        self._resolve_model = resolve_model
        self._streams: set[_Stream] = set()
        self._keepalive = LoopingCall(self._send_keepalives)
        self._keepalive.clock = clock
        self._keepalive_interval = keepalive_interval

    @staticmethod
    def handles(path: bytes) -> bool:
        """Whether ``path`` is one of this resource's endpoints."""
        return (
            path == b"/logs"
            or path == b"/logs/stream"
            or path.startswith(b"/logs/stream/")
            or path == b"/api/events"
            or path == b"/api/inflight"
            or _CANCEL.fullmatch(path) is not None
        )

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def close_all(self) -> None:
        """End every open stream (shutdown, reload)."""
        for stream in list(self._streams):
            stream.close()
        self._stop_keepalive()

    # -- dispatch -----------------------------------------------------------

    def render(self, request: Any) -> object:
        path: bytes = request.path
        method: bytes = request.method
        if path == b"/logs":
            return self._allow(request, _GET) or self._logs(request)
        if path == b"/logs/stream" or path.startswith(b"/logs/stream/"):
            return self._allow(request, _GET) or self._log_stream(request, path[13:])
        if path == b"/api/events":
            return self._allow(request, _GET) or self._events(request)
        if path == b"/api/inflight":
            return self._allow(request, _GET) or self._json(request, self._inflight.snapshot())
        match = _CANCEL.fullmatch(path)
        if match is not None:
            if method != b"POST":
                return self._allow(request, (b"POST",))
            return self._cancel(request, unquote(match.group(1).decode("utf-8", "replace")))
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"404 page not found\n"

    @staticmethod
    def _allow(request: Any, methods: tuple[bytes, ...]) -> bytes | None:
        if request.method in methods:
            return None
        return method_not_allowed(request, methods)

    @staticmethod
    def _json(request: Any, payload: object, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(payload, separators=(",", ":")).encode()

    # -- /logs ----------------------------------------------------------------

    def _logs(self, request: Any) -> bytes:
        if b"text/html" in (request.getHeader(b"accept") or b""):
            request.redirect(b"/ui/")
            return b""
        request.setHeader(b"content-type", b"text/plain")
        return self._hub.mux.history()

    def _monitor_for(self, raw_id: bytes) -> LogMonitor | None:
        """``""`` → mux, ``proxy``, ``upstream``, else the model named by the
        longest resolvable prefix of the path segments (extra segments ignored)."""
        name = raw_id.decode("utf-8", "replace").strip("/")
        if name == "":
            return self._hub.mux
        if name == "proxy":
            return self._hub.proxy
        if name == "upstream":
            return self._hub.upstream
        segments = [unquote(segment) for segment in name.split("/")]
        found: str | None = None
        for count in range(1, len(segments) + 1):
            candidate = "/".join(segments[:count])
            model_id = self._resolve_model(candidate) if candidate else None
            if model_id is not None:
                found = model_id
        return self._hub.model(found) if found is not None else None

    def _log_stream(self, request: Any, raw_id: bytes) -> object:
        monitor = self._monitor_for(raw_id)
        if monitor is None:
            return render_error(request, 400, INVALID_LOGGER)
        for name, value in _LOG_STREAM_HEADERS:
            request.setHeader(name, value)
        if request.method == b"HEAD":
            return b""
        stream = _Stream(self, request, events=False)
        history = b"" if _has_query_key(request.uri, b"no-history") else monitor.history()
        stream.write(history)  # even when empty: commits the headers now
        stream.attach(monitor.subscribe(stream.write))
        return NOT_DONE_YET

    # -- /api/events ------------------------------------------------------------

    def _events(self, request: Any) -> object:
        for name, value in _SSE_HEADERS:
            request.setHeader(name, value)
        if request.method == b"HEAD":
            return b""
        stream = _Stream(self, request, events=True)
        for event in self._initial_events():
            stream.write(event.sse)
        stream.attach(self._bus.subscribe(lambda event: stream.write(event.sse)))
        self._start_keepalive()
        return NOT_DONE_YET

    def _initial_events(self) -> list[Event]:
        """proxy history, upstream history, models, UI config, profile, in-flight."""
        return [
            Event.of(LOG_DATA, log_data_payload("proxy", as_text(self._hub.proxy.history()))),
            Event.of(LOG_DATA, log_data_payload("upstream", as_text(self._hub.upstream.history()))),
            Event.of(MODEL_STATUS, self._model_status()),
            Event.of(UI_CONFIG, dict(self._ui_config())),
            Event.of(PROFILE_CHANGED, {"active": self._active_profile()}),
            Event.of(INFLIGHT, inflight_snapshot(self._inflight.snapshot())),
        ]

    def _start_keepalive(self) -> None:
        if not self._keepalive.running:
            self._keepalive.start(self._keepalive_interval, now=False)

    def _stop_keepalive(self) -> None:
        if self._keepalive.running:
            self._keepalive.stop()

    def _send_keepalives(self) -> None:
        for stream in list(self._streams):
            # A paused or backed-up stream is not idle; skip it.
            subscription = stream.subscription
            if stream.events and not stream.paused and not (subscription and subscription.queued):
                stream.write(KEEPALIVE)

    # -- /api/inflight/{id}/cancel ------------------------------------------------

    def _cancel(self, request: Any, entry_id: str) -> bytes:
        if not self._inflight.cancel(entry_id):
            return render_error(request, 404, "inflight request not found")
        return self._json(request, {"msg": "ok"})

    # -- bookkeeping ----------------------------------------------------------------

    def _opened(self, stream: _Stream) -> None:
        self._streams.add(stream)

    def _closed(self, stream: _Stream) -> None:
        self._streams.discard(stream)
        if not any(s.events for s in self._streams):
            self._stop_keepalive()


def _has_query_key(uri: bytes, key: bytes) -> bool:
    """Whether the query names ``key``, with or without a value (Twisted's
    ``request.args`` leaves out bare keys such as ``?no-history``)."""
    query = uri.partition(b"?")[2]
    return any(
        unquote_to_bytes(item.partition(b"=")[0].replace(b"+", b" ")) == key
        for item in query.split(b"&")
    )


def streams_resource(
    hub: LogHub,
    bus: EventBus,
    *,
    model_status: Callable[[], list[dict[str, Any]]],
    inflight: InflightTracker,
    ui_config: Callable[[], Mapping[str, Any]],
    active_profile: Callable[[], str | None],
    resolve_model: Callable[[str], str | None],
    clock: IReactorTime,
) -> StreamsResource:
    """The resource serving ``/logs``, ``/logs/stream*``, ``/api/events``,
    ``/api/inflight`` and ``/api/inflight/{id}/cancel``."""
    return StreamsResource(
        hub,
        bus,
        model_status=model_status,
        inflight=inflight,
        ui_config=ui_config,
        active_profile=active_profile,
        resolve_model=resolve_model,
        clock=clock,
    )
