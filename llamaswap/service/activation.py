"""Where a socket-activated listener (``--listen systemd:…``) listens.

systemd passes listening sockets as inherited file descriptors; the endpoint
string names one by ``index`` or ``name``.  Whether it is reachable from
other hosts is read from the socket itself (``getsockname``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket

from twisted.python.systemd import ListenFDs


def _option(endpoint: str, key: str) -> str | None:
    found = re.search(rf"(?:^|:){key}=((?:\\.|[^:\\])*)", endpoint)
    return re.sub(r"\\(.)", r"\1", found.group(1)) if found else None


def _inherited() -> ListenFDs:
    """The descriptors Twisted's ``systemd:`` endpoint parser found.

    Reading ``LISTEN_FDS`` removes it from the environment (so that nothing
    adopts a socket twice), and Twisted reads it when
    ``twisted.internet.endpoints`` is imported: its reading is the one to ask.
    Should that private attribute go away, a copy of the environment is read
    (never the environment itself, which the parser may still need)."""
    from twisted.internet import endpoints

    found = getattr(getattr(endpoints, "_SystemdParser", None), "_sddaemon", None)
    if isinstance(found, ListenFDs):
        return found
    return ListenFDs.fromEnvironment(environ=dict(os.environ))


def inherited_descriptor(endpoint: str, fds: ListenFDs | None = None) -> int | None:
    """The file descriptor a ``systemd:`` endpoint adopts; ``None`` when
    it names none that was inherited."""
    fds = fds if fds is not None else _inherited()
    index, name = _option(endpoint, "index"), _option(endpoint, "name")
    try:
        if index is not None:
            return fds.inheritedDescriptors()[int(index)]
        if name is not None:
            return fds.inheritedNamedDescriptors()[name]
    except (ValueError, IndexError, KeyError):
        return None
    return None


def inherited_loopback_only(endpoint: str, fds: ListenFDs | None = None) -> bool | None:
    """Whether the socket a ``systemd:`` endpoint adopts accepts loopback
    connections only (a loopback address, or a Unix socket); ``None`` when
    that socket cannot be inspected."""
    fd = inherited_descriptor(endpoint, fds)
    if fd is None:
        return None
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            family, address = sock.family, sock.getsockname()
    except OSError:
        return None
    if family == socket.AF_UNIX:
        return True
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    host = ipaddress.ip_address(address[0].split("%", 1)[0])
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped
    return host.is_loopback
