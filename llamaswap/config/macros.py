"""The macro engine, with llama-swap's exact semantics (llama-swap §2.7 in docs/design.md).

Order of work, driven by :mod:`llamaswap.config.loader`:

1. ``${env.NAME}`` is substituted in the YAML *text* (:func:`substitute_env`),
   only for names that occur outside comments.
2. Macro declarations are validated (:func:`read_macros`).
3. Values are expanded with :func:`substitute`: the list is walked last to
   first, so a macro may reference those declared before it; a string that is
   exactly ``${name}`` takes the macro's typed value.
4. ``${PORT}``, ``${MODEL_ID}`` and ``${PID}`` are runtime macros: the first two
   are supplied per model, ``${PID}`` survives in ``cmdStop`` only.
5. :func:`unresolved` finds whatever is left for the loader to report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

ENV_MACRO = re.compile(r"\$\{env\.([a-zA-Z_][a-zA-Z0-9_]*)\}")
MACRO = re.compile(r"\$\{([a-zA-Z0-9_-]+)\}")
_MACRO_NAME = re.compile(r"[a-zA-Z0-9_-]+")
_MAX_NAME_LENGTH = 63

PORT = "PORT"
MODEL_ID = "MODEL_ID"
PID = "PID"
RESERVED = frozenset({PORT, MODEL_ID, PID})


@dataclass(frozen=True)
class Macro:
    """One declared macro; ``value`` is a str, int, float or bool."""

    name: str
    value: Any


def format_value(value: Any) -> str:
    """Render a scalar the way Go's ``%v`` does (``true``, ``1e+06``, ``0.5``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _format_float(value)
    if value is None:
        return "<nil>"
    return str(value)


def _format_float(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign = "-" if value < 0 else ""
    # repr() gives the shortest digits that round-trip, as strconv does.
    _, digit_tuple, exponent = Decimal(repr(abs(value))).as_tuple()
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    point = len(digit_tuple) + int(exponent)  # digits before the decimal point
    exp10 = point - 1
    if exp10 < -4 or exp10 >= 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{mantissa}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def substitute_env(text: str, environ: Mapping[str, str], visible: Iterable[str]) -> str:
    """Replace ``${env.NAME}`` in ``text`` for every NAME found in ``visible``.

    ``visible`` holds the document text outside comments, so macros that
    only appear inside comments are neither required nor replaced.  Values are
    escaped for double-quoted YAML.  Raises :class:`EnvMacroError` listing
    every problem.
    """
    names: dict[str, None] = {}
    for chunk in visible:
        names.update((match.group(1), None) for match in ENV_MACRO.finditer(chunk))
    values: dict[str, str] = {}
    problems = []
    for name in names:
        value = environ.get(name)
        if value is None:
            problems.append(f"env: environment variable '{name}' is not set")
        elif any(c in value for c in "\n\r\x00"):
            problems.append(
                f"env: environment variable '{name}' contains newlines or null bytes"
                " which are not allowed in YAML substitution"
            )
        else:
            values[name] = value.replace("\\", "\\\\").replace('"', '\\"')
    if problems:
        raise EnvMacroError(problems)
    return ENV_MACRO.sub(lambda match: values.get(match.group(1), match.group(0)), text)


class EnvMacroError(Exception):
    """``${env.X}`` substitution failed; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(problems))


def read_macros(declared: Mapping[str, Any], path: str) -> tuple[tuple[Macro, ...], list[str]]:
    """Validate a ``macros:`` mapping; returns the macros in order and the problems."""
    macros = []
    problems = []
    for name, value in declared.items():
        problem = _macro_problem(name, value)
        if problem:
            problems.append(f"{path}.{name}: {problem}")
        else:
            macros.append(Macro(name, value))
    return tuple(macros), problems


def _macro_problem(name: str, value: Any) -> str | None:
    if len(name) > _MAX_NAME_LENGTH:
        return f"macro name '{name}' exceeds maximum length of {_MAX_NAME_LENGTH} characters"
    if not _MACRO_NAME.fullmatch(name):
        return (
            f"macro name '{name}' contains invalid characters, must match pattern ^[a-zA-Z0-9_-]+$"
        )
    if isinstance(value, str):
        if "${" + name + "}" in value:
            return f"macro '{name}' contains self-reference"
    elif not isinstance(value, int | float | bool):
        return (
            f"macro '{name}' has invalid type {_type_name(value)},"
            " must be a scalar type (string, int, float, or bool)"
        )
    if name in RESERVED:
        return f"macro name '{name}' is reserved"
    return None


def model_scope(model_id: str, globals_: Sequence[Macro], local: Sequence[Macro]) -> list[Macro]:
    """``[MODEL_ID] + globals``, model macros replacing a global in place or appended."""
    scope = [Macro(MODEL_ID, model_id), *globals_]
    positions = {macro.name: index for index, macro in enumerate(scope)}
    for macro in local:
        if macro.name in positions:
            scope[positions[macro.name]] = macro
        else:
            positions[macro.name] = len(scope)
            scope.append(macro)
    return scope


def substitute(value: Any, macros: Sequence[Macro]) -> Any:
    """Expand ``macros`` in ``value`` last to first; map keys are left alone."""
    for macro in reversed(macros):
        value = _substitute_one(value, "${" + macro.name + "}", macro.value)
    return value


def _substitute_one(value: Any, slug: str, replacement: Any) -> Any:
    if isinstance(value, str):
        if value == slug:
            return replacement
        if slug in value:
            return value.replace(slug, format_value(replacement))
        return value
    if isinstance(value, dict):
        return {key: _substitute_one(item, slug, replacement) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute_one(item, slug, replacement) for item in value]
    return value


def substitute_keys(
    mapping: Mapping[str, Any], macros: Sequence[Macro]
) -> tuple[dict[str, Any], list[str]]:
    """Expand macros in the *keys* of ``mapping`` (``filters.setParamsByID``).

    Returns the new mapping and one problem per pair of keys that collide.
    """
    result: dict[str, Any] = {}
    origin: dict[str, str] = {}
    problems = []
    for key, item in mapping.items():
        new_key = key
        for macro in reversed(macros):
            new_key = new_key.replace("${" + macro.name + "}", format_value(macro.value))
        if new_key in result:
            problems.append(f'keys "{origin[new_key]}" and "{key}" both resolve to "{new_key}"')
            continue
        origin[new_key] = key
        result[new_key] = item
    return result, problems


def unresolved(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """``(path, macro)`` for every ``${name}`` or ``${env.NAME}`` left in ``value``."""
    if isinstance(value, str):
        seen: dict[str, None] = {}
        seen.update((match.group(0), None) for match in MACRO.finditer(value))
        seen.update((match.group(0), None) for match in ENV_MACRO.finditer(value))
        for macro in seen:
            yield path, macro
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from unresolved(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from unresolved(item, f"{path}[{index}]")
