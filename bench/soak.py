"""Soak: streaming clients with random disconnects while models swap.

``twistd -n llamaswap`` runs three demo models that cannot run together, so
every change of the model the clients ask for is a swap.  ``--clients``
concurrent clients send streaming chat requests in a loop; each client drops
a share of its requests mid-stream (``--disconnect``).  The model asked for
changes every ``--swap-every`` seconds.  The run reports:

* requests sent, completed, dropped by the client, and *lost*: a request that
  was not dropped by its client but got no complete answer, or an answer
  twice (``[DONE]`` more than once, a second status line);
* llamaswap's RSS and open file descriptors, sampled every second: peak, and
  the first and last minute's means (flat means no growth per request);
* in-flight entries left after the run (``GET /api/inflight``) and children
  left after SIGTERM (orphans).

    python bench/soak.py --duration 600            # the README's figures
    python bench/soak.py --duration 30 --clients 8 # a smoke run

The exit status is non-zero when anything was lost, stranded or orphaned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from llamaswap.service.tap import free_port_block  # noqa: E402

MODELS = ("soak-a", "soak-b", "soak-c")


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    dropped: int = 0
    refused: dict[int, int] = field(default_factory=dict)  # status -> count (429, 503…)
    lost: list[str] = field(default_factory=list)


def write_config(directory: str, tokens_per_second: int, start_port: int) -> str:
    demo = f"{sys.executable} -m llamaswap.demo --host 127.0.0.1 --port ${{PORT}}"
    models = {
        name: {
            "cmd": f"{demo} --model {name} --startup-delay 0.2"
            f" --tokens-per-second {tokens_per_second} --max-tokens-default 64",
            "concurrencyLimit": 256,
        }
        for name in MODELS
    }
    path = os.path.join(directory, "soak.yaml")
    with open(path, "w") as f:
        # Its own ports for the models, not the default startPort (5800) that
        # anything else running here may use too.
        json.dump({"healthCheckTimeout": 30, "startPort": start_port, "models": models}, f)
    return path


async def one_request(port: int, model: str, drop_after: int | None, tally: Tally) -> None:
    body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "soak"}]}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    tally.sent += 1
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        received = b""
        while True:
            data = await asyncio.wait_for(reader.read(65536), timeout=120)
            if not data:
                break
            received += data
            if drop_after is not None and received.count(b"data: ") >= drop_after:
                tally.dropped += 1
                return  # the client goes away mid-stream
        status_lines = received.count(b"HTTP/1.1 ")
        status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1 ") else 0
        if status_lines != 1:
            tally.lost.append(f"{model}: {status_lines} status lines")
        elif status == 200:
            if received.count(b"data: [DONE]") == 1:
                tally.completed += 1
            else:
                tally.lost.append(f"{model}: {received.count(b'data: [DONE]')} [DONE] in a 200")
        else:
            tally.refused[status] = tally.refused.get(status, 0) + 1
    except TimeoutError:
        tally.lost.append(f"{model}: no end within 120 s")
    finally:
        writer.close()


async def client(port: int, state: dict, tally: Tally, stop_at: float, disconnect: float) -> None:
    rng = random.Random()
    while time.monotonic() < stop_at:
        drop_after = rng.randint(1, 20) if rng.random() < disconnect else None
        try:
            await one_request(port, state["model"], drop_after, tally)
        except OSError as e:
            tally.lost.append(f"connection: {e}")


async def swapper(state: dict, stop_at: float, every: float) -> None:
    index = 0
    while time.monotonic() < stop_at:
        await asyncio.sleep(every)  # a schedule, not a wait for something
        index += 1
        state["model"] = MODELS[index % len(MODELS)]
        state["swaps"] += 1


async def sampler(proc: psutil.Process, samples: list, stop_at: float) -> None:
    start = time.monotonic()
    while time.monotonic() < stop_at:
        try:
            samples.append((time.monotonic() - start, proc.memory_info().rss, proc.num_fds()))
        except psutil.Error:
            return
        await asyncio.sleep(1)


async def get_json(port: int, path: str) -> object:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(-1), timeout=10)
    writer.close()
    return json.loads(raw.partition(b"\r\n\r\n")[2])


async def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            if (await reader.read(-1)).startswith(b"HTTP/1.1 200"):
                writer.close()
                return
            writer.close()
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit("llamaswap did not come up")


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


async def run(args: argparse.Namespace) -> int:
    start_port = free_port_block(len(MODELS) + 1)
    port = start_port + len(MODELS)
    tmp = tempfile.mkdtemp(prefix="llamaswap-soak-")
    log = open(os.path.join(tmp, "llamaswap.log"), "wb")  # noqa: SIM115
    twistd = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    proc = subprocess.Popen(
        [sys.executable, "-c", twistd, "-n", "--pidfile=", "llamaswap", "-c",
         write_config(tmp, args.tokens_per_second, start_port), "--listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
        env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    me = psutil.Process(proc.pid)
    children_seen: set[int] = set()
    tally = Tally()
    samples: list[tuple[float, int, int]] = []
    state = {"model": MODELS[0], "swaps": 0}
    try:
        await wait_healthy(port, proc)
        stop_at = time.monotonic() + args.duration
        tasks = [asyncio.create_task(swapper(state, stop_at, args.swap_every))]
        tasks.append(asyncio.create_task(sampler(me, samples, stop_at)))
        tasks += [
            asyncio.create_task(client(port, state, tally, stop_at, args.disconnect))
            for _ in range(args.clients)
        ]

        async def watch_children() -> None:
            while time.monotonic() < stop_at:
                children_seen.update(c.pid for c in me.children(recursive=True))
                await asyncio.sleep(0.5)

        tasks.append(asyncio.create_task(watch_children()))
        await asyncio.gather(*tasks)
        # In-flight entries must drain to zero once the clients are gone.
        deadline = time.monotonic() + 30
        while (inflight := await get_json(port, "/api/inflight")) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        children_seen.update(c.pid for c in me.children(recursive=True))
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    deadline = time.monotonic() + 10
    while (orphans := [p for p in children_seen if psutil.pid_exists(p)
                       and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]) and (
        time.monotonic() < deadline
    ):  # fmt: skip
        await asyncio.sleep(0.1)
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)

    first = [s for s in samples if s[0] <= 60]
    last = [s for s in samples if s[0] >= samples[-1][0] - 60] if samples else []
    report = {
        "duration_s": args.duration,
        "clients": args.clients,
        "swaps": state["swaps"],
        "sent": tally.sent,
        "completed": tally.completed,
        "dropped_by_client": tally.dropped,
        "refused": tally.refused,
        "lost": len(tally.lost),
        "inflight_left": len(inflight) if isinstance(inflight, list) else inflight,
        "orphans": len(orphans),
        "rss_mib_peak": round(max((s[1] for s in samples), default=0) / 2**20, 1),
        "rss_mib_first_minute": round(mean([s[1] for s in first]) / 2**20, 1),
        "rss_mib_last_minute": round(mean([s[1] for s in last]) / 2**20, 1),
        "fds_first_minute": round(mean([s[2] for s in first]), 1),
        "fds_last_minute": round(mean([s[2] for s in last]), 1),
        "fds_peak": max((s[2] for s in samples), default=0),
        "rss_mib_each_minute": [
            round(s[1] / 2**20, 1) for s in samples if int(s[0]) % 60 == 0 and s[0] >= 1
        ],
    }
    for key, value in report.items():
        print(f"{key:22} {value}")
    for example in tally.lost[:10]:
        print("  lost:", example)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    bad = tally.lost or report["inflight_left"] or orphans
    print("log:", os.path.join(tmp, "llamaswap.log"))
    return 1 if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    parser.add_argument("--swap-every", type=float, default=3, help="seconds per model (3)")
    parser.add_argument("--disconnect", type=float, default=0.2, help="share dropped (0.2)")
    parser.add_argument("--tokens-per-second", type=int, default=400, help="demo speed (400)")
    parser.add_argument("--json", help="also write the report here")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
