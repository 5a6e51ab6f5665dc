"""Where a socket-activated listener listens: read from the inherited
socket itself (real sockets, handed over as systemd would number them)."""

from __future__ import annotations

import os
import socket
import tempfile

from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.service.activation import inherited_loopback_only
from llamaswap.service.tap import is_loopback_only


class InheritedLoopbackTests(SynchronousTestCase):
    def listening(self, family: int, address: object) -> int:
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(address)
        sock.listen()
        return sock.fileno()

    def test_decided_by_the_socket_address(self) -> None:
        """A socket on a loopback address or a Unix socket is loopback-only;
        one on the wildcard or another address is not; index and name both
        find the socket."""
        path = os.path.join(tempfile.mkdtemp(), "s")
        self.addCleanup(os.rmdir, os.path.dirname(path))
        self.addCleanup(os.unlink, path)
        fds = ListenFDs(
            [
                self.listening(socket.AF_INET, ("127.0.0.1", 0)),
                self.listening(socket.AF_INET, ("0.0.0.0", 0)),
                self.listening(socket.AF_INET6, ("::1", 0)),
                self.listening(socket.AF_INET6, ("::", 0)),
                self.listening(socket.AF_UNIX, path),
            ],
            ("local", "all", "local6", "all6", "unix"),
        )
        for index, name, expected in [
            (0, "local", True),
            (1, "all", False),
            (2, "local6", True),
            (3, "all6", False),
            (4, "unix", True),
        ]:
            with self.subTest(name=name):
                self.assertIs(
                    inherited_loopback_only(f"systemd:domain=INET:index={index}", fds), expected
                )
                self.assertIs(
                    inherited_loopback_only(f"systemd:domain=INET:name={name}", fds), expected
                )

    def test_unknown_when_not_inherited(self) -> None:
        """No such descriptor (or none inherited at all): unknown."""
        fds = ListenFDs([self.listening(socket.AF_INET, ("127.0.0.1", 0))], ("web",))
        for endpoint in (
            "systemd:domain=INET:index=1",
            "systemd:domain=INET:index=x",
            "systemd:domain=INET:name=other",
            "systemd:domain=INET",
        ):
            with self.subTest(endpoint=endpoint):
                self.assertIsNone(inherited_loopback_only(endpoint, fds))
        self.assertIsNone(inherited_loopback_only("systemd:domain=INET:index=0", ListenFDs([], ())))

    def test_tap_is_conservative_when_unknown(self) -> None:
        """With no inherited socket to look at, a ``systemd:`` endpoint is not
        counted as loopback-only (the exposure warning fires) unless the
        caller asks otherwise (the Host check keeps its guard)."""
        self.assertFalse(is_loopback_only("systemd:domain=INET:index=0"))
        self.assertTrue(is_loopback_only("systemd:domain=INET:index=0", unknown=True))
