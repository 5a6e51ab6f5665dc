"""Tests for llamaswap.supervision.promptcache: slots saved before a stop
llamaswap chose and restored after the next start, against a llama-server
stand-in (tests/fakellama.py) on loopback."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import treq
from twisted.internet import reactor
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from llamaswap.config import ConfigError, load_config_text
from llamaswap.config.promptcache import DEFAULT_PROMPT_CACHE_MAX_BYTES, PromptCacheSettings
from llamaswap.supervision import promptcache as promptcache_module
from llamaswap.supervision.health import http_probe
from llamaswap.supervision.launcher import ProcessGroupLauncher
from llamaswap.supervision.process import ModelProcess, ProcessState
from llamaswap.supervision.promptcache import (
    MANIFEST_SUFFIX,
    NOOP_LIMIT,
    PromptCaches,
    command_hash,
    default_prompt_cache_dir,
    enforce_bound,
    saves_on,
)
from tests.support import HERE, PYTHON, ServiceProcess, free_port, poll_until

FAKE = os.path.join(HERE, "fakellama.py")


def config_text(
    extra: str = "", model: str = "m", unload: int = 10, prompt_cache: bool = True
) -> str:
    return (
        "models:\n"
        f"  {model}:\n"
        f"    cmd: {PYTHON} {FAKE} --port ${{PORT}} {extra}\n"
        f"    unloadTimeout: {unload}\n"
        f"    promptCache: {'true' if prompt_cache else 'false'}\n"
    )


def load(text: str, start_port: int = 0) -> Any:
    port = start_port or free_port()
    return load_config_text(f"startPort: {port}\n" + text, environ={})


class ConfigTests(SynchronousTestCase):
    def test_keys(self) -> None:
        config = load_config_text(
            "promptCacheDir: /tmp/pc\npromptCacheMaxBytes: 2GiB\n"
            "models:\n  a:\n    cmd: llama-server --port ${PORT}\n    promptCache: true\n"
            "  b:\n    cmd: llama-server --port ${PORT}\n",
            environ={},
        )
        self.assertEqual(config.prompt_cache, PromptCacheSettings("/tmp/pc", 2 * 1024**3))
        self.assertTrue(config.models["a"].prompt_cache)
        self.assertFalse(config.models["b"].prompt_cache)

    def test_defaults(self) -> None:
        config = load_config_text("models: {}\n", environ={})
        self.assertEqual(
            config.prompt_cache, PromptCacheSettings(None, DEFAULT_PROMPT_CACHE_MAX_BYTES)
        )

    def test_problems_name_the_key(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            load_config_text(
                "promptCacheDir: ''\npromptCacheMaxBytes: -3\n"
                "models:\n  a:\n    cmd: x --port ${PORT}\n    promptCache: maybe\n",
                environ={},
            )
        text = str(raised.exception)
        self.assertIn("promptCacheDir: must be a folder path", text)
        self.assertIn("promptCacheMaxBytes: must be a positive size", text)
        self.assertIn("models.a.promptCache: must be true or false", text)

    def test_needs_a_command(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            load_config_text(
                "models:\n  a:\n    proxy: http://127.0.0.1:9\n    promptCache: true\n",
                environ={},
            )
        self.assertIn(
            "models.a.promptCache: needs a cmd that starts llama-server", str(raised.exception)
        )

    def test_warns_for_a_command_unlike_llama_server(self) -> None:
        config = load_config_text(
            "models:\n  a:\n    cmd: vllm serve x --port ${PORT}\n    promptCache: true\n",
            environ={},
        )
        self.assertEqual(
            config.warnings,
            (
                "models.a.promptCache: for llama-server only, and the command does not "
                "look like one (--slot-save-path is added to it)",
            ),
        )


class NamingTests(SynchronousTestCase):
    def test_default_dir(self) -> None:
        self.assertEqual(
            default_prompt_cache_dir({"STATE_DIRECTORY": "/var/lib/llamaswap:/x"}),
            "/var/lib/llamaswap/prompt-cache",
        )
        self.assertEqual(
            default_prompt_cache_dir({"XDG_STATE_HOME": "/s"}), "/s/llamaswap/prompt-cache"
        )
        self.assertEqual(
            default_prompt_cache_dir({"HOME": "/h"}), "/h/.local/state/llamaswap/prompt-cache"
        )

    def test_hash_ignores_the_port_not_the_command(self) -> None:
        text = (
            "models:\n  m:\n    cmd: llama-server --port ${PORT} -c 4096\n    promptCache: true\n"
        )
        a = load_config_text("startPort: 5000\n" + text, environ={}).models["m"]
        b = load_config_text("startPort: 6000\n" + text, environ={}).models["m"]
        c = load_config_text("startPort: 5000\n" + text.replace("4096", "8192"), environ={}).models[
            "m"
        ]
        d = load_config_text(
            "startPort: 5000\n" + text + "    env: [LLAMA_ARG_N_GPU_LAYERS=9]\n", environ={}
        ).models["m"]
        self.assertEqual(command_hash(a), command_hash(b))
        self.assertNotEqual(command_hash(a), command_hash(c))
        self.assertNotEqual(command_hash(a), command_hash(d))

    def test_saves_on(self) -> None:
        for reason in ("swap", "ttl", "unload", "reload", "memory"):
            self.assertTrue(saves_on(reason), reason)
        for reason in ("crash", "shutdown", None):
            self.assertFalse(saves_on(reason), reason)


class BoundTests(SynchronousTestCase):
    def write(self, path: str, size: int) -> None:
        with open(path, "wb") as stream:
            stream.write(b"x" * size)

    def test_unknown_first_then_least_recently_used(self) -> None:
        root = self.mktemp()
        folder = os.path.join(root, "m-0123456789ab")
        os.makedirs(folder)
        for name in ("m-0123456789ab-slot0.bin", "m-0123456789ab-slot1.bin", "stray.bin"):
            self.write(os.path.join(folder, name), 100)
        manifest = {
            "version": 1,
            "slots": {
                "0": {"file": "m-0123456789ab-slot0.bin", "used": 200.0},
                "1": {"file": "m-0123456789ab-slot1.bin", "used": 100.0},
            },
        }
        with open(os.path.join(folder, "m-0123456789ab" + MANIFEST_SUFFIX), "w") as stream:
            json.dump(manifest, stream)
        self.assertEqual(enforce_bound([(root, True)], 300), [])
        deleted = enforce_bound([(root, True)], 150)
        self.assertEqual(
            [os.path.basename(p) for p in deleted], ["stray.bin", "m-0123456789ab-slot1.bin"]
        )
        self.assertTrue(os.path.exists(os.path.join(folder, "m-0123456789ab-slot0.bin")))

    def test_shared_folder_only_our_files(self) -> None:
        folder = self.mktemp()
        os.makedirs(folder)
        self.write(os.path.join(folder, "theirs.bin"), 500)
        self.write(os.path.join(folder, "m-0123456789ab-slot0.bin"), 100)
        deleted = enforce_bound([(folder, False)], 50)
        self.assertEqual([os.path.basename(p) for p in deleted], ["m-0123456789ab-slot0.bin"])
        self.assertTrue(os.path.exists(os.path.join(folder, "theirs.bin")))


class PromptCacheTests(TestCase):
    """A ModelProcess of the stand-in server with ``promptCache: true``."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.events: list[dict[str, Any]] = []
        self.patch(
            promptcache_module,
            "log",
            Logger(namespace="promptcache", observer=self.events.append),
        )
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.processes: list[ModelProcess] = []

    async def tearDown(self) -> None:  # type: ignore[override]
        for process in self.processes:
            await process.shutdown(5)

    def caches(self, max_bytes: int = DEFAULT_PROMPT_CACHE_MAX_BYTES) -> PromptCaches:
        return PromptCaches(reactor, PromptCacheSettings(self.root, max_bytes), {})

    def process(self, caches: PromptCaches, text: str) -> ModelProcess:
        config = load(text)
        model = next(iter(config.models.values()))
        process = ModelProcess(
            model,
            clock=reactor,
            launcher=ProcessGroupLauncher(reactor),
            probe=http_probe(reactor),
            output=lambda data: None,
            health_check_timeout=20,
            environ=os.environ,
            hooks=caches.for_model(model),
        )
        self.processes.append(process)
        return process

    async def get(self, process: ModelProcess, path: str) -> Any:
        response = await treq.get(process.config.proxy + path, pool=self.pool)
        return json.loads(await response.content())

    async def chat(self, process: ModelProcess, text: str) -> int:
        response = await treq.post(
            process.config.proxy + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": text}]},
            pool=self.pool,
        )
        body = json.loads(await response.content())
        cache_n: int = body["timings"]["cache_n"]
        return cache_n

    def logged(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def files(self) -> list[str]:
        found = []
        for here, _, names in os.walk(self.root):
            found.extend(os.path.relpath(os.path.join(here, n), self.root) for n in names)
        return sorted(found)

    async def test_saved_before_a_swap_restored_after_the_start(self) -> None:
        caches = self.caches()
        process = self.process(caches, config_text())
        await process.make_ready()
        argv = await self.get(process, "/argv")
        folder = argv[argv.index("--slot-save-path") + 1]
        self.assertEqual(os.path.dirname(folder), self.root)
        prompt = " ".join(f"w{i}" for i in range(50))
        self.assertEqual(await self.chat(process, prompt), 0)
        await process.stop(reason="swap")
        await caches.lock.run(lambda: None)  # the saves are confirmed
        base = os.path.basename(folder)
        self.assertEqual(
            self.files(), [f"{base}/{base}-slot0.bin", f"{base}/{base}{MANIFEST_SUFFIX}"]
        )
        self.assertIn("saved slot 0 (50 tokens", self.logged())

        await process.make_ready()
        calls = await self.get(process, "/calls")
        self.assertEqual(calls, [{"slot": 0, "action": "restore", "filename": f"{base}-slot0.bin"}])
        self.assertEqual(await self.chat(process, prompt + " more"), 50)
        self.assertIn("restored slot 0 (50 tokens)", self.logged())

    async def test_ttl_and_unload_save_shutdown_does_not(self) -> None:
        caches = self.caches()
        process = self.process(caches, config_text())
        await process.make_ready()
        await self.chat(process, "a b c")
        await process.stop(reason="unload")
        await caches.lock.run(lambda: None)
        self.assertEqual(len([f for f in self.files() if f.endswith(".bin")]), 1)
        await process.make_ready()
        await self.chat(process, "x y z w v")
        await process.shutdown(5)
        await caches.lock.run(lambda: None)
        manifest_path = next(f for f in self.files() if f.endswith(MANIFEST_SUFFIX))
        with open(os.path.join(self.root, manifest_path)) as stream:
            manifest = json.load(stream)
        # The shutdown saved nothing: the unload's 3 tokens are what is kept.
        self.assertEqual(manifest["slots"]["0"]["tokens"], 3)

    async def test_ttl_saves(self) -> None:
        caches = self.caches()
        process = self.process(caches, config_text() + "    ttl: 1\n")
        await process.make_ready()
        process.request_started()
        await self.chat(process, "a b c")
        process.request_finished()
        await poll_until(lambda: process.state is ProcessState.STOPPED, timeout=20)
        await caches.lock.run(lambda: None)
        self.assertEqual(len([f for f in self.files() if f.endswith("-slot0.bin")]), 1)
        self.assertIn("before the ttl stop", self.logged())

    async def test_crash_saves_nothing(self) -> None:
        caches = self.caches()
        process = self.process(caches, config_text())
        await process.make_ready()
        await self.chat(process, "a b c")
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        await poll_until(lambda: process.state is ProcessState.STOPPED, timeout=20)
        await caches.lock.run(lambda: None)
        self.assertEqual([f for f in self.files() if f.endswith(".bin")], [])
        self.assertNotIn("saved slot", self.logged())

    async def test_command_with_its_own_save_path(self) -> None:
        own = os.path.abspath(self.mktemp())
        os.makedirs(own)
        caches = self.caches()
        process = self.process(caches, config_text(f"--slot-save-path {own}"))
        await process.make_ready()
        argv = await self.get(process, "/argv")
        self.assertEqual(argv.count("--slot-save-path"), 1)
        await self.chat(process, "a b c")
        await process.stop(reason="swap")
        await caches.lock.run(lambda: None)
        self.assertEqual(len([n for n in os.listdir(own) if n.endswith("-slot0.bin")]), 1)
        self.assertFalse(os.path.exists(self.root))

    async def test_another_command_never_restores(self) -> None:
        caches = self.caches()
        first = self.process(caches, config_text("--tag one"))
        await first.make_ready()
        await self.chat(first, "a b c")
        await first.stop(reason="reload")
        second = self.process(caches, config_text("--tag two"))
        await second.make_ready()
        self.assertEqual(await self.get(second, "/calls"), [])
        # Even a manifest of the other command copied into this command's
        # folder is refused.
        folders = sorted(os.listdir(self.root))
        self.assertEqual(len(folders), 2)
        await second.stop(reason="swap")
        await caches.lock.run(lambda: None)
        one = command_hash(first.config)[:12]
        source = next(f for f in folders if one in f)
        target = next(f for f in folders if one not in f)
        with open(os.path.join(self.root, source, source + MANIFEST_SUFFIX)) as stream:
            manifest = stream.read()
        with open(os.path.join(self.root, target, target + MANIFEST_SUFFIX), "w") as stream:
            stream.write(manifest)
        await second.make_ready()
        self.assertEqual(await self.get(second, "/calls"), [])
        self.assertIn("saved by another command", self.logged())

    async def test_changed_file_ignored(self) -> None:
        caches = self.caches()
        process = self.process(caches, config_text())
        await process.make_ready()
        await self.chat(process, "a b c")
        await process.stop(reason="swap")
        await caches.lock.run(lambda: None)
        path = os.path.join(self.root, next(f for f in self.files() if f.endswith(".bin")))
        with open(path, "wb") as stream:
            stream.write(b"not a save file at all")
        await process.make_ready()
        self.assertEqual(process.state, ProcessState.READY)
        self.assertEqual(await self.get(process, "/calls"), [])
        self.assertIn("changed since it was saved", self.logged())

    async def test_corrupt_file_the_server_refuses(self) -> None:
        caches = self.caches()
        process = self.process(caches, config_text())
        await process.make_ready()
        await self.chat(process, "a b c")
        await process.stop(reason="swap")
        await caches.lock.run(lambda: None)
        path = os.path.join(self.root, next(f for f in self.files() if f.endswith(".bin")))
        manifest_path = os.path.join(
            self.root, next(f for f in self.files() if f.endswith(MANIFEST_SUFFIX))
        )
        with open(path, "wb") as stream:
            stream.write(b"garbage that the manifest vouches for")
        # Make the manifest vouch for the garbage: only the server can tell.
        stat = os.stat(path)
        with open(manifest_path) as stream:
            manifest = json.load(stream)
        manifest["slots"]["0"].update(
            bytes=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
            crc=promptcache_module._sample_crc(path, stat.st_size),
        )
        with open(manifest_path, "w") as stream:
            json.dump(manifest, stream)
        await process.make_ready()
        self.assertEqual(process.state, ProcessState.READY)
        self.assertEqual(len(await self.get(process, "/calls")), 1)
        self.assertIn("invalid slot save file", self.logged())
        self.assertEqual(await self.chat(process, "a b c"), 0)

    async def test_failing_save_does_not_fail_the_stop(self) -> None:
        caches = self.caches()
        process = self.process(caches, config_text("--fail-saves"))
        await process.make_ready()
        await self.chat(process, "a b c")
        await process.stop(reason="swap")
        self.assertEqual(process.state, ProcessState.STOPPED)
        self.assertIn("saving slot 0 answered 500: Unable to save slot", self.logged())
        await process.make_ready()
        self.assertEqual(await self.get(process, "/calls"), [])

    async def test_hanging_save_bounded_by_the_stop_budget(self) -> None:
        caches = self.caches()
        process = self.process(caches, config_text("--hang-saves", unload=2))
        await process.make_ready()
        await self.chat(process, "a b c")
        began = reactor.seconds()
        await process.stop()
        # Half of the 2 s budget for the save, the rest for the exit (the
        # slack is for a loaded machine; a save not bounded would hang here).
        self.assertLess(reactor.seconds() - began, 2 + 3)
        self.assertEqual(process.state, ProcessState.STOPPED)
        self.assertIn("saving slot 0 failed", self.logged())

    async def test_bound_keeps_the_folder_small(self) -> None:
        caches = self.caches(max_bytes=1)
        process = self.process(caches, config_text())
        await process.make_ready()
        await self.chat(process, "a b c")
        await process.stop(reason="swap")
        # The confirmation and the bound run in the thread pool after the stop.
        await poll_until(lambda: "promptCacheMaxBytes reached" in self.logged(), timeout=10)
        await caches.lock.run(lambda: None)
        self.assertEqual([f for f in self.files() if f.endswith(".bin")], [])

    async def test_restores_never_reused_switch_it_off(self) -> None:
        caches = self.caches()
        process = self.process(caches, config_text())
        prompt = "a b c d"
        for _ in range(NOOP_LIMIT):
            await process.make_ready()
            await self.chat(process, prompt)
            await process.stop(reason="swap")
            await process.make_ready()
            # The next response reused nothing (a different conversation).
            caches.observed(process.model_id, 200, 0)
            await process.stop(reason="swap")
        self.assertIn("prompt cache switched off", self.logged())
        await process.make_ready()
        self.assertNotIn("--slot-save-path", await self.get(process, "/argv"))

    async def test_one_reuse_resets_the_count(self) -> None:
        caches = self.caches()
        process = self.process(caches, config_text())
        for cache_n in (0, 0, 7, 0, 0):
            await process.make_ready()
            await self.chat(process, "a b c d")
            await process.stop(reason="swap")
            await process.make_ready()
            caches.observed(process.model_id, 200, cache_n)
            caches.observed(process.model_id, 200, 0)  # not the first response: not counted
            await process.stop(reason="swap")
        self.assertNotIn("switched off", self.logged())


class ServiceWiringTests(TestCase):
    """Through llamaswap itself: responses' ``timings.cache_n`` reach the cache."""

    timeout = 120

    async def test_unused_restores_switch_it_off_through_the_service(self) -> None:
        root = os.path.abspath(self.mktemp())
        ports: set[int] = set()
        while len(ports) < 3:  # the models' and llamaswap's, all different
            ports.add(free_port())
        a_port, b_port, listen = sorted(ports)
        config = {
            "promptCacheDir": root,
            "models": {
                name: {
                    "cmd": f"{PYTHON} {FAKE} --port {port}",
                    "proxy": f"http://127.0.0.1:{port}",
                    "promptCache": True,
                }
                for name, port in (("a", a_port), ("b", b_port))
            },
        }
        path = os.path.abspath(self.mktemp()) + ".yaml"
        with open(path, "w") as stream:
            json.dump(config, stream)
        running = ServiceProcess(["-m", "llamaswap", "-c", path], listen)
        self.addCleanup(self.stop, running)
        await running.wait_up()

        async def chat(name: str, text: str) -> int:
            response = await treq.post(
                running.url + "/v1/chat/completions",
                json={"model": name, "messages": [{"role": "user", "content": text}]},
                pool=running.pool,
            )
            body = json.loads(await response.content())
            cache_n: int = body["timings"]["cache_n"]
            return cache_n

        await chat("a", "one two three")
        await chat("b", "x")  # a saved
        self.assertEqual(await chat("a", "one two three four"), 3)  # restored and reused
        for round in range(NOOP_LIMIT):
            await chat("b", "x")
            # A new conversation each time: the restore is never reused.
            self.assertEqual(await chat("a", f"other{round} words"), 0)
        await poll_until(lambda: "a prompt cache switched off" in running.text(), timeout=30)
        self.assertNotIn("b prompt cache switched off", running.text())

    async def stop(self, running: ServiceProcess) -> None:
        if not running.ended.called:
            running.transport.signalProcess(signal.SIGTERM)
            await running.ended
