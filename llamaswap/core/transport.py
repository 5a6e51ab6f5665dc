"""Socket options every connection llamaswap makes or accepts gets."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp


def no_delay(transport: Any) -> None:
    """Turn off Nagle's algorithm on ``transport`` when it is TCP.

    A proxy writes small pieces (response heads, one event of a stream) that
    must leave at once: with Nagle's algorithm a piece written while the one
    before is unacknowledged waits for that acknowledgement.  Go (and so
    llama-swap) and nginx set ``TCP_NODELAY`` on every connection; Twisted
    does not.  A transport without the option (a Unix socket, a test double)
    is left as it is.
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is None:
        return
    try:
        setter(True)
    except OSError:  # already closed, or not a TCP socket after all
        pass


def fixed_addresses(transport: Any) -> None:
    """Make ``transport`` answer ``getHost()`` and ``getPeer()`` with the
    addresses it has now, asked for once.

    A connection's two ends never change, but Twisted's TCP transport asks
    the kernel for the local one (``getsockname``) and builds a new address
    object for each end on every call, and Twisted's ``Request`` calls both
    for every request on a keep-alive connection.  The answers are also kept
    after the socket closes (when ``getsockname`` would fail).

    Only a TCP socket's own transport is changed.  A wrapper's addresses may
    still change after its connection is made (a ``haproxy:`` endpoint's
    learn the client's from the PROXY header that arrives first), and a TLS
    or test transport is left as it is too.
    """
    if not isinstance(transport, tcp.Connection):
        return
    try:
        host, peer = transport.getHost(), transport.getPeer()
    except OSError:  # closed already
        return
    transport.getHost = lambda: host  # type: ignore[method-assign]
    transport.getPeer = lambda: peer  # type: ignore[method-assign]


def _tcp_socket(transport: Any) -> socket.socket | None:
    """The socket of a plain TCP transport; None for any other (TLS, a test double)."""
    sock = getattr(transport, "socket", None)
    return sock if isinstance(sock, socket.socket) else None


def waiting_now(transport: Any) -> bytes:
    """What already waits to be read on ``transport``'s socket (a plain TCP
    connection's), without waiting: the body a client wrote just after the
    head often arrived while the head was being read, and reading it now
    saves going back to the reactor for it.  ``b""`` when nothing waits,
    and for any other transport; an error or the end of the connection is
    left for the reactor's own next read to find."""
    sock = _tcp_socket(transport)
    if sock is None:
        return b""
    try:
        return sock.recv(_READ_SIZE)
    except OSError:
        return b""


def acknowledge_now(transport: Any) -> bool:
    """Have the kernel acknowledge what was read on ``transport``'s socket
    now (``TCP_QUICKACK``, where there is one); whether it was.

    A client that wrote a request's head and then its small body without
    ``TCP_NODELAY`` (Python's ``http.client`` does) has Nagle's algorithm
    hold the body back until the head is acknowledged; and on a connection
    that goes back and forth, Linux delays that acknowledgement, hoping to
    send it with the answer, which cannot come before the body: measured,
    the body came 0.6-2.4 ms after the head.  Acknowledged at once, it
    comes as soon as the client runs (often on this core: see
    `let_others_run`)."""
    sock = _tcp_socket(transport)
    if sock is None or _QUICKACK is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except OSError:
        return False
    return True


def _no_yield() -> None:
    """Where the system cannot be asked to run another process first."""


#: Let a process this one just woke run now (``os.sched_yield`` where the
#: system has it, a hint): the kernel often queues a woken process on the
#: core of the one that woke it, where it waits until that one blocks.  The
#: model's server sent a request (:mod:`llamaswap.web.early`), a client
#: whose body was just acknowledged (`acknowledge_now`).
let_others_run: Callable[[], None] = getattr(os, "sched_yield", _no_yield)

#: ``TCP_QUICKACK`` where the system has it
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
#: bytes read at most by `waiting_now` (what Twisted reads at a time)
_READ_SIZE = 65536
