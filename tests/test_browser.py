"""Browser attacks (issue 11.3, docs/security.md): DNS rebinding is refused
by the ``Host`` check, cross-site pages cannot drive state-changing
management calls, inference endpoints keep llama-swap's CORS behaviour.

Every HTTP test runs the whole service on a loopback socket and talks to it
as a browser would, with the headers a browser sends.
"""

from __future__ import annotations

import json
import os
import tempfile
from base64 import b64encode
from typing import Any

import treq
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from llamaswap.config import ConfigError, load_config_text
from llamaswap.config.browser import (
    AllowedHosts,
    AllowedOrigins,
    is_loopback_host,
    origin_key,
    read_allowed_hosts,
    read_allowed_origins,
    split_authority,
)
from llamaswap.service.wiring import build_service
from llamaswap.supervision.process import ProcessState
from llamaswap.web.guard import changes_state
from llamaswap.web.site import LlamaSwapSite
from tests.support import PYTHON, RESPONDER, ServiceProcess, base_url, free_port

KEY = "sk-browser"
EVIL = "http://evil.example"


def _model(port: int | None = None) -> dict[str, Any]:
    if port is None:
        return {"cmd": "nothing ${PORT}", "proxy": "http://127.0.0.1:9"}
    return {
        "cmd": f"{PYTHON} {RESPONDER} --port {port}",
        "proxy": f"http://127.0.0.1:{port}",
    }


class Answer:
    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> list[bytes] | None:
        return self.headers.getRawHeaders(name)  # type: ignore[no-any-return]

    def error(self) -> dict[str, Any]:
        return json.loads(self.body)["error"]  # type: ignore[no-any-return]


class BrowserTestCase(TestCase):
    """The service on a loopback port; requests with browser headers."""

    timeout = 60

    def start(
        self, models: dict[str, Any] | None = None, *, loopback_only: bool = True, **globals_: Any
    ) -> None:
        document = {"healthCheckTimeout": 15, **globals_, "models": models or {"a": _model()}}
        self.config = load_config_text(json.dumps(document), environ=dict(os.environ))
        self.service = build_service(self.config, reactor, loopback_only=loopback_only)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.port = reactor.listenTCP(
            0, LlamaSwapSite(self.service.app.resource()), interface="127.0.0.1"
        )
        self.addCleanup(self.port.stopListening)
        self.url = base_url(self.port)
        self.own_host = f"127.0.0.1:{self.port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def reload(self, **globals_: Any) -> None:
        document = {"healthCheckTimeout": 15, **globals_, "models": {"a": _model()}}
        self.service.app.reconfigure(load_config_text(json.dumps(document), environ={}))

    async def fetch(
        self,
        method: str,
        path: str,
        *,
        host: str | None = None,
        body: bytes = b"",
        **headers: str,
    ) -> Answer:
        """One request; ``host`` replaces the ``Host`` header, other
        keyword arguments are headers (``sec_fetch_site`` → Sec-Fetch-Site)."""
        sent = {name.replace("_", "-"): [value] for name, value in headers.items()}
        if host is not None:
            sent["host"] = [host]
        response = await treq.request(
            method,
            self.url + path,
            headers=sent,
            data=body or None,
            pool=self.pool,
            allow_redirects=False,
        )
        return Answer(response.code, response.headers, await response.content())


class _RawClient(protocol.Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.received)


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` as is (``Connection: close``); the whole answer."""
    client = _RawClient(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return await client.done


class HostOnLoopbackTests(BrowserTestCase):
    """Listening on loopback only: loopback names, plus ``allowedHosts``."""

    async def test_rebound_name_is_refused_everywhere(self) -> None:
        """A name that is not loopback (a DNS-rebinding page's) gets 403
        with the JSON envelope naming the host and ``allowedHosts``, on
        every kind of path: health, listing, inference, preflight, UI."""
        self.start()
        host = "evil.example:8080"
        for method, path in (
            ("GET", "/health"),
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("OPTIONS", "/v1/chat/completions"),
            ("GET", "/running"),
            ("GET", "/ui/"),
        ):
            with self.subTest(method=method, path=path):
                answer = await self.fetch(method, path, host=host, accept="application/json")
                self.assertEqual(answer.code, 403)
                self.assertEqual(answer.header(b"content-type"), [b"application/json"])
                error = answer.error()
                self.assertEqual(error["code"], "host_not_allowed")
                self.assertIn('host "evil.example:8080"', error["message"])
                self.assertIn("allowedHosts", error["message"])
                self.assertIsNone(answer.header(b"access-control-allow-origin"))

    async def test_loopback_names_and_addresses(self) -> None:
        """localhost, *.localhost, any 127.x.x.x and [::1], with or without
        a port, in any case, are accepted."""
        self.start()
        for host in (
            self.own_host,
            "localhost",
            "LocalHost:8080",
            "localhost.:8080",
            "chat.localhost:1234",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:8080",
        ):
            with self.subTest(host=host):
                answer = await self.fetch("GET", "/health", host=host)
                self.assertEqual((answer.code, answer.body), (200, b"OK"))

    async def test_not_loopback(self) -> None:
        """Names that only look local, other addresses and malformed values
        are refused."""
        self.start()
        for host in (
            "localhost.evil.example",
            "evillocalhost",
            "0.0.0.0:8080",
            "192.168.1.5:8080",
            "[::2]:8080",
            "127.0.0.1:notaport",
            "127.0.0.1:99999",
            "[::1",
            "a b",
        ):
            with self.subTest(host=host):
                answer = await self.fetch("GET", "/health", host=host)
                self.assertEqual(answer.code, 403)

    async def test_allowed_hosts(self) -> None:
        """``allowedHosts``: exact names on any port, name:port on that port
        only, ``*.suffix`` for names below it (not the suffix itself)."""
        self.start(allowedHosts=["llm.example.com", "box.lan:8443", "*.home.arpa"])
        for host, code in (
            ("llm.example.com", 200),
            ("LLM.example.com:8080", 200),
            ("box.lan:8443", 200),
            ("box.lan:8080", 403),
            ("gpu.home.arpa:8080", 200),
            ("a.b.home.arpa", 200),
            ("home.arpa", 403),
            ("evil.example", 403),
            ("localhost:8080", 200),
        ):
            with self.subTest(host=host):
                answer = await self.fetch("GET", "/health", host=host)
                self.assertEqual(answer.code, code)

    async def test_allowed_hosts_any(self) -> None:
        """``allowedHosts: ["*"]`` accepts every host."""
        self.start(allowedHosts=["*"])
        answer = await self.fetch("GET", "/health", host="evil.example")
        self.assertEqual(answer.code, 200)

    async def test_reload_applies(self) -> None:
        """A reload that adds a name to ``allowedHosts`` lets it in from the
        next request; removing it refuses it again."""
        self.start()
        self.assertEqual((await self.fetch("GET", "/health", host="llm.lan")).code, 403)
        self.reload(allowedHosts=["llm.lan"])
        self.assertEqual((await self.fetch("GET", "/health", host="llm.lan")).code, 200)
        self.reload()
        self.assertEqual((await self.fetch("GET", "/health", host="llm.lan")).code, 403)

    async def test_text_and_html_answers(self) -> None:
        """A browser asking for HTML (the address bar) reads the refusal as a page."""
        self.start()
        answer = await self.fetch("GET", "/ui/", host="evil.example", accept="text/html")
        self.assertEqual(answer.code, 403)
        self.assertIn(b"allowedHosts", answer.body)
        self.assertEqual(answer.header(b"content-type"), [b"text/html; charset=utf-8"])

    async def test_every_host_header_counts(self) -> None:
        """With two Host headers, a bad one is refused whichever comes first;
        a request without Host (HTTP/1.0) is not a browser's and passes."""
        self.start()
        port = self.port.getHost().port
        for first, second in ((b"localhost", b"evil.example"), (b"evil.example", b"localhost")):
            answer = await raw_exchange(
                port,
                b"GET /health HTTP/1.1\r\nHost: %s\r\nHost: %s\r\nConnection: close\r\n\r\n"
                % (first, second),
            )
            self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)
        answer = await raw_exchange(port, b"GET /health HTTP/1.0\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.0 200 "), answer)
        self.assertTrue(answer.endswith(b"\r\n\r\nOK"), answer)

    async def test_hostile_host_is_shown_escaped_and_bounded(self) -> None:
        """The refused host is quoted in the message without control or
        non-ASCII bytes and cut at 100 characters."""
        self.start()
        port = self.port.getHost().port
        answer = await raw_exchange(
            port,
            b"GET /health HTTP/1.1\r\nHost: ev\x01il\xff" + b"x" * 300 + b"\r\n"
            b"Connection: close\r\n\r\n",
        )
        body = answer.partition(b"\r\n\r\n")[2]
        message = json.loads(body)["error"]["message"]
        self.assertIn('host "ev\\x01il\\xff' + "x" * 94 + '…"', message)


class HostElsewhereTests(BrowserTestCase):
    """Listening beyond loopback: ``allowedHosts`` applies when set."""

    async def test_any_host_without_allowed_hosts(self) -> None:
        """Without ``allowedHosts`` every host is accepted (the user chose to
        expose llamaswap; docs/security.md says what else to set)."""
        self.start(loopback_only=False)
        for host in ("evil.example", "192.168.1.5:8080", "localhost"):
            with self.subTest(host=host):
                self.assertEqual((await self.fetch("GET", "/health", host=host)).code, 200)

    async def test_allowed_hosts_apply(self) -> None:
        """With ``allowedHosts`` set, only those names and loopback pass."""
        self.start(loopback_only=False, allowedHosts=["llm.example.com"])
        for host, code in (
            ("llm.example.com", 200),
            ("localhost:8080", 200),
            ("192.168.1.5:8080", 403),
            ("evil.example", 403),
        ):
            with self.subTest(host=host):
                answer = await self.fetch("GET", "/health", host=host)
                self.assertEqual(answer.code, code)
        answer = await self.fetch("GET", "/health", host="evil.example")
        self.assertIn("not in allowedHosts", answer.error()["message"])


class CrossSiteTests(BrowserTestCase):
    """State-changing management calls from other sites are refused."""

    async def refused(self, method: str, path: str, **headers: str) -> Answer:
        answer = await self.fetch(method, path, **headers)
        self.assertEqual(answer.code, 403, (method, path, headers, answer.body))
        error = answer.error()
        self.assertEqual(error["code"], "cross_site_refused")
        self.assertIn("allowedOrigins", error["message"])
        return answer

    async def test_unload_from_another_site_keeps_the_model(self) -> None:
        """A page on another site cannot unload a running model, whether the
        browser says so by Origin or by Sec-Fetch-Site (an <img> or a form);
        the same call from the UI (same origin) or curl (no such headers) works."""
        self.start({"a": _model(free_port())})
        answer = await self.fetch("GET", "/upstream/a/health", sec_fetch_site="same-origin")
        self.assertEqual(answer.code, 200)
        self.assertEqual(self.service.router.processes["a"].state, ProcessState.READY)
        for method, path in (
            ("POST", "/api/models/unload"),
            ("POST", "/api/models/unload/a"),
            ("GET", "/unload"),
        ):
            with self.subTest(method=method, path=path):
                await self.refused(method, path, origin=EVIL, sec_fetch_site="cross-site")
                await self.refused(method, path, sec_fetch_site="cross-site")
                await self.refused(method, path, sec_fetch_site="same-site")
                await self.refused(method, path, origin="http://localhost:3000")
                await self.refused(method, path, origin="null")
                self.assertEqual(self.service.router.processes["a"].state, ProcessState.READY)
        answer = await self.fetch(
            "POST",
            "/api/models/unload",
            origin=f"http://{self.own_host}",
            sec_fetch_site="same-origin",
        )
        self.assertEqual(answer.code, 200)
        self.assertEqual(self.service.router.processes["a"].state, ProcessState.STOPPED)
        answer = await self.fetch("GET", "/upstream/a/health")
        self.assertEqual(answer.code, 200)
        self.assertEqual((await self.fetch("GET", "/unload")).code, 200)
        self.assertEqual(self.service.router.processes["a"].state, ProcessState.STOPPED)

    async def test_load_through_upstream_from_another_site(self) -> None:
        """The UI's load path (/upstream/<model>/...) and /comfyui refuse
        other sites: the model is not started."""
        self.start({"a": _model(free_port()), "comfyui_auto": _model()})
        for path in ("/upstream/a/health", "/upstream/a/", "/comfyui/"):
            with self.subTest(path=path):
                await self.refused("GET", path, sec_fetch_site="cross-site")
                await self.refused("POST", path, origin=EVIL)
        self.assertEqual(self.service.router.processes["a"].state, ProcessState.STOPPED)

    async def test_profile_switch_and_cancel(self) -> None:
        """A profile switch and an in-flight cancel are refused cross-site;
        the active profile is unchanged.  Same-origin, both go through."""
        self.start(profiles={"work": {"pins": {"chat": "a"}}})
        body = b'{"name": "work"}'
        await self.refused("PUT", "/api/profiles/active", body=body, origin=EVIL)
        listing = json.loads((await self.fetch("GET", "/api/profiles")).body)
        self.assertIsNone(listing["active"])
        await self.refused("POST", "/api/inflight/1/cancel", sec_fetch_site="cross-site")
        own = f"http://{self.own_host}"
        answer = await self.fetch("PUT", "/api/profiles/active", body=body, origin=own)
        self.assertEqual(json.loads(answer.body), {"active": "work"})
        answer = await self.fetch("POST", "/api/inflight/1/cancel", origin=own)
        self.assertEqual(answer.code, 404)

    async def test_reading_is_not_refused(self) -> None:
        """Read-only management calls are not state changes (CORS already
        keeps other sites from reading them): no 403."""
        self.start()
        for path in ("/running", "/api/profiles", "/api/metrics", "/api/version"):
            with self.subTest(path=path):
                answer = await self.fetch("GET", path, origin=EVIL, sec_fetch_site="cross-site")
                self.assertEqual(answer.code, 200)

    async def test_navigation_from_the_address_bar(self) -> None:
        """Typed URLs and bookmarks (Sec-Fetch-Site: none) work."""
        self.start()
        answer = await self.fetch("GET", "/unload", sec_fetch_site="none")
        self.assertEqual(answer.code, 200)

    async def test_allowed_origins(self) -> None:
        """An origin listed in ``allowedOrigins`` (default port and case
        normalised) may manage; others may not; ``*`` allows every origin."""
        self.start(allowedOrigins=["https://Dash.example.com:443/"])
        answer = await self.fetch(
            "POST",
            "/api/models/unload",
            origin="https://dash.example.com",
            sec_fetch_site="cross-site",
        )
        self.assertEqual(answer.code, 200)
        await self.refused("POST", "/api/models/unload", origin="https://dash.example.com:8443")
        await self.refused("POST", "/api/models/unload", origin="http://dash.example.com")
        self.reload(allowedOrigins=["*"])
        answer = await self.fetch("POST", "/api/models/unload", origin=EVIL)
        self.assertEqual(answer.code, 200)

    async def test_behind_a_tls_proxy(self) -> None:
        """Behind a TLS-terminating proxy that passes Host, the UI's origin
        (https, default port) matches the plain-HTTP request's own host."""
        self.start(allowedHosts=["llm.example.com"])
        answer = await self.fetch(
            "POST",
            "/api/models/unload",
            host="llm.example.com",
            origin="https://llm.example.com",
            sec_fetch_site="same-origin",
        )
        self.assertEqual(answer.code, 200)

    async def test_key_in_a_header_lifts_the_guard(self) -> None:
        """A valid key as Bearer or x-api-key proves the page was given it;
        a Basic key (the browser resends remembered ones by itself) does
        not; no key is still 401."""
        self.start(apiKeys=[KEY])
        for headers in ({"authorization": f"Bearer {KEY}"}, {"x_api_key": KEY}):
            with self.subTest(headers=headers):
                answer = await self.fetch("POST", "/api/models/unload", origin=EVIL, **headers)
                self.assertEqual(answer.code, 200)
        basic = "Basic " + b64encode(f"user:{KEY}".encode()).decode()
        await self.refused("POST", "/api/models/unload", origin=EVIL, authorization=basic)
        answer = await self.fetch("POST", "/api/models/unload", authorization=basic)
        self.assertEqual(answer.code, 200)
        answer = await self.fetch("POST", "/api/models/unload", origin=EVIL)
        self.assertEqual(answer.code, 401)

    async def test_inference_keeps_cors(self) -> None:
        """A chat app on another origin keeps working: the preflight is the
        permissive 204 and the POST is served by the model."""
        self.start({"a": _model(free_port())})
        answer = await self.fetch(
            "OPTIONS",
            "/v1/chat/completions",
            origin=EVIL,
            access_control_request_method="POST",
            access_control_request_headers="content-type",
            sec_fetch_site="cross-site",
        )
        self.assertEqual(answer.code, 204)
        self.assertEqual(answer.header(b"access-control-allow-origin"), [b"*"])
        body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}]})
        answer = await self.fetch(
            "POST",
            "/v1/chat/completions",
            body=body.encode(),
            origin=EVIL,
            sec_fetch_site="cross-site",
            content_type="application/json",
        )
        self.assertEqual(answer.code, 200, answer.body)

    async def test_models_listing_varies_by_origin(self) -> None:
        """/v1/models echoes Origin and says ``Vary: Origin`` (also without
        one, so a cache never serves one origin's answer to another)."""
        self.start()
        for path in ("/v1/models", "/models"):
            answer = await self.fetch("GET", path, origin=EVIL, sec_fetch_site="cross-site")
            self.assertEqual(answer.code, 200)
            self.assertEqual(answer.header(b"access-control-allow-origin"), [EVIL.encode()])
            self.assertEqual(answer.header(b"vary"), [b"Origin"])
            answer = await self.fetch("GET", path)
            self.assertIsNone(answer.header(b"access-control-allow-origin"))
            self.assertEqual(answer.header(b"vary"), [b"Origin"])


class CommandLineTests(TestCase):
    timeout = 60

    async def test_twistd_listening_on_loopback_refuses_rebinding(self) -> None:
        """``llamaswap --listen 127.0.0.1:PORT`` (the real command) passes
        "loopback only" to the guard: a foreign Host is refused."""
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            json.dump({"models": {"a": _model()}}, f)
        self.addCleanup(os.unlink, f.name)
        running = ServiceProcess(["-m", "llamaswap", "-c", f.name], free_port())
        self.addCleanup(lambda: running.ended)
        self.addCleanup(running.transport.signalProcess, "TERM")
        await running.wait_up()
        response = await treq.get(
            running.url + "/health", headers={"host": ["evil.example"]}, pool=running.pool
        )
        self.assertEqual(response.code, 403)
        self.assertEqual(json.loads(await response.content())["error"]["code"], "host_not_allowed")


class ParsingTests(SynchronousTestCase):
    def test_split_authority(self) -> None:
        """host[:port] as browsers send it; anything else is None."""
        self.assertEqual(split_authority("LocalHost:8080"), ("localhost", 8080))
        self.assertEqual(split_authority("example.com."), ("example.com", None))
        self.assertEqual(split_authority("[::1]:80"), ("::1", 80))
        self.assertEqual(split_authority("::1"), ("::1", None))
        for bad in ("", ":80", "a:", "a:0", "a:65536", "a:+1", "[::1]x", "[zz]", "a b", "a/b"):
            with self.subTest(bad=bad):
                self.assertIsNone(split_authority(bad))

    def test_loopback(self) -> None:
        for host in ("localhost", "x.localhost", "127.0.0.1", "127.255.0.9", "::1"):
            self.assertTrue(is_loopback_host(host), host)
        for host in ("localhost.com", "0.0.0.0", "10.0.0.1", "::", "example.com"):
            self.assertFalse(is_loopback_host(host), host)

    def test_origin_key(self) -> None:
        """Origins are compared in canonical form."""
        self.assertEqual(origin_key("HTTPS://App.Example.com:443/"), "https://app.example.com")
        self.assertEqual(origin_key("http://[::1]:8080"), "http://[::1]:8080")
        self.assertEqual(origin_key("chrome-extension://abc"), "chrome-extension://abc")
        for bad in ("null", "app.example.com", "https://a/b", "https://u@a", "https://"):
            with self.subTest(bad=bad):
                self.assertIsNone(origin_key(bad))

    @given(st.text(max_size=40))
    def test_origin_key_is_canonical(self, text: str) -> None:
        """A canonical origin is its own canonical form, and it names a
        well-formed host: what the guard compares is always comparable."""
        key = origin_key(text)
        if key is not None:
            self.assertEqual(origin_key(key), key)
            self.assertIsNotNone(split_authority(key.partition("://")[2]))

    @given(st.text(max_size=40))
    def test_split_authority_is_stable(self, text: str) -> None:
        """Splitting what was split (IPv6 re-bracketed) gives the same parts."""
        parts = split_authority(text)
        if parts is not None:
            host, port = parts
            shown = f"[{host}]" if ":" in host else host
            again = split_authority(shown if port is None else f"{shown}:{port}")
            self.assertEqual(again, parts)

    def test_changes_state(self) -> None:
        """The state-changing management calls, and what is not one."""
        for method, path in (
            (b"GET", b"/unload"),
            (b"POST", b"/api/models/unload"),
            (b"POST", b"/api/models/unload/a/b"),
            (b"PUT", b"/api/profiles/active"),
            (b"POST", b"/api/inflight/3/cancel"),
            (b"DELETE", b"/api/anything"),
            (b"GET", b"/upstream/a/health"),
            (b"GET", b"/comfyui/"),
        ):
            self.assertTrue(changes_state(method, path), (method, path))
        for method, path in (
            (b"GET", b"/api/profiles"),
            (b"GET", b"/running"),
            (b"POST", b"/v1/chat/completions"),
            (b"GET", b"/upstream"),
            (b"OPTIONS", b"/api/models/unload"),
        ):
            self.assertFalse(changes_state(method, path), (method, path))


class ConfigTests(SynchronousTestCase):
    def test_read(self) -> None:
        """Both keys are read, normalised and matched; unset means empty."""
        hosts, problems = read_allowed_hosts(
            {"allowedHosts": ["LLM.lan", "box:8443", "*.home.arpa", "[fe80::1]", "*"]}
        )
        self.assertEqual(problems, [])
        self.assertTrue(hosts.any_host)
        self.assertEqual(hosts.names, {"llm.lan", "fe80::1"})
        self.assertEqual(hosts.addresses, {("box", 8443)})
        self.assertEqual(hosts.suffixes, (".home.arpa",))
        self.assertEqual(read_allowed_hosts({}), (AllowedHosts(), []))
        origins, problems = read_allowed_origins({"allowedOrigins": ["https://a.example:443"]})
        self.assertEqual((origins.origins, problems), ({"https://a.example"}, []))
        self.assertEqual(read_allowed_origins({}), (AllowedOrigins(), []))

    def test_problems_name_the_key(self) -> None:
        """Each bad entry is one line naming its key and index."""
        text = json.dumps(
            {
                "allowedHosts": ["ok", "http://x/", "", 3, "*.", "a:b"],
                "allowedOrigins": ["app.example.com", "https://a/b", "https://ok"],
                "models": {"a": _model()},
            }
        )
        with self.assertRaises(ConfigError) as caught:
            load_config_text(text, environ={})
        problems = caught.exception.problems
        self.assertEqual(
            [line.split(":")[0] for line in problems],
            [
                "allowedHosts[1]",
                "allowedHosts[2]",
                "allowedHosts[3]",
                "allowedHosts[4]",
                "allowedHosts[5]",
                "allowedOrigins[0]",
                "allowedOrigins[1]",
            ],
        )
        self.assertIn("*.domain or *, got 'http://x/'", problems[0])
        self.assertIn("must be a non-empty string, got 3", problems[2])
        self.assertIn("https://app.example.com", problems[5])
        with self.assertRaises(ConfigError) as caught:
            load_config_text('allowedHosts: "llm.lan"\nmodels: {}\n', environ={})
        self.assertEqual(
            caught.exception.problems,
            ("allowedHosts: must be a list of strings, got 'llm.lan'",),
        )

    def test_known_keys(self) -> None:
        """Neither key is reported as unknown."""
        config = load_config_text(
            'allowedHosts: ["llm.lan"]\nallowedOrigins: ["https://a.b"]\nmodels: {}\n',
            environ={},
        )
        self.assertEqual(config.warnings, ())
        self.assertTrue(config.allowed_hosts.allows("llm.lan", 80))
        self.assertTrue(config.allowed_origins.allows("https://a.b"))
