"""YAML text -> frozen, validated :class:`Config` (reference §2.1, §2.2, §2.7).

Every problem is collected and reported at once as one line naming its key
path.  Three stages stop early because later ones would only report echoes of
their problems: ``${env.X}`` substitution, YAML parsing, and the shape of the
document (macro declarations, ``models`` entries).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import yaml

from llamaswap.config.commands import split_command, strip_comment_lines
from llamaswap.config.filters import parse_filters
from llamaswap.config.macros import (
    MODEL_ID,
    PID,
    PORT,
    EnvMacroError,
    Macro,
    format_value,
    model_scope,
    read_macros,
    substitute,
    substitute_env,
    substitute_keys,
    unresolved,
)
from llamaswap.config.merge import config_sources, merge_documents
from llamaswap.config.model import DEFAULT_CONCURRENCY_LIMIT, Config, ConfigError, ModelConfig
from llamaswap.config.problems import describe, join_path, unknown_key_warnings, url_problem
from llamaswap.web.auth import api_key_strings, validate_api_keys

DEFAULT_PROXY = "http://localhost:${PORT}"
DEFAULT_CHECK_ENDPOINT = "/health"
DEFAULT_HEALTH_CHECK_TIMEOUT = 120
MIN_HEALTH_CHECK_TIMEOUT = 15
DEFAULT_START_PORT = 5800
DEFAULT_UNLOAD_TIMEOUT = 10
LOG_LEVELS = ("debug", "info", "warn", "error")
#: the model behind the ComfyUI endpoints needs room for many websocket polls.
COMFYUI_MODEL_ID = "comfyui_auto"
COMFYUI_MIN_CONCURRENCY = 50

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
    }
)
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
    }
)


def load_config(path: str) -> Config:
    """Read and load the config file at ``path``."""
    return load_config_text(_read(path))


def load_config_sources(
    config: str | None, config_dir: str | None, environ: Mapping[str, str] | None = None
) -> Config:
    """Load ``config`` merged with the ``*.yaml`` files of ``config_dir``
    (llama-swap's ``-config`` + ``-config-dir`` rules)."""
    try:
        files = config_sources(config, config_dir)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    if config and not config_dir:
        return load_config_text(_read(config), environ)
    env = os.environ if environ is None else environ
    documents = []
    for path in files:
        text = _read(path)
        try:
            text = substitute_env(text, env, _visible(text))
        except EnvMacroError as e:
            raise ConfigError([f"{path}: {problem}" for problem in e.problems]) from None
        try:
            documents.append((path, _parse_yaml(text) if text.strip() else None))
        except ConfigError as e:
            raise ConfigError([f"{path}: {problem}" for problem in e.problems]) from None
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
    try:
        text = substitute_env(text, os.environ if environ is None else environ, _visible(text))
    except EnvMacroError as e:
        raise ConfigError(e.problems) from None
    return _build(_parse_yaml(text))


# --- YAML, resolved like Go's yaml.v3 (YAML 1.2 scalars, no base 60, no dates) ---

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_MERGE = "tag:yaml.org,2002:merge"
_SPECIAL_PLAIN = {
    **dict.fromkeys(("true", "True", "TRUE", "false", "False", "FALSE"), "tag:yaml.org,2002:bool"),
    **dict.fromkeys(("", "~", "null", "Null", "NULL"), "tag:yaml.org,2002:null"),
    **dict.fromkeys(
        (f"{sign}{inf}" for sign in ("", "+", "-") for inf in (".inf", ".Inf", ".INF")), _FLOAT
    ),
    **dict.fromkeys((".nan", ".NaN", ".NAN"), _FLOAT),
    "<<": _MERGE,
}
_GO_INT = re.compile(r"([-+]?)(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)")
_YAML_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _go_int(text: str) -> int | None:
    """``strconv.ParseInt(text, 0, 64)``: 0x, 0o, 0b and leading-zero octal."""
    match = _GO_INT.fullmatch(text)
    if match is None:
        return None
    sign, digits = match.groups()
    prefix = digits[:2].lower()
    base = {"0x": 16, "0o": 8, "0b": 2}.get(prefix)
    if base is not None:
        value = int(digits[2:], base)
    else:
        value = int(digits, 8 if digits.startswith("0") else 10)
    return -value if sign == "-" else value


def _plain_tag(value: str) -> str:
    if value in _SPECIAL_PLAIN:
        return _SPECIAL_PLAIN[value]
    if value[0] in "+-0123456789.":
        plain = value.replace("_", "") if value[0] != "." else value
        if value[0] != "." and _go_int(plain) is not None:
            return _INT
        if _YAML_FLOAT.fullmatch(plain):
            return _FLOAT
    return _STR


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader resolving plain scalars as yaml.v3 does, keeping mapping
    keys as their text and rejecting duplicate keys."""

    def resolve(self, kind: type, value: str, implicit: tuple[bool, bool]) -> str:
        if kind is yaml.ScalarNode and implicit[0]:
            return _plain_tag(value)
        return super().resolve(kind, value, implicit)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[str, Any]:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be scalars", key_node.start_mark
                )
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f'mapping key "{key_node.value}" already defined at line '
                    f"{seen[key_node.value] + 1}",
                    key_node.start_mark,
                )
            seen[key_node.value] = key_node.start_mark.line
        self.flatten_mapping(node)
        return {
            key_node.value: self.construct_object(value_node, deep=deep)
            for key_node, value_node in node.value
        }

    def construct_go_int(self, node: yaml.ScalarNode) -> int:
        value = _go_int(str(self.construct_scalar(node)).replace("_", ""))
        if value is None:
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid integer {node.value!r}", node.start_mark
            )
        return value

    def construct_go_float(self, node: yaml.ScalarNode) -> float:
        text = str(self.construct_scalar(node)).replace("_", "")
        special = text.lower().lstrip("+")
        if special in (".inf", "-.inf", ".nan"):
            return float(special.replace(".", ""))
        try:
            return float(text)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid float {node.value!r}", node.start_mark
            ) from None


_YamlLoader.add_constructor(_INT, _YamlLoader.construct_go_int)
_YamlLoader.add_constructor(_FLOAT, _YamlLoader.construct_go_float)


def _parse_yaml(text: str) -> dict[str, Any]:
    try:
        document = yaml.load(text, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError([f"config: invalid YAML{where}: {e.problem or e.context}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"config: invalid YAML: {e}"]) from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError([f"config: top level must be a mapping, got {describe(document)}"])
    return document


def _visible(text: str) -> list[str]:
    """The text outside comments, found with the YAML scanner.

    Tokens are scanned rather than the document parsed, so ``[${env.X}]`` in a
    flow list (not valid YAML until substituted) still has its comments
    ignored.  Text the scanner cannot read is scanned whole.
    """
    chunks = []
    position = 0
    try:
        for token in yaml.scan(text, Loader=_YamlLoader):
            start, end = token.start_mark.index, token.end_mark.index
            gap = text[position:start]
            chunks.append("\n" if "#" in gap else gap)  # gaps hold blanks and comments
            chunks.append(text[start:end])
            position = max(position, end)
    except yaml.YAMLError:
        return [text]
    return ["".join(chunks)]


# --- problem collection and typed field access ---


@dataclass
class _Report:
    """Problems found so far; ``flagged`` paths get no further type errors."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    flagged: set[str] = field(default_factory=set)

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")
        self.flagged.add(path)

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")

    def is_flagged(self, path: str) -> bool:
        return any(
            flagged == path or flagged.startswith((path + ".", path + "["))
            for flagged in self.flagged
        )

    def unknown_keys(self, values: Mapping[str, Any], known: frozenset[str], path: str) -> None:
        self.warnings.extend(unknown_key_warnings(values, known, path))


_YAML11_BOOLS = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "on", "On", "ON"), True),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "off", "Off", "OFF"), False),
}


@dataclass(frozen=True)
class _Fields:
    """Typed reads from one mapping; a bad value is reported and the default used."""

    values: Mapping[str, Any]
    path: str
    report: _Report

    def _raw(self, key: str) -> tuple[str, Any]:
        path = join_path(self.path, key)
        value = self.values.get(key)
        return path, None if self.report.is_flagged(path) else value

    def integer(self, key: str, default: int, minimum: int | None = None) -> int:
        path, value = self._raw(key)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.report.error(path, f"must be an integer, got {describe(value)}")
            return default
        if minimum is not None and value < minimum:
            self.report.error(path, f"must be >= {minimum}, got {value}")
            return default
        return value

    def boolean(self, key: str, default: bool | None) -> bool | None:
        path, value = self._raw(key)
        if value is None or isinstance(value, bool):
            return default if value is None else value
        if isinstance(value, str) and value in _YAML11_BOOLS:
            return _YAML11_BOOLS[value]
        self.report.error(path, f"must be true or false, got {describe(value)}")
        return default

    def string(self, key: str, default: str = "") -> str:
        path, value = self._raw(key)
        if value is None:
            return default
        if isinstance(value, dict | list):
            self.report.error(path, f"must be a string, got {describe(value)}")
            return default
        return value if isinstance(value, str) else format_value(value)

    def strings(self, key: str) -> tuple[str, ...]:
        path, value = self._raw(key)
        if value is None:
            return ()
        if not isinstance(value, list) or any(isinstance(item, dict | list) for item in value):
            self.report.error(path, f"must be a list of strings, got {describe(value)}")
            return ()
        return tuple(
            item if isinstance(item, str) else format_value(item)
            for item in value
            if item is not None
        )

    def mapping(self, key: str) -> dict[str, Any]:
        path, value = self._raw(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.report.error(path, f"must be a mapping, got {describe(value)}")
            return {}
        return value


# --- building the Config ---


@dataclass(frozen=True)
class _Globals:
    global_ttl: int
    unload_timeout: int


def _build(raw: dict[str, Any]) -> Config:
    report = _Report()
    report.unknown_keys(raw, TOP_LEVEL_KEYS, "")
    top = _Fields(raw, "", report)
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
        local = _Fields(entry, path, report).mapping("macros")
        model_macros[model_id], problems = read_macros(local, f"{path}.macros")
        report.errors.extend(problems)
        prepared[model_id] = _prepare_model(entry)
    if report.errors:
        raise ConfigError(report.errors)

    # Global macros apply to every top-level value except the models and the
    # declarations themselves.
    expanded = {
        key: value if key in ("models", "macros") else substitute(value, global_macros)
        for key, value in raw.items()
    }
    for key, value in expanded.items():
        if key in TOP_LEVEL_KEYS and key not in ("models", "macros"):
            for path, macro in unresolved(value, key):
                report.error(path, _unresolved_message(macro, in_model=False))

    fields = _Fields(expanded, "", report)
    health_check_timeout = max(
        fields.integer("healthCheckTimeout", DEFAULT_HEALTH_CHECK_TIMEOUT),
        MIN_HEALTH_CHECK_TIMEOUT,
    )
    start_port = fields.integer("startPort", DEFAULT_START_PORT, minimum=1)
    log_level = _log_level(fields)
    globals_ = _Globals(
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
        entry, port = _expand_model(model_id, entry, scope, next_port, report)
        if port is not None:
            next_port += 1
        models[model_id] = _model_config(model_id, entry, port, globals_, report)
        declared = models_raw[model_id].get("macros")
        models_doc[model_id] = entry if declared is None else {**entry, "macros": declared}
    if "models" in expanded:
        expanded["models"] = models_doc

    models, aliases = _register_aliases(models, models_doc, report)
    report.errors.extend(validate_api_keys(expanded.get("apiKeys")))
    _check_sections(expanded, models, aliases, report)
    if report.errors:
        raise ConfigError(report.errors)
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
        document=MappingProxyType(expanded),
    )


def _check_sections(
    document: Mapping[str, Any],
    models: Mapping[str, ModelConfig],
    aliases: Mapping[str, str],
    report: _Report,
) -> None:
    """Validate the sections read after loading: routing, peers, profiles,
    selectors."""
    from llamaswap.config.routing import read_routing
    from llamaswap.supervision.selection import planner_coexistence, profile_warnings, read_profiles
    from llamaswap.upstream.peers import peer_warnings, read_peers

    routing, problems = read_routing(document, models.keys(), aliases)
    report.errors.extend(problems)
    peers, problems = read_peers(document, models.keys(), aliases)
    report.errors.extend(problems)
    can_coexist = planner_coexistence(routing.planner) if routing is not None else None
    _, problems = read_profiles(
        document, models.keys(), aliases, peers, can_coexist or (lambda ids: True)
    )
    report.errors.extend(problems)
    report.warnings.extend(peer_warnings(document) + profile_warnings(document))
    upstream = document.get("upstream")
    patterns = upstream.get("ignorePaths") if isinstance(upstream, dict) else None
    for index, pattern in enumerate(patterns if isinstance(patterns, list) else []):
        try:
            re.compile(str(pattern))
        except re.error as exc:
            report.error(f"upstream.ignorePaths[{index}]", f"invalid regular expression: {exc}")
    for model_id in models:
        entry = document.get("models", {}).get(model_id) or {}
        caps = entry.get("capabilities") if isinstance(entry, dict) else None
        if caps is None:
            continue
        path = f"models.{model_id}.capabilities"
        if not isinstance(caps, dict):
            report.error(path, "must be a mapping")
            continue
        for key in ("in", "out"):
            for value in caps.get(key) or []:
                if value not in ("text", "audio", "image"):
                    report.error(
                        f"{path}.{key}", f"unknown modality {value!r} (valid: text, audio, image)"
                    )
        context = caps.get("context", 0)
        if not isinstance(context, int) or context < 0:
            report.error(f"{path}.context", f"must be an integer >= 0, got {context!r}")


def _prepare_model(entry: dict[str, Any]) -> dict[str, Any]:
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


def _expand_model(
    model_id: str,
    entry: dict[str, Any],
    scope: Sequence[Macro],
    next_port: int,
    report: _Report,
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
            if not (key == "cmdStop" and macro == "${" + PID + "}"):
                report.error(value_path, _unresolved_message(macro, in_model=True))
    for key in _set_params_by_id(entry):
        for _, macro in unresolved(key, ""):
            report.error(
                f"{path}.filters.setParamsByID",
                f'{_unresolved_message(macro, in_model=True)} in key "{key}"',
            )
    return entry, port


def _set_params_by_id(entry: Mapping[str, Any]) -> dict[str, Any]:
    filters = entry.get("filters")
    params = filters.get("setParamsByID") if isinstance(filters, dict) else None
    return params if isinstance(params, dict) else {}


def _expand_set_params_keys(
    entry: dict[str, Any], macros: Sequence[Macro], path: str, report: _Report
) -> dict[str, Any]:
    """``filters.setParamsByID`` keys are the one place where keys expand."""
    params = _set_params_by_id(entry)
    if not params:
        return entry
    expanded, problems = substitute_keys(params, macros)
    for problem in problems:
        report.error(f"{path}.filters.setParamsByID", problem)
    return {**entry, "filters": {**entry["filters"], "setParamsByID": expanded}}


def _unresolved_message(macro: str, in_model: bool) -> str:
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


def _log_level(fields: _Fields) -> str:
    level = fields.string("logLevel", "info")
    if level.lower() in LOG_LEVELS:
        return level.lower()
    fields.report.warn("logLevel", f'unknown level {level!r}, using "info"')
    return "info"


def _model_config(
    model_id: str, entry: dict[str, Any], port: int | None, globals_: _Globals, report: _Report
) -> ModelConfig:
    path = f"models.{model_id}"
    fields = _Fields(entry, path, report)
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
    )


def _command(cmd: str, path: str, report: _Report) -> tuple[str, ...]:
    """The argv of ``cmd``; empty is allowed here (it fails at start)."""
    if report.is_flagged(path):
        return ()
    try:
        return split_command(cmd)
    except ValueError as e:
        report.error(path, f"cannot parse command: {e}")
        return ()


def _env(fields: _Fields) -> tuple[tuple[str, str], ...]:
    pairs = []
    for index, item in enumerate(fields.strings("env")):
        name, equals, value = item.partition("=")
        if not equals or not name:
            fields.report.error(f"{fields.path}.env[{index}]", f"must be KEY=VALUE, got {item!r}")
        else:
            pairs.append((name, value))
    return tuple(pairs)


def _aliases(fields: _Fields) -> tuple[str, ...]:
    aliases = fields.strings("aliases")
    if "" in aliases:
        fields.report.warn(f"{fields.path}.aliases", "empty alias ignored")
    return tuple(alias for alias in aliases if alias)


def _check_endpoint(fields: _Fields) -> str | None:
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


def _register_aliases(
    models: dict[str, ModelConfig], documents: Mapping[str, Any], report: _Report
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
