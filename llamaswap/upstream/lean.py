"""A lean HTTP/1.1 client for the relay's hot path: one protocol per connection.

Twisted's ``Agent`` costs about a third of a proxied request's CPU time: a
URI parse per request, a connection pool that answers through Deferreds, a
body producer and its Deferred chain per request, a line-by-line response
parser and a response state machine.  :class:`LeanAgent` is an ``IAgent``
that does the same job for what the proxy sends (``http://`` URLs, a body
given whole or none): the request goes out in one write; the response head
is parsed in one step and the body framed by ``Content-Length``, chunked
coding or the connection's end, and handed to the response's protocol as it
arrives with the upstream connection as its push producer (backpressure as
with ``Agent``).  Keep-alive connections are pooled per origin.  Anything
else (``https``, another body producer) goes to the fallback ``Agent``.
Connections are made by the endpoints given (the client's tuned ones: TCP
keep-alive, connect time-out).

Failures look as they do with ``Agent``: no response byte before the
connection ended is :class:`ResponseNeverReceived`, or
:class:`StaleConnection` when the connection was a reused pooled one that the
upstream closed (not one we aborted): the upstream timed it out as idle while
our request was on its way, so the request never reached it and may be sent
again, on a new connection (:meth:`LeanAgent.new_connections`; the caller
decides, nothing here re-sends).  A broken head is
:class:`ResponseFailed`; a body cut short ends the body protocol with
``ResponseFailed`` (``PotentialDataLoss`` for a body that ends with the
connection); cancelling the request's Deferred aborts the connection.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from llamaswap.core.transport import no_delay
from llamaswap.core.twistedweb import coalesce_writes

#: idle keep-alive connections kept per upstream origin.  Under load the
#: responses of a burst are released together and the next burst needs as many
#: connections again: a smaller cap closed and reopened a connection for about
#: a third of the requests at 64 clients.  The most recently used connection
#: is reused first, so the extra ones stay idle until ``idle_timeout``.
MAX_IDLE_PER_ORIGIN = 128

#: bytes that must not appear in a request line (controls, space, DEL)
_UNSAFE = re.compile(rb"[\x00-\x20\x7f]")
#: largest response head accepted
MAX_HEAD = 64 * 1024
_NO_BODY_CODES = frozenset({204, 304})
#: headers about the connection, not the content: kept out of ``response.headers``
#: (as ``Agent`` does, see ``HTTPParser.CONNECTION_CONTROL_HEADERS``)
_CONNECTION_CONTROL = frozenset(
    {
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
_IDLE, _WAITING, _BODY, _CLOSED = range(4)
_LENGTH, _CHUNKED, _UNTIL_CLOSE = range(3)


class StaleConnection(Exception):
    """A reused pooled connection was closed by the upstream before any
    response byte: the request may be sent once more on a new connection."""


class _BadResponse(Exception):
    """The upstream's response head or chunked framing is not valid HTTP/1.1."""


def _host_value(uri: URI) -> bytes:
    host = uri.host
    if b":" in host:
        host = b"[" + host + b"]"
    if (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443)):
        return host
    return b"%b:%d" % (host, uri.port)


@implementer(IPushProducer)
class _BodyProducer:
    """The upstream connection as the body protocol's push producer, for as
    long as the body lasts."""

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn

    def pauseProducing(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.paused = True
            self._conn.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.paused = False
            self._conn.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    def detach(self) -> None:
        self._conn = None


@implementer(IResponse)
class LeanResponse:
    """An upstream response; its body is buffered until :meth:`deliverBody`."""

    previousResponse = None

    def __init__(
        self,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: Any,
        control: dict[bytes, list[bytes]] | None = None,
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        #: the connection-control headers kept out of ``headers``:
        #: lower-case name -> values (``Connection``, ``Content-Length``...)
        self.control: dict[bytes, list[bytes]] = control if control is not None else {}
        self.request: Any = None
        self._protocol: Protocol | None = None
        self._pending: list[bytes] = []
        self._end: Failure | None = None
        self._producer: _BodyProducer | None = None

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        if self._protocol is not None:
            raise RuntimeError("deliverBody called twice")
        self._protocol = protocol
        protocol.makeConnection(self._producer)
        pending, self._pending = self._pending, []
        for data in pending:
            protocol.dataReceived(data)
        if self._end is not None:
            self._deliver_end()

    def _data(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)
        else:
            self._pending.append(data)

    def _finish(self, reason: Failure) -> None:
        if self._end is not None:
            return
        self._end = reason
        if self._producer is not None:
            self._producer.detach()
        if self._protocol is not None:
            self._deliver_end()

    def _deliver_end(self) -> None:
        assert self._protocol is not None and self._end is not None
        protocol, self._protocol = self._protocol, _Done()
        protocol.connectionLost(self._end)


class _Done(Protocol):
    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        pass


class _Connection(Protocol):
    """One keep-alive connection to an upstream: a request at a time."""

    def __init__(self, agent: LeanAgent, origin: bytes) -> None:
        self._agent = agent
        self.origin = origin
        self.state = _IDLE
        self.paused = False
        #: whether the connection came from the pool (served a request before)
        self.reused = False
        self.idle_since = 0.0
        self._buf = b""
        self._got_bytes = False
        self._waiting: defer.Deferred[IResponse] | None = None
        self._method = b""
        self._response: LeanResponse | None = None
        self._framing = _LENGTH
        self._remaining = 0
        self._chunk_trailer = False
        self._keep_alive = True
        self._aborting = False
        #: fired when the connection is gone (for :meth:`LeanAgent.close`)
        self.lost: list[defer.Deferred[None]] = []

    def connectionMade(self) -> None:
        no_delay(self.transport)
        coalesce_writes(self.transport)

    # -- sending ----------------------------------------------------------

    def send(self, method: bytes, data: bytes) -> defer.Deferred[IResponse]:
        self.state = _WAITING
        self._method = method
        self._got_bytes = False
        self._buf = b""
        self._response = None
        d: defer.Deferred[IResponse] = defer.Deferred(self._cancel)
        self._waiting = d
        assert self.transport is not None
        # Sent once the read that made the request is handled (see
        # ``coalesce_writes``), not at once: the upstream woken by it would
        # often wait for the rest of that handling anyway, on this core.
        self.transport.write(data)
        return d

    def _cancel(self, d: defer.Deferred[IResponse]) -> None:
        self._waiting = None
        self.abort()

    def abort(self) -> None:
        """Drop the connection; ``connectionLost`` (soon) ends what is under way."""
        if self.state != _CLOSED and not self._aborting and self.transport is not None:
            self._aborting = True
            self._keep_alive = False
            self._agent._discard(self)
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- receiving --------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._aborting:
            return
        if self.state == _WAITING:
            self._got_bytes = True
            self._buf += data
            try:
                self._parse_head()
            except _BadResponse as exc:
                self._fail_head(Failure(exc))
        elif self.state == _BODY:
            self._body(data)
        elif self.state == _IDLE and data:
            # Bytes nobody asked for: the connection cannot be trusted.
            self._agent._discard(self)
            self.abort()

    def _parse_head(self) -> None:
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end == -1:
                if len(self._buf) > MAX_HEAD:
                    raise _BadResponse("response head too long")
                return
            head = self._buf[:end]
            rest = self._buf[end + 4 :]
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise _BadResponse(f"bad status line {lines[0][:80]!r}")
            code = int(parts[1])
            if 100 <= code < 200 and code != 101:
                self._buf = rest  # interim response: skip it
                continue
            self._buf = b""
            break
        http10 = parts[0] == b"HTTP/1.0"
        headers = Headers()
        length: Any = None
        chunked = False
        connection: list[bytes] = []
        control: dict[bytes, list[bytes]] = {}
        head_request = self._method == b"HEAD"
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1:] in (b" ", b"\t"):
                raise _BadResponse(f"bad header line {line[:80]!r}")
            value = value.strip(b" \t")
            lower = name.lower()
            if lower not in _CONNECTION_CONTROL or (head_request and lower == b"content-length"):
                # A HEAD response's Content-Length describes the content (as
                # with Agent: ``HTTPClientParser.isConnectionControlHeader``).
                headers.addRawHeader(name, value)
            elif lower in control:
                control[lower].append(value)
            else:
                control[lower] = [value]
            if lower == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise _BadResponse("bad content-length")
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            elif lower == b"connection":
                connection.extend(t.strip().lower() for t in value.split(b","))
        if http10:
            self._keep_alive = b"keep-alive" in connection
        else:
            self._keep_alive = b"close" not in connection
        if head_request or code in _NO_BODY_CODES:
            framing, length = _LENGTH, 0
        elif chunked:
            framing, length = _CHUNKED, UNKNOWN_LENGTH
        elif length is not None:
            framing = _LENGTH
        else:
            framing, length = _UNTIL_CLOSE, UNKNOWN_LENGTH
            self._keep_alive = False
        version = (b"HTTP", 1, 0 if http10 else 1)
        phrase = parts[2] if len(parts) > 2 else b""
        response = LeanResponse(version, code, phrase, headers, length, control)
        response._producer = _BodyProducer(self)
        self._response = response
        self._framing = framing
        self._remaining = length if framing == _LENGTH else 0
        self._chunk_trailer = False
        self.state = _BODY
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(response)
        if self._aborting or self.state != _BODY:
            return  # aborted by whoever saw the response
        if framing == _LENGTH and self._remaining == 0:
            self._finish_body()
            if rest:
                self._agent._discard(self)
                self.abort()
        elif rest:
            self._body(rest)

    def _body(self, data: bytes) -> None:
        response = self._response
        assert response is not None
        framing = self._framing
        if framing == _LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                response._data(data)
                return
            self._remaining = 0
            if remaining:
                response._data(data[:remaining] if len(data) > remaining else data)
            if self.state == _BODY and not self._aborting:
                self._finish_body()
                if len(data) > remaining:
                    self._agent._discard(self)
                    self.abort()
        elif framing == _CHUNKED:
            try:
                self._chunked(data)
            except _BadResponse as exc:
                self._keep_alive = False
                response._finish(Failure(ResponseFailed([Failure(exc)])))
                self.abort()
        else:
            response._data(data)

    def _chunked(self, data: bytes) -> None:
        response = self._response
        assert response is not None
        buf = self._buf + data if self._buf else data
        pos = 0
        n = len(buf)
        while pos < n and self.state == _BODY and not self._aborting:
            if self._remaining > 0:
                take = min(self._remaining, n - pos)
                response._data(buf[pos : pos + take] if take < n or pos else buf)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._remaining = -2  # the chunk's CRLF
                continue
            if self._remaining < 0:
                need = -self._remaining
                if n - pos < need:
                    if buf[pos:] != b"\r\n"[2 - need : 2 - need + n - pos]:
                        raise _BadResponse("bad chunk end")
                    self._remaining = -(need - (n - pos))
                    pos = n
                    break
                if buf[pos : pos + need] != b"\r\n"[2 - need :]:
                    raise _BadResponse("bad chunk end")
                pos += need
                self._remaining = 0
                continue
            eol = buf.find(b"\r\n", pos)
            if eol == -1:
                if n - pos > 4096:
                    raise _BadResponse("chunk size line too long")
                break
            line = buf[pos:eol]
            pos = eol + 2
            if self._chunk_trailer:
                if line:
                    continue  # a trailer field: dropped
                self._buf = b""
                self._finish_body()
                if pos < n:
                    self._agent._discard(self)
                    self.abort()
                return
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadResponse(f"bad chunk size {size_text[:20]!r}") from None
            if size < 0 or not size_text:
                raise _BadResponse("bad chunk size")
            if size == 0:
                self._chunk_trailer = True
            else:
                self._remaining = size
        self._buf = buf[pos:] if pos < n else b""

    def _finish_body(self) -> None:
        response = self._response
        assert response is not None
        self.state = _IDLE
        self._response = None
        response._finish(Failure(ResponseDone("Response body fully received")))
        if self.state != _IDLE or self._aborting:
            return
        if self._keep_alive and self.transport is not None:
            if self.paused:
                self.paused = False
                self.transport.resumeProducing()  # type: ignore[attr-defined]
            self._agent._release(self)
        else:
            self.state = _CLOSED
            if self.transport is not None:
                self.transport.loseConnection()

    def _fail_head(self, reason: Failure) -> None:
        self._keep_alive = False
        waiting, self._waiting = self._waiting, None
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if waiting is not None:
            waiting.errback(Failure(ResponseFailed([reason])))

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        state, self.state = self.state, _CLOSED
        self._agent._discard(self)
        lost, self.lost = self.lost, []
        for d in lost:
            d.callback(None)
        if state == _WAITING:
            waiting, self._waiting = self._waiting, None
            if waiting is None:
                pass
            elif self._got_bytes:
                waiting.errback(Failure(ResponseFailed([reason])))
            elif self.reused and not self._aborting and _closed_by_peer(reason):
                waiting.errback(Failure(StaleConnection(str(reason.value))))
            else:
                waiting.errback(Failure(ResponseNeverReceived([reason])))
        elif state == _BODY and self._response is not None:
            response, self._response = self._response, None
            if self._framing == _UNTIL_CLOSE and reason.check(ConnectionDone):
                response._finish(Failure(PotentialDataLoss()))
            else:
                response._finish(Failure(ResponseFailed([reason])))


def _closed_by_peer(reason: Failure) -> bool:
    """Whether the connection ended because the upstream closed or reset it
    (not because we aborted it)."""
    return (
        reason.check(ConnectionDone, ConnectionLost) is not None
        and reason.check(ConnectionAborted) is None
    )


class _ConnectionFactory(Factory):
    # One factory per connection: Twisted's "Starting factory" / "Stopping
    # factory" lines would log every upstream connection.
    noisy = False

    def __init__(self, agent: LeanAgent, origin: bytes) -> None:
        self._agent = agent
        self._origin = origin

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self._agent, self._origin)


@implementer(IAgent)
class LeanAgent:
    """An ``IAgent`` for plain-HTTP upstreams with a whole body; anything else
    goes to ``fallback``.

    ``idle_timeout``: seconds a pooled connection may stay unused before it is
    closed (``None`` or 0: no limit); at most ``max_per_host`` idle
    connections are kept per origin."""

    def __init__(
        self,
        reactor: Any,
        endpoints: Any,
        fallback: IAgent,
        *,
        max_per_host: int = MAX_IDLE_PER_ORIGIN,
        idle_timeout: float | None = 90,
    ) -> None:
        self._reactor = reactor
        self._endpoints = endpoints
        self._fallback = fallback
        self.max_per_host = max_per_host
        self.idle_timeout = idle_timeout or 0
        #: set by :meth:`retire`: connections are closed once done, not pooled
        self._retired = False
        #: origin -> (host header value, endpoint)
        self._origins: dict[bytes, tuple[bytes, Any]] = {}
        self._idle: dict[bytes, list[_Connection]] = {}
        self._sweep: Any = None

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        return self._request(method, uri, headers, bodyProducer, self._fallback, True)

    def new_connections(self, fallback: IAgent) -> IAgent:
        """An ``IAgent`` that sends each request on a new connection (never a
        pooled one; it joins the pool afterwards), and the rest to
        ``fallback`` (an ``Agent`` that does the same)."""
        return _NewConnections(self, fallback)

    def _request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None,
        bodyProducer: IBodyProducer | None,
        fallback: IAgent,
        reuse: bool,
    ) -> defer.Deferred[IResponse]:
        body = getattr(bodyProducer, "body", None) if bodyProducer is not None else b""
        if (
            not isinstance(body, bytes)
            or not uri.startswith(b"http://")
            or _UNSAFE.search(uri)
            or _UNSAFE.search(method)
        ):
            # Agent validates what we would not send as is (and raises).
            return fallback.request(method, uri, headers, bodyProducer)
        slash = uri.find(b"/", 7)
        origin, path = (uri, b"/") if slash == -1 else (uri[:slash], uri[slash:])
        known = self._origins.get(origin)
        if known is None:
            parsed = URI.fromBytes(origin + b"/")
            known = (_host_value(parsed), self._endpoints.endpointForURI(parsed))
            self._origins[origin] = known
        lines = [method, b" ", path, b" HTTP/1.1\r\n"]
        if bodyProducer is not None or method in (b"POST", b"PUT"):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        if headers is None or not headers.hasHeader(b"host"):
            lines += (b"Host: ", known[0], b"\r\n")
        if headers is not None:
            for name, values in headers.getAllRawHeaders():
                for value in values:
                    lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        if body:
            lines.append(body)
        data = b"".join(lines)
        idle = self._idle.get(origin) if reuse else None
        while idle:
            conn = idle.pop()
            if conn.state == _IDLE and conn.transport is not None:
                conn.reused = True
                return conn.send(method, data)
        return defer.Deferred.fromCoroutine(self._connect_and_send(origin, known[1], method, data))

    async def _connect_and_send(
        self, origin: bytes, endpoint: Any, method: bytes, data: bytes
    ) -> IResponse:
        conn: _Connection = await endpoint.connect(_ConnectionFactory(self, origin))
        return await conn.send(method, data)

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self.max_per_host or self._retired:
            conn.state = _CLOSED
            assert conn.transport is not None
            conn.transport.loseConnection()
            return
        conn.idle_since = self._reactor.seconds()
        idle.append(conn)
        if self._sweep is None and self.idle_timeout > 0:
            self._sweep = self._reactor.callLater(self.idle_timeout, self._close_expired)

    def _discard(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    def _close_expired(self) -> None:
        self._sweep = None
        now = self._reactor.seconds()
        oldest = None
        for idle in self._idle.values():
            for conn in list(idle):
                if now - conn.idle_since >= self.idle_timeout:
                    idle.remove(conn)
                    conn.state = _CLOSED
                    if conn.transport is not None:
                        conn.transport.loseConnection()
                elif oldest is None or conn.idle_since < oldest:
                    oldest = conn.idle_since
        if oldest is not None:
            self._sweep = self._reactor.callLater(
                oldest + self.idle_timeout - now, self._close_expired
            )

    def close(self) -> defer.Deferred[None]:
        """Close the idle connections (``HTTPConnectionPool.closeCachedConnections``)."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        waits = []
        for idle in self._idle.values():
            for conn in idle:
                conn.state = _CLOSED
                if conn.transport is not None:
                    d: defer.Deferred[None] = defer.Deferred()
                    conn.lost.append(d)
                    waits.append(d)
                    conn.transport.loseConnection()
        self._idle.clear()
        return defer.gatherResults(waits).addCallback(lambda _: None)

    def retire(self) -> defer.Deferred[None]:
        """Close the idle connections now, and those in use once their
        response is done (an agent replaced by another)."""
        self._retired = True
        return self.close()


@implementer(IAgent)
class _NewConnections:
    """See :meth:`LeanAgent.new_connections`."""

    def __init__(self, lean: LeanAgent, fallback: IAgent) -> None:
        self._lean = lean
        self._fallback = fallback

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        return self._lean._request(method, uri, headers, bodyProducer, self._fallback, False)
