"""Console output that never blocks: a bounded buffer over a non-blocking
descriptor, drops counted and marked (issue 11.7)."""

from __future__ import annotations

import fcntl
import os
import socket
import threading

from twisted.internet import reactor
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from llamaswap.service import logsetup
from llamaswap.service.console import ConsoleStream, ConsoleWriter, drop_marker
from tests.support import poll_until


def small_pipe(test: TestCase) -> tuple[int, int]:
    """A pipe of one page (4 KiB), both ends closed after the test."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    test.addCleanup(os.close, read_end)
    test.addCleanup(os.close, write_end)
    return read_end, write_end


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = bytearray()
    try:
        while chunk := os.read(fd, 65536):
            out += chunk
    except BlockingIOError:
        pass
    return bytes(out)


class ConsoleWriterTests(TestCase):
    def writer(self, fd: int, max_bytes: int = 16 * 1024) -> ConsoleWriter:
        writer = ConsoleWriter(fd, reactor, max_bytes=max_bytes)
        self.addCleanup(writer.close, 0)
        return writer

    def test_writes_through_at_once(self) -> None:
        """With room in the pipe, bytes are written during ``write``."""
        read_end, write_end = small_pipe(self)
        writer = self.writer(write_end)
        writer.write(b"hello\n")
        self.assertEqual(read_all(read_end), b"hello\n")
        self.assertEqual(writer.buffered, 0)

    def test_signal_handler_logging_mid_write(self) -> None:
        """A signal handler that logs while a write is under way on the same
        thread (twistd's "Received SIGTERM" line) is queued behind it, not a
        deadlock (seen: a llamaswap that never stopped after SIGTERM)."""
        read_end, write_end = small_pipe(self)
        writer = self.writer(write_end)
        write = writer._write
        handler_ran = []

        def interrupted(chunk: bytes) -> int:
            if not handler_ran:
                handler_ran.append(True)
                writer.write(b"Received SIGTERM\n")  # what the handler logs
            return write(chunk)

        writer._write = interrupted  # type: ignore[method-assign]
        done = threading.Event()
        worker = threading.Thread(target=lambda: (writer.write(b"a line\n"), done.set()))
        worker.start()
        worker.join(5)
        self.assertTrue(done.is_set(), "write deadlocked when re-entered")
        self.assertEqual(read_all(read_end), b"a line\nReceived SIGTERM\n")

    def test_full_pipe_never_blocks(self) -> None:
        """A pipe nobody reads: writes return at once, the buffer stays
        bounded, and what does not fit is counted as dropped lines."""
        read_end, write_end = small_pipe(self)
        writer = self.writer(write_end, max_bytes=8192)
        line = b"x" * 99 + b"\n"
        for _ in range(1000):  # 100 kB into 4 kB of pipe and 8 kB of buffer
            writer.write(line)
        self.assertLessEqual(writer.buffered, 8192)
        self.assertGreater(writer.dropped_lines, 800)
        # The descriptor we were given keeps its flags (blocking).
        self.assertTrue(os.get_blocking(write_end))

    async def test_drops_are_marked_where_they_happened(self) -> None:
        """Once the reader catches up, the buffered lines come out in order,
        then ``[llamaswap: N log lines dropped]``, then later lines."""
        read_end, write_end = small_pipe(self)
        writer = self.writer(write_end, max_bytes=8192)
        for n in range(2000):
            writer.write(b"line %04d\n" % n)
        dropped = writer.dropped_lines
        self.assertGreater(dropped, 0)
        seen = bytearray()

        def drained() -> bool:
            seen.extend(read_all(read_end))
            return writer.buffered == 0 and drop_marker(dropped) in seen

        await poll_until(drained, timeout=5)
        writer.write(b"after\n")
        seen.extend(read_all(read_end))
        lines = bytes(seen).splitlines()
        self.assertEqual(lines[-2:], [drop_marker(dropped).strip(), b"after"])
        kept = [int(line.split()[1]) for line in lines[:-2]]
        self.assertEqual(kept, list(range(len(kept))))  # in order, none lost before the gap
        self.assertEqual(len(kept) + dropped, 2000)

    async def test_marker_before_the_next_line_after_a_partial_line(self) -> None:
        """A marker after an unfinished line starts on a line of its own."""
        read_end, write_end = small_pipe(self)
        writer = self.writer(write_end, max_bytes=4096)
        writer.write(b"." * 4000)  # into the pipe
        writer.write(b"." * 500)  # fills it; the rest waits
        self.assertGreater(writer.buffered, 0)
        writer.write(b"lost\n" * 1000)  # more than the buffer has room for
        seen = bytearray()

        def drained() -> bool:
            seen.extend(read_all(read_end))
            return writer.buffered == 0 and b"dropped]" in seen

        await poll_until(drained, timeout=5)
        self.assertIn(b".\n[llamaswap: 1000 log lines dropped]\n", bytes(seen))

    def test_pipe_is_reopened_not_made_non_blocking(self) -> None:
        """The shared descriptor (stdout's) is not switched to non-blocking:
        a shell or another process sharing it must not see EAGAIN."""
        _, write_end = small_pipe(self)
        writer = self.writer(write_end)
        self.assertTrue(os.get_blocking(write_end))
        self.assertFalse(os.get_blocking(writer.fileno()))

    async def test_socket_written_without_touching_its_flags(self) -> None:
        """A socket (journald's stream, often shared with stderr) stays
        blocking: each send is non-blocking on its own; a full socket queues,
        then drains."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer = self.writer(ours.fileno(), max_bytes=1 << 20)
        for n in range(200):
            writer.write(b"journal line %03d " % n + b"." * 500 + b"\n")
        self.assertTrue(os.get_blocking(ours.fileno()))
        self.assertGreater(writer.buffered, 0)  # the socket did not take it all
        theirs.setblocking(False)
        seen = bytearray()

        def drained() -> bool:
            try:
                while chunk := theirs.recv(65536):
                    seen.extend(chunk)
            except BlockingIOError:
                pass
            return writer.buffered == 0 and seen.count(b"\n") == 200

        await poll_until(drained, timeout=5)
        self.assertTrue(seen.startswith(b"journal line 000 "))
        self.assertEqual(writer.dropped_lines, 0)

    def test_close_writes_what_is_left(self) -> None:
        """At exit, what waits in the buffer is written if the reader takes it
        within the time-out; a reader that never does costs only that."""
        read_end, write_end = small_pipe(self)
        writer = ConsoleWriter(write_end, reactor, max_bytes=8192)
        writer.write(b"a" * 6000)
        writer.close(0.05)  # nobody reads: gives up
        self.assertTrue(writer.closed)
        writer.write(b"more")  # ignored after close
        self.assertEqual(len(read_all(read_end)), 4096)

    def test_closed_reader_drops_quietly(self) -> None:
        """EPIPE (the reader went away) stops writing; no exception."""
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        os.close(read_end)
        writer = ConsoleWriter(write_end, reactor)
        self.addCleanup(writer.close, 0)
        writer.write(b"nobody\n")
        writer.write(b"listens\n")
        self.assertTrue(writer.closed)

    def test_closed_stdout(self) -> None:
        """A descriptor that is not open: nothing is written, nothing raised."""
        read_end, write_end = os.pipe()
        os.close(read_end)
        os.close(write_end)
        writer = ConsoleWriter(write_end, reactor)
        writer.write(b"nowhere\n")
        writer.close(0)
        self.assertTrue(writer.closed)

    def test_stream_for_log_observers(self) -> None:
        """``ConsoleStream`` is the text file ``FileLogObserver`` writes to."""
        read_end, write_end = small_pipe(self)
        stream = ConsoleStream(self.writer(write_end))
        stream.write("héllo\n")
        stream.flush()
        self.assertEqual(stream.fileno(), write_end)
        self.assertEqual(read_all(read_end), "héllo\n".encode())


class StdoutModeFilterTests(TestCase):
    def tearDown(self) -> None:
        logsetup.set_log_to_stdout("proxy")

    def test_own_lines_follow_log_to_stdout(self) -> None:
        """``proxy``/``both``: llamaswap's lines reach stdout; ``upstream``/
        ``none``: only errors do."""
        info = {"log_level": LogLevel.info}
        error = {"log_level": LogLevel.error}
        for mode, shown in (("proxy", True), ("both", True), ("upstream", False), ("none", False)):
            logsetup.set_log_to_stdout(mode)
            self.assertEqual(logsetup._mode_filter(info).name != "no", shown, mode)
            self.assertNotEqual(logsetup._mode_filter(error).name, "no", mode)

    def test_adopt_twistd_logging(self) -> None:
        """Under twistd our observer becomes the ``--logger`` unless the
        command line named one."""
        options: dict[str, object] = {"logger": None, "nodaemon": True}
        logsetup.adopt_twistd_logging(options)
        self.assertEqual(options["logger"], logsetup.OBSERVER_NAME)
        chosen: dict[str, object] = {"logger": "my.observer"}
        logsetup.adopt_twistd_logging(chosen)
        self.assertEqual(chosen["logger"], "my.observer")
        logsetup.adopt_twistd_logging(None)  # the plugin's options parsed alone
        logsetup._twistd_options = None
