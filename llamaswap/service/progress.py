"""Loading progress: which models are starting, for how long, and who waits.

While any model loads, a ``loadingProgress`` event goes out every second
(and on every start, ready or failure), so the UI can show elapsed time and
the number of requests waiting.  A start that ends ready is also counted in
the Prometheus load-time and swap figures.

Each starting model also gets a ``percent`` (how much of its files the
server's process group has read, :mod:`llamaswap.supervision.loadmeter`, or
what llama-server's load log shows; at most 99 until ready) and an ``eta_s``
(its load time learned in the activity store less the time elapsed, else
extrapolated from the percent); ``None`` where nothing is known.  ``/proc``
is sampled in a thread, at most one sample per model at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import task, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaswap.observe.events import EventBus
from llamaswap.observe.logs import LogHub, LogSubscription
from llamaswap.observe.prometheus import Metrics
from llamaswap.observe.store import IActivityStore, StoreClosed, learned_load_time
from llamaswap.supervision.loadmeter import file_sizes, group_bytes_read, log_percent
from llamaswap.supervision.prewarm import model_files
from llamaswap.supervision.process import ModelProcess, ProcessState
from llamaswap.supervision.router import Router

log = Logger()

#: the highest percent shown before the model is ready.
MAX_LOADING_PERCENT = 99.0
#: bytes of a starting model's output kept to find llama-server's progress dots.
LOG_TAIL = 4096


def _sample(pid: int, paths: tuple[str, ...]) -> tuple[int, int]:
    """(bytes read, total bytes) of a starting model (blocking: a thread's work)."""
    sizes = file_sizes(paths)
    return group_bytes_read(pid, sizes), sum(sizes.values())


#: ``sampler(pid, paths)``: a Deferred of (bytes read, total bytes).
Sampler = Callable[[int, tuple[str, ...]], "Deferred[tuple[int, int]]"]


def _in_thread(pid: int, paths: tuple[str, ...]) -> Deferred[tuple[int, int]]:
    return threads.deferToThread(_sample, pid, paths)


def estimate_eta(elapsed: float, percent: float | None, learned: float | None) -> float | None:
    """Seconds left: the learned load time less the elapsed time (at least 0),
    else the elapsed time extrapolated by the percent; ``None`` without either."""
    if learned is not None:
        return round(max(0.0, learned - elapsed), 1)
    if percent:
        return round(elapsed * (100.0 - percent) / percent, 1)
    return None


class LoadingProgress:
    """Follows process starts (a state listener) and publishes their progress."""

    def __init__(
        self,
        clock: IReactorTime,
        router: Router,
        bus: EventBus,
        metrics: Metrics,
        *,
        logs: LogHub | None = None,
        store: IActivityStore | None = None,
        sampler: Sampler = _in_thread,
    ) -> None:
        self._clock = clock
        self._router = router
        self._bus = bus
        self._metrics = metrics
        self._logs = logs
        self._store = store
        self._sampler = sampler
        #: model id -> when its current start began
        self._since: dict[str, float] = {}
        #: model id -> percent of its files read (last sample)
        self._read: dict[str, float] = {}
        #: model id -> the output of its current start (tail) and its subscription
        self._output: dict[str, bytearray] = {}
        self._subscriptions: dict[str, LogSubscription] = {}
        #: models starting by waking from sleep
        self._waking: set[str] = set()
        #: models with a /proc sample under way
        self._sampling: set[str] = set()
        #: model id -> learned load time (seconds), from the store
        self.learned: dict[str, float] = {}
        router.load_progress = self.of
        self._ticker = task.LoopingCall(self._tick)
        self._ticker.clock = clock
        if store is not None:
            store.load_times().addCallbacks(self.learned.update, self._store_failed)

    def _store_failed(self, failure: Failure) -> None:
        if not failure.check(StoreClosed):  # a load that ended as the service stopped
            log.failure("learned load times", failure)

    def _tick(self) -> None:
        for model_id in tuple(self._since):
            self._measure(model_id)
        self.publish()

    def _measure(self, model_id: str) -> None:
        """Start a /proc sample of the model's reads, unless one is under way."""
        process = self._router.processes.get(model_id)
        if process is None or model_id in self._sampling:
            return
        pid = process.pid
        paths = model_files(process.config)
        if pid is None or not paths:
            return
        self._sampling.add(model_id)
        since = self._since.get(model_id)

        def sampled(result: tuple[int, int]) -> None:
            read, total = result
            if total > 0 and self._since.get(model_id) == since:
                self._read[model_id] = 100.0 * read / total

        d = self._sampler(pid, paths)
        d.addCallback(sampled)
        d.addErrback(lambda failure: log.failure("{model} load progress", failure, model=model_id))
        d.addBoth(lambda _: self._sampling.discard(model_id))

    def percent(self, model_id: str) -> float | None:
        """How far the model's load is, 0–99; ``None`` when unknown."""
        found = [self._read[model_id]] if model_id in self._read else []
        output = self._output.get(model_id)
        if output:
            shown = log_percent(output.decode("utf-8", "replace").splitlines())
            if shown is not None:
                found.append(shown)
        if not found:
            return None
        return round(min(max(found), MAX_LOADING_PERCENT), 1)

    def of(self, model_id: str) -> dict[str, float | None] | None:
        """``percent`` and ``eta_s`` of a loading model; ``None`` when it is not loading."""
        since = self._since.get(model_id)
        if since is None:
            return None
        elapsed = self._clock.seconds() - since
        if model_id in self._waking:
            return {"percent": None, "eta_s": None}
        percent = self.percent(model_id)
        return {
            "percent": percent,
            "eta_s": estimate_eta(elapsed, percent, self.learned.get(model_id)),
        }

    def changed(self, process: ModelProcess, old: ProcessState, new: ProcessState) -> None:
        """A :data:`StateListener`: note starts, and their end."""
        model_id = process.model_id
        if new is ProcessState.STARTING:
            if old is ProcessState.SLEEPING:
                self._waking.add(model_id)  # a wake: no files read, not a load to learn
            self._since[model_id] = self._clock.seconds()
            self._read.pop(model_id, None)
            self._follow_output(model_id)
            if not self._ticker.running:
                self._ticker.start(1.0, now=True)
            return
        started = self._since.pop(model_id, None)
        waking = model_id in self._waking
        self._waking.discard(model_id)
        self._read.pop(model_id, None)
        self._output.pop(model_id, None)
        subscription = self._subscriptions.pop(model_id, None)
        if subscription is not None:
            subscription.close()
        if started is not None and new is ProcessState.READY:
            seconds = self._clock.seconds() - started
            self._metrics.model_loaded(model_id, seconds)
            self._metrics.swap(model_id)
            if not waking:
                self._learn(model_id, seconds)
        if not self._since and self._ticker.running:
            self._ticker.stop()
        self.publish()

    def models(self) -> list[dict[str, Any]]:
        """Every model being loaded: elapsed seconds and requests waiting."""
        snapshot = self._router.scheduler.snapshot()
        now = self._clock.seconds()
        return [
            {
                "id": model_id,
                "state": "starting",
                "elapsed_s": round(now - since, 2),
                "queue_length": snapshot.waiting.get(model_id, 0) + snapshot.queued.count(model_id),
                **(self.of(model_id) or {}),
            }
            for model_id, since in sorted(self._since.items())
        ]

    def _follow_output(self, model_id: str) -> None:
        """Keep the tail of what the model prints during this start."""
        if self._logs is None:
            return
        output = self._output[model_id] = bytearray()

        def seen(data: bytes) -> None:
            output.extend(data)
            del output[:-LOG_TAIL]

        old = self._subscriptions.pop(model_id, None)
        if old is not None:
            old.close()
        self._subscriptions[model_id] = self._logs.model(model_id).subscribe(seen)

    def _learn(self, model_id: str, seconds: float) -> None:
        self.learned[model_id] = learned_load_time(self.learned.get(model_id), seconds)
        if self._store is not None:
            self._store.add_load_time(model_id, seconds).addErrback(self._store_failed)

    def publish(self) -> None:
        self._bus.publish("loadingProgress", {"models": self.models()})

    def stop(self) -> None:
        """Stop the periodic events (the service is stopping)."""
        if self._ticker.running:
            self._ticker.stop()
        for subscription in self._subscriptions.values():
            subscription.close()
        self._subscriptions.clear()
