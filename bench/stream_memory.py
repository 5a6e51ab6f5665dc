"""Memory and throughput of llamaswap while it relays very large responses.

One run starts llamaswap (a subprocess) with a one-model config whose model
is a tiny, fast upstream written by this script (a raw Twisted protocol with
a push producer, so it is never the bottleneck), then reads large responses
with a raw socket loop that counts bytes and keeps none of them:

* ``sse``: ``POST /v1/chat/completions`` with ``"stream": true``, a
  ``text/event-stream`` body of ~200-byte chat chunks, ending with a
  usage/timings event and ``data: [DONE]``;
* ``json``: the same path without streaming, one huge ``application/json``
  body whose ``usage`` and ``timings`` come at the very end.

For every size, once straight from the upstream and once through llamaswap,
while a thread samples llamaswap's ``VmRSS``/``VmHWM`` every 50 ms.  It
reports llamaswap's RSS growth (goal: under 50 MB and flat in response size),
the relay throughput against the direct read, checks the activity row (the
token counts of the final usage event), and runs one slow client (~5 MB/s for
5 s) to show that backpressure keeps RSS flat.

    python bench/stream_memory.py            # 50 MB and 500 MB, about 1-2 min
    python bench/stream_memory.py --quick    # 20 MB and 100 MB
    python bench/stream_memory.py --json out.json

See ``bench/README.md`` for what the figures mean.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from benchutil import free_ports, port_in_use, stop_process  # noqa: E402

MODEL = "bench"
CHAT_PATH = "/v1/chat/completions"
MB = 1_000_000  # sizes, throughput and RSS are all in decimal megabytes
GOAL_GROWTH_MB = 50.0
SAMPLE_INTERVAL_S = 0.05
STARTUP_DEADLINE_S = 60.0
STOP_DEADLINE_S = 15.0
TRANSFER_TIMEOUT_S = 120.0
SLOW_RATE = 5 * MB
SLOW_SECONDS = 5.0
WARMUP_BYTES = 5 * MB
RECV_BUFFER = 1 << 20

# --------------------------------------------------------------------------
# The upstream: written to a temp file and started by llamaswap as `cmd`
# --------------------------------------------------------------------------

UPSTREAM_SOURCE = r'''
"""A fast fake inference server for bench/stream_memory.py (generated)."""
import argparse
import json
import sys
import time

from twisted.internet import reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

WRITE_TARGET = 64 * 1024  # bytes handed to the transport per write
FILLER = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod "
RESPONSES = []  # one dict per chat response, for GET /stats


def sse_event(content):
    event = {
        "choices": [{"finish_reason": None, "index": 0, "delta": {"content": content}}],
        "created": 1730000000,
        "id": "chatcmpl-benchstreammemory0123456789",
        "model": "bench",
        "system_fingerprint": "b4000-bench",
        "object": "chat.completion.chunk",
    }
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def make_event(size):
    """One SSE chat chunk of exactly `size` bytes."""
    base = len(sse_event(""))
    text = (FILLER * (size // len(FILLER) + 1)).decode()
    return sse_event(text[: max(0, size - base)])


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def usage_objects(prompt, completion):
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": prompt + completion}
    timings = {"prompt_n": prompt, "prompt_ms": 12.5, "predicted_n": completion,
               "predicted_ms": 1000.0, "predicted_per_second": completion / 1.0}
    return usage, timings


class Plan:
    """The pieces of one response: a head, then repeated blocks, then a tail."""

    def __init__(self, head, block, count, tail, body_bytes, completion):
        self.head, self.block, self.count, self.tail = head, block, count, tail
        self.body_bytes, self.completion = body_bytes, completion

    def pieces(self):
        yield self.head
        block = self.block
        for _ in range(self.count):
            yield block
        yield self.tail


def sse_plan(size, prompt, event_size, events_per_chunk):
    event = make_event(event_size)
    framed = chunk(event * events_per_chunk)
    per_write = max(1, WRITE_TARGET // len(framed))
    block = framed * per_write
    events_per_block = events_per_chunk * per_write
    usage_probe = usage_objects(prompt, 10**9)
    tail_events_len = len(final_events(*usage_probe))
    events = max(1, (size - tail_events_len) // len(event))
    blocks, rest = divmod(events, events_per_block)
    usage, timings = usage_objects(prompt, events)
    tail = b"".join(chunk(event * events_per_chunk)
                    for _ in range(rest // events_per_chunk))
    if rest % events_per_chunk:
        tail += chunk(event * (rest % events_per_chunk))
    tail += b"".join(chunk(e) for e in final_event_list(usage, timings)) + b"0\r\n\r\n"
    body_bytes = events * len(event) + len(final_events(usage, timings))
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
            b"X-Bench-Completion-Tokens: %d\r\nX-Bench-Body-Bytes: %d\r\n\r\n"
            % (events, body_bytes))
    return Plan(head, block, blocks, tail, body_bytes, events)


def final_event_list(usage, timings):
    done = {"choices": [{"finish_reason": "stop", "index": 0, "delta": {}}],
            "created": 1730000000, "id": "chatcmpl-benchstreammemory0123456789",
            "model": "bench", "object": "chat.completion.chunk",
            "usage": usage, "timings": timings}
    return [b"data: " + json.dumps(done, separators=(",", ":")).encode() + b"\n\n",
            b"data: [DONE]\n\n"]


def final_events(usage, timings):
    return b"".join(final_event_list(usage, timings))


def json_plan(size, prompt):
    block = (FILLER * (WRITE_TARGET // len(FILLER) + 1))[:WRITE_TARGET]
    completion = max(1, size // 5)  # about one token per five characters
    usage, timings = usage_objects(prompt, completion)
    head_json = (b'{"id":"chatcmpl-benchstreammemory0123456789","object":"chat.completion",'
                 b'"created":1730000000,"model":"bench","choices":[{"index":0,"message":'
                 b'{"role":"assistant","content":"')
    tail_json = (b'"},"finish_reason":"stop"}],"usage":'
                 + json.dumps(usage, separators=(",", ":")).encode()
                 + b',"timings":' + json.dumps(timings, separators=(",", ":")).encode() + b"}")
    filler = max(0, size - len(head_json) - len(tail_json))
    blocks, rest = divmod(filler, len(block))
    body_bytes = len(head_json) + filler + len(tail_json)
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n"
            b"X-Bench-Completion-Tokens: %d\r\nX-Bench-Body-Bytes: %d\r\n\r\n"
            % (body_bytes, completion, body_bytes)) + head_json
    tail = block[:rest] + tail_json
    return Plan(head, block, blocks, tail, body_bytes, completion)


@implementer(IPushProducer)
class Sender:
    """Writes a plan's pieces while the transport's buffer has room."""

    def __init__(self, transport, plan, record):
        self.transport = transport
        self.pieces = plan.pieces()
        self.record = record
        self.paused = False
        self.finished = False

    def start(self):
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        write = self.transport.write
        record = self.record
        while not self.paused and not self.finished:
            piece = next(self.pieces, None)
            if piece is None:
                self.finished = True
                record["complete"] = True
                record["ended"] = time.time()
                self.transport.unregisterProducer()
                self.transport.loseConnection()
                return
            record["sent"] += len(piece)
            write(piece)

    def pauseProducing(self):
        self.paused = True
        self.record["pauses"] += 1

    def stopProducing(self):
        if not self.finished:
            self.finished = True
            self.record["aborted"] = True
            self.record["ended"] = time.time()


class Conn(Protocol):
    def connectionMade(self):
        self.buf = b""
        self.busy = False
        self.sender = None

    def dataReceived(self, data):
        if self.busy:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 65536:
                self.transport.abortConnection()
            return
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        method, path = lines[0].split(" ")[:2]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if len(self.buf) - end - 4 < length:
            return
        body = self.buf[end + 4:end + 4 + length]
        self.busy = True
        self.respond(method, path.split("?")[0], body)

    def small(self, status, payload):
        data = json.dumps(payload).encode()
        self.transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, len(data), data))
        self.transport.loseConnection()

    def respond(self, method, path, body):
        if path == "/health":
            return self.small(b"200 OK", {"status": "ok"})
        if path == "/stats":
            return self.small(b"200 OK", {"responses": RESPONSES[-20:]})
        if method != "POST" or path != "/v1/chat/completions":
            return self.small(b"404 Not Found", {"error": "not found"})
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return self.small(b"400 Bad Request", {"error": "bad json"})
        size = int(request.get("bench_bytes", 2000))
        prompt = int(request.get("bench_prompt_tokens", 7))
        stream = bool(request.get("stream"))
        if stream:
            plan = sse_plan(size, prompt, ARGS.event_size, ARGS.events_per_chunk)
        else:
            plan = json_plan(size, prompt)
        record = {"id": len(RESPONSES) + 1, "mode": "sse" if stream else "json",
                  "prompt_tokens": prompt, "completion_tokens": plan.completion,
                  "body_bytes": plan.body_bytes, "sent": 0, "pauses": 0,
                  "complete": False, "aborted": False, "started": time.time(),
                  "ended": None}
        RESPONSES.append(record)
        self.sender = Sender(self.transport, plan, record)
        self.sender.start()

    def connectionLost(self, reason):
        if self.sender is not None and not self.sender.finished:
            self.sender.stopProducing()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--event-size", type=int, default=200)
    parser.add_argument("--events-per-chunk", type=int, default=1)
    ARGS = parser.parse_args()
    factory = Factory.forProtocol(Conn)
    factory.noisy = False
    reactor.listenTCP(ARGS.port, factory, interface=ARGS.host, backlog=128)
    print(f"bench upstream on {ARGS.host}:{ARGS.port}", file=sys.stderr, flush=True)
    reactor.run()
'''


class BenchError(RuntimeError):
    """Something the benchmark needs did not work; the message says what."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Ports, probes, processes
# --------------------------------------------------------------------------


def http_json(url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    """Status and decoded JSON body of one small request (0 on no answer)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = int(response.status)
    except urllib.error.HTTPError as error:
        raw, status = error.read(), int(error.code)
    except (OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def wait_for_200(url: str, deadline: float, body: Any = None, alive: Any = None) -> None:
    last = 0
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise BenchError(f"process exited with status {alive.returncode} while waiting")
        last, _ = http_json(url, body, timeout=max(1.0, deadline - time.monotonic()))
        if last == 200:
            return
        time.sleep(0.2)
    raise BenchError(f"{url} did not answer 200 in time (last status {last or 'none'})")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def upstream_pids(script: Path) -> list[int]:
    """Live processes running this run's upstream script."""
    pids = []
    needle = str(script).encode()
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if needle in (proc / "cmdline").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
    return pids


def wait_gone(script: Path, port: int, deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not upstream_pids(script) and not port_in_use(port):
            return True
        time.sleep(0.1)
    return not upstream_pids(script) and not port_in_use(port)


@dataclass
class Services:
    workdir: Path
    upstream_port: int
    llamaswap_port: int
    llamaswap: subprocess.Popen[bytes] | None = None
    notes: list[str] = field(default_factory=list)
    leak: bool = False

    @property
    def script(self) -> Path:
        return self.workdir / "bench_upstream.py"

    @property
    def log_path(self) -> Path:
        return self.workdir / "llamaswap.log"

    @property
    def upstream_base(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    @property
    def llamaswap_base(self) -> str:
        return f"http://127.0.0.1:{self.llamaswap_port}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def upstream_command(services: Services, events_per_chunk: int) -> list[str]:
    return [
        sys.executable,
        str(services.script),
        "--port",
        str(services.upstream_port),
        "--events-per-chunk",
        str(events_per_chunk),
    ]


def write_config(services: Services, events_per_chunk: int) -> Path:
    """A one-model config (JSON is valid YAML); captures and activity on."""
    config = {
        "healthCheckTimeout": 30,
        "logLevel": "warn",
        "captureBuffer": 5,
        "models": {
            MODEL: {
                "cmd": shlex.join(upstream_command(services, events_per_chunk)),
                "proxy": f"http://127.0.0.1:{services.upstream_port}",
                "checkEndpoint": "/health",
            }
        },
    }
    path = services.workdir / "bench.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def start_llamaswap(services: Services, events_per_chunk: int) -> None:
    services.script.write_text(UPSTREAM_SOURCE, encoding="utf-8")
    config = write_config(services, events_per_chunk)
    listen = f"127.0.0.1:{services.llamaswap_port}"
    command = [sys.executable, "-m", "llamaswap", "-c", str(config), "--listen", listen]
    with open(services.log_path, "ab") as log_file:
        services.llamaswap = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    base = services.llamaswap_base
    wait_for_200(base + "/health", deadline, alive=services.llamaswap)
    small = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    wait_for_200(base + CHAT_PATH, deadline, small, alive=services.llamaswap)
    if not port_in_use(services.upstream_port):
        raise BenchError(f"llamaswap answered but nothing listens on {services.upstream_port}")


def teardown(services: Services) -> None:
    if services.llamaswap is not None:
        services.notes.append(f"llamaswap {stop_process(services.llamaswap, STOP_DEADLINE_S)}")
    if wait_gone(services.script, services.upstream_port, 10.0):
        services.notes.append(f"upstream gone, port {services.upstream_port} free")
        return
    pids = upstream_pids(services.script)
    services.leak = True
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if wait_gone(services.script, services.upstream_port, 5.0):
            break
    state = "now stopped" if not upstream_pids(services.script) else "STILL RUNNING"
    services.notes.append(f"LEAK: upstream outlived llamaswap (pids {pids}); {state}")


@contextlib.contextmanager
def running_services(keep_logs: bool, events_per_chunk: int) -> Iterator[Services]:
    workdir = Path(tempfile.mkdtemp(prefix="llamaswap-streammem-"))
    services = Services(workdir, *free_ports(2))
    try:
        try:
            start_llamaswap(services, events_per_chunk)
        except BenchError as error:
            raise BenchError(
                f"{error}\n--- llamaswap log tail ---\n{services.log_tail()}"
            ) from None
        yield services
    finally:
        teardown(services)
        if keep_logs:
            services.notes.append(f"logs kept in {workdir}")
        else:
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()


# --------------------------------------------------------------------------
# RSS sampling
# --------------------------------------------------------------------------


def read_status(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith(b"VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``clear_refs`` 5, Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples a process's VmRSS every 50 ms in a thread; tracks the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.before = 0
        self.hwm_reset = False
        self.hwm_after = 0
        self.t0 = 0.0

    def __enter__(self) -> RssSampler:
        self.hwm_reset = reset_hwm(self.pid)
        self.before, _ = read_status(self.pid)
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                rss, _ = read_status(self.pid)
                self.samples.append((time.perf_counter() - self.t0, rss))
            self._stop.wait(SAMPLE_INTERVAL_S)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            rss, self.hwm_after = read_status(self.pid)
            self.samples.append((time.perf_counter() - self.t0, rss))

    @property
    def peak(self) -> int:
        sampled = max((rss for _, rss in self.samples), default=self.before)
        return max(sampled, self.hwm_after) if self.hwm_reset else sampled

    def timeline(self) -> list[tuple[float, float]]:
        """(seconds, MB) pairs, for the JSON output."""
        return [(round(t, 3), round(rss / MB, 2)) for t, rss in self.samples]

    @property
    def after(self) -> int:
        return self.samples[-1][1] if self.samples else self.before


# --------------------------------------------------------------------------
# The raw-socket client
# --------------------------------------------------------------------------


@dataclass
class Transfer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    wire_bytes: int = 0  # everything after the response head (incl. chunk framing)
    seconds: float = 0.0
    tail: bytes = b""
    eof: bool = False

    @property
    def mbps(self) -> float:
        return self.wire_bytes / MB / self.seconds if self.seconds else 0.0


def chat_request(port: int, *, stream: bool, size: int, prompt_tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "stream memory benchmark"}],
            "stream": stream,
            "bench_bytes": size,
            "bench_prompt_tokens": prompt_tokens,
        }
    ).encode()
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "User-Agent: llamaswap-stream-memory\r\nAccept: */*\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def read_response(
    port: int,
    request: bytes,
    *,
    rate: float | None = None,
    max_seconds: float | None = None,
    during: Any = None,
) -> Transfer:
    """Send ``request`` and read the answer until EOF (or ``max_seconds``).

    Bytes are counted, never kept (beyond the head and the last 64 bytes).
    ``rate`` (bytes/s) throttles reading; ``during`` is called once just
    before a throttled read stops early, with the transfer so far.
    """
    result = Transfer()
    buffer = bytearray(RECV_BUFFER if rate is None else 64 * 1024)
    view = memoryview(buffer)
    head = bytearray()
    tail = b""
    with socket.create_connection(("127.0.0.1", port), timeout=TRANSFER_TIMEOUT_S) as sock:
        started = time.perf_counter()
        sock.sendall(request)
        while True:
            if max_seconds is not None and time.perf_counter() - started >= max_seconds:
                break
            if rate is not None:
                ahead = result.wire_bytes / rate - (time.perf_counter() - started)
                if ahead > 0:
                    time.sleep(ahead)
            n = sock.recv_into(buffer)
            if n == 0:
                result.eof = True
                break
            if result.status == 0:
                head += view[:n]
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    continue
                lines = bytes(head[:end]).decode("latin-1").split("\r\n")
                result.status = int(lines[0].split(" ")[1])
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    result.headers[name.strip().lower()] = value.strip()
                body_part = bytes(head[end + 4 :])
                result.wire_bytes += len(body_part)
                tail = body_part[-64:]
                continue
            result.wire_bytes += n
            tail = (tail + bytes(view[max(0, n - 64) : n]))[-64:]
        result.seconds = time.perf_counter() - started
        result.tail = tail
        if during is not None and not result.eof:
            during(result)
    return result


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


@dataclass
class Row:
    mode: str
    size_mb: float
    body_bytes: int = 0
    direct_mbps: float = 0.0
    through_mbps: float = 0.0
    ratio: float = 0.0
    rss_before_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_after_mb: float = 0.0
    growth_mb: float = 0.0
    retained_mb: float = 0.0
    llamaswap_cpu_s: float = 0.0
    through_seconds: float = 0.0
    direct_growth_mb: float = 0.0
    tokens_ok: bool = False
    tokens: dict[str, Any] = field(default_factory=dict)
    expected_tokens: dict[str, int] = field(default_factory=dict)
    has_capture: bool | None = None
    rss_timeline: list[tuple[float, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def complete(transfer: Transfer, mode: str) -> str | None:
    """Why ``transfer`` is not a complete 200 response, or None."""
    if transfer.status != 200:
        return f"status {transfer.status}"
    if not transfer.eof:
        return "no EOF"
    if mode == "sse" and not transfer.tail.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
        return f"stream did not end with [DONE] and the last chunk: {transfer.tail[-40:]!r}"
    if mode == "json":
        length = int(transfer.headers.get("content-length", -1))
        if length != transfer.wire_bytes or not transfer.tail.endswith(b"}}"):
            return f"JSON body of {transfer.wire_bytes} bytes, Content-Length {length}"
    return None


def latest_activity(services: Services, prompt_tokens: int, deadline_s: float = 5.0) -> Any:
    """The newest activity row, once it is the one for ``prompt_tokens``."""
    url = services.llamaswap_base + "/api/metrics/activity?limit=1"
    deadline = time.monotonic() + deadline_s
    row = None
    while time.monotonic() < deadline:
        status, page = http_json(url)
        if status == 200 and page and page.get("data"):
            row = page["data"][0]
            if row.get("tokens", {}).get("input_tokens") == prompt_tokens:
                return row
        time.sleep(0.1)
    return row


class Bench:
    def __init__(self, services: Services) -> None:
        self.services = services
        assert services.llamaswap is not None
        self.pid = services.llamaswap.pid
        self._prompt = 1000

    def next_prompt(self) -> int:
        self._prompt += 1
        return self._prompt

    def transfer(self, port: int, mode: str, size: int, prompt: int) -> Transfer:
        request = chat_request(port, stream=mode == "sse", size=size, prompt_tokens=prompt)
        return read_response(port, request)

    def warm_up(self, size: int) -> int:
        """A transfer of ``size`` each way per mode; returns the baseline RSS.

        Use the smallest measured size: its captures then fill the bounded
        capture ring (``captureBuffer``) before the measured requests, so
        "kept" shows growth per request rather than that ring filling."""
        for mode in ("sse", "json"):
            for port in (self.services.upstream_port, self.services.llamaswap_port):
                transfer = self.transfer(port, mode, size, self.next_prompt())
                if (why := complete(transfer, mode)) is not None:
                    raise BenchError(f"warm-up {mode} via port {port} failed: {why}")
        time.sleep(0.5)
        rss, _ = read_status(self.pid)
        return rss

    def measure(self, mode: str, size: int) -> Row:
        row = Row(mode, size / MB)
        with RssSampler(self.pid) as direct_rss:
            direct = self.transfer(self.services.upstream_port, mode, size, self.next_prompt())
        if (why := complete(direct, mode)) is not None:
            raise BenchError(f"direct {mode} {size / MB:g} MB failed: {why}")
        row.direct_growth_mb = (direct_rss.peak - direct_rss.before) / MB
        prompt = self.next_prompt()
        cpu_before = cpu_seconds(self.pid)
        with RssSampler(self.pid) as rss:
            through = self.transfer(self.services.llamaswap_port, mode, size, prompt)
        row.llamaswap_cpu_s = cpu_seconds(self.pid) - cpu_before
        row.through_seconds = through.seconds
        if (why := complete(through, mode)) is not None:
            row.problems.append(f"through llamaswap: {why}")
        row.body_bytes = int(through.headers.get("x-bench-body-bytes", 0))
        row.direct_mbps = direct.mbps
        row.through_mbps = through.mbps
        row.ratio = direct.mbps / through.mbps if through.mbps else float("inf")
        row.rss_before_mb = rss.before / MB
        row.rss_peak_mb = rss.peak / MB
        row.rss_after_mb = rss.after / MB
        row.growth_mb = (rss.peak - rss.before) / MB
        row.rss_timeline = rss.timeline()
        completion = int(through.headers.get("x-bench-completion-tokens", -1))
        row.expected_tokens = {"input_tokens": prompt, "output_tokens": completion}
        activity = latest_activity(self.services, prompt)
        if activity is None:
            row.problems.append("no activity row")
        else:
            row.tokens = activity.get("tokens", {})
            row.has_capture = activity.get("has_capture")
            row.tokens_ok = (
                row.tokens.get("input_tokens") == prompt
                and row.tokens.get("output_tokens") == completion
            )
            if not row.tokens_ok:
                row.problems.append(
                    f"activity tokens {row.tokens} != expected {row.expected_tokens}"
                )
        # The row (and its capture) is stored now; what stays resident after it?
        time.sleep(0.3)
        row.retained_mb = (read_status(self.pid)[0] - rss.before) / MB
        return row

    def slow_client(self, size: int) -> dict[str, Any]:
        """Read an SSE stream at ~5 MB/s for 5 s, then hang up."""
        prompt = self.next_prompt()
        request = chat_request(
            self.services.llamaswap_port, stream=True, size=size, prompt_tokens=prompt
        )
        upstream_view: dict[str, Any] = {}

        def snapshot(_: Transfer) -> None:
            _, stats = http_json(self.services.upstream_base + "/stats")
            if stats:
                upstream_view.update(stats["responses"][-1])

        with RssSampler(self.pid) as rss:
            transfer = read_response(
                self.services.llamaswap_port,
                request,
                rate=SLOW_RATE,
                max_seconds=SLOW_SECONDS,
                during=snapshot,
            )
        # After the hang-up llamaswap should stop reading and drop the upstream.
        aborted = None
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            _, stats = http_json(self.services.upstream_base + "/stats")
            last = stats["responses"][-1] if stats else {}
            if last.get("aborted") or last.get("complete"):
                aborted = last
                break
            time.sleep(0.1)
        activity = latest_activity(self.services, prompt, deadline_s=3.0)
        seconds = [t for t, _ in rss.samples]
        first_s = [r for t, r in rss.samples if t <= 1.0]
        last_s = [r for t, r in rss.samples if t >= (seconds[-1] if seconds else 0) - 1.0]
        sent = int(upstream_view.get("sent", 0))
        return {
            "size_mb": size / MB,
            "status": transfer.status,
            "seconds": round(transfer.seconds, 2),
            "client_read_mb": transfer.wire_bytes / MB,
            "client_rate_mbps": transfer.mbps,
            "upstream_sent_mb": sent / MB,
            "upstream_pauses": upstream_view.get("pauses"),
            "in_flight_mb": (sent - transfer.wire_bytes) / MB,
            "rss_before_mb": rss.before / MB,
            "rss_peak_mb": rss.peak / MB,
            "growth_mb": (rss.peak - rss.before) / MB,
            "rss_first_second_max_mb": max(first_s, default=0) / MB,
            "rss_last_second_max_mb": max(last_s, default=0) / MB,
            "upstream_after_hangup": (
                "aborted"
                if aborted and aborted.get("aborted")
                else "completed"
                if aborted
                else "still sending"
            ),
            "upstream_total_sent_mb": (aborted or {}).get("sent", 0) / MB,
            "activity_row": activity,
        }


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _row_summary(row: Any) -> str:
    if not row:
        return "missing"
    return (
        f"#{row.get('id')} status {row.get('resp_status_code')},"
        f" {row.get('duration_ms')} ms, tokens in/out"
        f" {row['tokens'].get('input_tokens')}/{row['tokens'].get('output_tokens')}"
    )


def print_report(result: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(
        f"\nllamaswap stream memory: python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}\n"
    )
    out.write(f"baseline RSS after warm-up: {result['baseline_rss_mb']:.1f} MB\n\n")
    header = (
        f"{'mode':<5} {'size':>7} {'direct MB/s':>12} {'via MB/s':>9} {'ratio':>6}"
        f" {'RSS before':>11} {'peak':>7} {'growth':>7} {'kept':>6} {'cpu s':>6}"
        f" {'tokens in/out':>16}\n"
    )
    out.write(header)
    for row in result["rows"]:
        tokens = row["tokens"]
        tok = f"{tokens.get('input_tokens', '?')}/{tokens.get('output_tokens', '?')}"
        tok += " ok" if row["tokens_ok"] else " BAD"
        out.write(
            f"{row['mode']:<5} {row['size_mb']:>5g}MB {row['direct_mbps']:>12,.0f}"
            f" {row['through_mbps']:>9,.0f} {row['ratio']:>5.2f}x"
            f" {row['rss_before_mb']:>9.1f}MB {row['rss_peak_mb']:>5.1f}MB"
            f" {row['growth_mb']:>+5.1f}MB {row['retained_mb']:>+5.1f}"
            f" {row['llamaswap_cpu_s']:>6.2f} {tok:>16}\n"
        )
    out.write(
        "\nratio = direct MB/s / through-llamaswap MB/s (1.00x = no slowdown). growth = peak"
        " RSS during the transfer minus RSS just before it; kept = RSS once the activity row"
        " is stored minus RSS before; cpu s = llamaswap CPU time for the transfer"
        " (MB = 10^6 bytes).\n"
    )
    slow = result.get("slow_client")
    if slow:
        out.write(
            f"\nslow client (SSE {slow['size_mb']:g} MB requested, read at"
            f" {slow['client_rate_mbps']:.1f} MB/s for {slow['seconds']:g} s, then hang up):\n"
            f"  client read {slow['client_read_mb']:.1f} MB; upstream had sent"
            f" {slow['upstream_sent_mb']:.1f} MB ({slow['upstream_pauses']} pauses);"
            f" in flight {slow['in_flight_mb']:.1f} MB (socket buffers + llamaswap)\n"
            f"  RSS before {slow['rss_before_mb']:.1f} MB, peak {slow['rss_peak_mb']:.1f} MB"
            f" ({slow['growth_mb']:+.1f} MB); max in first second"
            f" {slow['rss_first_second_max_mb']:.1f} MB, in last second"
            f" {slow['rss_last_second_max_mb']:.1f} MB\n"
            f"  after hang-up the upstream response was {slow['upstream_after_hangup']}"
            f" at {slow['upstream_total_sent_mb']:.1f} MB sent; activity row"
            f" {_row_summary(slow['activity_row'])}\n"
        )
    out.write("\n")
    for verdict in result["verdicts"]:
        out.write(f"{verdict}\n")
    for note in result["notes"]:
        out.write(f"note: {note}\n")
    out.flush()


def verdicts(result: dict[str, Any]) -> list[str]:
    lines = []
    rows = result["rows"]
    worst = max((row["growth_mb"] for row in rows), default=0.0)
    slow = result.get("slow_client") or {}
    worst = max(worst, slow.get("growth_mb", 0.0))
    ok = worst < GOAL_GROWTH_MB
    lines.append(
        f"{'PASS' if ok else 'MISS'}: largest RSS growth {worst:.1f} MB"
        f" (goal < {GOAL_GROWTH_MB:g} MB)"
    )
    for mode in ("sse", "json"):
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["size_mb"])
        if len(mine) >= 2:
            small, big = mine[0], mine[-1]
            delta = big["growth_mb"] - small["growth_mb"]
            flat = delta < 0.1 * (big["size_mb"] - small["size_mb"]) and delta < 20
            lines.append(
                f"{'PASS' if flat else 'MISS'}: {mode} growth {small['growth_mb']:.1f} MB at"
                f" {small['size_mb']:g} MB vs {big['growth_mb']:.1f} MB at {big['size_mb']:g} MB"
                f" ({'flat' if flat else 'grows'} with response size)"
            )
    kept = [r["retained_mb"] for r in rows]
    if kept:
        creep = result["rows"][-1]["rss_before_mb"] + kept[-1] - result["baseline_rss_mb"]
        leaky = max(kept) > 2.0
        lines.append(
            f"{'MISS' if leaky else 'PASS'}: RSS kept after each request"
            f" {min(kept):+.1f} to {max(kept):+.1f} MB; {creep:+.1f} MB above the warm-up"
            f" baseline after {len(rows)} measured requests"
            + (" (grows with request count, not size)" if leaky else "")
        )
    bad = [r for r in rows if not r["tokens_ok"]]
    lines.append(
        "PASS: usage parsed from every through-llamaswap body (activity row tokens match)"
        if not bad
        else f"MISS: activity tokens wrong for {[(r['mode'], r['size_mb']) for r in bad]}"
    )
    if slow:
        flat = slow["rss_last_second_max_mb"] - slow["rss_first_second_max_mb"] < 10
        lines.append(
            f"{'PASS' if flat else 'MISS'}: slow client RSS"
            f" {slow['rss_first_second_max_mb']:.1f} -> {slow['rss_last_second_max_mb']:.1f} MB"
            f" while the upstream was held to {slow['upstream_sent_mb']:.1f} MB of"
            f" {slow['size_mb']:g} MB"
        )
    for row in rows:
        for problem in row["problems"]:
            lines.append(f"PROBLEM {row['mode']} {row['size_mb']:g} MB: {problem}")
    return lines


def run(args: argparse.Namespace) -> int:
    sizes = [20 * MB, 100 * MB] if args.quick else [50 * MB, 500 * MB]
    if args.sizes:
        sizes = [int(float(s) * MB) for s in args.sizes.split(",")]
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "sizes_mb": [s / MB for s in sizes],
        "events_per_chunk": args.events_per_chunk,
        "rows": [],
        "notes": [],
    }
    failed = False
    started = time.monotonic()
    services: Services | None = None
    try:
        with running_services(args.keep_logs, args.events_per_chunk) as services:
            bench = Bench(services)
            log(
                f"llamaswap pid {bench.pid} on :{services.llamaswap_port}, upstream on"
                f" :{services.upstream_port}; warming up"
            )
            result["baseline_rss_mb"] = bench.warm_up(max(WARMUP_BYTES, min(sizes))) / MB
            for mode in args.modes.split(","):
                for size in sizes:
                    log(f"{mode} {size / MB:g} MB: direct, then through llamaswap")
                    row = bench.measure(mode, size)
                    result["rows"].append(asdict(row))
            if not args.no_slow:
                log(f"slow client: {SLOW_RATE / MB:g} MB/s for {SLOW_SECONDS:g} s")
                result["slow_client"] = bench.slow_client(max(sizes))
            result["llamaswap_log_tail"] = services.log_tail(10)
    except (BenchError, OSError) as error:
        log(f"benchmark failed: {error}")
        result["error"] = str(error)
        failed = True
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    if services is not None:
        result["notes"] += services.notes
    result["seconds"] = round(time.monotonic() - started, 1)
    result["notes"].append(f"total run time {result['seconds']:g} s")
    result["verdicts"] = verdicts(result) if result["rows"] else []
    if result["rows"]:
        print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    problems = any(row["problems"] for row in result["rows"])
    leak = services is not None and services.leak
    return 1 if failed or problems or leak else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 MB and 100 MB instead")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--sizes", help="comma-separated sizes in MB (overrides the defaults)")
    parser.add_argument(
        "--events-per-chunk",
        type=int,
        default=1,
        help="SSE events per HTTP chunk from the upstream (default 1, as llama.cpp sends)",
    )
    parser.add_argument("--modes", default="sse,json", help="which bodies: sse,json (default both)")
    parser.add_argument("--no-slow", action="store_true", help="skip the slow-client case")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir and logs")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
