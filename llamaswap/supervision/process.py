"""One supervised inference server: spawn, health check, TTL, stop, crash.

A :class:`ModelProcess` owns the state of one model's child process and is its
only writer: callers *ask* it to become ready or to stop, and it decides inside
its own transitions (a ready process stays ready, a stopping one finishes the
stop and then starts again, a start in progress is joined).  Side effects go
through injected seams: the clock, an :class:`IProcessLauncher` (real: a child
in its own process group) and a health ``probe``.
"""

from __future__ import annotations

import enum
import os
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent
from zope.interface import Attribute, Interface, implementer

from llamaswap.config.commands import parse_command
from llamaswap.config.model import ModelConfig
from llamaswap.observe.logs import LogMonitor

log = Logger()

T = TypeVar("T")

Probe = Callable[[str, float], Deferred[int]]
StateListener = Callable[["ModelProcess", "ProcessState", "ProcessState"], None]

#: health polling: first probe right after spawn, then these sleeps, doubling.
POLL_FIRST_DELAY = 0.01
POLL_MAX_DELAY = 0.25
#: Health polls wait a tenth of the time spent so far (within the bounds
#: above): a server that takes T to start is seen ready by T * 1.1 at worst,
#: while a slow loader is not polled more than four times a second.
POLL_BACKOFF_FRACTION = 0.1
#: upper bound for one health probe (also bounded by the remaining deadline).
PROBE_TIMEOUT = 5.0
#: graceful stop budget after a failed health check (as llama-swap).
FAILED_START_STOP_TIMEOUT = 5.0
#: after SIGKILL, how long to wait for the group to vanish before giving up.
KILL_WAIT = 5.0
#: how many output lines an error or crash report quotes.
TAIL_LINES = 5
TAIL_BYTES = 8192
#: a leader's exit is reported once its pipes hit EOF, or after this grace
#: (a grandchild may hold them open), so its last output is in the report.
EXIT_OUTPUT_GRACE = 0.1
#: after the group is gone, pipes still open (held by an escaped process) are
#: closed after this long.
PIPE_CLOSE_GRACE = 1.0

#: exec trampoline used when ``setsid`` is not installed: new process group,
#: then exec the resolved program with the original argv.
PYTHON_TRAMPOLINE = (
    sys.executable,
    "-I",
    "-S",
    "-c",
    "import os, sys; os.setpgid(0, 0); os.execv(sys.argv[1], sys.argv[1:])",
)


class ProcessState(enum.StrEnum):
    """Lifecycle states, named as in the API (``/running``, events)."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    SHUTDOWN = "shutdown"


class StartError(Exception):
    """A start did not reach ``ready``; ``message`` says why.  ``died`` is
    true when the server process itself exited during the start."""

    def __init__(self, message: str, *, died: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.died = died


@dataclass(frozen=True)
class ExitStatus:
    """How a child's leader process ended."""

    exit_code: int | None = None
    signal_number: int | None = None

    @classmethod
    def from_reason(cls, reason: Failure) -> ExitStatus:
        """From the ``ProcessDone``/``ProcessTerminated`` Twisted reports."""
        return cls(getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None))

    def __str__(self) -> str:
        if self.signal_number is not None:
            try:
                name = signal.Signals(self.signal_number).name
            except ValueError:
                return f"signal {self.signal_number}"
            return f"signal {self.signal_number} ({name})"
        return f"exit code {self.exit_code}"


class _Waiters(Generic[T]):
    """Callers waiting for one outcome; a caller's cancel only detaches it."""

    def __init__(self) -> None:
        self._pending: list[Deferred[T]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def wait(self) -> Deferred[T]:
        d: Deferred[T] = Deferred(self._pending.remove)
        self._pending.append(d)
        return d

    def fire(self, result: T) -> None:
        pending, self._pending = self._pending, []
        for d in pending:
            d.callback(result)

    def fail(self, error: Exception) -> None:
        pending, self._pending = self._pending, []
        for d in pending:
            d.errback(error)


class IChildProcess(Interface):
    """A spawned child that leads its own process group."""

    pid = Attribute("The leader's process id, which is also the group id.")

    def signal_group(signum: int) -> None:
        """Send ``signum`` to the whole group; no error when it is gone."""

    def group_alive() -> bool:
        """Whether any member of the group (zombies aside) still exists."""

    def release() -> Deferred[None]:
        """Close our ends of the child's pipes once their output has drained.

        Fires when they are closed: at once when they reached EOF, else
        forcibly after a grace (a process outside the group may hold them).
        """


class IProcessLauncher(Interface):
    """Starts children, each in its own process group."""

    def spawn(
        argv: Sequence[str],
        env: Mapping[str, str],
        on_output: Callable[[bytes], None],
        on_exit: Callable[[ExitStatus], None],
    ) -> IChildProcess:
        """Start ``argv`` (``argv[0]`` looked up in ``env``'s ``PATH``).

        ``on_output`` gets stdout and stderr bytes as they arrive; ``on_exit``
        is called once, never before ``spawn`` has returned, when the leader
        exits.  Raises :class:`OSError` when the program cannot be started.
        """


class _ChildProtocol(ProcessProtocol):
    """Turns a child's output and exit into the launcher's callbacks."""

    def __init__(
        self,
        clock: IReactorTime,
        on_output: Callable[[bytes], None],
        on_exit: Callable[[ExitStatus], None],
    ) -> None:
        self._clock = clock
        self._on_output = on_output
        self._on_exit = on_exit
        self.exited = False
        self._ended = False
        self._exit_call: IDelayedCall | None = None
        self._close_call: IDelayedCall | None = None
        self._closed: _Waiters[None] = _Waiters()

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._on_output(data)

    def errReceived(self, data: bytes) -> None:
        self._on_output(data)

    def processExited(self, reason: Failure) -> None:
        self.exited = True
        status = ExitStatus.from_reason(reason)
        self._exit_call = self._clock.callLater(EXIT_OUTPUT_GRACE, self._on_exit, status)

    def processEnded(self, reason: Failure) -> None:
        self._ended = True
        if self._exit_call is not None and self._exit_call.active():
            self._exit_call.reset(0)
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._closed.fire(None)

    def close_pipes(self) -> Deferred[None]:
        if self._ended:
            return succeed(None)
        closed = self._closed.wait()
        if self._close_call is None:
            self._close_call = self._clock.callLater(PIPE_CLOSE_GRACE, self._force_close)
        return closed

    def _force_close(self) -> None:
        self.transport.loseConnection()
        self._closed.fire(None)


@implementer(IChildProcess)
class _GroupChild:
    def __init__(self, pid: int, protocol: _ChildProtocol) -> None:
        self.pid = pid
        self._protocol = protocol

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            # The trampoline may not have made its group yet.
            if not self._protocol.exited:
                try:
                    os.kill(self.pid, signum)
                except ProcessLookupError:
                    pass
        except PermissionError as e:
            log.warn("cannot signal process group {pgid}: {error}", pgid=self.pid, error=e)

    def group_alive(self) -> bool:
        return group_alive(self.pid)

    def release(self) -> Deferred[None]:
        return self._protocol.close_pipes()


@implementer(IProcessLauncher)
class ProcessGroupLauncher:
    """Spawns children through the reactor, each leading a new process group.

    Twisted's ``spawnProcess`` cannot ask for a new group, so the child execs
    through a trampoline: util-linux ``setsid`` when installed (a new session
    is a new group; it execs without forking because a freshly spawned child
    never leads a group), else :data:`PYTHON_TRAMPOLINE`.
    """

    def __init__(self, reactor: IReactorProcess, trampoline: Sequence[str] | None = None) -> None:
        self._reactor = reactor
        if trampoline is None:
            setsid = shutil.which("setsid")
            trampoline = (setsid,) if setsid else PYTHON_TRAMPOLINE
        self._trampoline = tuple(trampoline)

    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        on_output: Callable[[bytes], None],
        on_exit: Callable[[ExitStatus], None],
    ) -> IChildProcess:
        # llamaswap's own scripts directory comes last, so a venv's console
        # scripts (such as the demo upstream) run without activating it.
        search = os.pathsep.join([env.get("PATH", os.defpath), os.path.dirname(sys.executable)])
        executable = shutil.which(argv[0], path=search)
        if executable is None:
            raise FileNotFoundError(f'exec: "{argv[0]}": executable file not found in $PATH')
        protocol = _ChildProtocol(cast(IReactorTime, self._reactor), on_output, on_exit)
        args = [*self._trampoline, executable, *argv[1:]]
        transport = self._reactor.spawnProcess(protocol, args[0], args, env=dict(env), usePTY=False)
        return _GroupChild(transport.pid, protocol)


def poll_delay(elapsed: float) -> float:
    """The pause before the next health probe, ``elapsed`` seconds into a start."""
    return min(max(elapsed * POLL_BACKOFF_FRACTION, POLL_FIRST_DELAY), POLL_MAX_DELAY)


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie.

    ``killpg(pgid, 0)`` also succeeds for zombies, which an init that does not
    reap (common in containers) leaves behind; on Linux the members' states
    are then read from ``/proc``.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..."; comm may contain anything.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


def http_probe(reactor: Any) -> Probe:
    """A probe that GETs a URL and returns the status code (body discarded)."""
    from llamaswap.core.endpoints import UpstreamEndpoints

    # Not persistent: each probe on a fresh connection, as a client would.
    agent = Agent.usingEndpointFactory(reactor, UpstreamEndpoints(reactor))

    def probe(url: str, timeout: float) -> Deferred[int]:
        def status(response: Any) -> int:
            response.deliverBody(_Discard())
            return cast(int, response.code)

        return agent.request(b"GET", url.encode("utf-8")).addCallback(status)

    return probe


def _cancelled_as_such(d: Deferred[T]) -> Deferred[T]:
    """``d``, except that cancelling the result always fails it with
    :class:`CancelledError` (an Agent request fails with another error)."""

    def cancel(outer: Deferred[T]) -> None:
        outer.errback(CancelledError())
        d.cancel()

    outer: Deferred[T] = Deferred(cancel)

    def forward(result: T | Failure) -> None:
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

    d.addBoth(forward)
    return outer


class _Run:
    """One child's life, from spawn until its whole process group is gone."""

    def __init__(self) -> None:
        self.child: IChildProcess | None = None
        self.status: ExitStatus | None = None
        self.exit_waiters: _Waiters[None] = _Waiters()
        self._tail = bytearray()
        #: when the graceful phase of a stop ends; a later stop may bring it forward.
        self.kill_at = 0.0

    def output(self, data: bytes) -> None:
        self._tail += data
        del self._tail[:-TAIL_BYTES]

    def tail_lines(self) -> list[str]:
        text = self._tail.decode("utf-8", "replace")
        return [line for line in text.splitlines() if line.strip()][-TAIL_LINES:]

    def exited(self, status: ExitStatus) -> None:
        self.status = status
        self.exit_waiters.fire(None)


@dataclass
class _Teardown:
    run: _Run
    waiters: _Waiters[None]


class ModelProcess:
    """The supervised child process of one model.

    ``reactor`` must provide ``IReactorTime``, and ``IReactorProcess`` and
    ``IReactorTCP`` unless ``launcher`` and ``probe`` are given.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        reactor: Any,
        health_check_timeout: float,
        log: LogMonitor,
        environ: Mapping[str, str] | None = None,
        probe: Probe | None = None,
        launcher: IProcessLauncher | None = None,
    ) -> None:
        self.config = config
        self.model_id = config.id
        self._clock: IReactorTime = reactor
        self._health_check_timeout = health_check_timeout
        #: the model's log monitor (child stdout and stderr, cmdStop output).
        self.log = log
        self._environ = environ
        self._probe = probe if probe is not None else http_probe(reactor)
        self._launcher = launcher if launcher is not None else ProcessGroupLauncher(reactor)
        self._state = ProcessState.STOPPED
        self._listeners: list[StateListener] = []
        #: callers of make_ready waiting for the next start to settle.
        self._ready_waiters: _Waiters[None] = _Waiters()
        #: the start coroutine in progress (state STARTING).
        self._start: Deferred[None] | None = None
        #: the child of the current life (STARTING after spawn, READY).
        self._run: _Run | None = None
        #: a previous child being killed (STOPPING, or leftovers after a crash).
        self._teardown: _Teardown | None = None
        self._shutting_down = False
        self._in_flight = 0
        self._ttl_call: IDelayedCall | None = None

    # -- observation ------------------------------------------------------

    @property
    def state(self) -> ProcessState:
        return self._state

    @property
    def pid(self) -> int | None:
        """The live leader's pid, if any."""
        run = self._run or (self._teardown.run if self._teardown else None)
        if run is None or run.child is None or run.status is not None:
            return None
        return cast(int, run.child.pid)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def add_state_listener(self, fn: StateListener) -> None:
        """Call ``fn(process, old, new)`` on every state change."""
        self._listeners.append(fn)

    # -- requests ---------------------------------------------------------

    def make_ready(self) -> Deferred[None]:
        """Fire once the process is ready, starting it if needed.

        Joins a start in progress; while stopping, waits for the stop and then
        starts.  Cancelling the result only detaches this caller.
        """
        if self._shutting_down:
            return fail(StartError("process is shut down"))
        if self._state is ProcessState.READY:
            return succeed(None)
        waiter = self._ready_waiters.wait()
        if self._state is ProcessState.STOPPED:
            self._begin_start()
        return waiter

    def stop(self, timeout: float | None = None) -> Deferred[None]:
        """Stop the child (graceful for ``timeout`` s, then SIGKILL); idempotent.

        Aborts a start in progress and fails its waiters with ``aborted``.
        Fires when the child's whole process group is gone; cancelling the
        result only detaches this caller.
        """
        if timeout is None:
            timeout = self.config.unload_timeout
        aborted, self._ready_waiters = self._ready_waiters, _Waiters()
        if self._state is ProcessState.STARTING:
            start, self._start = self._start, None
            if start is not None:
                start.cancel()
            run, self._run = self._run, None
            if run is not None:
                self._begin_teardown(run, timeout, stopping=True)
            else:
                self._set_state(ProcessState.STOPPED)
        elif self._state is ProcessState.READY:
            run, self._run = self._run, None
            assert run is not None
            self._begin_teardown(run, timeout, stopping=True)
        elif self._teardown is not None:
            run = self._teardown.run
            run.kill_at = min(run.kill_at, self._clock.seconds() + timeout)
        aborted.fail(StartError("aborted"))
        if self._teardown is not None:
            return self._teardown.waiters.wait()
        return succeed(None)

    def shutdown(self, timeout: float) -> Deferred[None]:
        """Stop for good: fires when the child is gone and the state is SHUTDOWN."""
        self._shutting_down = True
        done = self.stop(timeout)
        if self._state is ProcessState.STOPPED and self._teardown is None:
            self._set_state(ProcessState.SHUTDOWN)
        return done

    def request_started(self) -> None:
        """A request is now being served by this process (blocks the TTL)."""
        self._in_flight += 1
        self._cancel_ttl()

    def request_finished(self) -> None:
        """A request counted by :meth:`request_started` is done."""
        if self._in_flight == 0:
            log.error("{model} request_finished without request_started", model=self.model_id)
            return
        self._in_flight -= 1
        self._schedule_ttl()

    # -- transitions ------------------------------------------------------

    def _set_state(self, new: ProcessState) -> None:
        old, self._state = self._state, new
        if old is new:
            return
        if new is ProcessState.READY:
            self._schedule_ttl()
        else:
            self._cancel_ttl()
        log.debug("{model} state {old} -> {new}", model=self.model_id, old=old.value, new=new.value)
        for listener in tuple(self._listeners):
            try:
                listener(self, old, new)
            except Exception:
                log.failure("{model} state listener failed", model=self.model_id)

    def _begin_start(self) -> None:
        self._set_state(ProcessState.STARTING)
        if self._state is not ProcessState.STARTING:
            return  # a listener stopped it again
        # The launcher never reports an exit from inside spawn(), so nothing
        # can abort this start before self._start is set.
        start = self._start = Deferred.fromCoroutine(self._start_child())
        start.addBoth(self._start_settled, start)

    async def _start_child(self) -> None:
        if self._teardown is not None:
            await self._teardown.waiters.wait()
        argv = self.config.argv
        if not argv:
            raise StartError("empty command")
        run = _Run()
        try:
            run.child = self._launcher.spawn(
                argv,
                self._environment(),
                lambda data: self._on_output(run, data),
                lambda status: self._on_exit(run, status),
            )
        except OSError as e:
            raise StartError(f"failed to start command '{' '.join(argv)}': {e}") from e
        self._run = run
        log.info(
            "{model} started pid {pid}: {argv}",
            model=self.model_id,
            pid=run.child.pid,
            argv=" ".join(argv),
        )
        if self.config.check_endpoint is None:
            return
        url = self.config.proxy + self.config.check_endpoint
        if not await self._poll_health(url, self._clock.seconds() + self._health_check_timeout):
            raise StartError(f"health check timed out after {self._health_check_timeout:g}s")
        log.info("{model} Health check passed on {url}", model=self.model_id, url=url)

    async def _poll_health(self, url: str, deadline: float) -> bool:
        """Probe ``url`` until it answers 200 (True) or ``deadline`` passes."""
        began = self._clock.seconds()
        while True:
            remaining = deadline - self._clock.seconds()
            if remaining <= 0:
                return False
            timeout = min(PROBE_TIMEOUT, remaining)
            attempt = maybeDeferred(self._probe, url, timeout).addTimeout(timeout, self._clock)
            try:
                if await _cancelled_as_such(attempt) == 200:
                    return True
            except CancelledError:
                raise
            except Exception as e:
                log.debug("{model} health probe failed: {error!r}", model=self.model_id, error=e)
            remaining = deadline - self._clock.seconds()
            if remaining <= 0:
                return False
            await deferLater(self._clock, min(poll_delay(self._clock.seconds() - began), remaining))

    def _start_settled(self, result: None | Failure, start: Deferred[None]) -> None:
        if self._start is not start:
            return None  # aborted by stop() or by the child's exit
        self._start = None
        waiters, self._ready_waiters = self._ready_waiters, _Waiters()
        if not isinstance(result, Failure):
            self._set_state(ProcessState.READY)
            waiters.fire(None)
            return None
        run, self._run = self._run, None
        error = result.value
        if not isinstance(error, StartError):
            log.failure("{model} start failed", result, model=self.model_id)
            error = StartError(str(error))
        log.warn("{model} start failed: {error}", model=self.model_id, error=error.message)
        if run is not None:
            self._begin_teardown(run, FAILED_START_STOP_TIMEOUT, stopping=True)
        else:
            self._set_state(ProcessState.STOPPED)
        waiters.fail(error)
        return None

    def _on_output(self, run: _Run, data: bytes) -> None:
        run.output(data)
        self.log.write(data)

    def _on_exit(self, run: _Run, status: ExitStatus) -> None:
        run.exited(status)
        if run is not self._run:
            return  # a teardown is waiting for it
        self._run = None
        lines = run.tail_lines()
        # Kill what the leader left behind; a next start waits for this.
        self._begin_teardown(run, 0, stopping=False)
        if self._state is ProcessState.STARTING:
            start, self._start = self._start, None
            waiters, self._ready_waiters = self._ready_waiters, _Waiters()
            if start is not None:
                start.cancel()
            message = f"upstream command exited prematurely with {status}"
            if lines:
                message += ": " + "\n".join(lines)
            log.warn("{model} start failed: {error}", model=self.model_id, error=message)
            self._set_state(ProcessState.STOPPED)
            waiters.fail(StartError(message, died=True))
        else:
            log.warn(
                "{model} upstream process exited unexpectedly with {status}; last output:\n{output}",
                model=self.model_id,
                status=str(status),
                output="\n".join(lines),
            )
            self._set_state(ProcessState.STOPPED)

    # -- stopping ---------------------------------------------------------

    def _begin_teardown(self, run: _Run, timeout: float, *, stopping: bool) -> None:
        """Kill ``run``'s group; with ``stopping``, go through STOPPING."""
        run.kill_at = self._clock.seconds() + timeout
        teardown = _Teardown(run, _Waiters())
        self._teardown = teardown
        if stopping:
            self._set_state(ProcessState.STOPPING)
        done = Deferred.fromCoroutine(self._terminate(run))
        done.addErrback(lambda f: log.failure("{model} stop failed", f, model=self.model_id))
        done.addCallback(lambda _: self._teardown_finished(teardown))

    async def _terminate(self, run: _Run) -> None:
        child = run.child
        assert child is not None
        try:
            if run.status is not None and not child.group_alive():
                return
            if run.status is None and run.kill_at > self._clock.seconds():
                if not self._run_stop_command(run):
                    child.signal_group(signal.SIGTERM)
                if await self._await_gone(run, lambda: run.kill_at):
                    return
            child.signal_group(signal.SIGKILL)
            kill_deadline = self._clock.seconds() + KILL_WAIT
            if not await self._await_gone(run, lambda: kill_deadline):
                log.warn(
                    "{model} process group {pgid} still alive {wait}s after SIGKILL; giving up",
                    model=self.model_id,
                    pgid=child.pid,
                    wait=KILL_WAIT,
                )
        finally:
            await child.release()

    async def _await_gone(self, run: _Run, deadline: Callable[[], float]) -> bool:
        """Wait until the leader exited and its group is empty, or the deadline."""
        child = run.child
        assert child is not None
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

    def _run_stop_command(self, run: _Run) -> bool:
        """Start ``cmdStop`` for ``run`` (never awaited); False to use signals."""
        if not self.config.cmd_stop:
            return False
        assert run.child is not None
        text = self.config.cmd_stop.replace("${PID}", str(run.child.pid))

        def stopped(status: ExitStatus) -> None:
            if status.exit_code != 0:
                log.warn(
                    "{model} cmdStop exited with {status}", model=self.model_id, status=str(status)
                )
            stopper.release()

        try:
            argv = parse_command(text)
            stopper = self._launcher.spawn(argv, self._environment(), self.log.write, stopped)
        except (ValueError, OSError) as e:
            log.warn(
                "{model} cmdStop failed, sending SIGTERM: {error}", model=self.model_id, error=e
            )
            return False
        log.info("{model} running cmdStop: {argv}", model=self.model_id, argv=" ".join(argv))
        return True

    def _teardown_finished(self, teardown: _Teardown) -> None:
        if self._teardown is teardown:
            self._teardown = None
        if self._state is ProcessState.STOPPING or (
            self._shutting_down and self._state is ProcessState.STOPPED
        ):
            self._set_state(ProcessState.SHUTDOWN if self._shutting_down else ProcessState.STOPPED)
        teardown.waiters.fire(None)
        if self._state is ProcessState.STOPPED and len(self._ready_waiters):
            self._begin_start()

    # -- TTL --------------------------------------------------------------

    def _schedule_ttl(self) -> None:
        """(Re)start the idle clock: TTL counts from now, the later of ready
        and the last finished request."""
        ttl = self.config.ttl
        if ttl <= 0 or self._state is not ProcessState.READY or self._in_flight > 0:
            return
        if self._ttl_call is not None and self._ttl_call.active():
            self._ttl_call.reset(ttl)
        else:
            self._ttl_call = self._clock.callLater(ttl, self._ttl_expired)

    def _cancel_ttl(self) -> None:
        if self._ttl_call is not None and self._ttl_call.active():
            self._ttl_call.cancel()
        self._ttl_call = None

    def _ttl_expired(self) -> None:
        self._ttl_call = None
        if self._state is not ProcessState.READY or self._in_flight > 0:
            return
        log.info(
            "{model} Unloading model, TTL of {ttl}s reached",
            model=self.model_id,
            ttl=self.config.ttl,
        )
        self.stop(self.config.unload_timeout)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ if self._environ is None else self._environ)
        env.update(self.config.env)
        return env
