"""What a swap through llamaswap costs over the upstream server's own start.

1. Direct: start the demo upstream by hand N times and time spawn -> first
   ``/health`` 200 (polled every millisecond): the server's own start time.
2. Through llamaswap: two demo models that cannot run together; alternate
   requests A, B, A, B... so every request swaps: stop the other model, start
   this one, wait until healthy, answer.  Time each request.

The difference of the medians is what llamaswap adds to a swap (llama-swap,
Go, adds about 165 ms: a 250 ms first health-check delay and 1 s polls).

    python bench/swap_overhead.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import demo_argv, free_ports  # noqa: E402


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def direct_start_times(rounds: int, env: dict[str, str]) -> tuple[list[float], list[float]]:
    """The demo upstream's own start (spawn -> healthy) and stop (SIGTERM -> exit) times."""
    times, stops = [], []
    for _ in range(rounds):
        port = free_ports(1)[0]
        started = time.perf_counter()
        child = subprocess.Popen(
            demo_argv(port, "direct"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = started + 30
        try:
            while not healthy(f"http://127.0.0.1:{port}/health"):
                if time.perf_counter() > deadline:
                    raise RuntimeError("demo upstream did not become healthy")
                time.sleep(0.001)
            times.append(time.perf_counter() - started)
        finally:
            stopping = time.perf_counter()
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=10)
            stops.append(time.perf_counter() - stopping)
    return times, stops


def chat(url: str, model: str) -> float:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    ).encode()
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
    return time.perf_counter() - started


def swap_times(rounds: int, env: dict[str, str]) -> tuple[list[float], list[float]]:
    ports = {"a": free_ports(1)[0], "b": free_ports(1)[0]}
    config = {
        "healthCheckTimeout": 30,
        "models": {
            name: {"cmd": " ".join(demo_argv(port, name)), "proxy": f"http://127.0.0.1:{port}"}
            for name, port in ports.items()
        },
    }
    listen = free_ports(1)[0]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(config, f)
    server = subprocess.Popen(
        [sys.executable, "-m", "llamaswap", "-c", f.name, "--listen", f"127.0.0.1:{listen}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO_ROOT,
    )
    url = f"http://127.0.0.1:{listen}"
    try:
        deadline = time.perf_counter() + 30
        while not healthy(url + "/health"):
            if time.perf_counter() > deadline:
                raise RuntimeError("llamaswap did not start")
            time.sleep(0.01)
        chat(url, "a")  # warm up: first start, imports cached by the OS
        swaps, warm = [], []
        for i in range(rounds):
            model = "b" if i % 2 == 0 else "a"
            swaps.append(chat(url, model))
            warm.append(chat(url, model))
        return swaps, warm
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        os.unlink(f.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    direct, stops = direct_start_times(args.rounds, env)
    swaps, warm = swap_times(args.rounds, env)
    own = statistics.median(direct)
    own_stop = statistics.median(stops)
    swap = statistics.median(swaps)
    served = statistics.median(warm)
    print(f"upstream's own start (spawn -> healthy), median of {len(direct)}: {own * 1000:8.1f} ms")
    print(f"upstream's own stop (SIGTERM -> exit), median:          {own_stop * 1000:8.1f} ms")
    print(f"request that swaps models through llamaswap, median:    {swap * 1000:8.1f} ms")
    print(f"same request to the loaded model, median:               {served * 1000:8.1f} ms")
    print(
        f"swap overhead = swap - own start - own stop - served:  "
        f"{(swap - own - own_stop - served) * 1000:8.1f} ms   (llama-swap: ~165 ms)"
    )


if __name__ == "__main__":
    main()
