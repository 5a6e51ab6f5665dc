"""``twistd -n llamaswap``, the main way users run llamaswap, run for real:
a child process serving on loopback, spawning and stopping models."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import tempfile
from collections.abc import Callable

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.support import (
    PYTHON,
    RESPONDER,
    ServiceProcess,
    descendants,
    free_port,
    pid_alive,
    poll_until,
)

#: ``twistd`` itself, as its console script runs it.
TWISTD = ["-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


class TwistdTests(TestCase):
    timeout = 60

    def _config(self) -> str:
        port = free_port()
        model = {
            "cmd": f"{PYTHON} {RESPONDER} --port {port} --spawn-grandchild",
            "proxy": f"http://127.0.0.1:{port}",
        }
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            json.dump({"models": {"a": model}}, f)
        self.addCleanup(os.unlink, f.name)
        return f.name

    async def test_serves_and_stops_children(self) -> None:
        """``twistd -n llamaswap -c CONFIG`` starts a model on the first
        request, relays it, lists it in ``/running``, logs to stdout, and on
        SIGTERM stops every child and grandchild before it exits."""
        running = ServiceProcess(
            [*TWISTD, "-n", "--pidfile=", "llamaswap", "-c", self._config()], free_port()
        )
        await running.wait_up()
        response = await treq.get(running.url + "/upstream/a/health", pool=running.pool)
        self.assertEqual(response.code, 200, running.text())
        await response.content()
        status = await (await treq.get(running.url + "/running", pool=running.pool)).json()
        self.assertEqual([m["model"] for m in status["running"]], ["a"])
        self.assertEqual(status["running"][0]["state"], "ready")
        children = descendants(running.transport.pid)
        self.assertGreaterEqual(len(children), 2, children)
        self.assertIn("Health check passed", running.text())
        running.transport.signalProcess(signal.SIGTERM)
        await running.ended
        await poll_until(lambda: not any(pid_alive(p) for p in children), timeout=5)
        self.assertIn("shutdown complete", running.text())


#: the console script, as ``python -m llamaswap`` runs it.
CONSOLE_SCRIPT = ["-m", "llamaswap"]
ENTRY_POINTS = {"twistd": [*TWISTD, "-n", "--pidfile=", "llamaswap"], "llamaswap": CONSOLE_SCRIPT}
#: what the model server prints (its command line, logged at start, holds it too).
UPSTREAM_MARK = "UPSTREAM-SAYS-HELLO"


class SameOutputTests(TestCase):
    """``twistd -n llamaswap`` and the ``llamaswap`` console script print the
    same things: level filtering and ``logToStdout`` (issues 11.8, 12.2)."""

    timeout = 120

    def _config(self, **settings: object) -> str:
        port = free_port()
        model = {
            # Refuses health probes for a moment, then prints a marker line.
            "cmd": f"{PYTHON} {RESPONDER} --port {port} --startup-delay 0.3 "
            f"--print {UPSTREAM_MARK}",
            "proxy": f"http://127.0.0.1:{port}",
        }
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            json.dump({**settings, "models": {"a": model}}, f)
        self.addCleanup(os.unlink, f.name)
        return f.name

    async def _serve(self, entry: str, config: str) -> str:
        """Start the service, load model ``a`` through a request, stop it;
        everything it printed."""
        running = ServiceProcess([*ENTRY_POINTS[entry], "-c", config], free_port())
        await running.wait_up()
        response = await treq.get(running.url + "/upstream/a/health", pool=running.pool)
        self.assertEqual(response.code, 200, running.text())
        await response.content()
        running.transport.signalProcess(signal.SIGTERM)
        await running.ended
        return running.text()

    async def test_log_level_filtering(self) -> None:
        """At the default ``logLevel`` (info) neither entry point prints debug
        lines: no ``health probe failed`` while a model starts (twistd used to
        print about twenty), and the same lines either way."""
        config = self._config()
        outputs = {entry: await self._serve(entry, config) for entry in ENTRY_POINTS}
        for entry, text in outputs.items():
            self.assertIn("Health check passed", text, entry)
            self.assertEqual(text.count("health probe failed"), 0, f"{entry}:\n{text}")
            self.assertNotIn("#debug]", text, entry)

    async def test_debug_level_shows_probes(self) -> None:
        """``logLevel: debug`` shows the failed probes under twistd too."""
        text = await self._serve("twistd", self._config(logLevel="debug"))
        self.assertGreater(text.count("health probe failed"), 0, text)

    async def test_access_lines_follow_the_log_level(self) -> None:
        """An access line per request at ``logLevel: info``; none at
        ``warn`` (where no observer would print it, so none is made), while
        warnings still are."""
        line = '"GET /upstream/a/health HTTP/1.1" 200'
        for entry in ENTRY_POINTS:
            text = await self._serve(entry, self._config())
            self.assertIn(line, text, f"{entry}:\n{text}")
        text = await self._serve("twistd", self._config(logLevel="warn"))
        self.assertNotIn(line, text, text)
        self.assertNotIn("Health check passed", text, text)

    async def test_upstream_output_with_both_and_upstream(self) -> None:
        """``logToStdout: both`` and ``upstream``: the model server's output
        is on stdout under either entry point."""
        for entry, mode in (("twistd", "both"), ("llamaswap", "both"), ("twistd", "upstream")):
            text = await self._serve(entry, self._config(logToStdout=mode))
            self.assertIn(UPSTREAM_MARK, text.splitlines(), f"{entry} {mode}:\n{text}")
            self.assertNotIn("Traceback", text, f"{entry} {mode}")

    async def test_no_upstream_output_with_proxy_and_none(self) -> None:
        """``logToStdout: proxy`` and ``none``: the model server's output is
        not on stdout under either entry point; ``none`` keeps llamaswap's own
        lines below ERROR off stdout too."""
        for entry, mode in (("twistd", "proxy"), ("llamaswap", "proxy"), ("twistd", "none")):
            text = await self._serve(entry, self._config(logToStdout=mode))
            self.assertNotIn(UPSTREAM_MARK, text.splitlines(), f"{entry} {mode}")
            if mode == "proxy":
                self.assertIn("Health check passed", text, entry)
            else:
                self.assertNotIn("Health check passed", text, entry)


def _fill(fd: int) -> int:
    """Write to the pipe ``fd`` until it is full; the bytes written."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    total = 0
    try:
        while True:
            total += os.write(fd, b"#" * 4096)
    except BlockingIOError:
        pass
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return total


def _fill_socket(sock: socket.socket) -> int:
    """Send on ``sock`` until its buffers are full; the bytes sent."""
    total = 0
    try:
        while True:
            total += sock.send(b"#" * 4096, socket.MSG_DONTWAIT)
    except BlockingIOError:
        pass
    return total


class FullStdoutTests(TestCase):
    """Stdout that nobody reads (a full pipe, a stalled journal socket) does
    not stall the service (11.7)."""

    timeout = 120

    def _config(self) -> str:
        port = free_port()
        model = {
            # Prints about 600 kB at start: more than the console buffer holds.
            "cmd": f"{PYTHON} {RESPONDER} --port {port} --print-filler 6000",
            "proxy": f"http://127.0.0.1:{port}",
        }
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            json.dump({"logLevel": "debug", "logToStdout": "both", "models": {"a": model}}, f)
        self.addCleanup(os.unlink, f.name)
        return f.name

    async def _serve_unread(
        self, stdout: int, read: Callable[[], bytes], env: dict[str, str] | None = None
    ) -> bytes:
        """Run ``twistd -n llamaswap`` with ``stdout`` (full, unread), serve a
        few hundred requests within a deadline, then read with ``read`` until
        the drop marker shows; everything read."""
        running = ServiceProcess(
            [*ENTRY_POINTS["twistd"], "-c", self._config()], free_port(), stdout=stdout, env=env
        )
        os.close(stdout)
        stopped = False

        def stop() -> defer.Deferred[int]:
            if not stopped:
                running.transport.signalProcess(signal.SIGKILL)
            return running.ended

        self.addCleanup(stop)
        deadline = reactor.seconds() + 30
        await running.wait_up(timeout=20)
        for n in range(300):
            path = "/upstream/a/health" if n % 10 == 0 else "/health"
            response = await treq.get(running.url + path, pool=running.pool)
            self.assertEqual(response.code, 200, running.text())
            await response.content()
        self.assertLess(reactor.seconds(), deadline, "requests were served too slowly")
        # Now read: what was dropped is marked where it was lost.
        seen = bytearray()

        def drained() -> bool:
            seen.extend(read())
            return re.search(rb"llamaswap: \d+ log lines dropped\]\n", seen) is not None

        await poll_until(drained, timeout=10)
        running.transport.signalProcess(signal.SIGTERM)
        stopped = True

        def ended() -> bool:
            seen.extend(read())
            return running.ended.called

        await poll_until(ended, timeout=60)  # a loaded machine: shutdown stops the model too
        seen.extend(read())
        return bytes(seen)

    async def test_serves_with_a_full_stdout_pipe(self) -> None:
        """With stdout a full pipe that is never read, ``twistd -n llamaswap``
        comes up and answers a few hundred requests, with debug logging and the
        model's output (more than the console buffer holds) on stdout, well
        within a deadline; once the pipe is read, the dropped lines are marked."""
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
        self.assertGreater(_fill(write_end), 0)
        os.set_blocking(read_end, False)

        def read() -> bytes:
            out = bytearray()
            try:
                while chunk := os.read(read_end, 65536):
                    out.extend(chunk)
            except BlockingIOError:
                pass
            return bytes(out)

        seen = await self._serve_unread(write_end, read)
        self.assertIn(b"[llamaswap: ", seen)
        self.assertIn(b"shutdown complete", seen)

    async def test_serves_with_a_stalled_journal(self) -> None:
        """The same with stdout journald's stream socket (``JOURNAL_STREAM``
        names it), full and not read: journal lines, nothing blocks."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.assertGreater(_fill_socket(theirs), 0)
        status = os.fstat(theirs.fileno())
        journal = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        ours.setblocking(False)

        def read() -> bytes:
            out = bytearray()
            try:
                while chunk := ours.recv(65536):
                    out.extend(chunk)
            except BlockingIOError:
                pass
            return bytes(out)

        seen = await self._serve_unread(theirs.detach(), read, env=journal)
        self.assertRegex(seen, rb"\n<6>\[llamaswap\.service\.service\] shutdown complete\n")
