"""The return to a swapped-out model: time to first token and prompt tokens
processed: cold restart, with the prompt cache, with prewarm (issue 14).

Against a real llama-server (built by ../shared/tools/real-llama/setup.sh; see
tests/realllama.py for where it is looked for) on a generated GGUF larger than
the test model, so that a long prompt costs real work.  Two models behind
llamaswap, ``long`` and ``other``, only one loaded at a time.  For each
scenario llamaswap is started with its own config, ``long`` reads the long
prompt once, then every round: a request for ``other`` (``long`` is swapped
out), then the long prompt again for ``long`` (swapped back) as a stream,
timed from sending to the first token through llamaswap (the start of the
server included); ``timings.prompt_n``/``cache_n`` of that answer say how
many prompt tokens were processed and how many came from the cache.

Scenarios (rows), each a config of ``long``:
  cold     ``promptCache: false``, ``prewarm: false``: the server restarts,
           loads the file and reads the prompt again
  cache    ``promptCache: true``, ``prewarm: false``: saved at the swap away,
           restored before ready
  prewarm  ``promptCache: false``, ``prewarm: true``: the model file is read
           into the page cache while the swap back waits for the eviction
  both     (``--both``) ``promptCache: true``, ``prewarm: true``

``--cold-disk`` drops the model file from the page cache before each swap
back: the case prewarm is for (it cuts the load part of the TTFT).  Without
it the weights are in the page cache in every scenario (the same file is read
at each start): "cold" is a cold *process*, and the cold and prewarm rows
are about equal.

    python bench/swap_back.py [--prompt-tokens 6000] [--ctx 8192] [--rounds 3]
                              [--cold-disk] [--json out.json] [--keep]
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO_ROOT))

from benchutil import free_ports  # noqa: E402

from tests.realllama import RealLlama, find_real_llama  # noqa: E402

#: the benchmark model: big enough that thousands of prompt tokens take seconds
#: on a small CPU, small enough to generate in seconds.
GGUF_SHAPE = ["--n-embd", "256", "--n-layer", "8", "--n-head", "4", "--n-head-kv", "4",
              "--n-ff", "768", "--ctx", "32768"]  # fmt: skip
GGUF_NAME = "bench-swap-back.gguf"
WORDS = ("the", "model", "cache", "swap", "prompt", "token", "server", "slot", "restore")


def generate_gguf(real: RealLlama) -> str:
    """The benchmark GGUF next to the real server's build (made once)."""
    path = os.path.join(real.dir, GGUF_NAME)
    if os.path.exists(path):
        return path
    tool = os.environ.get(
        "LLAMASWAP_REAL_LLAMA_TOOL", str(REPO_ROOT.parent / "shared" / "tools" / "real-llama")
    )
    script = os.path.join(tool, "make_tiny_gguf.py")
    if not os.path.exists(script):
        script = "/work/shared/tools/real-llama/make_tiny_gguf.py"
    gguf_py = glob.glob(os.path.join(real.dir, "src", "*", "llama.cpp", "gguf-py"))
    python = os.path.join(real.dir, "venv", "bin", "python")
    if not os.path.exists(python):
        python = sys.executable if _has_numpy(sys.executable) else "python3"
    env = {**os.environ, "PYTHONPATH": gguf_py[0] if gguf_py else ""}
    print(f"generating {path} ({' '.join(GGUF_SHAPE)})", flush=True)
    subprocess.run([python, script, path + ".part", *GGUF_SHAPE], env=env, check=True)
    os.replace(path + ".part", path)
    return path


def _has_numpy(python: str) -> bool:
    return subprocess.run([python, "-c", "import numpy"], capture_output=True).returncode == 0


def prompt_text(words: int) -> str:
    return " ".join(f"{WORDS[i % len(WORDS)]}{i % 97}" for i in range(words))


def post(url: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def streamed(port: int, model: str, text: str) -> tuple[float, dict[str, Any]]:
    """Seconds to the first content token, and the last chunk's ``timings``."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
        }
    )
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    began = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    first: float | None = None
    timings: dict[str, Any] = {}
    for raw in response:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        event = json.loads(line[5:])
        choices = event.get("choices") or []
        if first is None and choices and (choices[0].get("delta") or {}).get("content"):
            first = time.perf_counter() - began
        if isinstance(event.get("timings"), dict):
            timings = event["timings"]
    connection.close()
    if first is None:
        raise RuntimeError(f"no token streamed for {model}")
    return first, timings


class Llamaswap:
    def __init__(self, config: dict[str, Any], workdir: str) -> None:
        self.port = free_ports(1)[0]
        path = os.path.join(workdir, f"config-{self.port}.yaml")
        with open(path, "w") as stream:
            json.dump(config, stream)
        self.log_path = path + ".log"
        self.log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llamaswap", "-c", path, "--listen", f"127.0.0.1:{self.port}"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO_ROOT),
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("llamaswap did not start; log: " + self.log_path) from None
                time.sleep(0.05)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def model_cmd(real: RealLlama, gguf: str, ctx: int) -> str:
    return f"{real.server} --port ${{PORT}} --host 127.0.0.1 -m {gguf} -c {ctx} -np 1 --no-warmup"


def scenario(
    name: str, real: RealLlama, gguf: str, args: argparse.Namespace, text: str, workdir: str
) -> dict[str, Any]:
    prompt_cache, prewarm = SCENARIOS[name]
    config = {
        "healthCheckTimeout": 300,
        "startPort": free_ports(1)[0],
        "promptCacheDir": os.path.join(workdir, f"prompt-cache-{name}"),
        "models": {
            "long": {
                "cmd": model_cmd(real, gguf, args.ctx),
                "promptCache": prompt_cache,
                "prewarm": prewarm,
            },
            "other": {"cmd": model_cmd(real, real.tiny, 2048)},
        },
    }
    server = Llamaswap(config, workdir)
    rounds = []
    try:
        first = post(
            server.url("/v1/chat/completions"),
            {"model": "long", "messages": [{"role": "user", "content": text}], "max_tokens": 1},
        )
        prompt_tokens = first["usage"]["prompt_tokens"]
        for _ in range(args.rounds):
            began = time.perf_counter()
            post(
                server.url("/v1/chat/completions"),
                {"model": "other", "messages": [{"role": "user", "content": "hi"}],
                 "max_tokens": 1},
            )  # fmt: skip
            away = time.perf_counter() - began
            if args.cold_disk:
                drop_from_page_cache(gguf)
            ttft, timings = streamed(server.port, "long", text)
            rounds.append(
                {
                    "ttft_s": ttft,
                    "swap_away_s": away,
                    "prompt_n": timings.get("prompt_n"),
                    "cache_n": timings.get("cache_n"),
                    "prompt_ms": timings.get("prompt_ms"),
                    # what is not the prompt: start, load, restore, proxy
                    "rest_s": ttft - (timings.get("prompt_ms") or 0) / 1000,
                }
            )
            print(f"  {name}: round {len(rounds)}: {json.dumps(rounds[-1])}", flush=True)
    finally:
        server.close()
        if not args.keep:
            os.unlink(server.log_path)
    return {
        "scenario": name,
        "prompt_tokens": prompt_tokens,
        "ttft_s": statistics.median(r["ttft_s"] for r in rounds),
        "swap_away_s": statistics.median(r["swap_away_s"] for r in rounds),
        "rest_s": statistics.median(r["rest_s"] for r in rounds),
        "prompt_n": statistics.median(r["prompt_n"] for r in rounds),
        "cache_n": statistics.median(r["cache_n"] for r in rounds),
        "rounds": rounds,
    }


def calibrate(real: RealLlama, gguf: str, args: argparse.Namespace, workdir: str) -> str:
    """A prompt of about ``--prompt-tokens`` tokens of the benchmark model."""
    config = {
        "startPort": free_ports(1)[0],
        "models": {"long": {"cmd": model_cmd(real, gguf, args.ctx)}},
    }
    server = Llamaswap(config, workdir)
    try:
        words = args.prompt_tokens // 2
        for _ in range(4):
            text = prompt_text(words)
            tokens = post(server.url("/upstream/long/tokenize"), {"content": text})["tokens"]
            if abs(len(tokens) - args.prompt_tokens) < args.prompt_tokens * 0.03:
                break
            words = max(1, int(words * args.prompt_tokens / max(len(tokens), 1)))
        return text
    finally:
        server.close()


def drop_from_page_cache(path: str) -> None:
    """Ask the kernel to forget ``path``'s cached pages (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


#: scenario -> (promptCache, prewarm) of the model swapped back to
SCENARIOS = {
    "cold": (False, False),
    "cache": (True, False),
    "prewarm": (False, True),
    "both": (True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=6000)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cold-disk",
        action="store_true",
        help="drop the model file from the page cache before each swap back",
    )
    parser.add_argument("--both", action="store_true", help="also a row with cache and prewarm")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and logs")
    args = parser.parse_args()
    real, why = find_real_llama()
    if real is None:
        sys.exit(why)
    gguf = generate_gguf(real)
    workdir = tempfile.mkdtemp(prefix="swap-back-")
    text = calibrate(real, gguf, args, workdir)
    names = ["cold", "cache", "prewarm", *(["both"] if args.both else [])]
    results = [scenario(name, real, gguf, args, text, workdir) for name in names]
    print()
    print(f"return to a swapped-out model, {results[0]['prompt_tokens']} prompt tokens, "
          f"-c {args.ctx}, median of {args.rounds} rounds, "
          f"{os.path.getsize(gguf) / 2**20:.0f} MiB model file "
          f"{'dropped from' if args.cold_disk else 'kept in'} the page cache")  # fmt: skip
    print(
        f"{'scenario':10} {'TTFT s':>8} {'processed':>10} {'from cache':>11} "
        f"{'not prompt s':>13} {'swap away s':>12}"
    )
    for row in results:
        print(
            f"{row['scenario']:10} {row['ttft_s']:8.2f} {row['prompt_n']:10.0f} "
            f"{row['cache_n']:11.0f} {row['rest_s']:13.2f} {row['swap_away_s']:12.2f}"
        )
    print("(not prompt: TTFT less the server's prompt_ms: start, load, restore, proxy;")
    print(" swap away: the request for the other model, which includes the save)")
    if not args.cold_disk:
        print("(without --cold-disk the file is in the page cache: cold ~ prewarm)")
    cold, cache, prewarmed = results[:3]
    share = cache["prompt_n"] / cache["prompt_tokens"]
    ratio = cache["ttft_s"] / cold["ttft_s"]
    print()
    print(f"with the cache: {share:.1%} of the prompt re-processed (goal <= 10%): "
          f"{'met' if share <= 0.10 else 'NOT met'}")  # fmt: skip
    print(f"with the cache: TTFT {ratio:.2f} x the cold one (goal <= 0.5): "
          f"{'met' if ratio <= 0.5 else 'NOT met'}")  # fmt: skip
    print(
        f"with prewarm: TTFT {prewarmed['ttft_s'] - cold['ttft_s']:+.2f} s, not-prompt part "
        f"{prewarmed['rest_s'] - cold['rest_s']:+.2f} s against the cold one"
    )
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"ctx": args.ctx, "results": results}, stream, indent=1)
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print("kept:", workdir)


if __name__ == "__main__":
    main()
