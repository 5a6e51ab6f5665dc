"""One ``models.<id>`` entry -> :class:`ModelConfig`: comment stripping,
macro and ``${PORT}`` expansion, typed fields, and the alias namespace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from llamaswap.config.alternatives import DEVICE_MACRO
from llamaswap.config.commands import split_command, strip_comment_lines
from llamaswap.config.fields import Fields, Report
from llamaswap.config.filters import parse_filters
from llamaswap.config.macros import (
    MODEL_ID,
    PID,
    PORT,
    Macro,
    substitute,
    substitute_keys,
    unresolved,
)
from llamaswap.config.model import DEFAULT_CONCURRENCY_LIMIT, ModelConfig, freeze
from llamaswap.config.peers import MODEL_TIMEOUT_DEFAULTS, read_timeouts
from llamaswap.config.problems import url_problem
from llamaswap.config.sleep import read_sleep

DEFAULT_PROXY = "http://localhost:${PORT}"
DEFAULT_CHECK_ENDPOINT = "/health"
#: the model behind the ComfyUI endpoints needs room for many websocket polls,
#: and its websocket upgrades never start it.
COMFYUI_MODEL_ID = "comfyui_auto"
COMFYUI_MIN_CONCURRENCY = 50
MODEL_KEYS = frozenset(
    {
        "cmd",
        "cmdStop",
        "proxy",
        "aliases",
        "env",
        "checkEndpoint",
        "ttl",
        "unloadTimeout",
        "unlisted",
        "useModelName",
        "name",
        "description",
        "concurrencyLimit",
        "filters",
        "macros",
        "metadata",
        "sendLoadingState",
        "timeouts",
        "compat",
        "capabilities",
        "healthCheckTimeout",
        "resources",
        "files",
        "prewarm",
        "sleep",
        "promptCache",
    }
)


@dataclass(frozen=True)
class ModelDefaults:
    """The global values a model entry falls back on."""

    global_ttl: int
    unload_timeout: int


def check_capabilities(model_id: str, caps: Any, report: Report) -> None:
    if caps is None:
        return
    path = f"models.{model_id}.capabilities"
    if not isinstance(caps, dict):
        report.error(path, "must be a mapping")
        return
    for key in ("in", "out"):
        for value in caps.get(key) or []:
            if value not in ("text", "audio", "image"):
                report.error(
                    f"{path}.{key}", f"unknown modality {value!r} (valid: text, audio, image)"
                )
    context = caps.get("context", 0)
    if not isinstance(context, int) or context < 0:
        report.error(f"{path}.context", f"must be an integer >= 0, got {context!r}")


def prepare_model(entry: dict[str, Any]) -> dict[str, Any]:
    """Detach the macro declarations, drop command comment lines before any
    expansion (a ``${PORT}`` in a comment allocates nothing) and inject the
    default proxy so its ``${PORT}`` takes part in expansion."""
    prepared = {key: value for key, value in entry.items() if key != "macros"}
    for key in ("cmd", "cmdStop"):
        if isinstance(prepared.get(key), str):
            prepared[key] = strip_comment_lines(prepared[key])
    if prepared.get("proxy") is None:
        prepared["proxy"] = DEFAULT_PROXY
    return prepared


def expand_model(
    model_id: str,
    entry: dict[str, Any],
    scope: Sequence[Macro],
    next_port: int,
    report: Report,
) -> tuple[dict[str, Any], int | None]:
    """Expand one model's macros, then ``${PORT}`` if its cmd uses it; report
    whatever stays unresolved.  Returns the entry and the port it took."""
    path = f"models.{model_id}"
    entry = _expand_set_params_keys(substitute(entry, scope), scope, path, report)
    port = None
    cmd = entry.get("cmd")
    if isinstance(cmd, str) and "${" + PORT + "}" in cmd:
        port = next_port
        port_scope = (Macro(PORT, port),)
        entry = _expand_set_params_keys(substitute(entry, port_scope), port_scope, path, report)
    for key, value in entry.items():
        for value_path, macro in unresolved(value, f"{path}.{key}"):
            if key in ("cmd", "env") and macro == DEVICE_MACRO:
                continue  # chosen per start (device alternatives; checked with resources)
            if not (key == "cmdStop" and macro == "${" + PID + "}"):
                report.error(value_path, unresolved_message(macro, in_model=True))
    for key in _set_params_by_id(entry):
        for _, macro in unresolved(key, ""):
            report.error(
                f"{path}.filters.setParamsByID",
                f'{unresolved_message(macro, in_model=True)} in key "{key}"',
            )
    return entry, port


def _set_params_by_id(entry: Mapping[str, Any]) -> dict[str, Any]:
    filters = entry.get("filters")
    params = filters.get("setParamsByID") if isinstance(filters, dict) else None
    return params if isinstance(params, dict) else {}


def _expand_set_params_keys(
    entry: dict[str, Any], macros: Sequence[Macro], path: str, report: Report
) -> dict[str, Any]:
    """``filters.setParamsByID`` keys are the one place where keys expand."""
    params = _set_params_by_id(entry)
    if not params:
        return entry
    expanded, problems = substitute_keys(params, macros)
    for problem in problems:
        report.error(f"{path}.filters.setParamsByID", problem)
    return {**entry, "filters": {**entry["filters"], "setParamsByID": expanded}}


def unresolved_message(macro: str, in_model: bool) -> str:
    name = macro[2:-1]
    if name.startswith("env."):
        return f"unresolved environment macro '{macro}'"
    if name == PID:
        return f"macro '{macro}' is only available in cmdStop"
    if name == PORT and in_model:
        return "uses ${PORT} but cmd does not - ${PORT} is only available when used in cmd"
    if name in (PORT, MODEL_ID) and not in_model:
        return f"macro '{macro}' is only available inside models"
    return f"unknown macro '{macro}'"


def model_config(
    model_id: str, entry: dict[str, Any], port: int | None, globals_: ModelDefaults, report: Report
) -> ModelConfig:
    path = f"models.{model_id}"
    fields = Fields(entry, path, report)
    cmd = strip_comment_lines(fields.string("cmd"))
    argv = _command(cmd, f"{path}.cmd", report)
    cmd_stop = strip_comment_lines(fields.string("cmdStop"))
    _command(cmd_stop, f"{path}.cmdStop", report)
    proxy = fields.string("proxy")
    if not report.is_flagged(f"{path}.proxy"):
        problem = url_problem(proxy)
        if problem:
            report.error(f"{path}.proxy", problem)

    ttl = fields.integer("ttl", -1)
    if ttl == -1:
        ttl = globals_.global_ttl
    elif ttl < 0:
        report.error(f"{path}.ttl", f"must be >= 0, got {ttl}")
    concurrency_limit = (
        fields.integer("concurrencyLimit", 0, minimum=0) or DEFAULT_CONCURRENCY_LIMIT
    )
    if model_id == COMFYUI_MODEL_ID:
        concurrency_limit = max(concurrency_limit, COMFYUI_MIN_CONCURRENCY)
    filters, problems = parse_filters(entry.get("filters"), f"{path}.filters")
    report.errors.extend(problems)
    timeouts = None
    if entry.get("timeouts") is not None:
        timeouts = read_timeouts(
            entry["timeouts"], f"{path}.timeouts", report.errors, MODEL_TIMEOUT_DEFAULTS
        )
    return ModelConfig(
        id=model_id,
        argv=argv,
        cmd=cmd,
        cmd_stop=cmd_stop,
        proxy=proxy,
        env=_env(fields),
        aliases=_aliases(fields),
        check_endpoint=_check_endpoint(fields),
        ttl=ttl,
        unload_timeout=fields.integer("unloadTimeout", 0, minimum=0) or globals_.unload_timeout,
        unlisted=bool(fields.boolean("unlisted", False)),
        use_model_name=fields.string("useModelName"),
        name=fields.string("name").strip(),
        description=fields.string("description").strip(),
        metadata=MappingProxyType(fields.mapping("metadata")),
        concurrency_limit=concurrency_limit,
        send_loading_state=fields.boolean("sendLoadingState", None),
        port=port,
        filters=filters,
        capabilities=_capabilities(entry.get("capabilities")),
        ignore_websockets=model_id == COMFYUI_MODEL_ID or _ignores_websockets(entry.get("compat")),
        timeouts=timeouts,
        files=fields.strings("files"),
        prewarm=bool(fields.boolean("prewarm", True)),
        sleep=read_sleep(entry.get("sleep"), f"{path}.sleep", report),
        prompt_cache=_prompt_cache(fields, argv),
    )


def _prompt_cache(fields: Fields, argv: tuple[str, ...]) -> bool:
    """``promptCache``: only for a model llamaswap starts (it has a ``cmd``)."""
    enabled = bool(fields.boolean("promptCache", False))
    if enabled and not argv and not fields.report.is_flagged(f"{fields.path}.cmd"):
        fields.report.error(f"{fields.path}.promptCache", "needs a cmd that starts llama-server")
        return False
    if enabled and argv and not any("llama" in word.lower() for word in argv):
        fields.report.warn(
            f"{fields.path}.promptCache",
            "for llama-server only, and the command does not look like one "
            "(--slot-save-path is added to it)",
        )
    return enabled


def _capabilities(raw: Any) -> Mapping[str, Any]:
    """``capabilities`` read-only (its problems are reported with the sections)."""
    return freeze(raw) if isinstance(raw, dict) else MappingProxyType({})


def _ignores_websockets(compat: Any) -> bool:
    return isinstance(compat, dict) and compat.get("ignoreWebsockets") is True


def _command(cmd: str, path: str, report: Report) -> tuple[str, ...]:
    """The argv of ``cmd``; empty is allowed here (it fails at start)."""
    if report.is_flagged(path):
        return ()
    try:
        return split_command(cmd)
    except ValueError as e:
        report.error(path, f"cannot parse command: {e}")
        return ()


def _env(fields: Fields) -> tuple[tuple[str, str], ...]:
    pairs = []
    for index, item in enumerate(fields.strings("env")):
        name, equals, value = item.partition("=")
        if not equals or not name:
            fields.report.error(f"{fields.path}.env[{index}]", f"must be KEY=VALUE, got {item!r}")
        else:
            pairs.append((name, value))
    return tuple(pairs)


def _aliases(fields: Fields) -> tuple[str, ...]:
    aliases = fields.strings("aliases")
    if "" in aliases:
        fields.report.warn(f"{fields.path}.aliases", "empty alias ignored")
    return tuple(alias for alias in aliases if alias)


def _check_endpoint(fields: Fields) -> str | None:
    endpoint = fields.string("checkEndpoint", DEFAULT_CHECK_ENDPOINT).strip()
    if endpoint == "none":
        return None
    if endpoint == "":
        return "/"  # llama-swap then probes the proxy URL itself
    if not endpoint.startswith("/"):
        fields.report.error(
            f"{fields.path}.checkEndpoint", f'must start with "/" or be "none", got {endpoint!r}'
        )
        return DEFAULT_CHECK_ENDPOINT
    return endpoint


def register_aliases(
    models: dict[str, ModelConfig], documents: Mapping[str, Any], report: Report
) -> tuple[dict[str, ModelConfig], dict[str, str]]:
    """Check that aliases are globally unique and add ``setParamsByID`` keys
    other than the model's own id as aliases (llama-swap does the same)."""
    aliases: dict[str, str] = {}
    for model in models.values():
        path = f"models.{model.id}.aliases"
        for alias in model.aliases:
            owner = aliases.get(alias)
            if alias in models and alias != model.id:
                report.error(path, f'alias "{alias}" is already a model id')
            elif owner == model.id:
                report.error(path, f'duplicate alias "{alias}"')
            elif owner is not None:
                report.error(path, f'duplicate alias "{alias}" (also used by model "{owner}")')
            elif alias != model.id:
                aliases[alias] = model.id
    for model_id, model in list(models.items()):
        path = f"models.{model_id}.filters.setParamsByID"
        extra = []
        for key in _set_params_by_id(documents[model_id]):
            owner = aliases.get(key)
            if key == model_id or owner == model_id:
                continue
            if key in models:
                report.error(path, f'key "{key}" conflicts with an existing model id')
            elif owner is not None:
                report.error(path, f'duplicate alias "{key}" (also used by model "{owner}")')
            else:
                aliases[key] = model_id
                extra.append(key)
        if extra:
            models[model_id] = replace(model, aliases=(*model.aliases, *extra))
    return models, aliases
