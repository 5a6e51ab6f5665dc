"""The swap matrix planner: which running models to evict so a target can
load, solved over the sets compiled by :mod:`.matrix_dsl` (llama-swap §2.4,
§6.3 in docs/design.md).

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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from zope.interface import implementer

from llamaswap.scheduling.matrix_dsl import (
    AllOf,
    AnyOf,
    DslError,
    Ident,
    MatrixCompileError,
    MatrixSet,
    Node,
    SetRef,
    compile_sets,
    quote,
)
from llamaswap.scheduling.planner import ISwapPlanner

__all__ = [
    "DEFAULT_EVICT_COST",
    "DslError",
    "MatrixCompileError",
    "MatrixDecision",
    "MatrixPlanner",
    "MatrixProgram",
    "compile_matrix",
]

DEFAULT_EVICT_COST = 1


def compile_matrix(
    sets: Mapping[str, str] | Iterable[tuple[str, str]],
    resolve: Callable[[str], str | None],
) -> MatrixProgram:
    """Parse, resolve and link ``sets`` (name -> expression, in definition
    order) into a program the planner solves.  ``resolve`` maps an
    identifier to a real model id (vars first, then model ids) or ``None``.
    Raises :class:`MatrixCompileError` listing every problem."""
    compiled = compile_sets(sets, resolve)
    return MatrixProgram(compiled.roots, compiled.order, compiled.dsl)


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
            f"matrix: model={self.target} set={self.set_name} dsl={quote(self.dsl)} "
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
