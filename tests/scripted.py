"""A loopback HTTP/1.1 upstream scripted per request, for tests of the proxy
client's edges: stale keep-alive connections, connections dying mid-request,
answers that never come, exact response headers.

Each request that arrives takes the next action of the script (the last one
repeats).  An action is ``"close"`` (close the connection without a byte of
response), ``"abort"`` (reset it), ``"abort-early"`` (reset it as soon
as the request's headers are in, its body still on the way), ``"hang"``
(never answer) or the raw
response bytes to write; the connection stays open after a response unless
the response says ``Connection: close`` or is cut short (no blank line
ending its headers: written, then the connection is closed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import protocol, reactor

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Seen:
    """One request the upstream received: on which connection, and what."""

    connection: int
    head: bytes
    body: bytes = b""

    def header(self, name: bytes) -> list[bytes]:
        """The values of header ``name`` (case-insensitive)."""
        values = []
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                values.append(value.strip())
        return values


@dataclass
class Script:
    actions: list[bytes | str]
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    #: connections that have been closed (by either side).
    lost: int = 0

    def next_action(self) -> bytes | str:
        return self.actions.pop(0) if len(self.actions) > 1 else self.actions[0]


class _Connection(protocol.Protocol):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.buffer = b""
        self.number = 0

    def connectionMade(self) -> None:
        self.script.connections += 1
        self.number = self.script.connections

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            seen = Seen(self.number, head)
            length = int((seen.header(b"content-length") or [b"0"])[0])
            if len(rest) < length:
                if self.script.actions[0] == "abort-early":
                    seen.body = rest
                    self.script.seen.append(seen)
                    self.script.next_action()
                    self.transport.abortConnection()
                    self.buffer = b""
                return
            seen.body, self.buffer = rest[:length], rest[length:]
            self.script.seen.append(seen)
            if not self._act(self.script.next_action()):
                return

    def _act(self, action: bytes | str) -> bool:
        """Carry out ``action``; False when the connection is done."""
        if action == "close":
            self.transport.loseConnection()
            return False
        if action == "abort":
            self.transport.abortConnection()
            return False
        if action == "hang":
            return False
        assert isinstance(action, bytes)
        self.transport.write(action)
        if b"connection: close" in action.lower() or b"\r\n\r\n" not in action:
            self.transport.loseConnection()
            return False
        return True

    def connectionLost(self, reason: Any = None) -> None:
        self.script.lost += 1


def serve(script: Script) -> Any:
    """Listen on an ephemeral loopback port; returns the listening port."""
    factory = protocol.Factory.forProtocol(lambda: _Connection(script))
    factory.noisy = False
    return reactor.listenTCP(0, factory, interface="127.0.0.1")
