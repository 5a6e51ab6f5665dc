"""The swap matrix's set-expression DSL: tokens, parser, syntax tree,
rendering and compilation of named sets (llama-swap §6.3 in docs/design.md).

Each named set is an expression over models::

    expr := and ('|' and)*      alternatives
    and  := atom ('&' atom)*    run together (binds tighter than '|')
    atom := IDENT | '+' SETNAME | '(' expr ')'

Compilation parses every set, resolves identifiers to model ids, checks
references and orders the sets for the solver (:mod:`.matrix`): a referenced
set before the sets using it, otherwise in definition order.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

#: deeper nesting is refused rather than risking Python's recursion limit.
MAX_NESTING = 200


def quote(text: str) -> str:
    """``text`` as a JSON string, the way problems and log lines show names."""
    return json.dumps(text, ensure_ascii=False)


# -- syntax -------------------------------------------------------------------


class DslError(Exception):
    """An expression does not parse; the message is one of §6.3's."""


class TokenKind(enum.Enum):
    IDENT = "identifier"
    AND = "&"
    OR = "|"
    LPAREN = "("
    RPAREN = ")"
    REF = "+"
    END = "end"


@dataclass(frozen=True)
class Token:
    kind: TokenKind
    #: the identifier or set name (without ``+``), else the operator itself.
    text: str
    #: index of the token's first character in the expression.
    position: int


def is_identifier_char(char: str) -> bool:
    """Unicode letters and decimal digits, ``_``, ``-`` and ``.``; anything
    else (``/``, ``:``) needs a var."""
    return char.isalpha() or char.isdecimal() or char in "_-."


_OPERATORS = {
    "&": TokenKind.AND,
    "|": TokenKind.OR,
    "(": TokenKind.LPAREN,
    ")": TokenKind.RPAREN,
}


def tokenize(expression: str) -> tuple[Token, ...]:
    """Split ``expression`` into tokens, ending with an ``END`` token."""
    tokens: list[Token] = []
    index, length = 0, len(expression)
    while index < length:
        char = expression[index]
        if char.isspace():
            index += 1
            continue
        kind = _OPERATORS.get(char)
        if kind is not None:
            tokens.append(Token(kind, char, index))
            index += 1
            continue
        start = index
        if char == "+":
            index += 1
        elif not is_identifier_char(char):
            raise DslError(f"unexpected character {char!r} at position {index}")
        name_start = index
        while index < length and is_identifier_char(expression[index]):
            index += 1
        if char == "+":
            if index == name_start:
                raise DslError(f"expected set name after '+' at position {name_start}")
            tokens.append(Token(TokenKind.REF, expression[name_start:index], start))
        else:
            tokens.append(Token(TokenKind.IDENT, expression[start:index], start))
    tokens.append(Token(TokenKind.END, "", length))
    return tuple(tokens)


@dataclass(frozen=True)
class Ident:
    """A var name or model id; after compilation, always a real model id."""

    name: str


@dataclass(frozen=True)
class SetRef:
    """``+name``: the named set's expression, inlined."""

    name: str


@dataclass(frozen=True)
class AllOf:
    """``a & b & ...``: one combination of each operand, together."""

    operands: tuple[Node, ...]


@dataclass(frozen=True)
class AnyOf:
    """``a | b | ...``: the combinations of any one alternative."""

    alternatives: tuple[Node, ...]


Node = Ident | SetRef | AllOf | AnyOf


def render(node: Node) -> str:
    """The expression with every compound term parenthesised."""
    match node:
        case Ident(name):
            return name
        case SetRef(name):
            return f"+{name}"
        case AllOf(operands):
            return "(" + " & ".join(render(operand) for operand in operands) + ")"
        case AnyOf(alternatives):
            return "(" + " | ".join(render(alt) for alt in alternatives) + ")"


def _unexpected(token: Token, where: str = "") -> DslError:
    if token.kind is TokenKind.END:
        return DslError(f"unexpected token at end of expression{where}")
    shown = f"+{token.text}" if token.kind is TokenKind.REF else token.text
    return DslError(f"unexpected token {quote(shown)}{where} at position {token.position}")


class _Parser:
    def __init__(self, tokens: tuple[Token, ...]) -> None:
        self._tokens = tokens
        self._index = 0
        self._depth = 0

    def _peek(self) -> Token:
        return self._tokens[self._index]

    def _next(self) -> Token:
        token = self._tokens[self._index]
        if token.kind is not TokenKind.END:
            self._index += 1
        return token

    def expression(self) -> Node:
        alternatives = [self._and()]
        while self._peek().kind is TokenKind.OR:
            self._next()
            alternatives.append(self._and())
        return alternatives[0] if len(alternatives) == 1 else AnyOf(tuple(alternatives))

    def _and(self) -> Node:
        operands = [self._atom()]
        while self._peek().kind is TokenKind.AND:
            self._next()
            operands.append(self._atom())
        return operands[0] if len(operands) == 1 else AllOf(tuple(operands))

    def _atom(self) -> Node:
        token = self._next()
        if token.kind is TokenKind.IDENT:
            return Ident(token.text)
        if token.kind is TokenKind.REF:
            return SetRef(token.text)
        if token.kind is TokenKind.LPAREN:
            self._depth += 1
            if self._depth > MAX_NESTING:
                raise DslError(f"expression nested too deeply (more than {MAX_NESTING} levels)")
            inner = self.expression()
            if self._next().kind is not TokenKind.RPAREN:
                raise DslError(f"missing closing parenthesis for '(' at position {token.position}")
            self._depth -= 1
            return inner
        raise _unexpected(token)


def parse(expression: str) -> Node:
    """Parse one set expression; :class:`DslError` when it is malformed."""
    if not expression.strip():
        raise DslError("empty DSL expression")
    parser = _Parser(tokenize(expression))
    root = parser.expression()
    trailing = parser._peek()
    if trailing.kind is not TokenKind.END:
        raise _unexpected(trailing, " after expression")
    return root


# -- compilation ------------------------------------------------------------------


class MatrixCompileError(Exception):
    """The sets do not compile; ``problems`` holds one line per problem."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class CompiledSets:
    """Parsed, resolved and linked sets, ready for the solver."""

    #: each set's syntax tree, identifiers resolved to model ids.
    roots: Mapping[str, Node]
    #: set names in candidate order (referenced sets first).
    order: tuple[str, ...]
    #: each set's expression as written.
    dsl: Mapping[str, str]


@dataclass(frozen=True)
class MatrixSet:
    """One compiled set: identifiers resolved to model ids, references kept."""

    name: str
    dsl: str
    root: Node
    #: every model a combination of this set can contain.
    support: frozenset[str]


def _walk(node: Node) -> Iterable[Node]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, AllOf):
            stack.extend(reversed(current.operands))
        elif isinstance(current, AnyOf):
            stack.extend(reversed(current.alternatives))


def _resolved(node: Node, resolve: Callable[[str], str | None]) -> Node:
    match node:
        case Ident(name):
            return Ident(resolve(name) or name)
        case SetRef():
            return node
        case AllOf(operands):
            return AllOf(tuple(_resolved(operand, resolve) for operand in operands))
        case AnyOf(alternatives):
            return AnyOf(tuple(_resolved(alt, resolve) for alt in alternatives))


def _candidate_order(
    names: list[str], refs: Mapping[str, list[str]]
) -> tuple[list[str], list[str]]:
    """Sets in topological order (referenced first, otherwise definition
    order) and the cycle problems found on the way."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    order: list[str] = []
    problems: list[str] = []

    def visit(name: str) -> None:
        mark = state.get(name)
        if mark == 1:
            problems.append(f"circular reference detected involving set {quote(name)}")
            return
        if mark == 2:
            return
        state[name] = 1
        for dependency in refs.get(name, ()):
            visit(dependency)
        state[name] = 2
        order.append(name)

    for name in names:
        visit(name)
    return order, problems


def compile_sets(
    sets: Mapping[str, str] | Iterable[tuple[str, str]],
    resolve: Callable[[str], str | None],
) -> CompiledSets:
    """Parse, resolve and link ``sets`` (name -> expression, in definition
    order).  ``resolve`` maps an identifier to a real model id (vars first,
    then model ids) or ``None``.  Raises :class:`MatrixCompileError` listing
    every problem."""
    definitions = list(sets.items() if isinstance(sets, Mapping) else sets)
    if not definitions:
        raise MatrixCompileError(["matrix must define at least one set"])
    names = [name for name, _ in definitions]
    defined = set(names)
    problems: list[str] = []
    roots: dict[str, Node] = {}
    refs: dict[str, list[str]] = {}
    for name, dsl in definitions:
        try:
            tree = parse(dsl)
        except DslError as error:
            problems.append(f"set {quote(name)}: {error}")
            continue
        unknown: list[str] = []
        used: list[str] = []
        for node in _walk(tree):
            if isinstance(node, Ident) and resolve(node.name) is None:
                if node.name not in unknown:
                    unknown.append(node.name)
            elif isinstance(node, SetRef) and node.name not in used:
                used.append(node.name)
        problems.extend(
            f"set {quote(name)}: unknown var or model {quote(ident)}" for ident in unknown
        )
        problems.extend(
            f"set {quote(name)} references undefined set {quote(ref)}"
            for ref in used
            if ref not in defined
        )
        roots[name] = _resolved(tree, resolve)
        refs[name] = [ref for ref in used if ref in defined]
    order, cycles = _candidate_order(names, refs)
    problems.extend(cycles)
    if problems:
        raise MatrixCompileError(problems)
    return CompiledSets(roots, tuple(order), dict(definitions))
