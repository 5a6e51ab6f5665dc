#!/usr/bin/env python3
"""What reading one streamed request costs llamaswap, cold, as users run it.

The yardstick's streaming TTFT is paid mostly on the request path: from the
read that brings a request to the send that hands it to the model's server.
That path runs once per request, after the 200 ms stream before it, so it
runs cold, and what it costs then follows how many distinct functions and
objects it touches rather than any one step.  This script measures that
path in ``twistd -n llamaswap`` (default config, the yardstick's fast
upstream as model) under the yardstick's streaming client::

    python bench/request_path.py              # 30 streams of 200 chunks, 1 ms apart
    python bench/request_path.py --top 40     # more of the profile

It runs llamaswap twice.  In the first run, each read of a client connection
is timed (no profiler), and so is the bookkeeping that follows a finished
response (activity row, access line).  In the second run, cProfile is
switched on for exactly those reads.  It prints:

- per request read: the wall time (p50, cold), the Python calls and the
  distinct functions touched (deterministic counts);
- the bookkeeping's wall time;
- the functions with the most self time (profiled, so inflated).

Ports are ephemeral; it needs the shared yardstick (``../shared/perf``).
Since the early path (``llamaswap/web/early.py``) a read yields the core to
the upstream it woke: its wall time includes the upstream's run.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchutil import free_ports, shared_perf_dir, twistd_argv, wait_ok, yardstick_config

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def install(out: str, profile: bool) -> None:
    """Inside llamaswap: time (and with ``profile``, profile) every read of
    a client connection and every run of after-flush bookkeeping; write the
    figures to ``out`` when the reactor shuts down.  ``SIGUSR2`` forgets
    what was measured so far (the start-up and warm-up requests)."""
    import cProfile
    import signal
    import time

    from twisted.internet import reactor, tcp

    from llamaswap.core import twistedweb

    prof = cProfile.Profile()
    reads: list[int] = []
    bookkeeping: list[int] = []
    read = twistedweb._WriteFlusher.read
    run_calls = twistedweb._run_calls

    def timed_read(self: object, do_read: object) -> object:
        if not isinstance(getattr(do_read, "__self__", None), tcp.Server):
            return read(self, do_read)
        start = time.perf_counter_ns()
        if profile:
            prof.enable()
        try:
            return read(self, do_read)
        finally:
            if profile:
                prof.disable()
            reads.append(time.perf_counter_ns() - start)

    def timed_calls(calls: object) -> None:
        calls = list(calls)  # type: ignore[call-overload]
        if not calls:
            return
        start = time.perf_counter_ns()
        try:
            run_calls(calls)
        finally:
            bookkeeping.append(time.perf_counter_ns() - start)

    def forget(*_: object) -> None:
        reads.clear()
        bookkeeping.clear()
        prof.clear()

    def dump() -> None:
        if profile:
            prof.dump_stats(out + ".prof")
        Path(out).write_text(json.dumps({"reads": reads, "bookkeeping": bookkeeping}))

    twistedweb._WriteFlusher.read = timed_read  # type: ignore[method-assign,assignment]
    twistedweb._run_calls = timed_calls
    signal.signal(signal.SIGUSR2, forget)
    reactor.addSystemEventTrigger("before", "shutdown", dump)


def run_once(perf: Path, work: Path, profile: bool, streams: int, chunks: int) -> Path:
    port, start_port = free_ports(2)
    config = work / "config.yaml"
    config.write_text(
        yardstick_config(
            f"{sys.executable} {perf / 'fast_upstream.py'} --port ${{PORT}}", start_port
        )
    )
    out = work / ("profiled.json" if profile else "timed.json")
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import request_path; "
        f"request_path.install({str(out)!r}, {profile!r}); "
        "from twisted.scripts.twistd import run; run()"
    )
    proc = subprocess.Popen(
        twistd_argv(config, port, code=code),
        cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=(work / "llamaswap.log").open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ok(f"{base}/v1/chat/completions", b'{"model":"m1","messages":[]}')
        # The stream client's own warm-up streams, then forget all that.
        subprocess.run(
            [
                sys.executable, str(perf / "stream_client.py"), "--url", base, "--model", "m1",
                "--n", "1", "--warmup", "2", "--chunks", str(chunks), "--delay-ms", "1",
            ],
            check=True, timeout=600, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        proc.send_signal(signal.SIGUSR2)
        subprocess.run(
            [
                sys.executable, str(perf / "stream_client.py"), "--url", base, "--model", "m1",
                "--n", str(streams), "--warmup", "0", "--chunks", str(chunks),
                "--delay-ms", "1",
            ],
            check=True, timeout=600, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--streams", type=int, default=30)
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--perf-dir", help="the shared yardstick (default ../shared/perf)")
    args = ap.parse_args()
    perf = shared_perf_dir(args.perf_dir)
    work = Path(tempfile.mkdtemp(prefix="llamaswap-path-"))

    timed = json.loads(run_once(perf, work, False, args.streams, args.chunks).read_text())
    profiled = run_once(perf, work, True, args.streams, args.chunks)
    stats = pstats.Stats(str(profiled) + ".prof")
    # One read per request on the client's keep-alive connection, and one
    # more when it closes (the fastest; its few calls count in the totals).
    requests = args.streams
    request_reads = sorted(timed["reads"])[-requests:]
    total_calls = stats.total_calls  # type: ignore[attr-defined]
    # functions every request read calls (at least ~once per request)
    touched = sum(1 for v in stats.stats.values() if v[1] >= 0.9 * requests)  # type: ignore[attr-defined]
    print(f"request reads: {requests} (streams of {args.chunks} chunks, 1 ms apart)")
    print(
        f"  wall time p50 {statistics.median(request_reads) / 1000:.0f} µs "
        f"(min {request_reads[0] / 1000:.0f}, max {request_reads[-1] / 1000:.0f}), no profiler"
    )
    print(f"  Python calls per request read: {total_calls / requests:.0f}")
    print(f"  distinct functions every request read calls: {touched}")
    if timed["bookkeeping"]:
        book = sorted(timed["bookkeeping"])
        print(
            f"bookkeeping after a response (activity row, access line): "
            f"p50 {statistics.median(book) / 1000:.0f} µs over {len(book)}"
        )
    print("\nmost self time per request read (profiled, µs; calls):")
    rows = sorted(
        ((v[2] / requests * 1e6, v[1] / requests, k) for k, v in stats.stats.items()),  # type: ignore[attr-defined]
        reverse=True,
    )
    for self_us, calls, (path, line, name) in rows[: args.top]:
        where = "builtin" if path == "~" else f"{Path(path).name}:{line}"
        print(f"  {self_us:7.1f}  {calls:5.1f}  {where} {name}")
    print(f"\nkept: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
