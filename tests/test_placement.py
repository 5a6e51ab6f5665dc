"""Memory-aware placement: sizes, the resources config, the placement
planner (properties against brute force) and the scheduler around it."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from llamaswap.config import ConfigError, load_config_text
from llamaswap.config.resources import parse_size
from llamaswap.scheduling import Scheduler, Ticket, TicketStage
from llamaswap.scheduling.groups import DEFAULT_GROUP, Group, GroupPlanner
from llamaswap.scheduling.placement import (
    GIB,
    PlacementPlanner,
    ReloadCosts,
    cheapest_cover,
)
from llamaswap.scheduling.planner import IBusyAwarePlanner, SingleModelPlanner
from tests.test_scheduler import RecordingEffects
from tests.test_scheduler_properties import _START_MODES as START_MODES
from tests.test_scheduler_properties import World, play
from tests.test_scheduler_properties import _actions as scheduler_actions


def config(text: str) -> object:
    return load_config_text(text, environ={})


def problems(text: str) -> tuple[str, ...]:
    try:
        load_config_text(text, environ={})
    except ConfigError as error:
        return error.problems
    raise AssertionError("config loaded")


MODELS = """
models:
  a:
    cmd: server --port ${PORT}
    resources: {gpu0: 10GiB, ram: 2GiB}
  b:
    cmd: server --port ${PORT}
    resources: {gpu0: 12GiB}
  c:
    cmd: server --port ${PORT}
    resources: {gpu0: 8GiB, ram: 1GiB}
"""
MACHINE = """
resources:
  gpu0: 24GiB
  ram: 48GiB
"""


class SizeTests(SynchronousTestCase):
    def test_units(self) -> None:
        """Bytes, decimal and binary units, case-insensitive, decimals allowed."""
        self.assertEqual(parse_size(123), 123)
        self.assertEqual(parse_size("123"), 123)
        self.assertEqual(parse_size("24GiB"), 24 * GIB)
        self.assertEqual(parse_size("1.5 GiB"), 3 * GIB // 2)
        self.assertEqual(parse_size("500MB"), 500_000_000)
        self.assertEqual(parse_size("512mib"), 512 * 1024**2)
        self.assertEqual(parse_size("2GB"), 2_000_000_000)

    def test_not_sizes(self) -> None:
        for value in ("", "GiB", "12 parsecs", "-1", -1, True, None, [1], "1e9"):
            self.assertIsNone(parse_size(value), value)


class ResourcesConfigTests(SynchronousTestCase):
    def test_without_resources_nothing_changes(self) -> None:
        """No top-level resources: the routing planner as today, no resources."""
        loaded = config("models:\n  a:\n    cmd: server --port ${PORT}\n")
        self.assertIsNone(loaded.resources)  # type: ignore[attr-defined]
        self.assertIsInstance(loaded.routing.planner, GroupPlanner)  # type: ignore[attr-defined]

    def test_footprints(self) -> None:
        loaded = config(MACHINE + MODELS)
        resources = loaded.resources  # type: ignore[attr-defined]
        self.assertEqual(dict(resources.totals), {"gpu0": 24 * GIB, "ram": 48 * GIB})
        self.assertEqual(resources.bytes_of("a"), {"gpu0": 10 * GIB, "ram": 2 * GIB})
        self.assertEqual(resources.footprints["b"]["gpu0"].source, "declared")
        planner = loaded.routing.planner  # type: ignore[attr-defined]
        self.assertIsInstance(planner, PlacementPlanner)
        # a and b fit together; c beside both does not
        self.assertEqual(planner.evict_set("b", frozenset({"a"})), frozenset())
        self.assertEqual(len(planner.evict_set("c", frozenset({"a", "b"}))), 1)
        self.assertEqual(loaded.warnings, ())  # type: ignore[attr-defined]

    def test_more_than_the_machine(self) -> None:
        text = MACHINE + MODELS.replace("gpu0: 12GiB", "gpu0: 30GiB")
        self.assertEqual(
            problems(text),
            ("models.b.resources.gpu0: 30GiB is more than the machine has (gpu0: 24GiB)",),
        )

    def test_undefined_resource(self) -> None:
        text = MACHINE + MODELS.replace("gpu0: 12GiB", "gpu1: 12GiB")
        self.assertEqual(
            problems(text),
            ("models.b.resources.gpu1: undefined resource 'gpu1' (defined: gpu0, ram)",),
        )

    def test_model_resources_without_machine(self) -> None:
        found = problems(MODELS)
        self.assertIn(
            "models.a.resources.gpu0: undefined resource 'gpu0' (no top-level resources are "
            "defined)",
            found,
        )

    def test_bad_sizes(self) -> None:
        found = problems(
            "resources:\n  gpu0: lots\n  vram: auto\n"
            "models:\n  a:\n    cmd: s ${PORT}\n    resources: {gpu0: many}\n"
        )
        self.assertEqual(
            found,
            (
                "resources.gpu0: must be a size in bytes or with a unit (MB, MiB, GB, GiB), "
                "got 'lots'",
                "resources.vram: 'auto' needs a probe-able name (gpu<N> for an NVIDIA "
                "device, ram for host memory); give the size (a size in bytes or with a unit "
                "(MB, MiB, GB, GiB))",
            ),
        )
        found = problems(
            "resources:\n  gpu0: 1GiB\nmodels:\n  a:\n    cmd: s ${PORT}\n"
            "    resources: {gpu0: many}\n"
        )
        self.assertEqual(
            found,
            (
                "models.a.resources.gpu0: must be a size in bytes or with a unit (MB, MiB, "
                "GB, GiB) or 'estimate', got 'many'",
            ),
        )
        self.assertEqual(
            problems("resources: 12\nmodels:\n  a:\n    cmd: s ${PORT}\n"),
            ("resources: must be a mapping of resource name to size, got 12",),
        )

    def test_undeclared_runs_alone(self) -> None:
        """A model without resources holds the whole machine, said once."""
        loaded = config(MACHINE + MODELS + "  d:\n    cmd: server --port ${PORT}\n")
        self.assertEqual(
            loaded.warnings,  # type: ignore[attr-defined]
            (
                "models.d.resources: not declared; the model needs the whole machine (it runs alone)",
            ),
        )
        planner = loaded.routing.planner  # type: ignore[attr-defined]
        self.assertEqual(planner.evict_set("d", frozenset({"a", "c"})), frozenset({"a", "c"}))
        self.assertEqual(planner.evict_set("a", frozenset({"d"})), frozenset({"d"}))
        source = loaded.resources.footprints["d"]["ram"].source  # type: ignore[attr-defined]
        self.assertEqual(source, "assumed")

    def test_estimate_is_the_whole_resource(self) -> None:
        loaded = config(MACHINE + MODELS.replace("gpu0: 12GiB", "gpu0: estimate"))
        self.assertEqual(
            loaded.warnings,  # type: ignore[attr-defined]
            (
                "models.b.resources.gpu0: cannot estimate (the command names no existing "
                ".gguf file (-m)); the model holds the whole resource (24GiB)",
            ),
        )
        self.assertEqual(
            loaded.resources.bytes_of("b"),  # type: ignore[attr-defined]
            {"gpu0": 24 * GIB},
        )

    def test_groups_still_apply(self) -> None:
        """A swapping group keeps its members apart even when they would fit;
        models in no group are limited by memory only."""
        text = MACHINE + MODELS + "groups:\n  pair:\n    members: [a, c]\n    exclusive: false\n"
        planner = config(text).routing.planner  # type: ignore[attr-defined]
        self.assertEqual(planner.evict_set("c", frozenset({"a"})), frozenset({"a"}))
        self.assertEqual(planner.evict_set("b", frozenset({"a"})), frozenset())
        self.assertEqual(planner.reasons("c", frozenset({"a"}), frozenset({"a"})), {"a": "swap"})

    def test_persistent_models_must_leave_room(self) -> None:
        text = (
            MACHINE
            + MODELS
            + "groups:\n  keep:\n    persistent: true\n    members: [a, c]\n    swap: false\n"
        )
        self.assertEqual(
            problems(text),
            (
                "models.b.resources.gpu0: 12GiB does not fit beside the 18GiB persistent "
                "groups may hold (gpu0: 24GiB)",
            ),
        )
        # a model that needs the whole machine can never run beside them
        self.assertEqual(
            problems(text.replace("groups:", "  d:\n    cmd: server --port ${PORT}\ngroups:")),
            (
                "models.b.resources.gpu0: 12GiB does not fit beside the 18GiB persistent "
                "groups may hold (gpu0: 24GiB)",
                "models.d.resources: needs the whole machine (nothing declared or "
                "estimable), but persistent groups may hold 18GiB of gpu0; declare its "
                "footprint",
            ),
        )
        # a persistent group that swaps holds one member at a time: 10GiB
        loaded = config(text.replace("swap: false", "swap: true"))
        planner = loaded.routing.planner  # type: ignore[attr-defined]
        self.assertEqual(planner.pinned, frozenset({"a", "c"}))


# -- the planner, by properties -------------------------------------------------

RESOURCES = ("gpu0", "ram")


@st.composite
def situations(draw: st.DrawFn) -> tuple[PlacementPlanner, str, frozenset[str], frozenset[str]]:
    """A machine, up to 7 models, a running set that fits, a target, busy
    and pinned models (pinned ones always leave room for every model), and
    integer reload costs."""
    totals = {name: draw(st.integers(1, 40)) for name in RESOURCES}
    names = [f"m{i}" for i in range(draw(st.integers(2, 7)))]
    footprints = {
        model: {
            name: draw(st.integers(0, totals[name])) for name in RESOURCES if draw(st.booleans())
        }
        for model in names
    }
    target = draw(st.sampled_from(names))
    running: set[str] = set()
    used = dict.fromkeys(RESOURCES, 0)
    for model in draw(st.permutations(names)):
        if model == target:
            continue
        if all(used[n] + footprints[model].get(n, 0) <= totals[n] for n in RESOURCES):
            if draw(st.booleans()):
                running.add(model)
                for n, amount in footprints[model].items():
                    used[n] += amount
    pinned: set[str] = set()
    pinned_use = dict.fromkeys(RESOURCES, 0)
    biggest = {n: max(fp.get(n, 0) for fp in footprints.values()) for n in RESOURCES}
    for model in sorted(running):
        fp = footprints[model]
        fits = all(pinned_use[n] + fp.get(n, 0) + biggest[n] <= totals[n] for n in RESOURCES)
        if fits and draw(st.booleans()):
            pinned.add(model)
            for n, amount in fp.items():
                pinned_use[n] += amount
    busy = frozenset(m for m in sorted(running) if draw(st.booleans()))
    costs = {model: draw(st.integers(1, 9)) for model in names}
    planner = PlacementPlanner(totals, footprints, _NoRules(), frozenset(pinned))
    planner.reload_cost = costs.__getitem__  # type: ignore[method-assign]
    return planner, target, frozenset(running), busy


class _NoRules:
    def evict_set(self, target: str, running: frozenset[str]) -> frozenset[str]:
        return frozenset()


def brute_force(
    planner: PlacementPlanner, target: str, stay: frozenset[str], allowed: frozenset[str]
) -> float | None:
    """The lowest summed cost of a subset of ``allowed`` whose eviction makes room."""
    best: float | None = None
    pool = sorted(allowed)
    for size in range(len(pool) + 1):
        for victims in itertools.combinations(pool, size):
            if not planner.shortfall((stay - set(victims)) | {target}):
                cost = sum(planner.reload_cost(m) for m in victims)
                best = cost if best is None or cost < best else best
    return best


class PlacementPropertyTests(SynchronousTestCase):
    def test_interface(self) -> None:
        verifyObject(IBusyAwarePlanner, PlacementPlanner({}, {}, SingleModelPlanner()))

    @settings(max_examples=400, deadline=None)
    @given(situations())
    def test_never_over_budget(self, situation: tuple) -> None:
        planner, target, running, busy = situation
        evict = planner.evict_set_around(target, running, busy)
        self.assertNotIn(target, evict)
        self.assertLessEqual(evict, running)
        self.assertEqual(planner.shortfall((running - evict) | {target}), {})

    @settings(max_examples=400, deadline=None)
    @given(situations())
    def test_never_pinned_and_busy_only_if_needed(self, situation: tuple) -> None:
        planner, target, running, busy = situation
        evict = planner.evict_set_around(target, running, busy)
        self.assertFalse(evict & planner.pinned)
        idle_best = brute_force(planner, target, running, running - planner.pinned - busy)
        if idle_best is not None:
            self.assertFalse(evict & busy)

    @settings(max_examples=400, deadline=None)
    @given(situations())
    def test_minimal_cost(self, situation: tuple) -> None:
        """The evicted set costs what the cheapest brute-force set costs."""
        planner, target, running, busy = situation
        evict = planner.evict_set_around(target, running, busy)
        allowed = running - planner.pinned - busy
        best = brute_force(planner, target, running, allowed)
        if best is None:
            best = brute_force(planner, target, running, running - planner.pinned)
        self.assertEqual(sum(planner.reload_cost(m) for m in evict), best)

    def test_cheapest_cover_none(self) -> None:
        self.assertIsNone(cheapest_cover({"a": {"gpu0": 1}}, {"gpu0": 2}, lambda m: 1.0))
        self.assertEqual(cheapest_cover({}, {"gpu0": 0}, lambda m: 1.0), frozenset())


class ReloadCostTests(SynchronousTestCase):
    def test_rarely_used_models_go_first(self) -> None:
        """With learned costs, the idle model nobody asks for is evicted,
        not the busier one of the same size."""
        now = [0.0]
        costs = ReloadCosts(lambda: now[0])
        totals = {"gpu0": 20 * GIB}
        footprints = {m: {"gpu0": 10 * GIB} for m in ("hot", "cold", "new")}
        planner = PlacementPlanner(totals, footprints, _NoRules()).with_costs(costs)
        for model in ("hot", "cold"):
            costs.loaded(model, 5.0)
        costs.requested("cold")
        now[0] = 1000.0
        for _ in range(20):
            costs.requested("hot")
        self.assertGreater(costs.rate("hot"), costs.rate("cold"))
        self.assertEqual(planner.evict_set("new", frozenset({"hot", "cold"})), frozenset({"cold"}))
        # a slow-loading model is worth keeping even if asked for less often
        costs.loaded("cold", 10_000.0)
        self.assertEqual(planner.evict_set("new", frozenset({"hot", "cold"})), frozenset({"hot"}))
        self.assertIsNone(costs.load_seconds("new"))
        self.assertEqual(costs.rate("new"), 0.0)


class PlacementSchedulerTests(SynchronousTestCase):
    """The scheduler with the placement planner: idle victims are chosen
    around busy models, and a request waits when only busy ones would do."""

    def build(self, models: str, planner: PlacementPlanner) -> None:
        self.effects = RecordingEffects()
        self.states = dict.fromkeys(models, "stopped")
        self.scheduler = Scheduler(
            self.effects, planner, self.states.__getitem__, dict.fromkeys(models, 10)
        )

    def request(self, model: str) -> Ticket:
        ticket = self.scheduler.admit(model)
        assert ticket is not None
        self.scheduler.submit(ticket)
        return ticket

    def serve(self, model: str) -> Ticket:
        """A request for a model that is ready and now busy."""
        self.states[model] = "ready"
        ticket = self.request(model)
        self.assertIs(ticket.stage, TicketStage.GRANTED)
        return ticket

    def finish_swap(self, target: str) -> None:
        evict = next(e for t, e in reversed(self.effects.swaps()) if t == target)
        for model in evict:  # type: ignore[attr-defined]
            self.states[model] = "stopped"
        self.states[target] = "ready"
        self.scheduler.swap_done(target, None)

    def planner(self) -> PlacementPlanner:
        footprints: Mapping[str, Mapping[str, int]] = {
            "a": {"gpu0": 10},
            "b": {"gpu0": 10},
            "c": {"gpu0": 10},
        }
        return PlacementPlanner({"gpu0": 20}, footprints, _NoRules())

    def test_evicts_the_idle_one(self) -> None:
        self.build("abc", self.planner())
        serving = self.serve("a")
        self.states["b"] = "ready"
        self.request("c")
        self.assertEqual(self.effects.swaps(), [("c", frozenset({"b"}))])
        self.scheduler.serve_done(serving)

    def test_waits_for_a_busy_model(self) -> None:
        self.build("abc", self.planner())
        first = self.serve("a")
        second = self.serve("b")
        waiting = self.request("c")
        self.assertIs(waiting.stage, TicketStage.QUEUED)
        self.assertEqual(self.effects.swaps(), [])
        self.scheduler.serve_done(second)
        self.assertEqual(self.effects.swaps(), [("c", frozenset({"b"}))])
        self.finish_swap("c")
        self.assertIs(waiting.stage, TicketStage.GRANTED)
        self.scheduler.serve_done(first)
        self.scheduler.serve_done(waiting)

    def test_two_fit_together(self) -> None:
        self.build("abc", self.planner())
        self.request("a")
        self.request("b")
        self.assertEqual(self.effects.swaps(), [("a", frozenset()), ("b", frozenset())])


# -- the scheduler with the placement planner, by random interleavings ---------

WORLD_MODELS = ("a", "b", "c", "d", "p", "solo")
WORLD_TOTALS = {"gpu0": 24, "ram": 8}
WORLD_FOOTPRINTS: Mapping[str, Mapping[str, int]] = {
    "a": {"gpu0": 10, "ram": 2},
    "b": {"gpu0": 10},
    "c": {"gpu0": 12, "ram": 4},
    "d": {"gpu0": 4, "ram": 4},
    "p": {"gpu0": 2, "ram": 1},
    "solo": {"gpu0": 22, "ram": 7},  # all that the pinned model leaves
}


class BudgetWorld(World):
    """The scheduler property world, also checking after every step that
    the models holding memory (starting, ready, stopping) fit the machine
    and that a pinned model is never evicted."""

    def check(self) -> None:
        super().check()
        holding = frozenset(
            m for m, state in self.states.items() if state in ("starting", "ready", "stopping")
        )
        planner = self.planner
        assert isinstance(planner, PlacementPlanner)
        over = planner.shortfall(holding)
        if over:
            self.fail_check(f"over budget by {over}: {sorted(holding)}")

    def start_swap(self, target: str, evict: frozenset[str]) -> None:
        planner = self.planner
        assert isinstance(planner, PlacementPlanner)
        if evict & planner.pinned:
            self.fail_check(f"swap to {target} evicts pinned {sorted(evict & planner.pinned)}")
        super().start_swap(target, evict)


class PlacementSchedulerPropertyTests(SynchronousTestCase):
    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        actions=scheduler_actions(WORLD_MODELS, [1.0, 10.0, 30.0]),
        start_modes=START_MODES,
        shutdown=st.booleans(),
    )
    def test_never_over_budget(
        self, actions: list[tuple], start_modes: list[str], shutdown: bool
    ) -> None:
        """Random requests, answers, TTL stops, crashes and unloads: the
        scheduler's invariants hold, loaded models always fit, the pinned
        model is never evicted, every request ends."""
        base = GroupPlanner(
            {
                "keep": Group(("p",), persistent=True, exclusive=False),
                DEFAULT_GROUP: Group(swap=False, exclusive=False),
            }
        )
        planner = PlacementPlanner(WORLD_TOTALS, WORLD_FOOTPRINTS, base, frozenset({"p"}))
        world = BudgetWorld(
            planner,
            WORLD_MODELS,
            dict.fromkeys(WORLD_MODELS, 3),
            [],
            max_wait=30.0,
            start_modes=start_modes,
        )
        play(world, actions, shutdown)
        world.check_rest(self)


class SearchBoundTests(SynchronousTestCase):
    def test_many_equal_models(self) -> None:
        """Forty models of one size and cost: the search stays within its
        budget and still frees enough with as few as possible."""
        candidates = {f"m{i:02}": {"gpu0": 10} for i in range(40)}
        chosen = cheapest_cover(candidates, {"gpu0": 150}, lambda m: 1.0)
        assert chosen is not None
        self.assertEqual(len(chosen), 15)

    def test_budget_exhausted_keeps_a_cover(self) -> None:
        """With no budget at all the greedy cover is the answer: still enough."""
        candidates = {"a": {"gpu0": 5}, "b": {"gpu0": 5}, "c": {"gpu0": 10}}
        costs = {"a": 1.0, "b": 1.0, "c": 1.5}
        self.assertEqual(cheapest_cover(candidates, {"gpu0": 10}, costs.__getitem__, 0), {"a", "b"})
        self.assertEqual(cheapest_cover(candidates, {"gpu0": 10}, costs.__getitem__), {"c"})
