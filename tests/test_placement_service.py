"""Placement end to end: demo upstreams with declared footprints behind the
whole service, ``GET /api/resources`` and ``POST /api/models/load/<id>``."""

from __future__ import annotations

from typing import Any

import treq
from twisted.internet import defer

from llamaswap.scheduling.placement import GIB
from llamaswap.supervision.process import ProcessState
from tests.support import poll_until
from tests.test_service import ServiceTestCase, demo_model

MACHINE = {"gpu0": "24GiB", "ram": "8GiB"}


def placed(name: str, gpu: str, ram: str = "1GiB") -> dict[str, Any]:
    """A demo model streaming 40 tokens a second, holding ``gpu`` of gpu0."""
    entry = demo_model(name, resources={"gpu0": gpu, "ram": ram})
    entry["cmd"] += " --tokens-per-second 40"
    return entry


class PlacedServiceCase(ServiceTestCase):
    """A service test with a chat helper and the list of loaded models (no
    tests of its own: placement's service tests build on it)."""

    async def use(self, model: str) -> None:
        response = await self.chat(model, max_tokens=2)
        self.assertEqual(response.code, 200, model)
        await response.content()

    def loaded(self) -> list[str]:
        return sorted(
            m for m, p in self.router.processes.items() if p.state is not ProcessState.STOPPED
        )


class PlacementServiceTests(PlacedServiceCase):
    async def test_two_fit_a_third_evicts_the_cold_one(self) -> None:
        """a and b fit side by side; c fits only if one goes: the one asked
        for less (b) is evicted, counted with reason memory, and the
        resources API shows what is reserved."""
        await self.start(
            {"a": placed("a", "10GiB"), "b": placed("b", "10GiB"), "c": placed("c", "10GiB")},
            resources=MACHINE,
        )
        await self.use("b")
        for _ in range(6):
            await self.use("a")
        self.assertEqual(self.loaded(), ["a", "b"])
        report = await (await treq.get(self.url + "/api/resources", pool=self.pool)).json()
        self.assertEqual(
            report["resources"]["gpu0"], {"total": 24 * GIB, "reserved": 20 * GIB, "free": None}
        )
        self.assertEqual(report["resources"]["ram"]["reserved"], 2 * GIB)
        self.assertEqual(report["models"]["c"]["gpu0"], {"bytes": 10 * GIB, "source": "declared"})
        await self.use("c")
        self.assertEqual(self.loaded(), ["a", "c"])
        metrics = (await (await treq.get(self.url + "/metrics", pool=self.pool)).content()).decode()
        self.assertIn('llamaswap_evictions_total{model="b",reason="memory"} 1.0', metrics)
        await self.settled()

    async def test_waits_for_busy_models(self) -> None:
        """While a and b both serve, a request for c waits (neither is
        evicted under a request); once they finish, c is served."""
        await self.start(
            {"a": placed("a", "12GiB"), "b": placed("b", "12GiB"), "c": placed("c", "12GiB")},
            resources=MACHINE,
        )
        await self.use("a")
        await self.use("b")
        scheduler = self.router.scheduler
        streams = [
            defer.ensureDeferred(self._stream(model)) for model in ("a", "b")
        ]  # 80 tokens each, about two seconds
        await poll_until(lambda: scheduler.in_flight("a") == 1 and scheduler.in_flight("b") == 1)
        waiting = defer.ensureDeferred(self.use("c"))
        await poll_until(lambda: scheduler.queue_length() == 1)
        self.assertEqual(self.state("c"), ProcessState.STOPPED)
        self.assertEqual(self.loaded(), ["a", "b"])
        self.assertEqual(await defer.gatherResults(streams), [200, 200])
        await waiting
        self.assertEqual(self.state("c"), ProcessState.READY)
        self.assertEqual(len(self.loaded()), 2)
        await self.settled()

    async def _stream(self, model: str) -> int:
        response = await self.chat(model, stream=True, max_tokens=80)
        await response.content()
        return int(response.code)

    async def test_load_endpoint(self) -> None:
        """POST /api/models/load/<id> answers once the model is ready (an
        alias is accepted); an unknown model is a JSON 404."""
        entry = placed("a", "10GiB")
        entry["aliases"] = ["alpha"]
        await self.start({"a": entry, "b": placed("b", "10GiB")}, resources=MACHINE)
        response = await treq.post(self.url + "/api/models/load/alpha", pool=self.pool)
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.json(), {"model": "a", "state": "ready"})
        self.assertEqual(self.state("a"), ProcessState.READY)
        response = await treq.post(self.url + "/api/models/load/nope", pool=self.pool)
        self.assertEqual(response.code, 404)
        body = await response.json()
        self.assertEqual(body["error"]["message"], "model not found")
        await self.settled()

    async def test_resources_without_placement(self) -> None:
        """Without a top-level resources the report is empty."""
        await self.start({"a": demo_model("a")})
        report = await (await treq.get(self.url + "/api/resources", pool=self.pool)).json()
        self.assertEqual(report, {"resources": {}, "models": {}})
