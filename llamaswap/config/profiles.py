"""``profiles:`` and ``selectors:``: names that stand for other names
(llama-swap §2.5, §2.6 in docs/design.md).

A *profile* is a set of pins, ``pin name -> target``; while it is active a
request for a pin is rewritten to its target (an empty target disables the
name).  A *selector* is a virtual model ID whose strategy picks one of its
targets per request: ``pin`` the first, ``warm`` the first one loaded,
``spillover`` spreads requests over loaded targets and spills onto a cold one
once every loaded one has ``settings.spillover`` requests.

Both are read and validated in one pass (:func:`read_profiles`), against the
local models, their aliases and the peers; conflicts between peer FQNs and
selector IDs or pin names are reported by :mod:`llamaswap.config.peers`, which
owns that namespace.  The loader keeps the result as ``Config.profiles``; the
runtime (active profile, spillover reservations, per-request resolution) is
:mod:`llamaswap.supervision.selection`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from llamaswap.config.fields import YAML11_BOOLS
from llamaswap.config.macros import format_value
from llamaswap.config.peers import Peers
from llamaswap.config.problems import describe, unknown_key_warnings
from llamaswap.scheduling.planner import ISwapPlanner

__all__ = [
    "PROFILE_KEYS",
    "SELECTOR_KEYS",
    "SELECTOR_SETTINGS_KEYS",
    "STRATEGIES",
    "CanCoexist",
    "Profile",
    "ProfilesConfig",
    "Selector",
    "SelectorTarget",
    "planner_coexistence",
    "read_profiles",
]

STRATEGIES = ("warm", "pin", "spillover")
PROFILE_KEYS = frozenset({"description", "pins"})
SELECTOR_KEYS = frozenset(
    {"strategy", "targets", "settings", "name", "description", "unlisted", "metadata"}
)
SELECTOR_SETTINGS_KEYS = frozenset({"spillover"})

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
    if isinstance(unlisted, str) and unlisted in YAML11_BOOLS:
        unlisted = YAML11_BOOLS[unlisted]
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


def read_profiles(
    document: Mapping[str, Any],
    model_ids: Collection[str],
    aliases: Mapping[str, str],
    peers: Peers,
    can_coexist: CanCoexist,
) -> tuple[ProfilesConfig, list[str], list[str]]:
    """The valid profiles and selectors of ``document``, the problems found
    (one line each naming its key path) and the unknown-key warnings.
    ``can_coexist`` decides whether a spillover selector's local targets can
    be loaded together."""
    reading = _read(document, model_ids, aliases, peers, can_coexist)
    return _config(reading, model_ids, aliases, peers), reading.problems, reading.warnings
