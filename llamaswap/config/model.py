"""Frozen, validated configuration values.

These classes are the contract between the config loader and everything that
reads configuration (process supervision, scheduler, proxy, web).  They hold
*resolved* values: macros expanded, ports assigned, defaults applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from llamaswap.config.filters import ModelFilters

DEFAULT_CONCURRENCY_LIMIT = 10


def _frozen_map(value: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


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
    #: ``apiKeys``; empty = no authentication.
    api_keys: tuple[str, ...] = ()
    macros: Mapping[str, Any] = field(default_factory=_frozen_map)
    #: non-fatal problems found while loading (unknown keys, ...), one line each.
    warnings: tuple[str, ...] = ()
    #: the fully macro-expanded document, for keys later features read.
    document: Mapping[str, Any] = field(default_factory=_frozen_map)

    def resolve(self, name: str) -> str | None:
        """Real model id for a model id or alias, or ``None``."""
        if name in self.models:
            return name
        return self.aliases.get(name)


class ConfigError(Exception):
    """The configuration is invalid.  ``problems`` holds one line per problem,
    each naming the key path, e.g. ``models.llama.ttl: must be >= 0, got -5``."""

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))
