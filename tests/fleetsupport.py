"""A simulated fleet on one machine (issue 15): model hosts and fronts, each
a llamaswap on its own loopback address (127.0.0.2, 127.0.0.3, ...; the
same port), demo upstreams as models, HAProxy in front of the fronts.
Used by tests/test_fleet.py and bench/fleet.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
from typing import Any

import treq
from twisted.internet import defer, protocol, reactor, task

from tests.support import PYTHON, REPO, ServiceProcess, descendants, pid_alive, poll_until

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
)

#: peer check and connect time-outs the fronts use (seconds).
CHECK = {"interval": 0.5, "timeout": 0.5, "maxInterval": 2}
CONNECT_TIMEOUT = 2


def common_port(addresses: list[str]) -> int:
    """A port free on every address in ``addresses`` (and the next one, for
    the hosts' models) a moment ago."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        if port > 65000:
            continue
        try:
            for address in addresses:
                for candidate in (port, port + 1):
                    with socket.socket() as s:
                        s.bind((address, candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every fleet address")


def demo_model(host: str, name: str, tokens_per_second: int = 0) -> dict[str, Any]:
    """A demo upstream that names its host in every reply."""
    cmd = (
        f"{PYTHON} -m llamaswap.demo --host {host} --port ${{PORT}} --model {name}"
        f" --reply '[{host}] '"
    )
    if tokens_per_second:
        cmd += f" --tokens-per-second {tokens_per_second}"
    return {
        "cmd": cmd,
        "proxy": f"http://{host}:${{PORT}}",
        "checkEndpoint": "/health",
        "concurrencyLimit": 256,
    }


class _Quiet(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.output: list[bytes] = []

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


class Fleet:
    """``hosts``: address -> {model: tokens per second}; ``fronts``: addresses.
    Every node listens on ``port``; HAProxy on ``balancer``:``port``."""

    def __init__(
        self,
        hosts: dict[str, dict[str, int]],
        fronts: list[str],
        balancer: str,
        *,
        balance: str = "roundrobin",
    ) -> None:
        self.hosts = hosts
        self.fronts = fronts
        self.balancer = balancer
        self.port = common_port([*hosts, *fronts, balancer])
        self.dir = tempfile.mkdtemp(prefix="llamaswap-fleet-")
        self.nodes: dict[str, ServiceProcess] = {}
        self.haproxy: Any = None
        self.haproxy_protocol: _Quiet | None = None
        self.balance = balance
        self.url = f"http://{balancer}:{self.port}"

    def peer_name(self, host: str) -> str:
        return "h" + host.rsplit(".", 1)[1]

    def _write(self, name: str, document: dict[str, Any]) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            json.dump(document, f)
        return path

    async def start(self) -> None:
        for host, models in self.hosts.items():
            document = {
                "startPort": self.port + 1,
                "healthCheckTimeout": 15,
                "logLevel": "warn",
                "models": {m: demo_model(host, m, tps) for m, tps in models.items()},
                # every model of a host may run at once
                "groups": {"all": {"swap": False, "members": list(models)}},
            }
            self._spawn(host, self._write(f"host-{host}.json", document))
        peers = {
            self.peer_name(host): {
                "proxy": f"http://{host}:{self.port}",
                "models": list(models),
                "check": CHECK,
                "timeouts": {"connect": CONNECT_TIMEOUT},
            }
            for host, models in self.hosts.items()
        }
        for front in self.fronts:
            document = {"logLevel": "warn", "peers": peers, "models": {}}
            self._spawn(front, self._write(f"front-{front}.json", document))
        await defer.gatherResults(
            [defer.ensureDeferred(n.wait_up(30)) for n in self.nodes.values()]
        )
        # The fronts may have probed a host before it listened: wait until
        # each has seen every host up (at most maxInterval later).
        deadline = reactor.seconds() + 10
        while not all([await self._sees_all_up(front) for front in self.fronts]):
            if reactor.seconds() > deadline:
                raise AssertionError("the fronts do not see every host up")
            await task.deferLater(reactor, 0.1, lambda: None)
        if HAPROXY is not None:
            self._start_haproxy()
            await poll_until(self._balancer_listening, timeout=10)

    async def _sees_all_up(self, front: str) -> bool:
        node = self.nodes[front]
        response = await treq.get(node.url + "/v1/models", pool=node.pool)
        records = json.loads(await response.content())["data"]
        return all(r["meta"]["llamaswap"].get("peer", {}).get("state") == "up" for r in records)

    def _spawn(self, host: str, config: str) -> None:
        self.nodes[host] = ServiceProcess(["-m", "llamaswap", "-c", config], self.port, host=host)

    def _balancer_listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex((self.balancer, self.port)) == 0

    def haproxy_config(self) -> str:
        servers = "\n".join(
            f"    server f{front.rsplit('.', 1)[1]} {front}:{self.port} check"
            for front in self.fronts
        )
        return f"""global
    maxconn 512
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 2
    retry-on conn-failure empty-response
    option redispatch
frontend llm
    bind {self.balancer}:{self.port}
    default_backend fronts
backend fronts
    balance {self.balance}
    option httpchk GET /health
    http-check expect status 200
    default-server inter 200ms fall 1 rise 1 on-marked-down shutdown-sessions
    http-response set-header X-Front %[srv_name]
{servers}
"""

    def _start_haproxy(self) -> None:
        assert HAPROXY is not None
        path = os.path.join(self.dir, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(self.haproxy_config())
        self.haproxy_protocol = _Quiet()
        self.haproxy = reactor.spawnProcess(
            self.haproxy_protocol, HAPROXY, [HAPROXY, "-db", "-f", path], env=dict(os.environ)
        )

    def kill(self, host: str) -> list[int]:
        """SIGKILL node ``host`` and its children (the demo upstreams): a
        machine that went away.  Returns the pids killed."""
        node = self.nodes[host]
        pid = node.transport.pid
        pids = [pid, *descendants(pid)] if pid else []
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def all_pids(self) -> list[int]:
        pids = []
        for node in self.nodes.values():
            pid = node.transport.pid
            if pid:
                pids += [pid, *descendants(pid)]
        if self.haproxy is not None and self.haproxy.pid:
            pids.append(self.haproxy.pid)
        return pids

    async def stop(self) -> None:
        """Everything down: the nodes (TERM, they stop their children), then
        HAProxy; whatever is left is killed.  Waits until every process is gone."""
        pids = self.all_pids()
        waits = []
        for node in self.nodes.values():
            if node.transport.pid:
                node.transport.signalProcess("TERM")
            waits.append(node.ended)
        if self.haproxy is not None and self.haproxy.pid:
            self.haproxy.signalProcess("KILL")
        if self.haproxy_protocol is not None:
            waits.append(self.haproxy_protocol.ended)
        try:
            await poll_until(lambda: all(d.called for d in waits), timeout=15)
        finally:
            for p in pids:
                if pid_alive(p):
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            await poll_until(lambda: not any(pid_alive(p) for p in pids), timeout=5)
            shutil.rmtree(self.dir, ignore_errors=True)


__all__ = ["CHECK", "CONNECT_TIMEOUT", "HAPROXY", "Fleet", "REPO"]
