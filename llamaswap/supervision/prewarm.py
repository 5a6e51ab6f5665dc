"""Prewarm: read a model's files into the page cache while its start waits.

When a start is decided but cannot run yet (its request is queued behind
another swap, or the models it evicts are still stopping), the time is
spent reading the model's weight files, so the server's own load then reads
from memory.  The files are the model's ``files:`` list or, without one, the
``-m``/``--model`` path of its command (:func:`model_files`).

The reading runs in a thread (never on the reactor): per file a
``posix_fadvise(WILLNEED)`` hint for the part to be read, then a read loop in
chunks that checks for cancellation between chunks.  It never reads more
than the RAM available when it began (``psutil.virtual_memory().available``
less :data:`RAM_RESERVE`) less what prewarms still running have claimed
(page cache counts as available, so concurrent prewarms share one budget),
and it stops at the first cancel.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence

import psutil
from twisted.internet import threads
from twisted.internet.defer import Deferred

from llamaswap.config.model import ModelConfig

#: bytes read per step of the loop (a cancel is seen between steps).
CHUNK = 8 << 20
#: RAM left untouched by a prewarm: the page cache must not push out what
#: the running models and the system need.
RAM_RESERVE = 512 << 20

_MODEL_FLAGS = ("-m", "--model")

#: bytes claimed by the prewarms reading now (shared by every thread).
_claims_lock = threading.Lock()
_claimed = [0]

#: ``run(work)``: runs ``work`` off the reactor; fires with its result.
ThreadRunner = Callable[[Callable[[], int]], "Deferred[int]"]


def model_files(config: ModelConfig) -> tuple[str, ...]:
    """The model's weight files: its ``files:`` list, else every
    ``-m``/``--model`` path (also ``--model=PATH``) of its command."""
    if config.files:
        return config.files
    found: list[str] = []
    argv = config.argv
    for i, word in enumerate(argv):
        if word in _MODEL_FLAGS and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif word.startswith("--model="):
            found.append(word.partition("=")[2])
    return tuple(path for path in found if path)


def available_ram() -> int:
    """RAM a prewarm may fill: what the system calls available, less the reserve."""
    return max(0, psutil.virtual_memory().available - RAM_RESERVE)


def _in_thread(work: Callable[[], int]) -> Deferred[int]:
    return threads.deferToThread(work)


class Prewarm:
    """One cancellable read of ``paths`` into the page cache.

    ``budget()`` is the most it may read (default: :func:`available_ram`),
    asked once in the reading thread when it starts, less what other
    prewarms reading at the time claimed; ``run`` is the thread seam; ``on_chunk(n)``
    (called in the reading thread) hears of each chunk read, for tests.
    """

    def __init__(
        self,
        paths: Sequence[str],
        *,
        budget: Callable[[], int] = available_ram,
        run: ThreadRunner = _in_thread,
        chunk: int = CHUNK,
        on_chunk: Callable[[int], None] | None = None,
    ) -> None:
        self.paths = tuple(paths)
        self._budget = budget
        self._run = run
        self._chunk = chunk
        self._on_chunk = on_chunk
        self._cancelled = threading.Event()
        #: bytes read so far (written by the reading thread).
        self.read = 0
        #: files that could not be read, with the reason.
        self.skipped: list[str] = []
        self.done: Deferred[int] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def start(self) -> Deferred[int]:
        """Begin reading; the result fires with the bytes read (also when
        cancelled: with what was read until then)."""
        if self.done is None:
            self.done = self._run(self._claim_and_read)
        return self.done

    def cancel(self) -> None:
        """Stop after the chunk being read (safe from any thread)."""
        self._cancelled.set()

    def _claim_and_read(self) -> int:
        wanted = 0
        for path in self.paths:
            try:
                wanted += os.stat(path).st_size
            except OSError:
                continue  # reported when it is read
        with _claims_lock:
            limit = min(wanted, max(0, self._budget() - _claimed[0]))
            _claimed[0] += limit
        try:
            return self._read_all(limit)
        finally:
            with _claims_lock:
                _claimed[0] -= limit

    def _read_all(self, limit: int) -> int:
        buffer = bytearray(self._chunk)
        for path in self.paths:
            if self.cancelled or self.read >= limit:
                break
            try:
                self._read_file(path, limit, buffer)
            except OSError as e:
                self.skipped.append(f"{path}: {e.strerror or e}")
        return self.read

    def _read_file(self, path: str, limit: int, buffer: bytearray) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            length = min(size, limit - self.read)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
            offset = 0
            view = memoryview(buffer)
            while offset < length and not self.cancelled:
                want = min(self._chunk, length - offset)
                n = os.readv(fd, [view[:want]]) if want < self._chunk else os.readv(fd, [view])
                if n <= 0:
                    break
                offset += n
                self.read += n
                if self._on_chunk is not None:
                    self._on_chunk(n)
        finally:
            os.close(fd)


#: Makes the prewarm of a model, or ``None`` when it has no files to read.
PrewarmFactory = Callable[[ModelConfig], "Prewarm | None"]


def prewarm_for(config: ModelConfig) -> Prewarm | None:
    """The default :data:`PrewarmFactory`: the model's files, if it names
    any and its ``prewarm`` is not switched off."""
    if not config.prewarm:
        return None
    paths = model_files(config)
    return Prewarm(paths) if paths else None
