"""Stopping a child: its whole process group, gracefully first, then for sure.

A :class:`Reaper` kills one :class:`ChildRun` at a time: ``cmdStop`` (or
SIGTERM to the group) first, SIGKILL once the graceful deadline passes, and it
is done only when no member of the group is left, so a next start never meets
the previous server still holding its port.  ``cmdStop`` itself gets the same
graceful deadline: one still running then is killed with its group (a hung
``docker stop`` leaves no orphan), and the teardown ends only after it.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from llamaswap.config.commands import parse_command
from llamaswap.core.secrets import join_argv
from llamaswap.supervision.child import ChildRun, OutputSink
from llamaswap.supervision.health import POLL_FIRST_DELAY, POLL_MAX_DELAY
from llamaswap.supervision.launcher import ExitStatus, IProcessLauncher
from llamaswap.supervision.waiters import Waiters

log = Logger()

#: after SIGKILL, how long to wait for the group to vanish before giving up.
KILL_WAIT = 5.0


#: ``before(deadline)``: work to finish by ``deadline()`` before the child
#: is asked to stop; ``None`` when there is none.
BeforeStop = Callable[[Callable[[], float]], Deferred[None] | None]


class Teardown:
    """Killing one child: ``waiters`` hear when its group is gone."""

    def __init__(self, run: ChildRun, kill_at: float, before: BeforeStop | None = None) -> None:
        self.run = run
        #: work before the stop is asked for (a prompt cache's save).
        self.before = before
        #: when the graceful phase ends; a later stop may bring it forward.
        self.kill_at = kill_at
        self.waiters: Waiters[None] = Waiters()
        #: the running ``cmdStop``, if one was started.
        self.stopper: ChildRun | None = None


class Reaper:
    """Kills one model's children, one at a time."""

    def __init__(
        self,
        model_id: str,
        clock: IReactorTime,
        launcher: IProcessLauncher,
        cmd_stop: str,
        environment: Callable[[], Mapping[str, str]],
        sink: OutputSink,
    ) -> None:
        self._model_id = model_id
        self._clock = clock
        self._launcher = launcher
        self._cmd_stop = cmd_stop
        self._environment = environment
        self._sink = sink
        self._current: Teardown | None = None

    @property
    def pid(self) -> int | None:
        """The pid of the leader being stopped, while it has not exited."""
        return self._current.run.live_pid if self._current is not None else None

    def reap(
        self,
        run: ChildRun,
        timeout: float,
        done: Callable[[Teardown], None],
        before: BeforeStop | None = None,
    ) -> Teardown:
        """Kill ``run``'s group (graceful for ``timeout`` s, ``before`` run
        first within it); ``done`` hears when it is gone.  The caller fires
        the teardown's waiters."""
        run.detach()
        teardown = self._current = Teardown(run, self._clock.seconds() + timeout, before)
        finished = Deferred.fromCoroutine(self._terminate(teardown))
        finished.addErrback(lambda f: log.failure("{model} stop failed", f, model=self._model_id))
        finished.addCallback(lambda _: self._finished(teardown, done))
        return teardown

    def hasten(self, timeout: float) -> None:
        """End the graceful phase of the current teardown within ``timeout`` s."""
        assert self._current is not None
        self._current.kill_at = min(self._current.kill_at, self._clock.seconds() + timeout)

    def wait(self) -> Deferred[None]:
        """Fires when the current teardown is done."""
        assert self._current is not None
        return self._current.waiters.wait()

    def _finished(self, teardown: Teardown, done: Callable[[Teardown], None]) -> None:
        if self._current is teardown:
            self._current = None
        done(teardown)

    async def _terminate(self, teardown: Teardown) -> None:
        run = teardown.run
        child = run.child
        try:
            if run.status is not None and not child.group_alive():
                return
            if run.status is None and teardown.kill_at > self._clock.seconds():
                await self._before_stop(teardown)
            if run.status is None and teardown.kill_at > self._clock.seconds():
                if not self._run_stop_command(teardown):
                    child.signal_group(signal.SIGTERM)
                if await self._await_gone(run, lambda: teardown.kill_at):
                    return
            child.signal_group(signal.SIGKILL)
            kill_deadline = self._clock.seconds() + KILL_WAIT
            if not await self._await_gone(run, lambda: kill_deadline):
                log.warn(
                    "{model} process group {pgid} still alive {wait}s after SIGKILL; giving up",
                    model=self._model_id,
                    pgid=child.pid,
                    wait=KILL_WAIT,
                )
        finally:
            await self._end_stopper(teardown)
            await child.release()

    async def _before_stop(self, teardown: Teardown) -> None:
        """Run ``teardown.before`` (never past the graceful deadline; errors logged)."""
        if teardown.before is None:
            return
        try:
            work = teardown.before(lambda: teardown.kill_at)
            if work is not None:
                await work.addTimeout(teardown.kill_at - self._clock.seconds(), self._clock)
        except Exception:
            log.failure("{model} work before the stop failed", model=self._model_id)

    async def _end_stopper(self, teardown: Teardown) -> None:
        """Wait for ``cmdStop`` until the graceful deadline, then kill its group."""
        stopper = teardown.stopper
        if stopper is None or await self._await_gone(stopper, lambda: teardown.kill_at):
            return
        log.warn(
            "{model} cmdStop (pid {pid}) still running at the stop deadline; killing it",
            model=self._model_id,
            pid=stopper.pid,
        )
        teardown.stopper = None  # its exit is ours now, not worth a warning
        stopper.child.signal_group(signal.SIGKILL)
        kill_deadline = self._clock.seconds() + KILL_WAIT
        if not await self._await_gone(stopper, lambda: kill_deadline):
            log.warn(
                "{model} cmdStop process group {pgid} still alive {wait}s after SIGKILL; giving up",
                model=self._model_id,
                pgid=stopper.pid,
                wait=KILL_WAIT,
            )

    async def _await_gone(self, run: ChildRun, deadline: Callable[[], float]) -> bool:
        """Wait until the leader exited and its group is empty, or the deadline."""
        child = run.child
        delay = POLL_FIRST_DELAY
        while True:
            if run.status is not None and not child.group_alive():
                return True
            remaining = deadline() - self._clock.seconds()
            if remaining <= 0:
                return False
            if run.status is None:
                # Event-driven, but wake up now and then: the deadline may move.
                exited = run.exit_waiters.wait()
                exited.addTimeout(min(remaining, POLL_MAX_DELAY), self._clock)
                try:
                    await exited
                except DeferredTimeout:
                    pass
            else:
                await deferLater(self._clock, min(delay, remaining))
                delay = min(delay * 2, POLL_MAX_DELAY)

    def _run_stop_command(self, teardown: Teardown) -> bool:
        """Start ``cmdStop`` for ``teardown``'s child (awaited only by
        :meth:`_end_stopper`); False to use signals."""
        if not self._cmd_stop:
            return False
        text = self._cmd_stop.replace("${PID}", str(teardown.run.pid))

        def stopped(status: ExitStatus) -> None:
            if status.exit_code != 0 and teardown.stopper is stopper:
                log.warn(
                    "{model} cmdStop exited with {status}",
                    model=self._model_id,
                    status=str(status),
                )
            stopper.child.release()

        try:
            argv = parse_command(text)
            stopper = ChildRun(self._launcher, argv, self._environment(), self._sink, stopped)
        except (ValueError, OSError) as e:
            log.warn(
                "{model} cmdStop failed, sending SIGTERM: {error}", model=self._model_id, error=e
            )
            return False
        teardown.stopper = stopper
        log.info("{model} running cmdStop: {argv}", model=self._model_id, argv=join_argv(argv))
        return True
