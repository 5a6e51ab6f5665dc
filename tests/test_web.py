"""The web layer's dispatch, without sockets: which part answers which request.

Each test builds the whole service on a ``MemoryReactorClock`` and talks to
its root resource through ``StubTreq``; nothing is started, so only answers
that need no model process are exercised here (``test_service`` covers the
rest over loopback).
"""

from __future__ import annotations

import json
import os
from typing import Any

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from llamaswap.config import load_config_text
from llamaswap.service.service import LlamaSwapService
from llamaswap.service.wiring import build_service
from llamaswap.upstream.client import forward_headers, forwarded_for
from llamaswap.web.auth import ApiKeys
from llamaswap.web.websockets import WebSocketRelay

KEY = "sk-test"
AUTH = {"authorization": [f"Bearer {KEY}"]}


def _model(**keys: Any) -> dict[str, Any]:
    return {"cmd": "nothing ${PORT}", "proxy": "http://127.0.0.1:9", **keys}


class WebTestCase(SynchronousTestCase):
    """A service per test, its resource behind a ``StubTreq``."""

    def build(self, models: dict[str, Any], **globals_: Any) -> LlamaSwapService:
        document = {**globals_, "models": models}
        config = load_config_text(json.dumps(document), environ=dict(os.environ))
        self.service = build_service(config, MemoryReactorClock())
        self.stub = StubTreq(self.service.app.resource())
        return self.service

    def fetch(
        self, method: str, path: str, headers: dict[str, list[str]] | None = None, body: bytes = b""
    ) -> tuple[Any, bytes]:
        """One request; the response and its body."""
        d = self.stub.request(
            method, "http://llamaswap" + path, headers=headers, data=body, allow_redirects=False
        )
        self.stub.flush()
        response = self.successResultOf(d)
        collected = self.stub.content(response)
        self.stub.flush()
        return response, self.successResultOf(collected)

    def header(self, response: Any, name: bytes) -> list[bytes] | None:
        return response.headers.getRawHeaders(name)  # type: ignore[no-any-return]


class MethodNotAllowedTests(WebTestCase):
    """Every 405 reads the same: status, ``Allow``, the JSON error envelope."""

    def setUp(self) -> None:
        self.build({"a": _model()}, apiKeys=[KEY])

    def check(self, method: str, path: str, allow: bytes, *, any_order: bool = False) -> None:
        response, body = self.fetch(method, path, AUTH)
        self.assertEqual(response.code, 405)
        allowed = self.header(response, b"allow")
        if any_order:
            # Klein (werkzeug) collects the methods in a set.
            allowed = [b", ".join(sorted(allowed[0].split(b", ")))] if allowed else allowed
        self.assertEqual(allowed, [allow])
        self.assertEqual(self.header(response, b"content-type"), [b"application/json"])
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], "method_not_allowed")
        self.assertIn(f"method {method} not allowed", error["message"])

    def test_inference_path(self) -> None:
        """A model-dispatched path allows its own methods, sorted."""
        self.check("GET", "/v1/chat/completions", b"POST")
        self.check("POST", "/sdapi/v1/loras", b"GET, HEAD")
        self.check("PUT", "/v1/audio/voices", b"GET, HEAD, POST")

    def test_admin_route(self) -> None:
        """A Klein route allows what it was declared with."""
        self.check("GET", "/api/models/unload", b"POST", any_order=True)
        self.check("POST", "/running", b"GET, HEAD", any_order=True)

    def test_streams(self) -> None:
        """Log, event and in-flight streams."""
        self.check("POST", "/logs", b"GET, HEAD")
        self.check("PUT", "/api/events", b"GET, HEAD")
        self.check("GET", "/api/inflight/1/cancel", b"POST")

    def test_ui(self) -> None:
        """Static UI files, served without a key."""
        response, body = self.fetch("PUT", "/ui/")
        self.assertEqual(response.code, 405)
        self.assertEqual(self.header(response, b"allow"), [b"GET, HEAD"])
        self.assertEqual(json.loads(body)["error"]["code"], "method_not_allowed")


class DispatchTests(WebTestCase):
    """Which part answers: preflight, UI, auth, inference, streams, admin."""

    def setUp(self) -> None:
        self.build(
            {
                "a": _model(aliases=["alpha"], capabilities={"in": ["text"], "tools": True}),
                "org/b": _model(),
            },
            apiKeys=[KEY],
            includeAliasesInList=True,
            profiles={"work": {"pins": {"chat": "a"}}},
        )

    def test_preflight_needs_no_key(self) -> None:
        """OPTIONS on any path is a 204 CORS answer, before authentication."""
        response, body = self.fetch("OPTIONS", "/v1/chat/completions")
        self.assertEqual(response.code, 204)
        self.assertEqual(self.header(response, b"access-control-allow-origin"), [b"*"])
        self.assertEqual(body, b"")

    def test_open_paths(self) -> None:
        """/health, / and the UI answer without a key; the rest is 401."""
        response, body = self.fetch("GET", "/health")
        self.assertEqual((response.code, body), (200, b"OK"))
        response, _ = self.fetch("GET", "/")
        self.assertEqual((response.code, self.header(response, b"location")), (302, [b"/ui/"]))
        response, _ = self.fetch("GET", "/ui")
        self.assertEqual((response.code, self.header(response, b"location")), (301, [b"/ui/"]))
        for path in ("/v1/models", "/running", "/logs", "/upstream/a/"):
            response, _ = self.fetch("GET", path)
            self.assertEqual(response.code, 401, path)
        response, _ = self.fetch("POST", "/health")
        self.assertEqual(response.code, 401)

    def test_unknown_path(self) -> None:
        """Nothing routes it: Klein's plain 404."""
        response, body = self.fetch("GET", "/nothing/here", AUTH)
        self.assertEqual((response.code, body), (404, b"404 page not found\n"))

    def test_model_listing(self) -> None:
        """/v1/models lists models, aliases (includeAliasesInList) and capability fields."""
        response, body = self.fetch("GET", "/v1/models", {**AUTH, "origin": ["http://ui"]})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, b"access-control-allow-origin"), [b"http://ui"])
        records = {r["id"]: r for r in json.loads(body)["data"]}
        self.assertEqual(sorted(records), ["a", "alpha", "org/b"])
        self.assertEqual(records["a"]["capabilities"]["function_calling"], True)
        self.assertEqual(records["a"]["supported_parameters"], ["tools", "tool_choice"])
        self.assertEqual(records["a"]["status"], {"value": "unloaded"})
        self.assertEqual(records["alpha"]["meta"], {"llamaswap": {"type": "alias", "modelID": "a"}})
        self.assertEqual(self.service.app.model_records(), list(records.values()))

    def test_no_model(self) -> None:
        """An inference request naming no model is a 404."""
        response, body = self.fetch("POST", "/v1/chat/completions", AUTH, b"{}")
        self.assertEqual(response.code, 404)
        self.assertEqual(
            json.loads(body)["error"]["message"],
            "the request body could not be read as JSON or a form (no Content-Type); "
            'send a JSON body with a "model" member and Content-Type: application/json',
        )

    def test_upstream_redirects(self) -> None:
        """/upstream/<model> without a slash redirects: 301 for GET, 308 otherwise."""
        response, _ = self.fetch("GET", "/upstream/org/b?x=1", AUTH)
        self.assertEqual(response.code, 301)
        self.assertEqual(self.header(response, b"location"), [b"/upstream/org/b/?x=1"])
        response, _ = self.fetch("POST", "/upstream/alpha", AUTH)
        self.assertEqual(response.code, 308)
        self.assertEqual(self.header(response, b"location"), [b"/upstream/alpha/"])
        response, _ = self.fetch("GET", "/upstream/zzz/", AUTH)
        self.assertEqual(response.code, 404)

    def test_upstream_ignore_paths(self) -> None:
        """A path matching ignorePaths does not start a stopped model."""
        response, body = self.fetch("GET", "/upstream/a/favicon.ico", AUTH)
        self.assertEqual(response.code, 409)
        self.assertEqual(
            json.loads(body)["error"]["message"],
            "model a is not loaded; path matches upstream.ignorePaths",
        )

    def test_comfyui(self) -> None:
        """/comfyui redirects to /comfyui/; without comfyui_auto it is a 404."""
        response, _ = self.fetch("GET", "/comfyui?q=1", AUTH)
        self.assertEqual(response.code, 301)
        self.assertEqual(self.header(response, b"location"), [b"/comfyui/?q=1"])
        response, body = self.fetch("GET", "/comfyui/", AUTH)
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body)["error"]["message"], "local model comfyui_auto not found")

    def test_streams(self) -> None:
        """/api/inflight is answered by the streams resource."""
        response, body = self.fetch("GET", "/api/inflight", AUTH)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body), [])

    def test_profile_change(self) -> None:
        """Activating a profile is announced through the service's callback,
        and the pin then routes requests and shows in the listing."""
        changes: list[str | None] = []
        self.service.bus.profile_changed = changes.append  # type: ignore[assignment,method-assign]
        response, body = self.fetch("PUT", "/api/profiles/active", AUTH, b'{"name":"work"}')
        self.assertEqual((response.code, json.loads(body)), (200, {"active": "work"}))
        self.assertEqual(changes, ["work"])
        response, body = self.fetch("PUT", "/api/profiles/active", AUTH, b'{"name":"work"}')
        self.assertEqual(changes, ["work"])
        response, body = self.fetch("PUT", "/api/profiles/active", AUTH, b'{"name":"nope"}')
        self.assertEqual(response.code, 404)
        response, body = self.fetch("GET", "/api/profiles", AUTH)
        self.assertEqual(json.loads(body)["active"], "work")
        self.assertIn("chat", [record["id"] for record in self.service.app.model_records()])


class ReconfigureTests(WebTestCase):
    def test_reload_replaces_routing(self) -> None:
        """A reload swaps keys, models and profiles at once; no profile is active after it."""
        self.build({"a": _model()}, apiKeys=[KEY], profiles={"work": {"pins": {"chat": "a"}}})
        self.fetch("PUT", "/api/profiles/active", AUTH, b'{"name":"work"}')
        document = {
            "apiKeys": ["sk-new"],
            "models": {"b": _model()},
            "profiles": {"home": {"pins": {"chat": "b"}}},
        }
        self.service.apply(load_config_text(json.dumps(document), environ=dict(os.environ)))
        response, _ = self.fetch("GET", "/api/profiles", AUTH)
        self.assertEqual(response.code, 401)
        response, body = self.fetch("GET", "/api/profiles", {"x-api-key": ["sk-new"]})
        self.assertEqual(json.loads(body)["active"], None)
        self.assertEqual(list(self.service.app.profiles.profiles), ["home"])
        ids = [record["id"] for record in self.service.app.model_records()]
        self.assertEqual(ids, ["b"])

    def test_reload_forgets_removed_models_state(self) -> None:
        """A model removed by a reload leaves the state gauge; the others stay."""
        self.build({"a": _model(), "b": _model()})
        registry = self.service.metrics.registry
        stopped = {"model": "b", "state": "stopped"}
        self.assertEqual(registry.get_sample_value("llamaswap_model_state", stopped), 1)
        document = {"models": {"a": _model()}}
        self.service.apply(load_config_text(json.dumps(document), environ=dict(os.environ)))
        self.assertIsNone(registry.get_sample_value("llamaswap_model_state", stopped))
        kept = {"model": "a", "state": "stopped"}
        self.assertEqual(registry.get_sample_value("llamaswap_model_state", kept), 1)


class ForwardedForTests(SynchronousTestCase):
    def test_chain(self) -> None:
        """The client's address is appended to any chain it sent."""
        headers = Headers({b"x-forwarded-for": [b"10.0.0.1"]})
        self.assertEqual(forwarded_for(headers, "10.0.0.2"), b"10.0.0.1, 10.0.0.2")
        self.assertEqual(forwarded_for(Headers(), "10.0.0.2"), b"10.0.0.2")
        out = forward_headers(headers, client_ip="10.0.0.3")
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"10.0.0.1, 10.0.0.3"])


class _ReadyRouting:
    """Routing where every model ignores websockets and is ready."""

    class state:  # noqa: N801 - stands in for the attribute
        ignore_websockets = frozenset({"a"})

    def state_of(self, model_id: str) -> str:
        return "ready"


class _Router:
    def upstream_of(self, model_id: str) -> bytes:
        return b"http://127.0.0.1:1"


class _RecordingRelay(WebSocketRelay):
    """Records what would be spliced instead of connecting."""

    spliced: list[tuple[bytes, bytes, Headers]]

    async def _splice(
        self, request: Any, upstream: bytes, target: bytes, headers: Headers, body: bytes
    ) -> None:
        self.spliced.append((upstream, target, headers))


class WebSocketHeaderTests(SynchronousTestCase):
    def test_upgrade_headers(self) -> None:
        """An upgrade keeps its hop-by-hop headers, loses the header that
        carried our key and extends X-Forwarded-For."""
        relay = _RecordingRelay(_ReadyRouting(), _Router(), MemoryReactorClock())  # type: ignore[arg-type]
        relay.spliced = []
        request = DummyRequest([b"ws"])
        request.client = IPv4Address("TCP", "10.0.0.9", 5000)
        request.requestHeaders = Headers(
            {
                b"connection": [b"Upgrade"],
                b"upgrade": [b"websocket"],
                b"x-api-key": [KEY],
                b"x-forwarded-for": [b"10.0.0.1"],
            }
        )
        request.llamaswap_credential_header = b"x-api-key"
        relay.upgrade(request, "a", b"/ws", b"")
        [(upstream, target, headers)] = relay.spliced
        self.assertEqual((upstream, target), (b"http://127.0.0.1:1", b"/ws"))
        self.assertEqual(headers.getRawHeaders(b"connection"), [b"Upgrade"])
        self.assertEqual(headers.getRawHeaders(b"upgrade"), [b"websocket"])
        self.assertFalse(headers.hasHeader(b"x-api-key"))
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-for"), [b"10.0.0.1, 10.0.0.9"])
        self.assertEqual(request.requestHeaders.getRawHeaders(b"x-api-key"), [KEY.encode()])


class AuthorizeTests(SynchronousTestCase):
    def request(self, method: bytes, path: bytes, headers: dict[bytes, list[bytes]]) -> Any:
        request = DummyRequest([])
        request.method = method
        request.path = path
        request.requestHeaders = Headers(headers)
        return request

    def test_keys(self) -> None:
        """Without keys everything passes; with keys, open paths pass on
        GET/HEAD only, and a key's header and index are remembered."""
        self.assertTrue(ApiKeys(()).authorize(self.request(b"POST", b"/v1/x", {})))
        keys = ApiKeys(("other", KEY))
        self.assertTrue(keys.authorize(self.request(b"HEAD", b"/health", {})))
        self.assertFalse(keys.authorize(self.request(b"POST", b"/health", {})))
        self.assertFalse(keys.authorize(self.request(b"GET", b"/running", {})))
        wrong = self.request(b"GET", b"/running", {b"x-api-key": [b"nope"]})
        self.assertFalse(keys.authorize(wrong))
        self.assertFalse(hasattr(wrong, "llamaswap_api_key_index"))
        right = self.request(b"GET", b"/running", {b"authorization": [f"Bearer {KEY}".encode()]})
        self.assertTrue(keys.authorize(right))
        self.assertEqual(right.llamaswap_credential_header, b"authorization")
        self.assertEqual(right.llamaswap_api_key_index, 1)
