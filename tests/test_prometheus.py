"""Tests for llamaswap.observe.prometheus: request-path metrics, API-key names, system figures."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import psutil
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.observe.prometheus import CONTENT_TYPE, MODEL_STATES, Metrics, api_key_label
from llamaswap.observe.usage import TokenMetrics
from llamaswap.web.auth import ApiKeys

SECRET = "sk-live-0123456789abcdef"

CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")
Memory = namedtuple("Memory", "total available used free buffers cached")
Swap = namedtuple("Swap", "total used free")
NetIO = namedtuple("NetIO", "bytes_sent bytes_recv packets_sent packets_recv")
KIB = 1024

#: Two cores, in CPU-time units (user nice system idle iowait irq softirq steal).
CPU = [CpuTimes(100, 0, 50, 300, 0, 0, 0, 0, 0, 0), CpuTimes(200, 0, 50, 300, 0, 0, 0, 0, 0, 0)]
CPU_LATER = [
    CpuTimes(175, 0, 75, 350, 0, 0, 0, 0, 0, 0),
    CpuTimes(200, 0, 50, 400, 0, 0, 0, 0, 0, 0),
]
#: psutil's figures for MemTotal 16000 kB, MemFree 4000 kB, Buffers 1000 kB,
#: Cached 3000 kB + SReclaimable 500 kB (psutil adds it to ``cached``).
MEMORY = Memory(
    total=16000 * KIB,
    available=10000 * KIB,
    used=6000 * KIB,
    free=4000 * KIB,
    buffers=1000 * KIB,
    cached=3500 * KIB,
)
SWAP = Swap(total=2000 * KIB, used=500 * KIB, free=1500 * KIB)
LOADAVG = (0.5, 1.25, 2.0)
NET = {"lo": NetIO(1000, 1000, 10, 10), "eth0": NetIO(250_000, 5_000_000, 3000, 4000)}


class FakeSystem:
    """A `SystemSource` with fixed figures; ``cpu`` can be moved on."""

    def __init__(self, cpu: list[CpuTimes] = CPU) -> None:
        self.cpu = cpu

    def cpu_times(self, percpu: bool = False) -> list[CpuTimes]:
        assert percpu
        return self.cpu

    def virtual_memory(self) -> Memory:
        return MEMORY

    def swap_memory(self) -> Swap:
        return SWAP

    def getloadavg(self) -> tuple[float, float, float]:
        return LOADAVG

    def net_io_counters(self, pernic: bool = False, nowrap: bool = True) -> dict[str, NetIO]:
        assert pernic
        return NET


class NoSystem:
    """A `SystemSource` on a machine without /proc: every read fails."""

    def cpu_times(self, percpu: bool = False) -> Any:
        raise FileNotFoundError("/proc/stat")

    def virtual_memory(self) -> Any:
        raise FileNotFoundError("/proc/meminfo")

    def swap_memory(self) -> Any:
        raise FileNotFoundError("/proc/meminfo")

    def getloadavg(self) -> Any:
        raise OSError("no load average")

    def net_io_counters(self, pernic: bool = False, nowrap: bool = True) -> Any:
        raise FileNotFoundError("/proc/net/dev")


def samples(metrics: Metrics) -> list[Sample]:
    body, _ = metrics.render()
    return [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    for sample in samples(metrics):
        if sample.name == name and sample.labels == labels:
            return sample.value
    return None


def exercise(metrics: Metrics, api_key_name: str | None = None) -> None:
    """One call of every recording method."""
    metrics.request_finished(
        "llama",
        "/v1/chat/completions",
        200,
        TokenMetrics(cache_tokens=5, input_tokens=10, output_tokens=20),
        ttfb_s=0.2,
        prompt_tps=800.0,
        gen_tps=42.0,
        api_key_name=api_key_name,
    )
    metrics.queue_wait("llama", 0.05)
    metrics.model_loaded("llama", 3.5)
    metrics.swap("llama")
    metrics.evicted("llama", "ttl")
    metrics.model_state("llama", "ready")


class RequestMetricsTests(SynchronousTestCase):
    """Per-model and per-key metrics recorded through `Metrics`."""

    def test_every_metric_appears_and_parses(self) -> None:
        """After one call of each method every family is present, typed, and parseable."""
        metrics = Metrics(system=False)
        exercise(metrics, api_key_label(0))
        body, content_type = metrics.render()
        self.assertEqual(content_type, "text/plain; version=0.0.4; charset=utf-8")
        self.assertEqual(content_type, CONTENT_TYPE)
        families = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
        for name, kind in [
            ("llamaswap_requests", "counter"),
            ("llamaswap_tokens", "counter"),
            ("llamaswap_time_to_first_byte_seconds", "histogram"),
            ("llamaswap_tokens_per_second", "histogram"),
            ("llamaswap_queue_wait_seconds", "histogram"),
            ("llamaswap_model_load_seconds", "histogram"),
            ("llamaswap_swaps", "counter"),
            ("llamaswap_evictions", "counter"),
            ("llamaswap_model_state", "gauge"),
            ("llamaswap_api_key_tokens", "counter"),
        ]:
            self.assertEqual(families.get(name), kind, name)
        self.assertEqual(
            value(
                metrics,
                "llamaswap_requests_total",
                model="llama",
                path="/v1/chat/completions",
                status="200",
            ),
            1.0,
        )
        for kind, count in [("input", 10.0), ("output", 20.0), ("cached", 5.0)]:
            self.assertEqual(
                value(metrics, "llamaswap_tokens_total", model="llama", kind=kind), count
            )
            self.assertEqual(
                value(metrics, "llamaswap_api_key_tokens_total", key="key-0", kind=kind), count
            )
        self.assertEqual(
            value(metrics, "llamaswap_time_to_first_byte_seconds_sum", model="llama"), 0.2
        )
        self.assertEqual(
            value(metrics, "llamaswap_tokens_per_second_sum", model="llama", phase="prompt"), 800.0
        )
        self.assertEqual(
            value(metrics, "llamaswap_tokens_per_second_sum", model="llama", phase="generation"),
            42.0,
        )
        self.assertEqual(value(metrics, "llamaswap_queue_wait_seconds_sum", model="llama"), 0.05)
        self.assertEqual(value(metrics, "llamaswap_model_load_seconds_sum", model="llama"), 3.5)
        self.assertEqual(value(metrics, "llamaswap_swaps_total", model="llama"), 1.0)
        self.assertEqual(
            value(metrics, "llamaswap_evictions_total", model="llama", reason="ttl"), 1.0
        )

    def test_api_key_secret_never_exported(self) -> None:
        """Keys appear by index name only; a name that is not key-<n> is refused."""
        metrics = Metrics(system=False)
        index = ApiKeys(["sk-other", SECRET]).match(SECRET)
        assert index is not None
        exercise(metrics, api_key_label(index))
        exercise(metrics, SECRET)
        exercise(metrics, "key-1; " + SECRET)
        body, _ = metrics.render()
        self.assertNotIn(SECRET.encode(), body)
        self.assertNotIn(b"sk-", body)
        self.assertEqual(
            value(metrics, "llamaswap_api_key_tokens_total", key="key-1", kind="input"), 10.0
        )
        keys = {s.labels.get("key") for s in samples(metrics) if "api_key" in s.name}
        self.assertEqual(keys, {"key-1"})
        # The refused calls still count per model.
        self.assertEqual(
            value(metrics, "llamaswap_tokens_total", model="llama", kind="input"), 30.0
        )

    def test_state_gauge_flips(self) -> None:
        """Exactly one state is 1 per model, and it follows the latest change."""
        metrics = Metrics(system=False)

        def states(model: str) -> dict[str, float]:
            return {
                s.labels["state"]: s.value
                for s in samples(metrics)
                if s.name == "llamaswap_model_state" and s.labels["model"] == model
            }

        metrics.model_state("a", "starting")
        metrics.model_state("b", "ready")
        self.assertEqual(states("a"), {s: float(s == "starting") for s in MODEL_STATES})
        metrics.model_state("a", "ready")
        self.assertEqual(states("a"), {s: float(s == "ready") for s in MODEL_STATES})
        metrics.model_state("a", "stopped")
        self.assertEqual(states("a")["ready"], 0.0)
        self.assertEqual(states("a")["stopped"], 1.0)
        self.assertEqual(states("b")["ready"], 1.0)
        metrics.forget_model("a")
        self.assertEqual(states("a"), {})
        self.assertEqual(states("b")["ready"], 1.0)

    def test_unreported_figures_are_skipped(self) -> None:
        """−1 counts and speeds, no body and no usage neither fail nor observe anything."""
        metrics = Metrics(system=False)
        metrics.request_finished(
            "m",
            "/v1/completions?stream=true",
            503,
            TokenMetrics(-1, -1, -1, 0, 0, -1.0, -1.0),
            ttfb_s=None,
            prompt_tps=-1.0,
            gen_tps=float("nan"),
        )
        metrics.request_finished("m", "/v1/completions", 200, None, 0.0, None, 0.0)
        self.assertEqual(
            value(
                metrics, "llamaswap_requests_total", model="m", path="/v1/completions", status="503"
            ),
            1.0,
        )
        self.assertEqual(value(metrics, "llamaswap_tokens_total", model="m", kind="cached"), 0.0)
        self.assertEqual(
            value(metrics, "llamaswap_time_to_first_byte_seconds_count", model="m"), 1.0
        )
        self.assertIsNone(
            value(metrics, "llamaswap_tokens_per_second_count", model="m", phase="prompt")
        )

    def test_dedicated_registry(self) -> None:
        """Each Metrics has its own registry; nothing is added to the global one."""
        first, second = Metrics(system=False), Metrics(system=False)
        first.swap("x")
        self.assertIsNone(value(second, "llamaswap_swaps_total", model="x"))
        self.assertIsNone(REGISTRY.get_sample_value("llamaswap_swaps_total", {"model": "x"}))


class SystemFiguresTests(SynchronousTestCase):
    """llama-swap's system figures, read through psutil at scrape time."""

    def test_figures_from_source(self) -> None:
        """CPU per core since the last scrape, memory, swap, load and network counters."""
        system = FakeSystem()
        metrics = Metrics(system_source=system)
        # No time passed since the baseline: 0 until the counters move.
        self.assertEqual(value(metrics, "llamaswap_cpu_util_percent", core="0"), 0.0)
        system.cpu = CPU_LATER
        # core 0: busy +100 of +150; core 1: busy +0 of +100.
        self.assertAlmostEqual(value(metrics, "llamaswap_cpu_util_percent", core="0"), 100 * 2 / 3)
        self.assertEqual(value(metrics, "llamaswap_cpu_util_percent", core="1"), 0.0)
        # Unchanged counters keep the last figure rather than dropping to 0.
        self.assertAlmostEqual(value(metrics, "llamaswap_cpu_util_percent", core="0"), 100 * 2 / 3)
        self.assertEqual(value(metrics, "llamaswap_memory_total_bytes"), 16000 * KIB)
        self.assertEqual(value(metrics, "llamaswap_memory_free_bytes"), 4000 * KIB)
        self.assertEqual(value(metrics, "llamaswap_memory_used_bytes"), 7500 * KIB)
        self.assertEqual(value(metrics, "llamaswap_swap_total_bytes"), 2000 * KIB)
        self.assertEqual(value(metrics, "llamaswap_swap_used_bytes"), 500 * KIB)
        for interval, load in [("1m", 0.5), ("5m", 1.25), ("15m", 2.0)]:
            self.assertEqual(value(metrics, "llamaswap_load_average", interval=interval), load)
        self.assertEqual(
            value(metrics, "llamaswap_network_bytes_total", interface="eth0", direction="recv"),
            5_000_000,
        )
        self.assertEqual(
            value(metrics, "llamaswap_network_bytes_total", interface="eth0", direction="sent"),
            250_000,
        )
        families = {
            f.name: f.type for f in text_string_to_metric_families(metrics.render()[0].decode())
        }
        self.assertEqual(families["llamaswap_network_bytes"], "counter")
        self.assertEqual(families["llamaswap_cpu_util_percent"], "gauge")

    def test_missing_proc(self) -> None:
        """When no figure can be read they are left out and rendering still works."""
        metrics = Metrics(system_source=NoSystem())
        metrics.swap("m")
        names = {s.name for s in samples(metrics)}
        self.assertIn("llamaswap_swaps_total", names)
        self.assertFalse(
            {n for n in names if n.startswith(("llamaswap_cpu", "llamaswap_mem", "llamaswap_load"))}
        )

    def test_system_disabled(self) -> None:
        """system=False (performance.disabled) exports request metrics only."""
        metrics = Metrics(system=False, system_source=FakeSystem())
        self.assertIsNone(value(metrics, "llamaswap_memory_total_bytes"))

    def test_real_system(self) -> None:
        """psutil itself is a source: its figures are present, typed and sane."""
        metrics = Metrics()
        total = value(metrics, "llamaswap_memory_total_bytes")
        used = value(metrics, "llamaswap_memory_used_bytes")
        free = value(metrics, "llamaswap_memory_free_bytes")
        assert total is not None and used is not None and free is not None
        self.assertGreater(total, 0)
        self.assertTrue(0 <= used <= total and 0 <= free <= total, (total, used, free))
        self.assertIsNotNone(value(metrics, "llamaswap_load_average", interval="1m"))
        cpu = [s.value for s in samples(metrics) if s.name == "llamaswap_cpu_util_percent"]
        self.assertEqual(len(cpu), len(psutil.cpu_times(percpu=True)))
        self.assertTrue(all(0.0 <= percent <= 100.0 for percent in cpu), cpu)
        families = {
            f.name: f.type for f in text_string_to_metric_families(metrics.render()[0].decode())
        }
        self.assertEqual(families["llamaswap_cpu_util_percent"], "gauge")
        self.assertEqual(families["llamaswap_memory_total_bytes"], "gauge")
        self.assertEqual(families["llamaswap_network_bytes"], "counter")


class RemovedModelTests(SynchronousTestCase):
    """Series of models that left the configuration."""

    def test_forgotten_model_leaves_no_series_and_stays_gone(self) -> None:
        """A model no longer configured loses every series labelled with it,
        and late figures for it (its retired process stopping, a last
        request) are ignored; other models and peers' models are kept; a
        model configured again is counted afresh."""
        metrics = Metrics(system=False)
        metrics.retain_models(["llama", "other"])
        exercise(metrics)
        metrics.evicted("other", "swap")
        metrics.request_finished("peer/m", "/v1/embeddings", 200, None)
        metrics.retain_models(["other"])
        self.assertEqual([s for s in samples(metrics) if s.labels.get("model") == "llama"], [])
        exercise(metrics)
        self.assertEqual([s for s in samples(metrics) if s.labels.get("model") == "llama"], [])
        self.assertEqual(
            value(metrics, "llamaswap_evictions_total", model="other", reason="swap"), 1
        )
        self.assertEqual(
            value(
                metrics,
                "llamaswap_requests_total",
                model="peer/m",
                path="/v1/embeddings",
                status="200",
            ),
            1,
        )
        metrics.retain_models(["other", "llama"])
        metrics.evicted("llama", "reload")
        self.assertEqual(
            value(metrics, "llamaswap_evictions_total", model="llama", reason="ttl"), None
        )
        self.assertEqual(
            value(metrics, "llamaswap_evictions_total", model="llama", reason="reload"), 1
        )

    def test_model_configured_again_counts_from_zero(self) -> None:
        """A model removed by a reload and configured again gets every series
        with the same labels back in ``/metrics``, counted from zero (the
        cached label children of its first life are not reused)."""
        metrics = Metrics(system=False)
        metrics.retain_models(["llama"])
        exercise(metrics, api_key_name="key-0")
        metrics.upstream_retry("llama")
        exercise(metrics, api_key_name="key-0")
        metrics.retain_models([])
        metrics.retain_models(["llama"])
        self.assertEqual([s for s in samples(metrics) if s.labels.get("model") == "llama"], [])
        exercise(metrics, api_key_name="key-0")
        metrics.upstream_retry("llama")
        got = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for s in samples(metrics)
            if s.labels.get("model") == "llama" and not s.name.endswith("_created")
        }
        once = Metrics(system=False)
        exercise(once, api_key_name="key-0")
        once.upstream_retry("llama")
        want = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for s in samples(once)
            if s.labels.get("model") == "llama" and not s.name.endswith("_created")
        }
        self.assertEqual(got, want)
        self.assertEqual(
            value(
                metrics,
                "llamaswap_requests_total",
                model="llama",
                path="/v1/chat/completions",
                status="200",
            ),
            1,
        )
        self.assertEqual(value(metrics, "llamaswap_swaps_total", model="llama"), 1)
        self.assertEqual(value(metrics, "llamaswap_model_state", model="llama", state="ready"), 1)
        # API keys are not per model: their counts go on.
        self.assertEqual(
            value(metrics, "llamaswap_api_key_tokens_total", key="key-0", kind="output"), 60
        )
