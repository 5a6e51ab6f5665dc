"""Measured footprints, ``auto`` sizes, free-memory probes and the placement
safety nets (issue 16 points 2, 3 and 5).

Host memory is measured for real (demo upstreams that allocate a known
amount); NVIDIA devices through a fake device layer (no GPU here): it
answers like NVML for the members of the real process groups it is asked
about.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Collection
from typing import Any

import psutil
import treq
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool

from llamaswap.config import ConfigError, load_config_text
from llamaswap.config.devices import GIB, DeviceError, SystemDevices, host_reserve
from llamaswap.config.resources import read_resources
from llamaswap.observe.footprints import command_key
from llamaswap.observe.prometheus import Metrics
from llamaswap.service.wiring import build_service
from llamaswap.supervision.process import ProcessState
from llamaswap.supervision.room import out_of_memory, wait_for_room
from llamaswap.web.site import LlamaSwapSite
from tests.support import base_url, poll_until
from tests.test_service import ServiceTestCase, demo_model

MIB = 1024**2


class FakeDevices(SystemDevices):
    """The real host, and NVIDIA devices as a fake NVML would show them:
    ``per_process`` bytes for each live process of a group it is asked about."""

    def __init__(self, gpus: dict[int, int], per_process: int = 0) -> None:
        super().__init__()
        self.gpus = gpus
        self.per_process = per_process
        self.free_bytes = dict(gpus)
        self.asked: list[set[int]] = []
        self._guard = threading.Lock()

    def gpu_total(self, index: int) -> int:
        if index not in self.gpus:
            raise DeviceError(f"no NVIDIA device {index}")
        return self.gpus[index]

    def gpu_free(self, index: int) -> int:
        if index not in self.gpus:
            raise DeviceError(f"no NVIDIA device {index}")
        with self._guard:
            return self.free_bytes[index]

    def gpu_used_by(self, index: int, pids: Collection[int]) -> int:
        if index not in self.gpus:
            raise DeviceError(f"no NVIDIA device {index}")
        with self._guard:
            self.asked.append(set(pids))
        return self.per_process * sum(1 for pid in pids if psutil.pid_exists(pid))


def demo(name: str, resources: dict[str, Any], *extra: str) -> dict[str, Any]:
    entry = demo_model(name, resources=resources)
    entry["cmd"] += " " + " ".join(extra)
    return entry


class MeasuredServiceTests(ServiceTestCase):
    devices: FakeDevices | None = None

    async def start(self, models: dict[str, Any], **globals_: Any) -> None:
        document = {"healthCheckTimeout": 15, **globals_, "models": models}
        self.config = load_config_text(json.dumps(document), environ=dict(os.environ))
        self.service = service = build_service(self.config, reactor, devices=self.devices)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        self.port = port = reactor.listenTCP(
            0, LlamaSwapSite(service.app.resource()), interface="127.0.0.1"
        )
        self.addCleanup(lambda: port.stopListening() if port.connected else None)
        self.url = base_url(port)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def restart(self, models: dict[str, Any], **globals_: Any) -> None:
        await self.service.stopService()
        await self.port.stopListening()
        await self.start(models, **globals_)

    async def report(self) -> Any:
        return await (await treq.get(self.url + "/api/resources", pool=self.pool)).json()

    async def load(self, model: str) -> None:
        response = await treq.post(self.url + f"/api/models/load/{model}", pool=self.pool)
        self.assertEqual(response.code, 200, await response.text())

    async def measured(self, model: str, resource: str) -> dict[str, Any]:
        """Poll the report until ``model``'s ``resource`` footprint is measured."""
        deadline = reactor.seconds() + 15
        while True:
            found: dict[str, Any] = (await self.report())["models"][model][resource]
            if found["source"] == "measured" or reactor.seconds() > deadline:
                return found
            await pause(0.1)

    async def test_rss_of_a_demo_upstream(self) -> None:
        """A demo upstream holding 128 MiB is measured at about that much RSS
        once ready; the report says ``measured`` and reserves it, and the
        Prometheus gauge follows."""
        await self.start(
            {"m": demo("m", {"ram": "16MiB"}, "--hold-mib", "128")},
            resources={"ram": "8GiB"},
        )
        await self.load("m")
        found = await self.measured("m", "ram")
        self.assertEqual(found["source"], "measured")
        self.assertGreaterEqual(found["bytes"], 128 * MIB)
        self.assertLess(found["bytes"], 128 * MIB + 200 * MIB)  # the interpreter itself
        report = await self.report()
        self.assertEqual(report["resources"]["ram"]["reserved"], found["bytes"])
        self.assertIsInstance(report["resources"]["ram"]["free"], int)
        metrics = await (await treq.get(self.url + "/metrics", pool=self.pool)).text()
        self.assertEqual(gauge(metrics, "reserved", "ram"), found["bytes"])
        self.assertEqual(gauge(metrics, "total", "ram"), 8 * GIB)

    async def test_measurements_outlive_a_restart(self) -> None:
        """Measurements are kept per model and command in the store file: a
        new service on the same file plans with them before the first start;
        a model whose command changed starts from its declared footprint."""
        directory = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(directory, ignore_errors=True))
        store = {"path": os.path.join(directory, "activity.db")}
        m = demo("m", {"ram": "16MiB"}, "--hold-mib", "64")
        await self.start({"m": m}, resources={"ram": "8GiB"}, store=store)
        await self.load("m")
        first = await self.measured("m", "ram")
        self.assertEqual(first["source"], "measured")
        await self.restart({"m": m}, resources={"ram": "8GiB"}, store=store)
        await poll_until(lambda: self.service.router.reload_costs.measured_of("m") != {})
        report = await self.report()
        self.assertEqual(report["models"]["m"]["ram"], first)
        self.assertEqual(report["resources"]["ram"]["reserved"], 0)  # nothing runs
        changed = dict(m, cmd=m["cmd"] + " --reply other")
        await self.restart({"m": changed}, resources={"ram": "8GiB"}, store=store)
        monitor = self.service.resources
        assert monitor is not None
        await monitor.start()  # the kept measurements are read (again) by now
        report = await self.report()
        self.assertEqual(report["models"]["m"]["ram"], {"bytes": 16 * MIB, "source": "declared"})

    async def test_nvml_measurement_plans_and_shows(self) -> None:
        """A model measured (fake NVML)
        above its declared size is planned with the measurement: it no longer
        fits beside another, which evicts it (reason memory).  The report
        carries NVML's free memory; ``/api/events`` carries the report."""
        self.devices = FakeDevices({0: 24 * GIB}, per_process=15 * GIB)
        self.devices.free_bytes[0] = 9 * GIB
        await self.start(
            {
                "a": demo("a", {"gpu0": "10GiB"}),
                "b": demo("b", {"gpu0": "10GiB"}),
            },
            resources={"gpu0": "24GiB"},
        )
        events: list[Any] = []
        self.service.bus.subscribe(lambda event: events.append(event))
        await self.load("a")
        found = await self.measured("a", "gpu0")
        self.assertEqual(found, {"bytes": 15 * GIB, "source": "measured"})
        self.assertIn(self.router.processes["a"].pid, self.devices.asked[-1])
        report = await self.report()
        self.assertEqual(
            report["resources"]["gpu0"], {"total": 24 * GIB, "reserved": 15 * GIB, "free": 9 * GIB}
        )
        resource_events = [e.payload() for e in events if e.kind == "resources"]
        self.assertIn(report, resource_events)
        self.devices.per_process = 0  # b is not measured above its size
        self.devices.free_bytes[0] = 24 * GIB  # a's memory shows free once it is gone
        await self.load("b")
        self.assertEqual(self.state("a"), ProcessState.STOPPED)
        metrics = await (await treq.get(self.url + "/metrics", pool=self.pool)).text()
        self.assertIn('llamaswap_evictions_total{model="a",reason="memory"} 1.0', metrics)
        self.assertEqual(gauge(metrics, "free", "gpu0"), 24 * GIB)

    async def test_out_of_memory_start_evicts_more_and_retries(self) -> None:
        """A start that dies saying it ran out of memory evicts an idle model
        it was planned to fit beside (reason memory), then starts again."""
        directory = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(directory, ignore_errors=True))
        marker = os.path.join(directory, "failed-once")
        b = demo("b", {"gpu0": "10GiB"})
        script = os.path.join(directory, "oom.sh")
        with open(script, "w") as f:
            f.write(
                f"if [ ! -e {marker} ]; then touch {marker}; "
                'echo "ggml_cuda_init: CUDA error: out of memory" >&2; exit 1; fi\n'
                f"exec {b['cmd']}\n"
            )
        b["cmd"] = f"sh {script}"
        await self.start({"a": demo("a", {"gpu0": "10GiB"}), "b": b}, resources={"gpu0": "24GiB"})
        await self.load("a")
        await self.load("b")
        self.assertTrue(os.path.exists(marker))
        self.assertEqual(self.state("b"), ProcessState.READY)
        self.assertEqual(self.state("a"), ProcessState.STOPPED)
        metrics = await (await treq.get(self.url + "/metrics", pool=self.pool)).text()
        self.assertIn('llamaswap_evictions_total{model="a",reason="memory"} 1.0', metrics)


def gauge(metrics: str, figure: str, resource: str) -> float:
    """The value of ``llamaswap_resource_<figure>_bytes{resource=...}``."""
    prefix = f'llamaswap_resource_{figure}_bytes{{resource="{resource}"}} '
    (line,) = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(line[len(prefix) :])


async def pause(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class AutoSizeTests(SynchronousTestCase):
    def read(self, resources: dict[str, Any], devices: Any) -> Any:
        document = {"resources": resources, "models": {"m": {"cmd": "s"}}}
        return read_resources(document, {"m": ("s",)}, devices)

    def test_auto_from_the_devices(self) -> None:
        """``gpu1: auto`` is NVML's total for device 1; ``ram: auto`` is
        MemTotal less the larger of 10 % and 2 GiB (at most half)."""
        devices = FakeDevices({1: 16 * GIB})
        found, problems, _ = self.read({"gpu1": "auto", "ram": "auto"}, devices)
        self.assertEqual(problems, [])
        total = devices.host_total()
        self.assertEqual(found.totals["gpu1"], 16 * GIB)
        self.assertEqual(found.totals["ram"], total - host_reserve(total))

    def test_host_reserve(self) -> None:
        self.assertEqual(host_reserve(64 * GIB), int(6.4 * GIB))
        self.assertEqual(host_reserve(16 * GIB), 2 * GIB)
        self.assertEqual(host_reserve(2 * GIB), 1 * GIB)

    def test_auto_without_a_probe(self) -> None:
        """A device NVML cannot see, and a name with no probe, are config
        errors naming the key."""
        _, problems, _ = self.read({"gpu3": "auto", "vram": "auto"}, FakeDevices({}))
        self.assertEqual(
            problems,
            [
                "resources.gpu3: 'auto' cannot probe it (no NVIDIA device 3); give the size "
                "(a size in bytes or with a unit (MB, MiB, GB, GiB))",
                "resources.vram: 'auto' needs a probe-able name (gpu<N> for an NVIDIA device, "
                "ram for host memory); give the size (a size in bytes or with a unit (MB, MiB, "
                "GB, GiB))",
            ],
        )

    def test_real_machine_without_nvml(self) -> None:
        """On this machine (no NVIDIA driver) ``gpu0: auto`` is a config error
        saying NVML cannot be used; ``ram: auto`` loads."""
        with self.assertRaises(ConfigError) as caught:
            load_config_text(
                "resources: {gpu0: auto}\nmodels:\n  m:\n    cmd: s ${PORT}\n", environ={}
            )
        (problem,) = caught.exception.problems
        self.assertTrue(problem.startswith("resources.gpu0: 'auto' cannot probe it (NVML"), problem)
        config = load_config_text(
            "resources: {ram: auto}\nmodels:\n  m:\n    cmd: s ${PORT}\n", environ={}
        )
        self.assertGreater(config.resources.totals["ram"], 0)


class SafetyNetTests(SynchronousTestCase):
    def test_out_of_memory_messages(self) -> None:
        for message in (
            "exited with status 1; last output: CUDA error: out of memory",
            "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000 MiB on device 0: "
            "cudaMalloc failed: out of memory",
            "terminate called after throwing an instance of 'std::bad_alloc'",
            "llama_model_load: error: failed to allocate buffer",
        ):
            self.assertTrue(out_of_memory(message), message)
        self.assertFalse(out_of_memory("exited with status 1; last output: bad flag -x"))

    def test_wait_for_room(self) -> None:
        """The wait ends as soon as the probe shows the room, polling on the
        clock; resources without a probe are not waited for; it gives up
        after the time-out."""
        clock = Clock()
        free: dict[str, int | None] = {"gpu0": 2 * GIB, "disk": None}
        probes = []

        def probe() -> defer.Deferred[Any]:
            probes.append(clock.seconds())
            return defer.succeed(dict(free))

        needs = {"gpu0": 8 * GIB, "disk": 10 * GIB}
        d = defer.Deferred.fromCoroutine(wait_for_room(needs, probe, clock, timeout=10, poll=0.5))
        self.assertNoResult(d)
        clock.advance(0.5)
        free["gpu0"] = 8 * GIB
        clock.advance(0.5)
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(probes, [0.0, 0.5, 1.0])
        free["gpu0"] = 1
        d = defer.Deferred.fromCoroutine(wait_for_room(needs, probe, clock, timeout=10, poll=0.5))
        clock.pump([0.5] * 21)
        self.assertFalse(self.successResultOf(d))


class FootprintStoreTests(SynchronousTestCase):
    def test_command_key(self) -> None:
        self.assertEqual(command_key(["a", "b"]), command_key(("a", "b")))
        self.assertNotEqual(command_key(["a", "b"]), command_key(["a b"]))


class ResourceGaugeTests(SynchronousTestCase):
    def test_gauges_follow_the_report(self) -> None:
        """Each report sets total, reserved and free per resource; a free
        figure without a probe has no series, and a resource a reload
        removed loses its series."""
        metrics = Metrics(system=False)
        metrics.resources(
            {
                "resources": {
                    "gpu0": {"total": 24 * GIB, "reserved": 10 * GIB, "free": 13 * GIB},
                    "disk": {"total": GIB, "reserved": 0, "free": None},
                }
            }
        )
        text = metrics.render()[0].decode()
        self.assertEqual(gauge(text, "reserved", "gpu0"), 10 * GIB)
        self.assertEqual(gauge(text, "free", "gpu0"), 13 * GIB)
        self.assertEqual(gauge(text, "total", "disk"), GIB)
        self.assertNotIn('llamaswap_resource_free_bytes{resource="disk"}', text)
        metrics.resources({"resources": {"gpu0": {"total": 24 * GIB, "reserved": 0, "free": None}}})
        text = metrics.render()[0].decode()
        self.assertNotIn('resource="disk"', text)
        self.assertNotIn('llamaswap_resource_free_bytes{resource="gpu0"}', text)
        self.assertEqual(gauge(text, "reserved", "gpu0"), 0)
