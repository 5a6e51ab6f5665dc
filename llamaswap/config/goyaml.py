"""YAML read as Go's yaml.v3 reads it (llama-swap's loader): YAML 1.2 plain
scalars (no ``yes``/``no`` booleans, no base 60, no dates), Go's integer
spellings, keys kept as their text and duplicate keys refused.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from llamaswap.config.model import ConfigError
from llamaswap.config.problems import describe

__all__ = ["parse_yaml", "visible_text"]

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
        return str(super().resolve(kind, value, implicit))  # type: ignore[no-untyped-call]

    def construct_mapping(  # type: ignore[override]
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[str, Any]:
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


def parse_yaml(text: str) -> dict[str, Any]:
    try:
        document = yaml.load(text, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}" if mark else ""
        reason = e.problem or e.context
        started = e.context_mark
        if e.problem and e.context and started and (not mark or started.line != mark.line):
            # e.g. an unclosed quote: say where it began, not only where the text ran out
            reason = f"{reason} ({e.context} at line {started.line + 1})"
        raise ConfigError([f"config: invalid YAML{where}: {reason}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"config: invalid YAML: {e}"]) from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError([f"config: top level must be a mapping, got {describe(document)}"])
    return document


def visible_text(text: str) -> list[str]:
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
