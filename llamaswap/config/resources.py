"""``resources:`` (what the machine has) and ``models.<id>.resources`` (what a
model holds while loaded) -> the placement planner (docs/placement.md).

Without a top-level ``resources`` nothing changes: the routing planner is
used as configured.  With it, the routing planner becomes the base of a
:class:`~llamaswap.scheduling.placement.PlacementPlanner`: models run side by
side while their footprints fit, and groups or matrix sets still apply.
The implicit default group (models in no configured group) then neither
swaps nor is exclusive: only memory decides for those models.

A size is a number of bytes or a number with a unit: ``B``, ``KB``, ``KiB``,
``MB``, ``MiB``, ``GB``, ``GiB``, ``TB``, ``TiB``.  ``estimate`` reads the
GGUF file the model's command names (:mod:`.estimate`): a resource whose name
says host memory (``ram``, ``mem``, ``host``…) gets the part that stays on the
host, any other the device part; when that is impossible the footprint is the
whole resource (a warning says why).  A model without ``resources`` is
estimated when its command names a GGUF file and the machine has one device
(and at most one host resource); otherwise it needs the whole machine (it
runs alone; a warning says so).  ``auto`` as a machine's size is probed
(:mod:`.devices`): ``gpu<N>`` is NVIDIA device N's memory (NVML), a host name
is ``MemTotal`` less a reserve (:func:`~.devices.host_reserve`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from llamaswap.config.alternatives import (
    Alternatives,
    device_index,
    is_alternatives,
    split_alternatives,
    uses_device,
)
from llamaswap.config.devices import (
    DeviceError,
    DeviceLayer,
    gpu_index,
    host_reserve,
    system_devices,
)
from llamaswap.config.estimate import Estimate, EstimateError, estimate, gguf_path
from llamaswap.config.problems import describe
from llamaswap.config.routing import RoutingConfig
from llamaswap.scheduling.groups import DEFAULT_GROUP, GroupPlanner
from llamaswap.scheduling.placement import PlacementPlanner

__all__ = [
    "Footprint",
    "ResourcesConfig",
    "auto_total",
    "device_problems",
    "effective_footprints",
    "format_size",
    "parse_size",
    "placed_routing",
    "read_resources",
    "resources_json",
]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
_SIZE_HELP = "a size in bytes or with a unit (MB, MiB, GB, GiB)"

#: footprint sources shown by ``GET /api/resources``.
DECLARED, ESTIMATED, MEASURED, ASSUMED = "declared", "estimated", "measured", "assumed"


def parse_size(value: Any) -> int | None:
    """Bytes for an int or a ``"24GiB"``-style string; ``None`` if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if value >= 0 and value == value and value != float("inf") else None
    if not isinstance(value, str):
        return None
    match = _SIZE.fullmatch(value)
    if match is None:
        return None
    unit = _UNITS.get(match.group(2).lower())
    if unit is None:
        return None
    return int(float(match.group(1)) * unit)


def format_size(amount: int) -> str:
    """``amount`` bytes, in GiB/MiB when exact, for problem lines."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if amount and amount % factor == 0:
            return f"{amount // factor}{unit}"
    return f"{amount} bytes"


@dataclass(frozen=True)
class Footprint:
    """What a model holds of one resource while loaded."""

    bytes: int
    #: ``declared``, ``estimated``, ``measured``, or ``assumed`` (nothing
    #: declared or estimable: the whole resource).
    source: str


def _frozen(value: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class ResourcesConfig:
    """The machine's resources and every model's footprint."""

    #: resource name -> bytes the machine has.
    totals: Mapping[str, int] = field(default_factory=_frozen)
    #: model id -> resource name -> footprint (every model, every resource it holds).
    footprints: Mapping[str, Mapping[str, Footprint]] = field(default_factory=_frozen)
    #: model id -> bytes per resource held while asleep (models with ``sleep`` only).
    asleep: Mapping[str, Mapping[str, int]] = field(default_factory=_frozen)
    #: model id -> its device alternatives (``"gpu0|gpu1": 10GiB``), held on
    #: the one the planner picks, beside ``footprints`` (the fixed part).
    alternatives: Mapping[str, Alternatives] = field(default_factory=_frozen)

    def bytes_of(self, model: str) -> dict[str, int]:
        """Bytes per resource ``model`` holds while loaded."""
        return {name: fp.bytes for name, fp in self.footprints.get(model, {}).items()}


#: resource names that mean host memory; every other name is a device.
_HOST = re.compile(r"(ram|mem|memory|host|cpu|sys)", re.IGNORECASE)


def is_host(name: str) -> bool:
    """Whether resource ``name`` is host memory (``ram``, ``mem``, ``host``…):
    estimates put the weights and KV cache that stay off the device there."""
    return _HOST.match(name) is not None


def _estimated_share(name: str, found: Estimate) -> int:
    return found.host if is_host(name) else found.device


def _undeclared(
    argv: Sequence[str], totals: Mapping[str, int]
) -> tuple[dict[str, Footprint] | None, str]:
    """The estimated footprint of a model without ``resources`` whose command
    names a GGUF file, or ``None`` and why it needs the whole machine."""
    if gguf_path(argv) is None:
        return None, "not declared"
    try:
        found = estimate(argv)
    except EstimateError as exc:
        return None, f"not declared and not estimable ({exc})"
    devices = [name for name in totals if not is_host(name)]
    hosts = [name for name in totals if is_host(name)]
    held: dict[str, int] = {}
    if not devices:
        if len(hosts) != 1:
            return None, "not declared, and the estimate fits no single host resource"
        held[hosts[0]] = found.device + found.host
    else:
        if len(devices) != 1 or len(hosts) > 1:
            return None, "not declared, and the machine has several devices to choose from"
        held[devices[0]] = found.device
        if hosts:
            held[hosts[0]] = found.host
    for name, amount in held.items():
        if amount > totals[name]:
            return None, f"estimated {format_size(amount)} of {name}, more than the machine has"
    return {name: Footprint(amount, ESTIMATED) for name, amount in held.items()}, ""


def auto_total(name: str, devices: DeviceLayer) -> int:
    """The size of resource ``name`` given as ``auto``: NVIDIA device N's
    memory for ``gpu<N>``, ``MemTotal`` less :func:`host_reserve` for a host
    name.  :class:`ValueError` saying why when it cannot be probed."""
    index = gpu_index(name)
    try:
        if index is not None:
            return devices.gpu_total(index)
        if is_host(name):
            total = devices.host_total()
            return total - host_reserve(total)
    except DeviceError as exc:
        raise ValueError(f"'auto' cannot probe it ({exc}); give the size ({_SIZE_HELP})") from None
    raise ValueError(
        f"'auto' needs a probe-able name (gpu<N> for an NVIDIA device, ram for host "
        f"memory); give the size ({_SIZE_HELP})"
    )


def read_resources(
    document: Mapping[str, Any],
    commands: Mapping[str, Sequence[str]],
    devices: DeviceLayer | None = None,
) -> tuple[ResourcesConfig | None, list[str], list[str]]:
    """The resources of a document (``None`` without a top-level
    ``resources``), its problems and its warnings, one line each.
    ``commands`` maps every model id to its command's argv (for estimates);
    ``devices`` probes ``auto`` sizes (default: the real machine)."""
    model_ids = commands.keys()
    problems: list[str] = []
    warnings: list[str] = []
    models_doc = document.get("models") or {}
    raw = document.get("resources")
    if raw is None:
        for model_id in sorted(model_ids):
            entry = models_doc.get(model_id)
            declared = entry.get("resources") if isinstance(entry, Mapping) else None
            if isinstance(declared, Mapping):
                for name in declared:
                    problems.append(
                        f"models.{model_id}.resources.{name}: undefined resource {name!r} "
                        "(no top-level resources are defined)"
                    )
        return None, problems, warnings
    if not isinstance(raw, Mapping):
        return (
            None,
            [f"resources: must be a mapping of resource name to size, got {describe(raw)}"],
            [],
        )
    totals: dict[str, int] = {}
    for name, value in raw.items():
        path = f"resources.{name}"
        if value == "auto":
            try:
                totals[str(name)] = auto_total(str(name), devices or system_devices())
            except ValueError as exc:
                problems.append(f"{path}: {exc}")
            continue
        size = parse_size(value)
        if size is None:
            problems.append(f"{path}: must be {_SIZE_HELP}, got {describe(value)}")
        else:
            totals[str(name)] = size
    footprints: dict[str, Mapping[str, Footprint]] = {}
    alternatives: dict[str, Alternatives] = {}
    for model_id in sorted(model_ids):
        entry = models_doc.get(model_id)
        declared = entry.get("resources") if isinstance(entry, Mapping) else None
        path = f"models.{model_id}.resources"
        if declared is None:
            estimated, why = _undeclared(commands[model_id], totals)
            if estimated is not None:
                footprints[model_id] = MappingProxyType(estimated)
                continue
            warnings.append(f"{path}: {why}; the model needs the whole machine (it runs alone)")
            footprints[model_id] = MappingProxyType(
                {name: Footprint(total, ASSUMED) for name, total in totals.items()}
            )
            continue
        if not isinstance(declared, Mapping):
            problems.append(
                f"{path}: must be a mapping of resource name to size, got {describe(declared)}"
            )
            continue
        held: dict[str, Footprint] = {}
        found: Estimate | str | None = None  # the model's estimate, or why there is none
        for name, value in declared.items():
            key = f"{path}.{name}"
            if is_alternatives(str(name)):
                if model_id in alternatives:
                    problems.append(
                        f"{key}: a model names at most one set of device alternatives "
                        f"(it has {alternatives[model_id].key!r} too)"
                    )
                    continue
                if found is None and value == "estimate":
                    try:
                        found = estimate(commands[model_id])
                    except EstimateError as exc:
                        found = str(exc)
                chosen = _read_alternatives(str(name), value, key, raw, totals, found, problems)
                if chosen is not None:
                    alternatives[model_id] = chosen
                continue
            if name not in raw:
                defined = ", ".join(str(n) for n in raw) or "none"
                problems.append(f"{key}: undefined resource {name!r} (defined: {defined})")
                continue
            if name not in totals:
                continue  # its total is wrong, reported above
            if value == "estimate":
                if found is None:
                    try:
                        found = estimate(commands[model_id])
                    except EstimateError as exc:
                        found = str(exc)
                if isinstance(found, str):
                    warnings.append(
                        f"{key}: cannot estimate ({found}); the model holds the whole "
                        f"resource ({format_size(totals[name])})"
                    )
                    held[name] = Footprint(totals[name], ASSUMED)
                    continue
                amount = _estimated_share(name, found)
                if amount > totals[name]:
                    problems.append(
                        f"{key}: estimated {format_size(amount)} from {found.path}, more than "
                        f"the machine has ({name}: {format_size(totals[name])})"
                    )
                else:
                    held[name] = Footprint(amount, ESTIMATED)
                continue
            size = parse_size(value)
            if size is None:
                problems.append(f"{key}: must be {_SIZE_HELP} or 'estimate', got {describe(value)}")
            elif size > totals[name]:
                problems.append(
                    f"{key}: {format_size(size)} is more than the machine has "
                    f"({name}: {format_size(totals[name])})"
                )
            else:
                held[name] = Footprint(size, DECLARED)
        footprints[model_id] = MappingProxyType(held)
        chosen = alternatives.get(model_id)
        if chosen is not None and chosen.bytes <= max(totals[n] for n in chosen.names):
            # beside the model's fixed share of the same device
            room = [totals[n] - (held[n].bytes if n in held else 0) for n in chosen.names]
            if chosen.bytes > max(room):
                problems.append(
                    f"{path}.{chosen.key}: {format_size(chosen.bytes)} does not fit beside "
                    f"the model's own share of any of them"
                )
    asleep = _asleep_footprints(models_doc, footprints, totals, problems)
    if problems:
        return None, problems, warnings
    return (
        ResourcesConfig(
            MappingProxyType(totals),
            MappingProxyType(footprints),
            MappingProxyType(asleep),
            MappingProxyType(alternatives),
        ),
        [],
        warnings,
    )


def device_problems(models: Mapping[str, Any], resources: ResourcesConfig | None) -> list[str]:
    """``${DEVICE}`` in the ``cmd`` or ``env`` of a model (``models``: id ->
    :class:`~llamaswap.config.model.ModelConfig`) without device alternatives."""
    problems = []
    for model_id in sorted(models):
        model = models[model_id]
        if resources is not None and model_id in resources.alternatives:
            continue
        for key, values in (("cmd", model.argv), ("env", [v for _, v in model.env])):
            if uses_device(values):
                problems.append(
                    f"models.{model_id}.{key}: ${{DEVICE}} needs device alternatives in "
                    f'models.{model_id}.resources (e.g. "gpu0|gpu1": 10GiB)'
                )
    return problems


def _read_alternatives(
    key: str,
    value: Any,
    path: str,
    raw: Mapping[str, Any],
    totals: Mapping[str, int],
    found: Estimate | str | None,
    problems: list[str],
) -> Alternatives | None:
    """One ``"gpu0|gpu1": size`` entry, or ``None`` with its problems added:
    every alternative defined and ending in its index, the size (or the
    device part of the estimate) within at least one of them."""
    names = split_alternatives(key)
    wrong = len(problems)
    for name in names:
        if name not in raw:
            defined = ", ".join(str(n) for n in raw) or "none"
            problems.append(f"{path}: undefined resource {name!r} (defined: {defined})")
        elif device_index(name) is None:
            problems.append(
                f"{path}: {name!r} has no device index (an alternative's name ends in "
                "its index, e.g. gpu1)"
            )
    if len(set(names)) != len(names):
        problems.append(f"{path}: names a resource twice")
    if len(problems) > wrong or any(name not in totals for name in names):
        return None
    if value == "estimate":
        if not isinstance(found, Estimate):
            problems.append(f"{path}: cannot estimate ({found}); give the size")
            return None
        size, source, what = found.device, ESTIMATED, f"estimated {format_size(found.device)}"
    else:
        parsed = parse_size(value)
        if parsed is None:
            problems.append(f"{path}: must be {_SIZE_HELP} or 'estimate', got {describe(value)}")
            return None
        size, source, what = parsed, DECLARED, format_size(parsed)
    largest = max(totals[name] for name in names)
    if size > largest:
        machine = ", ".join(f"{name}: {format_size(totals[name])}" for name in names)
        problems.append(f"{path}: {what} is more than any of them has ({machine})")
        return None
    return Alternatives(key, names, size, source)


def _asleep_footprints(
    models_doc: Mapping[str, Any],
    footprints: Mapping[str, Mapping[str, Footprint]],
    totals: Mapping[str, int],
    problems: list[str],
) -> dict[str, Mapping[str, int]]:
    """What each model with ``sleep`` holds while asleep: its
    ``sleep.resources``, else its host memory as when loaded (nothing on devices)."""
    asleep: dict[str, Mapping[str, int]] = {}
    for model_id, held in footprints.items():
        entry = models_doc.get(model_id)
        sleep = entry.get("sleep") if isinstance(entry, Mapping) else None
        if not sleep:
            continue
        declared = sleep.get("resources") if isinstance(sleep, Mapping) else None
        if not isinstance(declared, Mapping):
            asleep[model_id] = MappingProxyType(
                {name: fp.bytes for name, fp in held.items() if is_host(name)}
            )
            continue
        amounts: dict[str, int] = {}
        for name, value in declared.items():
            key = f"models.{model_id}.sleep.resources.{name}"
            size = parse_size(value)
            if name not in totals:
                problems.append(f"{key}: undefined resource {name!r}")
            elif size is None:
                problems.append(f"{key}: must be {_SIZE_HELP}, got {describe(value)}")
            else:
                amounts[str(name)] = size
        asleep[model_id] = MappingProxyType(amounts)
    return asleep


def placed_routing(
    routing: RoutingConfig, resources: ResourcesConfig
) -> tuple[RoutingConfig, list[str]]:
    """``routing`` with its planner wrapped in the placement planner, and the
    problems: a model that cannot fit beside what persistent groups may hold
    (those are never evicted for memory)."""
    base = routing.planner
    pinned: frozenset[str] = frozenset()
    problems: list[str] = []
    if isinstance(base, GroupPlanner):
        groups = dict(base.groups)
        default = groups[DEFAULT_GROUP]
        groups[DEFAULT_GROUP] = replace(default, swap=False, exclusive=False)
        base = GroupPlanner(groups)
        persistent = {
            group_id: group
            for group_id, group in groups.items()
            if group.persistent and group_id != DEFAULT_GROUP
        }
        pinned = frozenset(m for group in persistent.values() for m in group.members)
        for model_id in resources.footprints:
            home = base.group_of(model_id)
            for name, total in resources.totals.items():
                held = 0
                for group_id, group in persistent.items():
                    if group_id == home:
                        continue
                    amounts = [
                        resources.footprints[m][name].bytes
                        for m in group.members
                        if name in resources.footprints.get(m, {})
                    ]
                    held += (max(amounts) if group.swap else sum(amounts)) if amounts else 0
                needs = resources.footprints[model_id].get(name)
                if needs is None or not held or needs.bytes + held <= total:
                    continue
                if needs.source == ASSUMED:
                    problems.append(
                        f"models.{model_id}.resources: needs the whole machine (nothing "
                        f"declared or estimable), but persistent groups may hold "
                        f"{format_size(held)} of {name}; declare its footprint"
                    )
                    break
                problems.append(
                    f"models.{model_id}.resources.{name}: {format_size(needs.bytes)} does "
                    f"not fit beside the {format_size(held)} persistent groups may hold "
                    f"({name}: {format_size(total)})"
                )
    planner = PlacementPlanner(
        resources.totals,
        {model: resources.bytes_of(model) for model in resources.footprints},
        base,
        pinned,
        asleep=resources.asleep,
        alternatives={
            model: (choice.names, choice.bytes) for model, choice in resources.alternatives.items()
        },
    )
    return replace(routing, planner=planner), problems


#: process states in which a model holds its footprint.
HOLDING_STATES = frozenset({"starting", "ready", "stopping"})


def effective_footprints(
    resources: ResourcesConfig, measured: Callable[[str], Mapping[str, int]] | None = None
) -> dict[str, dict[str, Footprint]]:
    """Every model's footprint as planning sees it: the larger of the
    declared (or estimated) one and the measured one (``measured(model)``:
    bytes per resource), capped at the machine's total; ``source`` is
    ``measured`` where the measurement wins."""
    result: dict[str, dict[str, Footprint]] = {}
    for model, held in resources.footprints.items():
        seen = measured(model) if measured is not None else {}
        mine = {}
        for name, footprint in held.items():
            amount = min(seen.get(name, 0), resources.totals.get(name, 0))
            mine[name] = Footprint(amount, MEASURED) if amount > footprint.bytes else footprint
        result[model] = mine
    return result


def resources_json(
    resources: ResourcesConfig | None,
    state_of: Callable[[str], str],
    measured: Callable[[str], Mapping[str, int]] | None = None,
    free: Mapping[str, int | None] | None = None,
    device_of: Callable[[str], str | None] | None = None,
) -> dict[str, Any]:
    """``GET /api/resources``: every resource's total, reserved bytes
    (footprints of models starting, ready or stopping) and free bytes
    (``free``: what a probe last reported; null without one) and every
    model's footprint with its source (``measured``: see
    :func:`effective_footprints`).  Empty without a top-level ``resources``.

    A model with device alternatives shows, while it holds its footprint,
    the resource it was placed on (``device_of(model)``) with ``"of"``: the
    alternatives key; otherwise the alternatives key itself."""
    if resources is None:
        return {"resources": {}, "models": {}}
    footprints = effective_footprints(resources, measured)
    reserved = dict.fromkeys(resources.totals, 0)
    for model, held in footprints.items():
        if state_of(model) in HOLDING_STATES:
            for name, footprint in held.items():
                reserved[name] += footprint.bytes
        elif state_of(model) == "sleeping":
            for name, amount in resources.asleep.get(model, {}).items():
                reserved[name] += amount
    models: dict[str, dict[str, dict[str, Any]]] = {
        model: {name: {"bytes": fp.bytes, "source": fp.source} for name, fp in held.items()}
        for model, held in footprints.items()
    }
    for model, choice in resources.alternatives.items():
        device = device_of(model) if device_of is not None else None
        shown: dict[str, Any] = {"bytes": choice.bytes, "source": choice.source}
        if state_of(model) in HOLDING_STATES and device is not None and device in choice.names:
            reserved[device] += choice.bytes
            base = models[model].get(device)
            if base is not None:  # a fixed share of the same resource
                shown["bytes"] += base["bytes"]
            seen = measured(model) if measured is not None else {}
            # measured on any alternative: the same on the chosen one
            most = min(max(seen.get(n, 0) for n in choice.names), resources.totals[device])
            if most > shown["bytes"]:
                reserved[device] += most - shown["bytes"]
                shown = {"bytes": most, "source": MEASURED}
            models[model][device] = {**shown, "of": choice.key}
        else:
            models[model][choice.key] = shown
    probed = free or {}
    return {
        "resources": {
            name: {"total": total, "reserved": reserved[name], "free": probed.get(name)}
            for name, total in resources.totals.items()
        },
        "models": models,
    }
