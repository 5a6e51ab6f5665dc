"""Loading progress: which models are starting, for how long, and who waits.

While any model loads, a ``loadingProgress`` event goes out every second
(and on every start, ready or failure), so the UI can show elapsed time and
the number of requests waiting.  A start that ends ready is also counted in
the Prometheus load-time and swap figures.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

from llamaswap.observe.events import EventBus
from llamaswap.observe.prometheus import Metrics
from llamaswap.supervision.process import ModelProcess, ProcessState
from llamaswap.supervision.router import Router


class LoadingProgress:
    """Follows process starts (a state listener) and publishes their progress."""

    def __init__(
        self, clock: IReactorTime, router: Router, bus: EventBus, metrics: Metrics
    ) -> None:
        self._clock = clock
        self._router = router
        self._bus = bus
        self._metrics = metrics
        #: model id -> when its current start began
        self._since: dict[str, float] = {}
        self._ticker = task.LoopingCall(self.publish)
        self._ticker.clock = clock

    def changed(self, process: ModelProcess, old: ProcessState, new: ProcessState) -> None:
        """A :data:`StateListener`: note starts, and their end."""
        model_id = process.model_id
        if new is ProcessState.STARTING:
            self._since[model_id] = self._clock.seconds()
            if not self._ticker.running:
                self._ticker.start(1.0, now=True)
            return
        started = self._since.pop(model_id, None)
        if started is not None and new is ProcessState.READY:
            self._metrics.model_loaded(model_id, self._clock.seconds() - started)
            self._metrics.swap(model_id)
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
            }
            for model_id, since in sorted(self._since.items())
        ]

    def publish(self) -> None:
        self._bus.publish("loadingProgress", {"models": self.models()})

    def stop(self) -> None:
        """Stop the periodic events (the service is stopping)."""
        if self._ticker.running:
            self._ticker.stop()
