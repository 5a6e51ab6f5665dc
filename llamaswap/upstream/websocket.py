"""Relaying WebSocket (and other HTTP/1.1 upgrade) connections byte for byte.

An upgrade cannot go through an HTTP client: after ``101 Switching
Protocols`` both sides speak another protocol on the same socket.  So the
client's connection is taken over from Twisted's HTTP server, the request is
replayed to the upstream on a fresh TCP connection, and from then on bytes
are copied both ways, each side pausing the other when it cannot keep up.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.http_headers import Headers

from llamaswap.core.endpoints import UpstreamEndpoints


def _tokens(headers: Headers, name: bytes) -> set[bytes]:
    values = headers.getRawHeaders(name) or []
    return {token.strip().lower() for value in values for token in value.split(b",")}


def is_upgrade(headers: Headers) -> bool:
    """Whether a request asks to upgrade the connection to a WebSocket."""
    return b"upgrade" in _tokens(headers, b"connection") and b"websocket" in _tokens(
        headers, b"upgrade"
    )


def raw_request(method: bytes, target: bytes, headers: Headers, body: bytes) -> bytes:
    """The request as it goes on the wire to the upstream."""
    lines = [method + b" " + target + b" HTTP/1.1"]
    for name, values in headers.getAllRawHeaders():
        lines.extend(name + b": " + value for value in values)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _Pipe(Protocol):
    """One side of a splice: what arrives here is written to ``peer``."""

    def __init__(self, closed: defer.Deferred[None]) -> None:
        self.peer: Any = None
        self._closed = closed

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.peer is not None:
            self.peer.loseConnection()
        if not self._closed.called:
            self._closed.callback(None)


async def relay_upgrade(
    request: Any, reactor: Any, base_url: bytes, target: bytes, headers: Headers, body: bytes
) -> None:
    """Take over ``request``'s connection and splice it to the upstream at
    ``base_url``; returns once the spliced connection has closed.

    Raises ``ConnectError`` (nothing taken over yet) when the upstream cannot
    be reached."""
    client_closed: defer.Deferred[None] = defer.Deferred()
    upstream_closed: defer.Deferred[None] = defer.Deferred()
    upstream_side = _Pipe(upstream_closed)
    endpoint = UpstreamEndpoints(reactor).endpointForURI(URI.fromBytes(base_url + target))
    await endpoint.connect(Factory.forProtocol(lambda: upstream_side))

    channel = request.channel
    transport = channel.transport
    channel.setTimeout(None)
    # The server's head deadline (llamaswap.web.limits) is over too.
    stop_head_deadline = getattr(channel, "stop_head_deadline", None)
    if stop_head_deadline is not None:
        stop_head_deadline()
    client_side = _Pipe(client_closed)
    client_side.peer = upstream_side.transport
    upstream_side.peer = transport
    # From here on the reactor hands the client's bytes to the splice, not
    # to the HTTP server (which paused reading while it handled the request).
    transport.protocol = client_side
    client_side.makeConnection(transport)
    transport.unregisterProducer()  # the HTTP server's own registration
    upstream: Any = upstream_side.transport
    transport.registerProducer(upstream, True)
    upstream.registerProducer(transport, True)
    transport.resumeProducing()
    upstream.write(raw_request(request.method, target, headers, body))
    await defer.DeferredList([client_closed, upstream_closed])
