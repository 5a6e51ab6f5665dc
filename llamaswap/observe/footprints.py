"""Measured footprints and free memory: what the placement planner learns
from the machine, and what ``GET /api/resources`` reports.

A :class:`ResourceMonitor` follows the model processes (a state listener):

- after each start reaches ready, and every :data:`MEASURE_INTERVAL` seconds
  while loaded, it measures what the model's whole process group holds: the
  resident memory (RSS) of its members for host resources (``ram``...), the
  per-process memory NVML reports for NVIDIA devices (``gpu<N>``);
- the largest amount measured per model and command is kept (in the
  activity store, so a restart remembers it) and handed to the planner,
  which plans with the larger of it and the configured footprint;
- every interval it probes what is free (host ``MemAvailable``, NVML free);
- whenever the report changes (a model starts or stops, a measurement or a
  probe differs) it is announced: a ``resources`` event on ``/api/events``
  and the Prometheus resource gauges.

Every device call runs in a thread (``run``); only the results are applied
on the reactor.  Without a top-level ``resources`` the monitor does nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llamaswap.config import Config
from llamaswap.config.devices import DeviceError, DeviceLayer, gpu_index
from llamaswap.config.resources import ResourcesConfig, is_host, resources_json
from llamaswap.observe.store import IActivityStore
from llamaswap.supervision.process import ModelProcess, ProcessState
from llamaswap.supervision.router import Router

__all__ = ["MEASURE_INTERVAL", "ResourceMonitor", "command_key", "measure_group", "probe_free"]

log = Logger()

#: seconds between measurements of loaded models and probes of free memory.
MEASURE_INTERVAL = 30.0

#: ``run(fn, *args)``: call ``fn`` in a thread; the Deferred fires with its result.
Runner = Callable[..., defer.Deferred[Any]]
#: hears every changed ``GET /api/resources`` report.
ReportListener = Callable[[dict[str, Any]], object]


def command_key(argv: Collection[str]) -> str:
    """What a measurement is kept under beside the model id: a short hash of
    the command (another command is another footprint)."""
    return hashlib.sha256("\0".join(argv).encode("utf-8", "replace")).hexdigest()[:16]


def measure_group(devices: DeviceLayer, pgid: int, names: Collection[str]) -> dict[str, int]:
    """What process group ``pgid`` holds of each of ``names`` that can be
    measured (blocking: run it in a thread).  Host names get the group's
    RSS, ``gpu<N>`` the NVML memory of its members on device N; a figure
    that cannot be read is left out."""
    pids = devices.group_pids(pgid) | {pgid}
    held: dict[str, int] = {}
    rss: int | None = None
    for name in names:
        index = gpu_index(name)
        try:
            if index is not None:
                held[name] = devices.gpu_used_by(index, pids)
            elif is_host(name):
                if rss is None:
                    rss = devices.rss(pids)
                held[name] = rss
        except DeviceError:
            continue
    return held


def probe_free(devices: DeviceLayer, names: Collection[str]) -> dict[str, int | None]:
    """What is free of each of ``names`` (blocking): host memory available,
    NVML free memory; ``None`` where there is no probe."""
    free: dict[str, int | None] = {}
    for name in names:
        index = gpu_index(name)
        try:
            if index is not None:
                free[name] = devices.gpu_free(index)
            elif is_host(name):
                free[name] = devices.host_available()
            else:
                free[name] = None
        except DeviceError:
            free[name] = None
    return free


class ResourceMonitor:
    """Measures footprints, probes free memory and announces the resources report.

    ``router``'s processes are measured and its planner's costs told what
    was measured; ``store`` keeps measurements across restarts; ``run``
    calls a function in a thread; ``listeners`` hear each changed report."""

    def __init__(
        self,
        config: Config,
        router: Router,
        *,
        devices: DeviceLayer,
        store: IActivityStore,
        clock: IReactorTime,
        run: Runner,
        listeners: Collection[ReportListener] = (),
        interval: float = MEASURE_INTERVAL,
    ) -> None:
        self._router = router
        self._devices = devices
        self._store = store
        self._run = run
        self._listeners = list(listeners)
        self._interval = interval
        self._resources: ResourcesConfig | None = None
        self._commands: dict[str, str] = {}
        #: (model, command key) -> the largest bytes per resource measured
        self._kept: dict[tuple[str, str], dict[str, int]] = {}
        #: resource -> free bytes at the last probe (``None``: no probe)
        self.free: dict[str, int | None] = {}
        self._measuring: set[str] = set()
        self._last: dict[str, Any] | None = None
        self._stopped = False
        self._ticker = task.LoopingCall(self.tick)
        self._ticker.clock = clock
        self._adopt(config)

    # -- life -------------------------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        """Read kept measurements, then probe and measure every interval."""
        return defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        if self._resources is None:
            return
        self._stopped = False
        try:
            self._kept.update(await self._store.footprints())
        except Exception as exc:
            log.warn("footprints: cannot read the kept measurements: {error}", error=str(exc))
        self._apply_kept()
        if not self._ticker.running:
            self._ticker.start(self._interval, now=True)

    def stop(self) -> None:
        """Stop measuring; figures still on their way are dropped."""
        self._stopped = True
        if self._ticker.running:
            self._ticker.stop()

    def reconfigure(self, config: Config) -> None:
        """Adopt a reloaded configuration (new commands, new resources)."""
        had = self._resources is not None
        self._adopt(config)
        self._apply_kept()
        if self._resources is None:
            self.stop()
        elif not had:
            self.start()
        self.announce()

    def _adopt(self, config: Config) -> None:
        self._resources = config.resources
        self._commands = {m: command_key(model.argv) for m, model in config.models.items()}

    def _apply_kept(self) -> None:
        costs = self._router.reload_costs
        for model, command in self._commands.items():
            costs.measured(model, self._kept.get((model, command)))

    # -- the report ---------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """The ``GET /api/resources`` body."""
        processes = self._router.processes

        def state_of(model: str) -> str:
            process = processes.get(model)
            return "stopped" if process is None else process.state.value

        return resources_json(
            self._resources,
            state_of,
            self._router.reload_costs.measured_of,
            self.free,
            self._router.device_of,
        )

    def announce(self) -> None:
        """Tell the listeners if the report changed since the last time."""
        if self._resources is None and self._last is None:
            return
        report = self.report()
        if report == self._last:
            return
        self._last = report
        for listener in self._listeners:
            try:
                listener(report)
            except Exception:
                log.failure("resources report listener failed")

    # -- following processes ----------------------------------------------------

    def changed(self, process: ModelProcess, old: ProcessState, new: ProcessState) -> None:
        """A state listener: measure a model once ready; announce the change."""
        if self._resources is None:
            return
        if new is ProcessState.READY:
            self.measure(process.model_id)
        self.announce()

    def tick(self) -> defer.Deferred[None]:
        """Probe free memory and measure every ready model (each interval)."""
        return defer.Deferred.fromCoroutine(self._tick())

    async def _tick(self) -> None:
        await self.probe()
        ready = [m for m, p in self._router.processes.items() if p.state is ProcessState.READY]
        await defer.gatherResults([self.measure(m) for m in ready], consumeErrors=True)

    def probe(self) -> defer.Deferred[Mapping[str, int | None]]:
        """Probe what is free of every resource (in a thread); fires with it."""
        return defer.Deferred.fromCoroutine(self._probe())

    async def _probe(self) -> Mapping[str, int | None]:
        resources = self._resources
        if resources is None:
            return {}
        try:
            free = await self._run(probe_free, self._devices, tuple(resources.totals))
        except Exception as exc:
            log.warn("resources: free memory probe failed: {error}", error=str(exc))
            free = dict.fromkeys(resources.totals)
        self.free = free
        self.announce()
        return dict(free)

    def measure(self, model: str) -> defer.Deferred[None]:
        """Measure what ``model``'s ready process group holds (in a thread)."""
        return defer.Deferred.fromCoroutine(self._measure(model))

    async def _measure(self, model: str) -> None:
        resources = self._resources
        process = self._router.processes.get(model)
        command = self._commands.get(model)
        if resources is None or process is None or command is None or model in self._measuring:
            return
        pid = process.pid
        names = tuple(resources.footprints.get(model, {}))
        device = self._router.device_of(model)  # its device alternative
        if device is not None and device not in names:
            names += (device,)
        if pid is None or not names:
            return
        self._measuring.add(model)
        try:
            held = await self._run(measure_group, self._devices, pid, names)
        except Exception as exc:
            log.warn("{model}: measuring its footprint failed: {error}", model=model, error=exc)
            return
        finally:
            self._measuring.discard(model)
        if self._stopped or process.pid != pid or self._commands.get(model) != command:
            return  # stopping, restarted or changed meanwhile: this figure is stale
        self._learn(model, command, held)

    def _learn(self, model: str, command: str, held: Mapping[str, int]) -> None:
        kept = self._kept.get((model, command), {})
        peak = dict(kept)
        for name, amount in held.items():
            peak[name] = max(peak.get(name, 0), amount)
        if peak == kept:
            return
        self._kept[(model, command)] = peak
        self._router.reload_costs.measured(model, peak)
        log.debug("{model}: measured footprint {held}", model=model, held=peak)
        d = self._store.keep_footprint(model, command, peak)
        d.addErrback(
            lambda failure: log.warn(
                "{model}: cannot keep its measured footprint: {error}",
                model=model,
                error=failure.getErrorMessage(),
            )
        )
        self.announce()
