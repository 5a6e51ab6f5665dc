#!/usr/bin/env python3
"""CPU time llamaswap spends per proxied request, robust to a busy machine.

Wall-clock figures (req/s, latency) move with whatever else runs on the
cores; the CPU seconds the ``twistd`` process itself burns per request do not
(much).  This script starts the fast upstream (the shared yardstick's
``fast_upstream.py`` when present, else the packaged demo) as a model of a
default-config ``twistd -n llamaswap`` (activity, captures, access log and
Prometheus all on), drives it with ``wrk`` at a fixed concurrency, and reads
the process's user+system CPU time from ``/proc`` before and after::

    python bench/cpu_per_request.py                  # c=16, 5 s, 3 rounds
    python bench/cpu_per_request.py --profile prof   # also py-spy: prof.txt

``--profile`` samples the process with ``py-spy`` (if installed) during one
extra round and writes the inclusive share of the top functions; shares of
samples do not depend on the machine's load either.  Ports are ephemeral.
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import stop_process, twistd_argv, wait_ok, yardstick_config

ROOT = Path(__file__).resolve().parent.parent
SHARED_UPSTREAM = Path("/work/shared/perf/fast_upstream.py")
LUA = """
local model = os.getenv("WRK_MODEL") or "m1"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
done = function(summary, latency, requests)
  io.write(string.format("ANCHOR reqs=%d rps=%.1f p50_ms=%.3f p99_ms=%.3f non2xx=%d errors=%d\\n",
    summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def upstream_cmd() -> str:
    if SHARED_UPSTREAM.exists():
        return f"{sys.executable} {SHARED_UPSTREAM} --port ${{PORT}}"
    return f"{sys.executable} -m llamaswap.demo --port ${{PORT}} --model m1 --tokens-per-second 0"


def wrk(url: str, concurrency: int, duration: float, lua: Path) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{int(duration)}s",
            "--timeout",
            "10s",
            "-s",
            str(lua),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "WRK_MODEL": "m1"},
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("ANCHOR"))
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}


def summarize_profile(raw: Path, out: Path, top: int = 45) -> None:
    """Inclusive share of samples per function from py-spy's collapsed stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] += n
        if frames:
            own[frames[-1]] += n
    lines = [f"{total} samples\n", "inclusive%  self%  function"]
    for name, n in inclusive.most_common(top):
        lines.append(f"{100 * n / total:9.1f}  {100 * own[name] / total:5.1f}  {name}")
    lines.append("\ntop self:")
    for name, n in own.most_common(25):
        lines.append(f"{100 * n / total:9.1f}  {name}")
    out.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--calls",
        action="store_true",
        help="count Python function calls per request (cProfile; load-independent)",
    )
    ap.add_argument("--ttft", action="store_true", help="also the yardstick's streaming TTFT")
    ap.add_argument("--profile", metavar="PREFIX", help="py-spy one more round into PREFIX.txt")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, log)")
    ap.add_argument(
        "--config-extra",
        default="",
        metavar="YAML",
        help="top-level config lines to add (what a feature costs), e.g. 'captureBuffer: 0'",
    )
    ap.add_argument(
        "--root", default=str(ROOT), help="checkout whose llamaswap is measured (A/B runs)"
    )
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="llamaswap-cpu-"))
    lua = work / "post.lua"
    lua.write_text(LUA)
    port = free_port()
    start_port = free_port()
    config = work / "config.yaml"
    config.write_text(
        yardstick_config(upstream_cmd(), start_port, extra=args.config_extra.replace("\\n", "\n"))
    )
    env = {**os.environ, "PYTHONPATH": args.root}
    log = (work / "llamaswap.log").open("wb")

    def start(profile: Path | None = None) -> subprocess.Popen[bytes]:
        profiling = (
            [f"--profile={profile}", "--profiler=cprofile", "--savestats"] if profile else []
        )
        return subprocess.Popen(
            twistd_argv(config, port, twistd_options=tuple(profiling)),
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    idle_calls = 0
    if args.calls:
        # Calls made by start-up and shut-down alone, to subtract.
        idle = start(work / "idle.prof")
        wait_ok(f"http://127.0.0.1:{port}/health")
        wait_ok(f"http://127.0.0.1:{port}/v1/chat/completions", b'{"model":"m1","messages":[]}')
        stop_process(idle, 60)
        idle_calls = pstats.Stats(str(work / "idle.prof")).total_calls  # type: ignore[attr-defined]
    proc = start(work / "load.prof" if args.calls else None)
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1/chat/completions"
    try:
        wait_ok(f"{base}/health")
        wait_ok(url, b'{"model":"m1","messages":[]}')
        total_reqs = wrk(url, args.concurrency, 2, lua)["reqs"]  # warm-up
        per_req: list[float] = []
        for _ in range(args.rounds):
            before = cpu_seconds(proc.pid)
            result = wrk(url, args.concurrency, args.duration, lua)
            used = cpu_seconds(proc.pid) - before
            total_reqs += result["reqs"]
            per_req.append(used / result["reqs"] * 1e6)
            print(
                f"c={args.concurrency} reqs={int(result['reqs'])} cpu_s={used:.2f} "
                f"cpu_us_per_req={per_req[-1]:.0f} rps={result['rps']:.0f} "
                f"p50_ms={result['p50_ms']:.3f} p99_ms={result['p99_ms']:.3f} non2xx={int(result['non2xx'])} "
                f"errors={int(result['errors'])}",
                flush=True,
            )
        print(f"CPU median_us_per_req={statistics.median(per_req):.0f}")
        stream_client = SHARED_UPSTREAM.parent / "stream_client.py"
        if args.ttft and stream_client.exists():
            # The yardstick's streaming B: 200 chunks 1 ms apart, time to first token.
            out = subprocess.run(
                [
                    sys.executable,
                    str(stream_client),
                    "--url",
                    base,
                    "--model",
                    "m1",
                    "--n",
                    "20",
                    "--chunks",
                    "200",
                    "--delay-ms",
                    "1",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            print(out)
        if args.profile:
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            raw = Path(args.profile + ".raw")
            prof = subprocess.Popen(
                [
                    spy,
                    "record",
                    "-p",
                    str(proc.pid),
                    "-d",
                    str(int(args.duration) + 1),
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            wrk(url, args.concurrency, args.duration, lua)
            prof.wait()
            summarize_profile(raw, Path(args.profile + ".txt"))
            print(f"profile: {args.profile}.txt")
        if args.calls:
            stop_process(proc, 60)
            calls = pstats.Stats(str(work / "load.prof")).total_calls  # type: ignore[attr-defined]
            print(
                f"CALLS python_calls_per_req={(calls - idle_calls) / total_reqs:.0f}"
                f" (deterministic: cProfile's call count, start-up subtracted)"
            )
    finally:
        if proc.poll() is None:
            stop_process(proc, 60)
        log.close()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
