"""WebSocket upgrades to a local model's server, relayed byte for byte.

An upgrade waits for its model like any request (and holds it while the
socket is open), except for models with ``compat.ignoreWebsockets`` (always
``comfyui_auto``): their upgrades neither start the model nor count as in
flight, so an idle browser tab does not keep a model loaded.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectError
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET

from llamaswap.scheduling import ShuttingDown, UnknownModel
from llamaswap.supervision.router import RequestFailed, Router, TooManyRequests
from llamaswap.upstream.client import forwarded_for
from llamaswap.upstream.websocket import relay_upgrade
from llamaswap.web.auth import carried_headers
from llamaswap.web.errors import write_error, write_too_many
from llamaswap.web.requestinfo import client_ip
from llamaswap.web.routing import Routing

log = Logger()


class WebSocketRelay:
    """Relays WebSocket upgrades once their model is ready."""

    def __init__(self, routing: Routing, router: Router, reactor: Any) -> None:
        self._routing = routing
        self._router = router
        self._reactor = reactor

    def upgrade(self, request: Any, model_id: str, target: bytes, body: bytes) -> object:
        """Relay the upgrade ``request`` to ``target`` on ``model_id``'s server."""
        d = defer.Deferred.fromCoroutine(self._serve(request, model_id, target, body))
        d.addErrback(lambda f: log.failure("websocket relay for {model} failed", f, model=model_id))
        return NOT_DONE_YET

    async def _serve(self, request: Any, model_id: str, target: bytes, body: bytes) -> None:
        headers = request.requestHeaders.copy()
        # Every header crosses (Connection and Upgrade make the handshake),
        # except the one that carried our API key.
        for carried in carried_headers(request):
            headers.removeHeader(carried)
        address = client_ip(request)
        if address:
            headers.setRawHeaders(b"x-forwarded-for", [forwarded_for(headers, address)])
        if model_id in self._routing.state.ignore_websockets:
            if self._routing.state_of(model_id) != "ready":
                write_error(
                    request,
                    409,
                    f"model {model_id} is not loaded; ignored websocket requests cannot start it",
                )
                return
            await self._splice(request, self._router.upstream_of(model_id), target, headers, body)
            return
        try:
            lease = await self._router.acquire(model_id)
        except TooManyRequests:
            write_too_many(request)
            return
        except (RequestFailed, ShuttingDown, UnknownModel) as exc:
            write_error(request, 500, f"unspecific error: {exc}")
            return
        try:
            await self._splice(request, lease.upstream, target, headers, body)
        finally:
            lease.release()

    async def _splice(
        self, request: Any, upstream: bytes, target: bytes, headers: Headers, body: bytes
    ) -> None:
        try:
            await relay_upgrade(request, self._reactor, upstream, target, headers, body)
        except ConnectError as exc:
            write_error(request, 502, f"upstream unavailable: {exc}")
