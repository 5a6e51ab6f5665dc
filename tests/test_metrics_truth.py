"""``/metrics`` tells the truth, read as a scraper reads it (the text
exposition of a running service): queue waits, evictions by reason, removed
models' series, time to the first body byte."""

from __future__ import annotations

import json
import os
import signal
import tempfile
from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaswap.supervision.process import ProcessState
from tests.support import base_url, free_port, listen, poll_until
from tests.test_service import ServiceTestCase, responder_model

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class MetricsTestCase(ServiceTestCase):
    async def scrape(self) -> Samples:
        """Every sample of ``GET /metrics``, by name and sorted labels."""
        response = await treq.get(self.url + "/metrics", pool=self.pool)
        self.assertEqual(response.code, 200)
        text = await response.text()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    async def evictions(self) -> dict[tuple[str, str], float]:
        """``llamaswap_evictions_total`` as {(model, reason): count}."""
        return {
            (dict(labels)["model"], dict(labels)["reason"]): value
            for (name, labels), value in (await self.scrape()).items()
            if name == "llamaswap_evictions_total"
        }

    async def ok(self, model: str, **extra: Any) -> None:
        response = await self.chat(model, **extra)
        self.assertEqual(response.code, 200, await response.text())
        await response.content()


class EvictionTests(MetricsTestCase):
    async def test_swap_unload_ttl_and_crash_are_counted_by_reason(self) -> None:
        """Each way a loaded model stops is counted once, with its reason:
        swapped out for another model, unloaded, idle past its TTL, died
        while ready."""
        await self.start(
            {
                "a": responder_model(free_port()),
                "b": responder_model(free_port()),
                "t": responder_model(free_port(), ttl=1),
            },
            groups={"ab": {"swap": True, "members": ["a", "b"]}},
        )
        await self.ok("a")
        await self.ok("b")  # a is swapped out
        await poll_until(lambda: self.state("a") is ProcessState.STOPPED)
        self.assertEqual(await self.evictions(), {("a", "swap"): 1})

        response = await treq.post(self.url + "/api/models/unload/b", pool=self.pool)
        await response.content()
        self.assertEqual(self.state("b"), ProcessState.STOPPED)

        await self.ok("t")
        await poll_until(lambda: self.state("t") is ProcessState.STOPPED, timeout=10)

        await self.ok("a")
        pid = self.router.processes["a"].pid
        os.kill(pid, signal.SIGKILL)
        await poll_until(lambda: self.state("a") is ProcessState.STOPPED)
        self.assertEqual(
            await self.evictions(),
            {("a", "swap"): 1, ("b", "unload"): 1, ("t", "ttl"): 1, ("a", "crash"): 1},
        )
        await self.settled()

    async def test_a_stopped_model_is_not_evicted_again(self) -> None:
        """Unloading what is not running, or unloading twice, counts nothing."""
        await self.start({"a": responder_model(free_port())})
        await (await treq.post(self.url + "/api/models/unload", pool=self.pool)).content()
        await self.ok("a")
        await (await treq.post(self.url + "/api/models/unload", pool=self.pool)).content()
        await (await treq.post(self.url + "/api/models/unload/a", pool=self.pool)).content()
        self.assertEqual(await self.evictions(), {("a", "unload"): 1})


class ReloadMetricsTests(MetricsTestCase):
    async def start_from_file(self, models: dict[str, Any]) -> str:
        handle, path = tempfile.mkstemp(suffix=".yaml")
        os.close(handle)
        self.addCleanup(os.unlink, path)
        self.write(path, models)
        await self.start(models, groups=self.together(models))
        self.service.sources = (path, None)
        return path

    def together(self, models: dict[str, Any]) -> dict[str, Any]:
        """One group in which every model may run at the same time."""
        return {"all": {"swap": False, "members": sorted(models)}}

    def write(self, path: str, models: dict[str, Any]) -> None:
        document = {"healthCheckTimeout": 15, "models": models, "groups": self.together(models)}
        with open(path, "w") as f:
            json.dump(document, f)

    async def test_removed_models_series_disappear(self) -> None:
        """After a reload that removes a model, no series of /metrics names
        it any more (requests, tokens, timings, swaps, evictions, state),
        also once its retired process has stopped; a changed model's stop is
        counted as a reload eviction, and a model added back starts afresh."""
        a, b = responder_model(free_port()), responder_model(free_port())
        path = await self.start_from_file({"a": a, "b": b})
        await self.ok("a")
        await self.ok("b")
        old_a, old_b = self.router.processes["a"], self.router.processes["b"]
        before = await self.scrape()
        self.assertTrue(any(("model", "b") in labels for _, labels in before))
        changed_a = responder_model(free_port(), "--print", "changed")
        self.write(path, {"a": changed_a})
        await self.service.reload()
        await poll_until(lambda: old_b.state is ProcessState.STOPPED)
        await poll_until(lambda: old_a.state is ProcessState.STOPPED)
        after = await self.scrape()
        self.assertEqual([key for key in after if ("model", "b") in key[1]], [])
        self.assertEqual(await self.evictions(), {("a", "reload"): 1})
        self.assertEqual(
            after[("llamaswap_model_state", (("model", "a"), ("state", "stopped")))], 1
        )

        self.write(path, {"a": changed_a, "b": b})
        await self.service.reload()
        again = await self.scrape()
        self.assertEqual(
            again[("llamaswap_model_state", (("model", "b"), ("state", "stopped")))], 1
        )
        self.assertNotIn(("llamaswap_requests_total", (("model", "b"),)), again)
        await self.ok("b")
        counted = await self.scrape()
        requests_b = [
            value
            for (name, labels), value in counted.items()
            if name == "llamaswap_requests_total" and ("model", "b") in labels
        ]
        self.assertEqual(requests_b, [1])
        await self.settled()


class QueueWaitTests(MetricsTestCase):
    async def test_a_request_waiting_behind_a_swap_is_recorded(self) -> None:
        """A request for a model that must wait for another model's swap (one
        group: only one runs) is observed in the queue-wait histogram with
        the time it waited."""
        await self.start(
            {
                "a": responder_model(free_port()),
                "b": responder_model(free_port(), "--startup-delay", "0.5"),
            },
            groups={"ab": {"swap": True, "members": ["a", "b"]}},
        )
        await self.ok("a")
        first = await self.scrape()
        waits_a = first[("llamaswap_queue_wait_seconds_count", (("model", "a"),))]
        for_b = defer.ensureDeferred(self.ok("b"))
        await poll_until(lambda: self.state("b") is ProcessState.STARTING)
        behind = reactor.seconds()
        await self.ok("a")  # queued behind the swap to b, then swaps back
        waited = reactor.seconds() - behind
        await for_b
        samples = await self.scrape()
        self.assertEqual(
            samples[("llamaswap_queue_wait_seconds_count", (("model", "a"),))], waits_a + 1
        )
        self.assertEqual(samples[("llamaswap_queue_wait_seconds_count", (("model", "b"),))], 1)
        wait_sum = samples[("llamaswap_queue_wait_seconds_sum", (("model", "a"),))]
        wait_sum -= first[("llamaswap_queue_wait_seconds_sum", (("model", "a"),))]
        self.assertGreater(wait_sum, 0.2)
        self.assertLessEqual(wait_sum, waited)
        await self.settled()


#: How long the slow upstream holds the body after sending its headers.
BODY_DELAY = 0.4


class LateBody(Resource):
    """An upstream that answers headers at once and the body later."""

    isLeaf = True

    def render_POST(self, request: Any) -> object:
        request.setHeader(b"content-type", b"application/json")
        request.write(b"")  # the status line and headers go out now

        def body() -> None:
            request.write(b'{"choices": [], "usage": {"prompt_tokens": 1}}')
            request.finish()

        reactor.callLater(BODY_DELAY, body)
        return NOT_DONE_YET


class FirstByteTests(MetricsTestCase):
    async def test_ttfb_is_the_first_body_byte(self) -> None:
        """The time-to-first-byte histogram measures up to the first body
        byte, not the response headers."""
        upstream = listen(LateBody())
        self.addCleanup(upstream.stopListening)
        await self.start(
            {"local": responder_model(free_port())},
            peers={"box": {"proxy": base_url(upstream), "models": ["m"]}},
        )
        await self.ok("box/m")
        # the activity row (and its figures) is written after the response
        await poll_until(lambda: len(self.service.recorder.store.log) == 1)
        samples = await self.scrape()
        labels = (("model", "box/m"),)
        self.assertEqual(samples[("llamaswap_time_to_first_byte_seconds_count", labels)], 1)
        self.assertGreaterEqual(
            samples[("llamaswap_time_to_first_byte_seconds_sum", labels)], BODY_DELAY
        )
