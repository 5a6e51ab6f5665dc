"""Tests for request heads read in one pass (``core.twistedweb.one_pass_heads``).

Every case is fed, byte for byte, to two channels of the same site: one that
reads heads in one pass and one that keeps ``HTTPChannel``'s line path.  What
the resource sees and what the client is sent must be the same; the simple
heads must not have gone through ``lineReceived`` at all.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaswap.web import limits
from llamaswap.web.site import LlamaSwapSite, http_date


class _Recorder(Resource):
    """Answers every request at once (or, for ``/later``, when told) and
    records what it saw."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Any, ...]] = []
        self.waiting: list[Any] = []

    def render(self, request: Any) -> Any:
        self.seen.append(
            (
                request.method,
                request.uri,
                request.clientproto,
                list(request.requestHeaders.getAllRawHeaders()),
                request.content.read(),
                request.args,
            )
        )
        if request.path == b"/later":
            self.waiting.append(request)
            return NOT_DONE_YET
        return b"ok"


def _lines_seen(channel: Any) -> list[bytes]:
    """Count the lines ``channel`` hands to ``lineReceived`` from now on."""
    seen: list[bytes] = []
    line_received = channel.lineReceived

    def counting(line: bytes) -> Any:
        seen.append(line)
        return line_received(line)

    channel.lineReceived = counting
    return seen


_DATE = re.compile(rb"\r\nDate: [^\r]*")


class _Side:
    """One channel with its transport, resource and the lines it parsed."""

    def __init__(self, case: SynchronousTestCase, one_pass: bool) -> None:
        self.resource = _Recorder()
        site = LlamaSwapSite(self.resource, reactor=Clock(), max_request_body_size=lambda: 1000)
        one_pass_heads = limits.one_pass_heads
        if not one_pass:
            limits.one_pass_heads = lambda channel, early=None: None  # type: ignore[assignment]
        try:
            self.protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        finally:
            limits.one_pass_heads = one_pass_heads
        self.channel = getattr(self.protocol, "_channel", self.protocol)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.lines = _lines_seen(self.channel)
        case.addCleanup(self._close)

    def _close(self) -> None:
        for request in self.resource.waiting:
            if not request.finished and not request._disconnected:
                request.finish()
        self.protocol.connectionLost(None)

    def feed(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.protocol.dataReceived(piece)

    def sent(self) -> bytes:
        return _DATE.sub(b"\r\nDate: -", self.transport.value())

    def state(self) -> tuple[Any, ...]:
        return (
            self.resource.seen,
            self.sent(),
            self.transport.disconnecting,
            bool(self.channel.persistent),
        )


BODY = b'{"model":"m1","messages":[]}'
POST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
)

#: heads read in one pass: (name, bytes)
SIMPLE = [
    ("post", POST),
    ("get", b"GET /v1/models?x=1&y=2 HTTP/1.1\r\nHost: h\r\n\r\n"),
    ("no headers", b"GET / HTTP/1.1\r\n\r\n"),
    ("http/1.0", b"GET /health HTTP/1.0\r\nHost: h\r\n\r\n"),
    ("connection close", b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\n\r\n"),
    ("close among tokens", b"GET /a HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n"),
    ("pipelined", POST + b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n" + POST),
    ("pipelined behind a slow one", b"GET /later HTTP/1.1\r\n\r\n" + POST),
    (
        "chunked",
        b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    ),
    ("expect", b"POST /v1/x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"),
    (
        "expect then body",
        b"POST /v1/x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    ),
    (
        "names and values",
        b"GET / HTTP/1.1\r\nx-a: 1\r\nX-A:2\r\nx-b:\t spaced \t\r\nx-empty:\r\n"
        b"content-md5: q\r\nDNT: 1\r\n\r\n",
    ),
    ("target bytes up to 176", b"GET /caf%C3%A9/%20?q=\xb0\x21 HTTP/1.1\r\n\r\n"),
    ("oversized body", b"POST /v1/x HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100),
    (
        "oversized chunked",
        b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"7d0\r\n"
        + b"y" * 2000
        + b"\r\n0\r\n\r\n",
    ),  # fmt: skip
    # Framing headers that Twisted refuses after it has started the request.
    ("two lengths", b"POST /v1/x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nab"),
    (
        "length and chunked",
        b"POST /v1/x HTTP/1.1\r\nContent-Length: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
    ),  # fmt: skip
    ("bad length", b"POST /v1/x HTTP/1.1\r\nContent-Length: 1x\r\n\r\na"),
    ("bad coding", b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
]

#: heads left to the line path: (name, bytes)
UNUSUAL = [
    ("leading empty line", b"\r\n" + POST),
    ("folded header", b"GET / HTTP/1.1\r\nX-A: 1\r\n  2\r\nHost: h\r\n\r\n"),
    ("bare LF in a value", b"GET / HTTP/1.1\r\nX-A: 1\n2\r\nHost: h\r\n\r\n"),
    ("bare CR in a value", b"GET / HTTP/1.1\r\nX-A: 1\r2\r\n\r\n"),
    ("NUL in a value", b"GET / HTTP/1.1\r\nX-A: 1\x002\r\n\r\n"),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : h\r\n\r\n"),
    ("no colon", b"GET / HTTP/1.1\r\nHost\r\n\r\n"),
    ("empty name", b"GET / HTTP/1.1\r\n: h\r\n\r\n"),
    ("bad method", b"G(T / HTTP/1.1\r\n\r\n"),
    ("double space", b"GET  / HTTP/1.1\r\n\r\n"),
    ("bad version", b"GET / HTTP/2.0\r\n\r\n"),
    ("bad target byte", b"GET /\xff HTTP/1.1\r\n\r\n"),
    ("raw UTF-8 target", b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n"),
    ("too many headers", b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n"),
    ("head too long", b"GET / HTTP/1.1\r\nX-A: " + b"a" * 17000 + b"\r\n\r\n"),
]


class OnePassHeadTests(SynchronousTestCase):
    def _both(self, *pieces: bytes) -> tuple[_Side, _Side]:
        fast, slow = _Side(self, one_pass=True), None
        fast.feed(*pieces)
        slow = _Side(self, one_pass=False)
        slow.feed(*pieces)
        self.assertEqual(fast.state(), slow.state())
        if fast.resource.waiting:
            # Answer the slow request: the pipelined one behind it follows.
            for side in (fast, slow):
                side.resource.waiting.pop().finish()
            self.assertEqual(fast.state(), slow.state())
        return fast, slow

    def test_simple_heads_are_read_in_one_pass(self) -> None:
        """Whole simple heads never reach ``lineReceived``, and end exactly
        as the line path ends them."""
        for name, data in SIMPLE:
            with self.subTest(name):
                fast, slow = self._both(data)
                self.assertTrue(slow.lines, "the reference channel reads lines")
                # A pipelined follower may take the line path, never the
                # first request's own head.
                self.assertNotIn(data.split(b"\r\n", 1)[0], fast.lines[:1])
                self.assertTrue(fast.transport.value(), name)

    def test_unusual_heads_take_the_line_path(self) -> None:
        """Heads with anything unusual go through Twisted's line path as
        they are, refusals included."""
        for name, data in UNUSUAL:
            with self.subTest(name):
                fast, _ = self._both(data)
                self.assertTrue(fast.lines, name)

    def test_heads_split_across_reads(self) -> None:
        """A head that arrives in pieces is read by the line path, whatever
        the split; the result is the same."""
        for cut in (1, 10, 30, len(POST) - len(BODY) - 2, len(POST) - len(BODY), len(POST) - 3):
            with self.subTest(cut=cut):
                fast, _ = self._both(POST[:cut], POST[cut:])
                self.assertEqual(len(fast.resource.seen), 1)

    def test_what_a_request_sees(self) -> None:
        """The request read in one pass has its method, target, version,
        query arguments, headers in order and body."""
        fast = _Side(self, one_pass=True)
        fast.feed(
            b"POST /v1/x?model=a HTTP/1.1\r\nHost: h\r\nx-b: 1\r\nX-B: 2\r\n"
            b"Content-Length: 3\r\n\r\nabc"
        )
        self.assertEqual(fast.lines, [])
        self.assertEqual(
            fast.resource.seen,
            [
                (
                    b"POST",
                    b"/v1/x?model=a",
                    b"HTTP/1.1",
                    [(b"Host", [b"h"]), (b"X-B", [b"1", b"2"]), (b"Content-Length", [b"3"])],
                    b"abc",
                    {b"model": [b"a"]},
                )
            ],
        )
        self.assertTrue(fast.sent().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_a_connection_keeps_reading_heads(self) -> None:
        """Request after request on one connection, each read in one pass."""
        fast = _Side(self, one_pass=True)
        for _ in range(3):
            fast.feed(POST)
        self.assertEqual(fast.lines, [])
        self.assertEqual(len(fast.resource.seen), 3)
        self.assertEqual(fast.sent().count(b"HTTP/1.1 200 OK"), 3)

    def test_refused_body_is_discarded(self) -> None:
        """A body over ``maxRequestBodySize`` behind a head read in one pass
        is answered 413 and what follows is dropped, never read."""
        fast = _Side(self, one_pass=True)
        fast.feed(b"POST /v1/x HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100, POST)
        self.assertEqual(fast.resource.seen, [])
        self.assertTrue(fast.sent().startswith(b"HTTP/1.1 413 "))


class DateHeaderTests(SynchronousTestCase):
    def test_date_is_formatted_once_a_second(self) -> None:
        """The ``Date`` value is the HTTP date of the second, reused within it."""
        first = http_date(1_700_000_000.2)
        self.assertEqual(first, b"Tue, 14 Nov 2023 22:13:20 GMT")
        self.assertIs(http_date(1_700_000_000.9), first)
        self.assertEqual(http_date(1_700_000_001.0), b"Tue, 14 Nov 2023 22:13:21 GMT")

    def test_responses_carry_server_and_date(self) -> None:
        """A leaf root is rendered without the tree walk, with Twisted's
        default ``Server`` and a ``Date``; other roots keep Twisted's path."""
        for leaf in (True, False):
            with self.subTest(leaf=leaf):
                resource = _Recorder()
                root: Resource = resource
                if not leaf:
                    root = Resource()
                    root.putChild(b"v1", resource)
                site = LlamaSwapSite(root, reactor=Clock())
                self.assertEqual(site.leaf_root is root, leaf)
                protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
                transport = StringTransport()
                protocol.makeConnection(transport)
                protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\n\r\n")
                sent = transport.value()
                self.assertIn(b"\r\nServer: TwistedWeb/", sent)
                self.assertRegex(sent, rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} [\d:]{8} GMT\r\n")
                self.assertEqual(resource.seen[0][1], b"/v1/models")
                protocol.connectionLost(None)
