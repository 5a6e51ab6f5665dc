"""Socket options every connection llamaswap makes or accepts gets."""

from __future__ import annotations

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
