"""Signals under ``twistd -n llamaswap``, run for real: a stop signal that
arrives the moment systemd hears ``READY=1`` is handled (graceful stop,
children stopped), never the default action that kills the process."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from tests.support import PYTHON, RESPONDER, ServiceProcess, free_port, pid_alive, poll_until
from tests.test_systemd import short_tempdir
from tests.test_twistd import TWISTD


def processes_with(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and pid_alive(int(entry)):
            found.append(int(entry))
    return found


class TermOnReady(DatagramProtocol):
    """The fake systemd: collects notifications and sends SIGTERM to the
    service the instant ``READY=1`` arrives."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.service: ServiceProcess | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        message = datagram.decode()
        self.messages.append(message)
        if message.startswith("READY=1") and self.service is not None:
            self.service.transport.signalProcess(signal.SIGTERM)


class ReadySignalTests(TestCase):
    timeout = 60

    async def test_sigterm_right_after_ready_stops_gracefully(self) -> None:
        """SIGTERM sent the instant READY=1 arrives (the model is loading,
        preloaded at start) is handled: llamaswap says STOPPING=1, drains,
        stops the model's process and exits, leaving no orphan."""
        model_port = free_port()
        marker = f"{RESPONDER} --port {model_port}"
        model = {
            "cmd": f"{PYTHON} {marker} --startup-delay 1",
            "proxy": f"http://127.0.0.1:{model_port}",
        }
        directory = short_tempdir(self)
        config = os.path.join(directory, "config.yaml")
        with open(config, "w") as f:
            json.dump({"models": {"a": model}, "hooks": {"on_startup": {"preload": ["a"]}}}, f)
        self.addCleanup(lambda: [os.kill(pid, signal.SIGKILL) for pid in processes_with(marker)])
        notify_path = os.path.join(directory, "notify")
        systemd = TermOnReady()
        port = reactor.listenUNIXDatagram(notify_path, systemd)
        self.addCleanup(port.stopListening)
        running = ServiceProcess(
            [*TWISTD, "-n", "--pidfile=", "llamaswap", "-c", config],
            free_port(),
            env={"NOTIFY_SOCKET": notify_path},
        )
        systemd.service = running
        self.addCleanup(
            lambda: None if running.ended.called else running.transport.signalProcess(9)
        )
        # twistd ends by re-raising the stop signal on itself, so the exit
        # status cannot tell a graceful stop from being killed: its log can.
        await running.ended.addTimeout(30, reactor)
        output = running.text()
        self.assertTrue(systemd.messages[0].startswith("READY=1"), systemd.messages)
        self.assertIn("Received SIGTERM, shutting down.", output)
        self.assertTrue(any(m.startswith("STOPPING=1") for m in systemd.messages), output)
        self.assertRegex(output, r"a started pid \d+")
        self.assertIn("stopping every model process", output)
        self.assertIn("shutdown complete", output)
        await poll_until(lambda: not processes_with(marker), timeout=10)


if sys.platform != "linux":  # pragma: no cover
    skip = "reads /proc"


class DrainTests(TestCase):
    timeout = 60

    async def test_sigterm_during_preload_does_not_wait_for_it(self) -> None:
        """SIGTERM while the preloaded model is still loading (and a client
        waits for it) drains nothing: no request is being relayed.  The
        waiting client gets a JSON 503, the model's process is stopped, and
        llamaswap exits without spending the 10 s grace."""
        model_port = free_port()
        marker = f"{RESPONDER} --port {model_port}"
        model = {
            "cmd": f"{PYTHON} {marker} --startup-delay 60",
            "proxy": f"http://127.0.0.1:{model_port}",
        }
        directory = short_tempdir(self)
        config = os.path.join(directory, "config.yaml")
        with open(config, "w") as f:
            json.dump({"models": {"a": model}, "hooks": {"on_startup": {"preload": ["a"]}}}, f)
        self.addCleanup(lambda: [os.kill(pid, signal.SIGKILL) for pid in processes_with(marker)])
        running = ServiceProcess(
            [*TWISTD, "-n", "--pidfile=", "llamaswap", "-c", config], free_port()
        )
        self.addCleanup(
            lambda: None if running.ended.called else running.transport.signalProcess(9)
        )
        await running.wait_up()
        await poll_until(lambda: bool(processes_with(marker)))
        waiting = treq.post(
            running.url + "/v1/chat/completions",
            data=b'{"model": "a", "messages": []}',
            headers={b"content-type": [b"application/json"]},
            pool=running.pool,
        )

        async def inflight() -> list[Any]:
            response = await treq.get(running.url + "/api/inflight", pool=running.pool)
            return list(await response.json())

        deadline = reactor.seconds() + 10
        while not await inflight():
            self.assertLess(reactor.seconds(), deadline, "the request never arrived")
            await poll_until(lambda: True)
        stopped_at = reactor.seconds()
        running.transport.signalProcess(signal.SIGTERM)
        response = await waiting
        self.assertEqual(response.code, 503)
        payload = await response.json()
        self.assertEqual(payload["error"]["message"], "unspecific error: group is shutting down")
        await running.ended.addTimeout(30, reactor)
        output = running.text()
        self.assertIn("no requests in flight", output)
        self.assertIn("shutdown complete", output)
        self.assertLess(reactor.seconds() - stopped_at, 10, "waited out the grace")
        await poll_until(lambda: not processes_with(marker), timeout=10)
