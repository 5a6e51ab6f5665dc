"""Tests for the web UI: the static resource (``llamaswap.web.ui``) and the
pages themselves, driven in headless Chromium against a real llamaswap.

The browser tests start llamaswap as a subprocess (with two demo models) and
drive Playwright's sync API on one dedicated thread, never on the reactor
thread.  They are skipped when ``/usr/bin/chromium`` or the ``playwright``
package is missing.  Set ``LLAMASWAP_UI_SCREENSHOTS=<dir>`` to save a
screenshot of every page (used for ``docs/screenshots``).
"""

from __future__ import annotations

import atexit
import gzip
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from llamaswap.web.ui import UI_DIRECTORY, UIResource
from tests.support import PYTHON, REPO, free_port

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None
    PlaywrightError = Exception

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = os.environ.get("LLAMASWAP_UI_SCREENSHOTS", "")
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
#: Endpoints the UI probes and copes without: a 404 from these is expected.
OPTIONAL = re.compile(r"^/(api/events|api/profiles|api/inflight|logs(/.*)?|api/metrics.*)$")
#: Milliseconds Playwright waits for any one thing to appear.
WAIT_MS = 10_000


# --------------------------------------------------------------------------
# The resource


class UIResourceTests(SynchronousTestCase):
    """``UIResource`` serves the package's UI files per reference §3.11."""

    def setUp(self) -> None:
        self.resource = UIResource()

    def fetch(self, path: str, method: str = "GET", **headers: str) -> tuple[Any, bytes]:
        stub = StubTreq(self.resource)
        response = self.successResultOf(
            stub.request(
                method, "http://ui.test" + path, headers=headers or None, allow_redirects=False
            )
        )
        body = self.successResultOf(response.content())
        return response, body

    def header(self, response: Any, name: str) -> str | None:
        values = response.headers.getRawHeaders(name)
        return values[0] if values else None

    def test_index(self) -> None:
        """``/ui/`` is index.html, as HTML, revalidated on every use."""
        response, body = self.fetch("/ui/")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "content-type"), "text/html; charset=utf-8")
        self.assertEqual(self.header(response, "cache-control"), "no-cache")
        self.assertIn(b'<script type="module" src="/ui/js/app.js">', body)

    def test_fallback_to_index(self) -> None:
        """A path whose last segment has no extension gets index.html (SPA routes)."""
        with open(os.path.join(UI_DIRECTORY, "index.html"), "rb") as f:
            index = f.read()
        for path in ("/ui/models", "/ui/activity", "/ui/logs/some/deeper/route"):
            response, body = self.fetch(path)
            self.assertEqual((response.code, body), (200, index), path)
            self.assertEqual(self.header(response, "content-type"), "text/html; charset=utf-8")

    def test_missing_file_with_extension(self) -> None:
        """A missing file with an extension is a 404, not index.html."""
        for path in ("/ui/js/nope.js", "/ui/missing.css", "/ui/a/b/c.png"):
            response, body = self.fetch(path)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(body, b"404 page not found\n")

    def test_content_types(self) -> None:
        """Each kind of file is served with its content type."""
        expected = {
            "/ui/js/app.js": "text/javascript; charset=utf-8",
            "/ui/js/pages/models.js": "text/javascript; charset=utf-8",
            "/ui/style.css": "text/css; charset=utf-8",
            "/ui/favicon.svg": "image/svg+xml",
            "/ui/favicon.ico": "image/x-icon",
            "/favicon.ico": "image/x-icon",
        }
        for path, content_type in expected.items():
            response, body = self.fetch(path)
            self.assertEqual(response.code, 200, path)
            self.assertEqual(self.header(response, "content-type"), content_type, path)
            self.assertEqual(self.header(response, "x-content-type-options"), "nosniff")
            self.assertTrue(body, path)

    def test_redirect_to_slash(self) -> None:
        """``/ui`` redirects to ``/ui/`` (301), keeping the query."""
        response, _ = self.fetch("/ui?x=1")
        self.assertEqual(response.code, 301)
        self.assertEqual(self.header(response, "location"), "/ui/?x=1")

    def render_direct(self, path: bytes, **headers: bytes) -> tuple[DummyRequest, bytes]:
        """Render without treq, whose client always asks for (and decodes) gzip."""
        request = DummyRequest(path.split(b"/")[1:])
        request.path = request.uri = path
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name.replace("_", "-"), [value])
        return request, self.resource.render(request)

    def test_gzip(self) -> None:
        """Compressible files are sent gzipped when the client accepts it."""
        plain, plain_body = self.render_direct(b"/ui/style.css")
        packed, packed_body = self.render_direct(b"/ui/style.css", accept_encoding=b"gzip, br")
        self.assertIsNone(plain.responseHeaders.getRawHeaders(b"content-encoding"))
        self.assertEqual(packed.responseHeaders.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(packed.responseHeaders.getRawHeaders(b"vary"), [b"Accept-Encoding"])
        self.assertEqual(gzip.decompress(packed_body), plain_body)
        self.assertNotEqual(
            plain.responseHeaders.getRawHeaders(b"etag"),
            packed.responseHeaders.getRawHeaders(b"etag"),
        )
        refused, body = self.render_direct(b"/ui/style.css", accept_encoding=b"gzip;q=0")
        self.assertIsNone(refused.responseHeaders.getRawHeaders(b"content-encoding"))
        self.assertEqual(body, plain_body)

    def test_etag_revalidation(self) -> None:
        """A matching ``If-None-Match`` gets an empty 304."""
        first, _ = self.fetch("/ui/js/app.js")
        etag = self.header(first, "etag")
        assert etag is not None
        again, body = self.fetch("/ui/js/app.js", **{"If-None-Match": etag})
        self.assertEqual((again.code, body), (304, b""))

    def test_methods(self) -> None:
        """Only GET and HEAD are allowed."""
        response, _ = self.fetch("/ui/", method="POST")
        self.assertEqual(response.code, 405)
        self.assertEqual(self.header(response, "allow"), "GET, HEAD")
        head, body = self.fetch("/ui/style.css", method="HEAD")
        self.assertEqual((head.code, body), (200, b""))

    def test_no_escape_from_directory(self) -> None:
        """Dot segments never reach files outside the UI directory."""
        for path in ("/ui/../web/ui.py", "/ui/%2e%2e/web/ui.py", "/ui/js/../../tap.py"):
            response, _ = self.fetch(path)
            self.assertNotEqual(response.code, 200, path)

    def test_files_read_once(self) -> None:
        """Files are read at construction: later changes on disk are not seen,
        and serving does no file I/O."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "index.html"), "w") as f:
            f.write("<p>one</p>")
        resource = UIResource(directory)
        with open(os.path.join(directory, "index.html"), "w") as f:
            f.write("<p>two</p>")
        stub = StubTreq(resource)
        response = self.successResultOf(stub.get("http://ui.test/ui/"))
        self.assertEqual(self.successResultOf(response.content()), b"<p>one</p>")
        self.assertEqual(sorted(resource.files), ["index.html"])


# --------------------------------------------------------------------------
# A running llamaswap with two demo models


def _http(url: str, method: str = "GET", body: Any = None, headers: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class Stack:
    """llamaswap (a subprocess) serving demo models ``alpha`` and ``beta``."""

    def __init__(
        self,
        api_keys: list[str] | None = None,
        resources: dict[str, Any] | None = None,
        footprints: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.directory = tempfile.mkdtemp(prefix="llamaswap-ui-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        models = {}
        for name, extra in (
            ("alpha", "--tokens-per-second 60 --max-tokens-default 30"),
            ("beta", "--startup-delay 0.3"),
        ):
            port = free_port()
            models[name] = {
                "name": f"{name.title()} demo",
                "description": f"The {name} demo model",
                "cmd": f"{PYTHON} -m llamaswap.demo --host 127.0.0.1 --port {port} "
                f"--model {name} {extra}",
                "proxy": f"http://127.0.0.1:{port}",
            }
        models["alpha"]["aliases"] = ["first"]
        document: dict[str, Any] = {"healthCheckTimeout": 15, "models": models}
        if api_keys:
            document["apiKeys"] = api_keys
        if resources:
            document["resources"] = resources
            for name, held in (footprints or {}).items():
                models[name]["resources"] = held
        self.config = os.path.join(self.directory, "config.yaml")
        with open(self.config, "w") as f:
            json.dump(document, f)  # JSON is YAML
        self.log = open(os.path.join(self.directory, "llamaswap.log"), "wb")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = subprocess.Popen(
            [PYTHON, "-m", "llamaswap", "-c", self.config, "--listen", f"127.0.0.1:{self.port}"],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if _http(self.url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"llamaswap did not start: {self.output()[-2000:]}")
            time.sleep(0.05)

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def call(self, path: str, method: str = "GET", body: Any = None, key: str = "") -> Any:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return _http(self.url + path, method, body, headers)

    def status_of(self, path: str) -> int:
        """The status of a GET, without reading the (maybe endless) body."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class Browser:
    """Chromium driven by Playwright's sync API on one dedicated thread."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="playwright")
        self.run(self._start)

    def _start(self) -> None:
        assert sync_playwright is not None
        self.playwright = sync_playwright().start()
        self.chromium = self.playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )

    def run(self, fn: Callable[[], Any]) -> Any:
        return self.executor.submit(fn).result(timeout=60)

    def stop(self) -> None:
        def close() -> None:
            self.chromium.close()
            self.playwright.stop()

        try:
            self.run(close)
        finally:
            self.executor.shutdown(wait=True)


_shared: dict[str, Any] = {}
_lock = threading.Lock()


def _cleanup() -> None:
    for key in ("browser", "stack", "keyed", "placed"):
        thing = _shared.pop(key, None)
        if thing is not None:
            try:
                thing.stop()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass


atexit.register(_cleanup)


def shared(key: str, factory: Callable[[], Any]) -> Any:
    """One llamaswap/browser per test process, started on first use."""
    with _lock:
        if key not in _shared:
            _shared[key] = factory()
        return _shared[key]


class BrowserTestCase(SynchronousTestCase):
    """Base for tests that drive the UI in Chromium."""

    def setUp(self) -> None:
        if sync_playwright is None:
            raise SkipTest("playwright is not installed (pip install playwright)")
        if not os.path.exists(CHROMIUM):
            raise SkipTest(f"{CHROMIUM} is missing (apt-get install chromium)")
        self.stack: Stack = shared("stack", Stack)
        status, _ = self.stack.call("/ui/")
        if status == 404:
            raise SkipTest("the UI is not mounted at /ui/ in llamaswap/web/app.py yet")
        self.browser: Browser = shared("browser", Browser)

    def in_browser(
        self,
        scenario: Callable[[Any], Any],
        viewport: dict[str, int] = DESKTOP,
        stack: Stack | None = None,
        color_scheme: str = "light",
        expect_401: bool = False,
    ) -> Any:
        """Run ``scenario(page)`` in a fresh browser context; fail on console errors."""
        stack = stack or self.stack
        problems: list[str] = []

        def on_console(message: Any) -> None:
            if message.type != "error":
                return
            url = (message.location or {}).get("url", "")
            path = urllib.parse.urlsplit(url).path
            # Chromium logs every non-2xx fetch; the UI probes optional
            # endpoints and shows a note when they answer 404.
            if "status of 404" in message.text and OPTIONAL.match(path):
                return
            if expect_401 and "status of 401" in message.text:
                return
            problems.append(f"console error: {message.text} at {url}")

        def run() -> Any:
            context = self.browser.chromium.new_context(
                viewport=viewport, base_url=stack.url, color_scheme=color_scheme
            )
            context.set_default_timeout(WAIT_MS)
            page = context.new_page()
            page.on("console", on_console)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            try:
                return scenario(page)
            finally:
                context.close()

        result = self.browser.run(run)
        self.assertEqual(problems, [])
        return result

    def screenshot(self, page: Any, name: str) -> None:
        if SCREENSHOTS:
            os.makedirs(SCREENSHOTS, exist_ok=True)
            page.screenshot(path=os.path.join(SCREENSHOTS, f"{name}.png"))


def chat(stack: Stack, model: str, text: str, stream: bool = False, key: str = "") -> bytes:
    status, body = stack.call(
        "/v1/chat/completions",
        "POST",
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]},
        key=key,
    )
    assert status == 200, (status, body)
    return body


class PageTests(BrowserTestCase):
    """Every page renders against a live llamaswap without console errors."""

    def test_pages_load(self) -> None:
        """Each page shows its content and logs no errors."""
        chat(self.stack, "alpha", "warm up the activity table")

        def scenario(page: Any) -> None:
            page.goto("/ui/")
            page.wait_for_selector("article.model[data-model=alpha]")
            page.wait_for_selector("article.model[data-model=beta]")
            self.assertEqual(page.title(), "Models · llamaswap")
            self.screenshot(page, "models")
            page.click("nav a[data-page=activity]")
            page.wait_for_selector("#activity-table tbody tr[data-id]")
            page.wait_for_selector(".chart svg")
            self.screenshot(page, "activity")
            page.click("nav a[data-page=logs]")
            page.wait_for_selector("#logview, [data-unavailable]")
            self.screenshot(page, "logs")
            page.click("nav a[data-page=playground]")
            page.wait_for_selector("#pg-model option[value=alpha]", state="attached")
            self.screenshot(page, "playground")
            page.click("nav a[data-page=inflight]")
            page.wait_for_selector("#inflight-table, main .empty, [data-unavailable]")
            self.screenshot(page, "inflight")
            # Deep links work too (the server falls back to index.html).
            page.goto("/ui/activity")
            page.wait_for_selector("#activity-table")
            self.assertEqual(page.locator("nav a[aria-current=page]").inner_text(), "Activity")

        self.in_browser(scenario)

    def test_phone_width(self) -> None:
        """At phone width the pages fit the screen: no sideways scrolling."""

        def scenario(page: Any) -> None:
            for name, selector in (
                ("models", "article.model"),
                ("activity", "#activity-table, [data-unavailable]"),
                ("playground", "#pg-input"),
            ):
                page.goto(f"/ui/{name}")
                page.wait_for_selector(selector)
                overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                self.assertLessEqual(overflow, 0, name)
                if name == "models":
                    self.screenshot(page, "models-phone")

        self.in_browser(scenario, viewport=PHONE)

    def test_dark_scheme(self) -> None:
        """With a dark colour scheme the page background is dark."""

        def scenario(page: Any) -> None:
            page.goto("/ui/models")
            page.wait_for_selector("article.model")
            self.screenshot(page, "models-dark")
            return page.evaluate("getComputedStyle(document.body).backgroundColor")

        background = self.in_browser(scenario, color_scheme="dark")
        red, green, blue = (int(v) for v in re.findall(r"\d+", background)[:3])
        self.assertLess(red + green + blue, 150, background)


class PlaygroundTests(BrowserTestCase):
    def test_chat_streams(self) -> None:
        """A chat shows the reply while it streams, then tokens/s."""

        def scenario(page: Any) -> None:
            page.goto("/ui/playground?model=alpha")
            page.wait_for_selector("#pg-model option[value=alpha]", state="attached")
            self.assertEqual(page.input_value("#pg-model"), "alpha")
            page.fill("input[aria-label='Max tokens']", "40")  # under a second at 60/s
            page.fill("#pg-input", "Hello, who are you?")
            page.click("#pg-send")
            # Seen mid-stream: text present while the bubble is still streaming.
            page.wait_for_selector('.msg.assistant[data-state="streaming"] .text:not(:empty)')
            page.wait_for_selector('.msg.assistant[data-state="done"]')
            text = page.inner_text(".msg.assistant .text")
            self.assertIn("Hello from demo model alpha", text)
            self.assertIn("tokens/s", page.inner_text(".msg.assistant .foot"))
            self.screenshot(page, "playground-chat")

        self.in_browser(scenario)

    def test_loading_progress_and_timings(self) -> None:
        """llama-swap's loading stream (``reasoning_content``) is shown apart
        from the reply, and the final chunk's ``timings`` give tokens/s."""
        chunks = [
            {"choices": [{"delta": {"reasoning_content": "llama-swap loading model: alpha\n"}}]},
            {"choices": [{"delta": {"reasoning_content": "Done! (0.52s)\n"}}]},
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]},
            {"choices": [{"index": 0, "delta": {"content": " there"}}]},
            {
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "timings": {
                    "predicted_per_second": 123.4,
                    "prompt_per_second": 456.7,
                    "predicted_n": 2,
                },
            },
        ]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

        def scenario(page: Any) -> None:
            page.route(
                "**/v1/chat/completions",
                lambda route: route.fulfill(
                    status=200, content_type="text/event-stream", body=body
                ),
            )
            page.goto("/ui/playground?model=alpha")
            page.fill("#pg-input", "hello")
            page.click("#pg-send")
            page.wait_for_selector('.msg.assistant[data-state="done"]')
            self.assertEqual(page.inner_text(".msg.assistant .text"), "Hi there")
            reasoning = page.locator(".msg.assistant details pre").text_content()
            self.assertIn("llama-swap loading model: alpha", reasoning)
            foot = page.inner_text(".msg.assistant .foot")
            self.assertIn("123.4 tokens/s", foot)
            self.assertIn("prompt 456.7 t/s", foot)

        self.in_browser(scenario)


class ModelsTests(BrowserTestCase):
    def test_load_and_unload(self) -> None:
        """Load starts a model and Unload stops it; the card follows the state."""

        def scenario(page: Any) -> None:
            page.goto("/ui/models")
            card = page.locator("article.model[data-model=beta]")
            card.wait_for()
            if card.get_attribute("data-state") != "stopped":
                card.locator("[data-action=unload]").click()
                page.wait_for_selector("article.model[data-model=beta][data-state=stopped]")
            with page.expect_request(
                lambda sent: sent.url.endswith("/api/models/load/beta") and sent.method == "POST"
            ):
                card.locator("[data-action=load]").click()
            page.wait_for_selector("article.model[data-model=beta][data-state=ready]")
            running = json.loads(self.stack.call("/running")[1])["running"]
            self.assertIn("beta", [r["model"] for r in running])
            card.locator("[data-action=unload]").click()
            page.wait_for_selector("article.model[data-model=beta][data-state=stopped]")
            self.assertEqual(card.locator("[data-role=state]").inner_text(), "stopped")
            running = json.loads(self.stack.call("/running")[1])["running"]
            self.assertNotIn("beta", [r["model"] for r in running])

        self.in_browser(scenario)

    def test_loading_progress_bar_and_sleeping(self) -> None:
        """A starting model's card shows ``loadingProgress``'s percent as a
        bar and its ``eta_s`` as the time left; a sleeping model's card says so."""
        states = [{"id": "beta", "state": "starting"}, {"id": "alpha", "state": "sleeping"}]
        events = [
            {"type": "modelStatus", "data": json.dumps(states)},
            {
                "type": "loadingProgress",
                "data": json.dumps(
                    {
                        "models": [
                            {
                                "id": "beta",
                                "state": "starting",
                                "elapsed_s": 3.0,
                                "queue_length": 1,
                                "percent": 42.0,
                                "eta_s": 6.2,
                            }
                        ]
                    }
                ),
            },
        ]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
        running = json.dumps({"running": [{"model": s["id"], "state": s["state"]} for s in states]})

        def scenario(page: Any) -> None:
            page.route(
                "**/api/events",
                lambda route: route.fulfill(
                    status=200, content_type="text/event-stream", body=body
                ),
            )
            page.route(
                "**/running",
                lambda route: route.fulfill(
                    status=200, content_type="application/json", body=running
                ),
            )
            page.goto("/ui/models")
            bar = page.locator("article.model[data-model=beta] [data-role=loading]")
            bar.wait_for()
            self.assertEqual(bar.locator("progress").evaluate("p => p.value"), 42)
            self.assertEqual(bar.locator(".meta").inner_text(), "42% · about 6 s left")
            alpha = page.locator("article.model[data-model=alpha][data-state=sleeping]")
            self.assertEqual(alpha.locator("[data-role=state]").inner_text(), "sleeping")
            self.assertEqual(alpha.locator("[data-role=loading]").count(), 0)
            self.screenshot(page, "models-loading")

        self.in_browser(scenario)

    def test_down_peer_is_unavailable(self) -> None:
        """A peer model whose host is down shows ``unavailable`` and a
        "peer down" tag (issue 15)."""
        records = {
            "object": "list",
            "data": [
                {
                    "id": "far/m",
                    "object": "model",
                    "name": "far: m",
                    "meta": {
                        "llamaswap": {
                            "type": "peer",
                            "peerID": "far",
                            "peer": {"state": "down", "error": "connection refused"},
                        }
                    },
                    "status": {"value": "unavailable"},
                }
            ],
        }

        def scenario(page: Any) -> None:
            page.route(
                "**/v1/models",
                lambda route: route.fulfill(
                    status=200, content_type="application/json", body=json.dumps(records)
                ),
            )
            page.goto("/ui/models")
            card = page.locator('article.model[data-model="far/m"][data-state=unavailable]')
            card.wait_for()
            self.assertEqual(card.locator("[data-role=state]").inner_text(), "unavailable")
            self.assertIn("peer down", card.inner_text())

        self.in_browser(scenario)


class ResourceBarTests(BrowserTestCase):
    def test_resource_bars(self) -> None:
        """With a top-level ``resources`` the models page shows one bar per
        resource: each loaded model's share with its footprint's source,
        reserved/total and the probed free memory; the bars follow loads
        live (``resources`` events), and a footprint measured above its
        declared size shows as measured."""
        placed: Stack = shared(
            "placed",
            lambda: Stack(
                resources={"gpu0": "24GiB", "ram": "8GiB"},
                footprints={
                    "alpha": {"gpu0": "10GiB", "ram": "1GiB"},
                    "beta": {"gpu0": "12GiB", "ram": "1MiB"},
                },
            ),
        )

        def scenario(page: Any) -> None:
            page.goto("/ui/models")
            gpu = page.locator("#resources [data-resource=gpu0]")
            gpu.wait_for()
            self.assertIn("24.0 GiB", gpu.locator("[data-role=figures]").inner_text())
            ram_figures = page.locator("#resources [data-resource=ram] [data-role=figures]")
            self.assertRegex(ram_figures.inner_text(), r"GiB free|MiB free")
            alpha = page.locator("article.model[data-model=alpha]")
            self.assertIn(
                "gpu0 10.0 GiB · declared", alpha.locator("[data-role=footprint]").inner_text()
            )
            for name in ("alpha", "beta"):
                page.locator(f"article.model[data-model={name}] [data-action=load]").click()
                page.wait_for_selector(f"article.model[data-model={name}][data-state=ready]")
            page.wait_for_selector("#resources [data-resource=gpu0] .seg[data-model=alpha]")
            page.wait_for_selector("#resources [data-resource=gpu0] .seg[data-model=beta]")
            self.assertIn(
                "22.0 GiB reserved of 24.0 GiB",
                gpu.locator("[data-role=figures]").inner_text(),
            )
            self.assertEqual(
                gpu.locator(".seg[data-model=alpha]").get_attribute("title"),
                "alpha: 10.0 GiB (declared)",
            )
            # beta's demo server holds far more than the 1 MiB declared
            page.wait_for_selector(
                "#resources [data-resource=ram] .legend li[data-model=beta] "
                "[data-role=source]:text-is('measured')"
            )
            self.screenshot(page, "models-resources")
            placed.call("/api/models/unload", "POST")
            page.wait_for_selector("#resources [data-resource=gpu0] .seg", state="detached")

        self.in_browser(scenario, stack=placed)


class ActivityTests(BrowserTestCase):
    def test_new_request_and_capture(self) -> None:
        """A new request appears in the table and its capture opens, bodies decoded."""
        marker = f"marker-{time.monotonic_ns()}"
        chat(self.stack, "alpha", f"plain {marker}")
        chat(self.stack, "alpha", f"streamed {marker}", stream=True)
        page_json = json.loads(self.stack.call("/api/metrics/activity?limit=1")[1])
        newest = page_json["data"][0]["id"]

        def scenario(page: Any) -> None:
            page.goto("/ui/activity")
            row = page.locator(f"#activity-table tr[data-id='{newest}']")
            row.wait_for()
            self.assertIn("alpha", row.inner_text())
            row.locator("button[data-capture]").click()
            dialog = page.locator("#capture-dialog")
            dialog.wait_for()
            page.wait_for_selector("#capture-dialog .event")
            body = dialog.inner_text()
            self.assertIn(f"Capture #{newest}", body)
            self.assertIn(f"streamed {marker}", body)  # request body decoded
            self.assertIn('"stream": true', body)  # ... and pretty-printed
            self.assertGreater(dialog.locator(".event").count(), 3)  # SSE event by event
            self.screenshot(page, "capture")
            # Sorting by a header asks the server for that order.
            page.click("#capture-dialog .dlg-head button")
            page.click("th[data-sort=id]")
            page.wait_for_selector("th[data-sort=id][aria-sort=ascending]")

        self.in_browser(scenario)


class LogsTests(BrowserTestCase):
    def test_live_line(self) -> None:
        """A request made while the page is open shows up in the proxy log."""
        if self.stack.status_of("/logs/stream/proxy?no-history") == 404:
            raise SkipTest("/logs/stream is not available in this llamaswap yet")
        marker = f"ui-log-marker-{time.monotonic_ns()}"

        def scenario(page: Any) -> None:
            page.goto("/ui/logs?source=proxy")
            page.wait_for_function(
                "document.querySelector('#log-status')?.textContent.startsWith('streaming')"
            )
            self.stack.call(f"/{marker}")  # an unknown path: logged, 404
            page.wait_for_selector(f"#logview .line:has-text('{marker}')")
            page.fill("input[aria-label='Filter lines']", marker)
            visible = page.locator("#logview .line:not(.hidden)")
            self.assertGreaterEqual(visible.count(), 1)
            self.assertTrue(all(marker in t for t in visible.all_inner_texts()))

        self.in_browser(scenario)

    def test_ansi_colours(self) -> None:
        """ANSI colour codes become styled spans; the escapes are not shown."""
        body = "plain \x1b[31mred\x1b[0m and \x1b[1;32mbold green\x1b[0m\n[WARN] careful\n"

        def scenario(page: Any) -> None:
            page.route(
                "**/logs/stream/proxy",
                lambda route: route.fulfill(status=200, content_type="text/plain", body=body),
            )
            page.goto("/ui/logs?source=proxy")
            red = page.locator("#logview span", has_text="red").first
            red.wait_for()
            self.assertEqual(red.evaluate("e => e.style.color"), "var(--ansi-1)")
            bold = page.locator("#logview span.ansi-bold", has_text="bold green")
            self.assertEqual(bold.evaluate("e => e.style.color"), "var(--ansi-2)")
            self.assertEqual(
                page.locator("#logview .line").first.inner_text(), "plain red and bold green"
            )
            warn = page.locator("#logview span", has_text="[WARN] careful")
            self.assertEqual(warn.evaluate("e => e.style.color"), "var(--ansi-3)")

        self.in_browser(scenario)


class DegradedTests(BrowserTestCase):
    def test_optional_endpoints_missing(self) -> None:
        """With the optional endpoints answering 404 every page says what is
        missing, and model states still follow by polling /running."""

        def not_found(route: Any) -> None:
            route.fulfill(status=404, content_type="text/plain", body="404 page not found\n")

        def scenario(page: Any) -> None:
            for pattern in ("**/api/events", "**/api/profiles", "**/api/inflight", "**/logs/**"):
                page.route(pattern, not_found)
            page.goto("/ui/models")
            page.wait_for_selector("#conn.polling")
            card = page.locator("article.model[data-model=alpha]")
            card.wait_for()
            self.stack.call("/upstream/alpha/health")
            page.wait_for_selector("article.model[data-model=alpha][data-state=ready]")
            page.goto("/ui/logs")
            self.assertIn("not available", page.locator("[data-unavailable]").inner_text())
            page.goto("/ui/inflight")
            self.assertIn("not available", page.locator("[data-unavailable]").inner_text())

        self.in_browser(scenario)


class LoginTests(BrowserTestCase):
    def test_api_key_prompt(self) -> None:
        """With apiKeys the UI asks for a key, rejects a wrong one, then works."""
        keyed: Stack = shared("keyed", lambda: Stack(api_keys=["sekrit-key"]))
        status, _ = keyed.call("/ui/")
        if status == 401:
            raise SkipTest("/ui/ is behind apiKeys: the browser's own Basic prompt is used")

        def scenario(page: Any) -> None:
            page.goto("/ui/models")
            page.wait_for_selector("#login[open]")
            self.screenshot(page, "login")
            page.fill("#login-key", "wrong")
            page.click("#login button[type=submit]")
            page.wait_for_selector("#login-error:not([hidden])")
            page.fill("#login-key", "sekrit-key")
            page.click("#login button[type=submit]")
            page.wait_for_selector("article.model[data-model=alpha]")
            self.assertFalse(page.locator("#login").evaluate("d => d.open"))
            self.assertEqual(
                page.evaluate("sessionStorage.getItem('llamaswap.apiKey')"), "sekrit-key"
            )

        self.in_browser(scenario, stack=keyed, expect_401=True)


class InflightTests(BrowserTestCase):
    def test_cancel(self) -> None:
        """A long request is listed while it streams and Cancel ends it."""
        if self.stack.status_of("/api/inflight") == 404:
            raise SkipTest("/api/inflight is not available in this llamaswap yet")
        ended: list[float] = []

        def slow_request() -> None:
            started = time.monotonic()
            try:
                self.stack.call(
                    "/v1/chat/completions",
                    "POST",
                    {
                        "model": "alpha",
                        "stream": True,
                        "max_tokens": 900,  # 15 s at 60 tokens/s
                        "messages": [{"role": "user", "content": "a long story please"}],
                    },
                )
            except (OSError, http.client.HTTPException):
                pass  # a cancelled stream ends truncated
            ended.append(time.monotonic() - started)

        def scenario(page: Any) -> None:
            page.goto("/ui/inflight")
            page.wait_for_selector("main .empty, #inflight-table")
            worker = threading.Thread(target=slow_request, daemon=True)
            worker.start()
            row = page.locator("#inflight-table tbody tr[data-id]", has_text="alpha")
            row.wait_for()
            self.assertIn("/v1/chat/completions", row.inner_text())
            self.screenshot(page, "inflight-request")
            row.locator("button[data-cancel]").click()
            row.wait_for(state="detached")
            worker.join(10)

        self.in_browser(scenario)
        self.assertEqual(len(ended), 1)
        self.assertLess(ended[0], 10)
