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
        core.idle.arm(core.feed(machine._ttl_expired))


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
    @go(stopped, Lifecycle.shutdown, shut_down)
    @go(launching, Lifecycle.stop, stopped)
    @go(launching, Lifecycle.shutdown, shut_down, via=(S.STOPPED,))
    @go(shut_down, Lifecycle.stop, shut_down)
    @go(shut_down, Lifecycle.shutdown, shut_down)
    def nothing_to_stop(machine: Lifecycle, core: LifecycleCore, timeout: float) -> Deferred[None]:
        core.abort_waiting()
        return succeed(None)

    @go(awaiting_reap, Lifecycle.stop, reaping)
    @go(awaiting_reap, Lifecycle.shutdown, reaping_for_good)
    def abandon_start(machine: Lifecycle, core: LifecycleCore, timeout: float) -> Deferred[None]:
        core.abort_waiting()
        return core.reaper.wait()

    @go(reaping, Lifecycle.stop, reaping)
    @go(reaping, Lifecycle.shutdown, reaping_for_good)
    @go(stopping, Lifecycle.stop, stopping)
    @go(stopping, Lifecycle.shutdown, shutting_down)
    @go(shutting_down, Lifecycle.stop, shutting_down)
    @go(shutting_down, Lifecycle.shutdown, shutting_down)
    @go(reaping_for_good, Lifecycle.stop, reaping_for_good)
    @go(reaping_for_good, Lifecycle.shutdown, reaping_for_good)
    def hasten(machine: Lifecycle, core: LifecycleCore, timeout: float) -> Deferred[None]:
        core.reaper.hasten(timeout)
        core.abort_waiting()
        return core.reaper.wait()

    @go(checking, Lifecycle.stop, stopping)
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
    def ready_pid(machine: Lifecycle, core: LifecycleCore, now: _Ready) -> int | None:
        return now.run.live_pid

    for other in reaper_busy:
        go(other, Lifecycle.pid, other)(lambda machine, core: core.reaper.pid)

    return builder.build()


#: ``LifecycleMachine(core)``: a new machine, in state Stopped.
LifecycleMachine = _build()
