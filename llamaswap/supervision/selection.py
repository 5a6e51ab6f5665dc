"""Profiles and selectors: names that stand for other names (reference §2.5,
§2.6, §3.8, §4.2–§4.4).

A *profile* is a set of pins, ``pin name -> target``; while it is active a
request for a pin is rewritten to its target (an empty target disables the
name).  A *selector* is a virtual model ID whose strategy picks one of its
targets per request: ``pin`` the first, ``warm`` the first one loaded,
``spillover`` spreads requests over loaded targets and spills onto a cold one
once every loaded one has ``settings.spillover`` requests.

Configuration is read and validated in one pass (:func:`_read`), against the
local models, their aliases and the peers; conflicts between peer FQNs and
selector IDs or pin names are reported by :mod:`llamaswap.upstream.peers`, which owns
that namespace.  The runtime pieces are small: :class:`ProfileState` (which
profile is active), :class:`SelectorRuntime` (spillover reservations) and
:func:`resolve_request`, the precedence of §4.2 in one function.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from llamaswap.config.macros import format_value
from llamaswap.config.model import Config, ConfigError
from llamaswap.config.problems import describe, unknown_key_warnings
from llamaswap.scheduling.planner import ISwapPlanner
from llamaswap.upstream.peers import Peers, PeerTarget

__all__ = [
    "STRATEGIES",
    "NoModelIdentified",
    "Profile",
    "ProfileRequestError",
    "ProfileState",
    "ProfilesConfig",
    "Reservation",
    "Route",
    "Selector",
    "SelectorRuntime",
    "SelectorTarget",
    "SelectorUnavailable",
    "UnknownProfile",
    "parse_activate_body",
    "planner_coexistence",
    "profile_model_records",
    "profile_warnings",
    "profiles_from_config",
    "profiles_json",
    "read_profiles",
    "resolve_request",
    "rewrite_for_profile",
    "rewrite_upstream_path",
    "selector_model_records",
    "validate_profiles",
]

STRATEGIES = ("warm", "pin", "spillover")
PROFILE_KEYS = frozenset({"description", "pins"})
SELECTOR_KEYS = frozenset(
    {"strategy", "targets", "settings", "name", "description", "unlisted", "metadata"}
)
SELECTOR_SETTINGS_KEYS = frozenset({"spillover"})
#: process states in which a spillover target takes no new work.
_GOING_AWAY = frozenset({"stopping", "shutdown"})
_LIVE = frozenset({"ready", "starting"})
#: spellings yaml.v3 still decodes into a bool field.
_YAML11_BOOLS = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "on", "On", "ON"), True),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "off", "Off", "OFF"), False),
}
#: characters kept as they are when a pin target is written into a URL path.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"

#: ``can_coexist(real model ids) -> bool``: the routing planner's answer to
#: "can these local models be loaded at the same time?"
CanCoexist = Callable[[tuple[str, ...]], bool]


def planner_coexistence(planner: ISwapPlanner) -> CanCoexist:
    """``can_coexist`` as a swap planner sees it: the models can run together
    when loading any one of them while the others run evicts none of them."""

    def can_coexist(model_ids: tuple[str, ...]) -> bool:
        together = frozenset(model_ids)
        return all(not planner.evict_set(m, together - {m}) for m in together)

    return can_coexist


def _frozen(value: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class Profile:
    """One ``profiles.<id>`` entry."""

    id: str
    description: str = ""
    #: pin name -> target; "" = the name is disabled while the profile is active.
    pins: Mapping[str, str] = field(default_factory=_frozen)


@dataclass(frozen=True)
class SelectorTarget:
    """One entry of ``selectors.<id>.targets``."""

    #: as configured; the request is rewritten to this name.
    name: str
    #: the real local model ID or the peer FQN it reaches.
    model_id: str
    local: bool


@dataclass(frozen=True)
class Selector:
    """One ``selectors.<id>`` entry."""

    id: str
    strategy: str
    targets: tuple[SelectorTarget, ...]
    #: reservations per loaded target before spilling onto a cold one.
    spillover: int = 1
    name: str = ""
    description: str = ""
    metadata: Mapping[str, Any] = field(default_factory=_frozen)
    unlisted: bool = False


@dataclass(frozen=True)
class ProfilesConfig:
    """The profiles and selectors of one configuration, validated."""

    profiles: Mapping[str, Profile] = field(default_factory=_frozen)
    selectors: Mapping[str, Selector] = field(default_factory=_frozen)
    #: names that exist without any profile (model IDs, aliases, peer names,
    #: selector IDs); a pin with one of these names is not listed on its own.
    reserved_names: frozenset[str] = frozenset()


# --- reading and validating ---


@dataclass
class _Reading:
    profiles: dict[str, Profile] = field(default_factory=dict)
    selectors: dict[str, Selector] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Names:
    """What a target name may reach, without profiles or selectors."""

    model_ids: Collection[str]
    aliases: Mapping[str, str]
    peers: Peers

    def local(self, name: str) -> str | None:
        if name in self.model_ids:
            return name
        return self.aliases.get(name)

    def resolve(self, name: str) -> SelectorTarget | None:
        """Local ID or alias first, then a peer FQN or unique bare name."""
        real = self.local(name)
        if real is not None:
            return SelectorTarget(name, real, True)
        peer = self.peers.resolve(name)
        if peer is not None:
            return SelectorTarget(name, peer.fqn, False)
        return None


def _text(value: Any, path: str, problems: list[str]) -> str:
    if value is None:
        return ""
    if isinstance(value, Mapping | list):
        problems.append(f"{path}: must be a string, got {describe(value)}")
        return ""
    return value if isinstance(value, str) else format_value(value)


def _read_profile(
    profile_id: str, entry: Any, names: _Names, selector_ids: Collection[str], reading: _Reading
) -> None:
    path = f"profiles.{profile_id}"
    problems = reading.problems
    if isinstance(entry, list):
        problems.append(
            f"{path}: the legacy list syntax is no longer supported; a profile is now a "
            'mapping with "description" and "pins" (pin name -> target model), '
            "e.g. pins: {chat: qwen-7b}"
        )
        return
    if not isinstance(entry, Mapping):
        problems.append(
            f'{path}: must be a mapping with "description" and "pins", got {describe(entry)}'
        )
        return
    reading.warnings.extend(unknown_key_warnings(entry, PROFILE_KEYS, path))
    before = len(problems)
    description = _text(entry.get("description"), f"{path}.description", problems)
    raw_pins = entry.get("pins")
    pins: dict[str, str] = {}
    if raw_pins is not None and not isinstance(raw_pins, Mapping):
        problems.append(f"{path}.pins: must be a mapping, got {describe(raw_pins)}")
    elif not raw_pins:
        problems.append(f"{path}.pins: must contain at least one entry")
    else:
        for pin, raw_target in raw_pins.items():
            pin = str(pin)
            pin_path = f"{path}.pins.{pin}"
            if pin.strip() == "":
                problems.append(f"{path}.pins: pin names can not be blank")
                continue
            target = _text(raw_target, pin_path, problems)
            if target and names.resolve(target) is None and target not in selector_ids:
                problems.append(f"{pin_path}: references unknown model {target!r}")
            pins[pin] = target
    if len(problems) == before:
        reading.profiles[profile_id] = Profile(profile_id, description, MappingProxyType(pins))


def _read_targets(
    selector_id: str,
    strategy: str,
    raw: Any,
    names: _Names,
    selector_ids: Collection[str],
    problems: list[str],
) -> list[SelectorTarget]:
    path = f"selectors.{selector_id}.targets"
    if raw is not None and not isinstance(raw, list):
        problems.append(f"{path}: must be a list of strings, got {describe(raw)}")
        return []
    if not raw:
        problems.append(f"{path}: must contain at least one entry")
        return []
    targets = []
    seen: dict[str, int] = {}
    for index, item in enumerate(raw):
        where = f"{path}[{index}]"
        if item is None or isinstance(item, Mapping | list):
            problems.append(f"{where}: must be a string, got {describe(item)}")
            continue
        name = item if isinstance(item, str) else format_value(item)
        if name in selector_ids:
            problems.append(
                f"{where}: references selector {name!r}; selector chaining is not supported"
            )
            continue
        target = names.resolve(name)
        if target is None:
            problems.append(f"{where}: references unknown model {name!r}")
            continue
        if strategy == "warm" and not target.local:
            problems.append(f'{where}: must resolve to a local model for strategy "warm"')
            continue
        if strategy == "spillover":
            if target.model_id in seen:
                problems.append(
                    f"{where}: duplicate resolved model {target.model_id!r} "
                    f"(also {path}[{seen[target.model_id]}])"
                )
                continue
            seen[target.model_id] = index
        targets.append(target)
    return targets


def _spillover_setting(raw: Any, path: str, problems: list[str]) -> int:
    if raw is None:
        return 1
    if not isinstance(raw, Mapping):
        problems.append(f"{path}: must be a mapping, got {describe(raw)}")
        return 1
    value = raw.get("spillover")
    if value is None:
        return 1
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{path}.spillover: must be an integer, got {describe(value)}")
        return 1
    if value < 1:
        problems.append(f"{path}.spillover: must be >= 1, got {value}")
        return 1
    return value


def _read_selector(
    selector_id: str,
    entry: Any,
    names: _Names,
    selector_ids: Collection[str],
    can_coexist: CanCoexist,
    reading: _Reading,
) -> None:
    path = f"selectors.{selector_id}"
    problems = reading.problems
    if not isinstance(entry, Mapping):
        problems.append(f"{path}: must be a mapping, got {describe(entry)}")
        return
    reading.warnings.extend(unknown_key_warnings(entry, SELECTOR_KEYS, path))
    before = len(problems)
    if selector_id in names.model_ids:
        problems.append(f"{path}: selector ID conflicts with model ID {selector_id!r}")
    elif selector_id in names.aliases:
        problems.append(
            f"{path}: selector ID conflicts with an alias of model {names.aliases[selector_id]!r}"
        )
    strategy = entry.get("strategy")
    if strategy is None or strategy == "":
        problems.append(f"{path}.strategy: is required (warm, pin or spillover)")
    elif strategy not in STRATEGIES:
        problems.append(
            f"{path}.strategy: unknown strategy {describe(strategy)} (valid: warm, pin, spillover)"
        )
    strategy = strategy if strategy in STRATEGIES else ""
    targets = _read_targets(
        selector_id, strategy, entry.get("targets"), names, selector_ids, problems
    )
    settings = entry.get("settings")
    if settings is not None and isinstance(settings, Mapping):
        reading.warnings.extend(
            unknown_key_warnings(settings, SELECTOR_SETTINGS_KEYS, f"{path}.settings")
        )
    spillover = 1
    if strategy == "spillover":
        spillover = _spillover_setting(settings, f"{path}.settings", problems)
        local = tuple(t.model_id for t in targets if t.local)
        if len(problems) == before and len(local) > 1 and not can_coexist(local):
            listed = ", ".join(repr(m) for m in local)
            problems.append(
                f"{path}.targets: local targets {listed} can not all be loaded at the same "
                "time; spillover needs them together (one group with swap: false, or one "
                "matrix set)"
            )
    elif settings is not None and not isinstance(settings, Mapping):
        problems.append(f"{path}.settings: must be a mapping, got {describe(settings)}")
    name = _text(entry.get("name"), f"{path}.name", problems)
    description = _text(entry.get("description"), f"{path}.description", problems)
    metadata = entry.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        problems.append(f"{path}.metadata: must be a mapping, got {describe(metadata)}")
    unlisted = entry.get("unlisted")
    if isinstance(unlisted, str) and unlisted in _YAML11_BOOLS:
        unlisted = _YAML11_BOOLS[unlisted]
    if unlisted is not None and not isinstance(unlisted, bool):
        problems.append(f"{path}.unlisted: must be true or false, got {describe(unlisted)}")
    if len(problems) == before:
        reading.selectors[selector_id] = Selector(
            id=selector_id,
            strategy=strategy,
            targets=tuple(targets),
            spillover=spillover,
            name=name,
            description=description,
            metadata=_frozen(metadata if isinstance(metadata, Mapping) else None),
            unlisted=bool(unlisted),
        )


def _section(document: Mapping[str, Any], key: str, problems: list[str]) -> Mapping[str, Any]:
    raw = document.get(key)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(f"{key}: must be a mapping, got {describe(raw)}")
        return {}
    return raw


def _read(
    document: Mapping[str, Any],
    model_ids: Collection[str],
    aliases: Mapping[str, str],
    peers: Peers,
    can_coexist: CanCoexist,
) -> _Reading:
    reading = _Reading()
    names = _Names(model_ids, aliases, peers)
    selectors = _section(document, "selectors", reading.problems)
    selector_ids = frozenset(str(key) for key in selectors)
    for selector_id in sorted(selectors, key=str):
        if str(selector_id).strip() == "":
            reading.problems.append("selectors: selector IDs can not be blank")
            continue
        _read_selector(
            str(selector_id), selectors[selector_id], names, selector_ids, can_coexist, reading
        )
    profiles = _section(document, "profiles", reading.problems)
    for profile_id in sorted(profiles, key=str):
        if str(profile_id).strip() == "":
            reading.problems.append("profiles: profile names can not be blank")
            continue
        _read_profile(str(profile_id), profiles[profile_id], names, selector_ids, reading)
    return reading


def _config(
    reading: _Reading, model_ids: Collection[str], aliases: Mapping[str, str], peers: Peers
) -> ProfilesConfig:
    reserved = (
        frozenset(model_ids)
        | frozenset(aliases)
        | peers.routable_names()
        | frozenset(reading.selectors)
    )
    return ProfilesConfig(
        profiles=MappingProxyType(reading.profiles),
        selectors=MappingProxyType(reading.selectors),
        reserved_names=reserved,
    )


def validate_profiles(
    document: Mapping[str, Any],
    model_ids: Collection[str],
    aliases: Mapping[str, str],
    peers: Peers,
    can_coexist: CanCoexist,
) -> list[str]:
    """Every problem under ``profiles`` and ``selectors``, one line each
    naming its key path.  ``can_coexist`` decides whether a spillover
    selector's local targets can be loaded together."""
    return _read(document, model_ids, aliases, peers, can_coexist).problems


def profile_warnings(document: Mapping[str, Any]) -> list[str]:
    """Unknown keys under ``profiles.<id>`` and ``selectors.<id>``."""
    return _read(document, (), {}, Peers(), lambda _: True).warnings


def read_profiles(
    document: Mapping[str, Any],
    model_ids: Collection[str],
    aliases: Mapping[str, str],
    peers: Peers,
    can_coexist: CanCoexist,
) -> tuple[ProfilesConfig, list[str]]:
    """The valid profiles and selectors of ``document`` and the problems found."""
    reading = _read(document, model_ids, aliases, peers, can_coexist)
    return _config(reading, model_ids, aliases, peers), reading.problems


def profiles_from_config(config: Config, peers: Peers, can_coexist: CanCoexist) -> ProfilesConfig:
    """The profiles and selectors of a loaded config; :class:`ConfigError`
    when invalid."""
    profiles, problems = read_profiles(
        config.document, config.models.keys(), config.aliases, peers, can_coexist
    )
    if problems:
        raise ConfigError(problems)
    return profiles


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
