"""Upstream endpoint selection."""

from __future__ import annotations

from twisted.internet import protocol, reactor
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI

from llamaswap.core.endpoints import UpstreamEndpoints
from tests.support import free_port


def uri(text: str) -> URI:
    return URI.fromBytes(text.encode())


class SelectionTests(SynchronousTestCase):
    def test_ip_literals_connect_directly(self) -> None:
        """IP literals need no resolver: plain TCP endpoints."""
        factory = UpstreamEndpoints(reactor)
        self.assertIsInstance(
            factory.endpointForURI(uri("http://127.0.0.1:5800/")), TCP4ClientEndpoint
        )
        self.assertIsInstance(factory.endpointForURI(uri("http://[::1]:5800/")), TCP6ClientEndpoint)

    def test_other_names_resolve(self) -> None:
        """Other host names go through HostnameEndpoint."""
        factory = UpstreamEndpoints(reactor)
        self.assertIsInstance(factory.endpointForURI(uri("http://gpu-box:5800/")), HostnameEndpoint)

    def test_https_wraps_tls(self) -> None:
        """https upstreams are wrapped in TLS."""
        factory = UpstreamEndpoints(reactor)
        endpoint = factory.endpointForURI(uri("https://127.0.0.1:8443/"))
        self.assertNotIsInstance(endpoint, TCP4ClientEndpoint)


class LocalhostTests(TestCase):
    async def test_localhost_reaches_ipv4_server(self) -> None:
        """localhost connects to a server bound on 127.0.0.1 only."""
        port = reactor.listenTCP(
            0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        endpoint = UpstreamEndpoints(reactor).endpointForURI(
            uri(f"http://localhost:{port.getHost().port}/")
        )
        connected = await endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
        connected.transport.loseConnection()

    async def test_refused_everywhere_fails(self) -> None:
        """With nothing listening, localhost fails with connection refused."""
        endpoint = UpstreamEndpoints(reactor).endpointForURI(
            uri(f"http://localhost:{free_port()}/")
        )
        with self.assertRaises(ConnectionRefusedError):
            await endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
