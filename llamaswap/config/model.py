"""Frozen, validated configuration values.

These classes are the contract between the config loader and everything that
reads configuration (process supervision, scheduler, proxy, web).  They hold
*resolved* values: macros expanded, ports assigned, defaults applied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import yaml

from llamaswap.config.browser import AllowedHosts, AllowedOrigins
from llamaswap.config.filters import ModelFilters
from llamaswap.config.peers import Peers, PeerTimeouts
from llamaswap.config.profiles import ProfilesConfig
from llamaswap.config.promptcache import PromptCacheSettings
from llamaswap.config.resources import ResourcesConfig
from llamaswap.config.routing import RoutingConfig
from llamaswap.config.settings import (
    DEFAULT_CAPTURE_BUFFER_MIB,
    DEFAULT_MAX_REQUEST_BODY_SIZE,
    DEFAULT_SESSION_HEADERS,
    StoreConfig,
    default_ignore_paths,
)
from llamaswap.config.sleep import SleepConfig
from llamaswap.core.secrets import (
    MASK,
    is_secret_name,
    mask_argv,
    mask_command,
    mask_env,
    mask_env_pairs,
    mask_known,
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


@dataclass(frozen=True, repr=False)
class ModelConfig:
    """One entry under ``models:``, fully resolved.  Its repr masks secrets in
    the command and the environment (:mod:`llamaswap.core.secrets`)."""

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
    #: ``timeouts`` for the connections to the model's server; ``None`` when
    #: not configured (the shared client's).  A reload that changes them
    #: keeps the process: only the connections are replaced.
    timeouts: PeerTimeouts | None = field(default=None, compare=False)
    #: ``files``: the model's weight files (prewarm, loading progress); empty
    #: = the ``-m``/``--model`` path of the command.  Not compared on reload.
    files: tuple[str, ...] = field(default=(), compare=False)
    #: ``prewarm: false``: its files are not read ahead while its start waits.
    #: Not compared on reload.
    prewarm: bool = field(default=True, compare=False)
    #: ``sleep``: put to sleep instead of stopped by swaps; ``None`` = no sleep tier.
    sleep: SleepConfig | None = None
    #: ``promptCache: true``: llama-server's slots are saved before a stop
    #: llamaswap chose and restored after the next start.
    prompt_cache: bool = False

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        shown["argv"] = tuple(mask_argv(self.argv))
        shown["cmd"] = mask_command(self.cmd)
        shown["cmd_stop"] = mask_command(self.cmd_stop)
        shown["env"] = mask_env_pairs(self.env)
        inner = ", ".join(f"{name}={value!r}" for name, value in shown.items())
        return f"{type(self).__name__}({inner})"


@dataclass(frozen=True, repr=False)
class Config:
    """The whole resolved configuration.  Its repr shows no secret: models
    mask theirs, and the ``apiKeys``/peer ``apiKey`` values are masked
    wherever else they appear (a command, a filter)."""

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
    #: ``maxRequestBodySize`` in bytes: larger request bodies are refused (413).
    max_request_body_size: int = DEFAULT_MAX_REQUEST_BODY_SIZE
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
    #: ``allowedHosts``: Host names accepted besides loopback (docs/security.md).
    allowed_hosts: AllowedHosts = field(default_factory=AllowedHosts)
    #: ``allowedOrigins``: other sites whose pages may call management endpoints.
    allowed_origins: AllowedOrigins = field(default_factory=AllowedOrigins)
    #: top-level ``resources`` and every model's footprint; ``None`` without
    #: them (no placement: the routing planner alone decides).
    resources: ResourcesConfig | None = None
    #: ``promptCacheDir`` and ``promptCacheMaxBytes``.
    prompt_cache: PromptCacheSettings = field(default_factory=PromptCacheSettings)
    #: the fully macro-expanded document, only for :meth:`resolved_yaml`.
    _document: Mapping[str, Any] = field(default_factory=_frozen_map, repr=False)

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return mask_known(f"{type(self).__name__}({inner})", self.known_secrets())

    def resolve(self, name: str) -> str | None:
        """Real model id for a model id or alias, or ``None``."""
        if name in self.models:
            return name
        return self.aliases.get(name)

    def known_secrets(self) -> tuple[str, ...]:
        """The secret values the config holds: ``apiKeys`` and peers' ``apiKey``."""
        peer_keys = (peer.api_key for peer in self.peers.peers.values() if peer.api_key)
        return (*self.api_keys, *peer_keys)

    def resolved_yaml(self, *, show_secrets: bool = False) -> str:
        """The resolved document as YAML (``check-config``): macros expanded,
        ports assigned, defaults injected, keys in the order written;
        multi-line strings (commands) as ``|`` block scalars.  Secrets are
        masked unless ``show_secrets``: see :func:`mask_document`."""
        document = _plain(self._document)
        if not show_secrets:
            document = mask_document(document)
        return yaml.dump(document, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True)


def _plain(value: object) -> Any:
    """Plain dicts and lists for the YAML dumper."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings as ``|`` block scalars."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        # YAML cannot keep trailing blanks on a line of a block scalar (the
        # emitter would fall back to a quoted string); they carry no meaning
        # in a command.
        value = "\n".join(line.rstrip(" \t") for line in value.split("\n"))
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_str(value)


_BlockDumper.add_representer(str, _represent_str)


def mask_document(document: dict[str, Any]) -> dict[str, Any]:
    """The plain resolved ``document`` with its secrets masked: ``apiKeys``
    values, peers' ``apiKey``, secret options in ``cmd``/``cmdStop``, secret
    ``env`` entries, and macros whose name says key/token/secret/password or
    whose value is one of those keys (the keys are masked wherever else they
    occur in a command, too)."""
    out = dict(document)
    known: list[str] = []
    if isinstance(out.get("apiKeys"), list):
        known += [str(key) for key in out["apiKeys"]]
        out["apiKeys"] = [MASK for _ in out["apiKeys"]]
    if isinstance(out.get("peers"), dict):
        peers = {}
        for peer_id, peer in out["peers"].items():
            if isinstance(peer, dict) and peer.get("apiKey"):
                known.append(str(peer["apiKey"]))
                peer = dict(peer, apiKey=MASK)
            peers[peer_id] = peer
        out["peers"] = peers
    out["macros"] = _mask_macros(out.get("macros"), known)
    if isinstance(out.get("models"), dict):
        models = {}
        for model_id, model in out["models"].items():
            if isinstance(model, dict):
                model = dict(model)
                for key in ("cmd", "cmdStop"):
                    if isinstance(model.get(key), str):
                        model[key] = mask_known(mask_command(model[key]), known)
                if isinstance(model.get("env"), list):
                    model["env"] = mask_env(str(entry) for entry in model["env"])
                model["macros"] = _mask_macros(model.get("macros"), known)
                if model["macros"] is None:
                    del model["macros"]
            models[model_id] = model
        out["models"] = models
    if out["macros"] is None:
        del out["macros"]
    return out


def _mask_macros(macros: Any, known: list[str]) -> Any:
    if not isinstance(macros, dict):
        return macros
    return {
        name: MASK if is_secret_name(name) or str(value) in known else value
        for name, value in macros.items()
    }


class ConfigError(Exception):
    """The configuration is invalid.  ``problems`` holds one line per problem,
    each naming the key path, e.g. ``models.llama.ttl: must be >= 0, got -5``;
    ``warnings`` what was noticed on the way (an unknown key with its "did you
    mean" often explains the error)."""

    def __init__(
        self, problems: list[str] | tuple[str, ...], warnings: list[str] | tuple[str, ...] = ()
    ) -> None:
        self.problems = tuple(problems)
        self.warnings = tuple(warnings)
        super().__init__("\n".join(self.problems))
