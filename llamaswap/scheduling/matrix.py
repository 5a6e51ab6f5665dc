"""The swap matrix: a small set-expression DSL and the planner solving it
(llama-swap §2.4, §6.3 in docs/design.md).

Each named set is an expression over models::

    expr := and ('|' and)*      alternatives
    and  := atom ('&' atom)*    run together (binds tighter than '|')
    atom := IDENT | '+' SETNAME | '(' expr ')'

An expression denotes a family of model combinations; a combination permits
any of its subsets to run together (subset semantics).  To load a target X
while R runs, the planner picks, over every set in candidate order and every
combination containing X, the one leaving out the cheapest part of R (each
model costs its ``evict_costs`` entry, default 1) and evicts that part.  Ties
keep the earlier candidate: sets in topological order of their ``+``
references (a referenced set before the sets using it), otherwise in
definition order, then combinations in expression order (alternatives left to
right, the operands of ``&`` varying rightmost fastest).  A model in no set
runs alone.

The solver never expands the Cartesian product.  It projects every
sub-expression onto the models that matter for one question, {X} ∪ R, as
bitmasks (Python ints, so any number of models), memoises per node and keeps
only the maximal masks: costs are positive, so a superset is never worse.
When the winning set has several optimal masks, a second pass walks down
the tree, guided by the same masks, to the first optimal combination in
expression order, so ties break exactly as a full expansion would.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from zope.interface import implementer

from llamaswap.scheduling.planner import ISwapPlanner

#: deeper nesting is refused rather than risking Python's recursion limit.
MAX_NESTING = 200
DEFAULT_EVICT_COST = 1


def _quote(text: str) -> str:
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
    return DslError(f"unexpected token {_quote(shown)}{where} at position {token.position}")


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
            problems.append(f"circular reference detected involving set {_quote(name)}")
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


def compile_matrix(
    sets: Mapping[str, str] | Iterable[tuple[str, str]],
    resolve: Callable[[str], str | None],
) -> MatrixProgram:
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
            problems.append(f"set {_quote(name)}: {error}")
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
            f"set {_quote(name)}: unknown var or model {_quote(ident)}" for ident in unknown
        )
        problems.extend(
            f"set {_quote(name)} references undefined set {_quote(ref)}"
            for ref in used
            if ref not in defined
        )
        roots[name] = _resolved(tree, resolve)
        refs[name] = [ref for ref in used if ref in defined]
    order, cycles = _candidate_order(names, refs)
    problems.extend(cycles)
    if problems:
        raise MatrixCompileError(problems)
    return MatrixProgram(roots, order, dict(definitions))


# -- solving --------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixDecision:
    """What the matrix planner decided for one load, for logging."""

    target: str
    evict: frozenset[str]
    #: the winning set; ``None`` when no set contains the target (it runs
    #: alone) or when the target is already running (nothing to decide).
    set_name: str | None = None
    dsl: str = ""
    #: the winning combination (every model in it, sorted); ``(target,)``
    #: when the target runs alone.
    combination: tuple[str, ...] = ()
    #: summed evict costs of ``evict``.
    cost: int = 0
    already_running: bool = False

    def describe(self) -> str:
        """One log line, in llama-swap's shape."""
        evict = ",".join(sorted(self.evict))
        if self.already_running:
            return f"matrix: model={self.target} already running"
        if self.set_name is None:
            return f"matrix: model={self.target} in no set, runs alone evict=[{evict}] cost={self.cost}"
        return (
            f"matrix: model={self.target} set={self.set_name} dsl={_quote(self.dsl)} "
            f"evict=[{evict}] target=[{','.join(self.combination)}] cost={self.cost}"
        )


def _add_maximal(frontier: list[int], mask: int) -> None:
    """Add ``mask`` to an antichain of masks, keeping only maximal ones."""
    for kept in frontier:
        if mask | kept == kept:
            return
    frontier[:] = [kept for kept in frontier if kept | mask != mask]
    frontier.append(mask)


def _product(left: list[int], right: list[int]) -> list[int]:
    """Maximal masks of the unions of one mask from each side."""
    if left == [0]:
        return right
    if right == [0]:
        return left
    combined: list[int] = []
    for mask in left:
        for other in right:
            _add_maximal(combined, mask | other)
    return combined


# node kinds of the flattened program
_LEAF, _ALL, _ANY = 0, 1, 2


class _Question:
    """One (target, running) question: maximal projected masks per node,
    memoised.  Masks use the program's model bits restricted to the
    relevant models (target and running), so irrelevant subtrees are
    skipped by their support and collapse to the empty mask."""

    def __init__(self, program: MatrixProgram, relevant: int) -> None:
        self._kind = program._kind
        self._children = program._children
        self._support = program._support
        self._relevant = relevant
        self._memo: dict[int, list[int]] = {}

    def masks(self, index: int) -> list[int]:
        cached = self._memo.get(index)
        if cached is not None:
            return cached
        relevant, support = self._relevant, self._support
        kind = self._kind[index]
        inside = support[index] & relevant
        if not inside & (inside - 1):
            # none or one relevant model inside: some combination holds it
            result = [inside]
        elif kind == _ANY:
            result = []
            for child in self._children[index]:
                if support[child] & relevant:
                    for mask in self.masks(child):
                        _add_maximal(result, mask)
                elif not result:
                    result.append(0)  # dominated by whatever comes later
        else:
            result = [0]
            for child in self._children[index]:
                if not support[child] & relevant:
                    continue
                right = self.masks(child)
                if len(result) == 1 and len(right) == 1:
                    result = [result[0] | right[0]]
                else:
                    combined: list[int] = []
                    for left in result:
                        for mask in right:
                            _add_maximal(combined, left | mask)
                    result = combined
        self._memo[index] = result
        return result


class _FirstOptimal:
    """Second pass: the first combination in expression order that reaches
    the optimum.  Walks down the tree choosing, at each ``|``, the first
    alternative that can still be completed to an optimal mask; that is
    decided from the maximal masks of the alternative and of every ``&``
    operand not chosen yet, so nothing is expanded here either."""

    def __init__(self, program: MatrixProgram, question: _Question, optimal: list[int]) -> None:
        self._program = program
        self._question = question
        self._optimal = frozenset(optimal)

    def _completes(self, fixed: int, masks: list[int], pending: list[int]) -> bool:
        # every optimal mask is maximal, so reaching one means equalling it
        optimal = self._optimal
        return any(fixed | mask | rest in optimal for mask in masks for rest in pending)

    def choose(self, index: int, fixed: int, pending: list[int], models: list[str]) -> int:
        """Append the chosen combination of node ``index`` to ``models`` and
        return its mask; ``fixed`` is what is chosen already, ``pending`` the
        maximal masks of everything still to choose outside the node."""
        program, question = self._program, self._question
        kind = program._kind[index]
        if kind == _LEAF:
            models.append(program._model[index])
            return program._support[index] & question._relevant
        children = program._children[index]
        if kind == _ANY:
            for child in children:
                if self._completes(fixed, question.masks(child), pending):
                    return self.choose(child, fixed, pending, models)
            raise AssertionError("no alternative reaches the optimum")
        # contexts[k]: maximal masks of the operands after k, and of `pending`
        contexts = [pending]
        for child in reversed(children[1:]):
            contexts.append(_product(question.masks(child), contexts[-1]))
        contexts.reverse()
        chosen = 0
        for child, context in zip(children, contexts, strict=True):
            chosen |= self.choose(child, fixed | chosen, context, models)
        return chosen


class MatrixProgram:
    """Compiled, immutable sets in candidate order.

    The expressions are flattened into arrays indexed by node (children
    before parents, ``+ref`` pointing at the referenced set's root, nested
    operators of one kind merged, which keeps expression order), each node
    with the bitmask of the models it can contain.
    """

    def __init__(
        self, roots: Mapping[str, Node], order: Iterable[str], dsl: Mapping[str, str]
    ) -> None:
        self._bits: dict[str, int] = {}
        self._kind: list[int] = []
        self._children: list[tuple[int, ...]] = []
        self._support: list[int] = []
        self._model: list[str] = []
        root_index: dict[str, int] = {}
        for name in order:  # referenced sets come first
            root_index[name] = self._flatten(roots[name], root_index)
        self._roots = tuple(root_index[name] for name in order)
        self.sets = tuple(
            MatrixSet(
                name, dsl[name], roots[name], self._models_of(self._support[root_index[name]])
            )
            for name in order
        )

    def _flatten(self, node: Node, root_index: Mapping[str, int]) -> int:
        match node:
            case SetRef(name):
                return root_index[name]
            case Ident(name):
                bit = self._bits.setdefault(name, 1 << len(self._bits))
                return self._add(_LEAF, (), bit, name)
            case AllOf(children) | AnyOf(children):
                kind = _ALL if isinstance(node, AllOf) else _ANY
                flat: list[int] = []
                for child in children:
                    index = self._flatten(child, root_index)
                    if self._kind[index] == kind:
                        flat.extend(self._children[index])
                    else:
                        flat.append(index)
                support = 0
                for index in flat:
                    support |= self._support[index]
                return self._add(kind, tuple(flat), support, "")

    def _add(self, kind: int, children: tuple[int, ...], support: int, model: str) -> int:
        self._kind.append(kind)
        self._children.append(children)
        self._support.append(support)
        self._model.append(model)
        return len(self._kind) - 1

    def _models_of(self, bits: int) -> frozenset[str]:
        return frozenset(model for model, bit in self._bits.items() if bits & bit)

    @property
    def models(self) -> frozenset[str]:
        """Every model named by some set."""
        return frozenset(self._bits)

    def solve(
        self,
        target: str,
        running: frozenset[str],
        evict_costs: Mapping[str, int] | None = None,
        *,
        witness: bool = True,
    ) -> MatrixDecision:
        """The cheapest way to load ``target`` next to ``running`` (without
        ``target``).  With ``witness=False`` the combination is only worked
        out when needed to break a tie (``evict`` is exact either way)."""
        costs = evict_costs or {}
        others = running - {target}
        target_bit = self._bits.get(target, 0)
        if not target_bit:
            total = sum(costs.get(model, DEFAULT_EVICT_COST) for model in others)
            return MatrixDecision(target, others, None, "", (target,), total)
        weights: list[tuple[int, int]] = []
        outside = 0  # running models in no set are always evicted
        relevant = target_bit
        for model in others:
            bit = self._bits.get(model, 0)
            cost = costs.get(model, DEFAULT_EVICT_COST)
            if bit:
                weights.append((bit, cost))
                relevant |= bit
            else:
                outside += cost

        def cost_of(mask: int) -> int:
            return outside + sum(cost for bit, cost in weights if not mask & bit)

        question = _Question(self, relevant)
        best: tuple[int, int, list[int]] | None = None
        for position, root in enumerate(self._roots):
            if not self._support[root] & target_bit:
                continue
            scored = [(cost_of(mask), mask) for mask in question.masks(root) if mask & target_bit]
            lowest = min(cost for cost, _ in scored)
            if best is None or lowest < best[0]:
                best = (lowest, position, [mask for cost, mask in scored if cost == lowest])
                if lowest == outside:
                    break  # no later set can do strictly better
        assert best is not None  # the target's bit is in some set's support
        cost, position, optimal = best
        combination: tuple[str, ...] = ()
        if len(optimal) == 1 and not witness:
            chosen = optimal[0]
        else:
            models: list[str] = []
            chosen = _FirstOptimal(self, question, optimal).choose(
                self._roots[position], 0, [0], models
            )
            combination = tuple(sorted(set(models)))
        evict = frozenset(model for model in others if not chosen & self._bits.get(model, 0))
        mset = self.sets[position]
        return MatrixDecision(target, evict, mset.name, mset.dsl, combination, cost)


@implementer(ISwapPlanner)
class MatrixPlanner:
    """Evictions chosen by the swap matrix.

    As in llama-swap, a ``target`` already in ``running`` evicts nothing: it
    is live, and the models next to it were admitted by earlier solves.  A
    caller restarting a target that is still *stopping* (a TTL or unload stop
    in progress) passes ``running`` without the target, so the evictions the
    restart needs are computed (llama-swap skips them).
    """

    def __init__(
        self, program: MatrixProgram, evict_costs: Mapping[str, int] | None = None
    ) -> None:
        if any(cost <= 0 for cost in (evict_costs or {}).values()):
            raise ValueError(f"evict costs must be > 0: {dict(evict_costs or {})!r}")
        self.program = program
        self.evict_costs = MappingProxyType(dict(evict_costs or {}))

    def evict_set(self, target: str, running: frozenset[str]) -> frozenset[str]:
        if target in running:
            return frozenset()
        return self.program.solve(target, running, self.evict_costs, witness=False).evict

    def explain(self, target: str, running: frozenset[str]) -> MatrixDecision:
        """The decision behind :meth:`evict_set`, with the winning set and
        combination, for a log line."""
        if target in running:
            return MatrixDecision(target, frozenset(), already_running=True)
        return self.program.solve(target, running, self.evict_costs)
