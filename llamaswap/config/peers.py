"""``peers:``: other OpenAI-style servers reached by name (llama-swap §2.3 in docs/design.md).

``peers.<peerID>`` lists the models a remote server provides.  A peer model
is addressed by its fully qualified name (FQN) ``<peerID>/<model>`` or, when
exactly one peer provides it, by its bare name.  Local models always win:
:meth:`Peers.resolve` is asked only after ``Config.resolve`` found nothing.

Reading and validating are one pass (:func:`_read`), so the two never
disagree; the loader keeps the result as ``Config.peers``.  Sending a request
to a peer is :mod:`llamaswap.upstream.peers`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from llamaswap.config.filters import ModelFilters, parse_filters
from llamaswap.config.macros import format_value
from llamaswap.config.problems import describe, unknown_key_warnings, url_problem

__all__ = [
    "PEER_KEYS",
    "CHECK_DEFAULTS",
    "MODEL_TIMEOUT_DEFAULTS",
    "PEER_TIMEOUT_DEFAULTS",
    "PeerCheck",
    "PeerConfig",
    "PeerTarget",
    "PeerTimeouts",
    "Peers",
    "fqn",
    "read_peers",
    "read_timeouts",
]

PEER_KEYS = frozenset({"proxy", "apiKey", "models", "filters", "timeouts", "check"})
#: ``peers.<id>.check`` key -> default in seconds (issue 15): ``/health`` is
#: probed every ``interval`` (0: never; the peer then counts as up), each
#: probe given ``timeout``; while the peer is down the interval doubles per
#: failed probe up to ``maxInterval``.
CHECK_DEFAULTS: Mapping[str, float] = MappingProxyType(
    {"interval": 5.0, "timeout": 2.0, "maxInterval": 30.0}
)
#: ``timeouts`` key -> default in seconds; peers wait up to 60 s for headers.
PEER_TIMEOUT_DEFAULTS: Mapping[str, int] = MappingProxyType(
    {
        "connect": 30,
        "keepalive": 30,
        "responseHeader": 60,
        "tlsHandshake": 10,
        "expectContinue": 1,
        "idleConn": 90,
    }
)

#: ``models.<id>.timeouts`` defaults: as a peer's, but no response-header
#: time-out (a local model may think long before its first byte).
MODEL_TIMEOUT_DEFAULTS: Mapping[str, int] = MappingProxyType(
    {**PEER_TIMEOUT_DEFAULTS, "responseHeader": 0}
)


@dataclass(frozen=True)
class PeerTimeouts:
    """``peers.<id>.timeouts`` (or ``models.<id>.timeouts``) in seconds; 0
    disables a timeout."""

    connect: int = 30
    keepalive: int = 30
    response_header: int = 60
    tls_handshake: int = 10
    expect_continue: int = 1
    idle_conn: int = 90


@dataclass(frozen=True)
class PeerCheck:
    """``peers.<id>.check``: how the peer's health is probed (seconds)."""

    interval: float = 5.0
    timeout: float = 2.0
    max_interval: float = 30.0


def _frozen(value: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class PeerConfig:
    """One ``peers.<id>`` entry, validated."""

    id: str
    #: base URL; its path is a prefix for every forwarded request path.
    proxy: str
    #: distinct model names in configured order.
    models: tuple[str, ...]
    #: sent to the peer instead of the client's credentials; never shown by repr.
    api_key: str = field(default="", repr=False)
    filters: ModelFilters = field(default_factory=ModelFilters)
    timeouts: PeerTimeouts = field(default_factory=PeerTimeouts)
    check: PeerCheck = field(default_factory=PeerCheck)

    def fqn(self, model: str) -> str:
        """The fully qualified routing name of one of this peer's models."""
        return fqn(self.id, model)


def fqn(peer_id: str, model: str) -> str:
    """``peer/model``.  Both parts may hold ``/``, so an FQN is compared whole,
    never split."""
    return f"{peer_id}/{model}"


@dataclass(frozen=True)
class PeerTarget:
    """Where a request for a peer model goes."""

    peer_id: str
    #: the model name as the peer knows it (sent upstream).
    model: str
    fqn: str
    url_base: str
    api_key: str = field(repr=False)
    filters: ModelFilters
    #: the name the request carried when it was resolved (FQN or bare name).
    requested: str = ""


@dataclass(frozen=True)
class Peers:
    """Every configured peer and the names that reach them."""

    peers: Mapping[str, PeerConfig] = field(default_factory=_frozen)
    #: FQN -> (peer id, model); FQNs claimed by two peers are absent.
    by_fqn: Mapping[str, tuple[str, str]] = field(init=False, repr=False, compare=False)
    #: bare name -> (peer id, model) for names exactly one peer provides.
    by_bare_name: Mapping[str, tuple[str, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        claims: dict[str, set[tuple[str, str]]] = {}
        bare: dict[str, set[tuple[str, str]]] = {}
        for peer in self.peers.values():
            for model in peer.models:
                claims.setdefault(peer.fqn(model), set()).add((peer.id, model))
                bare.setdefault(model, set()).add((peer.id, model))
        by_fqn = {name: next(iter(c)) for name, c in claims.items() if len(c) == 1}
        by_bare = {
            name: next(iter(c)) for name, c in bare.items() if len(c) == 1 and name not in claims
        }
        object.__setattr__(self, "by_fqn", MappingProxyType(by_fqn))
        object.__setattr__(self, "by_bare_name", MappingProxyType(by_bare))

    def __bool__(self) -> bool:
        return bool(self.peers)

    def resolve(self, name: str) -> PeerTarget | None:
        """The peer model ``name`` reaches (§4.2 step 4), or ``None``.

        An exact FQN wins over a bare name with the same text; a bare name is
        routable only when exactly one peer provides it.  The caller checks
        local models and aliases first: they win every collision."""
        found = self.by_fqn.get(name) or self.by_bare_name.get(name)
        if found is None:
            return None
        peer_id, model = found
        return self._target(peer_id, model, name)

    def replicas(self, name: str) -> list[PeerTarget]:
        """Every peer model listed under the bare name ``name``, in peer
        order: the replicas a request for ``name`` may go to (issue 15).
        A fully qualified name has none: it pins one peer."""
        out = []
        for peer_id in sorted(self.peers):
            peer = self.peers[peer_id]
            if name in peer.models and self.by_fqn.get(peer.fqn(name)) == (peer_id, name):
                out.append(self._target(peer_id, name, name))
        return out

    def _target(self, peer_id: str, model: str, requested: str) -> PeerTarget:
        peer = self.peers[peer_id]
        return PeerTarget(
            peer_id=peer_id,
            model=model,
            fqn=peer.fqn(model),
            url_base=peer.proxy,
            api_key=peer.api_key,
            filters=peer.filters,
            requested=requested,
        )

    def routable_names(self) -> frozenset[str]:
        """Every name :meth:`resolve` answers: FQNs and unique bare names."""
        return frozenset(self.by_fqn) | frozenset(self.by_bare_name)


# --- reading and validating ---


@dataclass
class _Reading:
    peers: dict[str, PeerConfig] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_timeouts(
    raw: Any,
    path: str,
    problems: list[str],
    defaults: Mapping[str, int] = PEER_TIMEOUT_DEFAULTS,
) -> PeerTimeouts:
    """A ``timeouts`` mapping at ``path``; ``defaults`` for what it omits
    (and for all of it when it is absent or not a mapping)."""
    values = dict(defaults)
    if raw is not None and not isinstance(raw, Mapping):
        problems.append(f"{path}: must be a mapping, got {describe(raw)}")
    for key in defaults:
        if not isinstance(raw, Mapping):
            break
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}.{key}: must be an integer, got {describe(value)}")
        elif value < 0:
            problems.append(f"{path}.{key}: must be >= 0, got {value}")
        else:
            values[key] = value
    return PeerTimeouts(
        connect=values["connect"],
        keepalive=values["keepalive"],
        response_header=values["responseHeader"],
        tls_handshake=values["tlsHandshake"],
        expect_continue=values["expectContinue"],
        idle_conn=values["idleConn"],
    )


def read_check(raw: Any, path: str, problems: list[str]) -> PeerCheck:
    """A ``check`` mapping at ``path``; the defaults for what it omits."""
    values = dict(CHECK_DEFAULTS)
    if raw is not None and not isinstance(raw, Mapping):
        problems.append(f"{path}: must be a mapping, got {describe(raw)}")
        raw = None
    for key in CHECK_DEFAULTS:
        value = None if raw is None else raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{path}.{key}: must be a number of seconds, got {describe(value)}")
        elif value < 0:
            problems.append(f"{path}.{key}: must be >= 0, got {value}")
        elif key == "timeout" and value == 0:
            problems.append(f"{path}.timeout: must be > 0, got 0")
        else:
            values[key] = float(value)
    return PeerCheck(
        interval=values["interval"],
        timeout=values["timeout"],
        max_interval=max(values["maxInterval"], values["interval"]),
    )


def _peer(peer_id: str, entry: Mapping[str, Any], reading: _Reading) -> PeerConfig | None:
    path = f"peers.{peer_id}"
    problems = reading.problems
    before = len(problems)
    reading.warnings.extend(unknown_key_warnings(entry, PEER_KEYS, path))
    proxy = entry.get("proxy")
    if proxy is None or proxy == "":
        problems.append(f"{path}.proxy: proxy is required")
    elif not isinstance(proxy, str):
        problems.append(f"{path}.proxy: must be a URL string, got {describe(proxy)}")
    elif (problem := url_problem(proxy)) is not None:
        problems.append(f"{path}.proxy: {problem}")
    api_key = entry.get("apiKey")
    if api_key is None:
        api_key = ""
    elif isinstance(api_key, Mapping | list):
        problems.append(f"{path}.apiKey: must be a string, got {describe(api_key)}")
    elif not isinstance(api_key, str):
        api_key = format_value(api_key)
    models_raw = entry.get("models")
    models: list[str] = []
    if models_raw is not None and not isinstance(models_raw, list):
        problems.append(f"{path}.models: must be a list of strings, got {describe(models_raw)}")
    else:
        for index, item in enumerate(models_raw or ()):
            if isinstance(item, Mapping | list) or item is None:
                problems.append(f"{path}.models[{index}]: must be a string, got {describe(item)}")
                continue
            name = item if isinstance(item, str) else format_value(item)
            if name.strip() == "":
                problems.append(f"{path}.models[{index}]: peer model names can not be blank")
            elif name not in models:
                models.append(name)
        if not models_raw:
            problems.append(f"{path}.models: peer models can not be empty")
    filters, filter_problems = parse_filters(entry.get("filters"), f"{path}.filters")
    problems.extend(filter_problems)
    timeouts = read_timeouts(entry.get("timeouts"), f"{path}.timeouts", problems)
    check = read_check(entry.get("check"), f"{path}.check", problems)
    if isinstance(entry.get("check"), Mapping):
        reading.warnings.extend(
            unknown_key_warnings(entry["check"], CHECK_DEFAULTS, f"{path}.check")
        )
    if len(problems) != before:
        return None
    return PeerConfig(
        id=peer_id,
        proxy=str(proxy),
        models=tuple(models),
        api_key=str(api_key),
        filters=filters,
        timeouts=timeouts,
        check=check,
    )


def _names_in(document: Mapping[str, Any], key: str) -> list[str]:
    section = document.get(key)
    return [str(name) for name in section] if isinstance(section, Mapping) else []


def _pin_names(document: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(profile, pin) for every pin written in the document."""
    out: list[tuple[str, str]] = []
    profiles = document.get("profiles")
    if isinstance(profiles, Mapping):
        for profile, entry in profiles.items():
            pins = entry.get("pins") if isinstance(entry, Mapping) else None
            if isinstance(pins, Mapping):
                out.extend((str(profile), str(pin)) for pin in pins)
    return out


def _namespace_problems(
    peers: Mapping[str, PeerConfig],
    document: Mapping[str, Any],
    model_ids: Collection[str],
    aliases: Mapping[str, str],
) -> list[str]:
    """FQNs must be unique and must not name anything else (§2.3)."""
    problems = []
    owners: dict[str, tuple[str, str]] = {}
    for peer_id in sorted(peers):
        for model in peers[peer_id].models:
            name = fqn(peer_id, model)
            other = owners.get(name)
            if other is not None:
                problems.append(
                    f"peers.{peer_id}.models: peer model name {name!r} is ambiguous between "
                    f"peers.{other[0]} model {other[1]!r} and peers.{peer_id} model {model!r}"
                )
            else:
                owners[name] = (peer_id, model)
    selectors = set(_names_in(document, "selectors"))
    pins = _pin_names(document)
    for name in sorted(owners):
        peer_id, _ = owners[name]
        where = f"peers.{peer_id}.models"
        if name in model_ids:
            problems.append(
                f"{where}: fully qualified peer model name {name!r} conflicts with model ID {name!r}"
            )
        if name in aliases:
            problems.append(
                f"{where}: fully qualified peer model name {name!r} conflicts with "
                f"an alias of model {aliases[name]!r}"
            )
        if name in selectors:
            problems.append(
                f"{where}: fully qualified peer model name {name!r} conflicts with selectors.{name}"
            )
        for profile, pin in pins:
            if pin == name:
                problems.append(
                    f"{where}: fully qualified peer model name {name!r} conflicts with "
                    f"profiles.{profile}.pins.{pin}"
                )
    return problems


def _read(
    document: Mapping[str, Any], model_ids: Collection[str], aliases: Mapping[str, str]
) -> _Reading:
    reading = _Reading()
    raw = document.get("peers")
    if raw is None:
        return reading
    if not isinstance(raw, Mapping):
        reading.problems.append(f"peers: must be a mapping, got {describe(raw)}")
        return reading
    for peer_id in sorted(raw, key=str):
        entry = raw[peer_id]
        peer_id = str(peer_id)
        if peer_id.strip() == "":
            reading.problems.append("peers: peer IDs can not be blank")
            continue
        if not isinstance(entry, Mapping):
            reading.problems.append(f"peers.{peer_id}: must be a mapping, got {describe(entry)}")
            continue
        peer = _peer(peer_id, entry, reading)
        if peer is not None:
            reading.peers[peer_id] = peer
    reading.problems.extend(_namespace_problems(reading.peers, document, model_ids, aliases))
    return reading


def read_peers(
    document: Mapping[str, Any], model_ids: Collection[str], aliases: Mapping[str, str]
) -> tuple[Peers, list[str], list[str]]:
    """The valid peers of ``document``, the problems found and the warnings.

    Problems are one line each naming its key path, the namespace rules
    included: an FQN may not be claimed twice nor equal a local model ID, an
    alias (``setParamsByID`` keys included, as they are in ``aliases``), a
    selector ID or a profile pin name.  Warnings name unknown keys under
    ``peers.<id>``, with a "did you mean" when close.  The peers are the valid
    ones, so the rest of the config can be checked against them."""
    reading = _read(document, model_ids, aliases)
    return Peers(MappingProxyType(reading.peers)), reading.problems, reading.warnings
