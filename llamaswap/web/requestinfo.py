"""What the web layer reads off a ``twisted.web`` request besides its headers.

:func:`client_gone` is the one place in ``llamaswap.web`` that reads
``Request._disconnected``: Twisted has no public way to ask whether the
client already went away, and writing to such a request raises or is lost.
"""

from __future__ import annotations

from typing import Any


def client_gone(request: Any) -> bool:
    """Whether nothing more can be written to ``request``: it is finished or
    its client disconnected."""
    return bool(request.finished or getattr(request, "_disconnected", False))


def client_ip(request: Any) -> str | None:
    """The client's address (``None`` for a UNIX socket)."""
    peer = request.getClientAddress()
    return getattr(peer, "host", None)


def query_of(uri: bytes) -> bytes:
    """The raw query string of ``uri`` (``b""`` when it has none)."""
    _, sep, query = uri.partition(b"?")
    return query if sep else b""
