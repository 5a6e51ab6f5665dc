"""Starting children, each leading its own process group, and signalling them.

A model server may fork helpers (a llama.cpp RPC worker, a Python wrapper's
real server); killing only the leader would leave them behind, holding the
port and the GPU.  So every child leads a new process group and is signalled
as a group.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import psutil
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from llamaswap.config.commands import not_found_message
from llamaswap.supervision.waiters import Waiters

log = Logger()

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
        self._closed: Waiters[None] = Waiters()

    def connectionMade(self) -> None:
        assert self.transport is not None
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
        """Fires once the pipes are closed (forcibly after :data:`PIPE_CLOSE_GRACE`)."""
        if self._ended:
            return succeed(None)
        closed = self._closed.wait()
        if self._close_call is None:
            self._close_call = self._clock.callLater(PIPE_CLOSE_GRACE, self._force_close)
        return closed

    def _force_close(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()
        self._closed.fire(None)


@implementer(IChildProcess)
class _GroupChild:
    """A real child spawned by :class:`ProcessGroupLauncher`."""

    def __init__(self, pid: int, protocol: _ChildProtocol) -> None:
        self.pid = pid
        self._protocol = protocol
        self._liveness = GroupLiveness(pid)

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
        return self._liveness()

    def release(self) -> Deferred[None]:
        return self._protocol.close_pipes()


@implementer(IProcessLauncher)
class ProcessGroupLauncher:
    """Spawns children through the reactor, each leading a new process group.

    Twisted's ``spawnProcess`` cannot ask for a new group, so the child execs
    through a trampoline: util-linux ``setsid`` when installed (a new session
    is a new group; it execs without forking because a freshly spawned child
    never leads a group), else :data:`PYTHON_TRAMPOLINE`.  ``trampoline``
    overrides that choice.
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
            raise FileNotFoundError(not_found_message(argv[0]))
        protocol = _ChildProtocol(cast(IReactorTime, self._reactor), on_output, on_exit)
        args = [*self._trampoline, executable, *argv[1:]]
        transport = self._reactor.spawnProcess(protocol, args[0], args, env=dict(env), usePTY=False)
        return _GroupChild(transport.pid, protocol)


_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)

#: at most this often a group whose known members are gone, though the group
#: still answers, is looked up in ``/proc`` again.
RESCAN_INTERVAL = 1.0


def _member_alive(pid: int, pgid: int) -> bool:
    """Whether ``pid`` exists, is in group ``pgid`` and is not a zombie."""
    try:
        return os.getpgid(pid) == pgid and psutil.Process(pid).status() not in _GONE
    except (OSError, psutil.Error):
        return False


def _scan_group(pgid: int) -> set[int]:
    """Every live member of group ``pgid``: a walk over all of ``/proc``."""
    return {pid for pid in psutil.pids() if _member_alive(pid, pgid)}


class GroupLiveness:
    """Whether process group ``pgid`` has a member that is not a zombie,
    cheap enough to poll while a group is being stopped.

    ``killpg(pgid, 0)`` (one system call) answers most polls: it fails once
    the group is empty.  It also succeeds for zombies, which an init that
    does not reap (common in containers) leaves behind, so the members we know
    of are checked one by one; only when all of them are gone is ``/proc``
    walked to learn the group's members again, at most every
    :data:`RESCAN_INTERVAL` seconds (meanwhile the group counts as alive).
    A group once found gone stays gone (its id may be reused later).
    """

    def __init__(self, pgid: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.pgid = pgid
        self._clock = clock
        self._members = {pgid}
        self._scanned_at: float | None = None
        self._gone = False

    def __call__(self) -> bool:
        if self._gone:
            return False
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            self._gone = True
            return False
        except PermissionError:
            return True
        for pid in sorted(self._members):
            if _member_alive(pid, self.pgid):
                return True
            self._members.discard(pid)
        now = self._clock()
        if self._scanned_at is not None and now - self._scanned_at < RESCAN_INTERVAL:
            return True
        self._scanned_at = now
        self._members = _scan_group(self.pgid)
        # No live member left: only a live member could add one.
        self._gone = not self._members
        return not self._gone


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie (a
    one-off check; poll with a :class:`GroupLiveness`)."""
    return GroupLiveness(pgid)()
