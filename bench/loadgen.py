"""A lean HTTP/1.1 keep-alive load generator for the llamaswap benchmarks.

It runs as its own process so its CPU use is not mixed with the proxy's or
the upstream's.  Each of ``--concurrency`` connections is an asyncio
protocol that writes one pre-encoded request, parses the reply just enough
to find its end (``Content-Length``, chunked framing, or connection close)
and immediately writes the next one, so there is no task switching per
request.  The result is one JSON object on stdout::

    python bench/loadgen.py --url http://127.0.0.1:8080/v1/chat/completions \\
        --body '{"model":"bench","messages":[{"role":"user","content":"hi"}]}' \\
        --concurrency 16 --duration 5 --warmup 1

With ``--use-wrk`` and ``wrk`` on the PATH, wrk does the measuring instead
(driven by a small Lua script); the JSON has the same shape, without time to
first byte and without raw samples.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

PERCENTILES = (50.0, 90.0, 99.0)

# --------------------------------------------------------------------------
# Requests and results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where to connect and the exact bytes of one request."""

    host: str
    port: int
    request: bytes


def build_target(url: str, body: bytes, method: str = "POST") -> Target:
    """Parse ``url`` and pre-encode the request sent over and over."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http://host:port/path URLs are supported: {url!r}")
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {parts.hostname}:{port}",
        "User-Agent: llamaswap-loadgen",
        "Accept: */*",
    ]
    if body or method in ("POST", "PUT", "PATCH"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return Target(parts.hostname, port, head + body)


@dataclass
class Samples:
    """What the connections record while a phase is measured."""

    latencies: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    body_bytes: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    connects: int = 0

    def record(self, status: int, started: float, first: float, done: float, size: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if not 200 <= status < 300:
            self.errors += 1
            return
        self.latencies.append(done - started)
        self.ttfb.append(first - started)
        self.body_bytes += size


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Percentiles, mean, min and max of durations, in milliseconds."""
    ordered = sorted(s * 1000.0 for s in seconds)
    if not ordered:
        return {"count": 0}
    summary: dict[str, float] = {"count": len(ordered)}
    for pct in PERCENTILES:
        summary[f"p{pct:g}"] = round(percentile(ordered, pct), 4)
    summary["mean"] = round(sum(ordered) / len(ordered), 4)
    summary["min"] = round(ordered[0], 4)
    summary["max"] = round(ordered[-1], 4)
    return summary


# --------------------------------------------------------------------------
# Minimal HTTP/1.1 response parsing
# --------------------------------------------------------------------------

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)

# Body framing modes.
_LENGTH, _CHUNKS, _UNTIL_CLOSE = 0, 1, 2


class ResponseParser:
    """Finds where one response ends; it never copies the body out."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.in_body = False
        self.mode = _LENGTH
        self.remaining = 0
        self.close = False
        self.size = 0
        self.pos = 0

    def feed(self, data: bytes) -> bool:
        """Add bytes; true when the body has started (first byte seen)."""
        self.buffer += data
        if not self.in_body:
            return self._parse_head()
        return True

    def _parse_head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buffer[: end + 2])
        del self.buffer[: end + 4]
        self.status = int(head[9:12])
        self.close = bool(_CLOSE.search(head)) or head.startswith(b"HTTP/1.0")
        if _CHUNKED.search(head):
            self.mode = _CHUNKS
        elif (match := _CONTENT_LENGTH.search(head)) is not None:
            self.mode, self.remaining = _LENGTH, int(match.group(1))
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self.mode, self.remaining = _LENGTH, 0
        else:
            self.mode, self.close = _UNTIL_CLOSE, True
        self.in_body = True
        return True

    def complete(self) -> bool:
        """True when the response in the buffer is finished."""
        if not self.in_body:
            return False
        if self.mode == _LENGTH:
            if len(self.buffer) < self.remaining:
                return False
            self.size = self.remaining
            del self.buffer[: self.remaining]
            return True
        if self.mode == _CHUNKS:
            return self._chunks_done()
        return False

    def _chunks_done(self) -> bool:
        buf = self.buffer
        while True:
            line_end = buf.find(b"\r\n", self.pos)
            if line_end < 0:
                return False
            size = int(bytes(buf[self.pos : line_end]).split(b";", 1)[0], 16)
            if size == 0:
                trailer_end = buf.find(b"\r\n", line_end + 2)
                if trailer_end == line_end + 2:
                    del buf[: trailer_end + 2]
                    return True
                trailers = buf.find(b"\r\n\r\n", line_end)
                if trailers < 0:
                    return False
                del buf[: trailers + 4]
                return True
            chunk_end = line_end + 2 + size + 2
            if len(buf) < chunk_end:
                return False
            self.size += size
            self.pos = chunk_end

    def finish_at_close(self) -> bool:
        """At connection close: true when that ended a read-until-close body."""
        if self.in_body and self.mode == _UNTIL_CLOSE:
            self.size = len(self.buffer)
            self.buffer.clear()
            return True
        return False


# --------------------------------------------------------------------------
# The asyncio load generator
# --------------------------------------------------------------------------


class Phase:
    """Hands out requests until a count or a deadline is reached."""

    def __init__(self, requests: int | None, duration: float | None, samples: Samples) -> None:
        self.left = requests
        self.deadline = None if duration is None else time.perf_counter() + duration
        self.samples = samples
        self.started = time.perf_counter()
        self.finished = self.started

    def take(self) -> bool:
        if self.left is not None:
            if self.left <= 0:
                return False
            self.left -= 1
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return False
        return True


class Connection(asyncio.Protocol):
    """One keep-alive connection sending requests back to back.

    ``done`` resolves when the connection is no longer used: either the phase
    has no more requests (``phase_over``) or the connection was closed.
    """

    def __init__(self, target: Target, phase: Phase, done: asyncio.Future[None]) -> None:
        self.target = target
        self.phase = phase
        self.done = done
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.started = 0.0
        self.first = 0.0
        self.busy = False
        self.phase_over = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.phase.samples.connects += 1

    def send_next(self) -> None:
        """Write the next request, or report this worker done."""
        if not self.phase.take():
            self.phase_over = True
            self._finish()
            return
        self.parser.reset()
        self.busy = True
        self.first = 0.0
        self.started = time.perf_counter()
        assert self.transport is not None
        self.transport.write(self.target.request)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser.feed(data) and not self.first:
            self.first = time.perf_counter()
        if parser.complete():
            self._record()
            if parser.close:
                assert self.transport is not None
                self.transport.close()
            else:
                self.send_next()

    def _record(self) -> None:
        now = time.perf_counter()
        self.phase.samples.record(
            self.parser.status, self.started, self.first, now, self.parser.size
        )
        self.busy = False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            self.busy = False
            if self.parser.finish_at_close():
                self._record()
            else:
                self.phase.samples.errors += 1
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def run_worker(target: Target, phase: Phase) -> None:
    """Keep one connection busy until the phase ends; reconnect on close."""
    loop = asyncio.get_running_loop()
    while True:
        done: asyncio.Future[None] = loop.create_future()
        try:
            transport, conn = await loop.create_connection(
                lambda d=done: Connection(target, phase, d), target.host, target.port
            )
        except OSError:
            phase.samples.errors += 1
            if not phase.take():
                return
            await asyncio.sleep(0.05)
            continue
        conn.send_next()
        await done
        if conn.phase_over:
            transport.close()
            return


async def run_phase(
    target: Target, concurrency: int, requests: int | None, duration: float | None
) -> tuple[Samples, float]:
    """Run one phase; returns its samples and its wall-clock duration."""
    samples = Samples()
    phase = Phase(requests, duration, samples)
    started = time.perf_counter()
    await asyncio.gather(*(run_worker(target, phase) for _ in range(concurrency)))
    return samples, time.perf_counter() - started


async def run_python(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    """Warm up, then measure; the result dictionary described in the module doc."""
    if args.warmup > 0:
        await run_phase(target, args.concurrency, None, args.warmup)
    requests, duration = args.requests, args.duration
    if requests is None and duration is None:
        requests = 1000
    samples, elapsed = await run_phase(target, args.concurrency, requests, duration)
    return python_result(args, samples, elapsed)


def python_result(args: argparse.Namespace, samples: Samples, elapsed: float) -> dict[str, Any]:
    count = len(samples.latencies)
    result: dict[str, Any] = {
        "tool": "python-asyncio",
        "url": args.url,
        "concurrency": args.concurrency,
        "requests": count,
        "errors": samples.errors,
        "statuses": {str(k): v for k, v in sorted(samples.statuses.items())},
        "connects": samples.connects,
        "elapsed_s": round(elapsed, 4),
        "rps": round(count / elapsed, 2) if elapsed > 0 else 0.0,
        "body_bytes_mean": round(samples.body_bytes / count, 1) if count else 0,
        "latency_ms": summarize_ms(samples.latencies),
        "ttfb_ms": summarize_ms(samples.ttfb),
    }
    if args.raw:
        result["raw_latency_s"] = [round(x, 7) for x in samples.latencies]
        result["raw_ttfb_s"] = [round(x, 7) for x in samples.ttfb]
    return result


# --------------------------------------------------------------------------
# wrk, when asked for and installed
# --------------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
local statuses = {{}}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"non2xx":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"timeout":%d,"p50":%f,"p90":%f,"p99":%f,"mean":%f,"min":%f,"max":%f}}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.min, latency.max))
end
"""


def lua_string(text: str) -> str:
    """A Lua long-bracket string literal holding ``text``."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk_once(url: str, body: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """One wrk run; the numbers its ``done`` hook printed."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT.format(body=lua_string(body)))
    try:
        duration = f"{max(1, round(seconds))}s"
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration}", "-s", script.name, url]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[len("WRKJSON ") :])
    raise RuntimeError(f"wrk printed no summary:\n{out}")


def run_wrk(args: argparse.Namespace, body: str) -> dict[str, Any]:
    if args.warmup > 0:
        run_wrk_once(args.url, body, args.concurrency, args.warmup)
    seconds = args.duration if args.duration is not None else 5.0
    stats = run_wrk_once(args.url, body, args.concurrency, seconds)
    elapsed = stats["duration_us"] / 1e6
    errors = sum(stats[k] for k in ("non2xx", "connect", "read", "write", "timeout"))
    latency = {f"p{p:g}": round(stats[f"p{p:g}"] / 1000.0, 4) for p in PERCENTILES}
    latency.update({k: round(stats[k] / 1000.0, 4) for k in ("mean", "min", "max")})
    latency["count"] = stats["requests"]
    return {
        "tool": "wrk",
        "url": args.url,
        "concurrency": args.concurrency,
        "requests": stats["requests"],
        "errors": errors,
        "elapsed_s": round(elapsed, 4),
        "rps": round(stats["requests"] / elapsed, 2) if elapsed else 0.0,
        "latency_ms": latency,
        "ttfb_ms": {"count": 0},
    }


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="http://host:port/path to POST to")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--body", help="request body (JSON text)")
    source.add_argument("--body-file", help="file holding the request body")
    parser.add_argument("-c", "--concurrency", type=positive_int, default=1)
    parser.add_argument("-n", "--requests", type=positive_int, help="stop after N requests")
    parser.add_argument("-d", "--duration", type=float, help="stop after S seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds (0: none)")
    parser.add_argument("--raw", action="store_true", help="include every sample (seconds)")
    parser.add_argument("--use-wrk", action="store_true", help="measure with wrk if installed")
    return parser


def read_body(args: argparse.Namespace) -> str:
    if args.body_file:
        with open(args.body_file, encoding="utf-8") as handle:
            return handle.read()
    return str(args.body)


def main(argv: Sequence[str] | None = None, write: Callable[[str], Any] = sys.stdout.write) -> int:
    args = build_parser().parse_args(argv)
    body = read_body(args)
    if args.use_wrk and wrk_available():
        result = run_wrk(args, body)
    else:
        target = build_target(args.url, body.encode("utf-8"))
        result = asyncio.run(run_python(args, target))
    write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
