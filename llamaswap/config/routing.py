"""``routing:`` (and the legacy top-level ``groups:``/``matrix:``) -> a swap
planner, queue priorities and ``maxWait`` (llama-swap §2.4 in docs/design.md).

Reading and validating are one pass (:func:`read_routing`), so the two never
disagree; the loader keeps the result as ``Config.routing``.  Every problem
line names the key path where the user wrote the value.

Where we do better than llama-swap: ``fifo.priority`` keys that are aliases
count for their model (llama-swap validates them and then ignores them); a
group member given as an alias stands for its model; ``maxWait`` bounds how
long the fast path may starve a queued model.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from llamaswap.config.problems import describe
from llamaswap.scheduling.groups import DEFAULT_GROUP, Group, GroupPlanner
from llamaswap.scheduling.matrix import MatrixCompileError, MatrixPlanner, compile_matrix
from llamaswap.scheduling.planner import ISwapPlanner

DEFAULT_MAX_WAIT = 30.0
ROUTERS = ("group", "matrix")
SCHEDULERS = ("fifo",)
VAR_NAME = re.compile(r"[a-zA-Z0-9.-]{1,32}")

_ROUTER = "routing.router"
_SETTINGS = "routing.router.settings"
_FIFO = "routing.scheduler.settings.fifo"


def _no_groups() -> ISwapPlanner:
    """Every model in the implicit default group: one model runs at a time."""
    return GroupPlanner({})


@dataclass(frozen=True)
class RoutingConfig:
    """What the scheduler needs from ``routing:``; the defaults are those of
    a config without it."""

    #: the swap planner (``GroupPlanner`` or ``MatrixPlanner``).  Planners
    #: are behaviour without value equality, so configs compare by settings.
    planner: ISwapPlanner = field(default_factory=_no_groups, compare=False)
    #: real model id -> queue priority (higher first; absent = 0).
    priorities: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    #: seconds a queued request may wait before the fast path yields to it.
    max_wait: float = DEFAULT_MAX_WAIT
    #: ``"group"`` or ``"matrix"``: the router in use (the scheduler's name).
    router: str = "group"


def read_routing(
    document: Mapping[str, Any], model_ids: Collection[str], aliases: Mapping[str, str]
) -> tuple[RoutingConfig | None, list[str]]:
    """The routing of a document (``None`` when invalid) and its problems,
    one line each naming its key path."""
    return _read(document, model_ids, aliases)


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Reader:
    """Collects problems while reading; every accessor tolerates bad input."""

    def __init__(self, model_ids: Collection[str], aliases: Mapping[str, str]) -> None:
        self.models = frozenset(model_ids)
        self.aliases = aliases
        self.problems: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, parent: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
        """``parent[key]`` as a mapping; absent or null reads as empty."""
        value = parent.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.error(path, f"must be a mapping, got {describe(value)}")
            return {}
        return value

    def choice(
        self, parent: Mapping[str, Any], path: str, valid: tuple[str, ...], kind: str
    ) -> str:
        value = parent.get("use")
        if value is None or value == "":
            return valid[0]
        if value not in valid:
            self.error(path, f"unknown {kind} {describe(value)} (valid: {', '.join(valid)})")
            return valid[0]
        return str(value)

    def real_id(self, name: str) -> str | None:
        return name if name in self.models else self.aliases.get(name)


def _read(
    document: Mapping[str, Any], model_ids: Collection[str], aliases: Mapping[str, str]
) -> tuple[RoutingConfig | None, list[str]]:
    reader = _Reader(model_ids, aliases)
    routing = reader.mapping(document, "routing", "routing")
    router = reader.mapping(routing, "router", _ROUTER)
    use = reader.choice(router, f"{_ROUTER}.use", ROUTERS, "router")
    settings = reader.mapping(router, "settings", _SETTINGS)
    # presence as llama-swap decides it: a non-empty groups map, any matrix
    legacy = [
        key
        for key, present in (
            ("groups", bool(document.get("groups"))),
            ("matrix", document.get("matrix") is not None),
        )
        if present
    ]
    uses_block = bool(
        router.get("use") or settings.get("groups") or settings.get("matrix") is not None
    )

    planner: ISwapPlanner | None = None
    if legacy and uses_block:
        for key in legacy:
            reader.error(
                key,
                "the legacy top-level 'groups'/'matrix' keys cannot be combined with the "
                "'routing.router' block; move them under routing.router.settings",
            )
    elif len(legacy) == 2:
        reader.error(
            "matrix", "cannot be used together with the top-level 'groups'; use one or the other"
        )
    elif legacy == ["matrix"]:
        use = "matrix"
        planner = _matrix(reader, reader.mapping(document, "matrix", "matrix"), "matrix")
    elif legacy == ["groups"]:
        planner = _groups(reader, reader.mapping(document, "groups", "groups"), "groups")
    elif use == "matrix":
        # both may be defined under settings; `use` picks one and only it is read
        matrix_path = f"{_SETTINGS}.matrix"
        if settings.get("matrix") is None:
            reader.error(f"{_ROUTER}.use", f"is 'matrix' but {matrix_path} is not set")
        else:
            planner = _matrix(reader, reader.mapping(settings, "matrix", matrix_path), matrix_path)
    else:
        groups_path = f"{_SETTINGS}.groups"
        planner = _groups(reader, reader.mapping(settings, "groups", groups_path), groups_path)

    scheduler = reader.mapping(routing, "scheduler", "routing.scheduler")
    reader.choice(scheduler, "routing.scheduler.use", SCHEDULERS, "scheduler")
    scheduler_settings = reader.mapping(scheduler, "settings", "routing.scheduler.settings")
    fifo = reader.mapping(scheduler_settings, "fifo", _FIFO)
    priorities = _priorities(reader, reader.mapping(fifo, "priority", f"{_FIFO}.priority"))
    max_wait = _max_wait(reader, fifo)

    if reader.problems or planner is None:
        return None, reader.problems
    return RoutingConfig(planner, MappingProxyType(priorities), max_wait, use), []


def _flag(reader: _Reader, entry: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = entry.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        reader.error(f"{path}.{key}", f"must be true or false, got {describe(value)}")
        return default
    return value


def _groups(reader: _Reader, groups: Mapping[str, Any], path: str) -> GroupPlanner:
    built: dict[str, Group] = {}
    homes: dict[str, list[str]] = {}
    for group_id, entry in groups.items():
        group_path = f"{path}.{group_id}"
        if group_id == DEFAULT_GROUP:
            reader.error(group_path, f"the group id {_q(DEFAULT_GROUP)} is reserved")
            continue
        if entry is None:
            entry = {}
        if not isinstance(entry, Mapping):
            reader.error(group_path, f"must be a mapping, got {describe(entry)}")
            continue
        members = entry.get("members")
        if members is None:
            members = []
        elif not isinstance(members, list):
            reader.error(f"{group_path}.members", f"must be a list, got {describe(members)}")
            members = []
        seen: list[str] = []
        for index, member in enumerate(members):
            if not isinstance(member, str):
                reader.error(
                    f"{group_path}.members[{index}]", f"must be a string, got {describe(member)}"
                )
                continue
            model = reader.real_id(member)
            if model is None:
                reader.error(f"{group_path}.members", f"unknown model {_q(member)}")
            elif model in seen:
                reader.error(f"{group_path}.members", f"duplicate model member {_q(member)}")
            else:
                seen.append(model)
                homes.setdefault(model, []).append(group_id)
        built[group_id] = Group(
            members=tuple(seen),
            swap=_flag(reader, entry, "swap", group_path, True),
            exclusive=_flag(reader, entry, "exclusive", group_path, True),
            persistent=_flag(reader, entry, "persistent", group_path, False),
        )
    shared = {model: ids for model, ids in homes.items() if len(ids) > 1}
    for model, ids in shared.items():
        listed = ", ".join(_q(group_id) for group_id in ids)
        reader.error(path, f"model member {_q(model)} is used in multiple groups ({listed})")
    for model, ids in shared.items():
        for group_id in ids[1:]:  # keep the planner constructible: first group wins
            group = built[group_id]
            built[group_id] = Group(
                tuple(m for m in group.members if m != model),
                group.swap,
                group.exclusive,
                group.persistent,
            )
    default_members = tuple(sorted(reader.models - homes.keys()))
    built[DEFAULT_GROUP] = Group(members=default_members)
    return GroupPlanner(built)


def _matrix(reader: _Reader, matrix: Mapping[str, Any], path: str) -> MatrixPlanner | None:
    variables: dict[str, str] = {}
    for name, model in reader.mapping(matrix, "vars", f"{path}.vars").items():
        var_path = f"{path}.vars.{name}"
        if not VAR_NAME.fullmatch(name):
            reader.error(var_path, r"var name must match ^[a-zA-Z0-9.-]{1,32}$")
        elif not isinstance(model, str):
            reader.error(var_path, f"must be a model id, got {describe(model)}")
        elif model in reader.models:
            variables[name] = model
        elif model in reader.aliases:
            reader.error(
                var_path,
                f"{_q(model)} is an alias; vars must name a model id ({_q(reader.aliases[model])})",
            )
        else:
            reader.error(var_path, f"unknown model {_q(model)}")

    def resolve(identifier: str) -> str | None:
        if identifier in variables:
            return variables[identifier]
        return identifier if identifier in reader.models else None

    costs: dict[str, int] = {}
    cost_keys: dict[str, str] = {}
    for key, cost in reader.mapping(matrix, "evict_costs", f"{path}.evict_costs").items():
        model = resolve(key)
        if model is None:
            reader.error(f"{path}.evict_costs", f"unknown var or model {_q(key)}")
        elif not _is_int(cost) or cost <= 0:
            reader.error(
                f"{path}.evict_costs.{key}", f"must be a positive integer, got {describe(cost)}"
            )
        elif model in costs and costs[model] != cost:
            reader.error(
                f"{path}.evict_costs",
                f"{_q(cost_keys[model])} and {_q(key)} both set the cost of model {_q(model)}",
            )
        else:
            costs[model] = cost
            cost_keys[model] = key

    sets = reader.mapping(matrix, "sets", f"{path}.sets")
    if not sets:
        reader.error(f"{path}.sets", "must define at least one set")
        return None
    definitions: list[tuple[str, str]] = []
    for name, dsl in sets.items():
        if isinstance(dsl, str):
            definitions.append((name, dsl))
        else:
            reader.error(f"{path}.sets.{name}", f"must be a DSL string, got {describe(dsl)}")
    if len(definitions) != len(sets):
        return None
    try:
        program = compile_matrix(definitions, resolve)
    except MatrixCompileError as error:
        for problem in error.problems:
            reader.error(f"{path}.sets", problem)
        return None
    return MatrixPlanner(program, costs)


def _priorities(reader: _Reader, priority: Mapping[str, Any]) -> dict[str, int]:
    path = f"{_FIFO}.priority"
    result: dict[str, int] = {}
    given_as: dict[str, str] = {}
    for key, value in priority.items():
        model = reader.real_id(key)
        if model is None:
            reader.error(path, f"unknown model {_q(key)}")
        elif not _is_int(value):
            reader.error(f"{path}.{key}", f"must be an integer, got {describe(value)}")
        elif model in result and result[model] != value:
            reader.error(
                path,
                f"{_q(given_as[model])} and {_q(key)} both set the priority of model {_q(model)}",
            )
        else:
            result[model] = value
            given_as[model] = key
    return result


def _max_wait(reader: _Reader, fifo: Mapping[str, Any]) -> float:
    value = fifo.get("maxWait")
    if value is None:
        return DEFAULT_MAX_WAIT
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
        reader.error(f"{_FIFO}.maxWait", f"must be a number of seconds, got {describe(value)}")
        return DEFAULT_MAX_WAIT
    if value < 0:
        reader.error(f"{_FIFO}.maxWait", f"must be >= 0, got {value}")
        return DEFAULT_MAX_WAIT
    return float(value)
