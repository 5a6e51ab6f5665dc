"""End-to-end tests: the whole service over loopback with real child servers."""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from llamaswap.config import load_config_text
from llamaswap.service.wiring import build_service
from llamaswap.supervision.process import ProcessState
from llamaswap.web.errors import TOO_MANY_REQUESTS
from llamaswap.web.site import LlamaSwapSite
from tests.support import (
    PYTHON,
    REPO,
    RESPONDER,
    ServiceProcess,
    base_url,
    descendants,
    free_port,
    pid_alive,
    poll_until,
)


def responder_model(port: int, *extra: str, **keys: Any) -> dict[str, Any]:
    """A model entry running tests/responder.py on ``port``."""
    entry: dict[str, Any] = {
        "cmd": " ".join([PYTHON, RESPONDER, "--port", str(port), *extra]),
        "proxy": f"http://127.0.0.1:{port}",
    }
    entry.update(keys)
    return entry


class ServiceTestCase(TestCase):
    """Runs a LlamaSwapService on a loopback port for each test."""

    timeout = 60

    async def start(self, models: dict[str, Any], **globals_: Any) -> None:
        document = {"healthCheckTimeout": 15, **globals_, "models": models}
        self.config = load_config_text(json.dumps(document), environ=dict(os.environ))
        self.service = build_service(self.config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.port = reactor.listenTCP(
            0, LlamaSwapSite(self.service.app.resource()), interface="127.0.0.1"
        )
        self.addCleanup(self.port.stopListening)
        self.url = base_url(self.port)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    @property
    def router(self) -> Any:
        return self.service.router

    async def chat(self, model: str, **extra: Any) -> Any:
        body = json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        )
        return await treq.post(
            self.url + "/v1/chat/completions",
            data=body.encode(),
            headers={b"content-type": [b"application/json"]},
            pool=self.pool,
        )

    def state(self, model: str) -> ProcessState:
        return self.router.processes[model].state

    async def settled(self) -> None:
        """Wait until no request is reserved or in flight anywhere."""
        scheduler = self.router.scheduler
        await poll_until(
            lambda: all(
                scheduler.reserved(m) == 0 and scheduler.in_flight(m) == 0
                for m in self.config.models
            )
        )


class SwapTests(ServiceTestCase):
    async def test_on_demand_start_and_swap(self) -> None:
        """The first request starts its model; a request for another model
        stops the first (its process is gone) and starts the second."""
        await self.start({"a": responder_model(free_port()), "b": responder_model(free_port())})
        response = await self.chat("a")
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual(self.state("a"), ProcessState.READY)
        pid_a = self.router.processes["a"].pid
        response = await self.chat("b")
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual(self.state("b"), ProcessState.READY)
        self.assertEqual(self.state("a"), ProcessState.STOPPED)
        self.assertFalse(pid_alive(pid_a))
        running = await (await treq.get(self.url + "/running", pool=self.pool)).json()
        self.assertEqual([r["model"] for r in running["running"]], ["b"])
        self.assertEqual(running["running"][0]["state"], "ready")
        await self.settled()

    async def test_concurrent_requests_share_one_start(self) -> None:
        """Requests arriving while the model starts join that start."""
        await self.start({"a": responder_model(free_port(), "--startup-delay", "0.5")})
        starts = []
        self.router.processes["a"].add_state_listener(
            lambda p, old, new: starts.append(new) if new is ProcessState.STARTING else None
        )
        responses = await defer.gatherResults(
            [defer.ensureDeferred(self.chat("a")) for _ in range(3)]
        )
        self.assertEqual([r.code for r in responses], [200, 200, 200])
        for r in responses:
            await r.content()
        self.assertEqual(len(starts), 1)
        await self.settled()

    async def test_alias_and_use_model_name(self) -> None:
        """An alias reaches its model, and useModelName rewrites only the
        model value in the body sent upstream."""
        await self.start(
            {"real": responder_model(free_port(), aliases=["nick"], useModelName="upstream-name")}
        )
        body = b'{"model": "nick", "n": 1.50, "s": "\\u00e9"}'
        response = await treq.post(
            self.url + "/v1/chat/completions",
            data=body,
            headers={b"content-type": [b"application/json"]},
            pool=self.pool,
        )
        payload = await response.json()
        self.assertEqual(response.code, 200)
        self.assertEqual(
            payload["request_body"], '{"model": "upstream-name", "n": 1.50, "s": "\\u00e9"}'
        )

    async def test_start_failure_answers_waiters_and_retries(self) -> None:
        """A model whose server exits during start-up answers 500 with the
        exit status and last output; the next request tries again."""
        port = free_port()
        await self.start(
            {
                "bad": responder_model(
                    port, "--exit-after", "0", "--exit-code", "3", "--print", "boom-line"
                )
            }
        )
        starts = []
        self.router.processes["bad"].add_state_listener(
            lambda p, old, new: starts.append(new) if new is ProcessState.STARTING else None
        )
        for _ in range(2):
            response = await self.chat("bad")
            self.assertEqual(response.code, 500)
            payload = await response.json()
            message = payload["error"]["message"]
            self.assertIn("exit code 3", message)
            self.assertIn("boom-line", message)
        self.assertEqual(self.state("bad"), ProcessState.STOPPED)
        # each request: the start, and one retry because the server died
        self.assertEqual(len(starts), 4)
        await self.settled()

    async def test_crash_during_start_is_retried_once(self) -> None:
        """A server that dies during its first start gets one fresh start;
        the waiting request is served by it."""
        import tempfile

        marker = os.path.join(tempfile.mkdtemp(), "crashed")
        self.addCleanup(lambda: os.path.exists(marker) and os.unlink(marker))
        await self.start({"a": responder_model(free_port(), "--crash-first-start", marker)})
        response = await self.chat("a")
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertTrue(os.path.exists(marker))
        await self.settled()

    async def test_concurrency_limit_429(self) -> None:
        """Past concurrencyLimit, requests get 429 with llama-swap's body."""
        await self.start({"a": responder_model(free_port(), concurrencyLimit=1)})
        slow = await treq.get(
            self.url + "/upstream/a/slow?chunks=20&delay=0.05", pool=self.pool, unbuffered=True
        )
        self.assertEqual(slow.code, 200)
        response = await self.chat("a")
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(await response.content(), TOO_MANY_REQUESTS)
        await slow.content()
        await self.settled()

    async def test_disconnect_while_loading_releases(self) -> None:
        """A client that leaves while its model loads holds nothing
        afterwards; the load completes."""
        await self.start({"a": responder_model(free_port(), "--startup-delay", "0.6")})
        d = defer.ensureDeferred(self.chat("a"))
        await poll_until(lambda: self.state("a") is ProcessState.STARTING)
        await poll_until(lambda: self.router.scheduler.reserved("a") == 1)
        d.cancel()
        d.addErrback(lambda f: None)
        await poll_until(lambda: self.state("a") is ProcessState.READY)
        await self.settled()

    async def test_disconnect_mid_stream_releases(self) -> None:
        """A client that leaves mid-stream releases its in-flight slot."""
        await self.start({"a": responder_model(free_port())})
        response = await treq.get(
            self.url + "/upstream/a/slow?chunks=100&delay=0.05", pool=self.pool, unbuffered=True
        )
        received: list[bytes] = []
        collecting = treq.collect(response, received.append)
        await poll_until(lambda: received)
        self.assertEqual(self.router.scheduler.in_flight("a"), 1)
        collecting.addErrback(lambda f: None)
        collecting.cancel()
        response.original._transport.loseConnection()
        await self.settled()

    async def test_stop_service_leaves_no_children(self) -> None:
        """Stopping the service stops every child, grandchildren included."""
        port = free_port()
        await self.start({"a": responder_model(port, "--spawn-grandchild")})
        response = await self.chat("a")
        await response.content()
        process = self.router.processes["a"]
        pid = process.pid
        grandchild = await self._grandchild_pid(process)
        await self.service.stopService()
        self.assertFalse(pid_alive(pid))
        self.assertFalse(pid_alive(grandchild))

    async def _grandchild_pid(self, process: Any) -> int:
        found: list[int] = []

        def scan() -> bool:
            for line in self.service.logs.model(process.model_id).history().decode().splitlines():
                if line.startswith("GRANDCHILD "):
                    found.append(int(line.split()[1]))
                    return True
            return False

        await poll_until(scan)
        return found[0]


class EndpointTests(ServiceTestCase):
    async def test_models_listing(self) -> None:
        """/v1/models lists listed models sorted, with llama-swap's shape."""
        await self.start(
            {
                "b": responder_model(free_port(), name=" B model ", aliases=["bee"]),
                "a": responder_model(free_port(), description="first", metadata={"k": 1}),
                "hidden": responder_model(free_port(), unlisted=True),
            }
        )
        response = await treq.get(
            self.url + "/v1/models", headers={b"origin": [b"http://ui.example"]}, pool=self.pool
        )
        self.assertEqual(
            response.headers.getRawHeaders(b"access-control-allow-origin"), [b"http://ui.example"]
        )
        payload = await response.json()
        self.assertEqual(payload["object"], "list")
        self.assertEqual([m["id"] for m in payload["data"]], ["a", "b"])
        a, b = payload["data"]
        self.assertEqual(a["owned_by"], "llama-swap")
        self.assertEqual(a["object"], "model")
        self.assertEqual(a["description"], "first")
        self.assertNotIn("name", a)
        self.assertEqual(a["meta"], {"llamaswap": {"k": 1, "type": "model"}})
        self.assertEqual(a["status"], {"value": "unloaded"})
        self.assertEqual(b["name"], "B model")
        self.assertEqual(b["meta"]["llamaswap"]["aliases"], ["bee"])
        same = await (await treq.get(self.url + "/models", pool=self.pool)).json()
        self.assertEqual([m["id"] for m in same["data"]], ["a", "b"])

    async def test_errors(self) -> None:
        """Missing and unknown models give 404 in the format Accept asks for."""
        await self.start({"a": responder_model(free_port())})
        response = await treq.post(
            self.url + "/v1/chat/completions",
            data=b"{}",
            headers={b"content-type": [b"application/json"]},
            pool=self.pool,
        )
        self.assertEqual(response.code, 404)
        payload = await response.json()
        self.assertEqual(
            payload["error"]["message"],
            'no model given: the JSON body\'s "model" is missing or empty',
        )
        response = await treq.post(
            self.url + "/v1/chat/completions",
            data=b'{"model":"nope"}',
            headers={b"content-type": [b"application/json"], b"accept": [b"text/plain"]},
            pool=self.pool,
        )
        self.assertEqual(response.code, 404)
        self.assertEqual(
            await response.text(),
            'llama-swap: no local server found for requested model "nope"; '
            "GET /v1/models lists the available models",
        )
        response = await treq.get(self.url + "/v1/chat/completions", pool=self.pool)
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])
        response = await treq.get(self.url + "/nothing/here", pool=self.pool)
        self.assertEqual(response.code, 404)
        await response.content()
        health = await treq.get(self.url + "/health", pool=self.pool)
        self.assertEqual(await health.text(), "OK")

    async def test_upstream_longest_prefix_and_redirect(self) -> None:
        """/upstream picks the longest model id prefix (ids may contain
        slashes) and redirects the bare model path to its slash form."""
        await self.start(
            {
                "org": responder_model(free_port()),
                "org/model": responder_model(free_port()),
            }
        )
        response = await treq.get(self.url + "/upstream/org/model/health", pool=self.pool)
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual(self.state("org/model"), ProcessState.READY)
        self.assertEqual(self.state("org"), ProcessState.STOPPED)
        response = await treq.get(
            self.url + "/upstream/org/model?x=1", pool=self.pool, allow_redirects=False
        )
        self.assertEqual(response.code, 301)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/upstream/org/model/?x=1"])
        response = await treq.get(self.url + "/upstream/missing/x", pool=self.pool)
        self.assertEqual(response.code, 404)
        await response.content()

    async def test_unload_endpoints(self) -> None:
        """Unload by model (alias accepted) and unload-all stop processes."""
        await self.start({"a": responder_model(free_port(), aliases=["al"])})
        await (await self.chat("a")).content()
        self.assertEqual(self.state("a"), ProcessState.READY)
        response = await treq.post(self.url + "/api/models/unload/al", pool=self.pool)
        self.assertEqual(await response.text(), "OK")
        self.assertEqual(self.state("a"), ProcessState.STOPPED)
        response = await treq.post(self.url + "/api/models/unload/unknown", pool=self.pool)
        self.assertEqual(response.code, 404)
        await response.content()
        await (await self.chat("a")).content()
        response = await treq.post(self.url + "/api/models/unload", pool=self.pool)
        self.assertEqual(await response.json(), {"msg": "ok"})
        self.assertEqual(self.state("a"), ProcessState.STOPPED)
        await (await self.chat("a")).content()
        response = await treq.get(self.url + "/unload", pool=self.pool)
        self.assertEqual(await response.text(), "OK")
        self.assertEqual(self.state("a"), ProcessState.STOPPED)


def _Running(config_path: str, listen_port: int) -> ServiceProcess:
    """``python -m llamaswap`` (the console script) as a child of the test."""
    return ServiceProcess(["-m", "llamaswap", "-c", config_path], listen_port)


def _config_file(test: TestCase, models: dict[str, Any]) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump({"models": models}, f)
    test.addCleanup(os.unlink, f.name)
    return f.name


class CommandLineTests(TestCase):
    timeout = 60

    async def test_sigterm_leaves_no_descendants(self) -> None:
        """SIGTERM to a running ``llamaswap`` stops every child and
        grandchild, then the service exits 0."""
        path = _config_file(self, {"a": responder_model(free_port(), "--spawn-grandchild")})
        running = _Running(path, free_port())
        await running.wait_up()
        response = await treq.get(running.url + "/upstream/a/health", pool=running.pool)
        await response.content()
        status = await (await treq.get(running.url + "/running", pool=running.pool)).json()
        self.assertEqual(status["running"][0]["state"], "ready")
        children = descendants(running.transport.pid)
        self.assertGreaterEqual(len(children), 2, children)
        running.transport.signalProcess(signal.SIGTERM)
        code = await running.ended
        self.assertEqual(code, 0, running.text())
        await poll_until(lambda: not any(pid_alive(p) for p in children), timeout=5)

    async def test_sighup_reloads(self) -> None:
        """SIGHUP re-reads the config file: a model added to it is listed."""
        path = _config_file(self, {"a": responder_model(free_port())})
        running = _Running(path, free_port())
        self.addCleanup(lambda: running.ended)
        self.addCleanup(running.transport.signalProcess, signal.SIGTERM)
        await running.wait_up()
        with open(path, "w") as f:
            json.dump(
                {"models": {"a": responder_model(free_port()), "b": responder_model(free_port())}},
                f,
            )
        running.transport.signalProcess(signal.SIGHUP)

        listed: list[str] = []

        async def models() -> None:
            page = await (await treq.get(running.url + "/v1/models", pool=running.pool)).json()
            listed[:] = [m["id"] for m in page["data"]]

        deadline = reactor.seconds() + 10
        while listed != ["a", "b"]:
            self.assertLess(reactor.seconds(), deadline, running.text())
            await models()
            await poll_until(lambda: True)
        self.assertIn("config reloaded", running.text())


class DemoTests(ServiceTestCase):
    async def test_openai_sdk_streams_from_two_demo_models(self) -> None:
        """The OpenAI SDK streams a chat completion from one demo model and
        then another; the swap stopped the first model's process."""
        from openai import OpenAI
        from twisted.internet.threads import deferToThread

        def demo(name: str) -> dict[str, Any]:
            port = free_port()
            return {
                "cmd": f"{PYTHON} -m llamaswap.demo --host 127.0.0.1 --port {port} --model {name}",
                "proxy": f"http://127.0.0.1:{port}",
                "env": [f"PYTHONPATH={REPO}"],
            }

        await self.start({"demo-a": demo("demo-a"), "demo-b": demo("demo-b")})
        client = OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        self.addCleanup(client.close)

        def stream(model: str) -> tuple[int, str]:
            chunks = client.chat.completions.create(
                model=model, stream=True, messages=[{"role": "user", "content": "hi"}]
            )
            parts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
            return len(parts), "".join(parts)

        count, text = await deferToThread(stream, "demo-a")
        self.assertGreater(count, 2)
        self.assertIn("demo-a", text)
        pid_a = self.router.processes["demo-a"].pid
        count, text = await deferToThread(stream, "demo-b")
        self.assertIn("demo-b", text)
        self.assertEqual(self.state("demo-a"), ProcessState.STOPPED)
        self.assertFalse(pid_alive(pid_a))
        await self.settled()


class DispatchTests(ServiceTestCase):
    async def test_every_body_kind_dispatches(self) -> None:
        """Multipart, urlencoded and GET ?model= requests reach the right
        model; multipart gets useModelName; /v and /audioapi prefixes are
        stripped upstream."""
        await self.start(
            {"whisper": responder_model(free_port(), useModelName="large-v3", aliases=["w"])}
        )
        boundary = b"b0undary"
        body = (
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"'
            b"\r\nContent-Type: audio/wav\r\n\r\nRIFF\x00\x01\xff\r\n"
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nw\r\n'
            b"--" + boundary + b"--\r\n"
        )
        response = await treq.post(
            self.url + "/v1/audio/transcriptions",
            data=body,
            headers={b"content-type": [b"multipart/form-data; boundary=" + boundary]},
            pool=self.pool,
        )
        echoed = await response.json()
        self.assertEqual(echoed["path"], "/v1/audio/transcriptions")
        self.assertEqual(
            echoed["request_body"].encode("latin-1"),
            body.replace(b"\r\n\r\nw\r\n", b"\r\n\r\nlarge-v3\r\n"),
        )
        response = await treq.post(
            self.url + "/v1/images/generations",
            data=b"model=whisper&prompt=a+cat",
            headers={b"content-type": [b"application/x-www-form-urlencoded"]},
            pool=self.pool,
        )
        echoed = await response.json()
        self.assertEqual(echoed["request_body"], "model=whisper&prompt=a+cat")
        response = await treq.get(self.url + "/v1/audio/voices?model=w", pool=self.pool)
        echoed = await response.json()
        self.assertEqual((echoed["method"], echoed["query"]), ("GET", "model=w"))
        response = await treq.post(
            self.url + "/v/embeddings",
            data=b'{"model":"w","input":"x"}',
            headers={b"content-type": [b"application/json"]},
            pool=self.pool,
        )
        self.assertEqual((await response.json())["path"], "/embeddings")
        response = await treq.post(
            self.url + "/audioapi/v1/tasks/run",
            data=b'{"model":"w"}',
            headers={b"content-type": [b"application/json"]},
            pool=self.pool,
        )
        self.assertEqual((await response.json())["path"], "/v1/tasks/run")
        await self.settled()

    async def test_hop_by_hop_and_forwarded_headers(self) -> None:
        """Hop-by-hop headers stay behind; X-Forwarded-For is added; the
        client's Host is kept."""
        await self.start({"a": responder_model(free_port())})
        response = await treq.post(
            self.url + "/v1/embeddings",
            data=b'{"model":"a"}',
            headers={
                b"content-type": [b"application/json"],
                b"connection": [b"keep-alive, x-private"],
                b"x-private": [b"secret"],
                b"x-kept": [b"yes"],
            },
            pool=self.pool,
        )
        headers = (await response.json())["headers"]
        self.assertNotIn("x-private", headers)
        self.assertEqual(headers["x-kept"], "yes")
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.1")
        self.assertEqual(headers["host"], f"127.0.0.1:{self.port.getHost().port}")


class PipelineTests(ServiceTestCase):
    async def test_api_keys_guard_every_route_class(self) -> None:
        """With apiKeys, every route but the open ones needs a key; any of
        Basic, Bearer or x-api-key works; the key is not forwarded."""
        await self.start({"a": responder_model(free_port())}, apiKeys=["sekrit"])
        guarded = [
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
            ("GET", "/running"),
            ("GET", "/upstream/a/health"),
            ("POST", "/api/models/unload"),
            ("GET", "/unload"),
        ]
        for method, path in guarded:
            response = await treq.request(method, self.url + path, pool=self.pool)
            self.assertEqual(response.code, 401, path)
            self.assertEqual(
                response.headers.getRawHeaders(b"www-authenticate"), [b'Basic realm="llama-swap"']
            )
            payload = await response.json()
            self.assertEqual(
                payload["error"]["message"], "unauthorized: invalid or missing API key"
            )
        for path in ("/health", "/wol-health"):
            response = await treq.get(self.url + path, pool=self.pool)
            self.assertEqual(response.code, 200, path)
            await response.content()
        response = await treq.request("OPTIONS", self.url + "/v1/chat/completions", pool=self.pool)
        self.assertEqual(response.code, 204)
        self.assertEqual(response.headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])
        import base64

        for headers in (
            {b"authorization": [b"Bearer sekrit"]},
            {b"authorization": [b"Basic " + base64.b64encode(b"user:sekrit")]},
            {b"x-api-key": [b"sekrit"]},
        ):
            response = await treq.post(
                self.url + "/v1/embeddings",
                data=b'{"model":"a"}',
                headers={b"content-type": [b"application/json"], **headers},
                pool=self.pool,
            )
            self.assertEqual(response.code, 200, headers)
            seen = (await response.json())["headers"]
            self.assertNotIn("authorization", seen)
            self.assertNotIn("x-api-key", seen)
        response = await treq.get(
            self.url + "/v1/models", headers={b"authorization": [b"Bearer wrong"]}, pool=self.pool
        )
        self.assertEqual(response.code, 401)
        await response.content()

    async def test_filters_rewrite_bytes_exactly(self) -> None:
        """stripParams/setParams/setParamsByID edit the JSON body in place;
        every other byte reaches the upstream as sent."""
        await self.start(
            {
                "a": responder_model(
                    free_port(),
                    filters={
                        "stripParams": "top_k, model",
                        "setParams": {"temperature": 0.7, "opts.reasoning": "low"},
                        "setParamsByID": {"a:high": {"opts.reasoning": "high"}},
                    },
                )
            }
        )
        body = '{"model": "a:high", "top_k": 40, "n": 1.50, "s": "\\u00e9", "opts": {"x": 1e3}}'
        response = await treq.post(
            self.url + "/v1/embeddings",
            data=body.encode(),
            headers={b"content-type": [b"application/json"]},
            pool=self.pool,
        )
        self.assertEqual(response.code, 200)
        sent = (await response.json())["request_body"]
        self.assertEqual(
            sent,
            '{"model": "a:high", "n": 1.50, "s": "\\u00e9", "opts": {"x": 1e3,"reasoning":"high"}'
            ',"temperature":0.7}',
        )


class ActivityTests(ServiceTestCase):
    async def test_requests_are_recorded_with_tokens_and_captures(self) -> None:
        """Model-dispatched POSTs become activity rows with parsed tokens,
        streaming or not; captures are redacted and fetchable."""
        await self.start({"a": responder_model(free_port())})
        response = await treq.post(
            self.url + "/v1/chat/completions",
            data=b'{"model":"a","messages":[]}',
            headers={b"content-type": [b"application/json"], b"authorization": [b"Bearer x"]},
            pool=self.pool,
        )
        await response.content()
        streamed = await self.chat("a", stream=True)
        self.assertIn(b"data:", await streamed.content())
        await (await treq.get(self.url + "/upstream/a/health", pool=self.pool)).content()
        # Captures are encoded off the reactor thread: stored a moment later.
        await poll_until(lambda: len(self.service.recorder.captures) == 2)
        page = await (await treq.get(self.url + "/api/metrics/activity", pool=self.pool)).json()
        self.assertEqual(page["total"], 2)
        newest, oldest = page["data"]
        self.assertEqual((oldest["model"], oldest["req_path"]), ("a", "/v1/chat/completions"))
        self.assertEqual(oldest["resp_status_code"], 200)
        self.assertEqual(oldest["tokens"]["input_tokens"], 25)
        self.assertEqual(oldest["tokens"]["output_tokens"], 10)
        self.assertEqual(newest["tokens"]["output_tokens"], 10)
        self.assertTrue(oldest["has_capture"])
        capture = await (
            await treq.get(self.url + f"/api/captures/{oldest['id']}", pool=self.pool)
        ).json()
        self.assertEqual(capture["req_path"], "/v1/chat/completions")
        self.assertEqual(capture["req_headers"]["Authorization"], "[REDACTED]")
        import base64

        self.assertEqual(base64.b64decode(capture["req_body"]), b'{"model":"a","messages":[]}')
        self.assertIn(b'"usage"', base64.b64decode(capture["resp_body"]))
        stats = await (await treq.get(self.url + "/api/metrics/stats", pool=self.pool)).json()
        self.assertEqual(stats["total_requests"], 2)
        self.assertEqual(stats["total_output_tokens"], 20)
        recent = await (await treq.get(self.url + "/api/metrics", pool=self.pool)).json()
        self.assertEqual([row["id"] for row in recent], [oldest["id"], newest["id"]])
        bad = await treq.get(self.url + "/api/metrics/activity?limit=0", pool=self.pool)
        self.assertEqual(bad.code, 400)
        await bad.content()
        missing = await treq.get(self.url + "/api/captures/999", pool=self.pool)
        self.assertEqual(missing.code, 404)
        await missing.content()

    async def test_stop_ends_the_capture_threads(self) -> None:
        """Captures are encoded in a thread pool that the service stops."""
        await self.start({"a": responder_model(free_port())})
        await (await self.chat("a")).content()
        await poll_until(lambda: len(self.service.recorder.captures) == 1)
        threads = [t for t in threading.enumerate() if "llamaswap-captures" in t.name]
        self.assertTrue(threads)
        await self.service.stopService()
        self.assertFalse([t for t in threads if t.is_alive()])

    async def test_failed_and_abandoned_requests_are_recorded(self) -> None:
        """A start failure and a client that leaves while loading still
        leave activity rows, with the error message."""
        await self.start(
            {
                "bad": responder_model(free_port(), "--exit-after", "0", "--exit-code", "2"),
                "slow": responder_model(free_port(), "--startup-delay", "0.5"),
            }
        )
        response = await self.chat("bad")
        self.assertEqual(response.code, 500)
        await response.content()
        d = defer.ensureDeferred(self.chat("slow"))
        await poll_until(lambda: self.router.scheduler.reserved("slow") == 1)
        d.cancel()
        d.addErrback(lambda f: None)
        activity = self.service.recorder.store.log
        await poll_until(lambda: len(activity) == 2)
        rows = {row.model: row for row in activity.recent()}
        self.assertEqual(rows["bad"].resp_status_code, 500)
        self.assertIn("exit code 2", rows["bad"].error_msg)
        self.assertEqual(rows["slow"].error_msg, "client disconnected")
        await self.settled()

    async def test_prometheus_metrics(self) -> None:
        """/metrics parses as Prometheus text and counts requests, tokens and
        model state per model, and spend per API key name, never the key."""
        from prometheus_client.parser import text_string_to_metric_families

        await self.start({"a": responder_model(free_port())}, apiKeys=["topsecret"])
        auth = {b"authorization": [b"Bearer topsecret"]}
        response = await treq.post(
            self.url + "/v1/chat/completions",
            data=b'{"model":"a"}',
            headers={b"content-type": [b"application/json"], **auth},
            pool=self.pool,
        )
        await response.content()
        scrape = await treq.get(self.url + "/metrics", headers=auth, pool=self.pool)
        text = await scrape.text()
        self.assertNotIn("topsecret", text)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        requests = [v for (n, labels), v in samples.items() if n == "llamaswap_requests_total"]
        self.assertEqual(sum(requests), 1)
        self.assertEqual(
            samples[("llamaswap_tokens_total", (("kind", "output"), ("model", "a")))], 10
        )
        self.assertEqual(
            samples[("llamaswap_model_state", (("model", "a"), ("state", "ready")))], 1
        )
        spent = [
            v
            for (n, labels), v in samples.items()
            if n == "llamaswap_api_key_tokens_total" and ("key", "key-0") in labels
        ]
        self.assertGreater(sum(spent), 0)

    async def test_queue_wait_counts_requests_that_waited(self) -> None:
        """A request that waited for its model to load is observed in the
        queue-wait histogram; one granted at once is not."""
        await self.start({"a": responder_model(free_port())})
        registry = self.service.metrics.registry
        await (await self.chat("a")).content()
        labels = {"model": "a"}
        self.assertEqual(registry.get_sample_value("llamaswap_queue_wait_seconds_count", labels), 1)
        self.assertGreater(registry.get_sample_value("llamaswap_queue_wait_seconds_sum", labels), 0)
        await (await self.chat("a")).content()
        self.assertEqual(registry.get_sample_value("llamaswap_queue_wait_seconds_count", labels), 1)
        await self.settled()


class ReloadTests(ServiceTestCase):
    async def start_from_file(self, models: dict[str, Any]) -> str:
        import tempfile

        handle, path = tempfile.mkstemp(suffix=".yaml")
        os.close(handle)
        self.addCleanup(os.unlink, path)
        self.write(path, models)
        await self.start(models)
        self.service.sources = (path, None)
        return path

    def write(self, path: str, models: dict[str, Any]) -> None:
        with open(path, "w") as f:
            json.dump({"healthCheckTimeout": 15, "models": models}, f)

    async def test_unchanged_model_keeps_streaming_through_reload(self) -> None:
        """A reload keeps an unchanged model's process and its live stream;
        a removed model is stopped and unknown; an added one works."""
        a, b = responder_model(free_port()), responder_model(free_port())
        path = await self.start_from_file({"a": a, "b": b})
        await (await self.chat("b")).content()
        old_b = self.router.processes["b"]
        stream = await treq.get(
            self.url + "/upstream/a/slow?chunks=30&delay=0.03", pool=self.pool, unbuffered=True
        )
        pid_a = self.router.processes["a"].pid
        self.write(path, {"a": a, "c": responder_model(free_port())})
        await self.service.reload()
        body = await stream.content()
        self.assertEqual(body.count(b"chunk"), 30)
        self.assertEqual(self.router.processes["a"].pid, pid_a)
        self.assertEqual(self.state("a"), ProcessState.READY)
        response = await self.chat("b")
        self.assertEqual(response.code, 404)
        await response.content()
        response = await self.chat("c")
        self.assertEqual(response.code, 200)
        await response.content()
        await poll_until(lambda: old_b.state is ProcessState.STOPPED)
        await self.settled()

    async def test_changed_model_drains_then_restarts(self) -> None:
        """A changed model finishes its in-flight stream on the old process,
        which then stops; the next request starts the new configuration."""
        port = free_port()
        path = await self.start_from_file({"a": responder_model(port)})
        stream = await treq.get(
            self.url + "/upstream/a/slow?chunks=20&delay=0.03", pool=self.pool, unbuffered=True
        )
        old = self.router.processes["a"]
        self.write(path, {"a": responder_model(port, "--print", "second-config")})
        await self.service.reload()
        self.assertIsNot(self.router.processes["a"], old)
        body = await stream.content()
        self.assertEqual(body.count(b"chunk"), 20)
        await poll_until(lambda: old.state is ProcessState.STOPPED)
        response = await self.chat("a")
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertIn(b"second-config", self.service.logs.model("a").history())
        await self.settled()

    async def test_invalid_config_keeps_the_old_one(self) -> None:
        """A reload with errors is rejected; the running config stays."""
        from llamaswap.config import ConfigError

        path = await self.start_from_file({"a": responder_model(free_port())})
        with open(path, "w") as f:
            f.write("models:\n  a:\n    ttl: -3\n")
        with self.assertRaises(ConfigError):
            await self.service.reload()
        self.assertIn("a", self.service.config.models)
        response = await self.chat("a")
        self.assertEqual(response.code, 200)
        await response.content()

    async def test_overlapping_reloads_coalesce(self) -> None:
        """A reload asked for while one runs is queued, not dropped: the
        last written config wins."""
        path = await self.start_from_file({"a": responder_model(free_port())})
        self.write(path, {"a": responder_model(free_port()), "b": responder_model(free_port())})
        first = self.service.reload()
        self.write(path, {"a": responder_model(free_port()), "z": responder_model(free_port())})
        second = self.service.reload()
        await first
        await second
        self.assertEqual(sorted(self.service.config.models), ["a", "z"])


class ObservabilityTests(ServiceTestCase):
    async def test_events_report_state_changes_live(self) -> None:
        """/api/events sends the initial burst, then modelStatus events as a
        model starts and becomes ready, and an activity event."""
        await self.start({"a": responder_model(free_port())})
        response = await treq.get(self.url + "/api/events", pool=self.pool, unbuffered=True)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        received: list[bytes] = []
        collecting = treq.collect(response, received.append)
        collecting.addErrback(lambda f: None)

        def events() -> list[dict[str, Any]]:
            out = []
            for block in b"".join(received).split(b"\n\n"):
                for line in block.split(b"\n"):
                    if line.startswith(b"data:"):
                        out.append(json.loads(line[5:]))
            return out

        await poll_until(lambda: any(e["type"] == "inflight" for e in events()))
        kinds = [e["type"] for e in events()]
        self.assertEqual(
            kinds[:6],
            ["logData", "logData", "modelStatus", "uiConfig", "profileChanged", "inflight"],
        )
        await (await self.chat("a")).content()

        def states() -> list[str]:
            return [
                json.loads(e["data"])[0]["state"] for e in events() if e["type"] == "modelStatus"
            ]

        await poll_until(lambda: "ready" in states())
        self.assertIn("starting", states())
        progress = [json.loads(e["data"]) for e in events() if e["type"] == "loadingProgress"]
        self.assertEqual(progress[0]["models"][0]["id"], "a")
        self.assertEqual(progress[-1], {"models": []})
        await poll_until(lambda: any(e["type"] == "activity" for e in events()))
        collecting.cancel()
        response.original._transport.loseConnection()

    async def test_model_log_stream_and_access_log(self) -> None:
        """/logs/stream/<model> tails the model's output; /logs holds the
        proxy's access-log lines."""
        await self.start({"org/m": responder_model(free_port(), "--print", "hello-from-model")})
        await (await self.chat("org/m")).content()
        response = await treq.get(self.url + "/logs/stream/org/m", pool=self.pool, unbuffered=True)
        received: list[bytes] = []
        collecting = treq.collect(response, received.append)
        collecting.addErrback(lambda f: None)
        await poll_until(lambda: b"hello-from-model" in b"".join(received))
        collecting.cancel()
        response.original._transport.loseConnection()
        history = await (await treq.get(self.url + "/logs", pool=self.pool)).text()
        self.assertIn('Request 127.0.0.1 "POST /v1/chat/completions HTTP/1.1" 200', history)
        bad = await treq.get(self.url + "/logs/stream/nope", pool=self.pool)
        self.assertEqual(bad.code, 400)
        await bad.content()

    async def test_inflight_list_and_cancel(self) -> None:
        """A streaming request appears in /api/inflight and cancelling it
        ends the client's response and frees the slot."""
        await self.start({"a": responder_model(free_port())})
        stream = await treq.get(
            self.url + "/upstream/a/slow?chunks=200&delay=0.05", pool=self.pool, unbuffered=True
        )
        listing: list[dict[str, Any]] = []

        async def refresh() -> None:
            listing[:] = await (await treq.get(self.url + "/api/inflight", pool=self.pool)).json()

        await refresh()
        self.assertEqual(
            [(e["model"], e["req_path"]) for e in listing], [("a", "/upstream/a/slow")]
        )
        response = await treq.post(
            self.url + f"/api/inflight/{listing[0]['id']}/cancel", pool=self.pool
        )
        self.assertEqual(await response.json(), {"msg": "ok"})
        from twisted.web.client import ResponseFailed

        with self.assertRaises(ResponseFailed):  # a truncated stream, not a clean end
            await stream.content()
        await self.settled()
        await refresh()
        self.assertEqual(listing, [])


def demo_model(name: str, **keys: Any) -> dict[str, Any]:
    """A model entry running the packaged demo upstream (llamaswap.demo)."""
    port = free_port()
    entry: dict[str, Any] = {
        "cmd": f"{PYTHON} -m llamaswap.demo --host 127.0.0.1 --port {port} --model {name}",
        "proxy": f"http://127.0.0.1:{port}",
        "env": [f"PYTHONPATH={REPO}"],
    }
    entry.update(keys)
    return entry


class RoutingTests(ServiceTestCase):
    async def use(self, model: str) -> None:
        response = await self.chat(model)
        self.assertEqual(response.code, 200, model)
        await response.content()

    def running(self) -> list[str]:
        return sorted(m for m, p in self.router.processes.items() if p.state is ProcessState.READY)

    async def test_groups(self) -> None:
        """A swap:false group runs its members together; loading a model of
        the (exclusive) default group evicts them; a persistent group stays."""
        await self.start(
            {name: demo_model(name) for name in ("a", "b", "c", "p")},
            groups={
                "pair": {"swap": False, "members": ["a", "b"]},
                "keep": {"persistent": True, "exclusive": False, "members": ["p"]},
            },
        )
        await self.use("p")
        await self.use("a")
        await self.use("b")
        self.assertEqual(self.running(), ["a", "b", "p"])
        await self.use("c")
        self.assertEqual(self.running(), ["c", "p"])
        await self.settled()

    async def test_matrix(self) -> None:
        """The matrix router keeps models that share a set and evicts the
        rest; a model in no set runs alone."""
        await self.start(
            {name: demo_model(name) for name in ("a", "b", "c", "solo")},
            routing={
                "router": {
                    "use": "matrix",
                    "settings": {"matrix": {"sets": {"ab": "a & b", "bc": "b & c"}}},
                }
            },
        )
        await self.use("a")
        await self.use("b")
        self.assertEqual(self.running(), ["a", "b"])
        await self.use("c")
        self.assertEqual(self.running(), ["b", "c"])
        await self.use("solo")
        self.assertEqual(self.running(), ["solo"])
        await self.settled()

    async def test_peer_forwarding(self) -> None:
        """A peer model is forwarded to the peer with the bare model name and
        the peer's key; no local process starts."""
        remote_port = free_port()
        remote = await self._remote(remote_port)
        await self.start(
            {"local": responder_model(free_port())},
            peers={
                "box": {
                    "proxy": f"http://127.0.0.1:{remote_port}",
                    "apiKey": "peer-key",
                    "models": ["remote-m"],
                }
            },
        )
        response = await treq.post(
            self.url + "/v1/embeddings",
            data=b'{"model": "box/remote-m", "input": "x"}',
            headers={b"content-type": [b"application/json"]},
            pool=self.pool,
        )
        echoed = await response.json()
        self.assertEqual(echoed["request_body"], '{"model": "remote-m", "input": "x"}')
        self.assertEqual(echoed["headers"]["authorization"], "Bearer peer-key")
        self.assertEqual(echoed["headers"]["x-api-key"], "peer-key")
        listing = await (await treq.get(self.url + "/v1/models", pool=self.pool)).json()
        self.assertIn("box/remote-m", [m["id"] for m in listing["data"]])
        self.assertEqual(self.running(), [])
        del remote

    async def _remote(self, port: int) -> Any:
        """tests/responder.py standing in for a remote llamaswap or API."""
        from llamaswap.config.model import ModelConfig
        from llamaswap.observe.logs import LogMonitor
        from llamaswap.supervision.health import http_probe
        from llamaswap.supervision.launcher import ProcessGroupLauncher
        from llamaswap.supervision.process import ModelProcess

        process = ModelProcess(
            ModelConfig(
                id="remote",
                argv=(PYTHON, RESPONDER, "--port", str(port)),
                cmd="",
                proxy=f"http://127.0.0.1:{port}",
            ),
            clock=reactor,
            launcher=ProcessGroupLauncher(reactor),
            probe=http_probe(reactor),
            output=LogMonitor("remote"),
            health_check_timeout=15,
            environ=os.environ,
        )
        await process.make_ready()
        self.addCleanup(process.stop, 5)
        return process

    async def test_profile_pins(self) -> None:
        """An active profile's pin sends requests for the pin name to its
        target; deactivating it restores plain resolution."""
        await self.start(
            {"a": responder_model(free_port()), "b": responder_model(free_port())},
            profiles={"fast": {"description": "quick", "pins": {"chat": "a"}}},
        )
        listed = await (await treq.get(self.url + "/api/profiles", pool=self.pool)).json()
        self.assertEqual(listed["active"], None)
        response = await treq.put(
            self.url + "/api/profiles/active", data=b'{"name": "fast"}', pool=self.pool
        )
        self.assertEqual(await response.json(), {"active": "fast"})
        response = await self.chat("chat")
        payload = await response.json()
        self.assertEqual(response.code, 200)
        self.assertIn('"model": "a"', payload["request_body"])
        self.assertEqual(self.running(), ["a"])
        await treq.put(self.url + "/api/profiles/active", data=b'{"name": null}', pool=self.pool)
        response = await self.chat("chat")
        self.assertEqual(response.code, 404)
        await response.content()

    async def test_selectors_and_alias_listing(self) -> None:
        """A warm selector sends requests to a loaded target first; alias
        records appear in /v1/models with includeAliasesInList."""
        await self.start(
            {"a": demo_model("a", aliases=["alpha"]), "b": demo_model("b")},
            includeAliasesInList=True,
            selectors={"any": {"strategy": "warm", "targets": ["a", "b"]}},
        )
        await self.use("b")
        response = await self.chat("any")
        self.assertIn("demo model b", (await response.json())["choices"][0]["message"]["content"])
        self.assertEqual(self.running(), ["b"])
        listing = await (await treq.get(self.url + "/v1/models", pool=self.pool)).json()
        by_id = {record["id"]: record for record in listing["data"]}
        self.assertEqual(by_id["alpha"]["meta"]["llamaswap"]["type"], "alias")
        self.assertEqual(by_id["any"]["meta"]["llamaswap"]["type"], "selector")
        activity = self.service.recorder.store.log
        await poll_until(lambda: len(activity) == 2)
        self.assertEqual(activity.recent()[-1].metadata.get("selector"), "any")


class FeatureTests(ServiceTestCase):
    async def test_ignore_paths_do_not_start_models(self) -> None:
        """/upstream paths matching upstream.ignorePaths get 409 while the
        model is not loaded, and pass once it is."""
        await self.start({"a": responder_model(free_port())})
        response = await treq.get(self.url + "/upstream/a/favicon.ico", pool=self.pool)
        self.assertEqual(response.code, 409)
        payload = await response.json()
        self.assertEqual(
            payload["error"]["message"], "model a is not loaded; path matches upstream.ignorePaths"
        )
        self.assertEqual(self.state("a"), ProcessState.STOPPED)
        await (await self.chat("a")).content()
        response = await treq.get(self.url + "/upstream/a/favicon.ico", pool=self.pool)
        self.assertEqual(response.code, 200)
        await response.content()

    async def test_comfyui(self) -> None:
        """/comfyui redirects; only /comfyui/ may start comfyui_auto."""
        await self.start({"comfyui_auto": responder_model(free_port())})
        response = await treq.get(self.url + "/comfyui?x=1", pool=self.pool, allow_redirects=False)
        self.assertEqual(response.code, 301)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/comfyui/?x=1"])
        response = await treq.get(self.url + "/comfyui/api/queue", pool=self.pool)
        self.assertEqual(response.code, 409)
        await response.content()
        response = await treq.get(self.url + "/comfyui/", pool=self.pool)
        self.assertEqual(response.code, 200)
        await response.content()
        response = await treq.get(self.url + "/comfyui/api/queue", pool=self.pool)
        self.assertEqual((await response.json())["path"], "/api/queue")

    async def test_capabilities_in_listing(self) -> None:
        """capabilities become /v1/models fields as llama-swap shows them."""
        await self.start(
            {
                "v": responder_model(
                    free_port(),
                    capabilities={
                        "in": ["text", "image"],
                        "out": ["text"],
                        "tools": True,
                        "context": 8192,
                    },
                    metadata={"context_length": 1, "keep": True},
                )
            }
        )
        (record,) = (await (await treq.get(self.url + "/v1/models", pool=self.pool)).json())["data"]
        self.assertEqual(record["architecture"]["modality"], "text+image->text")
        self.assertTrue(record["capabilities"]["vision"])
        self.assertTrue(record["capabilities"]["function_calling"])
        self.assertEqual(record["supported_parameters"], ["tools", "tool_choice"])
        self.assertEqual(record["context_length"], 8192)
        self.assertEqual(record["meta"]["n_ctx"], 8192)
        self.assertEqual(record["meta"]["llamaswap"], {"keep": True, "type": "model"})

    async def test_preload_hook(self) -> None:
        """hooks.on_startup.preload loads models at start, in order."""
        await self.start(
            {"a": responder_model(free_port()), "b": responder_model(free_port())},
            hooks={"on_startup": {"preload": ["a", "nope", "b"]}},
        )
        await poll_until(lambda: self.state("b") is ProcessState.READY)
        self.assertEqual(self.state("a"), ProcessState.STOPPED)  # one at a time: b replaced a
        await self.settled()


class LoadingStateTests(ServiceTestCase):
    async def test_loading_progress_then_model_stream(self) -> None:
        """With sendLoadingState, a streaming chat for a model that is not
        loaded first receives typed loading progress, then the model's own
        events in the same response."""
        await self.start(
            {"a": responder_model(free_port(), "--startup-delay", "0.8")}, sendLoadingState=True
        )
        response = await self.chat("a", stream=True)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        body = (await response.content()).decode()
        events = [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]
        reasoning = "".join(
            json.loads(e)["choices"][0]["delta"].get("reasoning_content", "")
            for e in events
            if e.startswith("{") and "reasoning_content" in e
        )
        self.assertIn("loading model: a", reasoning)
        self.assertIn("Done! (", reasoning)
        self.assertEqual(events[-1].strip(), "[DONE]")
        await self.settled()

    async def test_loaded_model_gets_no_loading_stream(self) -> None:
        """A model that is already ready answers directly."""
        await self.start({"a": responder_model(free_port())}, sendLoadingState=True)
        await (await self.chat("a")).content()
        response = await self.chat("a", stream=True)
        self.assertNotIn(b"reasoning_content", await response.content())


class WebSocketTests(ServiceTestCase):
    async def upgrade(self, path: str) -> tuple[Any, list[bytes]]:
        """Open a raw connection and send a WebSocket upgrade for ``path``."""
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol

        received: list[bytes] = []

        class Client(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        client = Client()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), client
        )
        client.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        return client, received

    async def test_upgrade_starts_model_and_relays_both_ways(self) -> None:
        """A WebSocket upgrade through /upstream starts the model, gets the
        101, relays bytes both ways and counts in flight until it closes."""
        await self.start({"a": responder_model(free_port())})
        client, received = await self.upgrade("/upstream/a/ws")
        await poll_until(lambda: b"101 Switching Protocols" in b"".join(received))
        self.assertEqual(self.router.scheduler.in_flight("a"), 1)
        client.transport.write(b"ping")
        await poll_until(lambda: b"echo:ping" in b"".join(received))
        client.transport.loseConnection()
        await self.settled()

    async def test_ignored_websockets_never_start_or_count(self) -> None:
        """With compat.ignoreWebsockets an upgrade cannot start the model
        (409) and, once it is loaded, is relayed without counting."""
        await self.start({"a": responder_model(free_port(), compat={"ignoreWebsockets": True})})
        client, received = await self.upgrade("/upstream/a/ws")
        await poll_until(lambda: b"409" in b"".join(received))
        self.assertIn(b"ignored websocket requests cannot start it", b"".join(received))
        client.transport.loseConnection()
        self.assertEqual(self.state("a"), ProcessState.STOPPED)
        await (await self.chat("a")).content()
        client, received = await self.upgrade("/upstream/a/ws")
        await poll_until(lambda: b"101" in b"".join(received))
        self.assertEqual(self.router.scheduler.in_flight("a"), 0)
        client.transport.write(b"hi")
        await poll_until(lambda: b"echo:hi" in b"".join(received))
        client.transport.loseConnection()


class WatchConfigTests(TestCase):
    async def test_changed_file_triggers_reload(self) -> None:
        """--watch-config polls the config file and reloads once it changes
        (the first poll is only a baseline)."""
        import tempfile

        from llamaswap.service.reload import ReloadService

        handle, path = tempfile.mkstemp(suffix=".yaml")
        os.close(handle)
        self.addCleanup(os.unlink, path)
        with open(path, "w") as f:
            json.dump({"models": {"a": responder_model(free_port())}}, f)
        config = load_config_text(open(path).read(), environ=dict(os.environ))
        core = build_service(config, reactor, (path, None))
        core.startService()
        self.addCleanup(core.stopService)
        watcher = ReloadService(core, reactor, watch=True, interval=0.05)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        await poll_until(lambda: watcher._seen is not None)
        with open(path, "w") as f:
            json.dump(
                {"models": {"a": responder_model(free_port()), "z": responder_model(free_port())}},
                f,
            )
        await poll_until(lambda: "z" in core.config.models)
