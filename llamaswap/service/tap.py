"""Command-line options and the service tree (``twistd llamaswap``)."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from twisted.application import service, strports
from twisted.internet import defer, task, threads
from twisted.logger import Logger, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

from llamaswap import __version__
from llamaswap.config import Config, ConfigError
from llamaswap.config.loader import load_config_sources
from llamaswap.config.merge import config_dir_files
from llamaswap.observe.activity import ActivityEntry
from llamaswap.observe.captures import CaptureCache
from llamaswap.observe.events import (
    EventBus,
    bridge_logs,
    model_status_records,
    ui_config_payload,
)
from llamaswap.observe.inflight import InflightTracker
from llamaswap.observe.logs import LogHub, write_stdout
from llamaswap.observe.prometheus import Metrics
from llamaswap.observe.recording import ActivityRecorder
from llamaswap.observe.store import open_store
from llamaswap.service.logsetup import set_log_level
from llamaswap.service.processes import build_processes, process_factory
from llamaswap.service.systemd import (
    DrainService,
    Notifier,
    SequentialMultiService,
    ShutdownGrace,
    SystemdNotifyService,
    running_models_status,
)
from llamaswap.supervision.process import ModelProcess, ProcessState, StateListener
from llamaswap.supervision.router import Router
from llamaswap.upstream.client import UpstreamClient
from llamaswap.web.app import LlamaSwapApp
from llamaswap.web.site import LlamaSwapSite
from llamaswap.web.streams import streams_resource

log = Logger()

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
_ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "tls", "unix", "systemd")


def listen_endpoint(value: str, cert: str | None = None, key: str | None = None) -> str:
    """A Twisted endpoint string for ``--listen`` (llama-swap's ``host:port``
    and ``:port`` forms are accepted too)."""
    kind = value.split(":", 1)[0]
    if kind in _ENDPOINT_TYPES:
        return value
    match = re.fullmatch(r"(?:\[([^\]]*)\]|([^:]*)):(\d+)", value)
    if match is None:
        raise usage.UsageError(f"--listen: not an endpoint or host:port: {value!r}")
    host = match.group(1) if match.group(1) is not None else match.group(2)
    port = match.group(3)
    host = host or "0.0.0.0"
    if host == "localhost":
        host = "127.0.0.1"
    escaped = host.replace(":", r"\:")
    if cert and key:
        return f"ssl:{port}:interface={escaped}:privateKey={key}:certKey={cert}"
    return f"tcp:{port}:interface={escaped}"


def is_loopback_only(endpoint: str) -> bool:
    if endpoint.startswith(("unix:", "systemd:")):
        return True
    found = re.search(r"(?:^|:)interface=((?:\\.|[^:\\])+)", endpoint)
    if not found:
        return False
    host = re.sub(r"\\(.)", r"\1", found.group(1))
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Options(usage.Options):
    synopsis = "-c CONFIG [--listen ENDPOINT]"
    optParameters = [
        ["config", "c", None, "Path to the YAML configuration file."],
        ["listen", "l", DEFAULT_LISTEN, "Twisted endpoint or host:port to listen on."],
        ["config-dir", None, None, "Directory of extra *.yaml files merged after --config."],
        ["tls-cert-file", None, None, "TLS certificate (with --tls-key-file)."],
        ["tls-key-file", None, None, "TLS private key (with --tls-cert-file)."],
    ]
    optFlags = [
        ["watch-config", None, "Reload the configuration when the file changes."],
        ["version", "V", "Print the version and exit."],
    ]

    def postOptions(self) -> None:
        if self["version"]:
            print(f"version: {__version__}")
            raise SystemExit(0)
        if not self["config"] and not self["config-dir"]:
            raise usage.UsageError("at least one of --config or --config-dir must be provided")
        if bool(self["tls-cert-file"]) != bool(self["tls-key-file"]):
            raise usage.UsageError(
                "both --tls-cert-file and --tls-key-file must be provided for TLS"
            )
        listen = self["listen"]
        if self["tls-cert-file"] and listen == DEFAULT_LISTEN:
            listen = "127.0.0.1:8443"
        self["endpoint"] = listen_endpoint(listen, self["tls-cert-file"], self["tls-key-file"])
        self["loaded"] = load_or_exit(self["config"], self["config-dir"])


def load_or_exit(path: str | None, config_dir: str | None = None) -> Config:
    """Load the config; on errors print one line per problem and exit 1."""
    try:
        config = load_config_sources(path, config_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(1) from None
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return config


def build_recorder(
    config: Config, reactor: Any, metrics: Metrics, bus: EventBus | None = None
) -> ActivityRecorder:
    """The activity store (``store.path`` SQLite file, else the in-memory ring
    of ``metricsMaxInMemory`` rows) and capture cache (``captureBuffer`` MiB
    of compressed captures; 0 disables)."""
    captures = None
    if config.capture_buffer_mib > 0:
        captures = CaptureCache(config.capture_buffer_mib * 1024 * 1024)
    try:
        if captures is None:
            store = open_store(config.store, reactor)
        else:
            store = open_store(config.store, reactor, captures.has)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    on_entry: Callable[[ActivityEntry], None] | None = None
    if bus is not None:
        events = bus

        def on_entry(entry: ActivityEntry) -> None:
            events.activity(entry.id)

    return ActivityRecorder(reactor, store, captures, metrics, on_entry)


class LlamaSwapService(service.Service):
    """Owns the router and the model processes; stopping it stops every child.

    ``sources`` (config file, config dir) are re-read by :meth:`reload`."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        sources: tuple[str | None, str | None] = (None, None),
    ) -> None:
        self.config = config
        self._reactor = reactor
        self.sources = sources
        self._stdout_subscription: Any = None
        self.logs = LogHub(config.log_to_stdout, None, config.log_time_format)
        self.bus = EventBus()
        self._stop_bridge = bridge_logs(self.logs, self.bus)
        self._log_observer = self.logs.proxy_observer(config.log_level)
        self.inflight = InflightTracker(reactor, self.bus)
        self.metrics = Metrics(system=not config.performance_disabled)
        #: called for every state change of every process, current or future
        self.process_listeners: list[StateListener] = [
            lambda p, old, new: self.metrics.model_state(p.model_id, new.value),
            lambda p, old, new: self._publish_status(),
            self._track_loading,
        ]
        #: model id -> when its current start began (for loading progress)
        self._loading_since: dict[str, float] = {}
        self._progress = task.LoopingCall(self._publish_loading)
        self._progress.clock = reactor
        processes = build_processes(config, reactor, logs=self.logs)
        self.router = Router(config, processes, clock=reactor, on_evicted=self.metrics.evicted)
        for process in processes.values():
            self._watch(process)
        self.client = UpstreamClient(reactor)
        self.recorder = build_recorder(config, reactor, self.metrics, self.bus)
        self.streams = streams_resource(
            self.logs,
            self.bus,
            model_status=self.model_status,
            inflight=self.inflight,
            ui_config=lambda: ui_config_payload(self.config),
            active_profile=lambda: self.app.active_profile,
            resolve_model=lambda name: self.config.resolve(name),
            clock=reactor,
        )
        self.app = LlamaSwapApp(
            config,
            router=self.router,
            client=self.client,
            recorder=self.recorder,
            inflight=self.inflight,
            streams=self.streams,
            reactor=reactor,
            on_profile_changed=self._profile_changed,
        )
        self._reloading: defer.Deferred[None] | None = None
        self._reload_again = False

    def _track_loading(self, process: ModelProcess, old: ProcessState, new: ProcessState) -> None:
        model_id = process.model_id
        if new is ProcessState.STARTING:
            self._loading_since[model_id] = self._reactor.seconds()
            if not self._progress.running:
                self._progress.start(1.0, now=True)
            return
        started = self._loading_since.pop(model_id, None)
        if started is not None and new is ProcessState.READY:
            self.metrics.model_loaded(model_id, self._reactor.seconds() - started)
            self.metrics.swap(model_id)
        if not self._loading_since and self._progress.running:
            self._progress.stop()
        self._publish_loading()

    def loading_progress(self) -> list[dict[str, Any]]:
        """Every model being loaded: elapsed seconds and requests waiting."""
        snapshot = self.router.scheduler.snapshot()
        now = self._reactor.seconds()
        return [
            {
                "id": model_id,
                "state": "starting",
                "elapsed_s": round(now - since, 2),
                "queue_length": snapshot.waiting.get(model_id, 0) + snapshot.queued.count(model_id),
            }
            for model_id, since in sorted(self._loading_since.items())
        ]

    def _publish_loading(self) -> None:
        self.bus.publish("loadingProgress", {"models": self.loading_progress()})

    def _profile_changed(self, active: str | None) -> None:
        self.bus.profile_changed(active)
        self.bus.model_status(self.model_status())

    def _publish_status(self) -> None:
        self.bus.model_status(self.model_status())

    def model_status(self) -> list[dict[str, Any]]:
        return model_status_records(self.config, self.router.processes)

    @property
    def processes(self) -> dict[str, ModelProcess]:
        return self.router.processes

    def _watch(self, process: ModelProcess) -> None:
        self.metrics.model_state(process.model_id, process.state.value)
        process.add_state_listener(self._notify_listeners)

    def _notify_listeners(
        self, process: ModelProcess, old: ProcessState, new: ProcessState
    ) -> None:
        for listener in self.process_listeners:
            listener(process, old, new)

    def startService(self) -> None:
        super().startService()
        globalLogPublisher.addObserver(self._log_observer)
        if self.logs.log_to_stdout in ("upstream", "both"):
            self._stdout_subscription = self.logs.upstream.subscribe(write_stdout)
        log.info(
            "llamaswap {version} managing {count} models: {models}",
            version=__version__,
            count=len(self.config.models),
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
        """Re-read the config sources and apply them (docs/design.md, difference 4).

        A reload requested while one runs is not dropped: one more reload
        follows, so the last change always wins."""
        if self._reloading is not None:
            self._reload_again = True
            return self._reloading
        self._reloading = defer.Deferred.fromCoroutine(self._reload_until_settled())
        return self._reloading

    async def _reload_until_settled(self) -> None:
        try:
            while True:
                self._reload_again = False
                await self._reload_once()
                if not self._reload_again:
                    return
        finally:
            self._reloading = None

    async def _reload_once(self) -> None:
        path, config_dir = self.sources
        try:
            config = await threads.deferToThread(load_config_sources, path, config_dir)
        except ConfigError as exc:
            log.warn("failed to reload config; keeping the running one:")
            for problem in exc.problems:
                log.warn("  {problem}", problem=problem)
            raise
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Switch to ``config``: unchanged models keep serving."""
        for warning in config.warnings:
            log.warn("config: {warning}", warning=warning)
        build = process_factory(config, self._reactor, logs=self.logs)
        created = self.router.reconfigure(config, build)
        for process in created:
            self._watch(process)
        self.app.reconfigure(config)
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

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        # Long-lived streams first, so nothing waits on them (as llama-swap).
        self.streams.close_all()
        self.inflight.close()
        if self._progress.running:
            self._progress.stop()
        log.info("stopping every model process")
        timeout = max([m.unload_timeout for m in self.config.models.values()] or [10])
        d = self.router.shutdown(timeout)
        d.addBoth(lambda _: self.client.close())
        d.addBoth(lambda _: self.app.close())
        d.addBoth(lambda _: self.recorder.store.close())
        d.addCallback(lambda _: log.info("shutdown complete"))
        d.addBoth(self._stop_logging)
        return d

    def _stop_logging(self, result: object) -> object:
        self._stop_bridge()
        self.bus.close()
        if self._stdout_subscription is not None:
            self._stdout_subscription.close()
        globalLogPublisher.removeObserver(self._log_observer)
        return result


def _reload_failed(failure: Failure) -> None:
    """A rejected config was already reported line by line; anything else is a bug."""
    if not failure.check(ConfigError):
        log.failure("reload failed", failure)


class ReloadService(service.Service):
    """Reloads on SIGHUP and, with ``--watch-config``, when a source changes.

    The watcher polls the sources' mtime and size every ``interval`` seconds
    (from a thread: ``stat`` is file I/O); the first poll is the baseline.
    """

    name = "reload"  # type: ignore[assignment]

    def __init__(
        self,
        core: LlamaSwapService,
        reactor: Any,
        *,
        watch: bool = False,
        interval: float = 2.0,
        notify: SystemdNotifyService | None = None,
    ) -> None:
        self._core = core
        self._reactor = reactor
        self._watch = watch
        self._interval = interval
        self._notify = notify
        self._poller: task.LoopingCall | None = None
        self._seen: object = None
        self._previous_handler: Any = None

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
        if self._watch:
            self._poller = task.LoopingCall(self._poll)
            self._poller.clock = self._reactor
            self._poller.start(self._interval, now=True).addErrback(
                lambda f: log.failure("config watcher stopped", f)
            )

    def stopService(self) -> None:
        super().stopService()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        if self._poller is not None and self._poller.running:
            self._poller.stop()

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.trigger, "SIGHUP")

    def trigger(self, why: str) -> defer.Deferred[None]:
        log.info("reloading the configuration ({why})", why=why)
        if self._notify is not None:
            d = self._notify.reload(self._core.reload)
        else:
            d = self._core.reload()
        return d.addErrback(_reload_failed)

    async def _poll(self) -> None:
        path, config_dir = self._core.sources
        current = await threads.deferToThread(_fingerprint, path, config_dir)
        previous, self._seen = self._seen, current
        if previous is not None and current != previous and current is not None:
            self.trigger("a config file changed")


def _fingerprint(path: str | None, config_dir: str | None) -> object:
    """mtime and size of every config source; ``None`` when one is missing
    (a rename-style write in progress: wait for the next poll)."""
    files = []
    if path:
        files.append(path)
    if config_dir:
        try:
            files.extend(config_dir_files(config_dir))
        except OSError:
            return None
    result = []
    for name in files:
        try:
            stat = os.stat(name)
        except OSError:
            return None
        result.append((name, stat.st_mtime_ns, stat.st_size))
    return tuple(result)


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    config: Config = options["loaded"]
    set_log_level(config.log_level)
    # Stops run last-added first, one at a time: STOPPING=1, stop listening,
    # wait for in-flight requests (bounded), then stop every model process.
    top = SequentialMultiService()
    core = LlamaSwapService(config, reactor, (options["config"], options["config-dir"]))
    core.setServiceParent(top)
    snapshot = core.router.scheduler.snapshot
    DrainService(
        ShutdownGrace(reactor),
        in_flight=lambda: sum(snapshot().reserved.values()),
        describe=lambda: ", ".join(f"{m}: {n}" for m, n in sorted(snapshot().reserved.items())),
        reactor=reactor,  # type: ignore[arg-type]
    ).setServiceParent(top)
    endpoint = options["endpoint"]
    if not is_loopback_only(endpoint) and not config.api_keys:
        log.warn(
            "listening on {endpoint}: reachable from other hosts and no apiKeys are configured",
            endpoint=endpoint,
        )
    site = LlamaSwapSite(core.app.resource(), reactor)
    web = strports.service(endpoint, site)
    web.setServiceParent(top)
    notify = SystemdNotifyService(
        Notifier.from_environment(), reactor, lambda: running_models_status(core.processes)
    )
    core.process_listeners.append(lambda *_: notify.update_status())
    notify.setServiceParent(top)
    ReloadService(core, reactor, watch=options["watch-config"], notify=notify).setServiceParent(top)
    return top
