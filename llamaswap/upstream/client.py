"""Forwarding one HTTP request to an upstream server and streaming the answer.

The response is never held whole: each chunk the upstream sends is written to
the client as it arrives, and the upstream socket is registered as the
client's producer, so a slow client pauses the upstream instead of growing
our memory.  A client that goes away aborts the upstream request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    PartialDownloadError,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from llamaswap.core.endpoints import UpstreamEndpoints
from llamaswap.core.twistedweb import quiet_http_client_factories
from llamaswap.upstream.lean import LeanAgent

log = Logger()

quiet_http_client_factories()

#: Connection-scoped headers that must not cross a proxy (RFC 9110 §7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
_CONTENT_LENGTH = b"content-length"


class UpstreamUnavailable(Exception):
    """The upstream could not be reached or failed before sending headers."""


@implementer(IBodyProducer)
class BytesProducer:
    """Writes an in-memory request body in one go."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def forward_headers(
    source: Headers, *, client_ip: str | None, drop: Iterable[bytes] = ()
) -> Headers:
    """Copy request headers for the upstream, without hop-by-hop ones."""
    dropped = set(HOP_BY_HOP)
    dropped.add(_CONTENT_LENGTH)
    dropped.update(name.lower() for name in drop)
    connection = source.getRawHeaders(b"connection")
    if connection:
        for value in connection:
            dropped.update(t.strip().lower() for t in value.split(b",") if t.strip())
    out = Headers()
    for name, values in source.getAllRawHeaders():
        if name.lower() not in dropped:
            out.setRawHeaders(name, values)
    if client_ip:
        out.setRawHeaders(b"x-forwarded-for", [forwarded_for(source, client_ip)])
    return out


def forwarded_for(source: Headers, client_ip: str) -> bytes:
    """The ``X-Forwarded-For`` value to send on: the chain ``source`` carries,
    if any, with ``client_ip`` appended."""
    prior = source.getRawHeaders(b"x-forwarded-for")
    return b", ".join([*prior, client_ip.encode()]) if prior else client_ip.encode()


def copy_response_headers(response: IResponse, request: Any) -> None:
    """Set the upstream's status and end-to-end headers on our response."""
    request.setResponseCode(response.code, response.phrase)
    out = request.responseHeaders
    connection = response.headers.getRawHeaders(b"connection") or []
    dropped = set(HOP_BY_HOP)
    for value in connection:
        dropped.update(t.strip().lower() for t in value.split(b",") if t.strip())
    event_stream = False
    for name, values in response.headers.getAllRawHeaders():
        lower = name.lower()
        if lower in dropped:
            continue
        if lower == b"content-type" and any(b"text/event-stream" in v for v in values):
            event_stream = True
        out.setRawHeaders(name, values)
    if event_stream:
        out.setRawHeaders(b"x-accel-buffering", [b"no"])


class _Relay(Protocol):
    """Writes upstream body bytes to the client with backpressure.

    ``done`` fires when the body has ended; cancelling it (the client went
    away) stops the upstream transfer.
    """

    def __init__(self, request: Any, observer: Callable[[bytes], None] | None) -> None:
        self._request = request
        self._observer = observer
        self._client_gone = False
        self.done: defer.Deferred[None] = defer.Deferred(lambda _: self._stop())

    def connectionMade(self) -> None:
        # self.transport is the upstream's producer; the client's channel now
        # pauses and resumes it as its own send buffer fills and drains.
        self._request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if self._client_gone:
            return
        if self._observer is not None:
            self._observer(data)
        self._request.write(data)

    def _stop(self) -> None:
        self._client_gone = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        if not self._client_gone:
            self._request.unregisterProducer()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


class UpstreamClient:
    """Sends requests upstream over pooled keep-alive connections."""

    def __init__(
        self,
        reactor: Any,
        *,
        connect_timeout: float = 30,
        max_per_host: int = 32,
        idle_timeout: float = 90,
    ) -> None:
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_per_host
        self._pool.cachedConnectionTimeout = idle_timeout  # type: ignore[assignment]
        self._pool.retryAutomatically = True
        endpoints = UpstreamEndpoints(reactor, connect_timeout)
        # Plain-HTTP requests go through the lean client (llamaswap.upstream.lean),
        # the rest through Agent and its pool.
        self._agent = LeanAgent(
            reactor,
            endpoints,
            Agent.usingEndpointFactory(reactor, endpoints, pool=self._pool),
            max_per_host=max_per_host,
            idle_timeout=idle_timeout,
        )

    def close(self) -> defer.Deferred[None]:
        return defer.gatherResults(
            [self._pool.closeCachedConnections(), self._agent.close()]
        ).addCallback(lambda _: None)

    async def _send(self, method: bytes, url: bytes, headers: Headers, body: bytes) -> IResponse:
        producer = BytesProducer(body) if body or method not in (b"GET", b"HEAD") else None
        try:
            return await self._agent.request(method, url, headers, producer)
        except ResponseFailed as exc:
            # A pooled keep-alive connection the upstream closed while idle
            # fails before any response byte; the request never reached the
            # application, so sending it once more on a new connection is safe.
            if not _stale_connection(exc):
                raise
        producer = BytesProducer(body) if producer is not None else None
        return await self._agent.request(method, url, headers, producer)

    async def forward(
        self,
        request: Any,
        url: bytes,
        *,
        headers: Headers,
        body: bytes,
        method: bytes | None = None,
        on_response: Callable[[IResponse], Callable[[bytes], None] | None] | None = None,
    ) -> int:
        """Relay ``request`` to ``url`` and stream the answer back.

        Returns the upstream status code once the whole body has been written
        to the client.  Raises :class:`UpstreamUnavailable` when no response
        arrived (nothing has been written to the client then).  ``on_response``
        sees the upstream response once its headers arrived and may return an
        observer that is handed every body chunk as it is relayed.  Cancelling
        the returned coroutine's Deferred aborts the upstream request.
        """
        try:
            response = await self._send(method or request.method, url, headers, body)
        except defer.CancelledError:
            raise
        except Exception as exc:
            raise UpstreamUnavailable(_describe(exc)) from exc
        copy_response_headers(response, request)
        observer = on_response(response) if on_response is not None else None
        if response.length is not UNKNOWN_LENGTH and response.length is not None:
            request.responseHeaders.setRawHeaders(_CONTENT_LENGTH, [b"%d" % response.length])
        if request.method == b"HEAD" or response.code in (204, 304):
            # No body will follow; let the connection go back to the pool.
            response.deliverBody(_Discard())
            return response.code

        relay = _Relay(request, observer)
        response.deliverBody(relay)
        try:
            await relay.done
        except defer.CancelledError:
            raise
        except Exception as exc:
            # The upstream broke mid-body: the client already has the status
            # line, so all we can do is end the stream where it broke.
            log.warn("upstream body ended early: {reason}", reason=_describe(exc))
        return response.code


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        pass


def _stale_connection(exc: ResponseFailed) -> bool:
    reasons = getattr(exc, "reasons", [])
    return bool(reasons) and all(
        r.check(ConnectionDone, ConnectionLost) and not r.check(defer.CancelledError)
        for r in reasons
    )


def _describe(exc: BaseException) -> str:
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return "; ".join(str(r.value) for r in reasons)
    if isinstance(exc, PartialDownloadError):
        return "partial response"
    return str(exc) or type(exc).__name__
