"""The running llamaswap: the collaborators built by :mod:`.wiring`, started,
reconfigured and stopped together."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import ILogObserver, Logger, globalLogPublisher

from llamaswap import __version__
from llamaswap.config import Config
from llamaswap.core.text import count_of
from llamaswap.observe.events import EventBus, follow_processes, model_status_records
from llamaswap.observe.footprints import ResourceMonitor
from llamaswap.observe.inflight import InflightTracker
from llamaswap.observe.logs import LogHub
from llamaswap.observe.prometheus import Metrics
from llamaswap.observe.recording import ActivityRecorder
from llamaswap.service.logsetup import set_log_level, write_stdout
from llamaswap.service.progress import LoadingProgress
from llamaswap.service.reload import Coalescing, Sources, read_sources
from llamaswap.supervision.process import ModelProcess, ProcessState, StateListener
from llamaswap.supervision.router import ProcessFactory, Router
from llamaswap.upstream.client import UpstreamClient
from llamaswap.web.app import LlamaSwapApp
from llamaswap.web.streams import StreamsResource

log = Logger()


class LlamaSwapService(service.Service):
    """Owns the router and the model processes; stopping it stops every child.

    Every collaborator is built once by
    :func:`llamaswap.service.wiring.build_service` and passed in.
    ``sources`` (config file, config dir) are re-read by :meth:`reload`;
    ``process_factory(config)`` makes the processes of a reloaded config.
    ``unbridge`` stops the log → event bridge, ``log_observer`` writes
    llamaswap's own log events to the proxy log monitor while running."""

    def __init__(
        self,
        config: Config,
        *,
        reactor: Any,
        sources: Sources,
        logs: LogHub,
        bus: EventBus,
        inflight: InflightTracker,
        metrics: Metrics,
        router: Router,
        process_factory: Callable[[Config], ProcessFactory],
        client: UpstreamClient,
        recorder: ActivityRecorder,
        streams: StreamsResource,
        app: LlamaSwapApp,
        loading: LoadingProgress,
        log_observer: ILogObserver,
        unbridge: Callable[[], None],
        resources: ResourceMonitor | None = None,
    ) -> None:
        self.config = config
        self._reactor = reactor
        self.sources = sources
        self.logs = logs
        self.bus = bus
        self.inflight = inflight
        self.metrics = metrics
        self.router = router
        self._process_factory = process_factory
        self.client = client
        self.recorder = recorder
        self.streams = streams
        self.app = app
        self.loading = loading
        self._log_observer = log_observer
        self._unbridge = unbridge
        self._stdout_subscription: Any = None
        #: called for every state change of every process, current or future
        self.process_listeners: list[StateListener] = [self._state_metric, loading.changed]
        #: called with the new configuration once a reload has applied it.
        self.reload_listeners: list[Callable[[Config], object]] = []
        #: measured footprints, free memory, the resources report (placement)
        self.resources = resources
        if resources is not None:
            self.process_listeners.append(resources.changed)
        metrics.retain_models(config.models)
        for process in router.processes.values():
            self._watch(process)
        self._reloads = Coalescing(self._reload_once)

    @property
    def processes(self) -> dict[str, ModelProcess]:
        return self.router.processes

    def model_status(self) -> list[dict[str, Any]]:
        return model_status_records(self.config, self.router.processes)

    def profile_changed(self, active: str | None) -> None:
        """``PUT /api/profiles/active`` changed the active profile."""
        self.bus.profile_changed(active)
        self.bus.model_status(self.model_status())

    def _watch(self, process: ModelProcess) -> None:
        self.metrics.model_state(process.model_id, process.state.value)
        follow_processes(self.bus, [process], self.model_status)
        process.add_state_listener(self._notify_listeners)

    def _notify_listeners(
        self, process: ModelProcess, old: ProcessState, new: ProcessState
    ) -> None:
        for listener in self.process_listeners:
            listener(process, old, new)

    def _state_metric(self, process: ModelProcess, old: ProcessState, new: ProcessState) -> None:
        """The state gauge follows configured models (a removed model's series
        went with the reload that removed it)."""
        if process.model_id in self.config.models:
            self.metrics.model_state(process.model_id, new.value)

    def startService(self) -> None:
        super().startService()
        globalLogPublisher.addObserver(self._log_observer)
        if self.logs.log_to_stdout in ("upstream", "both"):
            self._stdout_subscription = self.logs.upstream.subscribe(write_stdout)
        if self.resources is not None:
            self.resources.start()
        self.app.start()
        log.info(
            "llamaswap {version} managing {count}: {models}",
            version=__version__,
            count=count_of(len(self.config.models), "model"),
            models=", ".join(self.config.models),
        )
        self.preload()

    def preload(self) -> defer.Deferred[None]:
        """Load ``hooks.on_startup.preload`` models in order, through the
        scheduler (group rules apply), without depending on the upstream
        answering any particular path."""
        return defer.Deferred.fromCoroutine(self._preload(list(self.config.preload)))

    async def _preload(self, names: list[str]) -> None:
        for name in names:
            model_id = self.config.resolve(name) if name else None
            if model_id is None:
                if name:
                    log.warn("preload: {name} is not a local model; skipped", name=name)
                continue
            log.info("preloading model: {model}", model=model_id)
            try:
                lease = await self.router.acquire(model_id)
            except Exception as exc:
                log.warn("preload of {model} failed: {error}", model=model_id, error=str(exc))
                continue
            lease.release()

    def reload(self) -> defer.Deferred[None]:
        """Re-read :attr:`sources` and :meth:`apply` them; a reload asked for
        while one runs is followed by one more, so the last change wins."""
        return self._reloads()

    async def _reload_once(self) -> None:
        self.apply(await read_sources(self.sources))

    def apply(self, config: Config) -> None:
        """Switch to ``config``: unchanged models keep serving (docs/design.md,
        difference 4)."""
        for warning in config.warnings:
            log.warn("config: {warning}", warning=warning)
        created = self.router.reconfigure(config, self._process_factory(config))
        self.metrics.retain_models(config.models)
        for process in created:
            self._watch(process)
        self.app.reconfigure(config)
        if self.resources is not None:
            self.resources.reconfigure(config)
        set_log_level(config.log_level)
        self.logs.set_log_level(config.log_level)
        self.logs.set_time_format(config.log_time_format)
        self.logs.retain_models(config.models)
        kept = sorted(set(config.models) - {p.model_id for p in created})
        log.info(
            "config reloaded: {kept} unchanged, new or changed: {changed}",
            kept=len(kept),
            changed=", ".join(p.model_id for p in created) or "none",
        )
        self.config = config
        self.bus.model_status(self.model_status())
        self.preload()
        for listener in self.reload_listeners:
            listener(config)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        # Long-lived streams first, so nothing waits on them (as llama-swap).
        self.streams.close_all()
        self.inflight.close()
        self.loading.stop()
        if self.resources is not None:
            self.resources.stop()
        log.info("stopping every model process")
        timeout = max([m.unload_timeout for m in self.config.models.values()] or [10])
        d = self.router.shutdown(timeout)
        d.addBoth(lambda _: self.client.close())
        d.addBoth(lambda _: self.app.close())
        d.addBoth(lambda _: self.recorder.store.close())
        d.addBoth(lambda _: self.recorder.close())
        d.addCallback(lambda _: log.info("shutdown complete"))
        d.addBoth(self._stop_logging)
        return d

    def _stop_logging(self, result: object) -> object:
        self._unbridge()
        self.bus.close()
        if self._stdout_subscription is not None:
            self._stdout_subscription.close()
        globalLogPublisher.removeObserver(self._log_observer)
        return result
