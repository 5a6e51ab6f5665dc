"""Socket options every connection llamaswap makes or accepts gets."""

from __future__ import annotations

from typing import Any


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
