"""What one client can make llamaswap hold: bounded before anything is buffered.

The body limit (``maxRequestBodySize``) is checked as the headers arrive: a
larger ``Content-Length`` is answered ``413`` at once, without reading the
body; a chunked body is cut off as soon as it passes the limit.  Either way the
response says ``Connection: close`` and the connection is closed after it:
the write side at once, the read side after a short linger that discards what
the client is still sending (closing a socket with unread data makes the
kernel send a reset, and the client would lose the ``413``).

Header count and size and the idle time-out are Twisted's own
(``HTTPChannel.maxHeaders``, ``totalHeadersSize``, ``timeOut``), set here
explicitly so that they stay bounded whatever Twisted's defaults become.
The idle time-out is reset by every byte, so a client sending one byte a
minute could hold a connection for as long as its head may be long: the whole
head (request line and headers) must also arrive within ``HEAD_TIMEOUT``
seconds of its first byte (of the accept, for a connection's first request),
or the connection gets a JSON ``408`` and is closed.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger
from twisted.web.server import Request

from llamaswap.config.settings import DEFAULT_MAX_REQUEST_BODY_SIZE
from llamaswap.core.transport import fixed_addresses, no_delay
from llamaswap.core.twistedweb import EarlyStarter, coalesce_writes, one_pass_heads
from llamaswap.web.errors import error_body, json_envelope

log = Logger()

#: headers one request may have (Twisted answers more with 400 and closes).
MAX_HEADERS = 100
#: bytes of request line plus headers (Twisted answers more with 400 and closes).
TOTAL_HEADERS_SIZE = 16 * 1024
#: seconds a connection may stay silent while no request is being served:
#: between keep-alive requests, and between the bytes of a request's head
#: and body (never while a response is being produced).
IDLE_TIMEOUT = 60
#: seconds a request's whole head (request line and headers) may take to
#: arrive, from its first byte (from the accept for a connection's first
#: request).
HEAD_TIMEOUT = 30.0
#: seconds a refused request's connection keeps discarding input after the
#: ``413`` before it is closed.
LINGER = 2.0


#: the message of the ``400`` for a request Twisted's parser rejects.
BAD_REQUEST = (
    f"malformed HTTP request, or a request head over {MAX_HEADERS} headers "
    f"or {TOTAL_HEADERS_SIZE} bytes"
)


def _closing_response(status: bytes, ctype: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
    return head % (status, ctype, len(body)) + b"Connection: close\r\n\r\n" + body


def bound_channel(protocol: Any, early: EarlyStarter | None = None) -> Any:
    """Set the header limits on a protocol built by a Twisted ``Site`` (the
    HTTP/1.1 channel inside Twisted's protocol-negotiating wrapper), and
    make the requests its parser rejects get a JSON ``400`` (Twisted sends
    an empty one, or none for a line over its length limit).  ``early``
    sees the heads that arrive whole (`one_pass_heads`)."""
    channel = getattr(protocol, "_channel", protocol)
    channel.maxHeaders = MAX_HEADERS
    channel.totalHeadersSize = TOTAL_HEADERS_SIZE

    def bad_request(*_: object) -> None:
        body = json_envelope(400, BAD_REQUEST)
        channel.transport.write(_closing_response(b"400 Bad Request", b"application/json", body))
        channel.loseConnection()

    channel._respondToBadRequestAndDisconnect = bad_request
    channel.lineLengthExceeded = bad_request
    one_pass_heads(channel, early)
    _head_deadline(protocol, channel)
    return protocol


def _head_deadline(protocol: Any, channel: Any) -> None:
    """Close ``channel`` with a JSON ``408`` when a request head takes more
    than ``HEAD_TIMEOUT`` seconds to arrive (see the module docstring).
    Nothing happens once ``protocol`` has switched to another channel (HTTP/2
    negotiated over TLS)."""
    # One delayed call per connection, moved (``reset``) for each request
    # rather than made and cancelled: a disarmed one that fires finds no head
    # being read and does nothing.
    call: Any = None  # the delayed call, once there is one
    armed = False  # a head is being waited for
    stopped = False  # the connection was taken over: no more heads
    connection_made = channel.connectionMade
    data_received = channel.dataReceived
    all_headers_received = channel.allHeadersReceived
    connection_lost = channel.connectionLost

    def reading_head() -> bool:
        return bool(channel.line_mode) and not channel._handlingRequest

    def arm() -> None:
        nonlocal armed, call
        if armed or stopped or not reading_head():
            return
        armed = True
        if call is not None and call.active():
            call.reset(HEAD_TIMEOUT)
        else:
            call = channel.callLater(HEAD_TIMEOUT, expired)

    def cancel() -> None:
        nonlocal armed, call
        armed = False
        if call is not None and call.active():
            call.cancel()
        call = None

    def expired() -> None:
        nonlocal armed, call
        call = None
        if not armed:
            return
        armed = False
        current = getattr(protocol, "_channel", channel)
        if current is not channel or not reading_head() or channel.transport is None:
            return
        log.info(
            "closing a connection from {peer}: request head not received within {seconds} s",
            peer=getattr(channel.transport.getPeer(), "host", "?"),
            seconds=HEAD_TIMEOUT,
        )
        body = json_envelope(408, f"request head not received within {HEAD_TIMEOUT:g} s")
        channel.transport.write(
            _closing_response(b"408 Request Timeout", b"application/json", body)
        )
        channel.setTimeout(None)
        channel.loseConnection()

    def on_connection_made() -> None:
        no_delay(channel.transport)
        fixed_addresses(channel.transport)
        coalesce_writes(channel.transport)
        connection_made()
        arm()

    def on_data(data: bytes) -> None:
        arm()
        data_received(data)

    def on_all_headers() -> None:
        nonlocal armed
        armed = False  # the pending call, if it fires, does nothing
        all_headers_received()

    def on_lost(reason: Any) -> None:
        cancel()
        connection_lost(reason)

    def stop() -> None:
        """The connection was taken over (a WebSocket splice): no more heads."""
        nonlocal stopped
        stopped = True
        cancel()

    channel.stop_head_deadline = stop
    channel.connectionMade = on_connection_made
    channel.dataReceived = on_data
    channel.allHeadersReceived = on_all_headers
    channel.connectionLost = on_lost


def _discard(data: bytes) -> None:
    """Input of a refused request: read and dropped, never held."""


class BoundedRequest(Request):
    """A request whose body is buffered in memory, up to the site's
    ``max_request_body_size`` and never beyond.

    Twisted spools bodies over 100 kB to a temporary file; we need every body
    in memory anyway (the model name is inside it) and file I/O would block
    the reactor.
    """

    _body_limit = DEFAULT_MAX_REQUEST_BODY_SIZE
    _refused = False

    def gotLength(self, length: int | None) -> None:
        # Twisted declares ``content = None`` on the class; it holds the body.
        self.content = BytesIO()  # type: ignore[assignment]
        self._honour_connection_close()
        site = getattr(self.channel, "site", None)
        self._body_limit = getattr(site, "max_request_body_size", DEFAULT_MAX_REQUEST_BODY_SIZE)
        if length is not None and length > self._body_limit:
            self._refuse(f"request body of {length} bytes")

    def _honour_connection_close(self) -> None:
        """``Connection: close`` among comma-separated tokens (``close,
        X-Foo``) or in a later ``Connection`` line closes the connection after
        the response.  Twisted's ``checkPersistence``, run just before, splits
        the first line on spaces only."""
        channel: Any = self.channel
        lines = self.requestHeaders.getRawHeaders(b"connection", [])
        tokens = {t.strip().lower() for line in lines for t in line.split(b",")}
        if b"close" in tokens and channel.persistent:
            channel.persistent = False
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        assert self.content is not None
        if self.content.tell() + len(data) > self._body_limit:
            self._refuse("chunked request body")
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse(self, what: str) -> None:
        """Answer ``413`` now, drop the body and close the connection."""
        self._refused = True
        self.content = BytesIO()  # type: ignore[assignment]
        channel: Any = self.channel
        transport: Any = channel.transport
        limit = self._body_limit
        log.info(
            "refused a request from {peer}: {what} exceeds maxRequestBodySize ({limit} bytes)",
            peer=getattr(transport.getPeer(), "host", "?"),
            what=what,
            limit=limit,
        )
        accept = self.requestHeaders.getRawHeaders(b"accept", [b""])[0]
        ctype, body = error_body(accept, 413, f"{what} exceeds maxRequestBodySize ({limit} bytes)")
        # No "100 Continue" after this answer (Twisted sends it after gotLength).
        self.requestHeaders.removeHeader(b"expect")
        channel.persistent = False
        channel.dataReceived = _discard
        channel.rawDataReceived = _discard
        transport.write(_closing_response(b"413 Content Too Large", ctype, body))
        if not isinstance(transport, FileDescriptor):
            transport.loseConnection()
            return
        transport.loseWriteConnection()
        closing = channel.callLater(LINGER, transport.loseConnection)
        self.notifyFinish().addBoth(lambda _: closing.cancel() if closing.active() else None)
