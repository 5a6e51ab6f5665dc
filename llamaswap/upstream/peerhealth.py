"""What llamaswap knows about its peers while it runs (issue 15).

Every peer with a ``check.interval`` is probed: ``GET <proxy>/health``, then
``GET <proxy>/running`` for the models it has loaded, both within
``check.timeout``.  A peer is *up* after a probe that got an answer below
500 from ``/health`` (a server without that path, say a hosted API, answers
404: it is there), *down* after one that did not (no connection, no answer
in time, 5xx: a llamaswap or llama-server still loading says 503), and *unknown* before its first
probe (or when it is never probed): unknown counts as available.  While a
peer is down the next probe waits ``interval`` doubled per failed probe, at
most ``maxInterval``; the first probe that succeeds marks it up again, with
no reload.

Requests teach it too: a connection to the peer that could not be made
(:meth:`PeerHealth.connect_failed`) marks the peer down at once, so the
next request does not wait for a connect time-out of its own, and a response
from the peer marks it up.  :meth:`PeerHealth.started` /
:meth:`PeerHealth.finished` count the requests in flight to each peer, which
the replica choice reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from llamaswap.config.peers import PeerConfig, Peers
from llamaswap.upstream.peers import join_url

__all__ = ["PeerHealth", "PeerStatus"]

log = Logger()

#: ``/running`` states that mean "serves at once" (no load needed).
_LOADED_STATES = frozenset({"ready"})
#: A ``/running`` answer larger than this is not read.
_MAX_RUNNING_BYTES = 1 << 20


@dataclass
class PeerStatus:
    """One peer as last seen."""

    peer_id: str
    #: ``True`` up, ``False`` down, ``None`` not probed yet (counts as up).
    up: bool | None = None
    #: the peer's models in a ready state, from its ``/running``.
    loaded: frozenset[str] = frozenset()
    #: why the peer is down ("" when up).
    error: str = ""
    #: consecutive failed probes (or failed connects).
    failures: int = 0
    #: clock time of the last change of ``up``.
    since: float = 0.0
    #: clock time of the next probe (``None``: none planned).
    next_probe: float | None = None
    #: requests in flight to the peer, per model name the peer knows.
    in_flight: dict[str, int] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.up is not False

    def describe(self) -> dict[str, Any]:
        """The status as ``/v1/models`` metadata shows it."""
        state = "unknown" if self.up is None else "up" if self.up else "down"
        out: dict[str, Any] = {"state": state}
        if self.error:
            out["error"] = self.error
        return out


class _Loop:
    """The probe loop of one peer."""

    def __init__(self, peer: PeerConfig) -> None:
        self.peer = peer
        self.call: Any = None
        self.probing: defer.Deferred[None] | None = None


class PeerHealth:
    """Probes the configured peers and answers where requests may go.

    ``reactor`` makes the probes' connections, ``clock`` times them (the
    reactor unless given).  Probing starts with :meth:`start` and ends with
    :meth:`stop`; :meth:`reconfigure` follows reloads (a peer whose address,
    key or check changed starts over as unknown)."""

    def __init__(
        self,
        reactor: Any,
        *,
        clock: Any = None,
        on_change: Callable[[PeerStatus], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._on_change = on_change
        self._loops: dict[str, _Loop] = {}
        self._status: dict[str, PeerStatus] = {}
        self._running = False

    # --- lifetime ---

    def reconfigure(self, peers: Peers) -> None:
        """Probe the peers of ``peers`` from now on."""
        for peer_id in [p for p in self._loops if p not in peers.peers]:
            self._cancel(self._loops.pop(peer_id))
            del self._status[peer_id]
        for peer_id, peer in peers.peers.items():
            loop = self._loops.get(peer_id)
            if loop is not None and _same_target(loop.peer, peer):
                loop.peer = peer
                continue
            if loop is not None:
                self._cancel(loop)
            self._loops[peer_id] = _Loop(peer)
            self._status[peer_id] = PeerStatus(peer_id, since=self._clock.seconds())
            if self._running:
                self._schedule(peer_id, 0)

    def start(self) -> None:
        """Probe every peer now, then on their intervals."""
        if self._running:
            return
        self._running = True
        for peer_id in self._loops:
            self._schedule(peer_id, 0)

    def stop(self) -> None:
        """No more probes; one under way is abandoned."""
        self._running = False
        for loop in self._loops.values():
            self._cancel(loop)

    def _cancel(self, loop: _Loop) -> None:
        if loop.call is not None and loop.call.active():
            loop.call.cancel()
        loop.call = None
        if loop.probing is not None:
            loop.probing.cancel()

    # --- what is known ---

    def status(self, peer_id: str) -> PeerStatus | None:
        return self._status.get(peer_id)

    def available(self, peer_id: str) -> bool:
        """Whether requests may go to ``peer_id`` (up or not probed yet)."""
        status = self._status.get(peer_id)
        return status is None or status.available

    def loaded(self, peer_id: str, model: str) -> bool:
        """Whether ``peer_id`` has ``model`` loaded (its last ``/running``)."""
        status = self._status.get(peer_id)
        return status is not None and status.up is True and model in status.loaded

    def in_flight(self, peer_id: str, model: str | None = None) -> int:
        """Requests in flight to ``peer_id`` (for ``model``, or all of them)."""
        status = self._status.get(peer_id)
        if status is None:
            return 0
        if model is None:
            return sum(status.in_flight.values())
        return status.in_flight.get(model, 0)

    def retry_after(self, peer_id: str) -> int:
        """Whole seconds until the next probe of ``peer_id`` (at least 1)."""
        status = self._status.get(peer_id)
        if status is None or status.next_probe is None:
            return 1
        return max(1, math.ceil(status.next_probe - self._clock.seconds()))

    # --- what requests report ---

    def started(self, peer_id: str, model: str) -> None:
        status = self._status.get(peer_id)
        if status is not None:
            status.in_flight[model] = status.in_flight.get(model, 0) + 1

    def finished(self, peer_id: str, model: str) -> None:
        status = self._status.get(peer_id)
        if status is not None and status.in_flight.get(model, 0) > 0:
            status.in_flight[model] -= 1
            if not status.in_flight[model]:
                del status.in_flight[model]

    def connect_failed(self, peer_id: str, reason: str) -> None:
        """A request could not connect to ``peer_id``: down now, probed on
        the backoff schedule."""
        if peer_id not in self._status:
            return
        self._failed(peer_id, f"connect failed: {reason}")

    def responded(self, peer_id: str) -> None:
        """A request got a response from ``peer_id``: it is up."""
        status = self._status.get(peer_id)
        if status is not None and status.up is False:
            self._succeeded(peer_id, status.loaded)

    # --- probing ---

    def probe(self, peer_id: str) -> defer.Deferred[None]:
        """Probe ``peer_id`` now (a probe already under way is shared)."""
        loop = self._loops[peer_id]
        if loop.probing is None:
            if loop.call is not None and loop.call.active():
                loop.call.cancel()
            loop.call = None
            d = defer.Deferred.fromCoroutine(self._probe(loop.peer))
            loop.probing = d

            def done(result: Any) -> Any:
                if self._loops.get(peer_id) is loop:
                    loop.probing = None
                return result

            d.addBoth(done)
        waiter: defer.Deferred[None] = defer.Deferred()
        loop.probing.addBoth(lambda r: waiter.callback(None) if not waiter.called else None)
        return waiter

    def _schedule(self, peer_id: str, delay: float) -> None:
        loop = self._loops.get(peer_id)
        status = self._status.get(peer_id)
        if loop is None or status is None or not self._running:
            return
        if loop.peer.check.interval <= 0:
            status.next_probe = None
            return
        if loop.call is not None and loop.call.active():
            loop.call.cancel()
        status.next_probe = self._clock.seconds() + delay
        loop.call = self._clock.callLater(delay, self.probe, peer_id)

    def _next_delay(self, peer: PeerConfig, status: PeerStatus) -> float:
        check = peer.check
        if status.up is not False:
            return check.interval
        return min(check.interval * 2 ** max(0, status.failures - 1), check.max_interval)

    async def _probe(self, peer: PeerConfig) -> None:
        headers = Headers()
        if peer.api_key:
            headers.setRawHeaders(b"authorization", [b"Bearer " + peer.api_key.encode("utf-8")])
        agent = Agent(
            self._reactor,
            connectTimeout=peer.check.timeout,
            pool=HTTPConnectionPool(self._reactor, persistent=False),
        )
        try:
            health = await self._get(agent, join_url(peer.proxy, b"/health"), headers, peer)
            if health[0] >= 500:
                raise _ProbeFailed(f"/health answered {health[0]}")
        except defer.CancelledError:
            return
        except Exception as exc:
            if self._current(peer):
                self._failed(peer.id, _reason(exc))
            return
        loaded: frozenset[str] = frozenset()
        try:
            code, body = await self._get(agent, join_url(peer.proxy, b"/running"), headers, peer)
            if code == 200:
                loaded = _loaded_models(body)
        except defer.CancelledError:
            return
        except Exception as exc:
            log.debug("peer {peer}: /running unreadable: {error}", peer=peer.id, error=exc)
        if self._current(peer):
            self._succeeded(peer.id, loaded)

    async def _get(
        self, agent: Agent, url: bytes, headers: Headers, peer: PeerConfig
    ) -> tuple[int, bytes]:
        """One GET within ``check.timeout`` (raises :class:`_TimedOut` after it)."""
        timed_out = False
        current: defer.Deferred[Any] = agent.request(b"GET", url, headers)

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            current.cancel()

        timer = self._clock.callLater(peer.check.timeout, expire)
        try:
            response = await current
            length = response.length
            if isinstance(length, int) and length > _MAX_RUNNING_BYTES:
                response.deliverBody(Protocol())
                return response.code, b""
            current = readBody(response)
            return response.code, await current
        except Exception:
            if timed_out:
                raise _TimedOut(f"no answer within {peer.check.timeout:g}s") from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    def _current(self, peer: PeerConfig) -> bool:
        """Whether a probe of ``peer`` still counts (probing, peer unchanged)."""
        loop = self._loops.get(peer.id)
        return self._running and loop is not None and _same_target(loop.peer, peer)

    def _failed(self, peer_id: str, error: str) -> None:
        status = self._status[peer_id]
        status.failures += 1
        status.error = error
        status.loaded = frozenset()
        if status.up is not False:
            status.up = False
            status.since = self._clock.seconds()
            log.warn("peer {peer} is down: {error}", peer=peer_id, error=error)
            self._changed(status)
        self._schedule(peer_id, self._next_delay(self._loops[peer_id].peer, status))

    def _succeeded(self, peer_id: str, loaded: frozenset[str]) -> None:
        status = self._status[peer_id]
        was = status.up
        status.failures = 0
        status.error = ""
        status.loaded = loaded
        if was is not True:
            status.up = True
            status.since = self._clock.seconds()
            if was is False:
                log.info("peer {peer} is up again", peer=peer_id)
            self._changed(status)
        if self._loops[peer_id].call is None or not self._loops[peer_id].call.active():
            self._schedule(peer_id, self._next_delay(self._loops[peer_id].peer, status))

    def _changed(self, status: PeerStatus) -> None:
        if self._on_change is not None:
            self._on_change(status)


class _ProbeFailed(Exception):
    pass


class _TimedOut(_ProbeFailed):
    pass


def _same_target(old: PeerConfig, new: PeerConfig) -> bool:
    return (old.proxy, old.api_key, old.check) == (new.proxy, new.api_key, new.check)


def _reason(exc: BaseException) -> str:
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return "; ".join(str(r.value) for r in reasons)
    return str(exc) or type(exc).__name__


def _loaded_models(body: bytes) -> frozenset[str]:
    try:
        document = json.loads(body)
    except ValueError:
        return frozenset()
    running = document.get("running") if isinstance(document, dict) else None
    if not isinstance(running, list):
        return frozenset()
    return frozenset(
        str(item["model"])
        for item in running
        if isinstance(item, dict) and "model" in item and item.get("state") in _LOADED_STATES
    )
