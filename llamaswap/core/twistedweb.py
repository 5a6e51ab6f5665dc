"""The few Twisted internals llamaswap relies on, in one place, each with its reason.

Everything else uses Twisted's public, documented API.  What is here has no
public equivalent (checked against Twisted 25.5 to 26.10); if Twisted grows
one, this is the only module to change.

* `disconnected`: ``Request._disconnected``.  The public way to learn that a
  client went away is the errback of ``notifyFinish()``, which only helps
  code that subscribed before it happened; a response that is about to start
  streaming (or to write an error) needs to *ask*.
* `transport_paused`: ``HTTPChannel._waitingForTransport``.  A push producer
  registered while the socket buffer is already full is not paused by
  Twisted, so a new stream has to start from the channel's state.
* `quiet_http_client_factories`: ``twisted.web.client._HTTP11ClientFactory``
  logs "Starting factory"/"Stopping factory" for every pooled upstream
  connection; the class is private, so silencing it touches a private name.
* `fresh_connection`: ``HTTPConnectionPool._newConnection``.  A request
  re-sent after a stale pooled connection must go out on a *new* connection
  (another pooled one may be just as stale); the pool has no public way to
  ask for one that still returns to the pool afterwards.
* `response_connection_headers`: ``HTTP11ClientProtocol._parser.connHeaders``.
  The client keeps ``Connection`` and the other connection-control headers
  of a response out of ``IResponse.headers``, yet the headers that
  ``Connection`` names are hop-by-hop too and must not cross the proxy.
* `tls_handshake_pending`: ``TLSMemoryBIOProtocol._handshakeDone``.  A
  TLS client endpoint reports the connection before the handshake; whether
  it has finished is only known to a protocol that listens for it, and the
  HTTP client protocol does not.
* `one_pass_heads`: ``HTTPChannel``'s request-head state
  (``_HTTPChannel__first_line``, ``_command``, ``_path``, ``_version``,
  ``_receivedHeaderSize``/``Count``, ``_maybeChooseTransferDecoder``),
  ``LineReceiver``'s ``_buffer``/``_busyReceiving``, ``Headers._rawHeaders``
  and ``http_headers._nameEncoder``.  ``HTTPChannel`` reads a head only line
  by line; a head that arrives whole is read in one pass by setting the state
  the line path would set (without these names, the line path is kept).
* `copy_headers`: ``Headers._rawHeaders``.  ``Headers`` can only be
  filled name by name and value by value, each encoded and checked again.
* `plain_leaf`: ``twisted.web.resource._IEncodingResource``.  Whether a
  root resource may be rendered without ``Site.getResourceFor`` and the
  encoder question ``Request.process`` asks of it for every request.
* `write_now`: the same names as `coalesce_writes`, for a write that
  must not wait for the end of the pass.
* `after_flush`: not a private name but an under-documented ordering of the
  reactor (see its docstring).
* `coalesce_writes`: ``FileDescriptor.doWrite``, ``disconnecting``,
  ``_writeDisconnecting``, ``dataBuffer``/``offset``/``_tempDataLen``.  A
  transport's writes wait for the reactor's next pass, announced to epoll and
  back for every write (two ``epoll_ctl`` calls and one more event to
  dispatch); there is no public way to say "flush at the end of this pass".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Container, Iterable
from typing import Any, Protocol

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.web import http_headers
from twisted.web.iweb import INonQueuedRequestFactory

from llamaswap.core.transport import acknowledge_now, let_others_run, waiting_now

_log = Logger()


class EarlyStart(Protocol):
    """What an `EarlyStarter` began for a request before Twisted read it."""

    def settle(self) -> None:
        """The data that carried the request has been handled: whatever was
        begun and not taken over by then is to be undone."""


#: ``(channel, method, target, version, headers, rest of the data)``: sees a
#: request head before Twisted builds the request (see `one_pass_heads`)
EarlyStarter = Callable[[Any, bytes, bytes, bytes, Any, bytes], EarlyStart | None]
#: the request attribute `one_pass_heads` sets when its starter saw the head
#: and returned nothing: how many bytes after the head it saw (a body that
#: turns out longer, read later, may be shown to the starter again)
EARLY_SEEN = "early_seen"

__all__ = [
    "EARLY_SEEN",
    "EarlyStart",
    "EarlyStarter",
    "after_flush",
    "coalesce_writes",
    "copy_headers",
    "disconnected",
    "fresh_connection",
    "one_pass_heads",
    "start_early",
    "plain_leaf",
    "quiet_http_client_factories",
    "response_connection_headers",
    "tls_handshake_pending",
    "transport_paused",
    "write_now",
]


def disconnected(request: Any) -> bool:
    """Whether the connection ``request`` arrived on has been lost.

    ``twisted.web.http.Request`` sets ``_disconnected`` in ``connectionLost``;
    an object without it (a test double, a wrapper) counts as connected.
    """
    return bool(getattr(request, "_disconnected", False))


def transport_paused(request: Any) -> bool:
    """Whether ``request``'s channel is waiting for its transport to drain.

    A producer registered now would not be told to pause, so it must start
    paused when this is true.  ``False`` without a channel (finished or lost).
    """
    channel = getattr(request, "channel", None)
    return bool(getattr(channel, "_waitingForTransport", False))


def quiet_http_client_factories() -> None:
    """Stop Twisted's HTTP/1.1 client factories logging every connection's
    start and stop (pure noise at a proxy's request rate)."""
    from twisted.web import client

    client._HTTP11ClientFactory.noisy = False


def fresh_connection(pool: Any, key: Any, endpoint: Any) -> Any:
    """A new connection from ``pool`` (an ``HTTPConnectionPool``) for ``key``,
    never a cached one; it joins the pool once its request is done."""
    return pool._newConnection(key, endpoint)


def response_connection_headers(protocol: Any) -> Callable[[], Any]:
    """A reader of the connection-control headers (``Connection``,
    ``Keep-Alive``...) of the response ``protocol`` (an
    ``HTTP11ClientProtocol``) is reading; take it right after
    ``protocol.request`` and call it once the response has arrived.  The
    reader answers a ``Headers`` (``None`` when there was no request)."""
    parser = getattr(protocol, "_parser", None)
    return lambda: getattr(parser, "connHeaders", None)


def tls_handshake_pending(transport: Any) -> bool:
    """Whether ``transport`` is a TLS connection whose handshake has not
    finished (``False`` for a plain TCP transport)."""
    return getattr(transport, "_handshakeDone", True) is False


def after_flush(reactor: IReactorTime, fn: Callable[..., object], *args: Any) -> None:
    """Run ``fn(*args)`` once the reactor has written out what is buffered.

    Responses are written to sockets in the reactor's next I/O pass, which
    comes *after* the delayed calls due now; one call scheduled from another
    runs after that pass.  Bookkeeping done this way (access log, activity
    rows) no longer delays the bytes the client is waiting for.

    Calls made in the same reactor pass share one pair of delayed calls and
    run in the order they were made (a failing one is logged and does not
    stop the others).  When writes coalesced by `coalesce_writes` wait for
    the end of the pass, the calls run right after those writes go out,
    with no delayed call of their own.
    """
    flusher = _flushers.get(reactor)
    if flusher is not None and flusher.then(fn, args):
        return  # writes wait for this pass's end: run just after they go out
    queue = _after_flush.get(reactor)
    if queue is None:
        queue = _after_flush[reactor] = []
        reactor.callLater(0, reactor.callLater, 0, _run_after_flush, reactor)
    queue.append((fn, args))


#: reactor -> the calls waiting for its next I/O pass
_after_flush: dict[Any, list[tuple[Callable[..., object], tuple[Any, ...]]]] = {}


def _run_after_flush(reactor: Any) -> None:
    _run_calls(_after_flush.pop(reactor, ()))


def _run_calls(calls: Iterable[tuple[Callable[..., object], tuple[Any, ...]]]) -> None:
    """Make each call in order; a failing one is logged and the rest still run."""
    for fn, args in calls:
        try:
            fn(*args)
        except Exception:
            _log.failure("error in {fn!r}", fn=fn)


def coalesce_writes(transport: Any) -> None:
    """Send what ``transport`` is given at the end of the reactor's current
    pass, without registering it with epoll for writability.

    Twisted buffers each write and asks epoll to report the socket writable
    (``epoll_ctl``), writes it out when epoll says so, then withdraws the
    request (``epoll_ctl`` again): three system calls and one more event per
    response piece.  Here the writes made while one read is handled (a
    response head and its body, or a request) are still gathered, then sent
    with one ``send`` as soon as that read is handled (the transport's
    ``doRead`` is wrapped for it); writes made outside a read (a timer, a
    thread's result) go out from a delayed call due at once.  Only what the
    socket does not take, and a transport that is closing, goes back to
    Twisted's own path.  A transport that is not a plain file descriptor
    (TLS) is left as it is.
    """
    if not isinstance(transport, FileDescriptor) or "startWriting" in vars(transport):
        return
    flusher = _flushers.get(transport.reactor)
    if flusher is None:
        flusher = _flushers[transport.reactor] = _WriteFlusher(transport.reactor)
    transport.startWriting = functools.partial(flusher.start_writing, transport)  # type: ignore[method-assign]
    transport.doRead = functools.partial(flusher.read, transport.doRead)  # type: ignore[method-assign]


class _WriteFlusher:
    """Transports with writes waiting for the end of the reactor's pass."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._pending: dict[FileDescriptor, None] = {}
        #: calls to make once the pending writes are out (`after_flush`)
        self._then: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self._call: Any = None
        #: reads under way (`read`): their `then` calls run once they return
        self._reading = 0

    def _stopping(self) -> bool:
        """Whether the reactor is stopping: then writes take Twisted's own
        path, whose writers get an I/O pass before the reactor disconnects
        everything, while a delayed call made in the pass that completes the
        shutdown never runs.  (``_stopped`` is set by ``reactor.stop()``; a
        shutdown event fired without it, as trial does between suites, leaves
        the reactor running.)"""
        return bool(getattr(self._reactor, "_stopped", False))

    def _call_due(self) -> bool:
        """Whether the flush's delayed call is still to run (it may have been
        cancelled from outside, as trial's cleanup does)."""
        return self._call is not None and bool(self._call.active())

    def then(self, fn: Callable[..., object], args: tuple[Any, ...]) -> bool:
        """Call ``fn(*args)`` once the writes waiting now are out; False
        (nothing done) when no write is waiting and no read is under way."""
        if self._stopping():
            return False
        if not self._reading and (not self._pending or not self._call_due()):
            return False
        self._then.append((fn, args))
        return True

    def after_read(self, fn: Callable[..., object], args: tuple[Any, ...]) -> bool:
        """Call ``fn(*args)`` with the `then` calls of the read under way;
        False (nothing done) when no read is under way."""
        if not self._reading or self._stopping():
            return False
        self._then.append((fn, args))
        return True

    def read(self, do_read: Callable[[], object]) -> object:
        """A transport's ``doRead``: what handling the read wrote goes out
        as soon as it returns, not after the rest of the reactor's pass."""
        self._reading += 1
        why: object = True
        try:
            why = do_read()
        finally:
            self._reading -= 1
            if why is None and not self._stopping():
                self.flush()
            elif (self._then or self._pending) and not self._call_due():
                self._call = self._reactor.callLater(0, self._flush)
        return why

    def start_writing(self, transport: Any) -> None:
        if self._stopping() or transport.disconnecting or transport._writeDisconnecting:
            type(transport).startWriting(transport)
            return
        if not self._reading and not self._call_due():
            # (A read under way flushes when it returns.  Checked on the
            # call, not on the pending set: a call cancelled from outside,
            # as trial's cleanup does, must not stall writes.)
            self._call = self._reactor.callLater(0, self._flush)
        self._pending[transport] = None

    def _flush(self) -> None:
        self._call = None
        self.flush()

    def flush(self) -> None:
        """Write out every pending transport, then make the `then` calls."""
        if not self._pending and not self._then:
            return
        if self._call_due():
            self._call.cancel()
        self._call = None
        pending, self._pending = self._pending, {}
        for transport in pending:
            self.write_out(transport)
        then, self._then = self._then, []
        _run_calls(then)

    @staticmethod
    def write_out(transport: Any) -> None:
        """Send what ``transport`` buffered; what the socket does not take
        goes back to Twisted's epoll path."""
        if not transport.connected:
            return  # lost meanwhile: Twisted drops what it buffered
        if transport.disconnecting or transport._writeDisconnecting:
            type(transport).startWriting(transport)
            return
        try:
            why = transport.doWrite()
        except Exception:
            why = True  # the reactor's own pass will meet it and close the connection
        left = transport._tempDataLen or len(transport.dataBuffer) - transport.offset
        if why is not None or left:
            # The socket is full (or failing): epoll takes over, and the
            # reactor handles what doWrite reports, as for any transport.
            type(transport).startWriting(transport)


#: reactor -> its write flusher
_flushers: dict[Any, _WriteFlusher] = {}


def after_this_read(reactor: Any, fn: Callable[..., object], *args: Any) -> bool:
    """Call ``fn(*args)`` right after what the read under way wrote has gone
    out (see `coalesce_writes`), with the `after_flush` calls, in order;
    False, with nothing done, when no read of a coalescing transport is
    under way (call it now then)."""
    flusher = _flushers.get(reactor)
    return flusher is not None and flusher.after_read(fn, args)


def write_now(reactor: Any) -> bool:
    """Write out at once what `coalesce_writes` holds for the end of the
    reactor's pass (the ``after_flush`` calls still wait for that end);
    True when something was written."""
    flusher = _flushers.get(reactor)
    if flusher is None or not flusher._pending or flusher._stopping():
        return False
    pending, flusher._pending = flusher._pending, {}
    for transport in pending:
        flusher.write_out(transport)
    return True


def copy_headers(source: Any, drop: Container[bytes]) -> Any:
    """A new ``Headers`` with ``source``'s headers whose lower-cased names
    are not in ``drop``, in order.  The names are canonical and the values
    checked already: they are copied as they are, not encoded and checked
    again one by one (``Headers._rawHeaders``)."""
    out = http_headers.Headers()
    raw = out._rawHeaders
    for name, values in source._rawHeaders.items():
        if name.lower() not in drop:
            raw[name] = list(values)
    return out


def plain_leaf(resource: Any) -> bool:
    """Whether ``resource`` is a leaf that asks for no response encoder:
    a request for it may skip ``Site.getResourceFor`` (see
    ``LlamaSwapRequest.process``)."""
    from twisted.web.resource import _IEncodingResource

    return bool(getattr(resource, "isLeaf", False)) and not _IEncodingResource.providedBy(resource)


# --- request heads read in one pass ----------------------------------------

#: a request line Twisted's ``_parseRequestLine`` accepts (a token method, a
#: target of bytes 33-176, HTTP/1.0 or 1.1), as one regular expression.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\xb0]+) (HTTP/1\.[01])\Z")
#: the header names whose values decide how the body is framed
_FRAMING = frozenset((b"Content-Length", b"Transfer-Encoding"))


def one_pass_heads(channel: Any, early: EarlyStarter | None = None) -> None:
    """Make ``channel`` (a ``twisted.web.http.HTTPChannel``) read a request
    head that arrives whole in one read in a single pass, instead of line by
    line through ``LineReceiver``.

    ``HTTPChannel`` hands each line to ``lineReceived`` and each header to
    ``headerReceived``: about thirty Python calls a request before the
    request is even dispatched (a fifth of the request path's time, once the
    process has sat idle).  Here a head that is complete in the data read,
    within the channel's limits and free of everything unusual (folded
    lines, a stray CR or LF, NUL, a leading empty line, an invalid name or
    request line) is split at once and its state set exactly as the line path
    would set it (``_HTTPChannel__first_line``, ``_command``/``_path``/
    ``_version``, ``_receivedHeaderSize``, the headers in order, the framing
    through ``_maybeChooseTransferDecoder``), and the rest of the data goes
    through ``LineReceiver`` as before.  Anything else takes Twisted's own
    path untouched, so every refusal (400, 413, limits) stays Twisted's.

    ``early``, when given, sees each such head (as ``Headers``) with the
    rest of the data before Twisted builds the request; what it returns
    (an `EarlyStart`, or ``None``) is set on the request as
    ``early_start``, and is settled once the data has been handled.

    Most clients write a request's head and its body separately (Python's
    ``http.client`` does), so an idle server often reads the head alone.
    With ``early``, a POST head whose small body (at most `HOLD_BODY`
    bytes, framed by one ``Content-Length``, no ``Expect``) has not arrived
    yet is held back, for one more read and at most `HOLD_FOR` seconds:
    head and body are then read together, as if they had come in one read.
    Past either, the held data goes the line path, as it would have at once.
    (Before holding, whatever already waits on the socket is read at once:
    the body has often arrived while the head was being read.)
    """
    line_path = channel.dataReceived
    encoder = getattr(http_headers, "_nameEncoder", None)
    if (
        encoder is None
        or not hasattr(channel, "_HTTPChannel__first_line")
        or not hasattr(channel, "_maybeChooseTransferDecoder")
        or INonQueuedRequestFactory.providedBy(channel.requestFactory)
    ):
        return  # a Twisted without these names: keep its own path

    held: list[Any] = []  # [data, the delayed call releasing it], while a head waits

    def release() -> None:
        data, _ = held
        del held[:]
        line_path(data)

    def data_received(data: bytes) -> None:
        may_hold = early is not None
        if held:
            first, call = held
            del held[:]
            if call.active():
                call.cancel()
            data, may_hold = first + data, False
        if (
            channel.line_mode
            and not channel._buffer
            and not channel._busyReceiving
            and not channel._handlingRequest
            and not channel.paused
            and channel.persistent
            and channel._HTTPChannel__first_line == 1
        ):
            outcome = _read_head(channel, data, encoder.encode, early, may_hold)
            if outcome is _HOLD:
                transport = channel.transport
                more = waiting_now(transport)
                if not more and acknowledge_now(transport):
                    # the client, woken by the acknowledgement, often waits
                    # for this core: with it, the body was then there every
                    # time measured (41 of 41), instead of 130-290 µs later
                    let_others_run()
                    more = waiting_now(transport)
                if not more:
                    channel.resetTimeout()
                    held[:] = [data, channel.callLater(HOLD_FOR, release)]
                    return
                data += more
                outcome = _read_head(channel, data, encoder.encode, early)
            if outcome:
                return
        line_path(data)

    def connection_lost(reason: Any, lost: Callable[[Any], None] = channel.connectionLost) -> None:
        if held:
            call = held[1]
            del held[:]  # the client left in the middle of its request
            if call.active():
                call.cancel()
        lost(reason)

    channel.dataReceived = data_received
    channel.connectionLost = connection_lost


def start_early(
    early: EarlyStarter,
    channel: Any,
    method: bytes,
    target: bytes,
    version: bytes,
    headers: Any,
    rest: bytes,
) -> EarlyStart | None:
    """``early``'s answer for a request; None, logged, when it fails."""
    try:
        return early(channel, method, target, version, headers, rest)
    except Exception:
        _log.failure("error in the early look at {method} {target}", method=method, target=target)
        return None


#: the largest body a head is held back for (see `one_pass_heads`)
HOLD_BODY = 64 * 1024
#: seconds a head is held back for its body at most
HOLD_FOR = 0.02
#: `_read_head`'s answer for a head to hold back
_HOLD = object()


def _read_head(
    channel: Any,
    data: bytes,
    encode: Callable[[bytes], bytes],
    early: EarlyStarter | None,
    may_hold: bool = False,
) -> bool | object:
    """Read the request head at the start of ``data`` (see `one_pass_heads`);
    False, with nothing changed, when it should take the line path, and
    `_HOLD` (``may_hold``), with nothing changed, for a head to hold back
    until its body has come."""
    end = data.find(b"\r\n\r\n")
    if end <= 0 or end > channel.totalHeadersSize or end > channel.MAX_LENGTH:
        return False
    head = data[:end]
    crlf = head.count(b"\r\n")
    if head.count(b"\r") != crlf or head.count(b"\n") != crlf or b"\x00" in head:
        return False
    if crlf > channel.maxHeaders:
        return False
    lines = head.split(b"\r\n")
    matched = _REQUEST_LINE.match(lines[0])
    if matched is None:
        return False
    headers = http_headers.Headers()
    raw = headers._rawHeaders
    framing = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or line[0] in b" \t":
            return False
        try:
            name = encode(name)
        except ValueError:  # InvalidHeaderName
            return False
        value = value.strip(b" \t")
        raw.setdefault(name, []).append(value)
        if name in _FRAMING:
            framing.append((name, value))
    command, path, version = matched.groups()
    rest = data[end + 4 :]
    if may_hold and command == b"POST" and version == b"HTTP/1.1" and b"Expect" not in raw:
        if len(framing) == 1 and framing[0][0] == b"Content-Length":
            length = framing[0][1]
            if length.isdigit() and len(rest) < int(length) <= HOLD_BODY:
                return _HOLD
    started = None
    if early is not None:
        started = start_early(early, channel, command, path, version, headers, rest)
    try:
        # From here on, exactly what lineReceived and headerReceived would do.
        channel.resetTimeout()
        request = channel.requestFactory(channel, len(channel.requests))
        if started is not None:
            request.early_start = started
        elif early is not None:
            # the starter saw this much after the head (see ``EARLY_SEEN``)
            setattr(request, EARLY_SEEN, len(rest))
        channel.requests.append(request)
        channel._HTTPChannel__first_line = 0
        channel._command, channel._path, channel._version = command, path, version
        channel._receivedHeaderSize = end - 2 * crlf
        channel._receivedHeaderCount = len(lines) - 1
        request.requestHeaders = headers
        for name, value in framing:
            if not channel._maybeChooseTransferDecoder(name, value):
                return True  # answered 400 and closing, as the line path would
        channel.allHeadersReceived()
        if channel.length == 0:
            channel.allContentReceived()
        else:
            channel.setRawMode()
        transport = channel.transport
        if transport is not None and transport.disconnecting:
            return True  # as LineReceiver stops after a line that closed the connection
        if rest:
            LineReceiver.dataReceived(channel, rest)
        return True
    finally:
        if started is not None:
            started.settle()
