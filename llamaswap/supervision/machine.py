"""The life of one model's child process, as an Automat state machine.

Every state, every input and the output of every transition are in
:func:`_build` (the shape of Twisted's ``ClientService``): a transition not
listed there cannot happen, it raises.  State-specific data lives in the
state: the child being health-checked (:class:`_Checking`), the ready child
(:class:`_Ready`).  What all states share, and how the
work a transition leaves behind is run, is in
:mod:`llamaswap.supervision.lifecycle`.

Public states and the machine's states::

    stopped   Stopped, Reaping (a crashed child's leftovers are being killed),
              ReapingForShutdown
    starting  AwaitingReap (for those leftovers), Launching, Checking
    ready     Ready
    stopping  Stopping, ShuttingDown
    shutdown  Shutdown
    sleeping  FallingAsleep (the ``sleep.enter`` calls), Sleeping
    starting  Waking (the ``sleep.wake`` calls; a failure restarts the server)

The sleep tier (a model with ``sleep``): ``sleep()`` and the TTL put a ready
child to sleep instead of stopping it; ``make_ready()`` wakes it; its
``sleep.ttl`` stops it.  A sleep call that fails stops the child; a wake call
that fails stops it and starts it afresh for the callers waiting.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from automat import TypeMachine, TypeMachineBuilder
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaswap.supervision.child import ChildRun
from llamaswap.supervision.health import HealthVerdict, poll_health
from llamaswap.supervision.launcher import ExitStatus
from llamaswap.supervision.lifecycle import Lifecycle, LifecycleCore, ProcessState, StartError
from llamaswap.supervision.sleep import SleepError, run_calls
from llamaswap.supervision.teardown import Teardown

log = Logger()

#: graceful stop budget after a failed health check (as llama-swap).
FAILED_START_STOP_TIMEOUT = 5.0


class _Checking:
    """Data of ``Checking``: the child just spawned and its health check."""

    def __init__(self, machine: Lifecycle, core: LifecycleCore, run: ChildRun) -> None:
        self.run = run
        self._abandoned = False
        endpoint = core.config.check_endpoint
        self._url = core.config.proxy + endpoint if endpoint is not None else None
        self._timeout = core.health_check_timeout
        if self._url is None:
            self._poll: Deferred[Any] = succeed(HealthVerdict(True))
        else:
            deadline = core.clock.seconds() + core.health_check_timeout
            self._poll = Deferred.fromCoroutine(
                poll_health(core.clock, core.probe, self._url, deadline, core.model_id)
            )
        self._poll.addBoth(self._settled, machine, core)

    def abandon(self) -> None:
        """The start is over another way: stop polling, report nothing."""
        self._abandoned = True
        self._poll.cancel()

    def _settled(
        self, result: HealthVerdict | Failure, machine: Lifecycle, core: LifecycleCore
    ) -> None:
        if self._abandoned:
            return
        if isinstance(result, Failure):
            log.failure("{model} start failed", result, model=core.model_id)
            core.drive(machine._unhealthy, StartError(str(result.value)))
        elif result.healthy:
            if self._url is not None:
                log.info("{model} Health check passed on {url}", model=core.model_id, url=self._url)
            # The hooks' work (a prompt cache's restore) comes before ready;
            # abandoning the start cancels it.
            self._poll = core.before_ready()
            self._poll.addBoth(self._prepared, machine, core)
        else:
            message = f"health check timed out after {self._timeout:g}s"
            if result.last_seen:
                message += f" (last probe on {self._url}: {result.last_seen})"
            core.drive(machine._unhealthy, StartError(message))

    def _prepared(self, result: object, machine: Lifecycle, core: LifecycleCore) -> None:
        if self._abandoned:
            return
        if isinstance(result, Failure):
            log.failure("{model} work before ready failed", result, model=core.model_id)
        core.drive(machine._healthy, self.run)


class _Ready:
    """Data of ``Ready``: the serving child.  Its idle clock (TTL) runs
    from entering until leaving."""

    def __init__(self, machine: Lifecycle, core: LifecycleCore, run: ChildRun) -> None:
        self.run = run
        core.live = run
        sleepy = core.config.sleep is not None
        core.idle.arm(core.feed(machine._ttl_sleep if sleepy else machine._ttl_expired))


class _Calls:
    """The sleep tier's HTTP calls in flight for the live child; their
    outcome is given to the machine unless abandoned."""

    def __init__(
        self,
        core: LifecycleCore,
        calls: tuple[str, ...],
        done: Callable[[], None],
        failed: Callable[[Exception], None],
    ) -> None:
        assert core.live is not None
        self.run: ChildRun = core.live
        self._abandoned = False
        self._d = Deferred.fromCoroutine(run_calls(core.caller, core.config.proxy, calls))
        self._d.addCallbacks(lambda _: self._settle(done), self._failed, errbackArgs=(failed,))

    def _settle(self, then: Callable[[], None]) -> None:
        if not self._abandoned:
            then()

    def _failed(self, failure: Failure, failed: Callable[[Exception], None]) -> None:
        if not self._abandoned:
            error = failure.value
            failed(error if isinstance(error, SleepError) else SleepError(str(error)))

    def abandon(self) -> None:
        self._abandoned = True
        self._d.cancel()


class _FallingAsleep(_Calls):
    """Data of ``FallingAsleep``: the ``sleep.enter`` calls."""

    def __init__(self, machine: Lifecycle, core: LifecycleCore, *given: object) -> None:
        assert core.config.sleep is not None
        super().__init__(
            core,
            core.config.sleep.enter,
            core.feed(machine._asleep),
            core.feed(machine._sleep_failed),
        )


class _Waking(_Calls):
    """Data of ``Waking``: the ``sleep.wake`` calls."""

    def __init__(self, machine: Lifecycle, core: LifecycleCore) -> None:
        assert core.config.sleep is not None
        super().__init__(
            core,
            core.config.sleep.wake,
            lambda: core.drive(machine._healthy, self.run),
            core.feed(machine._wake_failed),
        )


class _Asleep:
    """Data of ``Sleeping``: the sleeping child and its ``sleep.ttl`` clock."""

    def __init__(self, machine: Lifecycle, core: LifecycleCore) -> None:
        assert core.live is not None and core.config.sleep is not None
        self.run: ChildRun = core.live
        ttl = core.config.sleep.ttl
        self._call = (
            core.clock.callLater(ttl, core.feed(machine._sleep_ttl_expired)) if ttl > 0 else None
        )

    def disarm(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def _exit_message(status: ExitStatus, lines: list[str]) -> str:
    message = f"upstream command exited prematurely with {status}"
    return message + ": " + "\n".join(lines) if lines else message


def _build() -> TypeMachine[Lifecycle, LifecycleCore]:
    """The machine: every state, input and transition of a model's process."""
    builder = TypeMachineBuilder(Lifecycle, LifecycleCore)
    labels: dict[Any, ProcessState] = {}

    def state(name: str, label: ProcessState, data: Any = None) -> Any:
        new = builder.state(name) if data is None else builder.state(name, data)
        labels[new] = label
        return new

    def go(
        old: Any, input: Callable[..., Any], new: Any, via: tuple[ProcessState, ...] = ()
    ) -> Any:
        """Register ``old --input--> new`` with the decorated output.

        Entering another state is announced (``via`` names public states
        passed on the way) before the output runs, so what the output queues
        follows the notification."""
        registrar = old.upon(input).loop() if new is old else old.upon(input).to(new)

        def register(output: Callable[..., Any]) -> Callable[..., Any]:
            if new is old:
                registrar(output)
                return output

            @functools.wraps(output)
            def entering(machine: Lifecycle, core: LifecycleCore, *args: Any) -> Any:
                for label in (*via, labels[new]):
                    core.entered(label)
                return output(machine, core, *args)

            registrar(entering)
            return output

        return register

    S = ProcessState
    stopped = state("Stopped", S.STOPPED)
    #: a crashed child's leftover group members are being killed
    reaping = state("Reaping", S.STOPPED)
    #: a start waits for the leftovers to be gone
    awaiting_reap = state("AwaitingReap", S.STARTING)
    #: the launch step is queued (listeners hear of "starting" before the spawn)
    launching = state("Launching", S.STARTING)
    checking = state("Checking", S.STARTING, _Checking)
    ready = state("Ready", S.READY, _Ready)
    stopping = state("Stopping", S.STOPPING)
    shutting_down = state("ShuttingDown", S.STOPPING)
    reaping_for_good = state("ReapingForShutdown", S.STOPPED)
    shut_down = state("Shutdown", S.SHUTDOWN)
    falling_asleep = state("FallingAsleep", S.SLEEPING, _FallingAsleep)
    sleeping = state("Sleeping", S.SLEEPING, _Asleep)
    waking = state("Waking", S.STARTING, _Waking)
    reaper_busy = (reaping, awaiting_reap, stopping, shutting_down, reaping_for_good)

    # -- make_ready ------------------------------------------------------------

    @go(stopped, Lifecycle.make_ready, launching)
    def start(machine: Lifecycle, core: LifecycleCore) -> Deferred[None]:
        waiter = core.ready.wait()
        core.step(core.launch, machine)
        return waiter

    @go(reaping, Lifecycle.make_ready, awaiting_reap)
    @go(awaiting_reap, Lifecycle.make_ready, awaiting_reap)
    @go(launching, Lifecycle.make_ready, launching)
    @go(checking, Lifecycle.make_ready, checking)
    @go(stopping, Lifecycle.make_ready, stopping)
    def join(machine: Lifecycle, core: LifecycleCore, *data: object) -> Deferred[None]:
        return core.ready.wait()

    @go(ready, Lifecycle.make_ready, ready)
    def already_ready(machine: Lifecycle, core: LifecycleCore, now: _Ready) -> Deferred[None]:
        return succeed(None)

    @go(shutting_down, Lifecycle.make_ready, shutting_down)
    @go(reaping_for_good, Lifecycle.make_ready, reaping_for_good)
    @go(shut_down, Lifecycle.make_ready, shut_down)
    def refuse(machine: Lifecycle, core: LifecycleCore) -> Deferred[None]:
        return fail(StartError("process is shut down"))

    # -- stop and shutdown -----------------------------------------------------

    @go(stopped, Lifecycle.stop, stopped)
    @go(stopped, Lifecycle.sleep, stopped)
    @go(stopped, Lifecycle.shutdown, shut_down)
    @go(launching, Lifecycle.stop, stopped)
    @go(launching, Lifecycle.sleep, stopped)
    @go(launching, Lifecycle.shutdown, shut_down, via=(S.STOPPED,))
    @go(shut_down, Lifecycle.stop, shut_down)
    @go(shut_down, Lifecycle.sleep, shut_down)
    @go(shut_down, Lifecycle.shutdown, shut_down)
    def nothing_to_stop(machine: Lifecycle, core: LifecycleCore, timeout: float) -> Deferred[None]:
        core.abort_waiting()
        return succeed(None)

    @go(awaiting_reap, Lifecycle.stop, reaping)
    @go(awaiting_reap, Lifecycle.sleep, reaping)
    @go(awaiting_reap, Lifecycle.shutdown, reaping_for_good)
    def abandon_start(machine: Lifecycle, core: LifecycleCore, timeout: float) -> Deferred[None]:
        core.abort_waiting()
        return core.reaper.wait()

    @go(reaping, Lifecycle.stop, reaping)
    @go(reaping, Lifecycle.sleep, reaping)
    @go(reaping, Lifecycle.shutdown, reaping_for_good)
    @go(stopping, Lifecycle.stop, stopping)
    @go(stopping, Lifecycle.sleep, stopping)
    @go(stopping, Lifecycle.shutdown, shutting_down)
    @go(shutting_down, Lifecycle.stop, shutting_down)
    @go(shutting_down, Lifecycle.sleep, shutting_down)
    @go(shutting_down, Lifecycle.shutdown, shutting_down)
    @go(reaping_for_good, Lifecycle.stop, reaping_for_good)
    @go(reaping_for_good, Lifecycle.sleep, reaping_for_good)
    @go(reaping_for_good, Lifecycle.shutdown, reaping_for_good)
    def hasten(machine: Lifecycle, core: LifecycleCore, timeout: float) -> Deferred[None]:
        core.reaper.hasten(timeout)
        core.abort_waiting()
        return core.reaper.wait()

    @go(checking, Lifecycle.stop, stopping)
    @go(checking, Lifecycle.sleep, stopping)
    @go(checking, Lifecycle.shutdown, shutting_down)
    def stop_starting(
        machine: Lifecycle, core: LifecycleCore, now: _Checking, timeout: float
    ) -> Deferred[None]:
        now.abandon()
        teardown = core.reap(machine, now.run, timeout)
        core.abort_waiting()
        return teardown.waiters.wait()

    @go(ready, Lifecycle.stop, stopping)
    @go(ready, Lifecycle.shutdown, shutting_down)
    def stop_ready(
        machine: Lifecycle, core: LifecycleCore, now: _Ready, timeout: float
    ) -> Deferred[None]:
        core.idle.disarm()
        teardown = core.reap(machine, now.run, timeout, ready=True)
        core.abort_waiting()
        return teardown.waiters.wait()

    # -- a start's progress ----------------------------------------------------

    @go(stopped, Lifecycle._resume, launching)
    def resume(machine: Lifecycle, core: LifecycleCore) -> None:
        core.step(core.launch, machine)

    @go(launching, Lifecycle._spawned, checking)
    def spawned(machine: Lifecycle, core: LifecycleCore, run: ChildRun) -> None:
        pass  # entering Checking starts the health check

    @go(launching, Lifecycle._launch_failed, stopped)
    def launch_failed(machine: Lifecycle, core: LifecycleCore, error: StartError) -> None:
        log.warn("{model} start failed: {error}", model=core.model_id, error=error.message)
        core.settle_waiting(error)

    @go(checking, Lifecycle._healthy, ready)
    def healthy(machine: Lifecycle, core: LifecycleCore, now: _Checking, run: ChildRun) -> None:
        core.settle_waiting(None)

    @go(checking, Lifecycle._unhealthy, stopping)
    def unhealthy(
        machine: Lifecycle, core: LifecycleCore, now: _Checking, error: StartError
    ) -> None:
        log.warn("{model} start failed: {error}", model=core.model_id, error=error.message)
        core.reap(machine, now.run, FAILED_START_STOP_TIMEOUT)
        core.settle_waiting(error)

    @go(checking, Lifecycle._exited, reaping)
    def died_starting(
        machine: Lifecycle, core: LifecycleCore, now: _Checking, status: ExitStatus
    ) -> None:
        lines = now.run.tail_lines()
        # Kill what the leader left behind; a next start waits for this.
        core.reap(machine, now.run, 0)
        now.abandon()
        message = _exit_message(status, lines)
        log.warn("{model} start failed: {error}", model=core.model_id, error=message)
        core.settle_waiting(StartError(message, died=True))

    # -- the ready child -------------------------------------------------------

    @go(ready, Lifecycle._exited, reaping)
    def crashed(machine: Lifecycle, core: LifecycleCore, now: _Ready, status: ExitStatus) -> None:
        core.stop_reason = "crash"
        core.idle.disarm()
        lines = now.run.tail_lines()
        core.reap(machine, now.run, 0)
        log.warn(
            "{model} upstream process exited unexpectedly with {status}; last output:\n{output}",
            model=core.model_id,
            status=str(status),
            output="\n".join(lines),
        )

    @go(ready, Lifecycle._ttl_expired, stopping)
    def idle_too_long(machine: Lifecycle, core: LifecycleCore, now: _Ready) -> None:
        core.stop_reason = "ttl"
        core.idle.disarm()
        log.info(
            "{model} Unloading model, TTL of {ttl}s reached",
            model=core.model_id,
            ttl=core.config.ttl,
        )
        core.reap(machine, now.run, core.config.unload_timeout, ready=True)
        core.abort_waiting()

    # -- the previous child is gone --------------------------------------------

    @go(reaping, Lifecycle._reaped, stopped)
    @go(stopping, Lifecycle._reaped, stopped)
    def reaped(machine: Lifecycle, core: LifecycleCore, teardown: Teardown) -> None:
        core.later(teardown.waiters.fire, None)
        core.step(core.resume_if_waited, machine)

    @go(awaiting_reap, Lifecycle._reaped, launching)
    def reaped_now_launch(machine: Lifecycle, core: LifecycleCore, teardown: Teardown) -> None:
        core.later(teardown.waiters.fire, None)
        core.step(core.launch, machine)

    @go(shutting_down, Lifecycle._reaped, shut_down)
    @go(reaping_for_good, Lifecycle._reaped, shut_down)
    def reaped_for_good(machine: Lifecycle, core: LifecycleCore, teardown: Teardown) -> None:
        core.later(teardown.waiters.fire, None)

    # -- the sleep tier ----------------------------------------------------------

    @go(ready, Lifecycle.sleep, falling_asleep)
    def fall_asleep(
        machine: Lifecycle, core: LifecycleCore, now: _Ready, timeout: float
    ) -> Deferred[None]:
        core.idle.disarm()
        log.info("{model} going to sleep", model=core.model_id)
        return core.asleep.wait()

    @go(ready, Lifecycle._ttl_sleep, falling_asleep)
    def idle_to_sleep(machine: Lifecycle, core: LifecycleCore, now: _Ready) -> None:
        core.stop_reason = "ttl"
        core.idle.disarm()
        log.info(
            "{model} going to sleep, TTL of {ttl}s reached",
            model=core.model_id,
            ttl=core.config.ttl,
        )

    @go(falling_asleep, Lifecycle.sleep, falling_asleep)
    def join_sleep(
        machine: Lifecycle, core: LifecycleCore, now: _FallingAsleep, timeout: float
    ) -> Deferred[None]:
        return core.asleep.wait()

    @go(sleeping, Lifecycle.sleep, sleeping)
    def already_asleep(
        machine: Lifecycle, core: LifecycleCore, now: _Asleep, timeout: float
    ) -> Deferred[None]:
        return succeed(None)

    @go(falling_asleep, Lifecycle._asleep, sleeping)
    def asleep(machine: Lifecycle, core: LifecycleCore, now: _FallingAsleep) -> None:
        log.info("{model} asleep", model=core.model_id)
        core.settle_asleep()
        # Requests that arrived meanwhile wake it at once.
        core.step(core.resume_if_waited, machine)

    @go(falling_asleep, Lifecycle._sleep_failed, stopping)
    def sleep_failed(
        machine: Lifecycle, core: LifecycleCore, now: _FallingAsleep, error: Exception
    ) -> None:
        log.warn("{model} could not sleep ({error}); stopping it", model=core.model_id, error=error)
        teardown = core.reap(machine, now.run, core.config.unload_timeout)
        waiters, core.asleep = core.asleep, type(core.asleep)()
        teardown.waiters.wait().addBoth(lambda _: waiters.fire(None))

    @go(falling_asleep, Lifecycle.make_ready, falling_asleep)
    @go(waking, Lifecycle.make_ready, waking)
    def join_wake(machine: Lifecycle, core: LifecycleCore, now: object) -> Deferred[None]:
        return core.ready.wait()

    @go(sleeping, Lifecycle.make_ready, waking)
    def wake(machine: Lifecycle, core: LifecycleCore, now: _Asleep) -> Deferred[None]:
        now.disarm()
        log.info("{model} waking up", model=core.model_id)
        return core.ready.wait()

    @go(sleeping, Lifecycle._resume, waking)
    def wake_for_waiters(machine: Lifecycle, core: LifecycleCore, now: _Asleep) -> None:
        now.disarm()
        log.info("{model} waking up", model=core.model_id)

    @go(waking, Lifecycle._healthy, ready)
    def woken(machine: Lifecycle, core: LifecycleCore, now: _Waking, run: ChildRun) -> None:
        log.info("{model} awake", model=core.model_id)
        core.settle_waiting(None)

    @go(waking, Lifecycle._wake_failed, stopping)
    def wake_failed(
        machine: Lifecycle, core: LifecycleCore, now: _Waking, error: Exception
    ) -> None:
        # The callers keep waiting: once the child is gone, Stopped starts
        # it afresh for them (resume_if_waited).
        log.warn(
            "{model} could not wake ({error}); restarting it", model=core.model_id, error=error
        )
        core.reap(machine, now.run, FAILED_START_STOP_TIMEOUT)

    @go(sleeping, Lifecycle._sleep_ttl_expired, stopping)
    def slept_too_long(machine: Lifecycle, core: LifecycleCore, now: _Asleep) -> None:
        core.stop_reason = "ttl"
        assert core.config.sleep is not None
        log.info(
            "{model} Unloading model, sleep TTL of {ttl}s reached",
            model=core.model_id,
            ttl=core.config.sleep.ttl,
        )
        core.reap(machine, now.run, core.config.unload_timeout)

    @go(falling_asleep, Lifecycle.stop, stopping)
    @go(falling_asleep, Lifecycle.shutdown, shutting_down)
    def stop_falling_asleep(
        machine: Lifecycle, core: LifecycleCore, now: _FallingAsleep, timeout: float
    ) -> Deferred[None]:
        now.abandon()
        teardown = core.reap(machine, now.run, timeout)
        core.settle_asleep()
        core.abort_waiting()
        return teardown.waiters.wait()

    @go(waking, Lifecycle.stop, stopping)
    @go(waking, Lifecycle.sleep, stopping)
    @go(waking, Lifecycle.shutdown, shutting_down)
    def stop_waking(
        machine: Lifecycle, core: LifecycleCore, now: _Waking, timeout: float
    ) -> Deferred[None]:
        now.abandon()
        teardown = core.reap(machine, now.run, timeout)
        core.abort_waiting()
        return teardown.waiters.wait()

    @go(sleeping, Lifecycle.stop, stopping)
    @go(sleeping, Lifecycle.shutdown, shutting_down)
    def stop_sleeping(
        machine: Lifecycle, core: LifecycleCore, now: _Asleep, timeout: float
    ) -> Deferred[None]:
        now.disarm()
        teardown = core.reap(machine, now.run, timeout)
        return teardown.waiters.wait()

    @go(falling_asleep, Lifecycle._exited, reaping)
    @go(sleeping, Lifecycle._exited, reaping)
    @go(waking, Lifecycle._exited, reaping)
    def died_sleeping(
        machine: Lifecycle, core: LifecycleCore, now: object, status: ExitStatus
    ) -> None:
        if isinstance(now, _Asleep):
            now.disarm()
            core.stop_reason = "crash"
        elif isinstance(now, _Calls):
            now.abandon()
        assert isinstance(now, _Asleep | _Calls)
        lines = now.run.tail_lines()
        core.reap(machine, now.run, 0)
        message = _exit_message(status, lines)
        log.warn(
            "{model} exited while asleep or waking: {error}", model=core.model_id, error=message
        )
        core.settle_asleep()
        core.settle_waiting(StartError(message, died=True))

    # -- queries ---------------------------------------------------------------

    @go(stopped, Lifecycle.pid, stopped)
    @go(launching, Lifecycle.pid, launching)
    @go(shut_down, Lifecycle.pid, shut_down)
    def no_pid(machine: Lifecycle, core: LifecycleCore) -> int | None:
        return None

    @go(checking, Lifecycle.pid, checking)
    def starting_pid(machine: Lifecycle, core: LifecycleCore, now: _Checking) -> int | None:
        return now.run.live_pid

    @go(ready, Lifecycle.pid, ready)
    @go(falling_asleep, Lifecycle.pid, falling_asleep)
    @go(sleeping, Lifecycle.pid, sleeping)
    @go(waking, Lifecycle.pid, waking)
    def ready_pid(machine: Lifecycle, core: LifecycleCore, now: object) -> int | None:
        assert isinstance(now, _Ready | _Asleep | _Calls)
        return now.run.live_pid

    for other in reaper_busy:
        go(other, Lifecycle.pid, other)(lambda machine, core: core.reaper.pid)

    return builder.build()


#: ``LifecycleMachine(core)``: a new machine, in state Stopped.
LifecycleMachine = _build()
