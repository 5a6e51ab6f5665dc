"""What the web layer reads off a ``twisted.web`` request besides its headers."""

from __future__ import annotations

from typing import Any

from llamaswap.core.twistedweb import disconnected


def client_gone(request: Any) -> bool:
    """Whether nothing more can be written to ``request``: it is finished or
    its client disconnected."""
    return bool(request.finished or disconnected(request))


def client_ip(request: Any) -> str | None:
    """The client's address (``None`` for a UNIX socket)."""
    peer = request.getClientAddress()
    return getattr(peer, "host", None)


def query_of(uri: bytes) -> bytes:
    """The raw query string of ``uri`` (``b""`` when it has none)."""
    _, sep, query = uri.partition(b"?")
    return query if sep else b""
