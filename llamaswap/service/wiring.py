"""Builds the service: every collaborator made once, here, and passed on.

The order follows what each part needs: logs and the event bus first, then
metrics, the model processes and their router, the proxy client and the
activity recorder, the live streams, the web app, and finally the service
that owns them all.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import threads

from llamaswap.config import Config, ConfigError
from llamaswap.config.devices import DeviceLayer, system_devices
from llamaswap.observe.activity import ActivityEntry
from llamaswap.observe.captures import CaptureCache, CaptureEncoder
from llamaswap.observe.events import EventBus, bridge_logs, ui_config_payload
from llamaswap.observe.footprints import ResourceMonitor
from llamaswap.observe.inflight import InflightTracker
from llamaswap.observe.logs import LogHub
from llamaswap.observe.prometheus import Metrics
from llamaswap.observe.recording import ActivityRecorder
from llamaswap.observe.store import open_store
from llamaswap.service.processes import build_processes, process_factory
from llamaswap.service.progress import LoadingProgress
from llamaswap.service.reload import Sources
from llamaswap.service.service import LlamaSwapService
from llamaswap.supervision.promptcache import PromptCaches
from llamaswap.supervision.router import ProcessFactory, Router
from llamaswap.upstream.client import UpstreamClient
from llamaswap.web.app import LlamaSwapApp
from llamaswap.web.streams import streams_resource


def build_recorder(
    config: Config,
    reactor: Any,
    metrics: Metrics,
    bus: EventBus,
    prompt_caches: PromptCaches | None = None,
) -> ActivityRecorder:
    """The activity store (``store.path`` SQLite file, else the in-memory ring
    of ``metricsMaxInMemory`` rows) and capture cache (``captureBuffer`` MiB
    of compressed captures, encoded off the reactor; 0 disables); every stored
    row is announced on ``bus`` (and its ``timings.cache_n`` told to the
    prompt caches)."""
    captures = None
    if config.capture_buffer_mib > 0:
        captures = CaptureCache(config.capture_buffer_mib * 1024 * 1024, CaptureEncoder(reactor))
    try:
        if captures is None:
            store = open_store(config.store, reactor)
        else:
            store = open_store(config.store, reactor, captures.has)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None

    def on_entry(entry: ActivityEntry) -> None:
        bus.activity(entry.id)
        if prompt_caches is not None:
            prompt_caches.observed(entry.model, entry.resp_status_code, entry.tokens.cache_tokens)

    return ActivityRecorder(reactor, store, captures, metrics, on_entry)


def build_service(
    config: Config,
    reactor: Any,
    sources: Sources = (None, None),
    *,
    loopback_only: bool = False,
    devices: DeviceLayer | None = None,
) -> LlamaSwapService:
    """The service for ``config``.

    ``reactor`` provides time, processes and TCP (children, health checks,
    upstream and peer connections); ``sources`` (config file, config dir)
    are what a reload re-reads; ``loopback_only`` says that the server
    listens on loopback addresses only (the DNS-rebinding guard then
    accepts only loopback names and ``allowedHosts`` in ``Host``);
    ``devices`` is what footprints are measured and free memory probed
    with (default: the real machine, NVML for NVIDIA devices)."""
    logs = LogHub(config.log_to_stdout, None, config.log_time_format)
    bus = EventBus()
    unbridge = bridge_logs(logs, bus)
    inflight = InflightTracker(reactor, bus)
    metrics = Metrics(system=not config.performance_disabled)
    prompt_caches = PromptCaches(reactor, config.prompt_cache, os.environ)
    router = Router(
        config,
        build_processes(config, reactor, logs=logs, prompt_caches=prompt_caches),
        clock=reactor,
        on_evicted=metrics.evicted,
    )

    def processes_of(reloaded: Config) -> ProcessFactory:
        return process_factory(reloaded, reactor, logs=logs, prompt_caches=prompt_caches)

    client = UpstreamClient(reactor)
    recorder = build_recorder(config, reactor, metrics, bus, prompt_caches)
    resources = ResourceMonitor(
        config,
        router,
        devices=devices or system_devices(),
        store=recorder.store,
        clock=reactor,
        # the thread pool is asked for only when used (a resources config)
        run=lambda fn, *args: threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), fn, *args
        ),
        listeners=(bus.resources, metrics.resources),
    )
    router.probe_free = resources.probe
    # The streams ask the app and the service (below) only while serving a
    # request; both exist by then, and the service's config is the current one.
    app: LlamaSwapApp
    core: LlamaSwapService
    streams = streams_resource(
        logs,
        bus,
        model_status=lambda: core.model_status(),
        inflight=inflight,
        ui_config=lambda: ui_config_payload(core.config),
        active_profile=lambda: app.active_profile,
        resolve_model=lambda name: core.config.resolve(name),
        clock=reactor,
    )
    app = LlamaSwapApp(
        config,
        router=router,
        client=client,
        recorder=recorder,
        inflight=inflight,
        metrics=metrics,
        streams=streams,
        reactor=reactor,
        on_profile_changed=lambda active: core.profile_changed(active),
        loopback_only=loopback_only,
        resource_report=resources.report,
    )
    core = LlamaSwapService(
        config,
        reactor=reactor,
        sources=sources,
        logs=logs,
        bus=bus,
        inflight=inflight,
        metrics=metrics,
        router=router,
        process_factory=processes_of,
        client=client,
        recorder=recorder,
        streams=streams,
        app=app,
        loading=LoadingProgress(reactor, router, bus, metrics, logs=logs, store=recorder.store),
        log_observer=logs.proxy_observer(config.log_level),
        unbridge=unbridge,
        resources=resources,
    )
    return core
