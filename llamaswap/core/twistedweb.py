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
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

_log = Logger()

__all__ = [
    "after_flush",
    "coalesce_writes",
    "disconnected",
    "fresh_connection",
    "quiet_http_client_factories",
    "response_connection_headers",
    "tls_handshake_pending",
    "transport_paused",
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
    response piece.  Here the writes made during one pass (a response head
    and its body, or a request) are still gathered, then sent with one
    ``send`` from a delayed call due at once; only what the socket does not
    take, and a transport that is closing, goes back to Twisted's own path.
    A transport that is not a plain file descriptor (TLS) is left as it is.
    """
    if not isinstance(transport, FileDescriptor) or "startWriting" in vars(transport):
        return
    flusher = _flushers.get(transport.reactor)
    if flusher is None:
        flusher = _flushers[transport.reactor] = _WriteFlusher(transport.reactor)
    transport.startWriting = functools.partial(flusher.start_writing, transport)  # type: ignore[method-assign]


class _WriteFlusher:
    """Transports with writes waiting for the end of the reactor's pass."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._pending: dict[FileDescriptor, None] = {}
        #: calls to make once the pending writes are out (`after_flush`)
        self._then: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self._call: Any = None

    def _stopping(self) -> bool:
        """Whether the reactor is stopping: then writes take Twisted's own
        path, whose writers get an I/O pass before the reactor disconnects
        everything, while a delayed call made in the pass that completes the
        shutdown never runs.  (``_stopped`` is set by ``reactor.stop()``; a
        shutdown event fired without it, as trial does between suites, leaves
        the reactor running.)"""
        return bool(getattr(self._reactor, "_stopped", False))

    def then(self, fn: Callable[..., object], args: tuple[Any, ...]) -> bool:
        """Call ``fn(*args)`` once the writes waiting now are out; False
        (nothing done) when no write is waiting."""
        if not self._pending or self._call is None or self._stopping():
            return False
        self._then.append((fn, args))
        return True

    def start_writing(self, transport: Any) -> None:
        if self._stopping() or transport.disconnecting or transport._writeDisconnecting:
            type(transport).startWriting(transport)
            return
        if self._call is None or not self._call.active():
            # (Checked on the call, not on the pending set: a call cancelled
            # from outside, as trial's cleanup does, must not stall writes.)
            self._call = self._reactor.callLater(0, self._flush)
        self._pending[transport] = None

    def _flush(self) -> None:
        self._call = None
        pending, self._pending = self._pending, {}
        for transport in pending:
            if not transport.connected:
                continue  # lost meanwhile: Twisted drops what it buffered
            if transport.disconnecting or transport._writeDisconnecting:
                type(transport).startWriting(transport)
                continue
            try:
                why = transport.doWrite()
            except Exception:
                why = True  # the reactor's own pass will meet it and close the connection
            left = transport._tempDataLen or len(transport.dataBuffer) - transport.offset
            if why is not None or left:
                # The socket is full (or failing): epoll takes over, and the
                # reactor handles what doWrite reports, as for any transport.
                type(transport).startWriting(transport)
        then, self._then = self._then, []
        _run_calls(then)


#: reactor -> its write flusher
_flushers: dict[Any, _WriteFlusher] = {}
