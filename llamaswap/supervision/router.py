"""Wiring the pure scheduler to real processes.

The :class:`Router` implements the scheduler's ``IEffects``: it turns
decisions into process starts and stops, and grants into :class:`Lease`
objects handed to waiting HTTP handlers.  Swaps whose footprints
collide never run at once: the scheduler queues the later one until the
earlier is done.  Disjoint swaps (models allowed to run together) run
concurrently, and each process serialises its own transitions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from llamaswap.config import Config, ModelConfig
from llamaswap.config.alternatives import device_index
from llamaswap.scheduling import IEffects, ISwapPlanner, Scheduler, Ticket
from llamaswap.scheduling.placement import PlacementPlanner, ReloadCosts
from llamaswap.supervision.prewarm import Prewarm, PrewarmFactory, prewarm_for
from llamaswap.supervision.process import ModelProcess, ProcessState, StartError
from llamaswap.supervision.room import FreeProbe, more_room, out_of_memory, wait_for_room

log = Logger()

#: How often a retiring process is checked for finished in-flight requests.
RETIRE_POLL = 0.1


async def _quietly(d: defer.Deferred[Any]) -> None:
    try:
        await d
    except Exception:
        pass


class TooManyRequests(Exception):
    """The model's concurrency budget is used up (answered with 429)."""


class RequestFailed(Exception):
    """The scheduler answered the request with an error (start failure,
    unload, shutdown)."""


class Lease:
    """A granted request's hold on a ready model; release it exactly once.

    It keeps the process it was granted on: after a reload replaced the
    model's process, the request still counts against the one it runs on."""

    __slots__ = ("model_id", "upstream", "process", "_router", "_ticket", "_released")

    def __init__(
        self, router: Router, ticket: Ticket, upstream: bytes, process: ModelProcess
    ) -> None:
        self.model_id = ticket.model
        self.upstream = upstream
        self.process = process
        self._router = router
        self._ticket = ticket
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.process.request_finished()
        self._router.scheduler.serve_done(self._ticket)


#: Makes the process of one model (used again for models a reload changes).
ProcessFactory = Callable[[ModelConfig], ModelProcess]
#: ``on_evicted(model, reason)``: a starting or running model was stopped.
#: ``reason``: ``swap`` (the scheduler made room), ``ttl``, ``reload``
#: (replaced or removed), ``unload``, ``crash`` (died while ready), ``memory``
#: (the placement planner made room); the set is open.
EvictionListener = Callable[[str, str], None]


def _ignore_eviction(model: str, reason: str) -> None:
    pass


def _no_progress(model: str) -> None:
    return None


@implementer(IEffects)
class Router:
    """Routes admitted requests to ready model processes.

    ``clock`` times ``maxWait`` fairness and the drain of replaced processes;
    ``on_evicted`` hears of every starting or running model that is stopped,
    with the reason (e.g. to count it)."""

    def __init__(
        self,
        config: Config,
        processes: Mapping[str, ModelProcess],
        *,
        clock: IReactorTime,
        on_evicted: EvictionListener = _ignore_eviction,
        prewarm: PrewarmFactory = prewarm_for,
    ) -> None:
        self.config = config
        #: model id -> the prewarm reading its files while its start waits
        self._prewarm_factory = prewarm
        self._prewarms: dict[str, Prewarm] = {}
        #: ``load_progress(model)``: the ``percent``/``eta_s`` of a loading
        #: model (set by the service's loading progress), ``None`` otherwise.
        self.load_progress: Callable[[str], Mapping[str, float | None] | None] = _no_progress
        self._clock = clock
        self._on_evicted = on_evicted
        self.processes = dict(processes)
        self._upstreams = {
            model_id: model.proxy.rstrip("/").encode() for model_id, model in config.models.items()
        }
        self._waiters: dict[Ticket, defer.Deferred[Lease]] = {}
        self._queue_positions: dict[Ticket, int] = {}
        self._collected_stops: list[defer.Deferred[None]] | None = None
        #: model id -> Deferred firing once its replaced process has stopped
        self._retiring: dict[str, defer.Deferred[None]] = {}
        routing = config.routing
        #: load times and request rates the placement planner prices evictions by
        self.reload_costs = ReloadCosts(clock.seconds)
        #: model -> the device alternative it holds or will hold (the
        #: placement planner's; kept across reloads)
        self.placed: dict[str, str] = {}
        self._starting_since: dict[str, float] = {}
        #: what is free per resource (the resource monitor's probe): after
        #: evictions for memory a start waits until the room shows
        self.probe_free: FreeProbe | None = None
        self.planner = self._priced(routing.planner)
        self.scheduler = Scheduler(
            self,
            self.planner,
            state_of=lambda model: self.processes[model].state_value,
            limits={m: c.concurrency_limit for m, c in config.models.items()},
            priorities=routing.priorities,
            name=routing.router,
            max_wait=routing.max_wait,
            clock=clock.seconds,
        )
        for process in self.processes.values():
            self._follow(process)

    # -- requests -----------------------------------------------------------

    def admit(self, model_id: str) -> Ticket:
        """Reserve a slot for a request (raises :class:`TooManyRequests`)."""
        ticket = self.scheduler.admit(model_id)
        if ticket is None:
            raise TooManyRequests(model_id)
        return ticket

    def wait(self, ticket: Ticket) -> defer.Deferred[Lease]:
        """Wait for an admitted request to be granted.

        Cancelling the Deferred (client went away) withdraws the request and
        releases its reservation; the model load, if any, goes on.
        """

        def withdraw(d: defer.Deferred[Lease]) -> None:
            if self._waiters.pop(ticket, None) is not None:
                self._queue_positions.pop(ticket, None)
                self.scheduler.cancel(ticket)
                self._end_prewarm(ticket.model)

        waiter: defer.Deferred[Lease] = defer.Deferred(withdraw)
        self._waiters[ticket] = waiter
        self.scheduler.submit(ticket)
        return waiter

    def acquire(self, model_id: str) -> defer.Deferred[Lease]:
        """Admit and wait in one step."""
        try:
            ticket = self.admit(model_id)
        except Exception:
            return defer.fail()
        return self.wait(ticket)

    def upstream_of(self, model_id: str) -> bytes:
        """The base URL of a model's server."""
        return self._upstreams[model_id]

    def queue_position_of(self, ticket: Ticket) -> int | None:
        return self._queue_positions.get(ticket)

    # -- IEffects -------------------------------------------------------------

    def grant(self, ticket: Ticket) -> bool:
        waiter = self._waiters.pop(ticket, None)
        self._queue_positions.pop(ticket, None)
        self._end_prewarm(ticket.model)
        if waiter is None or waiter.called:
            return False
        process = self.processes[ticket.model]
        process.request_started()
        self.reload_costs.requested(ticket.model)
        waiter.callback(Lease(self, ticket, self._upstreams[ticket.model], process))
        return True

    def fail(self, ticket: Ticket, message: str) -> None:
        waiter = self._waiters.pop(ticket, None)
        self._queue_positions.pop(ticket, None)
        self._end_prewarm(ticket.model)
        if waiter is not None and not waiter.called:
            waiter.errback(RequestFailed(message))

    def queue_position(self, ticket: Ticket, position: int) -> None:
        if ticket in self._waiters:
            self._queue_positions[ticket] = position
            self._prewarm(ticket.model)

    def start_swap(self, target: str, evict: frozenset[str]) -> None:
        explain = getattr(self.planner, "explain", None)
        running = frozenset(
            m for m, p in self.processes.items() if p.state.value not in ("stopped", "shutdown")
        )
        if explain is not None:
            log.info("{decision}", decision=explain(target, running - {target}).describe())
        reasons: Mapping[str, str] = {}
        if isinstance(self.planner, PlacementPlanner):
            reasons = self.planner.reasons(target, running - {target}, evict)
            for_memory = sorted(m for m, why in reasons.items() if why == "memory")
            if for_memory:
                log.info(
                    "placement: {target} needs room; evicting {models} (lowest reload cost)",
                    target=target,
                    models=for_memory,
                )
        if evict or target in self._retiring:
            self._prewarm(target)  # the start waits for the evictions
        awake = frozenset(
            m
            for m, p in self.processes.items()
            if p.state.value not in ("stopped", "shutdown", "sleeping")
        )
        asleep = self._to_sleep(target, evict, awake)
        defer.Deferred.fromCoroutine(self._swap(target, evict, reasons, asleep))

    def stop_models(self, models: frozenset[str]) -> None:
        for model in models:
            self._end_prewarm(model, force=True)
        stops = [self.processes[m].stop(reason="unload") for m in sorted(models)]
        if self._collected_stops is not None:
            self._collected_stops.extend(stops)

    # -- operations -----------------------------------------------------------

    async def _swap(
        self,
        target: str,
        evict: frozenset[str],
        reasons: Mapping[str, str] | None = None,
        asleep: Iterable[str] = (),
    ) -> None:
        error: str | None = None
        try:
            if evict:
                sleepers = frozenset(asleep)
                log.info(
                    "swapping to {target}: stopping {evict}{sleep}",
                    target=target,
                    evict=sorted(evict - sleepers),
                    sleep=f", putting to sleep {sorted(sleepers)}" if sleepers else "",
                )
                timeout = self.config.health_check_timeout
                await defer.gatherResults(
                    [
                        (self.processes[m].sleep if m in sleepers else self.processes[m].stop)(
                            timeout, reason=(reasons or {}).get(m, "swap")
                        )
                        for m in sorted(evict)
                    ],
                    consumeErrors=True,
                )
                if "memory" in (reasons or {}).values():
                    await self._await_room(target)
            retried = False
            while True:
                if not self.scheduler.is_swapping(target):
                    # Unloaded (or removed) meanwhile: the scheduler has already
                    # answered its waiters; do not start a model nobody wants.
                    raise StartError(f"{self.scheduler.name}: model unloaded")
                retiring = self._retiring.get(target)
                if retiring is not None:
                    # A reload replaced this model: the old server still drains
                    # and holds the port; start the new one once it is gone.
                    await defer.Deferred.fromCoroutine(_quietly(retiring))
                process = self.processes[target]
                process.place(self.device_index(target))
                try:
                    await process.make_ready()
                except StartError as exc:
                    if self.processes.get(target) is not process:
                        # A reload changed the model while it was starting: its
                        # waiters wait for the new configuration's process.
                        log.info("{model}: changed by a reload while starting", model=target)
                        continue
                    if not exc.died or retried:
                        raise
                    if out_of_memory(str(exc)):
                        await self._make_more_room(target)
                    # A server that died while starting gets one fresh start
                    # before its waiting requests see the error, so that a
                    # single transient crash at load time does not fail them.
                    log.warn("{model} died while starting; trying once more", model=target)
                    retried = True
                    continue
                if self.processes.get(target) is process:
                    break
                # Replaced by a reload just as it became ready: that process
                # is retiring; the waiters get the new one.
        except StartError as exc:
            error = str(exc)
        except Exception as exc:  # a bug, not a start failure: still answer every waiter
            log.failure("swap to {target} failed", Failure(), target=target)
            error = str(exc) or type(exc).__name__
        self._end_prewarm(target, force=True)
        self.scheduler.swap_done(target, error)

    async def _await_room(self, target: str) -> None:
        """Evicted for memory: wait (bounded) until the probe shows the room."""
        if self.probe_free is None or not isinstance(self.planner, PlacementPlanner):
            return
        needs = self.planner.footprint(target)
        if not await wait_for_room(needs, self.probe_free, self._clock):
            log.warn(
                "placement: {target}: the evicted memory does not show as free yet; starting anyway",
                target=target,
            )

    async def _make_more_room(self, target: str) -> None:
        """``target`` died out of memory while starting: evict more idle models."""
        if not isinstance(self.planner, PlacementPlanner):
            return
        snapshot = self.scheduler.snapshot()
        busy = set(snapshot.in_flight) | set(snapshot.swaps)
        for victims in snapshot.swaps.values():
            busy |= victims
        running = frozenset(
            m for m, p in self.processes.items() if p.state.value not in ("stopped", "shutdown")
        )
        more = more_room(self.planner, target, running, frozenset(busy - {target}))
        if not more:
            return
        log.warn(
            "placement: {target} ran out of memory while starting; evicting {models} as well",
            target=target,
            models=sorted(more),
        )
        await defer.gatherResults(
            [
                self.processes[m].stop(self.config.health_check_timeout, reason="memory")
                for m in sorted(more)
            ],
            consumeErrors=True,
        )
        await self._await_room(target)

    # -- prewarm --------------------------------------------------------------

    def _prewarm(self, model_id: str) -> None:
        """Read the model's files into the page cache while its start waits
        (:mod:`llamaswap.supervision.prewarm`); once per wait."""
        process = self.processes.get(model_id)
        if model_id in self._prewarms or process is None or not process.config.prewarm:
            return
        if process.state in (ProcessState.READY, ProcessState.STARTING, ProcessState.SLEEPING):
            return  # nothing to wait for, its own load reads the files, or a wake needs none
        prewarm = self._prewarm_factory(process.config)
        if prewarm is None:
            return
        self._prewarms[model_id] = prewarm
        log.info(
            "{model}: prewarming {files} while its start waits",
            model=model_id,
            files=list(prewarm.paths),
        )
        prewarm.start().addBoth(self._prewarmed, model_id, prewarm)

    def _prewarmed(self, result: int | Failure, model_id: str, prewarm: Prewarm) -> int:
        if self._prewarms.get(model_id) is prewarm:
            del self._prewarms[model_id]
        if isinstance(result, Failure):
            log.failure("{model}: prewarm failed", result, model=model_id)
            return 0
        for problem in prewarm.skipped:
            log.info("{model}: prewarm skipped {problem}", model=model_id, problem=problem)
        log.info(
            "{model}: prewarm read {mib:.0f} MiB{how}",
            model=model_id,
            mib=result / (1 << 20),
            how=" (cancelled)" if prewarm.cancelled else "",
        )
        return result

    def _end_prewarm(self, model_id: str, *, force: bool = False) -> None:
        """Cancel the model's prewarm once no start waits for it (``force``:
        its swap ended or was called off)."""
        if model_id not in self._prewarms:
            return
        if not force and (
            self.scheduler.is_swapping(model_id)
            or any(t.model == model_id for t in self._queue_positions)
        ):
            return
        self._prewarms.pop(model_id).cancel()

    def reconfigure(self, config: Config, build: ProcessFactory) -> list[ModelProcess]:
        """Adopt a reloaded configuration without dropping requests.

        Models whose configuration is unchanged keep their process, running
        and serving.  Removed or changed models are retired: their process
        stops once its in-flight requests finished (at most ``unloadTimeout``
        later); a changed model's new process starts only after that.
        Returns the processes created for new or changed models."""
        created = []
        processes: dict[str, ModelProcess] = {}
        for model_id, model in config.models.items():
            current = self.processes.get(model_id)
            if current is not None and current.config == model:
                processes[model_id] = current
            else:
                processes[model_id] = build(model)
                self._follow(processes[model_id])
                created.append(processes[model_id])
        retired = [p for m, p in self.processes.items() if processes.get(m) is not p]
        self.config = config
        self.processes = processes
        self._upstreams = {
            model_id: model.proxy.rstrip("/").encode() for model_id, model in config.models.items()
        }
        routing = config.routing
        self.planner = self._priced(routing.planner)
        self.scheduler.reconfigure(
            {m: c.concurrency_limit for m, c in config.models.items()},
            routing.priorities,
            self.planner,
        )
        for process in retired:
            done = defer.Deferred.fromCoroutine(self._retire(process))
            self._retiring[process.model_id] = done
            done.addBoth(self._retired, process, done)
        return created

    async def _retire(self, process: ModelProcess) -> None:
        timeout = process.config.unload_timeout
        clock = self._clock
        if process.in_flight:
            log.info(
                "{model}: replaced by a reload; stopping after {count} in-flight requests",
                model=process.model_id,
                count=process.in_flight,
            )
            deadline = clock.seconds() + timeout
            while process.in_flight and clock.seconds() < deadline:
                await task.deferLater(clock, RETIRE_POLL, lambda: None)
        await process.stop(timeout, reason="reload")

    def _retired(self, result: object, process: ModelProcess, done: defer.Deferred[None]) -> None:
        if self._retiring.get(process.model_id) is done:
            del self._retiring[process.model_id]

    def unload(self, models: Iterable[str] | None = None) -> defer.Deferred[None]:
        """Stop ``models`` (all when ``None``); fires once they are stopped."""
        self._collected_stops = []
        try:
            self.scheduler.unload(None if models is None else list(models))
            stops = self._collected_stops
        finally:
            self._collected_stops = None
        if models is None:
            # A model may be stopping on its own (TTL) without the scheduler
            # having asked; "unload all" waits for it too.
            stops.extend(
                p.stop() for p in self.processes.values() if p.state is ProcessState.STOPPING
            )
        d = defer.gatherResults(stops, consumeErrors=True)
        return d.addCallback(lambda _: None)

    def shutdown(self, timeout: float) -> defer.Deferred[None]:
        """Fail everything waiting and stop every process; fires when all
        children are gone."""
        for prewarm in self._prewarms.values():
            prewarm.cancel()
        self.scheduler.shutdown()
        retiring = [_quietly(d) for d in self._retiring.values()]
        d = defer.gatherResults(
            [p.shutdown(timeout) for p in self.processes.values()]
            + [defer.Deferred.fromCoroutine(r) for r in retiring],
            consumeErrors=True,
        )
        return d.addCallback(lambda _: None)

    def _priced(self, planner: ISwapPlanner) -> ISwapPlanner:
        """The placement planner prices evictions by what this router learns."""
        if isinstance(planner, PlacementPlanner):
            priced = planner.with_costs(self.reload_costs)
            priced.sleeping = self._sleeping
            priced.placed = self.placed
            return priced
        return planner

    def device_of(self, model_id: str) -> str | None:
        """The resource a model with device alternatives is placed on."""
        planner = self.planner
        return planner.device_of(model_id) if isinstance(planner, PlacementPlanner) else None

    def device_index(self, model_id: str) -> str | None:
        """The index of :meth:`device_of` (``gpu1`` -> ``"1"``)."""
        device = self.device_of(model_id)
        return None if device is None else device_index(device)

    def _sleeping(self) -> frozenset[str]:
        return frozenset(m for m, p in self.processes.items() if p.state is ProcessState.SLEEPING)

    def _to_sleep(self, target: str, evict: frozenset[str], running: frozenset[str]) -> set[str]:
        """Which of ``evict`` are put to sleep instead of stopped: ready models
        with a sleep tier, while (with placement) the target still fits
        beside them asleep."""
        asleep: set[str] = set()
        for model in sorted(evict):
            process = self.processes[model]
            if not process.can_sleep or process.state is not ProcessState.READY:
                continue
            planner = self.planner
            if isinstance(planner, PlacementPlanner) and not planner.sleep_is_enough(
                target, running, evict, frozenset(asleep | {model})
            ):
                continue
            asleep.add(model)
        return asleep

    def _follow(self, process: ModelProcess) -> None:
        process.add_state_listener(self._on_state)
        process.add_eviction_listener(self._evicted)

    def _evicted(self, process: ModelProcess, reason: str) -> None:
        self._on_evicted(process.model_id, reason)

    def _on_state(self, process: ModelProcess, old: ProcessState, new: ProcessState) -> None:
        log.debug("{model} {old} -> {new}", model=process.model_id, old=old.value, new=new.value)
        if new is ProcessState.STARTING:
            if old is not ProcessState.SLEEPING:  # a wake is not a load to price
                self._starting_since[process.model_id] = self._clock.seconds()
        else:
            since = self._starting_since.pop(process.model_id, None)
            if since is not None and new is ProcessState.READY:
                self.reload_costs.loaded(process.model_id, self._clock.seconds() - since)
        if new is ProcessState.STOPPED or new is ProcessState.SLEEPING:
            self.scheduler.state_changed(process.model_id)
