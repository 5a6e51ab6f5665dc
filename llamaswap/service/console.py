"""Console output that never blocks the reactor.

Log lines and (with ``logToStdout: upstream|both``) the model servers' output
go to stdout, which may be a terminal, a pipe nobody reads, or journald's
socket.  A blocking ``write`` to any of them can stall the whole service, so
:class:`ConsoleWriter` writes to a non-blocking descriptor: what the
descriptor does not take at once waits in a bounded buffer and is written
when the reactor says the descriptor is writable.  Beyond the bound, output
is dropped, counted (:attr:`ConsoleWriter.dropped_lines`) and marked in the
output (``[llamaswap: N log lines dropped]``) where it was lost.

Our own descriptor: a pipe, FIFO or terminal is reopened through
``/proc/self/fd`` (a new open file description, so ``O_NONBLOCK`` does not
leak to the shell or to whoever else shares it); a socket (journald) is
written with ``MSG_DONTWAIT``, leaving its flags alone; a regular file is
written as is (writes to files do not wait for a reader).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorFDSet, IWriteDescriptor
from twisted.python import threadable
from zope.interface import implementer

#: bytes waiting for a slow console before output is dropped.
DEFAULT_BUFFER_BYTES = 256 * 1024
#: how long :meth:`ConsoleWriter.close` tries to write what is left.
CLOSE_TIMEOUT = 1.0

_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


def drop_marker(lines: int) -> bytes:
    """The line written where ``lines`` lines of output were dropped."""
    return f"[llamaswap: {lines} log lines dropped]\n".encode()


def _own_descriptor(fd: int) -> tuple[int, Callable[[bytes], int], int | None]:
    """A descriptor for writing to ``fd`` without blocking, how to write to
    it, and the flags to restore on it at close (None: nothing to restore)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        own = os.dup(fd)
        return own, functools.partial(os.write, own), None
    if stat.S_ISSOCK(mode):
        # Per call: the socket's flags (shared with stderr) stay as they are.
        sock = socket.socket(fileno=os.dup(fd))
        family, kind = sock.family, sock.type
        own = sock.detach()
        return own, functools.partial(_send, family, kind, own), None
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        try:
            own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            return own, functools.partial(os.write, own), None
        except OSError:
            pass
    own = os.dup(fd)
    flags = fcntl.fcntl(own, fcntl.F_GETFL)
    fcntl.fcntl(own, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return own, functools.partial(os.write, own), flags


def _nowhere(data: bytes) -> int:
    return len(data)


def _send(family: int, kind: int, fd: int, data: bytes) -> int:
    sock = socket.socket(family, kind, 0, fd)
    try:
        return sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    finally:
        sock.detach()


def _in_reactor_thread() -> bool:
    """Whether this is the reactor's thread (before the reactor runs: the
    main thread, where twistd runs it)."""
    io = threadable.ioThread
    if io is None:
        return threading.current_thread() is threading.main_thread()
    return bool(io == threadable.getThreadID())


@implementer(IWriteDescriptor)
class ConsoleWriter:
    """Writes bytes to ``fd`` from the reactor without ever blocking it.

    :meth:`write` may be called from any thread.  ``max_bytes`` bounds what
    waits for the descriptor; output beyond it is dropped and marked.
    """

    def __init__(
        self, fd: int, reactor: IReactorFDSet, max_bytes: int = DEFAULT_BUFFER_BYTES
    ) -> None:
        self.original_fd = fd
        self._reactor = reactor
        self._max_bytes = max_bytes
        # Re-entrant: a signal handler (twistd's SIGINT/SIGTERM log line) can
        # run in the middle of a write on the same thread and log again.
        self._lock = threading.RLock()
        self._flushing = False
        try:
            self._fd, self._write, self._restore = _own_descriptor(fd)
        except OSError:  # stdout closed: nothing is written
            self._fd, self._write, self._restore = -1, _nowhere, None
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._writing = False
        self._at_line_start = True
        self._pending_drops = 0
        self.closed = self._fd < 0
        #: lines of output dropped since the writer was made.
        self.dropped_lines = 0

    # -- IWriteDescriptor

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "console"

    def doWrite(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            self._flush_locked()
            if self._pending_drops and not self._queue:
                self._enqueue_marker_locked()
                self._flush_locked()
            done = not self._queue or self.closed
            if done:
                self._writing = False
        if done:
            self._reactor.removeWriter(self)

    def connectionLost(self, reason: Any) -> None:
        with self._lock:
            self._writing = False

    # -- writing

    def write(self, data: bytes) -> None:
        """Write ``data`` now, or queue it, or drop it; never blocks."""
        if not data or self.closed:
            return
        with self._lock:
            if self._pending_drops:
                if self._room_locked() >= len(data) + 64:
                    self._enqueue_marker_locked()
                else:
                    self._drop_locked(data)
                    return
            elif self._room_locked() < len(data):
                self._drop_locked(data)
                return
            self._queue.append(data)
            self._queued += len(data)
            self._flush_locked()
            start = bool(self._queue) and not self._writing and not self.closed
            if start:
                self._writing = True
        if start:
            if _in_reactor_thread():
                self._start_writing()
            else:
                self._reactor.callFromThread(self._start_writing)  # type: ignore[attr-defined]

    def _start_writing(self) -> None:
        if not self.closed:
            self._reactor.addWriter(self)

    def _room_locked(self) -> int:
        return self._max_bytes - self._queued

    def _drop_locked(self, data: bytes) -> None:
        lines = max(data.count(b"\n"), 1)
        self._pending_drops += lines
        self.dropped_lines += lines

    def _enqueue_marker_locked(self) -> None:
        marker = drop_marker(self._pending_drops)
        last = self._queue[-1][-1:] if self._queue else None
        if (last is not None and last != b"\n") or (last is None and not self._at_line_start):
            marker = b"\n" + marker
        self._pending_drops = 0
        self._queue.append(marker)
        self._queued += len(marker)

    def _flush_locked(self) -> None:
        """Write queued bytes until the descriptor would block.  A write
        re-entered from a signal handler only queues: the flush under way
        writes its bytes after the ones it was writing."""
        if self._flushing:
            return
        self._flushing = True
        try:
            self._flush_queue_locked()
        finally:
            self._flushing = False

    def _flush_queue_locked(self) -> None:
        while self._queue and not self.closed:
            chunk = self._queue[0]
            try:
                written = self._write(chunk)
            except OSError as e:
                if e.errno in _AGAIN:
                    return
                # EPIPE, EBADF...: nobody will ever read it; stop writing.
                self._discard_locked()
                return
            self._at_line_start = chunk[written - 1 : written] == b"\n"
            self._queued -= written
            if written == len(chunk):
                self._queue.popleft()
            else:
                self._queue[0] = chunk[written:]

    def _discard_locked(self) -> None:
        self.closed = True
        self._queue.clear()
        self._queued = 0

    @property
    def buffered(self) -> int:
        """Bytes waiting for the descriptor."""
        return self._queued

    def flush(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write what waits for at most ``timeout`` seconds, blocking (for
        when the reactor has stopped: waits with ``select``)."""
        with self._lock:
            self._flush_waiting_locked(timeout)

    def _flush_waiting_locked(self, timeout: float) -> None:
        if self._fd < 0:
            return
        deadline = time.monotonic() + timeout
        if self._pending_drops and not self.closed:
            self._enqueue_marker_locked()
        while self._queue and not self.closed:
            self._flush_locked()
            left = deadline - time.monotonic()
            if not self._queue or left <= 0:
                break
            select.select([], [self._fd], [], left)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """:meth:`flush`, then let go of the descriptor."""
        if self._fd < 0:
            return
        if self._writing:
            self._writing = False
            try:
                self._reactor.removeWriter(self)
            except Exception:
                pass
        with self._lock:
            self._flush_waiting_locked(timeout)
            self._discard_locked()
            if self._restore is not None:
                try:
                    fcntl.fcntl(self._fd, fcntl.F_SETFL, self._restore)
                except OSError:
                    pass
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1


class ConsoleStream:
    """A text stream over a :class:`ConsoleWriter`, for ``FileLogObserver``
    (``write``/``flush``/``fileno``)."""

    def __init__(self, writer: ConsoleWriter) -> None:
        self.writer = writer

    def write(self, text: str) -> None:
        self.writer.write(text.encode("utf-8", "replace"))

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self.writer.original_fd
