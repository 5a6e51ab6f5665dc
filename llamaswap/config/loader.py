"""YAML text -> frozen, validated :class:`Config` (llama-swap §2.1, §2.2, §2.7 in docs/design.md).

Every section is parsed here, once, into the typed values ``Config`` holds
(models, filters, apiKeys, peers, profiles and selectors, routing, the
top-level settings); nothing else reads the document.

Every problem is collected and reported at once as one line naming its key
path.  Three stages stop early because later ones would only report echoes of
their problems: ``${env.X}`` substitution, YAML parsing, and the shape of the
document (macro declarations, ``models`` entries).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from llamaswap.config.browser import read_allowed_hosts, read_allowed_origins
from llamaswap.config.entries import (
    MODEL_KEYS,
    ModelDefaults,
    check_capabilities,
    expand_model,
    model_config,
    prepare_model,
    register_aliases,
    unresolved_message,
)
from llamaswap.config.fields import Fields, Report
from llamaswap.config.goyaml import parse_yaml, visible_text
from llamaswap.config.keys import api_key_strings, validate_api_keys
from llamaswap.config.macros import (
    EnvMacroError,
    Macro,
    model_scope,
    read_macros,
    substitute,
    substitute_env,
    unresolved,
)
from llamaswap.config.merge import config_sources, merge_documents
from llamaswap.config.model import (
    Config,
    ConfigError,
    ModelConfig,
)
from llamaswap.config.peers import Peers, read_peers
from llamaswap.config.problems import describe, in_file, missing_server_message
from llamaswap.config.profiles import ProfilesConfig, planner_coexistence, read_profiles
from llamaswap.config.promptcache import read_prompt_cache
from llamaswap.config.resources import (
    ResourcesConfig,
    device_problems,
    placed_routing,
    read_resources,
)
from llamaswap.config.routing import RoutingConfig, read_routing
from llamaswap.config.settings import (
    StoreConfig,
    read_capture_buffer,
    read_ignore_paths,
    read_include_aliases,
    read_log_time_format,
    read_log_to_stdout,
    read_max_request_body_size,
    read_performance_disabled,
    read_preload,
    read_session_headers,
    read_store,
)

DEFAULT_HEALTH_CHECK_TIMEOUT = 120
MIN_HEALTH_CHECK_TIMEOUT = 15
DEFAULT_START_PORT = 5800
DEFAULT_UNLOAD_TIMEOUT = 10
LOG_LEVELS = ("debug", "info", "warn", "error")

#: top-level keys; those without semantics here are read by later features.
TOP_LEVEL_KEYS = frozenset(
    {
        "healthCheckTimeout",
        "logLevel",
        "logTimeFormat",
        "logToStdout",
        "logRequests",
        "metricsMaxInMemory",
        "captureBuffer",
        "maxRequestBodySize",
        "store",
        "ui",
        "performance",
        "startPort",
        "sendLoadingState",
        "includeAliasesInList",
        "globalTTL",
        "unloadTimeout",
        "macros",
        "apiKeys",
        "allowedHosts",
        "allowedOrigins",
        "upstream",
        "hooks",
        "profiles",
        "selectors",
        "models",
        "peers",
        "routing",
        "groups",
        "matrix",
        "compat",
        "resources",
        "promptCacheDir",
        "promptCacheMaxBytes",
    }
)


def load_config(path: str) -> Config:
    """Read and load the config file at ``path``."""
    return _build(_parse(_read(path), os.environ, path))


def load_config_sources(
    config: str | None, config_dir: str | None, environ: Mapping[str, str] | None = None
) -> Config:
    """Load ``config`` merged with the ``*.yaml`` files of ``config_dir``
    (llama-swap's ``-config`` + ``-config-dir`` rules)."""
    try:
        files = config_sources(config, config_dir)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    env = os.environ if environ is None else environ
    if config and not config_dir:
        return _build(_parse(_read(config), env, config))
    documents = []
    for path in files:
        text = _read(path)
        documents.append((path, _parse(text, env, path) if text.strip() else None))
    try:
        merged = merge_documents(documents)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    return _build(merged)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: cannot read config: not UTF-8 text ({e.reason})"]) from None


def load_config_text(text: str, environ: Mapping[str, str] | None = None) -> Config:
    """Load a config from YAML ``text``; ``environ`` (default ``os.environ``)
    supplies ``${env.X}``.  Raises :class:`ConfigError`."""
    return _build(_parse(text, os.environ if environ is None else environ, None))


def _parse(text: str, environ: Mapping[str, str], source: str | None) -> dict[str, Any]:
    """``${env.X}`` substituted, then the YAML parsed; problems of these two
    stages name ``source`` (the file) when there is one."""
    try:
        text = substitute_env(text, environ, visible_text(text))
    except EnvMacroError as e:
        raise ConfigError(in_file(source, e.problems)) from None
    try:
        return parse_yaml(text)
    except ConfigError as e:
        raise ConfigError(in_file(source, e.problems)) from None


# --- building the Config ---


def _build(raw: dict[str, Any]) -> Config:
    report = Report()
    report.unknown_keys(raw, TOP_LEVEL_KEYS, "")
    top = Fields(raw, "", report)
    global_macros, problems = read_macros(top.mapping("macros"), "macros")
    report.errors.extend(problems)
    models_raw = top.mapping("models")
    model_macros: dict[str, tuple[Macro, ...]] = {}
    prepared: dict[str, dict[str, Any]] = {}
    for model_id in sorted(models_raw):
        path = f"models.{model_id}"
        entry = models_raw[model_id]
        if not isinstance(entry, dict):
            report.error(path, f"must be a mapping, got {describe(entry)}")
            continue
        report.unknown_keys(entry, MODEL_KEYS, path)
        if entry.get("cmd") in (None, "") and entry.get("proxy") in (None, ""):
            # Else the default proxy's ${PORT} would be the (puzzling) complaint.
            report.error(path, missing_server_message(entry, MODEL_KEYS))
        local = Fields(entry, path, report).mapping("macros")
        model_macros[model_id], problems = read_macros(local, f"{path}.macros")
        report.errors.extend(problems)
        prepared[model_id] = prepare_model(entry)
    if report.errors:
        raise ConfigError(report.errors, report.warnings)

    # Global macros apply to every top-level value except the models and the
    # declarations themselves.
    expanded = {
        key: value if key in ("models", "macros") else substitute(value, global_macros)
        for key, value in raw.items()
    }
    for key, value in expanded.items():
        if key in TOP_LEVEL_KEYS and key not in ("models", "macros"):
            for path, macro in unresolved(value, key):
                report.error(path, unresolved_message(macro, in_model=False))

    fields = Fields(expanded, "", report)
    health_check_timeout = max(
        fields.integer("healthCheckTimeout", DEFAULT_HEALTH_CHECK_TIMEOUT),
        MIN_HEALTH_CHECK_TIMEOUT,
    )
    start_port = fields.integer("startPort", DEFAULT_START_PORT, minimum=1)
    log_level = _log_level(fields)
    globals_ = ModelDefaults(
        global_ttl=fields.integer("globalTTL", 0, minimum=0),
        unload_timeout=fields.integer("unloadTimeout", DEFAULT_UNLOAD_TIMEOUT, minimum=0)
        or DEFAULT_UNLOAD_TIMEOUT,
    )
    send_loading_state = bool(fields.boolean("sendLoadingState", False))

    models_doc: dict[str, Any] = {}
    models: dict[str, ModelConfig] = {}
    next_port = start_port
    for model_id, entry in prepared.items():
        scope = model_scope(model_id, global_macros, model_macros[model_id])
        entry, port = expand_model(model_id, entry, scope, next_port, report)
        if port is not None:
            next_port += 1
        models[model_id] = model_config(model_id, entry, port, globals_, report)
        declared = models_raw[model_id].get("macros")
        models_doc[model_id] = entry if declared is None else {**entry, "macros": declared}
    if "models" in expanded:
        expanded["models"] = models_doc

    models, aliases = register_aliases(models, models_doc, report)
    report.errors.extend(validate_api_keys(expanded.get("apiKeys")))
    allowed_hosts, problems = read_allowed_hosts(expanded)
    report.errors.extend(problems)
    allowed_origins, problems = read_allowed_origins(expanded)
    report.errors.extend(problems)
    sections = _read_sections(expanded, models, aliases, report)
    max_request_body_size, problems = read_max_request_body_size(expanded)
    report.errors.extend(problems)
    prompt_cache, problems = read_prompt_cache(expanded)
    report.errors.extend(problems)
    if report.errors:
        raise ConfigError(report.errors, report.warnings)
    return Config(
        models=MappingProxyType(models),
        aliases=MappingProxyType(aliases),
        health_check_timeout=health_check_timeout,
        start_port=start_port,
        log_level=log_level,
        global_ttl=globals_.global_ttl,
        unload_timeout=globals_.unload_timeout,
        send_loading_state=send_loading_state,
        api_keys=api_key_strings(expanded.get("apiKeys")),
        macros=MappingProxyType({macro.name: macro.value for macro in global_macros}),
        warnings=tuple(report.warnings),
        peers=sections.peers,
        profiles=sections.profiles,
        routing=sections.routing,
        log_to_stdout=read_log_to_stdout(expanded),
        log_time_format=read_log_time_format(expanded),
        capture_buffer_mib=read_capture_buffer(expanded),
        max_request_body_size=max_request_body_size,
        store=sections.store,
        performance_disabled=read_performance_disabled(expanded),
        include_aliases_in_list=read_include_aliases(expanded),
        ignore_paths=sections.ignore_paths,
        preload=sections.preload,
        resources=sections.resources,
        ui_session_headers=read_session_headers(expanded),
        allowed_hosts=allowed_hosts,
        allowed_origins=allowed_origins,
        prompt_cache=prompt_cache,
        _document=MappingProxyType(expanded),
    )


@dataclass(frozen=True)
class _Sections:
    """The sections that are checked against the models (or can be wrong)."""

    peers: Peers
    profiles: ProfilesConfig
    routing: RoutingConfig
    ignore_paths: tuple[re.Pattern[str], ...]
    preload: tuple[str, ...]
    store: StoreConfig
    resources: ResourcesConfig | None = None


def _read_sections(
    document: Mapping[str, Any],
    models: Mapping[str, ModelConfig],
    aliases: Mapping[str, str],
    report: Report,
) -> _Sections:
    """Read routing, peers, profiles, selectors and the top-level settings
    that can be wrong, each once; their problems go to ``report``."""
    routing, problems = read_routing(document, models.keys(), aliases)
    report.errors.extend(problems)
    commands = {model_id: model.argv for model_id, model in models.items()}
    resources, problems, resource_warnings = read_resources(document, commands)
    if not problems:
        problems = device_problems(models, resources)
    report.errors.extend(problems)
    report.warnings.extend(resource_warnings)
    if routing is not None and resources is not None:
        routing, problems = placed_routing(routing, resources)
        report.errors.extend(problems)
    peers, problems, peer_warnings = read_peers(document, models.keys(), aliases)
    report.errors.extend(problems)
    can_coexist = planner_coexistence(routing.planner) if routing is not None else None
    profiles, problems, profile_warnings = read_profiles(
        document, models.keys(), aliases, peers, can_coexist or (lambda ids: True)
    )
    report.errors.extend(problems)
    report.warnings.extend(peer_warnings + profile_warnings)
    ignore_paths, problems = read_ignore_paths(document)
    report.errors.extend(problems)
    for model_id in models:
        entry = document.get("models", {}).get(model_id) or {}
        check_capabilities(model_id, entry.get("capabilities"), report)
    preload, problems = read_preload(document)
    report.errors.extend(problems)
    store, problems = read_store(document)
    report.errors.extend(problems)
    return _Sections(
        peers, profiles, routing or RoutingConfig(), ignore_paths, preload, store, resources
    )


def _log_level(fields: Fields) -> str:
    level = fields.string("logLevel", "info")
    if level.lower() in LOG_LEVELS:
        return level.lower()
    fields.report.warn("logLevel", f'unknown level {level!r}, using "info"')
    return "info"
