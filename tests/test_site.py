"""Tests for llamaswap.web.site: how requests are read."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from llamaswap.web.site import LlamaSwapSite


class _Recorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[dict[bytes, list[bytes]], bytes]] = []

    def render_POST(self, request: Any) -> bytes:
        self.seen.append((dict(request.args), request.content.read()))
        return b"ok"


class FormBodyTests(SynchronousTestCase):
    def test_form_bodies_are_not_parsed(self) -> None:
        """An urlencoded POST body is left to llamaswap: ``request.args``
        holds only the query, and the body is unread and whole."""
        resource = _Recorder()
        site = LlamaSwapSite(resource, reactor=Clock())
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(StringTransport())
        body = b"model=sd%2Fxl&stream=true"
        channel.dataReceived(
            b"POST /v1/images?x=1 HTTP/1.1\r\nHost: h\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        self.assertEqual(resource.seen, [({b"x": [b"1"]}, body)])
        channel.connectionLost(None)


class _TypeRecorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, dict[bytes, bytes], bytes]] = []

    def render_POST(self, request: Any) -> bytes:
        parsed = request.content_type
        self.seen.append((parsed.media_type, parsed.params, request.content.read()))
        return b"ok"


class ContentTypeTests(SynchronousTestCase):
    """Every Content-Type the router reads is parsed by our own parser, and
    Twisted's ``email``-based one is never called."""

    def setUp(self) -> None:
        import twisted.web.http

        def forbidden(line: bytes) -> bytes:
            raise AssertionError(f"email parser called for {line!r}")

        self.patch(twisted.web.http, "_parseContentType", forbidden)
        self.resource = _TypeRecorder()
        site = LlamaSwapSite(self.resource, reactor=Clock())
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.addCleanup(self.channel.connectionLost, None)

    def post(self, ctype: bytes | None, body: bytes = b"x=1") -> tuple[bytes, dict[bytes, bytes]]:
        header = b"Content-Type: " + ctype + b"\r\n" if ctype is not None else b""
        self.channel.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\n"
            + header
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        media, params, seen_body = self.resource.seen.pop()
        self.assertEqual(seen_body, body)
        return media, params

    def test_json(self) -> None:
        self.assertEqual(self.post(b"application/json", b"{}"), (b"application/json", {}))

    def test_json_with_charset(self) -> None:
        self.assertEqual(
            self.post(b"application/json; charset=UTF-8", b"{}"),
            (b"application/json", {b"charset": b"UTF-8"}),
        )

    def test_multipart_with_boundary(self) -> None:
        body = b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--XyZ--\r\n'
        self.assertEqual(
            self.post(b'multipart/form-data; boundary="XyZ"', body),
            (b"multipart/form-data", {b"boundary": b"XyZ"}),
        )

    def test_urlencoded(self) -> None:
        self.assertEqual(
            self.post(b"application/x-www-form-urlencoded", b"model=a&stream=true"),
            (b"application/x-www-form-urlencoded", {}),
        )

    def test_missing(self) -> None:
        self.assertEqual(self.post(None), (b"", {}))

    def test_malformed(self) -> None:
        self.assertEqual(self.post(b"not a type; ;="), (b"", {}))
