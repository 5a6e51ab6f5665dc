"""Client endpoints for upstream servers, tuned for loopback.

Twisted's ``HostnameEndpoint`` resolves every name through the thread pool
and reports a refused connection only at its next 300 ms attempt tick.  Local
inference servers are nearly always at an IP literal or ``localhost``, and a
health check polls a port that refuses connections until the server is up,
so those 300 ms would be paid on every probe.  Here an IP literal connects
directly, ``localhost`` tries 127.0.0.1 and then ::1 (remembering which one
answered), and only other names go through ``HostnameEndpoint``.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

_LOCALHOST = ("127.0.0.1", "::1")


@implementer(IStreamClientEndpoint)
class _FirstThatConnects:
    """Tries loopback addresses in order; remembers the one that worked."""

    def __init__(self, reactor: Any, port: int, timeout: float, preferred: list[str]) -> None:
        self._reactor = reactor
        self._port = port
        self._timeout = timeout
        self._preferred = preferred

    async def _connect(self, factory: IProtocolFactory) -> Any:
        order = list(self._preferred)
        first: Exception | None = None
        for host in order:
            endpoint = _literal_endpoint(self._reactor, host, self._port, self._timeout)
            try:
                protocol = await endpoint.connect(factory)
            except ConnectError as exc:
                first = first or exc
                continue
            if order[0] != host:
                self._preferred[:] = [host] + [h for h in order if h != host]
            return protocol
        assert first is not None
        raise first

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._connect(factory))


def _literal_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    if ipaddress.ip_address(host).version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """An ``Agent`` endpoint factory (``Agent.usingEndpointFactory``)."""

    def __init__(self, reactor: Any, connect_timeout: float = 30) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._localhost_order = list(_LOCALHOST)
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii") if isinstance(uri.host, bytes) else uri.host
        host = host.strip("[]")
        port = uri.port
        endpoint: IStreamClientEndpoint
        if host.lower() == "localhost":
            endpoint = _FirstThatConnects(self._reactor, port, self._timeout, self._localhost_order)
        else:
            try:
                endpoint = _literal_endpoint(self._reactor, host, port, self._timeout)
            except ValueError:
                endpoint = HostnameEndpoint(self._reactor, host.encode("idna"), port, self._timeout)
        if uri.scheme == b"https":
            creator = self._tls.creatorForNetloc(uri.host, port)
            return wrapClientTLS(creator, endpoint)
        return endpoint
