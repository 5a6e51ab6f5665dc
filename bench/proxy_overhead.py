"""What llamaswap adds over a direct connection to the same upstream.

One run starts llamaswap (a subprocess) with a one-model config whose model
is the packaged demo upstream, lets llamaswap start that upstream, then
measures the same requests alternately straight at the upstream and through
llamaswap, with the load generator (``bench/loadgen.py``) in a third process:

* small non-streaming chat completions at concurrency 1: latency and req/s;
* the same at concurrency 16: req/s and latency;
* a streamed chat of 200 chunks: time to last and to first byte.

    python bench/proxy_overhead.py            # full run, about a minute
    python bench/proxy_overhead.py --quick    # smoke run, about 20 s
    python bench/proxy_overhead.py --json out.json

See ``bench/README.md`` for how to read the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
LOADGEN = BENCH_DIR / "loadgen.py"
sys.path.insert(0, str(BENCH_DIR))

from benchutil import demo_argv, free_ports, port_in_use, stop_process  # noqa: E402
from loadgen import percentile, wrk_available  # noqa: E402

MODEL = "bench"
CHAT_PATH = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
SMALL_BODY = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 8})
STREAM_BODY = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True})

#: Reference figures to compare against (measured by the llamaswap authors).
GOALS = (
    ("llama-swap (Go)", "adds 0.76 ms per request at c=1; 1,600 req/s at c=16"),
    ("bare Twisted Agent relay", "~1,580 req/s at c=16; 1.15 ms per request at c=1"),
)
GOAL_ADDED_MS_C1 = 0.76
GOAL_RPS_C16 = 1600.0

CONCURRENCY_LIMIT = 64
STARTUP_DEADLINE_S = 60.0
STOP_DEADLINE_S = 15.0
PORT_FREE_DEADLINE_S = 10.0


class BenchError(RuntimeError):
    """Something the benchmark needs did not work; the message says what."""


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One measured workload, run once per target per round."""

    key: str
    title: str
    body: str
    concurrency: int
    requests: int | None = None
    duration: float | None = None
    warmup: float = 1.0


@dataclass(frozen=True)
class Settings:
    scenarios: tuple[Scenario, ...]
    rounds: int
    use_wrk: bool
    json_path: str | None
    keep_logs: bool


def make_settings(args: argparse.Namespace) -> Settings:
    quick = args.quick
    requests = args.requests or (500 if quick else 2000)
    duration = args.duration or (2.0 if quick else 5.0)
    stream_requests = args.stream_requests or (50 if quick else 200)
    warmup = 0.5 if quick else 1.0
    scenarios = (
        Scenario("c1", "chat c=1", SMALL_BODY, 1, requests=requests, warmup=warmup),
        Scenario("c16", "chat c=16", SMALL_BODY, 16, duration=duration, warmup=warmup),
        Scenario("stream", "stream 200 chunks", STREAM_BODY, 1, requests=stream_requests),
    )
    rounds = args.rounds or (1 if quick else 2)
    return Settings(scenarios, rounds, args.use_wrk, args.json, args.keep_logs)


# --------------------------------------------------------------------------
# Ports, HTTP probes and the config file
# --------------------------------------------------------------------------


def http_status(url: str, body: str | None = None, timeout: float = 10.0) -> int:
    """The status of one request (0 when there was no HTTP answer)."""
    data = None if body is None else body.encode("utf-8")
    request = urllib.request.Request(url, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.read()
        return int(error.code)
    except (OSError, ValueError):
        return 0


def wait_for_status(
    url: str, deadline: float, body: str | None = None, alive: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll until ``url`` answers 200, or raise at the deadline."""
    last = 0
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise BenchError(f"process exited with status {alive.returncode} while waiting")
        last = http_status(url, body, timeout=max(1.0, deadline - time.monotonic()))
        if last == 200:
            return
        time.sleep(0.2)
    raise BenchError(f"{url} did not answer 200 in time (last status {last or 'none'})")


def write_config(directory: Path, upstream_port: int) -> Path:
    """A one-model llamaswap config (JSON is valid YAML)."""
    config = {
        "healthCheckTimeout": 30,
        "logLevel": "warn",
        "models": {
            MODEL: {
                "cmd": shlex.join(demo_argv(upstream_port, MODEL, "--tokens-per-second", "0")),
                "proxy": f"http://127.0.0.1:{upstream_port}",
                # The default (10, as in llama-swap) would answer 429 at c=16.
                "concurrencyLimit": CONCURRENCY_LIMIT,
            }
        },
    }
    path = directory / "bench.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def child_env() -> dict[str, str]:
    """The environment for children: the checkout's package comes first."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


# --------------------------------------------------------------------------
# Processes: llamaswap and (as a fallback) a directly started upstream
# --------------------------------------------------------------------------


@dataclass
class Services:
    """The processes of one benchmark run and where they listen."""

    workdir: Path
    upstream_port: int
    llamaswap_port: int
    llamaswap: subprocess.Popen[bytes] | None = None
    direct_upstream: subprocess.Popen[bytes] | None = None
    llamaswap_error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.workdir / "llamaswap.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def spawn(command: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(command),
            cwd=REPO_ROOT,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_llamaswap(services: Services) -> None:
    """Start llamaswap and have it start the ``bench`` upstream."""
    config = write_config(services.workdir, services.upstream_port)
    listen = f"127.0.0.1:{services.llamaswap_port}"
    command = [sys.executable, "-m", "llamaswap", "-c", str(config), "--listen", listen]
    services.llamaswap = spawn(command, services.log_path)
    base = f"http://127.0.0.1:{services.llamaswap_port}"
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    wait_for_status(base + "/health", deadline, alive=services.llamaswap)
    wait_for_status(base + CHAT_PATH, deadline, SMALL_BODY, alive=services.llamaswap)
    if not port_in_use(services.upstream_port):
        raise BenchError(f"llamaswap answered but nothing listens on {services.upstream_port}")


def start_direct_upstream(services: Services) -> None:
    """Fallback when llamaswap failed: run the upstream ourselves."""
    log_path = services.workdir / "upstream.log"
    services.direct_upstream = spawn(
        demo_argv(services.upstream_port, MODEL, "--tokens-per-second", "0"), log_path
    )
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    url = f"http://127.0.0.1:{services.upstream_port}{CHAT_PATH}"
    wait_for_status(url, deadline, SMALL_BODY, alive=services.direct_upstream)


def listening_pids(port: int) -> list[int]:
    """Processes with a listening TCP socket on ``port`` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
    return pids


def is_bench_upstream(pid: int, port: int) -> bool:
    """True for a demo upstream started for this run (so ours to stop)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"llamaswap.demo" in argv and str(port).encode() in argv


def wait_port_free(port: int, deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not port_in_use(port):
            return True
        time.sleep(0.1)
    return not port_in_use(port)


def reap_leftover_upstream(port: int) -> str:
    """Stop an upstream that outlived llamaswap; describes what was found."""
    if wait_port_free(port, PORT_FREE_DEADLINE_S):
        return f"upstream port {port} is free"
    pids = [pid for pid in listening_pids(port) if is_bench_upstream(pid, port)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if wait_port_free(port, 5.0):
            break
    state = "now free" if not port_in_use(port) else "STILL IN USE"
    return f"LEAK: upstream still listened on {port} after llamaswap exited (pids {pids}); {state}"


def teardown(services: Services) -> None:
    if services.llamaswap is not None:
        how = stop_process(services.llamaswap, STOP_DEADLINE_S)
        services.notes.append(f"llamaswap {how}")
    if services.direct_upstream is not None:
        how = stop_process(services.direct_upstream, STOP_DEADLINE_S)
        services.notes.append(f"directly started upstream {how}")
    services.notes.append(reap_leftover_upstream(services.upstream_port))


@contextlib.contextmanager
def running_services(keep_logs: bool) -> Iterator[Services]:
    """Start llamaswap (or the bare upstream if that fails); always tear down."""
    workdir = Path(tempfile.mkdtemp(prefix="llamaswap-bench-"))
    upstream_port, llamaswap_port = free_ports(2)
    services = Services(workdir, upstream_port, llamaswap_port)
    try:
        try:
            start_llamaswap(services)
        except BenchError as error:
            services.llamaswap_error = f"{error}\n--- llamaswap log tail ---\n{services.log_tail()}"
            log(f"llamaswap failed: {services.llamaswap_error}")
            if services.llamaswap is not None:
                stop_process(services.llamaswap, STOP_DEADLINE_S)
                services.llamaswap = None
            if not wait_port_free(upstream_port, 2.0):
                services.notes.append(reap_leftover_upstream(upstream_port))
            log("continuing with direct measurements only")
            start_direct_upstream(services)
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
# Measuring
# --------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_loadgen(url: str, scenario: Scenario, use_wrk: bool) -> dict[str, Any]:
    """One load generator run in its own process; its JSON result."""
    command = [sys.executable, str(LOADGEN), "--url", url, "--body", scenario.body, "--raw"]
    command += ["--concurrency", str(scenario.concurrency), "--warmup", str(scenario.warmup)]
    if use_wrk:
        command += ["--use-wrk", "--duration", str(scenario.duration or 3.0)]
    elif scenario.requests is not None:
        command += ["--requests", str(scenario.requests)]
    else:
        command += ["--duration", str(scenario.duration)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise BenchError(f"load generator failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


@dataclass
class Measurement:
    """Every round of one scenario against one target, merged."""

    requests: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    # wrk gives no raw samples: its per-run percentiles (ms), averaged.
    run_percentiles: dict[str, list[float]] = field(default_factory=dict)

    def add(self, result: dict[str, Any]) -> None:
        self.requests += int(result["requests"])
        self.errors += int(result["errors"])
        self.elapsed_s += float(result["elapsed_s"])
        self.latencies.extend(result.get("raw_latency_s", []))
        self.ttfb.extend(result.get("raw_ttfb_s", []))
        if "raw_latency_s" not in result:
            for name, value in result["latency_ms"].items():
                self.run_percentiles.setdefault(name, []).append(float(value))
        self.runs.append({k: v for k, v in result.items() if not k.startswith("raw_")})

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0

    def latency_ms(self, pct: float) -> float:
        if not self.latencies and self.run_percentiles:
            values = self.run_percentiles.get(f"p{pct:g}", [])
            return sum(values) / len(values) if values else math.nan
        return percentile(sorted(self.latencies), pct) * 1000.0

    def ttfb_ms(self, pct: float) -> float:
        return percentile(sorted(self.ttfb), pct) * 1000.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.rps, 1),
            "latency_p50_ms": _json_number(self.latency_ms(50)),
            "latency_p99_ms": _json_number(self.latency_ms(99)),
            "ttfb_p50_ms": _json_number(self.ttfb_ms(50)),
            "runs": self.runs,
        }


def measure(services: Services, settings: Settings) -> dict[str, dict[str, Measurement]]:
    """All scenarios, alternating direct and through llamaswap each round."""
    targets = {"direct": f"http://127.0.0.1:{services.upstream_port}{CHAT_PATH}"}
    if services.llamaswap is not None:
        targets["llamaswap"] = f"http://127.0.0.1:{services.llamaswap_port}{CHAT_PATH}"
    results: dict[str, dict[str, Measurement]] = {}
    for scenario in settings.scenarios:
        per_target = {name: Measurement() for name in targets}
        for round_no in range(settings.rounds):
            for name, url in targets.items():
                log(f"  {scenario.title:<18} round {round_no + 1}/{settings.rounds} {name}")
                per_target[name].add(run_loadgen(url, scenario, settings.use_wrk))
        results[scenario.key] = per_target
    return results


# --------------------------------------------------------------------------
# Comparing and reporting
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    scenario: str
    metric: str
    direct: float
    through: float | None
    higher_is_better: bool = False
    added: bool = False

    @property
    def ratio(self) -> float | None:
        """How many times worse through llamaswap (>1: overhead)."""
        if self.through is None or not self.direct or not self.through:
            return None
        if self.higher_is_better:
            return self.direct / self.through
        return self.through / self.direct

    @property
    def added_ms(self) -> float | None:
        if not self.added or self.through is None:
            return None
        return self.through - self.direct


def comparison_rows(results: dict[str, dict[str, Measurement]]) -> list[Row]:
    rows: list[Row] = []

    def pair(key: str) -> tuple[Measurement, Measurement | None]:
        return results[key]["direct"], results[key].get("llamaswap")

    for key, title in (("c1", "chat c=1"), ("c16", "chat c=16")):
        direct, through = pair(key)
        rows += [
            Row(title, "latency p50 ms", direct.latency_ms(50), _opt(through, "p50"), added=True),
            Row(title, "latency p99 ms", direct.latency_ms(99), _opt(through, "p99"), added=True),
            Row(title, "req/s", direct.rps, through.rps if through else None, True),
        ]
    direct, through = pair("stream")
    rows += [
        Row(
            "stream 200 chunks",
            "TTLB p50 ms",
            direct.latency_ms(50),
            _opt(through, "p50"),
            added=True,
        ),
        Row(
            "stream 200 chunks",
            "TTFB p50 ms",
            direct.ttfb_ms(50),
            _opt(through, "ttfb"),
            added=True,
        ),
    ]
    return rows


def _opt(measurement: Measurement | None, what: str) -> float | None:
    if measurement is None:
        return None
    if what == "ttfb":
        return measurement.ttfb_ms(50)
    return measurement.latency_ms(50 if what == "p50" else 99)


def _known(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _json_number(value: float | None) -> float | None:
    """JSON has no NaN: unknown figures become null."""
    return round(value, 4) if _known(value) else None


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def format_table(rows: list[Row]) -> str:
    header = f"{'scenario':<18} {'metric':<15} {'direct':>9} {'llamaswap':>10} {'ratio':>7} {'added ms':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = f"{row.ratio:.2f}x" if _known(row.ratio) else "-"
        added = f"{row.added_ms:+.3f}" if _known(row.added_ms) else "-"
        lines.append(
            f"{row.scenario:<18} {row.metric:<15} {_num(row.direct):>9} "
            f"{_num(row.through):>10} {ratio:>7} {added:>9}"
        )
    return "\n".join(lines)


def goal_lines(results: dict[str, dict[str, Measurement]]) -> list[str]:
    lines = ["Reference figures:"]
    lines += [f"  {who:<26} {what}" for who, what in GOALS]
    c1, c16 = results["c1"], results["c16"]
    if "llamaswap" in c1:
        added = c1["llamaswap"].latency_ms(50) - c1["direct"].latency_ms(50)
        rps = c16["llamaswap"].rps
        lines.append(
            f"  {'llamaswap (this run)':<26} adds {added:.2f} ms per request at c=1 "
            f"(goal {GOAL_ADDED_MS_C1} ms); {rps:,.0f} req/s at c=16 (goal {GOAL_RPS_C16:,.0f})"
        )
    return lines


def error_counts(results: dict[str, dict[str, Measurement]]) -> dict[str, Any]:
    """Failed requests per scenario/target, with the statuses seen."""
    errors: dict[str, Any] = {}
    for key, per_target in results.items():
        for target, measurement in per_target.items():
            if measurement.errors:
                statuses = [run.get("statuses", {}) for run in measurement.runs]
                errors[f"{key}/{target}"] = {"errors": measurement.errors, "statuses": statuses}
    return errors


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "wrk_installed": wrk_available(),
    }


def report(
    settings: Settings, services: Services, results: dict[str, dict[str, Measurement]]
) -> dict[str, Any]:
    rows = comparison_rows(results)
    env = environment()
    tool = "wrk" if settings.use_wrk and env["wrk_installed"] else "python-asyncio loadgen"
    print()
    print(
        f"llamaswap proxy overhead - {tool}, {settings.rounds} round(s) alternating "
        f"direct/llamaswap, Python {env['python']}"
    )
    print(
        f"NOTE: {env['cpu_count']} CPU core(s): the load generator, llamaswap and the upstream "
        "are separate processes sharing them, so absolute figures are machine-bound."
    )
    print()
    print(format_table(rows))
    errors = {
        f"{k}/{t}": m.errors for k, per in results.items() for t, m in per.items() if m.errors
    }
    if errors:
        print(f"\nERRORS (non-2xx or broken connections): {errors}")
    if services.llamaswap_error:
        print(f"\nllamaswap could not be measured:\n{services.llamaswap_error}")
    print()
    print("\n".join(goal_lines(results)))
    print("ratio: through/direct for latency, direct/through for req/s (1.00x = no overhead)")
    for note in services.notes:
        print(f"teardown: {note}")
    return {
        "environment": env,
        "tool": tool,
        "rounds": settings.rounds,
        "scenarios": {
            key: {name: m.summary() for name, m in per.items()} for key, per in results.items()
        },
        "comparison": [
            {
                "scenario": r.scenario,
                "metric": r.metric,
                "direct": _json_number(r.direct),
                "llamaswap": _json_number(r.through),
                "ratio": _json_number(r.ratio),
                "added_ms": _json_number(r.added_ms),
            }
            for r in rows
        ],
        "goals": dict(GOALS),
        "errors": error_counts(results),
        "llamaswap_error": services.llamaswap_error,
        "teardown": services.notes,
    }


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, help="requests per c=1 run (default 2000)")
    parser.add_argument("--duration", type=float, help="seconds per c=16 run (default 5)")
    parser.add_argument("--stream-requests", type=int, help="streamed requests per run (200)")
    parser.add_argument("--rounds", type=int, help="direct/llamaswap alternations (default 2)")
    parser.add_argument("--json", help="also write the full results to this file")
    parser.add_argument("--quick", action="store_true", help="short smoke run (~20 s)")
    parser.add_argument("--use-wrk", action="store_true", help="use wrk if it is installed")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir and logs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    settings = make_settings(build_parser().parse_args(argv))
    log("starting llamaswap and the bench upstream ...")
    with running_services(settings.keep_logs) as services:
        log(f"upstream :{services.upstream_port}, llamaswap :{services.llamaswap_port}; measuring")
        results = measure(services, settings)
    data = report(settings, services, results)
    if settings.json_path:
        Path(settings.json_path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    leaked = any(note.startswith("LEAK") for note in services.notes)
    return 1 if services.llamaswap_error or leaked or data["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
