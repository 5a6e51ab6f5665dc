#!/usr/bin/env python3
"""What a second relay process would buy: one llamaswap against two.

llamaswap relays on one reactor thread, and under wrk that thread is on a
CPU nearly all the time (docs/performance.md).  Relay workers
(docs/design.md §2, "Beyond one core") are not built; this measures their
ceiling on the machine at hand.  One fast upstream serves all the runs.  N
independent ``twistd -n llamaswap`` processes (default config, the model's
``cmd`` a placeholder whose ``proxy`` is that upstream) share the load.  In
each round, alternately and in the same minutes, it measures:

* one process driven by one wrk at ``-c C``;
* N processes, each driven by its own wrk at ``-c C/N``, run at once;
* the upstream directly at ``-c C``.

::

    python bench/relay_ceiling.py                 # C=16, N=2, 5 rounds of 5 s
    python bench/relay_ceiling.py --concurrency 64

Each process has its own books, scheduler and in-flight counts, so this is
an upper bound: real workers would also pay for lease credits and for
sending their books to the main process.  Ports are ephemeral and on
loopback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchutil import free_ports, stop_process, twistd_argv, wait_ok
from cpu_per_request import LUA, upstream_cmd, wrk

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"model":"m1","messages":[]}'


def config_text(upstream_port: int, start_port: int) -> str:
    # ``sleep`` stands in for the model's server: the upstream is shared.
    return (
        f"healthCheckTimeout: 30\nlogLevel: warn\nstartPort: {start_port}\n"
        "models:\n  m1:\n    cmd: sleep 1000000\n"
        f"    proxy: http://127.0.0.1:{upstream_port}\n"
        "    checkEndpoint: /health\n    concurrencyLimit: 256\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed (apt-get install wrk)")
    if args.concurrency % args.processes:
        raise SystemExit("--concurrency must be a multiple of --processes")

    work = Path(tempfile.mkdtemp(prefix="llamaswap-ceiling-"))
    lua = work / "post.lua"
    lua.write_text(LUA)
    ports = free_ports(1 + 2 * args.processes)
    upstream_port, proxy_ports = ports[0], ports[1 : 1 + args.processes]
    upstream_argv = shlex.split(upstream_cmd().replace("${PORT}", str(upstream_port)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = (work / "log").open("wb")
    procs = [subprocess.Popen(upstream_argv, stdout=log, stderr=subprocess.STDOUT, env=env)]
    try:
        for i, port in enumerate(proxy_ports):
            home = work / f"p{i}"
            home.mkdir()
            config = home / "config.yaml"
            config.write_text(config_text(upstream_port, ports[1 + args.processes + i]))
            procs.append(
                subprocess.Popen(
                    twistd_argv(config, port),
                    cwd=home,
                    env={**env, "HOME": str(home)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        urls = [f"http://127.0.0.1:{port}/v1/chat/completions" for port in proxy_ports]
        direct = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
        for url in urls:
            wait_ok(url, BODY)
            wrk(url, args.concurrency, 2, lua)  # warm-up
        share = args.concurrency // args.processes
        one: list[float] = []
        many: list[float] = []
        direct_rps: list[float] = []
        with ThreadPoolExecutor(args.processes) as pool:
            for k in range(1, args.rounds + 1):
                one.append(wrk(urls[0], args.concurrency, args.duration, lua)["rps"])
                results = pool.map(lambda u: wrk(u, share, args.duration, lua)["rps"], urls)
                many.append(sum(results))
                direct_rps.append(wrk(direct, args.concurrency, args.duration, lua)["rps"])
                print(
                    f"round {k}: one process {one[-1]:,.0f} req/s, "
                    f"{args.processes} processes {many[-1]:,.0f} "
                    f"({many[-1] / one[-1]:.2f}x), direct {direct_rps[-1]:,.0f}",
                    flush=True,
                )
        ratios = [m / o for m, o in zip(many, one, strict=True)]
        print(
            f"c{args.concurrency}: one process median {statistics.median(one):,.0f} req/s "
            f"({statistics.median(one) / statistics.median(direct_rps):.3f}x direct); "
            f"{args.processes} processes {statistics.median(many):,.0f} "
            f"({statistics.median(many) / statistics.median(direct_rps):.3f}x direct); "
            f"gain per round {min(ratios):.2f}-{max(ratios):.2f}x, "
            f"median {statistics.median(ratios):.2f}x"
        )
    finally:
        for proc in reversed(procs):
            stop_process(proc, 60)
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
