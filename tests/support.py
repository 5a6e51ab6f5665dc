"""Shared helpers for integration tests: loopback servers and bounded polling."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import treq
from twisted.internet import defer, protocol, reactor, task
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESPONDER = os.path.join(HERE, "responder.py")
PYTHON = sys.executable


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listen(resource: Resource, site_factory: Callable[[Resource], Site] = Site) -> Any:
    """Serve ``resource`` on an ephemeral loopback port; returns the port."""
    site = site_factory(resource)
    site.noisy = False
    return reactor.listenTCP(0, site, interface="127.0.0.1")


def base_url(port: Any) -> str:
    return f"http://127.0.0.1:{port.getHost().port}"


async def poll_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Wait until ``predicate()`` is true; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await task.deferLater(reactor, interval, lambda: None)


def unsent(transport: Any) -> int:
    """Bytes a Twisted TCP ``transport`` holds that are not on its socket yet."""
    return int(transport._tempDataLen + len(transport.dataBuffer) - transport.offset)


class ServiceProcess:
    """llamaswap run as users run it, as a child process of the test:
    ``argv`` follows the Python interpreter, ``--listen`` is added on
    loopback, ``cwd`` is its directory.  Output is collected; ``ended``
    fires with the exit code.  ``stdout``: a descriptor the child writes its
    stdout to instead; ``env``: variables added to its environment."""

    def __init__(
        self,
        argv: list[str],
        listen_port: int,
        stdout: int | None = None,
        env: dict[str, str] | None = None,
        cwd: str = REPO,
        host: str = "127.0.0.1",
    ) -> None:
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.output: list[bytes] = []
        running = self

        class Watch(protocol.ProcessProtocol):
            def outReceived(self, data: bytes) -> None:
                running.output.append(data)

            errReceived = outReceived

            def processEnded(self, reason: Any) -> None:
                running.ended.callback(reason.value.exitCode)

        self.transport = reactor.spawnProcess(
            Watch(),
            PYTHON,
            [PYTHON, *argv, "--listen", f"{host}:{listen_port}"],
            env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
            path=cwd,
            childFDs=None if stdout is None else {0: "w", 1: stdout, 2: "r"},
        )
        self.url = f"http://{host}:{listen_port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def text(self) -> str:
        return b"".join(self.output).decode("utf-8", "replace")

    async def _healthy(self) -> bool:
        try:
            r = await treq.get(self.url + "/health", pool=self.pool)
            await r.content()
            return r.code == 200
        except Exception:
            return False

    async def wait_up(self, timeout: float = 20) -> None:
        deadline = reactor.seconds() + timeout
        while not await self._healthy():
            if reactor.seconds() > deadline or self.ended.called:
                raise AssertionError("llamaswap did not come up:\n" + self.text())
            await poll_until(lambda: True)


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root``, including those in other process
    groups (the children run in their own groups)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
