"""One spawned child as supervision sees it: its output and its exit."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, cast

from llamaswap.supervision.launcher import ExitStatus, IChildProcess, IProcessLauncher
from llamaswap.supervision.waiters import Waiters

#: how many output lines an error or crash report quotes.
TAIL_LINES = 5
TAIL_BYTES = 8192


class OutputSink(Protocol):
    """Where a model's child output goes (e.g. the model's log monitor)."""

    def write(self, data: bytes) -> None: ...


class ChildRun:
    """One child's life, from spawn until its whole process group is gone.

    Spawning happens in the constructor (:class:`OSError` when the program
    cannot be started).  Output goes to ``sink`` and a short tail is kept for
    error reports; ``on_exit`` hears of the leader's exit until
    :meth:`detach` (a teardown then waits on :attr:`exit_waiters` instead).
    """

    def __init__(
        self,
        launcher: IProcessLauncher,
        argv: Sequence[str],
        env: Mapping[str, str],
        sink: OutputSink,
        on_exit: Callable[[ExitStatus], None],
    ) -> None:
        self.status: ExitStatus | None = None
        self.exit_waiters: Waiters[None] = Waiters()
        self._tail = bytearray()
        self._sink = sink
        self._on_exit: Callable[[ExitStatus], None] | None = on_exit
        # The launcher never reports an exit from inside spawn().
        self.child: IChildProcess = launcher.spawn(argv, env, self._output, self._exited)

    @property
    def pid(self) -> int:
        """The leader's pid, which is also the group id."""
        return cast(int, self.child.pid)

    @property
    def live_pid(self) -> int | None:
        """The leader's pid while it has not exited."""
        return self.pid if self.status is None else None

    def detach(self) -> None:
        """Stop reporting the leader's exit to ``on_exit``."""
        self._on_exit = None

    def tail_lines(self) -> list[str]:
        """The last few non-blank lines of output."""
        text = self._tail.decode("utf-8", "replace")
        return [line for line in text.splitlines() if line.strip()][-TAIL_LINES:]

    def _output(self, data: bytes) -> None:
        self._tail += data
        del self._tail[:-TAIL_BYTES]
        self._sink.write(data)

    def _exited(self, status: ExitStatus) -> None:
        self.status = status
        self.exit_waiters.fire(None)
        if self._on_exit is not None:
            self._on_exit(status)
