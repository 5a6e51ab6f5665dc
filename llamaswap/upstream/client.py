"""Forwarding one HTTP request to an upstream server and streaming the answer.

The response is never held whole: each chunk the upstream sends is written to
the client as it arrives, and the upstream socket is registered as the
client's producer, so a slow client pauses the upstream instead of growing
our memory.  A client that goes away aborts the upstream request.

A request is sent again only in the stale keep-alive case: a *reused* pooled
connection that the upstream closed before any response byte (it timed the
idle connection out while our request was on its way).  Then the request is
re-sent once, on a new connection, and the caller hears of it
(``on_retry``).  A new connection that dies is never re-sent, whatever the
method: the upstream may have started a generation.  Twisted's own automatic
retry (idempotent methods on reused connections) is off, so GET follows the
same rule.  An optional response-header time-out (our own reactor timer)
aborts a request whose response headers do not arrive in time.

Plain-HTTP requests go out through the lean client
(:mod:`llamaswap.upstream.lean`), the rest through Twisted's ``Agent``; both
use the same tuned endpoints, tell reused from new pooled connections, keep
the response's connection-control headers apart (:func:`_control_values`)
and are closed by :meth:`UpstreamClient.close` and ``retire``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from weakref import WeakKeyDictionary, WeakSet

from twisted.internet import defer
from twisted.internet.error import (
    ConnectError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    DNSLookupError,
)
from twisted.internet.interfaces import IConsumer, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    PartialDownloadError,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from llamaswap.core.endpoints import UpstreamEndpoints
from llamaswap.core.twistedweb import (
    after_this_read,
    copy_headers,
    fresh_connection,
    quiet_http_client_factories,
    response_connection_headers,
    tls_handshake_pending,
    write_now,
)
from llamaswap.upstream.lean import (
    MAX_IDLE_PER_ORIGIN,
    LeanAgent,
    LeanResponse,
    StaleConnection,
)

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
_EXPECT = b"expect"
#: "no connect time-out": longer than any system connect attempt lasts.
_NO_CONNECT_TIMEOUT = 24 * 3600.0
#: "no idle limit" for pooled connections.
_NO_IDLE_LIMIT = 365 * 24 * 3600.0


class UpstreamUnavailable(Exception):
    """The upstream could not be reached or failed before sending headers."""

    #: the status our client gets.
    status = 502


class UpstreamNotConnected(UpstreamUnavailable):
    """No connection to the upstream could be made: nothing of the request
    was sent, so another server may be given it (issue 15, replicas)."""


class UpstreamTimedOut(UpstreamUnavailable):
    """No response headers arrived within the response-header time-out."""

    status = 504


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
    # The body is read whole before it is sent: a ``100-continue``
    # expectation was met by us, and no upstream is waited on for one (so a
    # peer's ``expectContinue`` time-out never has to run).
    dropped.add(_EXPECT)
    dropped.update(name.lower() for name in drop)
    connection = source.getRawHeaders(b"connection")
    if connection:
        for value in connection:
            dropped.update(t.strip().lower() for t in value.split(b",") if t.strip())
    out: Headers = copy_headers(source, dropped)
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
    # Twisted keeps ``Connection`` out of ``response.headers``: it is among
    # the connection-control headers kept when the response arrived.
    connection = list(response.headers.getRawHeaders(b"connection", []))
    connection.extend(_control_values(response, b"connection"))
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
    away) stops the upstream transfer.  With ``reactor`` (whose writes
    `coalesce_writes` gathers), bytes wait for nothing of ours: the
    observer sees each piece right after the read that brought it has been
    written out (`after_this_read`), and the body's end is written out
    before ``done`` fires, ahead of what ending the request costs.
    """

    def __init__(
        self,
        request: Any,
        observer: Callable[[bytes], None] | None,
        reactor: Any = None,
    ) -> None:
        self._request = request
        self._observer = observer
        self._reactor = reactor
        self._client_gone = False
        self.done: defer.Deferred[None] = defer.Deferred(lambda _: self._stop())

    def connectionMade(self) -> None:
        # self.transport is the upstream's producer; the client's channel now
        # pauses and resumes it as its own send buffer fills and drains.
        self._request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if self._client_gone:
            return
        self._request.write(data)
        # The observer (usage parsing, capture, byte counts) sees the piece
        # once it is on its way: a token waits for nothing here.
        if self._observer is not None and not after_this_read(self._reactor, self._observer, data):
            self._observer(data)

    def _stop(self) -> None:
        self._client_gone = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        if not self._client_gone:
            self._request.unregisterProducer()
        if self.done.called:
            return
        if self._reactor is not None:
            # The body's end goes out now, before what ending the request
            # costs (the coroutines above unwind, the lease, the books).
            write_now(self._reactor)
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


#: response -> its connection-control headers (``Connection``,
#: ``Content-Length``...), which Twisted keeps out of ``response.headers``.
_connection_control: WeakKeyDictionary[IResponse, Headers] = WeakKeyDictionary()


def _control_values(response: IResponse, name: bytes) -> Sequence[bytes]:
    """The values of the connection-control header ``name`` (lower case) of
    ``response``, from the lean client or from Twisted's."""
    if isinstance(response, LeanResponse):
        return response.control.get(name, [])
    control = _connection_control.get(response)
    return control.getRawHeaders(name, []) if control is not None else []


def _closed_before_response(exc: BaseException) -> bool:
    """Whether ``exc`` says the upstream closed the connection before a
    response byte arrived (not a cancellation, not our own abort)."""
    if isinstance(exc, RequestNotSent):
        return True  # the connection was gone before anything was written
    if not isinstance(exc, (RequestTransmissionFailed, ResponseNeverReceived)):
        return False
    reasons = getattr(exc, "reasons", [])
    return bool(reasons) and all(
        r.check(ConnectionDone, ConnectionLost) is not None
        and r.check(ConnectionAborted, defer.CancelledError) is None
        for r in reasons
    )


class _Connection:
    """A pooled ``HTTP11ClientProtocol`` as the Agent sees it for one request.

    Keeps the response's connection-control headers (for
    :func:`copy_response_headers` and a 304's ``Content-Length``), and turns
    the failure of a *reused* connection closed before any response byte
    into :class:`StaleConnection`."""

    def __init__(self, protocol: Any, reused: bool) -> None:
        self._protocol = protocol
        self._reused = reused

    def request(self, request: Any) -> defer.Deferred[IResponse]:
        d: defer.Deferred[IResponse] = self._protocol.request(request)
        connection_headers = response_connection_headers(self._protocol)

        def arrived(response: IResponse) -> IResponse:
            headers = connection_headers()
            if headers is not None:
                _connection_control[response] = headers
            return response

        def failed(reason: Failure) -> Failure:
            if self._reused and _closed_before_response(reason.value):
                raise StaleConnection(_describe(reason.value))
            return reason

        return d.addCallbacks(arrived, failed)


class _Pool(HTTPConnectionPool):
    """Keep-alive pool whose connections know whether they are reused.

    Twisted's automatic retry is off: :class:`UpstreamClient` decides."""

    retryAutomatically = False

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor, persistent=True)
        self._handed_out: WeakSet[Any] = WeakSet()

    def getConnection(self, key: Any, endpoint: Any) -> defer.Deferred[Any]:
        return super().getConnection(key, endpoint).addCallback(self._wrap)

    def new_connection(self, key: Any, endpoint: Any) -> defer.Deferred[Any]:
        """A new connection (never a cached one); it joins the pool afterwards."""
        d: defer.Deferred[Any] = fresh_connection(self, key, endpoint)
        return d.addCallback(self._wrap)

    def _wrap(self, protocol: Any) -> _Connection:
        reused = protocol in self._handed_out
        self._handed_out.add(protocol)
        return _Connection(protocol, reused)


class _NewConnections:
    """The ``pool`` an Agent sees for a re-sent request: always a new
    connection of ``pool``."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self.persistent = pool.persistent

    def getConnection(self, key: Any, endpoint: Any) -> defer.Deferred[Any]:
        return self._pool.new_connection(key, endpoint)


def set_tcp_keepalive(transport: Any, seconds: float) -> None:
    """Turn TCP keep-alive on for ``transport``'s socket: first probe after
    ``seconds`` idle, then every ``seconds`` (as Go's ``Dialer.KeepAlive``).
    A TLS transport's TCP connection underneath is the one tuned."""
    while getattr(transport, "wrappedProtocol", None) is not None:
        transport = transport.transport  # TLS (a protocol wrapper) over TCP
    handle = transport.getHandle()
    handle.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    whole = max(1, int(seconds))
    for option in ("TCP_KEEPIDLE", "TCP_KEEPINTVL"):
        if hasattr(socket, option):  # Linux; elsewhere the system's period
            handle.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), whole)


@implementer(IStreamClientEndpoint)
class _TunedEndpoint:
    """An endpoint whose connections get TCP keep-alive and, for TLS, a
    handshake time-out (the connection is aborted when it passes)."""

    def __init__(
        self, endpoint: IStreamClientEndpoint, clock: Any, keepalive: float, tls_timeout: float
    ) -> None:
        self._endpoint = endpoint
        self._clock = clock
        self._keepalive = keepalive
        self._tls_timeout = tls_timeout

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        return self._endpoint.connect(factory).addCallback(self._tune)

    def _tune(self, protocol: Any) -> Any:
        transport = protocol.transport
        if self._keepalive > 0:
            try:
                set_tcp_keepalive(transport, self._keepalive)
            except OSError as e:  # a socket that refuses: keep the connection anyway
                log.warn("cannot set TCP keep-alive: {error}", error=e)
        if self._tls_timeout > 0 and tls_handshake_pending(transport):

            def expire() -> None:
                if tls_handshake_pending(transport):
                    log.warn(
                        "TLS handshake with {peer} not done after {timeout}s; aborting",
                        peer=transport.getPeer(),
                        timeout=self._tls_timeout,
                    )
                    transport.abortConnection()

            timer = self._clock.callLater(self._tls_timeout, expire)
            _when_handshake_ends(transport, lambda: timer.cancel() if timer.active() else None)
        return protocol


def _when_handshake_ends(transport: Any, callback: Callable[[], object]) -> None:
    """Call ``callback`` once the TLS ``transport`` (Twisted's
    ``TLSMemoryBIOProtocol``) has finished its handshake or lost its
    connection, whichever comes first.  The handshake advances in its
    ``_checkHandshakeStatus``; the wrapped protocol, which Twisted would tell,
    is the HTTP client's own."""
    check = transport._checkHandshakeStatus
    lost = transport.connectionLost

    def checked() -> None:
        check()
        if not tls_handshake_pending(transport):
            del transport._checkHandshakeStatus
            callback()

    def connection_lost(reason: Failure) -> None:
        callback()
        lost(reason)

    transport._checkHandshakeStatus = checked
    transport.connectionLost = connection_lost


@implementer(IAgentEndpointFactory)
class _TunedEndpoints:
    def __init__(
        self, endpoints: IAgentEndpointFactory, clock: Any, keepalive: float, tls_timeout: float
    ) -> None:
        self._endpoints = endpoints
        self._clock = clock
        self._keepalive = keepalive
        self._tls_timeout = tls_timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        endpoint = self._endpoints.endpointForURI(uri)
        tls_timeout = self._tls_timeout if uri.scheme == b"https" else 0
        if self._keepalive <= 0 and tls_timeout <= 0:
            return endpoint
        return _TunedEndpoint(endpoint, self._clock, self._keepalive, tls_timeout)


class UpstreamClient:
    """Sends requests upstream over pooled keep-alive connections.

    Time-outs are seconds; ``None`` or 0 means none: ``connect_timeout``,
    ``idle_timeout`` (a pooled connection unused this long is closed),
    ``response_header_timeout`` (from sending until the response headers),
    ``tls_handshake_timeout`` (https only); ``keepalive`` > 0 turns TCP
    keep-alive on with that period.  ``clock`` runs our timers (the reactor
    unless given)."""

    def __init__(
        self,
        reactor: Any,
        *,
        connect_timeout: float | None = 30,
        max_per_host: int = MAX_IDLE_PER_ORIGIN,
        idle_timeout: float | None = 90,
        response_header_timeout: float | None = None,
        keepalive: float | None = None,
        tls_handshake_timeout: float | None = None,
        clock: Any = None,
    ) -> None:
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._response_header_timeout = response_header_timeout or 0
        self._pool = _Pool(reactor)
        self._pool.maxPersistentPerHost = max_per_host
        self._pool.cachedConnectionTimeout = idle_timeout or _NO_IDLE_LIMIT  # type: ignore[assignment]
        # No timer of our own without a connect time-out: the system's
        # (SYN retries) still bounds a connect.
        endpoints = _TunedEndpoints(
            UpstreamEndpoints(reactor, connect_timeout or _NO_CONNECT_TIMEOUT),
            self._clock,
            keepalive or 0,
            tls_handshake_timeout or 0,
        )
        # Plain-HTTP requests go through the lean client (llamaswap.upstream.lean)
        # and its own pool, the rest through Agent and ``self._pool``.
        self._agent = LeanAgent(
            reactor,
            endpoints,
            Agent.usingEndpointFactory(reactor, endpoints, pool=self._pool),
            max_per_host=max_per_host,
            idle_timeout=idle_timeout,
        )
        self._resend_agent = self._agent.new_connections(
            Agent.usingEndpointFactory(reactor, endpoints, pool=_NewConnections(self._pool))
        )

    def close(self) -> defer.Deferred[None]:
        return defer.gatherResults(
            [self._pool.closeCachedConnections(), self._agent.close()]
        ).addCallback(lambda _: None)

    def retire(self) -> defer.Deferred[None]:
        """Close the idle connections now, and those in use once their
        request is done (a client replaced by another)."""
        self._pool.cachedConnectionTimeout = 0
        return defer.gatherResults(
            [self._pool.closeCachedConnections(), self._agent.retire()]
        ).addCallback(lambda _: None)

    def _send(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: bytes,
        on_retry: Callable[[], None] | None,
        *,
        unavailable: bool = False,
    ) -> defer.Deferred[IResponse]:
        """The response, sent once more on a new connection when a pooled
        one turns out stale (``unavailable``: failures but a cancellation
        made `UpstreamUnavailable`).  Plain callbacks, not a coroutine: this
        runs on every request's way upstream, before the send."""
        has_body = bool(body) or method not in (b"GET", b"HEAD")
        try:
            sending = self._agent.request(
                method, url, headers, BytesProducer(body) if has_body else None
            )
        except Exception:  # Agent refuses what it would not send (ValueError)
            sending = defer.fail()

        def resend(failure: Failure) -> defer.Deferred[IResponse]:
            failure.trap(StaleConnection)
            # The upstream closed an idle pooled connection while our request
            # was on its way: it never reached the application, so it is
            # sent once more, on a new connection.
            log.debug(
                "re-sending {url} on a new connection: {reason}", url=url, reason=failure.value
            )
            if on_retry is not None:
                on_retry()
            producer = BytesProducer(body) if has_body else None
            return self._resend_agent.request(method, url, headers, producer)

        sending.addErrback(resend)
        if unavailable:
            sending.addErrback(_as_unavailable)
        return sending

    async def _response(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: bytes,
        on_retry: Callable[[], None] | None,
    ) -> IResponse:
        """The upstream's response (headers arrived), within the response-header
        time-out; raises :class:`UpstreamUnavailable` (or :class:`UpstreamTimedOut`)."""
        if self._response_header_timeout <= 0:
            # No timer to cancel the send: await it as it is (one Deferred
            # and coroutine fewer per request); cancelling still reaches it.
            return await self._send(method, url, headers, body, on_retry, unavailable=True)
        sending = self._send(method, url, headers, body, on_retry)
        timer = None
        timed_out = False
        if self._response_header_timeout > 0:

            def expire() -> None:
                nonlocal timed_out
                timed_out = True
                sending.cancel()  # aborts the upstream connection

            timer = self._clock.callLater(self._response_header_timeout, expire)
        try:
            return await sending
        except defer.CancelledError:
            if not timed_out:
                raise
        except Exception as exc:
            if not timed_out:
                raise _unavailable(exc) from exc
        finally:
            if timer is not None and timer.active():
                timer.cancel()
        raise UpstreamTimedOut(f"no response headers within {self._response_header_timeout:g}s")

    def send(
        self,
        method: bytes,
        url: bytes,
        *,
        headers: Headers,
        body: bytes,
        on_retry: Callable[[], None] | None = None,
    ) -> defer.Deferred[IResponse]:
        """Send a request now, before the client's request is ready to take
        the answer: the Deferred, handed to :meth:`forward` as ``sent``,
        fires with the response as soon as its headers arrived, as in
        :meth:`forward` (time-out, re-send and errors the same); cancelling
        it aborts the upstream request."""
        if self._response_header_timeout <= 0:
            return self._send(method, url, headers, body, on_retry, unavailable=True)
        return defer.Deferred.fromCoroutine(self._response(method, url, headers, body, on_retry))

    async def forward(
        self,
        request: Any,
        url: bytes,
        *,
        headers: Headers,
        body: bytes,
        method: bytes | None = None,
        on_response: Callable[[IResponse], Callable[[bytes], None] | None] | None = None,
        on_retry: Callable[[], None] | None = None,
        on_stream_broken: Callable[[str], None] | None = None,
        sent: defer.Deferred[IResponse] | None = None,
    ) -> int:
        """Relay ``request`` to ``url`` and stream the answer back.

        Returns the upstream status code once the whole body has been written
        to the client.  Raises :class:`UpstreamUnavailable` when no response
        arrived (nothing has been written to the client then; its ``status``
        is the one to answer).  ``on_response`` sees the upstream response
        once its headers arrived and may return an observer that is handed
        every body chunk as it is relayed.  ``on_retry`` hears when the
        request is re-sent (stale keep-alive connection); ``on_stream_broken``
        hears why an event-stream response broke off mid-body (it may write a
        last event).  Raises :class:`UpstreamNotConnected` when no connection
        could be made (nothing was sent).  Cancelling the
        returned coroutine's Deferred aborts the upstream request.  ``sent``
        is the request already sent with :meth:`send` (``url``, ``headers``
        and ``body`` then only say what it was).
        """
        sent_method = method or request.method
        if sent is None:
            response = await self._response(sent_method, url, headers, body, on_retry)
        else:
            response = await sent
        # A proxied response carries the upstream's headers only: no
        # Content-Type is made up when the upstream sent none.
        request.defaultContentType = None
        copy_response_headers(response, request)
        observer = on_response(response) if on_response is not None else None
        if sent_method == b"HEAD" or response.code in (204, 304):
            # No body follows.  A HEAD response keeps the upstream's
            # Content-Length (copied above), so does a 304; none is made up.
            if response.code == 304:
                length = _control_values(response, _CONTENT_LENGTH)
                if length:
                    request.responseHeaders.setRawHeaders(_CONTENT_LENGTH, length[:1])
            response.deliverBody(_Discard())
            return response.code
        if response.length is not UNKNOWN_LENGTH and response.length is not None:
            request.responseHeaders.setRawHeaders(_CONTENT_LENGTH, [b"%d" % response.length])
        if request.method == b"HEAD":
            response.deliverBody(_Discard())
            return response.code

        relay = _Relay(request, observer, self._reactor)
        response.deliverBody(relay)
        try:
            await relay.done
        except defer.CancelledError:
            raise
        except Exception as exc:
            # The upstream broke mid-body: the client already has the status
            # line, so all we can do is end the stream where it broke; an
            # event stream ends with an error event saying so (issue 15).
            reason = _describe(exc)
            log.warn("upstream body ended early: {reason}", reason=reason)
            if on_stream_broken is not None and _is_event_stream(response):
                on_stream_broken(f"upstream ended the stream early: {reason}")
        return response.code


def _unavailable(exc: Exception) -> UpstreamUnavailable:
    """What a failed send is to the caller: no connection made (nothing was
    sent), or no response."""
    if isinstance(exc, ConnectError | DNSLookupError | RequestNotSent):
        return UpstreamNotConnected(_describe(exc))
    return UpstreamUnavailable(_describe(exc))


def _as_unavailable(failure: Failure) -> Failure:
    """A failed send's failure made `UpstreamUnavailable` (a cancellation
    stays one)."""
    exc = failure.value
    if isinstance(exc, defer.CancelledError) or not isinstance(exc, Exception):
        return failure
    raise _unavailable(exc) from exc


def _is_event_stream(response: IResponse) -> bool:
    return any(
        b"text/event-stream" in v for v in response.headers.getRawHeaders(b"content-type", [])
    )


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        pass


def _describe(exc: BaseException) -> str:
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return "; ".join(str(r.value) for r in reasons)
    if isinstance(exc, PartialDownloadError):
        return "partial response"
    return str(exc) or type(exc).__name__
