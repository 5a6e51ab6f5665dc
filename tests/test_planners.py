"""Tests for the group and matrix swap planners and the routing config."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from llamaswap.config import ConfigError, load_config_text
from llamaswap.config.routing import DEFAULT_MAX_WAIT, RoutingConfig, read_routing
from llamaswap.scheduling.groups import DEFAULT_GROUP, Group, GroupPlanner
from llamaswap.scheduling.matrix import (
    MatrixDecision,
    MatrixPlanner,
    MatrixProgram,
    compile_matrix,
)
from llamaswap.scheduling.matrix_dsl import (
    AllOf,
    AnyOf,
    DslError,
    Ident,
    MatrixCompileError,
    Node,
    SetRef,
    TokenKind,
    parse,
    render,
    tokenize,
)
from llamaswap.scheduling.planner import ISwapPlanner


def identity(name: str) -> str:
    return name


def program(sets: Mapping[str, str] | Sequence[tuple[str, str]]) -> MatrixProgram:
    """Compile with every identifier standing for the model of that name."""
    return compile_matrix(sets, identity)


def planner(sets: Mapping[str, str], costs: Mapping[str, int] | None = None) -> MatrixPlanner:
    return MatrixPlanner(program(sets), costs)


def combinations(node: Node, roots: Mapping[str, Node]) -> Iterator[tuple[str, ...]]:
    """Every combination of ``node`` in expression order: the Cartesian
    expansion the solver must never build."""
    match node:
        case Ident(name):
            yield (name,)
        case SetRef(name):
            yield from combinations(roots[name], roots)
        case AnyOf(alternatives):
            for alternative in alternatives:
                yield from combinations(alternative, roots)
        case AllOf(operands):
            expanded = [list(combinations(operand, roots)) for operand in operands]
            for parts in itertools.product(*expanded):
                yield tuple(itertools.chain.from_iterable(parts))


def count(node: Node, roots: Mapping[str, Node]) -> int:
    match node:
        case Ident():
            return 1
        case SetRef(name):
            return count(roots[name], roots)
        case AnyOf(alternatives):
            return sum(count(alternative, roots) for alternative in alternatives)
        case AllOf(operands):
            total = 1
            for operand in operands:
                total *= count(operand, roots)
            return total


def brute_force(
    compiled: MatrixProgram, target: str, running: frozenset[str], costs: Mapping[str, int]
) -> MatrixDecision:
    """§6.3 read literally: every combination of every set, strict minimum."""
    roots = {mset.name: mset.root for mset in compiled.sets}
    best: tuple[int, str, str, tuple[str, ...]] | None = None
    for mset in compiled.sets:
        for combo in combinations(mset.root, roots):
            if target not in combo:
                continue
            cost = sum(costs.get(model, 1) for model in running if model not in combo)
            if best is None or cost < best[0]:
                best = (cost, mset.name, mset.dsl, combo)
    if best is None:
        cost = sum(costs.get(model, 1) for model in running)
        return MatrixDecision(target, running, None, "", (target,), cost)
    cost, name, dsl, combo = best
    evict = frozenset(model for model in running if model not in combo)
    return MatrixDecision(target, evict, name, dsl, tuple(sorted(set(combo))), cost)


# -- group planner ----------------------------------------------------------------


def two_groups(home: Group, other: Group) -> GroupPlanner:
    return GroupPlanner({"g": home, "h": other})


class GroupPlannerTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """GroupPlanner provides ISwapPlanner."""
        self.assertTrue(verifyObject(ISwapPlanner, GroupPlanner({})))

    def test_group_defaults(self) -> None:
        """A group swaps, is exclusive and is not persistent by default."""
        self.assertEqual(Group(), Group((), swap=True, exclusive=True, persistent=False))

    def test_same_group_swap(self) -> None:
        """Table row: a sibling in a swap:true group is evicted."""
        planner = GroupPlanner({"g": Group(("a", "b"), swap=True)})
        self.assertEqual(planner.evict_set("a", frozenset({"b"})), {"b"})

    def test_same_group_no_swap(self) -> None:
        """Table row: siblings in a swap:false group run together."""
        planner = GroupPlanner({"g": Group(("a", "b", "c"), swap=False)})
        self.assertEqual(planner.evict_set("a", frozenset({"b", "c"})), frozenset())

    def test_other_group_exclusive_not_persistent(self) -> None:
        """Table row: an exclusive home evicts a non-persistent other group."""
        planner = two_groups(Group(("a",), exclusive=True), Group(("x",), persistent=False))
        self.assertEqual(planner.evict_set("a", frozenset({"x"})), {"x"})

    def test_other_group_exclusive_persistent(self) -> None:
        """Table row: a persistent group survives an exclusive home."""
        planner = two_groups(Group(("a",), exclusive=True), Group(("x",), persistent=True))
        self.assertEqual(planner.evict_set("a", frozenset({"x"})), frozenset())

    def test_other_group_not_exclusive(self) -> None:
        """Table row: a non-exclusive home evicts no other group, persistent or not."""
        for persistent in (False, True):
            planner = two_groups(
                Group(("a",), exclusive=False), Group(("x",), persistent=persistent)
            )
            self.assertEqual(planner.evict_set("a", frozenset({"x"})), frozenset())

    def test_persistent_group_still_swaps_internally(self) -> None:
        """A persistent swap:true group evicts its own members."""
        planner = GroupPlanner({"p": Group(("a", "b"), persistent=True)})
        self.assertEqual(planner.evict_set("a", frozenset({"b"})), {"b"})

    def test_non_exclusive_is_one_way(self) -> None:
        """Loading from a non-exclusive group keeps an exclusive group's
        models, but loading from the exclusive group evicts the other's."""
        planner = GroupPlanner(
            {"free": Group(("a", "b"), swap=False, exclusive=False), "solo": Group(("x",))}
        )
        self.assertEqual(planner.evict_set("a", frozenset({"b", "x"})), frozenset())
        self.assertEqual(planner.evict_set("x", frozenset({"a", "b"})), {"a", "b"})

    def test_default_group(self) -> None:
        """Models in no group form the implicit (default) group, which swaps
        and is exclusive."""
        planner = GroupPlanner({"g": Group(("a", "b"), swap=False)})
        self.assertEqual(planner.group_of("m"), DEFAULT_GROUP)
        self.assertEqual(planner.groups[DEFAULT_GROUP], Group())
        self.assertEqual(planner.evict_set("m", frozenset({"a", "b", "n"})), {"a", "b", "n"})
        self.assertEqual(planner.evict_set("a", frozenset({"b", "m"})), {"m"})

    def test_no_groups_one_at_a_time(self) -> None:
        """With no groups every other running model is evicted."""
        planner = GroupPlanner({})
        self.assertEqual(planner.evict_set("a", frozenset({"a", "b", "c"})), {"b", "c"})

    def test_target_running_or_stopping(self) -> None:
        """The target is never evicted, and whether it is in ``running``
        does not change the answer."""
        planner = GroupPlanner({"g": Group(("a", "b"))})
        self.assertEqual(planner.evict_set("a", frozenset({"a", "b"})), {"b"})
        self.assertEqual(planner.evict_set("a", frozenset({"b"})), {"b"})

    def test_member_of_two_groups(self) -> None:
        """A model listed in two groups is refused."""
        self.assertRaises(ValueError, GroupPlanner, {"g": Group(("a",)), "h": Group(("a",))})


# -- DSL --------------------------------------------------------------------------


def compile_problems(sets: Mapping[str, str], known: str = "abcdef") -> tuple[str, ...]:
    def resolve(name: str) -> str | None:
        return name if name in known else None

    try:
        compile_matrix(sets, resolve)
    except MatrixCompileError as error:
        return error.problems
    raise AssertionError("compiled")


class TokenizerTests(SynchronousTestCase):
    def test_tokens(self) -> None:
        """Operators, identifiers and references, positions included;
        whitespace is ignored."""
        tokens = tokenize(" a&(b | +s)")
        self.assertEqual(
            [(t.kind, t.text, t.position) for t in tokens],
            [
                (TokenKind.IDENT, "a", 1),
                (TokenKind.AND, "&", 2),
                (TokenKind.LPAREN, "(", 3),
                (TokenKind.IDENT, "b", 4),
                (TokenKind.OR, "|", 6),
                (TokenKind.REF, "s", 8),
                (TokenKind.RPAREN, ")", 10),
                (TokenKind.END, "", 11),
            ],
        )

    def test_identifier_characters(self) -> None:
        """Identifiers take Unicode letters, digits, '_', '-' and '.'."""
        tokens = tokenize("qwen2.5-7B_q4 & modèle_ß & 模型")
        self.assertEqual(
            [t.text for t in tokens if t.kind is TokenKind.IDENT],
            ["qwen2.5-7B_q4", "modèle_ß", "模型"],
        )

    def test_slash_and_colon_need_a_var(self) -> None:
        """'/' and ':' are not identifier characters."""
        for text, char, position in (("org/model", "/", 3), ("m:latest", ":", 1)):
            with self.assertRaises(DslError) as caught:
                tokenize(text)
            self.assertEqual(
                str(caught.exception), f"unexpected character {char!r} at position {position}"
            )

    def test_reference_needs_a_name(self) -> None:
        """A '+' not followed by a set name is an error."""
        with self.assertRaises(DslError) as caught:
            tokenize("a & + b")
        self.assertEqual(str(caught.exception), "expected set name after '+' at position 5")


class ParserTests(SynchronousTestCase):
    def test_and_binds_tighter(self) -> None:
        """``a | b & c`` is ``a | (b & c)``; parentheses override."""
        self.assertEqual(parse("a | b & c"), AnyOf((Ident("a"), AllOf((Ident("b"), Ident("c"))))))
        self.assertEqual(render(parse("(a | b) & c")), "((a | b) & c)")

    def test_flat_operators(self) -> None:
        """Chains of one operator are one n-ary node."""
        self.assertEqual(render(parse("a & b & c | d | +s")), "((a & b & c) | d | +s)")

    def test_redundant_parentheses(self) -> None:
        """Parentheses around an atom add nothing."""
        self.assertEqual(parse("((a))"), Ident("a"))

    def test_compile_errors(self) -> None:
        """Every §6.3 compile error, prefixed with the set it is in."""
        cases = {
            "": 'set "s": empty DSL expression',
            "   ": 'set "s": empty DSL expression',
            "(a | b": "set \"s\": missing closing parenthesis for '(' at position 0",
            "a & ": 'set "s": unexpected token at end of expression',
            "a | ) ": 'set "s": unexpected token ")" at position 4',
            "a b": 'set "s": unexpected token "b" after expression at position 2',
            "(a) (b)": 'set "s": unexpected token "(" after expression at position 4',
            "a & b/c": "set \"s\": unexpected character '/' at position 5",
            "a & +": "set \"s\": expected set name after '+' at position 5",
            "a & x": 'set "s": unknown var or model "x"',
            "a & +nope": 'set "s" references undefined set "nope"',
        }
        for dsl, message in cases.items():
            self.assertEqual(compile_problems({"s": dsl}), (message,), dsl)

    def test_circular_references(self) -> None:
        """A cycle of references, including a set naming itself, is refused."""
        self.assertEqual(
            compile_problems({"s": "a & +t", "t": "b | +s"}),
            ('circular reference detected involving set "s"',),
        )
        self.assertEqual(
            compile_problems({"s": "a | +s"}), ('circular reference detected involving set "s"',)
        )

    def test_all_problems_at_once(self) -> None:
        """Problems of every set are reported together."""
        self.assertEqual(
            compile_problems({"s": "a & x & x & y", "t": "(b", "u": "+v"}),
            (
                'set "s": unknown var or model "x"',
                'set "s": unknown var or model "y"',
                "set \"t\": missing closing parenthesis for '(' at position 0",
                'set "u" references undefined set "v"',
            ),
        )

    def test_no_sets(self) -> None:
        """A matrix needs a set."""
        self.assertEqual(compile_problems({}), ("matrix must define at least one set",))

    def test_resolution(self) -> None:
        """Identifiers resolve through the resolver (vars before models)."""
        variables = {"big": "org/big:70b", "a": "model-b"}
        compiled = compile_matrix(
            {"s": "big & a"}, lambda name: variables.get(name, name if name == "a" else None)
        )
        self.assertEqual(render(compiled.sets[0].root), "(org/big:70b & model-b)")
        self.assertEqual(compiled.models, {"org/big:70b", "model-b"})

    def test_deep_nesting_refused(self) -> None:
        """Absurd nesting is a compile error, not a crash."""
        problems = compile_problems({"s": "(" * 300 + "a" + ")" * 300})
        self.assertEqual(
            problems, ('set "s": expression nested too deeply (more than 200 levels)',)
        )


# -- solver -----------------------------------------------------------------------


class MatrixSolverTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """MatrixPlanner provides ISwapPlanner."""
        self.assertTrue(verifyObject(ISwapPlanner, planner({"s": "a"})))

    def test_subset_semantics(self) -> None:
        """A combination permits its subsets: loading b next to a keeps a,
        and models outside the combination are evicted."""
        matrix = planner({"s": "a & b & c"})
        self.assertEqual(matrix.evict_set("b", frozenset({"a"})), frozenset())
        self.assertEqual(matrix.evict_set("b", frozenset({"a", "d"})), {"d"})

    def test_alternatives(self) -> None:
        """The combination keeping the most running models wins."""
        matrix = planner({"s": "(a | b) & (c | d)"})
        self.assertEqual(matrix.evict_set("a", frozenset({"b", "d"})), {"b"})
        self.assertEqual(matrix.evict_set("c", frozenset({"a", "b", "d"})), {"b", "d"})

    def test_definition_order_tie_break(self) -> None:
        """Equal costs: the set defined first wins."""
        decision = planner({"first": "t & a", "second": "t & b"}).explain(
            "t", frozenset({"a", "b"})
        )
        self.assertEqual((decision.set_name, decision.evict), ("first", {"b"}))
        decision = planner({"second": "t & b", "first": "t & a"}).explain(
            "t", frozenset({"a", "b"})
        )
        self.assertEqual((decision.set_name, decision.evict), ("second", {"a"}))

    def test_topological_order_tie_break(self) -> None:
        """A referenced set is a candidate before the sets referencing it,
        even when defined after them."""
        compiled = program({"main": "+helper | t & b", "other": "t & c", "helper": "t & a"})
        self.assertEqual([mset.name for mset in compiled.sets], ["helper", "main", "other"])
        decision = MatrixPlanner(compiled).explain("t", frozenset({"a", "b", "c"}))
        self.assertEqual((decision.set_name, decision.evict), ("helper", {"b", "c"}))

    def test_expression_order_tie_break(self) -> None:
        """Equal costs within a set: the earlier combination wins, even where
        dominance pruning reorders the projected masks."""
        matrix = planner({"s": "(a | b | b & c | a & c) & t & c"})
        self.assertEqual(matrix.evict_set("t", frozenset({"a", "b", "c"})), {"b"})
        matrix = planner({"s": "(a | a & c) & (b | c & d) & t"})
        self.assertEqual(matrix.evict_set("t", frozenset({"a", "b", "c", "d"})), {"b"})

    def test_evict_costs_keep_the_expensive_model(self) -> None:
        """A costly model stays; cheaper ones are evicted instead."""
        sets = {"s": "t & (big | small1 & small2)"}
        running = frozenset({"big", "small1", "small2"})
        self.assertEqual(planner(sets).evict_set("t", running), {"big"})
        decision = planner(sets, {"big": 5}).explain("t", running)
        self.assertEqual((decision.evict, decision.cost), ({"small1", "small2"}, 2))

    def test_in_no_set_runs_alone(self) -> None:
        """A model in no set evicts everything running."""
        decision = planner({"s": "a & b"}).explain("z", frozenset({"a", "b"}))
        self.assertEqual(decision.evict, {"a", "b"})
        self.assertIsNone(decision.set_name)
        self.assertEqual(decision.combination, ("z",))

    def test_target_running(self) -> None:
        """A target already running evicts nothing."""
        matrix = planner({"s": "a | b"})
        self.assertEqual(matrix.evict_set("a", frozenset({"a", "b"})), frozenset())
        self.assertTrue(matrix.explain("a", frozenset({"a", "b"})).already_running)

    def test_stopping_target_restart(self) -> None:
        """A stopping target, passed without itself in ``running``, gets the
        evictions it needs (llama-swap skips them)."""
        matrix = planner({"s": "a | b"})
        self.assertEqual(matrix.evict_set("a", frozenset({"b"})), {"b"})

    def test_nothing_running(self) -> None:
        """With nothing running the first set containing the target is used."""
        decision = planner({"s": "a & b", "t": "c & d"}).explain("c", frozenset())
        self.assertEqual((decision.set_name, decision.evict, decision.cost), ("t", frozenset(), 0))
        self.assertEqual(decision.combination, ("c", "d"))

    def test_referenced_sets_are_candidates(self) -> None:
        """A set used only through ``+ref`` is still a candidate, and
        references inline the referenced expression."""
        matrix = planner({"main": "x & +pair", "pair": "a & b | c"})
        decision = matrix.explain("a", frozenset({"b"}))
        self.assertEqual((decision.set_name, decision.evict), ("pair", frozenset()))
        decision = matrix.explain("x", frozenset({"c", "a", "b"}))
        self.assertEqual((decision.set_name, decision.evict), ("main", {"c"}))

    def test_decision_record(self) -> None:
        """``explain`` names the set, the combination and the cost, and
        ``describe`` makes one log line of it."""
        decision = planner({"s": "(a | b) & c"}).explain("c", frozenset({"a", "b"}))
        self.assertEqual(
            decision,
            MatrixDecision("c", frozenset({"b"}), "s", "(a | b) & c", ("a", "c"), 1),
        )
        self.assertEqual(
            decision.describe(),
            'matrix: model=c set=s dsl="(a | b) & c" evict=[b] target=[a,c] cost=1',
        )

    def test_more_than_64_relevant_models(self) -> None:
        """Masks are unbounded: 200 models, 99 of them running."""
        sets = {"pairs": " & ".join(f"(m{i} | n{i})" for i in range(100))}
        running = frozenset({f"m{i}" for i in range(50)} | {f"n{i}" for i in range(50, 99)})
        self.assertEqual(planner(sets).evict_set("m99", running), frozenset())
        self.assertEqual(planner(sets).evict_set("m99", running | {"n7"}), {"n7"})
        self.assertEqual(planner(sets, {"n7": 3}).evict_set("m99", running | {"n7"}), {"m7"})

    def test_million_combinations(self) -> None:
        """Six nested choices of ten models (10**6 combinations) solve
        correctly without expansion."""
        groups = [" | ".join(f"x{g}_{i}" for i in range(10)) for g in range(6)]
        dsl = f"({groups[0]})"
        for group in groups[1:]:
            dsl = f"({dsl} & ({group}))"
        compiled = program({"s": dsl})
        self.assertEqual(count(compiled.sets[0].root, {}), 10**6)
        running = frozenset({"x0_1", "x1_2", "x1_3", "x5_9", "x3_7"})
        decision = MatrixPlanner(compiled).explain("x3_4", running)
        self.assertEqual((decision.evict, decision.cost), ({"x1_3", "x3_7"}, 2))
        self.assertEqual(decision.combination, ("x0_1", "x1_2", "x2_0", "x3_4", "x4_0", "x5_9"))
        costly = MatrixPlanner(compiled, {"x1_3": 5})
        self.assertEqual(costly.evict_set("x3_4", running), {"x1_2", "x3_7"})

    def test_deep_nesting(self) -> None:
        """Twenty levels of ``(E & (p | q)) | r`` (over three million
        combinations): only the full path holds the innermost model."""
        dsl = "(p0 | q0)"
        for level in range(1, 21):
            dsl = f"(({dsl}) & (p{level} | q{level})) | r{level}"
        compiled = program({"s": dsl})
        self.assertGreater(count(compiled.sets[0].root, {}), 3 * 10**6)
        matrix = MatrixPlanner(compiled)
        running = frozenset({"q3", "p3", "r5", "p7", "q20"})
        self.assertEqual(matrix.evict_set("p0", running), {"q3", "r5"})
        self.assertEqual(matrix.evict_set("r5", running - {"r5"}), {"p3", "q3"})
        self.assertEqual(matrix.evict_set("r20", running), running)

    def test_invalid_costs(self) -> None:
        """Costs must be positive."""
        self.assertRaises(ValueError, MatrixPlanner, program({"s": "a"}), {"a": 0})


models = st.sampled_from("abcdef")


@st.composite
def matrices(draw: st.DrawFn) -> dict[str, str]:
    """1-3 small random sets; references follow a random acyclic order."""
    names = [f"s{i}" for i in range(draw(st.integers(1, 3)))]
    acyclic = draw(st.permutations(names))
    sets: dict[str, str] = {}
    for name in names:
        earlier = acyclic[: acyclic.index(name)]
        leaf = models | st.sampled_from(earlier).map(lambda ref: f"+{ref}") if earlier else models
        expression = draw(
            st.recursive(
                leaf,
                lambda inner: st.tuples(
                    st.sampled_from([" & ", " | "]), st.lists(inner, min_size=2, max_size=3)
                ).map(lambda pair: "(" + pair[0].join(pair[1]) + ")"),
                max_leaves=8,
            )
        )
        sets[name] = expression
    return sets


class MatrixPropertyTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        sets=matrices(),
        target=st.sampled_from("abcdefz"),
        running=st.frozensets(st.sampled_from("abcdefz")),
        costs=st.dictionaries(st.sampled_from("abcdefz"), st.integers(1, 3)),
    )
    def test_matches_cartesian_expansion(
        self, sets: dict[str, str], target: str, running: frozenset[str], costs: dict[str, int]
    ) -> None:
        """The projected solver decides exactly as the full Cartesian
        expansion: same set, evictions, cost and combination."""
        compiled = program(sets)
        roots = {mset.name: mset.root for mset in compiled.sets}
        assume(sum(count(root, roots) for root in roots.values()) <= 5000)
        running = running - {target}
        expected = brute_force(compiled, target, running, costs)
        matrix = MatrixPlanner(compiled, costs)
        self.assertEqual(matrix.explain(target, running), expected)
        self.assertEqual(matrix.evict_set(target, running), expected.evict)
        self.assertEqual(matrix.evict_set(target, running | {target}), frozenset())


# -- routing config ---------------------------------------------------------------

MODELS = ("a", "b", "c", "org/big")
ALIASES = {"aa": "a", "bb": "b"}


def routing_of(document: Mapping[str, Any]) -> RoutingConfig:
    """``Config.routing`` of a config with MODELS and ALIASES plus ``document``
    (ConfigError when invalid)."""
    models: dict[str, Any] = {mid: {"cmd": "srv --port ${PORT}"} for mid in MODELS}
    for alias, mid in ALIASES.items():
        models[mid].setdefault("aliases", []).append(alias)
    text = yaml.safe_dump({"models": models, **document}, sort_keys=False)
    return load_config_text(text, environ={}).routing


def problems(document: Mapping[str, Any]) -> list[str]:
    return read_routing(document, MODELS, ALIASES)[1]


def router(settings: Mapping[str, Any], use: str | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"settings": settings}
    if use is not None:
        block["use"] = use
    return {"routing": {"router": block}}


S = "routing.router.settings"


class RoutingTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """No routing: one model at a time, no priorities, maxWait 30 s."""
        routing = routing_of({})
        self.assertIsInstance(routing, RoutingConfig)
        self.assertIsInstance(routing.planner, GroupPlanner)
        self.assertEqual(routing.planner.evict_set("a", frozenset({"b", "c"})), {"b", "c"})
        self.assertEqual((dict(routing.priorities), routing.max_wait), ({}, DEFAULT_MAX_WAIT))
        self.assertEqual(routing.router, "group")

    def test_groups(self) -> None:
        """Groups are read with their defaults; the rest join (default)."""
        routing = routing_of(router({"groups": {"g": {"swap": False, "members": ["a", "bb"]}}}))
        group_planner = routing.planner
        assert isinstance(group_planner, GroupPlanner)
        self.assertEqual(group_planner.groups["g"], Group(("a", "b"), swap=False))
        self.assertEqual(group_planner.groups[DEFAULT_GROUP].members, ("c", "org/big"))
        self.assertEqual(group_planner.evict_set("a", frozenset({"b", "c"})), {"c"})

    def test_legacy_groups(self) -> None:
        """Top-level ``groups:`` still works."""
        routing = routing_of({"groups": {"g": {"members": ["a"]}}})
        assert isinstance(routing.planner, GroupPlanner)
        self.assertEqual(routing.planner.group_of("a"), "g")

    def test_group_problems(self) -> None:
        """Unknown, duplicate and shared members and bad flags, by key path."""
        document = router(
            {
                "groups": {
                    "g1": {"members": ["a", "x", "a", 3], "swap": "yes"},
                    "g2": {"members": ["aa", "b"]},
                    "g3": {"members": ["b"]},
                    "(default)": {},
                    "g4": ["c"],
                }
            }
        )
        self.assertEqual(
            problems(document),
            [
                f'{S}.groups.g1.members: unknown model "x"',
                f'{S}.groups.g1.members: duplicate model member "a"',
                f"{S}.groups.g1.members[3]: must be a string, got 3",
                f"{S}.groups.g1.swap: must be true or false, got 'yes'",
                f'{S}.groups.(default): the group id "(default)" is reserved',
                f"{S}.groups.g4: must be a mapping, got a list",
                f'{S}.groups: model member "a" is used in multiple groups ("g1", "g2")',
                f'{S}.groups: model member "b" is used in multiple groups ("g2", "g3")',
            ],
        )
        self.assertRaises(ConfigError, routing_of, document)

    def test_matrix(self) -> None:
        """The matrix router: vars, costs by var or id, sets in order."""
        routing = routing_of(
            router(
                {
                    "matrix": {
                        "vars": {"big": "org/big"},
                        "evict_costs": {"big": 4, "a": 2},
                        "sets": {"solo": "big", "pair": "a & (b | c)"},
                    }
                },
                use="matrix",
            )
        )
        matrix = routing.planner
        assert isinstance(matrix, MatrixPlanner)
        self.assertEqual(routing.router, "matrix")
        self.assertEqual(dict(matrix.evict_costs), {"org/big": 4, "a": 2})
        self.assertEqual([mset.name for mset in matrix.program.sets], ["solo", "pair"])
        self.assertEqual(matrix.evict_set("b", frozenset({"a", "c"})), {"c"})

    def test_matrix_problems(self) -> None:
        """Var names and targets, costs, sets and DSL errors, by key path."""
        document = router(
            {
                "matrix": {
                    "vars": {"bad_name": "a", "v": "aa", "w": "nope", "ok": "b"},
                    "evict_costs": {"zz": 1, "a": 0, "ok": 2, "b": 3},
                    "sets": {"s": "a & x", "t": "+u"},
                }
            },
            use="matrix",
        )
        M = f"{S}.matrix"
        self.assertEqual(
            problems(document),
            [
                f"{M}.vars.bad_name: var name must match ^[a-zA-Z0-9.-]{{1,32}}$",
                f'{M}.vars.v: "aa" is an alias; vars must name a model id ("a")',
                f'{M}.vars.w: unknown model "nope"',
                f'{M}.evict_costs: unknown var or model "zz"',
                f"{M}.evict_costs.a: must be a positive integer, got 0",
                f'{M}.evict_costs: "ok" and "b" both set the cost of model "b"',
                f'{M}.sets: set "s": unknown var or model "x"',
                f'{M}.sets: set "t" references undefined set "u"',
            ],
        )

    def test_matrix_needs_sets(self) -> None:
        """Empty or missing sets, and non-string expressions, are refused."""
        self.assertEqual(
            problems({"matrix": {"sets": {}}}), ["matrix.sets: must define at least one set"]
        )
        self.assertEqual(
            problems({"matrix": {"sets": {"s": ["a"]}}}),
            ["matrix.sets.s: must be a DSL string, got a list"],
        )

    def test_use_matrix_without_matrix(self) -> None:
        """``use: matrix`` needs ``settings.matrix``."""
        self.assertEqual(
            problems(router({"groups": {}}, use="matrix")),
            [f"routing.router.use: is 'matrix' but {S}.matrix is not set"],
        )

    def test_use_selects_one(self) -> None:
        """Under settings both may be defined; only the one in use is read."""
        settings = {"groups": {"g": {"members": ["nope"]}}, "matrix": {"sets": {"s": "a"}}}
        self.assertIsInstance(routing_of(router(settings, use="matrix")).planner, MatrixPlanner)
        self.assertEqual(
            problems(router(settings)), [f'{S}.groups.g.members: unknown model "nope"']
        )

    def test_unknown_router_and_scheduler(self) -> None:
        """Only ``group``/``matrix`` routers and the ``fifo`` scheduler exist."""
        self.assertEqual(
            problems({"routing": {"router": {"use": "mesh"}, "scheduler": {"use": "lifo"}}}),
            [
                "routing.router.use: unknown router 'mesh' (valid: group, matrix)",
                "routing.scheduler.use: unknown scheduler 'lifo' (valid: fifo)",
            ],
        )

    def test_legacy_and_new_style_exclusive(self) -> None:
        """Legacy top-level keys cannot be mixed with routing.router, nor
        legacy groups with legacy matrix."""
        mixed = {"groups": {"g": {"members": ["a"]}}, **router({}, use="group")}
        self.assertEqual(
            problems(mixed),
            [
                "groups: the legacy top-level 'groups'/'matrix' keys cannot be combined with "
                "the 'routing.router' block; move them under routing.router.settings"
            ],
        )
        both = {"groups": {"g": {"members": ["a"]}}, "matrix": {"sets": {"s": "a"}}}
        self.assertEqual(
            problems(both),
            ["matrix: cannot be used together with the top-level 'groups'; use one or the other"],
        )

    def test_priorities(self) -> None:
        """Priorities are keyed by real model id, aliases included, and
        maxWait is read in seconds."""
        document = {
            "routing": {
                "scheduler": {
                    "settings": {"fifo": {"priority": {"aa": 5, "b": -1}, "maxWait": 2.5}}
                }
            }
        }
        routing = routing_of(document)
        self.assertEqual(dict(routing.priorities), {"a": 5, "b": -1})
        self.assertEqual(routing.max_wait, 2.5)

    def test_priority_problems(self) -> None:
        """Unknown keys, non-integers, conflicting alias/id keys, bad maxWait."""
        fifo = {"priority": {"x": 1, "b": "high", "a": 1, "aa": 2}, "maxWait": -1}
        P = "routing.scheduler.settings.fifo"
        self.assertEqual(
            problems({"routing": {"scheduler": {"settings": {"fifo": fifo}}}}),
            [
                f'{P}.priority: unknown model "x"',
                f"{P}.priority.b: must be an integer, got 'high'",
                f'{P}.priority: "a" and "aa" both set the priority of model "a"',
                f"{P}.maxWait: must be >= 0, got -1",
            ],
        )

    def test_shapes(self) -> None:
        """Non-mappings where mappings belong are reported, not crashed on."""
        self.assertEqual(
            problems({"routing": {"router": ["group"], "scheduler": {"settings": 3}}}),
            [
                "routing.router: must be a mapping, got a list",
                "routing.scheduler.settings: must be a mapping, got 3",
            ],
        )

    def test_config_error(self) -> None:
        """Loading raises one ConfigError with every routing problem line."""
        with self.assertRaises(ConfigError) as caught:
            routing_of({"routing": {"router": {"use": "mesh"}}})
        self.assertEqual(
            caught.exception.problems,
            ("routing.router.use: unknown router 'mesh' (valid: group, matrix)",),
        )

    def test_from_yaml(self) -> None:
        """The loader's document works as is, set order from the YAML."""
        loaded = load_config_text(
            """
models:
  "org/m:1":
    cmd: srv --port ${PORT}
  small:
    cmd: srv --port ${PORT}
routing:
  router:
    use: matrix
    settings:
      matrix:
        vars:
          m1: "org/m:1"
        sets:
          zz: small
          aa: m1 & small
"""
        )
        matrix = loaded.routing.planner
        assert isinstance(matrix, MatrixPlanner)
        self.assertEqual([mset.name for mset in matrix.program.sets], ["zz", "aa"])
        self.assertEqual(matrix.evict_set("org/m:1", frozenset({"small"})), frozenset())
