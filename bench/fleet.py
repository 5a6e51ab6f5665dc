"""Requests/s through a fleet, and the failover gap (issue 15).

Builds the simulated fleet of ``tests/test_fleet.py`` on this machine (three
model hosts and two fronts, each a llamaswap on its own loopback address,
HAProxy in front; demo upstreams answering at once) and measures, with the
load generator (``bench/loadgen.py``) in its own process:

* small non-streaming chat completions at concurrency 16 straight at one
  model host (one node alone), then through HAProxy + front + host;
* the failover gap: a client sends requests for a model three hosts serve,
  one after the other, through HAProxy; a host serving it is killed
  (SIGKILL, with its upstreams); the gap is the longest time between two
  successful answers around the kill, and the failed requests are counted.
  Once with a replica that has the model loaded (warm), once with one that
  must load it first (cold: the gap is the demo's load time).

    python bench/fleet.py               # about 40 s
    python bench/fleet.py --duration 3  # shorter load phases
    python bench/fleet.py --json out.json

Needs ``haproxy`` (Debian package).  Everything runs on 2 shared cores here:
the figures compare paths on the same machine, not machines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))

import treq  # noqa: E402
from twisted.internet import defer, task, utils  # noqa: E402
from twisted.web.client import HTTPConnectionPool  # noqa: E402

from tests.fleetsupport import HAPROXY, Fleet  # noqa: E402

HOSTS = {
    "127.0.0.2": {"alpha": 0, "shared": 0},
    "127.0.0.3": {"beta": 0, "shared": 0},
    "127.0.0.4": {"gamma": 0, "shared": 0},
}
FRONTS = ["127.0.0.5", "127.0.0.6"]
BALANCER = "127.0.0.7"
MESSAGES = [{"role": "user", "content": "hi"}]


def body(model: str) -> str:
    return json.dumps({"model": model, "messages": MESSAGES, "max_tokens": 8})


async def loadgen(url: str, model: str, concurrency: int, seconds: float) -> dict[str, Any]:
    out = await utils.getProcessOutput(
        sys.executable,
        [
            str(BENCH_DIR / "loadgen.py"),
            "--url",
            url + "/v1/chat/completions",
            "--body",
            body(model),
            "-c",
            str(concurrency),
            "-d",
            str(seconds),
        ],
        errortoo=False,
    )
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def failover_gap(fleet: Fleet, reactor: Any, victim: str) -> dict[str, Any]:
    """Sequential requests for ``shared`` through the balancer for 3 s; the
    host ``victim`` is killed after one second."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    served_by: dict[str, int] = {}
    successes: list[float] = []
    failures = 0
    killed_at: float | None = None
    start = reactor.seconds()
    while reactor.seconds() - start < 3:
        if killed_at is None and reactor.seconds() - start > 1:
            fleet.kill(victim)
            killed_at = reactor.seconds()
        try:
            response = await treq.post(
                fleet.url + "/v1/chat/completions",
                data=body("shared").encode(),
                headers={b"content-type": [b"application/json"]},
                pool=pool,
            )
            text = (await response.content()).decode()
        except Exception:
            failures += 1
            continue
        if response.code != 200:
            failures += 1
            continue
        content = json.loads(text)["choices"][0]["message"]["content"]
        host = content.split("]", 1)[0].lstrip("[")
        served_by[host] = served_by.get(host, 0) + 1
        successes.append(reactor.seconds())
    await pool.closeCachedConnections()
    assert killed_at is not None
    around = [t for t in successes if killed_at - 0.5 <= t]
    gaps = [b - a for a, b in zip(around, around[1:], strict=False)]
    before = sorted(b - a for a, b in zip(successes, successes[1:], strict=False) if b < killed_at)
    return {
        "killed_host": victim,
        "served_by": served_by,
        "failed_requests": failures,
        "gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
        "normal_interval_ms": round(before[len(before) // 2] * 1000, 2) if before else None,
    }


async def run(reactor: Any, args: argparse.Namespace) -> None:
    if HAPROXY is None:
        raise SystemExit("bench/fleet.py needs haproxy (apt-get install haproxy)")
    fleet = Fleet(HOSTS, FRONTS, BALANCER, balance="leastconn")
    await fleet.start()
    results: dict[str, Any] = {}
    try:
        host_url = f"http://127.0.0.2:{fleet.port}"
        # load the models on their hosts first
        for model in ("alpha", "shared"):
            await loadgen(host_url, model, 1, 0.5)
        await loadgen(fleet.url, "alpha", 4, 0.5)
        one = await loadgen(host_url, "alpha", args.concurrency, args.duration)
        through = await loadgen(fleet.url, "alpha", args.concurrency, args.duration)
        results["one_node"] = {k: one[k] for k in ("rps", "errors", "latency_ms")}
        results["haproxy_front_host"] = {k: through[k] for k in ("rps", "errors", "latency_ms")}
        # Warm replica: "shared" loaded on 127.0.0.2 and 127.0.0.3 (not .4);
        # the fronts spread it over both, .2 is killed, .3 takes it all.
        await loadgen(f"http://127.0.0.3:{fleet.port}", "shared", 1, 0.5)
        await task.deferLater(reactor, 1.5, lambda: None)  # the fronts' probes see it loaded
        results["failover_warm_replica"] = await failover_gap(fleet, reactor, "127.0.0.2")
        # Cold replica: .3 is killed; .4 must load "shared" first.
        await task.deferLater(reactor, 1.0, lambda: None)
        results["failover_cold_replica"] = await failover_gap(fleet, reactor, "127.0.0.3")
    finally:
        await fleet.stop()
    results["concurrency"] = args.concurrency
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load phase")
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
