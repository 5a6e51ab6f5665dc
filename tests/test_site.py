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
