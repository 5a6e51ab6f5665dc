"""Profiles and selectors at run time (llama-swap §3.8, §4.2 in docs/design.md–§4.4).

Their configuration is :mod:`llamaswap.config.profiles` (``Config.profiles``).
The runtime pieces are small: :class:`ProfileState` (which profile is
active), :class:`SelectorRuntime` (spillover reservations) and
:func:`resolve_request`, the precedence of §4.2 in one function.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from llamaswap.config.peers import Peers, PeerTarget
from llamaswap.config.profiles import Profile, ProfilesConfig, Selector, SelectorTarget

__all__ = [
    "NoModelIdentified",
    "ProfileRequestError",
    "ProfileState",
    "Reservation",
    "Route",
    "SelectorRuntime",
    "SelectorUnavailable",
    "UnknownProfile",
    "parse_activate_body",
    "profile_model_records",
    "profiles_json",
    "resolve_request",
    "rewrite_for_profile",
    "rewrite_upstream_path",
    "selector_model_records",
]

#: process states in which a spillover target takes no new work.
_GOING_AWAY = frozenset({"stopping", "shutdown"})
_LIVE = frozenset({"ready", "starting"})
#: characters kept as they are when a pin target is written into a URL path.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


# --- profiles at runtime ---


class UnknownProfile(LookupError):
    """``PUT /api/profiles/active`` named no configured profile (404)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"profile {json.dumps(self.name, ensure_ascii=False)} not found"


class ProfileRequestError(ValueError):
    """A ``PUT /api/profiles/active`` body that is not acceptable (400)."""


class ProfileState:
    """Which profile is active: none at start and after every reload."""

    def __init__(self, profiles: Mapping[str, Profile]) -> None:
        self._profiles = profiles
        self._active: Profile | None = None

    @property
    def active(self) -> str | None:
        return self._active.id if self._active is not None else None

    def activate(self, name: str | None) -> bool:
        """Make ``name`` the active profile (``None`` or "" deactivates).

        Returns whether the selection changed; raises :class:`UnknownProfile`
        for a name that is not configured (the selection is kept then)."""
        if not name:
            profile = None
        elif name in self._profiles:
            profile = self._profiles[name]
        else:
            raise UnknownProfile(name)
        changed = profile is not self._active
        self._active = profile
        return changed

    def snapshot(self) -> Profile | None:
        """The active profile, to use for the whole of one request."""
        return self._active


def rewrite_for_profile(name: str, state: ProfileState | Profile | None) -> str | None:
    """The target the active profile pins ``name`` to, or ``None`` when no
    pin applies.  "" means the name is disabled: the caller answers 404
    "no model id could be identified"."""
    profile = state.snapshot() if isinstance(state, ProfileState) else state
    if profile is None:
        return None
    return profile.pins.get(name)


def rewrite_upstream_path(rest: bytes, state: ProfileState | Profile | None) -> bytes | None:
    """``/upstream/<rest>`` with its longest pinned leading segments replaced.

    ``rest`` is the raw path after ``/upstream/``.  Pins are matched against
    the percent-decoded leading segments; what follows keeps the client's
    encoding.  ``None`` when no pin applies; a disabled pin gives ``b""``
    (the path ``/upstream/``, answered 404 "model not found")."""
    profile = state.snapshot() if isinstance(state, ProfileState) else state
    if profile is None or not profile.pins:
        return None
    segments = rest.split(b"/")
    best: tuple[str, int] | None = None
    for count in range(1, len(segments) + 1):
        name = unquote_to_bytes(b"/".join(segments[:count])).decode("utf-8", "replace")
        if name in profile.pins and (best is None or len(name) > len(best[0])):
            best = (name, count)
    if best is None:
        return None
    target = profile.pins[best[0]]
    if not target:
        return b""
    remaining = b"/".join(segments[best[1] :])
    encoded = quote(target, safe=_PATH_SAFE).encode("ascii")
    return encoded + (b"/" + remaining if best[1] < len(segments) else b"")


def parse_activate_body(body: bytes) -> str | None:
    """The profile a ``PUT /api/profiles/active`` body names (``None`` =
    deactivate).  Raises :class:`ProfileRequestError` with the 400 message."""
    text = body.decode("utf-8", "replace").lstrip(" \t\r\n")
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        raise ProfileRequestError("invalid profile request") from None
    if value is None:
        raise ProfileRequestError("profile name is required")
    if not isinstance(value, dict):
        raise ProfileRequestError("invalid profile request")
    if "name" not in value:
        raise ProfileRequestError("profile name is required")
    name = value["name"]
    if name is None:
        return None
    if not isinstance(name, str):
        raise ProfileRequestError("profile name must be a string or null")
    return name or None


def profiles_json(profiles: ProfilesConfig, state: ProfileState) -> dict[str, Any]:
    """The ``GET /api/profiles`` body: profiles sorted by ID, disabled pins as ""."""
    return {
        "active": state.active,
        "profiles": [
            {
                "id": profile_id,
                "description": profiles.profiles[profile_id].description,
                "pins": dict(profiles.profiles[profile_id].pins),
            }
            for profile_id in sorted(profiles.profiles)
        ],
    }


# --- selectors at runtime ---


class SelectorUnavailable(Exception):
    """No target can take the request (503 with this message)."""


class NoModelIdentified(Exception):
    """The request's model is disabled by the active profile (404)."""

    def __str__(self) -> str:
        return "no model id could be identified"


class Reservation:
    """The target a selector chose for one request.

    A spillover choice counts against its target until :meth:`release`;
    releasing twice (or releasing a ``pin``/``warm`` choice) does nothing."""

    __slots__ = ("_counts", "model_id", "selector_id", "target")

    def __init__(
        self,
        selector_id: str,
        target: str,
        model_id: str,
        counts: dict[str, int] | None = None,
    ) -> None:
        self.selector_id = selector_id
        #: the name the request is rewritten to.
        self.target = target
        #: the real local ID or peer FQN it reaches.
        self.model_id = model_id
        self._counts = counts

    @property
    def held(self) -> bool:
        """Whether this reservation still counts against its target."""
        return self._counts is not None

    def release(self) -> None:
        counts, self._counts = self._counts, None
        if counts is not None and counts.get(self.model_id, 0) > 0:
            counts[self.model_id] -= 1

    def __repr__(self) -> str:
        return f"<Reservation {self.selector_id}->{self.target} held={self.held}>"


@dataclass
class _Spillover:
    """Per spillover selector: reservations per target and the tie breaker."""

    counts: dict[str, int] = field(default_factory=dict)
    turn: int = 0


class SelectorRuntime:
    """Chooses selector targets per request (§4.4)."""

    def __init__(self, selectors: Mapping[str, Selector]) -> None:
        self._selectors = selectors
        self._spill = {
            selector_id: _Spillover()
            for selector_id, selector in selectors.items()
            if selector.strategy == "spillover"
        }

    def __contains__(self, name: object) -> bool:
        return name in self._selectors

    def reservations(self, selector_id: str) -> Mapping[str, int]:
        """Outstanding spillover reservations per target (real ID or FQN)."""
        spill = self._spill.get(selector_id)
        counts = spill.counts if spill is not None else {}
        return MappingProxyType({m: n for m, n in counts.items() if n > 0})

    def choose(self, selector_id: str, state_of: Callable[[str], str]) -> Reservation:
        """The target for one request for ``selector_id``.

        ``state_of(model_id)`` is a local model's process state ("stopped"
        when it has no process).  Raises ``KeyError`` for an unknown selector
        and :class:`SelectorUnavailable` when every spillover target is
        stopping."""
        selector = self._selectors[selector_id]
        targets = selector.targets
        if selector.strategy == "pin":
            return Reservation(selector_id, targets[0].name, targets[0].model_id)
        if selector.strategy == "warm":
            chosen = (
                next((t for t in targets if state_of(t.model_id) == "ready"), None)
                or next((t for t in targets if state_of(t.model_id) == "starting"), None)
                or targets[0]
            )
            return Reservation(selector_id, chosen.name, chosen.model_id)
        return self._spillover(selector, self._spill[selector_id], state_of)

    def _spillover(
        self, selector: Selector, spill: _Spillover, state_of: Callable[[str], str]
    ) -> Reservation:
        counts = spill.counts
        active: list[SelectorTarget] = []
        cold: list[SelectorTarget] = []
        for target in selector.targets:
            reserved = counts.get(target.model_id, 0) > 0
            if not target.local:
                (active if reserved else cold).append(target)
                continue
            state = state_of(target.model_id)
            if state in _GOING_AWAY:
                continue
            (active if state in _LIVE or reserved else cold).append(target)
        if not active:
            if not cold:
                raise SelectorUnavailable(
                    f"selector {json.dumps(selector.id)} has no available spillover targets"
                )
            chosen = cold[0]
        elif min(counts.get(t.model_id, 0) for t in active) < selector.spillover or not cold:
            chosen = self._least_busy(active, spill)
        else:
            chosen = cold[0]
        counts[chosen.model_id] = counts.get(chosen.model_id, 0) + 1
        return Reservation(selector.id, chosen.name, chosen.model_id, counts)

    @staticmethod
    def _least_busy(targets: list[SelectorTarget], spill: _Spillover) -> SelectorTarget:
        fewest = min(spill.counts.get(t.model_id, 0) for t in targets)
        tied = [t for t in targets if spill.counts.get(t.model_id, 0) == fewest]
        chosen = tied[spill.turn % len(tied)]
        spill.turn += 1
        return chosen


# --- name resolution per request (§4.2) ---


@dataclass(frozen=True)
class Route:
    """Where one request goes after pins and selectors.

    Exactly one of ``model_id`` and ``peer`` is set, or neither when the name
    reaches nothing (the caller answers 404 "no router for requested model").
    When ``requested`` differs from the name the client sent, the request
    must be rewritten to it (:func:`llamaswap.upstream.peers.rewrite_request_model`)."""

    requested: str
    model_id: str | None = None
    peer: PeerTarget | None = None
    #: the selector that chose the target (activity metadata ``selector``).
    selector: str | None = None
    #: release when the request is finished (also on every error path).
    reservation: Reservation | None = None


def resolve_request(
    name: str,
    *,
    local: Callable[[str], str | None],
    peers: Peers,
    profile: ProfileState | Profile | None,
    selectors: SelectorRuntime,
    state_of: Callable[[str], str],
) -> Route:
    """Resolve a requested model name with llama-swap's precedence: active
    profile pin, then selector, then local model ID, alias, peer FQN and
    bare peer name (``local`` is ``Config.resolve``: local names win).

    Raises :class:`NoModelIdentified` for a disabled pin and
    :class:`SelectorUnavailable` when a selector has no target."""
    pinned = rewrite_for_profile(name, profile)
    if pinned is not None:
        if not pinned:
            raise NoModelIdentified()
        name = pinned
    selector: str | None = None
    reservation: Reservation | None = None
    if name in selectors:
        selector = name
        reservation = selectors.choose(name, state_of)
        name = reservation.target
    model_id = local(name)
    if model_id is not None:
        return Route(name, model_id=model_id, selector=selector, reservation=reservation)
    peer = peers.resolve(name)
    return Route(name, peer=peer, selector=selector, reservation=reservation)


# --- /v1/models ---


def _record(
    record_id: str,
    created: int,
    name: str,
    description: str,
    meta: dict[str, Any],
    loaded: bool,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": record_id,
        "object": "model",
        "created": created,
        "owned_by": "llama-swap",
    }
    if name.strip():
        record["name"] = name.strip()
    if description.strip():
        record["description"] = description.strip()
    record["meta"] = {"llamaswap": meta}
    record["status"] = {"value": "loaded" if loaded else "unloaded"}
    return record


def selector_model_records(
    profiles: ProfilesConfig, state_of: Callable[[str], str], created: int
) -> list[dict[str, Any]]:
    """``/v1/models`` records for listed selectors: loaded when a local target
    is ready or starting (``pin`` inspects only its first target)."""
    records = []
    for selector_id in sorted(profiles.selectors):
        selector = profiles.selectors[selector_id]
        if selector.unlisted:
            continue
        inspected = selector.targets[:1] if selector.strategy == "pin" else selector.targets
        loaded = any(t.local and state_of(t.model_id) in _LIVE for t in inspected)
        internal: dict[str, Any] = {
            "type": "selector",
            "strategy": selector.strategy,
            "targets": [t.name for t in selector.targets],
        }
        if selector.strategy == "spillover":
            internal["spillover"] = selector.spillover
        meta = {**dict(selector.metadata), **internal}
        records.append(
            _record(selector_id, created, selector.name, selector.description, meta, loaded)
        )
    return records


def profile_model_records(
    profiles: ProfilesConfig, state: ProfileState | Profile | None, created: int
) -> list[dict[str, Any]]:
    """``/v1/models`` records for the active profile's enabled pins whose
    names exist nowhere else (always ``unloaded``)."""
    profile = state.snapshot() if isinstance(state, ProfileState) else state
    if profile is None:
        return []
    return [
        _record(pin, created, "", "", {"type": "profile"}, False)
        for pin in sorted(profile.pins)
        if profile.pins[pin] and pin not in profiles.reserved_names
    ]
