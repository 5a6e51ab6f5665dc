"""What every state of a model process's lifecycle shares.

The states, inputs and transitions are in :mod:`llamaswap.supervision.machine`;
here are the words they are in (:class:`ProcessState`, :class:`StartError`,
the machine's inputs :class:`Lifecycle`) and :class:`LifecycleCore`: the
injected clock, launcher and probe, the callers waiting for a start, the
in-flight count with the idle clock, the :class:`~llamaswap.supervision.teardown.Reaper` that
kills a previous child (several states wait for it), and the queue of work
that transitions leave behind.

Listeners may react to a state change by calling back in (``stop()`` on
``starting``), which a transition in progress cannot take.  So transitions
only record what must happen next, in order, and the core runs it once the
transition is over: state-change notifications, waiters to fire, and *steps*
(the launch of a child, a restart after a stop) that belong to one state and
are dropped when the state changed before their turn.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from llamaswap.config.alternatives import device_argv, device_env
from llamaswap.config.model import ModelConfig
from llamaswap.core.secrets import join_argv
from llamaswap.supervision.child import ChildRun, OutputSink
from llamaswap.supervision.health import Probe
from llamaswap.supervision.launcher import ExitStatus, IProcessLauncher
from llamaswap.supervision.sleep import SleepCaller, agent_caller
from llamaswap.supervision.teardown import Reaper, Teardown
from llamaswap.supervision.waiters import Waiters

log = Logger()


class ProcessState(enum.StrEnum):
    """Lifecycle states, named as in the API (``/running``, events)."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    SHUTDOWN = "shutdown"
    #: put to sleep (``sleep`` tier): alive, its memory given back; a request wakes it.
    SLEEPING = "sleeping"


class StartError(Exception):
    """A start did not reach ``ready``; ``message`` says why.  ``died`` is
    true when the server process itself exited during the start."""

    def __init__(self, message: str, *, died: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.died = died


class Lifecycle(Protocol):
    """The inputs of the machine; ``_``-prefixed ones come from its own work."""

    def make_ready(self) -> Deferred[None]:
        """Fires once ready; starts the child if needed."""

    def stop(self, timeout: float) -> Deferred[None]:
        """Fires once the child's group is gone (SIGKILL after ``timeout`` s)."""

    def shutdown(self, timeout: float) -> Deferred[None]:
        """Stop for good."""

    def sleep(self, timeout: float) -> Deferred[None]:
        """Put the ready child to sleep (its ``sleep.enter`` calls); fires
        once asleep, or once stopped when it is not ready or the calls fail."""

    def pid(self) -> int | None:
        """The live leader's pid, if any."""

    def _resume(self) -> None:
        """Start for callers that arrived while stopping."""

    def _spawned(self, run: ChildRun) -> None:
        """The child is running."""

    def _launch_failed(self, error: StartError) -> None:
        """The child could not be started."""

    def _healthy(self, run: ChildRun) -> None:
        """The health check passed."""

    def _unhealthy(self, error: StartError) -> None:
        """The health check failed (deadline passed)."""

    def _exited(self, status: ExitStatus) -> None:
        """The live child's leader exited on its own."""

    def _ttl_expired(self) -> None:
        """The ready child was idle for its TTL."""

    def _ttl_sleep(self) -> None:
        """The ready child with a sleep tier was idle for its TTL."""

    def _asleep(self) -> None:
        """The sleep calls succeeded."""

    def _sleep_failed(self, error: Exception) -> None:
        """A sleep call failed."""

    def _wake_failed(self, error: Exception) -> None:
        """A wake call failed."""

    def _sleep_ttl_expired(self) -> None:
        """The child slept for its ``sleep.ttl``."""

    def _reaped(self, teardown: Teardown) -> None:
        """The previous child's group is gone."""


class LifecycleHooks(Protocol):
    """Work a model's lifecycle waits for (the prompt cache,
    :mod:`llamaswap.supervision.promptcache`); none of it can fail a start
    or a stop."""

    def prepare_argv(self, argv: tuple[str, ...]) -> Deferred[tuple[str, ...]]:
        """The command to launch, from the configured one."""

    def before_stop(
        self, reason: str | None, deadline: Callable[[], float]
    ) -> Deferred[None] | None:
        """Before a ready child is asked to stop for ``reason``; done by
        ``deadline()`` (which a later stop may bring forward)."""

    def before_ready(self) -> Deferred[None]:
        """After the health check passed, before the child is ready."""


class IdleClock:
    """Counts requests in flight and, while armed (the process is ready),
    calls back once no request has been in flight for ``ttl`` seconds.

    The TTL counts from the later of arming and the last finished request;
    a ``ttl`` of 0 never expires.  Kept off the state machine: it is touched
    twice per request."""

    def __init__(self, clock: IReactorTime, ttl: float) -> None:
        self.in_flight = 0
        self._clock = clock
        self._ttl = ttl
        self._on_idle: Callable[[], None] | None = None
        self._call: IDelayedCall | None = None

    def arm(self, on_idle: Callable[[], None]) -> None:
        self._on_idle = on_idle
        self._restart()

    def disarm(self) -> None:
        self._on_idle = None
        self._cancel()

    def request_started(self) -> None:
        self.in_flight += 1
        self._cancel()

    def request_finished(self) -> bool:
        """Count a request down; False (and nothing done) when none was up."""
        if self.in_flight == 0:
            return False
        self.in_flight -= 1
        self._restart()
        return True

    def _restart(self) -> None:
        if self._on_idle is None or self._ttl <= 0 or self.in_flight > 0:
            return
        if self._call is not None and self._call.active():
            self._call.reset(self._ttl)
        else:
            self._call = self._clock.callLater(self._ttl, self._on_idle)

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class LifecycleCore:
    """What all states share; runs the work transitions leave behind."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        clock: IReactorTime,
        launcher: IProcessLauncher,
        probe: Probe,
        output: OutputSink,
        health_check_timeout: float,
        environ: Mapping[str, str],
        publish: Callable[[ProcessState, ProcessState], None],
        caller: SleepCaller | None = None,
        hooks: LifecycleHooks | None = None,
    ) -> None:
        self.config = config
        self.hooks = hooks
        self.model_id = config.id
        self.clock = clock
        self.probe = probe
        self.health_check_timeout = health_check_timeout
        self._launcher = launcher
        self._output = output
        self._environ = environ
        self._publish = publish
        #: the device index of the next start (device alternatives: the
        #: ``${DEVICE}`` macro and ``CUDA_VISIBLE_DEVICES``); set by the router
        self.device: str | None = None
        self.reaper = Reaper(config.id, clock, launcher, config.cmd_stop, self.environment, output)
        #: callers of make_ready waiting for the next start to settle.
        self.ready: Waiters[None] = Waiters()
        #: why the live child is being ended (``stop``'s caller, ``ttl``,
        #: ``crash``); read and cleared as the process leaves starting/ready.
        self.stop_reason: str | None = None
        self.idle = IdleClock(clock, config.ttl)
        self._caller = caller
        #: callers of sleep waiting for the child to be asleep (or stopped).
        self.asleep: Waiters[None] = Waiters()
        #: the child of the last ready state (the sleep tier's states keep it).
        self.live: ChildRun | None = None
        #: the state listeners will have been told of once the queue has run.
        self._label = ProcessState.STOPPED
        #: bumped on every change of state; a step runs only in its own.
        self._generation = 0
        self._queue: deque[tuple[int | None, Callable[[], object]]] = deque()
        self._running = False

    # -- running inputs and what they leave behind ---------------------------

    def drive(self, input: Callable[..., Any], *args: Any) -> Any:
        """Give the machine ``input``, then run the work it queued.

        Nested calls (from a listener, a waiter, a callback that fired
        synchronously) only give the input: the outermost call runs the queue.
        """
        if self._running:
            return input(*args)
        self._running = True
        try:
            result = input(*args)
            while self._queue:
                generation, work = self._queue.popleft()
                if generation is None or generation == self._generation:
                    work()
        finally:
            self._running = False
        return result

    def feed(self, input: Callable[..., None]) -> Callable[..., None]:
        """``input`` as a callback: each call is given to the machine."""
        return lambda *args: self.drive(input, *args)

    def entered(self, label: ProcessState) -> None:
        """The machine changed state; tell listeners when it shows."""
        self._generation += 1
        old, self._label = self._label, label
        if old is not label:
            self.later(self._publish, old, label)

    def later(self, work: Callable[..., object], *args: Any) -> None:
        """Run ``work`` after the transition, in order."""
        self._queue.append((None, lambda: work(*args)))

    def step(self, work: Callable[..., object], *args: Any) -> None:
        """Run ``work`` after the transition unless the state changes before."""
        self._queue.append((self._generation, lambda: work(*args)))

    # -- waiters -------------------------------------------------------------

    def settle_waiting(self, error: StartError | None) -> None:
        """Answer everyone waiting for this start."""
        waiters, self.ready = self.ready, Waiters()
        if error is None:
            self.later(waiters.fire, None)
        else:
            self.later(waiters.fail, error)

    def abort_waiting(self) -> None:
        self.settle_waiting(StartError("aborted"))

    # -- work ----------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        env = dict(self._environ)
        env.update(device_env(self.config.env, self.device))
        return env

    def launch(self, machine: Lifecycle) -> None:
        """Spawn the child (a step of ``Launching``)."""
        argv = device_argv(self.config.argv, self.device)
        if not argv:
            machine._launch_failed(StartError("empty command"))
            return
        if self.hooks is None:
            self._spawn(machine, argv)
            return
        generation = self._generation

        def spawn(prepared: tuple[str, ...]) -> None:
            if generation == self._generation:  # still launching
                self.drive(self._spawn, machine, prepared)

        def failed(failure: Any) -> None:
            log.failure("{model} preparing the command failed", failure, model=self.model_id)
            spawn(argv)

        self.hooks.prepare_argv(argv).addCallbacks(spawn, failed)

    def _spawn(self, machine: Lifecycle, argv: tuple[str, ...]) -> None:
        try:
            run = ChildRun(
                self._launcher, argv, self.environment(), self._output, self.feed(machine._exited)
            )
        except OSError as e:
            machine._launch_failed(StartError(f"failed to start command '{join_argv(argv)}': {e}"))
            return
        except Exception as e:
            log.failure("{model} start failed", model=self.model_id)
            machine._launch_failed(StartError(str(e)))
            return
        log.info(
            "{model} started pid {pid}: {argv}",
            model=self.model_id,
            pid=run.pid,
            argv=join_argv(argv),
        )
        machine._spawned(run)

    @property
    def caller(self) -> SleepCaller:
        """The sleep tier's HTTP caller (made on first use)."""
        if self._caller is None:
            self._caller = agent_caller(self.clock)
        return self._caller

    def settle_asleep(self) -> None:
        """Answer everyone waiting for the child to be asleep (or gone)."""
        waiters, self.asleep = self.asleep, Waiters()
        self.later(waiters.fire, None)

    def resume_if_waited(self, machine: Lifecycle) -> None:
        """Start again for callers that arrived while stopping (a step of ``Stopped``)."""
        if len(self.ready):
            machine._resume()

    def reap(
        self, machine: Lifecycle, run: ChildRun, timeout: float, *, ready: bool = False
    ) -> Teardown:
        """Kill ``run``; a ``ready`` child first gets the hooks' ``before_stop``."""
        before = None
        if ready and self.hooks is not None:
            hooks, reason = self.hooks, self.stop_reason

            def before(deadline: Callable[[], float]) -> Deferred[None] | None:
                return hooks.before_stop(reason, deadline)

        return self.reaper.reap(run, timeout, self.feed(machine._reaped), before)

    def before_ready(self) -> Deferred[None]:
        """The hooks' work between a passed health check and ``ready``."""
        if self.hooks is None:
            return succeed(None)
        return self.hooks.before_ready()
