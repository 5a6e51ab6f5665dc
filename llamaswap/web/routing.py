"""Where requests may go under the configuration being served.

:func:`routing_state` turns one :class:`Config` into a frozen
:class:`RoutingState` (API keys, peers, profiles, selectors, ignorePaths,
websocket opt-outs, capability fields); :class:`Routing` holds the current one,
swaps it whole on reload, and keeps one pooled HTTP client per peer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from llamaswap.config import Config
from llamaswap.config.peers import Peers, PeerTimeouts
from llamaswap.config.profiles import ProfilesConfig
from llamaswap.supervision.router import Router
from llamaswap.supervision.selection import ProfileState, SelectorRuntime
from llamaswap.upstream.client import UpstreamClient
from llamaswap.upstream.peerhealth import PeerHealth
from llamaswap.web.auth import ApiKeys
from llamaswap.web.listings import capability_fields


@dataclass(frozen=True)
class RoutingState:
    """What one configuration says about where requests go.

    ``profile_state`` is the one mutable part (``PUT /api/profiles/active``);
    a reload replaces it too, so a reload starts with no profile active, as
    in llama-swap."""

    config: Config
    api_keys: ApiKeys
    peers: Peers
    profiles: ProfilesConfig
    profile_state: ProfileState
    selectors: SelectorRuntime
    #: ``/upstream/<model>/<path>`` paths that never start a stopped model
    ignore_paths: tuple[re.Pattern[str], ...]
    #: models whose websocket upgrades neither start them nor count as in flight
    ignore_websockets: frozenset[str]
    #: model id -> (``/v1/models`` capability fields, context length)
    capabilities: Mapping[str, tuple[dict[str, Any], int]]
    #: ``includeAliasesInList``: aliases get their own ``/v1/models`` records
    aliases_listed: bool

    def ignored(self, path: bytes) -> bool:
        """Whether ``path`` matches ``upstream.ignorePaths``."""
        text = path.decode("utf-8", "replace")
        return any(pattern.search(text) for pattern in self.ignore_paths)


def routing_state(config: Config) -> RoutingState:
    """The routing state of ``config``."""
    return RoutingState(
        config=config,
        api_keys=ApiKeys(config.api_keys),
        peers=config.peers,
        profiles=config.profiles,
        profile_state=ProfileState(config.profiles.profiles),
        selectors=SelectorRuntime(config.profiles.selectors),
        ignore_paths=config.ignore_paths,
        ignore_websockets=frozenset(
            model_id for model_id, model in config.models.items() if model.ignore_websockets
        ),
        capabilities={
            model_id: capability_fields(model.capabilities)
            for model_id, model in config.models.items()
        },
        aliases_listed=config.include_aliases_in_list,
    )


class Routing:
    """The routing state being served and the peers' HTTP clients.

    A peer's client (its connection pool) outlives reloads: it is created
    the first time a configuration names the peer, replaced when a reload
    changes the peer's ``timeouts``, retired when a reload removes the peer,
    and closed by :meth:`close`.  A local model that configures ``timeouts``
    has a client of its own, kept the same way; the others share the app's.
    """

    def __init__(self, config: Config, router: Router, reactor: Any, *, clock: Any = None) -> None:
        self._router = router
        self._reactor = reactor
        #: the peers' health, probed from :meth:`start` on (issue 15).
        self.health = PeerHealth(reactor, clock=clock)
        self._peer_clients: dict[str, UpstreamClient] = {}
        self._peer_timeouts: dict[str, PeerTimeouts] = {}
        self._model_clients: dict[str, UpstreamClient] = {}
        self._model_timeouts: dict[str, PeerTimeouts] = {}
        self.state = self._build(config)

    def reconfigure(self, config: Config) -> None:
        """Serve ``config`` from the next request on."""
        self.state = self._build(config)

    def _build(self, config: Config) -> RoutingState:
        state = routing_state(config)
        self.health.reconfigure(state.peers)
        peer_timeouts = {p: peer.timeouts for p, peer in state.peers.peers.items()}
        self._sync(self._peer_clients, self._peer_timeouts, peer_timeouts)
        model_timeouts = {m: model.timeouts for m, model in config.models.items() if model.timeouts}
        self._sync(self._model_clients, self._model_timeouts, model_timeouts)
        return state

    def _sync(
        self,
        clients: dict[str, UpstreamClient],
        current: dict[str, PeerTimeouts],
        wanted: dict[str, PeerTimeouts],
    ) -> None:
        """One client per key of ``wanted``, built with its time-outs.

        A client whose time-outs changed is replaced, one whose key is gone
        is dropped; either is retired (its idle connections close now, those
        in use when their request is done)."""
        for key, timeouts in wanted.items():
            if current.get(key) != timeouts:
                old = clients.get(key)
                if old is not None:
                    old.retire()
                current[key] = timeouts
                clients[key] = UpstreamClient(
                    self._reactor,
                    connect_timeout=timeouts.connect,
                    idle_timeout=timeouts.idle_conn,
                    response_header_timeout=timeouts.response_header,
                    keepalive=timeouts.keepalive,
                    tls_handshake_timeout=timeouts.tls_handshake,
                )
        for key in [k for k in clients if k not in wanted]:
            del current[key]
            clients.pop(key).retire()

    def peer_client(self, peer_id: str) -> UpstreamClient:
        """The client that sends requests to ``peer_id``."""
        return self._peer_clients[peer_id]

    def model_client(self, model_id: str) -> UpstreamClient | None:
        """The client for ``model_id``'s server when the model configures
        ``timeouts``; ``None`` for the shared one."""
        return self._model_clients.get(model_id)

    def state_of(self, model_id: str) -> str:
        """The state name of ``model_id``'s process (``"ready"``...); ``"stopped"``
        when it has none."""
        process = self._router.processes.get(model_id)
        return process.state.value if process is not None else "stopped"

    def start(self) -> None:
        """Start probing the peers."""
        self.health.start()

    def in_flight(self, model_id: str) -> int:
        """Requests in flight to the local model ``model_id``."""
        process = self._router.processes.get(model_id)
        return process.in_flight if process is not None else 0

    def close(self) -> defer.Deferred[None]:
        """Close the peers' and models' pooled connections."""
        self.health.stop()
        clients = [*self._peer_clients.values(), *self._model_clients.values()]
        closing = [client.close() for client in clients]
        return defer.gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)
