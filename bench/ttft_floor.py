#!/usr/bin/env python3
"""Streaming time to first token: llamaswap against the floor of any proxy.

The yardstick's streaming TTFT (``stream_client.py``: 200 chunks, 1 ms apart,
first token after the role chunk) through a proxy costs two process
wake-ups more than a direct connection, whatever the proxy does.  This
script measures, alternately and in the same minutes, what that floor is on
this machine and how far above it llamaswap is::

    python bench/ttft_floor.py                # 6 rounds, every target each round
    python bench/ttft_floor.py --rounds 10 --chunks 20

Targets, all in front of one fast upstream (the shared yardstick's
``fast_upstream.py``; llamaswap runs it as its model, as the yardstick does):

- ``direct``: the upstream itself;
- ``nginx``: the yardstick's nginx (keep-alive pool, no buffering), when
  ``nginx`` is installed;
- ``relay``: the least a Twisted program can do as a proxy.  It copies
  bytes between each client connection and its own upstream connection,
  with ``TCP_NODELAY`` on both, and reads nothing;
- ``llamaswap``: ``twistd -n llamaswap`` from this checkout, default
  config (activity, captures, access log and Prometheus on).

The report gives each target's TTFT (median of the rounds' p50s) and what it
adds over direct.  The gap between ``relay`` and ``llamaswap`` is what
llamaswap's own work costs (HTTP, routing, admission, recording); the gap
between ``direct`` and ``relay`` is the floor no Twisted proxy gets under.
Ports are ephemeral.  ``--relay LISTEN UPSTREAM`` runs only the relay.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchutil import free_ports, shared_perf_dir, twistd_argv, wait_ok, yardstick_config

ROOT = Path(__file__).resolve().parent.parent

NGINX_CONF = """worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  upstream fast {{ server 127.0.0.1:{upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://fast;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""


def run_relay(listen: int, upstream: int) -> None:
    """Copy bytes between each client connection and an upstream connection."""
    from twisted.internet import protocol, reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    class Upstream(protocol.Protocol):
        def __init__(self, client: Client) -> None:
            self.client = client

        def dataReceived(self, data: bytes) -> None:
            self.client.transport.write(data)

        def connectionLost(self, reason: object = None) -> None:
            self.client.transport.loseConnection()

    class Client(protocol.Protocol):
        upstream: Upstream | None = None

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            self.pending: list[bytes] = []
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", upstream)
            connectProtocol(endpoint, Upstream(self)).addCallback(self._connected)

        def _connected(self, proto: Upstream) -> None:
            proto.transport.setTcpNoDelay(True)
            self.upstream = proto
            proto.transport.writeSequence(self.pending)

        def dataReceived(self, data: bytes) -> None:
            if self.upstream is None:
                self.pending.append(data)
            else:
                self.upstream.transport.write(data)

        def connectionLost(self, reason: object = None) -> None:
            if self.upstream is not None:
                self.upstream.transport.loseConnection()

    reactor.listenTCP(listen, protocol.Factory.forProtocol(Client), interface="127.0.0.1")
    reactor.run()


def ttft(perf: Path, port: int, model: str, n: int, chunks: int) -> float:
    out = subprocess.run(
        [
            sys.executable, str(perf / "stream_client.py"), "--url", f"http://127.0.0.1:{port}",
            "--model", model, "--n", str(n), "--chunks", str(chunks), "--delay-ms", "1",
        ],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    match = re.search(r"ttft_p50_ms=([0-9.]+)", out)
    if match is None:
        raise SystemExit(f"stream_client printed no TTFT: {out!r}")
    return float(match.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--n", type=int, default=10, help="streams per target per round")
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--perf-dir", help="the shared yardstick (default ../shared/perf)")
    ap.add_argument("--relay", nargs=2, type=int, metavar=("LISTEN", "UPSTREAM"))
    args = ap.parse_args()
    if args.relay:
        run_relay(*args.relay)
        return 0
    perf = shared_perf_dir(args.perf_dir)

    work = Path(tempfile.mkdtemp(prefix="llamaswap-ttft-"))
    up, relay, nginx, lls, start_port = free_ports(5)
    upstream_cmd = f"{sys.executable} {perf / 'fast_upstream.py'}"
    config = work / "config.yaml"
    config.write_text(
        yardstick_config(f"{upstream_cmd} --port ${{PORT}}", start_port, models=("m1", "m2"))
    )
    log = (work / "processes.log").open("wb")
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str], **kwargs: object) -> None:
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kwargs))  # type: ignore[call-overload]

    targets = [("direct", up, "m1")]
    try:
        spawn([*upstream_cmd.split(), "--port", str(up)])
        wait_ok(f"http://127.0.0.1:{up}/health")
        spawn([sys.executable, __file__, "--relay", str(relay), str(up)])
        targets.append(("relay", relay, "m1"))
        if shutil.which("nginx"):
            (work / "nginx.conf").write_text(NGINX_CONF.format(work=work, upstream=up, port=nginx))
            spawn(["nginx", "-c", str(work / "nginx.conf"), "-p", str(work)])
            targets.insert(1, ("nginx", nginx, "m1"))
        spawn(
            twistd_argv(config, lls),
            cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        targets.append(("llamaswap", lls, "m1"))
        chat = b'{"model":"m1","messages":[]}'
        for _, port, _ in targets:
            wait_ok(f"http://127.0.0.1:{port}/v1/chat/completions", chat)
        figures: dict[str, list[float]] = {name: [] for name, _, _ in targets}
        for _ in range(args.rounds):
            for name, port, model in targets:
                figures[name].append(ttft(perf, port, model, args.n, args.chunks))
            print(" ".join(f"{n}={v[-1]:.3f}" for n, v in figures.items()), flush=True)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    direct = statistics.median(figures["direct"])
    print(f"\nTTFT p50 over {args.rounds} rounds ({args.chunks} chunks, 1 ms apart):")
    print("| target | TTFT ms | added over direct ms | rounds |")
    print("|---|---|---|---|")
    for name, values in figures.items():
        mid = statistics.median(values)
        added = "—" if name == "direct" else f"{mid - direct:+.3f}"
        print(f"| {name} | {mid:.3f} | {added} | {', '.join(f'{v:.2f}' for v in values)} |")
    if "relay" in figures and "llamaswap" in figures:
        own = statistics.median(figures["llamaswap"]) - statistics.median(figures["relay"])
        print(f"\nllamaswap's own work over the Twisted floor: {own * 1000:+.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
