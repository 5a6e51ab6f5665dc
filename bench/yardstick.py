#!/usr/bin/env python3
"""llamaswap on the shared performance yardstick, as ratios to direct.

Runs the shared harness (``run_all.sh`` in ``../shared/perf``: wrk at c=1,
16 and 64 against its fast upstream, streaming clients, swap cost; direct,
nginx and, with ``LLAMA_SWAP_BIN``, llama-swap in the same run) with
``twistd -n llamaswap`` from this checkout in its default configuration
(activity, captures, access log and Prometheus all on), then prints the
harness's table with llamaswap's row and the figures the README quotes::

    python bench/yardstick.py                       # REPS=3 DUR=5s
    REPS=5 DUR=10s LLAMA_SWAP_BIN=~/llama-swap python bench/yardstick.py
    python bench/yardstick.py --summarize-only      # re-read the last results

``--perf-dir`` (or ``PERF_DIR``) says where the harness is; the default is
``../shared/perf`` next to the repository, then ``/work/shared/perf``.  The
harness uses fixed ports (9000, 8081-8084, 10001+, 11001+): run it on a
quiet machine, alone.  It is run with this script's Python (use the venv
that has llamaswap's dependencies).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["direct", "nginx", "llama-swap-go", "llamaswap"]


def find_perf_dir(given: str | None) -> Path:
    for candidate in (given, ROOT.parent / "shared" / "perf", Path("/work/shared/perf")):
        if candidate and (Path(candidate) / "run_all.sh").exists():
            return Path(candidate)
    raise SystemExit("the shared yardstick (run_all.sh) was not found; pass --perf-dir")


def twistd_wrapper(directory: Path) -> Path:
    """A ``twistd`` that runs with this checkout's ``llamaswap`` first on the path."""
    script = directory / "twistd"
    script.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH="{ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" '
        "-c 'from twisted.scripts.twistd import run; run()' \"$@\"\n"
    )
    script.chmod(0o755)
    return script


def load(results: Path, name: str) -> dict[str, list[float]] | None:
    path = results / f"{name}.txt"
    if not path.exists():
        return None
    out: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        kv = dict(re.findall(r"(\w+)=(\S+)", line))
        if "c" in kv and "rps" in kv:
            out.setdefault(f"c{kv['c']}_rps", []).append(float(kv["rps"]))
            out.setdefault(f"c{kv['c']}_p50", []).append(float(kv["p50_ms"]))
        elif " streamB " in line:
            out.setdefault("ttft", []).append(float(kv["ttft_p50_ms"]))
        elif " streamA " in line:
            out.setdefault("stream_total", []).append(float(kv["total_p50_ms"]))
    return out


def ratios(results: Path) -> list[str]:
    direct = load(results, "direct")
    ours = load(results, "llamaswap")
    if not direct or not ours:
        return ["no llamaswap or direct figures in " + str(results)]

    def med(data: dict[str, list[float]], key: str) -> float:
        return statistics.median(data[key]) if data.get(key) else float("nan")

    c16 = med(ours, "c16_rps") / med(direct, "c16_rps")
    c1 = med(ours, "c1_p50") / med(direct, "c1_p50")
    c64 = med(ours, "c64_rps")
    ttft = med(ours, "ttft") - med(direct, "ttft")
    lines = [
        f"llamaswap c16 req/s: {med(ours, 'c16_rps'):.0f} = {c16:.3f}x direct"
        f" (goal >= 0.08x; llama-swap 0.071x)",
        f"llamaswap c1 p50: {med(ours, 'c1_p50'):.3f} ms = {c1:.1f}x direct"
        f" (goal <= 12x; llama-swap 14x)",
        f"llamaswap c64 req/s: {c64:.0f} ({c64 / med(ours, 'c16_rps'):.2f}x its c16; goal >= 1)",
        f"streaming TTFT added: {ttft:+.2f} ms (goal <= 0.5 ms)",
    ]
    go = load(results, "llama-swap-go")
    if go:
        lines.append(
            f"llama-swap (Go) same run: c16 {med(go, 'c16_rps') / med(direct, 'c16_rps'):.3f}x,"
            f" c1 p50 {med(go, 'c1_p50') / med(direct, 'c1_p50'):.1f}x direct"
        )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--perf-dir", default=os.environ.get("PERF_DIR"))
    ap.add_argument("--results", default=os.environ.get("RESULTS_DIR", "/tmp/perf-results"))
    ap.add_argument("--summarize-only", action="store_true")
    args = ap.parse_args()
    perf = find_perf_dir(args.perf_dir)
    results = Path(args.results)
    if not args.summarize_only:
        with tempfile.TemporaryDirectory(prefix="llamaswap-yardstick-") as tmp:
            env = {
                **os.environ,
                "LLAMASWAP_TWISTD": str(twistd_wrapper(Path(tmp))),
                "RESULTS_DIR": str(results),
            }
            check = subprocess.run(
                [env["LLAMASWAP_TWISTD"], "--help-reactors"], env=env, capture_output=True
            )
            if check.returncode != 0:
                raise SystemExit(f"{sys.executable} cannot run twistd: {check.stderr.decode()}")
            subprocess.run(["bash", str(perf / "run_all.sh")], env=env, check=False)
    names = [n for n in TARGETS if (results / f"{n}.txt").exists()]
    subprocess.run([sys.executable, str(perf / "summarize.py"), str(results), *names], check=False)
    print()
    print("\n".join(ratios(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
