"""Device alternatives (``"gpu0|gpu1": 10GiB``): the config, the planner's
choice (a property: never over budget on any device) and, end to end, the
chosen index in the command (``${DEVICE}``) and ``CUDA_VISIBLE_DEVICES``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import treq
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config.alternatives import device_argv, device_env, device_index
from llamaswap.config.resources import resources_json
from llamaswap.scheduling.placement import GIB, PlacementPlanner
from llamaswap.supervision.process import ProcessState
from tests import test_footprints
from tests.support import poll_until
from tests.test_footprints import FakeDevices, pause
from tests.test_placement import config, problems
from tests.test_placement_service import PlacedServiceCase
from tests.test_service import ServiceTestCase, demo_model

MACHINE = """
resources:
  gpu0: 24GiB
  gpu1: 24GiB
  ram: 48GiB
"""


def models(resources: str, cmd: str = "server --port ${PORT}", extra: str = "") -> str:
    return f"""
models:
  a:
    cmd: {cmd}
    resources: {resources}
{extra}"""


class AlternativesConfigTests(SynchronousTestCase):
    def test_alternatives(self) -> None:
        loaded: Any = config(
            MACHINE
            + models(
                '{"gpu0|gpu1": 20GiB, ram: 2GiB}',
                cmd="server --port ${PORT} --device ${DEVICE}",
                extra='    env: ["HIP_VISIBLE_DEVICES=${DEVICE}"]',
            )
        )
        choice = loaded.resources.alternatives["a"]
        self.assertEqual(
            (choice.key, choice.names, choice.bytes), ("gpu0|gpu1", ("gpu0", "gpu1"), 20 * GIB)
        )
        self.assertEqual(choice.source, "declared")
        self.assertEqual(loaded.resources.bytes_of("a"), {"ram": 2 * GIB})
        # ${DEVICE} survives the load, for the start to fill in
        model = loaded.models["a"]
        self.assertEqual(model.argv[-2:], ("--device", "${DEVICE}"))
        self.assertEqual(model.env, (("HIP_VISIBLE_DEVICES", "${DEVICE}"),))
        planner = loaded.routing.planner
        self.assertEqual(planner.alternatives, {"a": (("gpu0", "gpu1"), 20 * GIB)})
        self.assertEqual(planner.footprint("a"), {"ram": 2 * GIB, "gpu0": 20 * GIB})

    def test_errors(self) -> None:
        self.assertEqual(
            problems(MACHINE + models('{"gpu0|gpu2": 10GiB}')),
            ("models.a.resources.gpu0|gpu2: undefined resource 'gpu2' (defined: gpu0, gpu1, ram)",),
        )
        self.assertEqual(
            problems(
                MACHINE.replace("gpu1: 24GiB", "gpu1: 16GiB") + models('{"gpu0|gpu1": 30GiB}')
            ),
            (
                "models.a.resources.gpu0|gpu1: 30GiB is more than any of them has "
                "(gpu0: 24GiB, gpu1: 16GiB)",
            ),
        )
        self.assertEqual(
            problems(
                MACHINE.replace("gpu0: 24GiB", "gpu0: 16GiB")
                + models('{"gpu0|gpu1": 20GiB, gpu1: 10GiB}')
            ),
            (
                "models.a.resources.gpu0|gpu1: 20GiB does not fit beside the model's own "
                "share of any of them",
            ),
        )
        self.assertEqual(
            problems(MACHINE + models('{"gpu0|ram": 1GiB}')),
            (
                "models.a.resources.gpu0|ram: 'ram' has no device index (an alternative's "
                "name ends in its index, e.g. gpu1)",
            ),
        )
        self.assertEqual(
            problems(MACHINE + models('{"gpu0|gpu1": 1GiB, "gpu1|gpu0": 1GiB}')),
            (
                "models.a.resources.gpu1|gpu0: a model names at most one set of device "
                "alternatives (it has 'gpu0|gpu1' too)",
            ),
        )
        self.assertEqual(
            problems(MACHINE + models('{"gpu0|gpu1": lots}')),
            (
                "models.a.resources.gpu0|gpu1: must be a size in bytes or with a unit "
                "(MB, MiB, GB, GiB) or 'estimate', got 'lots'",
            ),
        )

    def test_device_macro_needs_alternatives(self) -> None:
        self.assertEqual(
            problems(MACHINE + models("{gpu0: 1GiB}", cmd="server --port ${PORT} -dev ${DEVICE}")),
            (
                "models.a.cmd: ${DEVICE} needs device alternatives in models.a.resources "
                '(e.g. "gpu0|gpu1": 10GiB)',
            ),
        )
        no_machine = "models:\n  a:\n    cmd: server --port ${PORT}\n    env: ['X=${DEVICE}']\n"
        self.assertEqual(
            problems(no_machine),
            (
                "models.a.env: ${DEVICE} needs device alternatives in models.a.resources "
                '(e.g. "gpu0|gpu1": 10GiB)',
            ),
        )
        # a user macro named DEVICE still wins, as before
        loaded: Any = config(
            "macros: {DEVICE: cuda}\n"
            + models("{gpu0: 1GiB}").replace("--port ${PORT}", "--port ${PORT} --dev ${DEVICE}")
            + MACHINE
        )
        self.assertEqual(loaded.models["a"].argv[-1], "cuda")
        # elsewhere it stays an unknown macro
        self.assertEqual(
            problems(MACHINE + models('{"gpu0|gpu1": 1GiB}', extra="    cmdStop: stop ${DEVICE}")),
            ("models.a.cmdStop: unknown macro '${DEVICE}'",),
        )

    def test_index_and_substitution(self) -> None:
        self.assertEqual(device_index("gpu1"), "1")
        self.assertEqual(device_index("cuda07"), "7")
        self.assertIsNone(device_index("ram"))
        self.assertEqual(device_argv(("s", "-d", "x${DEVICE}"), "1"), ("s", "-d", "x1"))
        self.assertEqual(device_argv(("s", "${DEVICE}"), None), ("s", "${DEVICE}"))
        self.assertEqual(
            device_env([("A", "${DEVICE}")], "1"), [("CUDA_VISIBLE_DEVICES", "1"), ("A", "1")]
        )
        # the model's own CUDA_VISIBLE_DEVICES wins
        self.assertEqual(
            device_env([("CUDA_VISIBLE_DEVICES", "3,${DEVICE}")], "1"),
            [("CUDA_VISIBLE_DEVICES", "3,1")],
        )
        self.assertEqual(device_env([("A", "b")], None), [("A", "b")])


def _planner(text: str) -> Any:
    loaded: Any = config(text)
    return loaded, loaded.routing.planner


class AlternativesPlannerTests(SynchronousTestCase):
    def setUp(self) -> None:
        body = "".join(
            f"  {m}:\n    cmd: server --port ${{PORT}}\n"
            f'    resources: {{"gpu0|gpu1": 20GiB, ram: 1GiB}}\n'
            for m in ("a", "b", "c")
        )
        self.loaded, self.planner = _planner(MACHINE + "models:\n" + body)

    def test_spread_then_evict(self) -> None:
        planner = self.planner
        self.assertEqual(planner.evict_set("a", frozenset()), frozenset())
        self.assertEqual(planner.device_of("a"), "gpu0")  # a tie: the first
        self.assertEqual(planner.evict_set("b", frozenset({"a"})), frozenset())
        self.assertEqual(planner.device_of("b"), "gpu1")  # fits there without evicting
        self.assertEqual(planner.device_of("a"), "gpu0")  # running: stays put
        planner.reload_cost = {"a": 2.0, "b": 1.0}.__getitem__
        self.assertEqual(planner.evict_set("c", frozenset({"a", "b"})), frozenset({"b"}))
        self.assertEqual(planner.device_of("c"), "gpu1")  # b's device

    def test_only_where_it_fits(self) -> None:
        """A device too small for the model is never chosen, even when
        empty; a busy model is evicted only when no idle one makes room."""
        _, planner = _planner(
            "resources: {gpu0: 16GiB, gpu1: 24GiB}\nmodels:\n"
            + "".join(
                f"  {m}:\n    cmd: server --port ${{PORT}}\n"
                f'    resources: {{"gpu0|gpu1": {size}}}\n'
                for m, size in (("big", "20GiB"), ("small", "10GiB"), ("other", "10GiB"))
            )
        )
        self.assertEqual(planner.evict_set("big", frozenset()), frozenset())
        self.assertEqual(planner.device_of("big"), "gpu1")
        self.assertEqual(planner.evict_set("small", frozenset({"big"})), frozenset())
        self.assertEqual(planner.device_of("small"), "gpu0")
        # other: gpu0 holds small (busy), gpu1 holds big (idle): big goes
        running = frozenset({"big", "small"})
        self.assertEqual(
            planner.evict_set_around("other", running, frozenset({"small"})), frozenset({"big"})
        )
        self.assertEqual(planner.device_of("other"), "gpu1")
        self.assertEqual(
            planner.evict_set_around("other", running, frozenset({"big"})), frozenset({"small"})
        )
        self.assertEqual(planner.device_of("other"), "gpu0")

    def test_resources_report(self) -> None:
        planner = self.planner
        planner.evict_set("a", frozenset())
        states = {"a": "ready"}
        report = resources_json(
            self.loaded.resources, lambda m: states.get(m, "stopped"), device_of=planner.device_of
        )
        self.assertEqual(report["resources"]["gpu0"]["reserved"], 20 * GIB)
        self.assertEqual(report["resources"]["gpu1"]["reserved"], 0)
        self.assertEqual(report["resources"]["ram"]["reserved"], GIB)
        self.assertEqual(
            report["models"]["a"],
            {
                "gpu0": {"bytes": 20 * GIB, "source": "declared", "of": "gpu0|gpu1"},
                "ram": {"bytes": GIB, "source": "declared"},
            },
        )
        self.assertEqual(
            report["models"]["b"]["gpu0|gpu1"], {"bytes": 20 * GIB, "source": "declared"}
        )


# -- never over budget on any device, over sequences of starts -------------------

DEVICES = ("gpu0", "gpu1", "gpu2")


class _NoRules:
    def evict_set(self, target: str, running: frozenset[str]) -> frozenset[str]:
        return frozenset()


@st.composite
def workloads(
    draw: st.DrawFn,
) -> tuple[PlacementPlanner, dict[str, Any], list[tuple[str, frozenset[str]]]]:
    """Devices, models with fixed footprints and/or alternatives (each fits
    alone on at least one of its alternatives), and a sequence of targets
    with random busy sets."""
    totals = {name: draw(st.integers(1, 30)) for name in DEVICES}
    totals["ram"] = draw(st.integers(1, 30))
    names = [f"m{i}" for i in range(draw(st.integers(2, 7)))]
    fixed: dict[str, dict[str, int]] = {}
    alternatives: dict[str, tuple[tuple[str, ...], int]] = {}
    for model in names:
        fixed[model] = {
            n: draw(st.integers(0, totals[n] // 2)) for n in totals if draw(st.booleans())
        }
        if draw(st.booleans()):
            choices = tuple(
                draw(st.lists(st.sampled_from(DEVICES), min_size=1, max_size=3, unique=True))
            )
            room = max(totals[d] - fixed[model].get(d, 0) for d in choices)
            alternatives[model] = (choices, draw(st.integers(0, room)))
    planner = PlacementPlanner(totals, fixed, _NoRules(), alternatives=alternatives)
    costs = {model: draw(st.integers(1, 9)) for model in names}
    planner.reload_cost = costs.__getitem__  # type: ignore[method-assign]
    steps = draw(
        st.lists(
            st.tuples(st.sampled_from(names), st.frozensets(st.sampled_from(names))),
            min_size=1,
            max_size=12,
        )
    )
    world = {"totals": totals, "fixed": fixed, "alternatives": alternatives}
    return planner, world, steps


class AlternativesPropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(workloads())
    def test_never_over_budget_per_device(self, workload: tuple) -> None:
        planner, world, steps = workload
        running: frozenset[str] = frozenset()
        placed: dict[str, str] = {}
        for target, busy in steps:
            evict = planner.evict_set_around(target, running, busy & running)
            self.assertNotIn(target, evict)
            self.assertLessEqual(evict, running)
            for model in running - evict:
                if model in placed:  # a running model never moves
                    self.assertEqual(planner.device_of(model), placed[model])
            running = (running - evict) | {target}
            if target in world["alternatives"]:
                device = planner.device_of(target)
                self.assertIn(device, world["alternatives"][target][0])
                placed.setdefault(target, device)
            for model in evict:
                placed.pop(model, None)
            # counted independently of the planner's own arithmetic
            used = dict.fromkeys(world["totals"], 0)
            for model in running:
                for name, amount in world["fixed"][model].items():
                    used[name] += amount
                if model in world["alternatives"]:
                    used[placed[model]] += world["alternatives"][model][1]
            for name, amount in used.items():
                self.assertLessEqual(amount, world["totals"][name], (name, running, placed))


# -- end to end ------------------------------------------------------------------


def _child(pid: int) -> tuple[list[str], dict[str, str]]:
    """A live child's argv and environment, from /proc."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")[:-1]
    env = dict(pair.decode().split("=", 1) for pair in pairs)
    return [arg.decode() for arg in argv], env


def on_a_device(name: str) -> dict[str, Any]:
    entry = demo_model(name, resources={"gpu0|gpu1": "20GiB", "ram": "1GiB"})
    entry["env"].append("DEMO_DEVICE=gpu${DEVICE}")
    entry["cmd"] = entry["cmd"].replace(f"--model {name}", f"--model {name}-on-${{DEVICE}}")
    return entry


class AlternativesServiceTests(PlacedServiceCase):
    def device(self, model: str) -> tuple[str, str, str]:
        """``--model`` as started, ``CUDA_VISIBLE_DEVICES`` and ``DEMO_DEVICE``."""
        argv, env = _child(self.router.processes[model].pid)
        return argv[argv.index("--model") + 1], env["CUDA_VISIBLE_DEVICES"], env["DEMO_DEVICE"]

    async def test_side_by_side_then_evict(self) -> None:
        await self.start(
            {m: on_a_device(m) for m in ("a", "b", "c")},
            resources={"gpu0": "24GiB", "gpu1": "24GiB", "ram": "8GiB"},
        )
        await self.use("b")
        for _ in range(4):
            await self.use("a")
        self.assertEqual(self.loaded(), ["a", "b"])
        self.assertEqual(self.device("b"), ("b-on-0", "0", "gpu0"))
        self.assertEqual(self.device("a"), ("a-on-1", "1", "gpu1"))
        report = await (await treq.get(self.url + "/api/resources", pool=self.pool)).json()
        self.assertEqual(report["resources"]["gpu0"]["reserved"], 20 * GIB)
        self.assertEqual(report["resources"]["gpu1"]["reserved"], 20 * GIB)
        self.assertEqual(report["models"]["a"]["gpu1"]["of"], "gpu0|gpu1")
        self.assertEqual(
            report["models"]["c"]["gpu0|gpu1"], {"bytes": 20 * GIB, "source": "declared"}
        )
        # c evicts the one asked for less (b) and takes its device
        await self.use("c")
        self.assertEqual(self.loaded(), ["a", "c"])
        self.assertEqual(self.device("c"), ("c-on-0", "0", "gpu0"))
        await poll_until(lambda: self.state("b") is ProcessState.STOPPED)
        report = await (await treq.get(self.url + "/api/resources", pool=self.pool)).json()
        self.assertEqual(report["models"]["c"]["gpu0"]["of"], "gpu0|gpu1")
        self.assertEqual(report["resources"]["gpu0"]["reserved"], 20 * GIB)
        self.assertEqual(json.dumps(report).count('"of"'), 2)
        await self.settled()


class MeasuredAlternativeTests(ServiceTestCase):
    #: the same service on loopback as the footprint tests start
    start = test_footprints.MeasuredServiceTests.start

    async def report(self) -> Any:
        return await (await treq.get(self.url + "/api/resources", pool=self.pool)).json()

    async def use(self, model: str) -> None:
        response = await self.chat(model, max_tokens=2)
        self.assertEqual(response.code, 200, model)
        await response.content()

    async def test_measured_on_its_device(self) -> None:
        """The share on the chosen device is measured (fake NVML) and
        planned with: a measured above its 10GiB no longer leaves room on
        gpu0 for b, so b evicts the cheaper c from gpu1 and takes it."""
        self.devices = FakeDevices({0: 24 * GIB, 1: 24 * GIB}, per_process=22 * GIB)
        await self.start(
            {
                "a": demo_model("a", resources={"gpu0|gpu1": "10GiB"}),
                "b": demo_model("b", resources={"gpu0|gpu1": "10GiB"}),
                "c": demo_model("c", resources={"gpu1": "20GiB"}),
            },
            resources={"gpu0": "24GiB", "gpu1": "24GiB"},
        )
        await self.use("a")
        deadline = reactor.seconds() + 15
        while (await self.report())["models"]["a"].get("gpu0", {}).get("source") != "measured":
            self.assertLess(reactor.seconds(), deadline, "a never measured")
            await pause(0.1)
        self.devices.per_process = 0  # c and b are not measured above their sizes
        self.assertEqual(
            (await self.report())["models"]["a"]["gpu0"],
            {"bytes": 22 * GIB, "source": "measured", "of": "gpu0|gpu1"},
        )
        await self.use("c")
        for _ in range(3):
            await self.use("a")
        self.assertEqual(self.state("c"), ProcessState.READY)
        await self.use("b")
        self.assertEqual(self.state("c"), ProcessState.STOPPED)
        self.assertEqual(self.state("a"), ProcessState.READY)
        self.assertEqual(self.router.device_of("b"), "gpu1")
        report = await self.report()
        self.assertEqual(report["resources"]["gpu0"]["reserved"], 22 * GIB)
        self.assertEqual(report["resources"]["gpu1"]["reserved"], 10 * GIB)
        await self.settled()
