"""Frozen, validated configuration values.

These classes are the contract between the config loader and everything that
reads configuration (process supervision, scheduler, proxy, web).  They hold
*resolved* values: macros expanded, ports assigned, defaults applied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml

from llamaswap.config.filters import ModelFilters
from llamaswap.config.peers import Peers
from llamaswap.config.profiles import ProfilesConfig
from llamaswap.config.resources import ResourcesConfig
from llamaswap.config.routing import RoutingConfig
from llamaswap.config.settings import (
    DEFAULT_CAPTURE_BUFFER_MIB,
    DEFAULT_SESSION_HEADERS,
    StoreConfig,
    default_ignore_paths,
)

DEFAULT_CONCURRENCY_LIMIT = 10


def _frozen_map(value: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


def freeze(value: Any) -> Any:
    """``value`` with every mapping read-only and every list a tuple."""
    if isinstance(value, Mapping):
        return MappingProxyType({key: freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(item) for item in value)
    return value


@dataclass(frozen=True)
class ModelConfig:
    """One entry under ``models:``, fully resolved."""

    id: str
    #: argv after comment stripping, ``\\`` continuation and shell-word split.
    argv: tuple[str, ...]
    #: the command string after macro expansion and comment stripping (for /running).
    cmd: str
    #: the stop command with ``${PID}`` still in it; "" when not configured.
    cmd_stop: str = ""
    #: base URL of the upstream server, e.g. ``http://localhost:5800``.
    proxy: str = ""
    #: extra environment, in order; later duplicates win.
    env: tuple[tuple[str, str], ...] = ()
    aliases: tuple[str, ...] = ()
    #: health-check path appended to ``proxy``; ``None`` when ``checkEndpoint: none``.
    check_endpoint: str | None = "/health"
    #: effective idle TTL in seconds (model ``ttl`` or ``globalTTL``); 0 = never.
    ttl: int = 0
    #: effective graceful stop timeout in seconds for unload/TTL stops.
    unload_timeout: int = 10
    unlisted: bool = False
    use_model_name: str = ""
    name: str = ""
    description: str = ""
    metadata: Mapping[str, Any] = field(default_factory=_frozen_map)
    #: effective admission limit (queued + waiting + serving); default 10.
    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT
    #: ``None`` = follow the global ``sendLoadingState``.
    send_loading_state: bool | None = None
    #: the port assigned through ``${PORT}``, if the model used it.
    port: int | None = None
    #: JSON body rewrites (``filters.stripParams/setParams/setParamsByID``).
    filters: ModelFilters = field(default_factory=ModelFilters)
    #: ``capabilities`` as written (validated, read-only), shown in ``/v1/models``.
    #: Listing details only: a reload that changes them keeps the process.
    capabilities: Mapping[str, Any] = field(default_factory=_frozen_map, compare=False)
    #: a websocket upgrade never starts the model (``compat.ignoreWebsockets:
    #: true``, and always for ``comfyui_auto``); not compared on reload either.
    ignore_websockets: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration."""

    #: model id -> config, iteration order sorted by id.
    models: Mapping[str, ModelConfig] = field(default_factory=_frozen_map)
    #: alias -> real model id.
    aliases: Mapping[str, str] = field(default_factory=_frozen_map)
    health_check_timeout: int = 120
    start_port: int = 5800
    log_level: str = "info"
    global_ttl: int = 0
    unload_timeout: int = 10
    send_loading_state: bool = False
    #: ``apiKeys``; empty = no authentication.  Secrets: never shown by repr.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    #: global macro values (they may hold secrets used in ``apiKeys``).
    macros: Mapping[str, Any] = field(default_factory=_frozen_map, repr=False)
    #: non-fatal problems found while loading (unknown keys, ...), one line each.
    warnings: tuple[str, ...] = ()
    #: ``peers``: remote servers and the names that reach them.
    peers: Peers = field(default_factory=Peers)
    #: ``profiles`` and ``selectors``.
    profiles: ProfilesConfig = field(default_factory=ProfilesConfig)
    #: ``routing`` (or legacy ``groups``/``matrix``): planner, priorities, maxWait.
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    #: ``logToStdout``: ``proxy``, ``upstream``, ``both`` or ``none``.
    log_to_stdout: str = "proxy"
    #: ``logTimeFormat``: a time prefix for log lines; "" = none.
    log_time_format: str = ""
    #: ``captureBuffer`` in MiB of compressed captures; 0 disables captures.
    capture_buffer_mib: int = DEFAULT_CAPTURE_BUFFER_MIB
    #: ``store`` and ``metricsMaxInMemory``.
    store: StoreConfig = field(default_factory=StoreConfig)
    #: ``performance.disabled``: no system metrics.
    performance_disabled: bool = False
    #: ``includeAliasesInList``: aliases get their own ``/v1/models`` records.
    include_aliases_in_list: bool = False
    #: ``upstream.ignorePaths``, compiled: ``/upstream`` paths that never load a model.
    ignore_paths: tuple[re.Pattern[str], ...] = field(default_factory=default_ignore_paths)
    #: ``hooks.on_startup.preload``: names to load at start, in order.
    preload: tuple[str, ...] = ()
    #: ``ui.activity.session_id``: request headers the UI groups activity by.
    ui_session_headers: tuple[str, ...] = DEFAULT_SESSION_HEADERS
    #: top-level ``resources`` and every model's footprint; ``None`` without
    #: them (no placement: the routing planner alone decides).
    resources: ResourcesConfig | None = None
    #: the fully macro-expanded document, only for :meth:`resolved_yaml`.
    _document: Mapping[str, Any] = field(default_factory=_frozen_map, repr=False)

    def resolve(self, name: str) -> str | None:
        """Real model id for a model id or alias, or ``None``."""
        if name in self.models:
            return name
        return self.aliases.get(name)

    def resolved_yaml(self) -> str:
        """The resolved document as YAML (``check-config``): macros expanded,
        ports assigned, defaults injected, keys in the order written."""
        return yaml.safe_dump(_plain(self._document), sort_keys=False)


def _plain(value: object) -> object:
    """Plain dicts and lists for the YAML dumper."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class ConfigError(Exception):
    """The configuration is invalid.  ``problems`` holds one line per problem,
    each naming the key path, e.g. ``models.llama.ttl: must be >= 0, got -5``."""

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))
