"""Helpers shared by the benchmarks: free loopback ports, waiting for a
server, the shared yardstick's directory and llamaswap as it runs there,
and the demo upstream."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def demo_argv(port: int, model: str, *extra: str) -> list[str]:
    """The packaged demo upstream serving ``model`` on ``port``."""
    return [
        sys.executable, "-m", "llamaswap.demo", "--host", "127.0.0.1",
        "--port", str(port), "--model", model, *extra,
    ]  # fmt: skip


def stop_process(process: subprocess.Popen[bytes], deadline_s: float) -> str:
    """SIGTERM, wait up to the deadline, then SIGKILL; how it ended."""
    if process.poll() is not None:
        return f"had already exited ({process.returncode})"
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=deadline_s)
        return f"exited {process.returncode} after SIGTERM"
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
        return f"did not exit within {deadline_s:g} s of SIGTERM; killed"


def wait_ok(url: str, body: bytes | None = None, deadline: float = 60) -> None:
    """Wait until ``url`` answers 200 (a POST of JSON ``body`` when given)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            req = urllib.request.Request(url, data=body)
            if body is not None:
                req.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {url}")


def shared_perf_dir(given: str | None) -> Path:
    """The shared yardstick's directory: ``given``, else ``../shared/perf``
    beside the checkout, else ``/work/shared/perf``."""
    root = Path(__file__).resolve().parent.parent
    candidates = (
        [Path(given)] if given else [root.parent / "shared" / "perf", Path("/work/shared/perf")]
    )
    for candidate in candidates:
        if (candidate / "stream_client.py").exists():
            return candidate
    raise SystemExit("the shared yardstick was not found; pass --perf-dir")


def yardstick_config(
    upstream_cmd: str, start_port: int, models: tuple[str, ...] = ("m1",), extra: str = ""
) -> str:
    """The yardstick's llamaswap config: each of ``models`` runs
    ``upstream_cmd`` (which says ``${PORT}``); ``extra`` is top-level YAML to add."""
    return (
        f"healthCheckTimeout: 30\nlogLevel: warn\nstartPort: {start_port}\n"
        + (extra + "\n" if extra else "")
        + "models:\n"
        + "".join(
            f"  {name}:\n    cmd: {upstream_cmd}\n"
            "    proxy: http://127.0.0.1:${PORT}\n    checkEndpoint: /health\n"
            "    concurrencyLimit: 256\n"
            for name in models
        )
    )


def twistd_argv(
    config: Path,
    port: int,
    *,
    code: str = "from twisted.scripts.twistd import run; run()",
    twistd_options: tuple[str, ...] = (),
) -> list[str]:
    """``twistd -n llamaswap -c config`` on loopback ``port``, run as
    ``python -c code`` (``code`` ends by running twistd)."""
    return [
        sys.executable, "-c", code, *twistd_options, "-n", "--pidfile=", "llamaswap",
        "-c", str(config), "--listen", f"tcp:{port}:interface=127.0.0.1",
    ]  # fmt: skip
