"""``twistd -n llamaswap``, the main way users run llamaswap, run for real:
a child process serving on loopback, spawning and stopping models."""

from __future__ import annotations

import json
import os
import signal
import tempfile

import treq
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
