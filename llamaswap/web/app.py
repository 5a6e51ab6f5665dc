"""The HTTP face of llamaswap, composed from parts with one job each.

* :mod:`~llamaswap.web.routing`: where requests may go under the config being
  served (rebuilt on reload) and the peers' HTTP clients;
* :mod:`~llamaswap.web.inference`: request -> destination (local model or peer);
* :mod:`~llamaswap.web.serving`: admit -> wait -> relay -> record;
* :mod:`~llamaswap.web.websockets`: WebSocket upgrades;
* :mod:`~llamaswap.web.admin`: the Klein management API;
* :mod:`~llamaswap.web.dispatch`: the root resource choosing among them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.web.resource import Resource

from llamaswap.config import Config
from llamaswap.config.peers import Peers
from llamaswap.config.profiles import ProfilesConfig
from llamaswap.observe.inflight import InflightTracker
from llamaswap.observe.prometheus import Metrics
from llamaswap.observe.recording import ActivityRecorder
from llamaswap.supervision.router import Router
from llamaswap.upstream.client import UpstreamClient
from llamaswap.upstream.peerhealth import PeerHealth
from llamaswap.web.admin import AdminApi
from llamaswap.web.dispatch import Dispatcher
from llamaswap.web.guard import BrowserGuard
from llamaswap.web.inference import ModelRequests
from llamaswap.web.listings import model_records
from llamaswap.web.routing import Routing
from llamaswap.web.serving import RequestServer
from llamaswap.web.streams import StreamsResource
from llamaswap.web.ui import UIResource
from llamaswap.web.websockets import WebSocketRelay


class LlamaSwapApp:
    """Request handling for the configuration being served.

    ``reactor`` times loading streams and connects to peers and websocket
    upstreams; ``on_profile_changed`` is called with the new active profile
    name whenever ``PUT /api/profiles/active`` changes it; ``loopback_only``
    says whether the server listens on loopback addresses only (then only
    loopback names and ``allowedHosts`` are accepted in ``Host``)."""

    def __init__(
        self,
        config: Config,
        *,
        router: Router,
        client: UpstreamClient,
        recorder: ActivityRecorder,
        inflight: InflightTracker,
        metrics: Metrics,
        streams: StreamsResource,
        reactor: Any,
        on_profile_changed: Callable[[str | None], None],
        loopback_only: bool,
        resource_report: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._routing = Routing(config, router, reactor)
        self._streams = streams
        serving = RequestServer(self._routing, router, client, recorder, inflight, metrics, reactor)
        websockets = WebSocketRelay(self._routing, router, reactor)
        self._models = ModelRequests(self._routing, serving, websockets)
        self._admin = AdminApi(self._routing, router, recorder, on_profile_changed, resource_report)
        self._guard = BrowserGuard(loopback_only=loopback_only)

    def resource(self) -> Resource:
        """A root resource serving every path."""
        return Dispatcher(
            self._routing,
            self._models,
            self._streams,
            UIResource(),
            self._admin.resource(),
            self._guard,
        )

    def reconfigure(self, config: Config) -> None:
        """Serve ``config`` from the next request on."""
        self._routing.reconfigure(config)

    def start(self) -> None:
        """Start what runs in the background: the peers' health probes."""
        self._routing.start()

    def close(self) -> defer.Deferred[None]:
        """Close the peers' pooled connections."""
        return self._routing.close()

    def model_records(self) -> list[dict[str, Any]]:
        """The ``/v1/models`` records."""
        return model_records(self._routing.state, self._routing.state_of, self._routing.health)

    @property
    def peer_health(self) -> PeerHealth:
        """What is known of the peers' health (issue 15)."""
        return self._routing.health

    @property
    def peers(self) -> Peers:
        return self._routing.state.peers

    @property
    def profiles(self) -> ProfilesConfig:
        return self._routing.state.profiles

    @property
    def active_profile(self) -> str | None:
        """The name of the active profile (``None`` when none is)."""
        return self._routing.state.profile_state.active
