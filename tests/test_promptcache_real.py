"""End to end: llamaswap in front of a real llama-server with ``promptCache``.

A long prompt is processed by model ``a``, a request for ``b`` swaps ``a``
out (its slot is saved), the same prompt for ``a`` again swaps back (the slot
is restored before ``a`` is ready) and its ``timings.cache_n`` shows the
prompt came from the cache.  Skipped, with the reason, when the real server
is not built (tests/realllama.py says where it is looked for).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from typing import Any

import treq
from twisted.trial.unittest import SkipTest, TestCase

from llamaswap.supervision.promptcache import MANIFEST_SUFFIX, _sample_crc
from tests.realllama import find_real_llama
from tests.support import ServiceProcess, free_port, poll_until

REAL, WHY_NOT = find_real_llama()

#: about 1,400 tokens of the tiny model's vocabulary.
PROMPT = " ".join(
    f"The {word} number {i} is kept in the cache." for i, word in enumerate(["alpha"] * 54)
)


def model(gguf: str, port: int, ctx: int = 2048) -> dict[str, Any]:
    assert REAL is not None
    return {
        "cmd": f"{REAL.server} --port {port} --host 127.0.0.1 -m {gguf} -c {ctx} -np 1 "
        "--threads 1 --no-warmup",
        "proxy": f"http://127.0.0.1:{port}",
        "promptCache": True,
    }


def distinct_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


class RealPromptCacheTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        if REAL is None:
            raise SkipTest(WHY_NOT)
        self.cache_dir = os.path.abspath(self.mktemp())
        self.running: ServiceProcess | None = None

    async def tearDown(self) -> None:  # type: ignore[override]
        if self.running is not None and not self.running.ended.called:
            self.running.transport.signalProcess(signal.SIGTERM)
            await self.running.ended

    async def serve(self, max_bytes: str = "1GiB") -> ServiceProcess:
        assert REAL is not None
        a_port, b_port, listen = distinct_ports(3)
        config = {
            "healthCheckTimeout": 60,
            "promptCacheDir": self.cache_dir,
            "promptCacheMaxBytes": max_bytes,
            "models": {"a": model(REAL.tiny, a_port), "b": model(REAL.tiny_eos, b_port)},
        }
        path = os.path.abspath(self.mktemp()) + ".yaml"
        with open(path, "w") as stream:
            json.dump(config, stream)
        self.running = ServiceProcess(["-m", "llamaswap", "-c", path], listen)
        await self.running.wait_up()
        return self.running

    async def chat(self, running: ServiceProcess, name: str, text: str) -> dict[str, Any]:
        response = await treq.post(
            running.url + "/v1/chat/completions",
            json={
                "model": name,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": 2,
                "temperature": 0,
            },
            pool=running.pool,
        )
        body = await response.content()
        self.assertEqual(response.code, 200, body[:500] + running.text()[-3000:].encode())
        answer: dict[str, Any] = json.loads(body)
        return answer

    def saves(self, name: str) -> list[str]:
        found = []
        for here, _, names in os.walk(self.cache_dir):
            found.extend(
                os.path.join(here, n)
                for n in names
                if n.startswith(name + "-") and n.endswith(".bin")
            )
        return found

    async def test_swap_back_reuses_the_prompt(self) -> None:
        running = await self.serve()
        first = await self.chat(running, "a", PROMPT)
        prompt_tokens = first["usage"]["prompt_tokens"]
        self.assertGreater(prompt_tokens, 1300)
        self.assertEqual(first["timings"]["cache_n"], 0)
        await self.chat(running, "b", "hello")  # swaps a out: its slot is saved
        again = await self.chat(running, "a", PROMPT)  # swaps back: restored
        self.assertGreaterEqual(again["timings"]["cache_n"], prompt_tokens - 5, running.text())
        self.assertLessEqual(again["timings"]["prompt_n"], 5)
        self.assertIn("a prompt cache: restored slot 0", running.text())

    async def test_cache_is_bounded(self) -> None:
        running = await self.serve(max_bytes="1MiB")
        await self.chat(running, "a", PROMPT)
        since = time.time()
        await self.chat(running, "b", PROMPT)  # a saved
        await self.saved_after("a", since)
        self.assertEqual(len(self.saves("a")), 1)
        await self.chat(running, "a", "short")  # b saved: over the bound, a's goes
        await poll_until(lambda: "promptCacheMaxBytes reached" in running.text(), timeout=30)
        self.assertEqual(self.saves("a"), [])
        self.assertEqual(len(self.saves("b")), 1)
        total = sum(
            os.path.getsize(os.path.join(here, n))
            for here, _, names in os.walk(self.cache_dir)
            for n in names
            if n.endswith(".bin")
        )
        self.assertLessEqual(total, 1024 * 1024)

    async def test_corrupt_or_foreign_file_ignored(self) -> None:
        running = await self.serve()
        await self.chat(running, "a", PROMPT)
        await self.chat(running, "b", "a different prompt for b " * 20)  # a saved
        since = time.time()
        await self.chat(running, "a", "x")  # b saved
        await self.saved_after("b", since)
        since = time.time()
        await self.chat(running, "b", "y")  # a saved again
        await self.saved_after("a", since)
        (a_file,) = self.saves("a")
        (b_file,) = self.saves("b")
        # A foreign file (b's save put in a's place) is not sent to the server.
        shutil.copyfile(b_file, a_file)
        seen = len(running.text())
        answer = await self.chat(running, "a", PROMPT)
        self.assertIn("a prompt cache: ignoring", running.text()[seen:])
        self.assertNotIn("a prompt cache: restored", running.text()[seen:])
        self.assertLess(answer["timings"]["cache_n"], 50)
        # A corrupt file the manifest vouches for: the server refuses it, the
        # request is served all the same.
        since = time.time()
        await self.chat(running, "b", "z")  # a saved
        await self.saved_after("a", since)
        (a_file,) = self.saves("a")
        with open(a_file, "r+b") as stream:
            stream.write(b"\0garbage\0" * 16)
        vouch(a_file)
        answer = await self.chat(running, "a", PROMPT)
        self.assertIn("Unable to restore slot", running.text())
        self.assertGreater(answer["usage"]["prompt_tokens"], 1300)
        self.assertEqual(answer["timings"]["cache_n"], 0)

    async def saved_after(self, name: str, since: float) -> None:
        """Wait until ``name``'s manifest lists a save made after ``since``."""

        def saved() -> bool:
            for here, _, names in os.walk(self.cache_dir):
                for n in names:
                    if n.startswith(name + "-") and n.endswith(MANIFEST_SUFFIX):
                        with open(os.path.join(here, n)) as stream:
                            slots = json.load(stream)["slots"].values()
                        return any(entry["saved"] >= since for entry in slots)
            return False

        await poll_until(saved, timeout=30)


def vouch(path: str) -> None:
    """Make the manifest next to ``path`` describe the file as it is now."""
    folder = os.path.dirname(path)
    (manifest_name,) = [n for n in os.listdir(folder) if n.endswith(MANIFEST_SUFFIX)]
    manifest_path = os.path.join(folder, manifest_name)
    with open(manifest_path) as stream:
        manifest = json.load(stream)
    stat = os.stat(path)
    for entry in manifest["slots"].values():
        if entry["file"] == os.path.basename(path):
            entry.update(
                bytes=stat.st_size, mtime_ns=stat.st_mtime_ns, crc=_sample_crc(path, stat.st_size)
            )
    with open(manifest_path, "w") as stream:
        json.dump(manifest, stream)
