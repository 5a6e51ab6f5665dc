"""Prometheus ``/metrics``: request-path metrics and system figures.

`Metrics` owns a dedicated ``CollectorRegistry`` (never the process-global
one, so several app instances or tests never share series).  The app calls
its methods as things happen: a request finished, a request waited in the
queue, a model loaded, swapped, was evicted (by reason) or changed state.
A local model that a reload removes loses every series labelled with it.
Label children are resolved once per model (``labels()`` is not called per
request) and dropped with that model's series.
API keys are exported only by name (``key-<index>`` from `api_key_label`),
never the secret; a name of any other shape is refused.

`SystemCollector` exports llama-swap's system figures, read through psutil at
scrape time (a handful of tiny procfs reads on Linux; no sampling loop).  CPU
use per core is the change since the previous scrape (or since start for the
first).
GPU figures are not exported: llama-swap gets them from ``nvidia-smi`` and
friends, which means spawning a process per sample; there is no cheap source.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.logger import Logger

from llamaswap.observe.usage import TokenMetrics
from llamaswap.supervision.process import ProcessState

__all__ = [
    "CONTENT_TYPE",
    "MODEL_STATES",
    "Metrics",
    "SystemCollector",
    "SystemSource",
    "api_key_label",
]

log = Logger()

#: llama-swap's ``/metrics`` content type; `generate_latest` writes this format.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: The states ``llamaswap_model_state`` reports for every model (one of them is 1).
MODEL_STATES: tuple[str, ...] = tuple(state.value for state in ProcessState)

#: Seconds; a request that had to wait for a swap lands in the upper buckets.
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKENS_PER_SECOND_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
QUEUE_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MODEL_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

_KEY_NAME = re.compile(r"key-\d+\Z")


def api_key_label(index: int) -> str:
    """The exported name of the ``index``-th configured API key (see `ApiKeys.match`)."""
    return f"key-{index}"


def _token_children(metric: Any, name: str) -> tuple[Any, Any, Any]:
    """The input, output and cached children of a token counter for ``name``
    (a model or an API key)."""
    labels = metric.labels
    return labels(name, "input"), labels(name, "output"), labels(name, "cached")


def _count_tokens(children: tuple[Any, Any, Any], counts: tuple[int, int, int]) -> None:
    for child, count in zip(children, counts, strict=True):
        if count:
            child.inc(count)


class _Series:
    """The label children of one model, resolved once (``metric.labels`` builds
    a tuple and takes a lock on every call).  Each is made on first use, so a
    series appears in ``/metrics`` exactly when it did without the cache; the
    whole object is dropped when the model's series are removed
    (`Metrics.forget_model`), so no cached child is ever a detached series."""

    __slots__ = (
        "evictions",
        "generation",
        "load",
        "prompt",
        "queue_wait",
        "requests",
        "retries",
        "states",
        "swaps",
        "tokens",
        "ttfb",
    )

    def __init__(self) -> None:
        #: (path without query, status) -> child of ``llamaswap_requests``
        self.requests: dict[tuple[str, int], Any] = {}
        #: the input, output and cached children of ``llamaswap_tokens``
        self.tokens: tuple[Any, Any, Any] | None = None
        self.ttfb: Any = None
        self.prompt: Any = None
        self.generation: Any = None
        self.queue_wait: Any = None
        self.load: Any = None
        self.swaps: Any = None
        self.retries: Any = None
        #: reason -> child of ``llamaswap_evictions``
        self.evictions: dict[str, Any] = {}
        #: state -> child of ``llamaswap_model_state``
        self.states: dict[str, Any] = {}


class Metrics:
    """The request-path metrics of one llamaswap instance, and their text rendering."""

    def __init__(
        self,
        system: bool = True,
        system_source: SystemSource = psutil,  # type: ignore[assignment]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._requests = Counter(
            "llamaswap_requests",
            "Finished model requests by path and HTTP status",
            ["model", "path", "status"],
            registry=registry,
        )
        self._tokens = Counter(
            "llamaswap_tokens",
            "Tokens by kind (input, output, cached) as reported by the upstream",
            ["model", "kind"],
            registry=registry,
        )
        self._ttfb = Histogram(
            "llamaswap_time_to_first_byte_seconds",
            "Time from request arrival to the first body byte of the model's response",
            ["model"],
            buckets=TTFB_BUCKETS,
            registry=registry,
        )
        self._speed = Histogram(
            "llamaswap_tokens_per_second",
            "Upstream-reported speed per request, prompt processing or generation",
            ["model", "phase"],
            buckets=TOKENS_PER_SECOND_BUCKETS,
            registry=registry,
        )
        self._queue_wait = Histogram(
            "llamaswap_queue_wait_seconds",
            "Time a request that could not be served at once waited before being forwarded"
            " (queue and model load)",
            ["model"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self._load = Histogram(
            "llamaswap_model_load_seconds",
            "Time from starting a model process to it being ready",
            ["model"],
            buckets=MODEL_LOAD_BUCKETS,
            registry=registry,
        )
        self._swaps = Counter(
            "llamaswap_swaps",
            "Model starts that were needed to serve a request",
            ["model"],
            registry=registry,
        )
        self._evictions = Counter(
            "llamaswap_evictions",
            "Stops of a starting or running model by reason (swap, ttl, reload, unload, crash)",
            ["model", "reason"],
            registry=registry,
        )
        self._retries = Counter(
            "llamaswap_upstream_retries",
            "Requests re-sent after a reused keep-alive connection closed before any response byte",
            ["model"],
            registry=registry,
        )
        self._state = Gauge(
            "llamaswap_model_state",
            "1 for the model's current state, 0 for the others",
            ["model", "state"],
            registry=registry,
        )
        self._key_tokens = Counter(
            "llamaswap_api_key_tokens",
            "Tokens spent per API key (by key name, never the key)",
            ["key", "kind"],
            registry=registry,
        )
        self._resource_gauges = {
            figure: Gauge(
                f"llamaswap_resource_{figure}_bytes",
                f"Placement: the {meaning} of each configured resource (bytes)",
                ["resource"],
                registry=registry,
            )
            for figure, meaning in (
                ("total", "size"),
                ("reserved", "footprints of the models starting, ready or stopping"),
                ("free", "free memory a probe last reported (absent without a probe)"),
            )
        }
        self._resource_names: set[str] = set()
        #: model -> the states it has series for (a dict keeps their order).
        self._states: dict[str, dict[str, None]] = {}
        #: every metric with a ``model`` label: a removed model's series go.
        self._per_model: tuple[Counter | Gauge | Histogram, ...] = (
            self._requests,
            self._tokens,
            self._ttfb,
            self._speed,
            self._queue_wait,
            self._load,
            self._swaps,
            self._evictions,
            self._retries,
            self._state,
        )
        #: the local models of the current configuration (`retain_models`)
        self._configured: frozenset[str] = frozenset()
        #: local models a reload removed: late figures for them are ignored
        self._forgotten: set[str] = set()
        self._refused_key_name = False
        #: model -> its label children; dropped with its series (`forget_model`)
        self._series: dict[str, _Series] = {}
        #: API key name -> its input, output and cached ``llamaswap_api_key_tokens``
        #: children (names are checked once; bounded by the configured keys)
        self._key_children: dict[str, tuple[Any, Any, Any]] = {}
        if system:
            registry.register(SystemCollector(system_source))

    def request_finished(
        self,
        model: str,
        path: str,
        status: int,
        usage_tokens: TokenMetrics | None,
        ttfb_s: float | None = None,
        prompt_tps: float | None = None,
        gen_tps: float | None = None,
        api_key_name: str | None = None,
    ) -> None:
        """Count one finished request.

        ``path`` is the forwarded path (its query string is dropped);
        ``ttfb_s`` is None when no body byte arrived; speeds that are None,
        zero or negative (llama-swap's −1, "not reported") are not observed.
        ``api_key_name`` must come from `api_key_label`.
        """
        if model in self._forgotten:
            return
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = _Series()
        if "?" in path:
            path = path.split("?", 1)[0]
        status = int(status)
        child = series.requests.get((path, status))
        if child is None:
            child = series.requests[path, status] = self._requests.labels(model, path, str(status))
        child.inc()
        if usage_tokens is None:
            counts = _NO_TOKENS
        else:  # -1 means "not reported"; a counter only goes up.
            counts = (
                usage_tokens.input_tokens if usage_tokens.input_tokens > 0 else 0,
                usage_tokens.output_tokens if usage_tokens.output_tokens > 0 else 0,
                usage_tokens.cache_tokens if usage_tokens.cache_tokens > 0 else 0,
            )
        if series.tokens is None:
            series.tokens = _token_children(self._tokens, model)
        _count_tokens(series.tokens, counts)
        if ttfb_s is not None and math.isfinite(ttfb_s) and ttfb_s >= 0:
            if series.ttfb is None:
                series.ttfb = self._ttfb.labels(model)
            series.ttfb.observe(ttfb_s)
        # Speeds: zero, negative (not reported), NaN and infinity are skipped.
        if prompt_tps is not None and prompt_tps > 0 and math.isfinite(prompt_tps):
            if series.prompt is None:
                series.prompt = self._speed.labels(model, "prompt")
            series.prompt.observe(prompt_tps)
        if gen_tps is not None and gen_tps > 0 and math.isfinite(gen_tps):
            if series.generation is None:
                series.generation = self._speed.labels(model, "generation")
            series.generation.observe(gen_tps)
        if api_key_name is None:
            return
        key_tokens = self._key_children.get(api_key_name)
        if key_tokens is None:
            if not _KEY_NAME.match(api_key_name):
                # Never export what might be a secret.
                if not self._refused_key_name:
                    self._refused_key_name = True
                    log.warn("metrics: API key names must look like key-<index>; not counting")
                return
            key_tokens = self._key_children[api_key_name] = _token_children(
                self._key_tokens, api_key_name
            )
        _count_tokens(key_tokens, counts)

    def _model_series(self, model: str) -> _Series:
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = _Series()
        return series

    def queue_wait(self, model: str, seconds: float) -> None:
        """A request for ``model`` was forwarded after waiting ``seconds``."""
        if model in self._forgotten:
            return
        series = self._model_series(model)
        if series.queue_wait is None:
            series.queue_wait = self._queue_wait.labels(model)
        series.queue_wait.observe(max(seconds, 0.0))

    def model_loaded(self, model: str, seconds: float) -> None:
        """``model`` became ready ``seconds`` after its process was started."""
        if model in self._forgotten:
            return
        series = self._model_series(model)
        if series.load is None:
            series.load = self._load.labels(model)
        series.load.observe(max(seconds, 0.0))

    def swap(self, model: str) -> None:
        """``model`` was started to serve a request."""
        if model in self._forgotten:
            return
        series = self._model_series(model)
        if series.swaps is None:
            series.swaps = self._swaps.labels(model)
        series.swaps.inc()

    def evicted(self, model: str, reason: str) -> None:
        """``model`` (starting or running) was stopped; ``reason`` is swap, ttl,
        reload, unload or crash (the set is open: more may come)."""
        if model in self._forgotten:
            return
        evictions = self._model_series(model).evictions
        child = evictions.get(reason)
        if child is None:
            child = evictions[reason] = self._evictions.labels(model, reason)
        child.inc()

    def upstream_retry(self, model: str) -> None:
        """A request for ``model`` was re-sent (stale keep-alive connection)."""
        if model in self._forgotten:
            return
        series = self._model_series(model)
        if series.retries is None:
            series.retries = self._retries.labels(model)
        series.retries.inc()

    def model_state(self, model: str, state: str) -> None:
        """``model`` is now in ``state`` (a `ProcessState` value)."""
        if model in self._forgotten:
            return
        state = str(state)
        known = self._states.setdefault(model, dict.fromkeys(MODEL_STATES))
        known.setdefault(state)
        children = self._model_series(model).states
        for each in known:
            child = children.get(each)
            if child is None:
                child = children[each] = self._state.labels(model, each)
            child.set(1 if each == state else 0)

    def resources(self, report: Mapping[str, Any]) -> None:
        """The ``GET /api/resources`` body changed: set the resource gauges
        (total, reserved, free); resources no longer configured lose theirs,
        and ``free`` has no series while no probe answers."""
        figures: Mapping[str, Mapping[str, Any]] = report.get("resources", {})
        for name in self._resource_names - set(figures):
            for gauge in self._resource_gauges.values():
                gauge.remove_by_labels({"resource": name})
        self._resource_names = set(figures)
        for name, values in figures.items():
            for figure, gauge in self._resource_gauges.items():
                value = values.get(figure)
                if value is None:
                    gauge.remove_by_labels({"resource": name})
                else:
                    gauge.labels(name).set(value)

    def retain_models(self, models: Collection[str]) -> None:
        """``models`` are the local models configured now (at start and after
        each reload).  Earlier ones that are not among them are forgotten; a
        model configured again is counted afresh.  Other names (peers'
        models) are never forgotten."""
        models = frozenset(models)
        self._forgotten -= models
        for model in self._configured - models:
            self.forget_model(model)
        self._configured = models

    def forget_model(self, model: str) -> None:
        """``model`` left the configuration: every series labelled with it goes
        from ``/metrics``, and later figures for it (its retired process
        stopping, a last request finishing) are ignored until
        `retain_models` names it again."""
        self._forgotten.add(model)
        self._states.pop(model, None)
        self._series.pop(model, None)
        for metric in self._per_model:
            metric.remove_by_labels({"model": model})

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE


#: The input, output and cached counts (the order of `_Series.tokens`) of a
#: request without usage.
_NO_TOKENS = (0, 0, 0)


# --------------------------------------------------------------------------
# System figures (psutil)


class SystemSource(Protocol):
    """The part of psutil that `SystemCollector` reads; the ``psutil`` module
    itself is one (tests pass a fake with the same functions)."""

    def cpu_times(self, percpu: bool = ...) -> Any: ...

    def virtual_memory(self) -> Any: ...

    def swap_memory(self) -> Any: ...

    def getloadavg(self) -> tuple[float, float, float]: ...

    def net_io_counters(self, pernic: bool = ..., nowrap: bool = ...) -> Any: ...


#: What a source may raise when a figure cannot be read (no /proc file, no
#: permission, a platform without it): the figure is then left out.
_UNREADABLE = (
    OSError,
    RuntimeError,
    NotImplementedError,
    AttributeError,
    LookupError,
    ValueError,
    psutil.Error,
)
#: CPU time fields that count towards the total, as in /proc/stat (guest time
#: is already inside user time); fields a platform lacks count as 0.
_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


@dataclass(frozen=True)
class _CpuTimes:
    busy: float
    total: float


class SystemCollector(Collector):
    """llama-swap's system figures, read from ``source`` (psutil) when scraped.

    Memory follows gopsutil (what llama-swap reports): used = total − free −
    buffers − page cache (psutil's ``cached``, which includes reclaimable
    slab); free = ``MemFree``.  A figure that cannot be read is left out.
    Cores are labelled by their position in psutil's per-CPU list.
    """

    def __init__(self, source: SystemSource = psutil) -> None:  # type: ignore[assignment]
        self._source = source
        self._lock = threading.Lock()
        self._cpu = self._read_cpu()
        self._cpu_percent: dict[str, float] = {}

    def describe(self) -> Iterable[Metric]:
        # Names only, so registration neither reads figures nor moves the CPU baseline.
        return [
            GaugeMetricFamily("llamaswap_cpu_util_percent", "", labels=["core"]),
            GaugeMetricFamily("llamaswap_memory_total_bytes", ""),
            GaugeMetricFamily("llamaswap_memory_used_bytes", ""),
            GaugeMetricFamily("llamaswap_memory_free_bytes", ""),
            GaugeMetricFamily("llamaswap_swap_total_bytes", ""),
            GaugeMetricFamily("llamaswap_swap_used_bytes", ""),
            GaugeMetricFamily("llamaswap_load_average", "", labels=["interval"]),
            CounterMetricFamily("llamaswap_network_bytes", "", labels=["interface", "direction"]),
        ]

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # the CPU baseline moves on every scrape
            cpu = self._collect_cpu()
        if cpu is not None:
            yield cpu
        yield from self._collect_memory()
        yield from self._collect_load()
        yield from self._collect_network()

    def _read_cpu(self) -> dict[str, _CpuTimes]:
        try:
            per_cpu = self._source.cpu_times(percpu=True)
        except _UNREADABLE:
            return {}
        cores: dict[str, _CpuTimes] = {}
        for index, times in enumerate(per_cpu):
            total = sum(getattr(times, name, 0.0) for name in _CPU_FIELDS)
            idle = getattr(times, "idle", 0.0) + getattr(times, "iowait", 0.0)
            cores[str(index)] = _CpuTimes(busy=total - idle, total=total)
        return cores

    def _collect_cpu(self) -> Metric | None:
        now = self._read_cpu()
        if not now:
            return None
        family = GaugeMetricFamily(
            "llamaswap_cpu_util_percent",
            "CPU utilization per core (0-100) since the previous scrape",
            labels=["core"],
        )
        for core, times in now.items():
            before = self._cpu.get(core)
            if before is not None and times.total > before.total:
                busy = (times.busy - before.busy) / (times.total - before.total)
                self._cpu_percent[core] = min(max(busy * 100, 0.0), 100.0)
            family.add_metric([core], self._cpu_percent.get(core, 0.0))
        self._cpu = now
        return family

    def _collect_memory(self) -> Iterator[Metric]:
        try:
            memory = self._source.virtual_memory()
        except _UNREADABLE:
            memory = None
        if memory is not None:
            total, free = memory.total, memory.free
            cache = getattr(memory, "buffers", 0) + getattr(memory, "cached", 0)
            used = total - free - cache
            if used < 0:
                used = total - free
            yield _gauge("llamaswap_memory_total_bytes", "Total memory in bytes", total)
            yield _gauge("llamaswap_memory_used_bytes", "Used memory in bytes", used)
            yield _gauge("llamaswap_memory_free_bytes", "Free memory in bytes", free)
        try:
            swap = self._source.swap_memory()
        except _UNREADABLE:
            return
        yield _gauge("llamaswap_swap_total_bytes", "Total swap in bytes", swap.total)
        yield _gauge("llamaswap_swap_used_bytes", "Used swap in bytes", swap.total - swap.free)

    def _collect_load(self) -> Iterator[Metric]:
        try:
            loads = self._source.getloadavg()
        except _UNREADABLE:
            return
        family = GaugeMetricFamily("llamaswap_load_average", "Load average", labels=["interval"])
        for interval, value in zip(("1m", "5m", "15m"), loads, strict=True):
            family.add_metric([interval], value)
        yield family

    def _collect_network(self) -> Iterator[Metric]:
        try:
            interfaces = self._source.net_io_counters(pernic=True)
        except _UNREADABLE:
            return
        family = CounterMetricFamily(
            "llamaswap_network_bytes",
            "Total network bytes transferred",
            labels=["interface", "direction"],
        )
        for name, counters in interfaces.items():
            family.add_metric([name, "recv"], counters.bytes_recv)
            family.add_metric([name, "sent"], counters.bytes_sent)
        if family.samples:
            yield family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
