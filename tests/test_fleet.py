"""Issue 15 point 4: a fleet on one machine, proved end to end.

Three model hosts (127.0.0.2-4) and two fronts (127.0.0.5-6), each a real
llamaswap process on its own loopback address and the same port, demo
upstreams as models, HAProxy (127.0.0.7) in front of the fronts.  Host 2
and host 3 both serve ``shared``: a replica set."""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import HTTPConnectionPool

from tests.fleetsupport import CONNECT_TIMEOUT, HAPROXY, Fleet
from tests.support import pid_alive, poll_until

H2, H3, H4 = "127.0.0.2", "127.0.0.3", "127.0.0.4"
FRONTS = ["127.0.0.5", "127.0.0.6"]
LB = "127.0.0.7"


class _Stream:
    """One streamed chat through the balancer, read chunk by chunk."""

    def __init__(self, url: str, model: str, tokens: int, pool: Any) -> None:
        self.chunks: list[bytes] = []
        self.front = ""
        self.code = 0
        self.error: BaseException | None = None
        self.done = defer.ensureDeferred(self._run(url, model, tokens, pool))

    async def _run(self, url: str, model: str, tokens: int, pool: Any) -> None:
        body = {
            "model": model,
            "stream": True,
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": "hi"}],
        }
        try:
            response = await treq.post(
                url + "/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={b"content-type": [b"application/json"]},
                pool=pool,
            )
            self.code = response.code
            self.front = (response.headers.getRawHeaders(b"x-front") or [b""])[0].decode()
            await treq.collect(response, self.chunks.append)
        except Exception as exc:
            self.error = exc

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")

    @property
    def complete(self) -> bool:
        return self.error is None and "data: [DONE]" in self.text

    @property
    def error_event(self) -> bool:
        return '"error"' in self.text and "upstream ended the stream early" in self.text


class FleetTests(TestCase):
    timeout = 90

    async def setUp(self) -> None:
        if HAPROXY is None:
            raise SkipTest("haproxy is not installed (apt-get install haproxy)")
        self.fleet = Fleet(
            {H2: {"alpha": 0, "shared": 20}, H3: {"beta": 0, "shared": 20}, H4: {"gamma": 20}},
            FRONTS,
            LB,
        )
        self.addCleanup(self._teardown)
        await self.fleet.start()
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def _teardown(self) -> None:
        pids = self.fleet.all_pids()
        await self.fleet.stop()
        self.assertEqual([p for p in pids if pid_alive(p)], [])
        self.assertFalse(os.path.exists(self.fleet.dir))

    async def chat(self, model: str, url: str | None = None) -> tuple[int, str]:
        body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        response = await treq.post(
            (url or self.fleet.url) + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={b"content-type": [b"application/json"]},
            pool=self.pool,
        )
        text = (await response.content()).decode()
        if response.code != 200:
            return response.code, text
        return 200, json.loads(text)["choices"][0]["message"]["content"]

    async def loaded_everywhere(self, fqn: str) -> bool:
        for front in FRONTS:
            response = await treq.get(f"http://{front}:{self.fleet.port}/v1/models", pool=self.pool)
            records = {r["id"]: r for r in json.loads(await response.content())["data"]}
            if records[fqn]["status"]["value"] != "loaded":
                return False
        return True

    async def test_fleet(self) -> None:
        # 1. Requests reach the host that serves their model, through either front.
        for model, host in (("alpha", H2), ("beta", H3), ("gamma", H4), ("h3/shared", H3)):
            for _ in range(2):  # round robin: both fronts
                code, text = await self.chat(model)
                self.assertEqual(code, 200, text)
                self.assertIn(f"[{host}]", text)

        # 2. A replica takes over when its host is stopped mid-traffic.  The
        # fronts know host 3 has "shared" loaded, so they send it there.
        await poll_until_async(lambda: self.loaded_everywhere("h3/shared"), timeout=10)
        streams = [_Stream(self.fleet.url, "shared", 200, self.pool) for _ in range(4)]
        await poll_until(lambda: all(len(s.chunks) >= 2 for s in streams), timeout=10)
        self.assertTrue(all(f"[{H3}]" in s.text for s in streams))
        killed_at = reactor.seconds()
        self.fleet.kill(H3)
        await defer.gatherResults([s.done for s in streams])
        ended = reactor.seconds() - killed_at
        for s in streams:
            self.assertEqual(s.code, 200)
            self.assertTrue(s.error_event, s.text[-300:])
        self.assertLess(ended, CONNECT_TIMEOUT + 3)
        started = reactor.seconds()
        for _ in range(4):
            code, text = await self.chat("shared")
            self.assertEqual(code, 200, text)
            self.assertIn(f"[{H2}]", text)
        self.assertLess(reactor.seconds() - started, CONNECT_TIMEOUT + 10)
        code, text = await self.chat("h3/shared")  # pinned to the dead host: 503 at once
        self.assertEqual(code, 503, text)

        # 3. A front killed mid-traffic costs only its in-flight requests.
        streams = [_Stream(self.fleet.url, "gamma", 100, self.pool) for _ in range(4)]
        await poll_until(lambda: all(len(s.chunks) >= 2 for s in streams), timeout=10)
        fronts = sorted(s.front for s in streams)
        self.assertEqual(fronts, ["f5", "f5", "f6", "f6"])
        self.fleet.kill(FRONTS[0])
        after = [await self.chat("gamma") for _ in range(4)]
        await defer.gatherResults([s.done for s in streams])
        for s in streams:
            if s.front == "f5":
                self.assertFalse(s.complete)
            else:
                self.assertTrue(s.complete, s.text[-300:])
        for code, text in after:
            self.assertEqual(code, 200, text)
            self.assertIn(f"[{H4}]", text)


async def poll_until_async(predicate: Any, timeout: float) -> None:
    """Wait until the coroutine ``predicate()`` is true."""
    deadline = reactor.seconds() + timeout
    while not await predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not true within {timeout}s")
        await task.deferLater(reactor, 0.1, lambda: None)
