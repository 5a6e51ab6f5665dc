"""One supervised inference server: spawn, health check, TTL, stop, crash.

A :class:`ModelProcess` owns the state of one model's child process and is its
only writer: callers *ask* it to become ready or to stop, and its state
machine (:mod:`llamaswap.supervision.machine`) decides (a ready process
stays ready, a stopping one finishes the stop and then starts again, a start
in progress is joined).  Side effects go through injected seams: the clock,
an :class:`IProcessLauncher` (real: a child in its own process group) and a
health ``probe``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llamaswap.config.model import ModelConfig
from llamaswap.supervision.child import OutputSink
from llamaswap.supervision.health import Probe
from llamaswap.supervision.launcher import IProcessLauncher
from llamaswap.supervision.lifecycle import (
    LifecycleCore,
    LifecycleHooks,
    ProcessState,
    StartError,
)
from llamaswap.supervision.machine import LifecycleMachine
from llamaswap.supervision.sleep import SleepCaller

__all__ = [
    "EvictionListener",
    "ModelProcess",
    "ProcessState",
    "StartError",
    "StateListener",
]

log = Logger()

StateListener = Callable[["ModelProcess", ProcessState, ProcessState], None]
#: ``fn(process, reason)``: a starting or ready child is being ended.
EvictionListener = Callable[["ModelProcess", str], None]

#: The states a child occupies resources in, and the states it leaves them for.
_LIVE = frozenset({ProcessState.STARTING, ProcessState.READY})
_ENDING = frozenset({ProcessState.STOPPING, ProcessState.STOPPED})
#: Going to sleep ends a live child's service (an eviction); stopping a
#: sleeping one ends it for good (another).
_HOLDING = _LIVE | {ProcessState.SLEEPING}
_LEAVING = _ENDING | {ProcessState.SLEEPING}
#: A stop for good is no eviction (the service is going away).
_SHUTDOWN = "shutdown"


class ModelProcess:
    """The supervised child process of one model.

    ``output`` receives the child's stdout and stderr (and ``cmdStop``'s);
    the child's environment is ``environ`` updated by the model's ``env``.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        clock: IReactorTime,
        launcher: IProcessLauncher,
        probe: Probe,
        sleep_caller: SleepCaller | None = None,
        output: OutputSink,
        health_check_timeout: float,
        environ: Mapping[str, str],
        hooks: LifecycleHooks | None = None,
    ) -> None:
        self.config = config
        self.model_id = config.id
        self.output = output
        self._state = ProcessState.STOPPED
        #: ``state.value``, kept as a plain string: the scheduler reads every
        #: model's state for every request it routes
        self.state_value: str = self._state.value
        self._listeners: list[StateListener] = []
        self._eviction_listeners: list[EvictionListener] = []
        self._core = LifecycleCore(
            config,
            clock=clock,
            launcher=launcher,
            probe=probe,
            output=output,
            health_check_timeout=health_check_timeout,
            environ=environ,
            publish=self._publish,
            caller=sleep_caller,
            hooks=hooks,
        )
        self._machine = LifecycleMachine(self._core)

    # -- observation ------------------------------------------------------

    @property
    def state(self) -> ProcessState:
        return self._state

    @property
    def pid(self) -> int | None:
        """The live leader's pid, if any."""
        pid: int | None = self._core.drive(self._machine.pid)
        return pid

    @property
    def in_flight(self) -> int:
        return self._core.idle.in_flight

    def add_state_listener(self, fn: StateListener) -> None:
        """Call ``fn(process, old, new)`` on every state change."""
        self._listeners.append(fn)

    def add_eviction_listener(self, fn: EvictionListener) -> None:
        """Call ``fn(process, reason)`` each time a starting or ready child is
        ended: by :meth:`stop` (its ``reason``), by its TTL (``ttl``) or by
        dying while ready (``crash``).  A start that fails on its own and
        :meth:`shutdown` are not evictions."""
        self._eviction_listeners.append(fn)

    # -- requests ---------------------------------------------------------

    def place(self, device: str | None) -> None:
        """Start on device ``device`` (its index) from now on: the command's
        ``${DEVICE}`` and ``CUDA_VISIBLE_DEVICES`` (device alternatives)."""
        self._core.device = device

    def make_ready(self) -> Deferred[None]:
        """Fire once the process is ready, starting it if needed.

        Joins a start in progress; while stopping, waits for the stop and then
        starts.  Cancelling the result only detaches this caller.
        """
        ready: Deferred[None] = self._core.drive(self._machine.make_ready)
        return ready

    def stop(self, timeout: float | None = None, *, reason: str = "unload") -> Deferred[None]:
        """Stop the child (graceful for ``timeout`` s, then SIGKILL); idempotent.

        ``timeout`` defaults to the model's ``unloadTimeout``.  Aborts a start
        in progress and fails its waiters with ``aborted``.  Fires when the
        child's whole process group is gone; cancelling the result only
        detaches this caller.  ``reason`` (``unload``, ``swap``, ``reload``,
        …) is what eviction listeners hear if this ends a live child.
        """
        if timeout is None:
            timeout = self.config.unload_timeout
        if self._state in _HOLDING:
            # A stop already under way (a TTL's, say) keeps its own reason.
            self._core.stop_reason = reason
        stopped: Deferred[None] = self._core.drive(self._machine.stop, timeout)
        return stopped

    @property
    def can_sleep(self) -> bool:
        """The model has a sleep tier (``sleep:``)."""
        return self.config.sleep is not None

    def sleep(self, timeout: float | None = None, *, reason: str = "swap") -> Deferred[None]:
        """Put the ready child to sleep instead of stopping it (``sleep:``);
        without a sleep tier, or when not ready, this is :meth:`stop`.

        Fires once asleep (or stopped: a failed sleep call stops the child).
        Eviction listeners hear ``reason`` as for a stop."""
        if self.config.sleep is None:
            return self.stop(timeout, reason=reason)
        if timeout is None:
            timeout = self.config.unload_timeout
        if self._state in _HOLDING:
            self._core.stop_reason = reason
        asleep: Deferred[None] = self._core.drive(self._machine.sleep, timeout)
        return asleep

    def shutdown(self, timeout: float) -> Deferred[None]:
        """Stop for good: fires when the child is gone and the state is SHUTDOWN."""
        self._core.stop_reason = _SHUTDOWN
        done: Deferred[None] = self._core.drive(self._machine.shutdown, timeout)
        return done

    def request_started(self) -> None:
        """A request is now being served by this process (blocks the TTL)."""
        self._core.idle.request_started()

    def request_finished(self) -> None:
        """A request counted by :meth:`request_started` is done."""
        if not self._core.idle.request_finished():
            log.error("{model} request_finished without request_started", model=self.model_id)

    def _publish(self, old: ProcessState, new: ProcessState) -> None:
        self._state = new
        self.state_value = new.value
        log.debug("{model} state {old} -> {new}", model=self.model_id, old=old.value, new=new.value)
        evicted = None
        if new is ProcessState.STARTING:
            self._core.stop_reason = None  # a new life: earlier stops ended nothing
        elif old in _HOLDING and new in _LEAVING and old is not new:
            # No reason: the start failed on its own, which evicts nothing.
            evicted, self._core.stop_reason = self._core.stop_reason, None
        for listener in tuple(self._listeners):
            try:
                listener(self, old, new)
            except Exception:
                log.failure("{model} state listener failed", model=self.model_id)
        if evicted is not None and evicted != _SHUTDOWN:
            for evict_listener in tuple(self._eviction_listeners):
                try:
                    evict_listener(self, evicted)
                except Exception:
                    log.failure("{model} eviction listener failed", model=self.model_id)
