"""Bad input at the edge: dot segments in passthrough paths, bodies that do
not parse, and the messages that tell a client what was wrong."""

from __future__ import annotations

import json
from typing import Any

import treq
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from llamaswap.upstream.extract import extract_model
from llamaswap.web.paths import (
    BadPath,
    hides_dot_segment,
    is_dot_segment,
    resolve_dot_segments,
)
from tests.support import PYTHON, free_port
from tests.test_limits import _Client
from tests.test_service import ServiceTestCase, responder_model

JSON = b"application/json"
FORM = b"application/x-www-form-urlencoded"
MULTIPART = b"multipart/form-data; boundary=XyZ"


def _post(content_type: bytes, body: bytes, query: dict[bytes, list[bytes]] | None = None) -> Any:
    return extract_model(b"POST", content_type, body, query or {})


class ExtractMessageTests(SynchronousTestCase):
    """When no model is found, ``missing`` says why in words a client can act on."""

    def test_get_without_model(self) -> None:
        found = extract_model(b"GET", b"", b"", {})
        self.assertEqual(found.missing, 'no model given: the query has no "model" parameter')
        self.assertFalse(found.malformed)

    def test_json_that_does_not_parse(self) -> None:
        """A body labelled JSON that is not a JSON object names its
        Content-Type and what is wrong with it (a 404, as in llama-swap)."""
        found = _post(JSON + b"; charset=utf-8", b'{"model": "a",')
        self.assertEqual(found.model, "")
        self.assertFalse(found.malformed)
        self.assertTrue(
            found.missing.startswith(
                "the request body could not be read as JSON "
                "(Content-Type: application/json; charset=utf-8): Expecting"
            ),
            found.missing,
        )
        self.assertEqual(
            _post(JSON, b"[1, 2]").missing,
            "the request body could not be read as JSON (Content-Type: application/json): "
            "the body is an array, not a JSON object",
        )
        self.assertEqual(
            _post(JSON, b"").missing,
            "the request body could not be read as JSON (Content-Type: application/json): "
            "the body is empty",
        )

    def test_json_without_model(self) -> None:
        self.assertEqual(
            _post(JSON, b'{"messages": []}').missing,
            'no model given: the JSON body\'s "model" is missing or empty',
        )

    def test_unlabelled_body(self) -> None:
        """A body that is neither JSON nor a form says so, with the
        Content-Type it came with (or that it had none)."""
        self.assertEqual(
            _post(b"text/plain", b'{"model": "a"}').missing,
            "the request body could not be read as JSON or a form (Content-Type: text/plain); "
            'send a JSON body with a "model" member and Content-Type: application/json',
        )
        self.assertEqual(
            _post(b"", b'{"model": "a"}').missing,
            "the request body could not be read as JSON or a form (no Content-Type); "
            'send a JSON body with a "model" member and Content-Type: application/json',
        )
        self.assertEqual(
            _post(b"", b"").missing,
            'no model given: the request has no body and the query no "model" parameter',
        )

    def test_malformed_multipart(self) -> None:
        """A multipart body that does not parse is ``malformed`` (400), even
        when a ``model`` field could be read from it."""
        cases = [
            (b"multipart/form-data", b"--XyZ--\r\n", "the Content-Type has no boundary"),
            (MULTIPART, b"", "the body is empty"),
            (MULTIPART, b"model=a", "the body does not contain the boundary"),
            (
                MULTIPART,
                b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\na\r\n',
                "the body ends before the closing boundary",
            ),
            (MULTIPART, b"--XyZ\r\nContent-Disposition: form-data", "a part's headers do not end"),
        ]
        for ctype, body, reason in cases:
            with self.subTest(body=body):
                found = _post(ctype, body)
                self.assertTrue(found.malformed)
                self.assertEqual(found.model, "")
                self.assertEqual(
                    found.missing,
                    "the request body could not be read as multipart/form-data "
                    f"(Content-Type: {ctype.decode()}): {reason}",
                )

    def test_multipart_without_model(self) -> None:
        body = b'--XyZ\r\nContent-Disposition: form-data; name="file"\r\n\r\nx\r\n--XyZ--\r\n'
        found = _post(MULTIPART, body)
        self.assertFalse(found.malformed)
        self.assertEqual(
            found.missing,
            'no model given: the multipart form has no "model" field '
            'and the query no "model" parameter',
        )

    def test_malformed_form(self) -> None:
        """An urlencoded body with a broken percent-escape is ``malformed``."""
        found = _post(FORM, b"model=a%zz&stream=true")
        self.assertTrue(found.malformed)
        self.assertEqual(
            found.missing,
            "the request body could not be read as a form "
            '(Content-Type: application/x-www-form-urlencoded): invalid percent-escape "%zz" '
            "at byte 7",
        )
        self.assertEqual(_post(FORM, b"model=a%2Fb%20c").model, "a/b c")
        self.assertEqual(
            _post(FORM, b"prompt=hi").missing,
            'no model given: the form has no "model" field and the query no "model" parameter',
        )


class DotSegmentTests(SynchronousTestCase):
    """RFC 3986 dot-segment removal below a model's root."""

    def resolve(self, path: bytes) -> bytes:
        return b"/" + b"/".join(resolve_dot_segments(path[1:].split(b"/"), "/upstream/m/"))

    def test_resolved(self) -> None:
        for path, resolved in [
            (b"/v1/models", b"/v1/models"),
            (b"/v1/./models", b"/v1/models"),
            (b"/v1/x/../models", b"/v1/models"),
            (b"/v1/%2e/models", b"/v1/models"),
            (b"/v1/x/%2E%2e/models", b"/v1/models"),
            (b"/v1/x/.%2E/models", b"/v1/models"),
            (b"/v1/models/..", b"/v1/"),
            (b"/v1/.", b"/v1/"),
            (b"/a//../b", b"/a/b"),
            (b"/a/..b/c..", b"/a/..b/c.."),
            (b"/", b"/"),
        ]:
            with self.subTest(path=path):
                self.assertEqual(self.resolve(path), resolved)

    def test_refused(self) -> None:
        for path, message in [
            (b"/..", "invalid path: '..' climbs above /upstream/m/"),
            (b"/v1/../../x", "invalid path: '..' climbs above /upstream/m/"),
            (b"/%2e%2e/x", "invalid path: '..' climbs above /upstream/m/"),
            (
                b"/v1/..%2f..%2fetc",
                "invalid path: a segment hides '..' or '.' behind an encoded slash",
            ),
            (
                b"/v1/%2e%2e%5cx",
                "invalid path: a segment hides '..' or '.' behind an encoded slash",
            ),
        ]:
            with self.subTest(path=path):
                with self.assertRaises(BadPath) as raised:
                    self.resolve(path)
                self.assertEqual(str(raised.exception), message)


_SEGMENTS = st.sampled_from(
    [b".", b"..", b"%2e", b"%2E%2e", b".%2E", b"a", b"", b"v1", b"x.y", b"..b", b"a%2Fb", b"..%2f"]
)


class DotSegmentPropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(_SEGMENTS, max_size=8))
    def test_never_a_dot_segment(self, segments: list[bytes]) -> None:
        """Whatever the segments, the result is refused or holds no dot
        segment (plain, encoded or behind an encoded slash), and a path
        without dot segments is kept as it is."""
        try:
            out = resolve_dot_segments(segments, "/upstream/m/")
        except BadPath:
            self.assertTrue(any(is_dot_segment(s) or hides_dot_segment(s) for s in segments))
            return
        self.assertFalse(any(is_dot_segment(s) or hides_dot_segment(s) for s in out))
        if not any(is_dot_segment(s) for s in segments):
            self.assertEqual(out, segments)


class _Recorder(Resource):
    """An upstream that records the raw request target of every request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.uris: list[bytes] = []

    def render(self, request: Any) -> bytes:
        self.uris.append(request.uri)
        request.setHeader(b"content-type", b"application/json")
        return b'{"ok":true}'


class UpstreamPathTests(ServiceTestCase):
    """``/upstream/<model>/...`` never passes a dot segment to the model's server."""

    async def setUp(self) -> None:
        self.recorder = _Recorder()
        site = Site(self.recorder)
        site.noisy = False
        upstream = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(upstream.stopListening)
        port = upstream.getHost().port
        sleeper = {
            "cmd": f'{PYTHON} -c "import time; time.sleep(600)"',
            "proxy": f"http://127.0.0.1:{port}",
            "checkEndpoint": "none",
        }
        await self.start({"m": sleeper, "comfyui_auto": sleeper})

    async def raw(self, target: bytes) -> tuple[int, bytes]:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        client = await connectProtocol(endpoint, _Client())
        client.transport.write(
            b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        raw = await client.done
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body

    async def test_dot_segments_resolved_or_refused(self) -> None:
        """Dot segments, plain or percent-encoded, are resolved within the
        model's path; one that would leave it is refused with 400 JSON; the
        upstream never sees one."""
        resolved = [
            (b"/upstream/m/v1/./models", b"/v1/models"),
            (b"/upstream/m/v1/x/../models", b"/v1/models"),
            (b"/upstream/m/v1/%2e/models", b"/v1/models"),
            (b"/upstream/m/v1/x/%2E%2e/models?q=1", b"/v1/models?q=1"),
            (b"/upstream/m/v1/models/%2e%2e", b"/v1/"),
        ]
        for target, seen in resolved:
            with self.subTest(target=target):
                status, _ = await self.raw(target)
                self.assertEqual(status, 200)
                self.assertEqual(self.recorder.uris[-1], seen)
        refused = [
            (b"/upstream/m/../x", "invalid path: '..' climbs above /upstream/m/"),
            (b"/upstream/m/v1/%2e%2e/%2E%2E/x", "invalid path: '..' climbs above /upstream/m/"),
            (
                b"/upstream/m/..%2F..%2Fetc/passwd",
                "invalid path: a segment hides '..' or '.' behind an encoded slash",
            ),
            (b"/upstream/../m/x", "invalid path: a dot segment in the model name"),
            (b"/upstream/%2e/m/x", "invalid path: a dot segment in the model name"),
        ]
        for target, message in refused:
            with self.subTest(target=target):
                status, body = await self.raw(target)
                self.assertEqual(status, 400)
                self.assertEqual(json.loads(body)["error"]["message"], message)
        self.assertEqual(len(self.recorder.uris), len(resolved))
        for uri in self.recorder.uris:
            path = uri.partition(b"?")[0]
            self.assertFalse(any(is_dot_segment(s) for s in path.split(b"/")), uri)

    async def test_comfyui_paths(self) -> None:
        """``/comfyui/...`` resolves dot segments the same way, within ``/comfyui/``."""
        status, _ = await self.raw(b"/comfyui/")
        self.assertEqual(status, 200)
        status, _ = await self.raw(b"/comfyui/a/%2e%2e/prompt")
        self.assertEqual(status, 200)
        self.assertEqual(self.recorder.uris, [b"/", b"/prompt"])
        status, body = await self.raw(b"/comfyui/../api/models/unload")
        self.assertEqual(status, 400)
        self.assertEqual(
            json.loads(body)["error"]["message"], "invalid path: '..' climbs above /comfyui/"
        )
        self.assertEqual(len(self.recorder.uris), 2)

    async def test_unknown_model_in_path(self) -> None:
        """An ``/upstream`` path naming no model says which path and where
        the models are listed."""
        status, body = await self.raw(b"/upstream/nope/v1/models")
        self.assertEqual(status, 404)
        self.assertEqual(
            json.loads(body)["error"]["message"],
            'model not found: no model name starts the path "/upstream/nope/v1/models"; '
            "GET /v1/models lists the available models",
        )


class BodyErrorTests(ServiceTestCase):
    """Inference requests whose body names no servable model."""

    async def setUp(self) -> None:
        await self.start({"a": responder_model(free_port())})

    async def post(self, content_type: bytes, body: bytes, accept: bytes = b"") -> tuple[int, Any]:
        headers = {b"content-type": [content_type]} if content_type else {}
        if accept:
            headers[b"accept"] = [accept]
        response = await treq.post(
            self.url + "/v1/audio/transcriptions", data=body, headers=headers, pool=self.pool
        )
        text = await response.text()
        if response.headers.getRawHeaders(b"content-type") == [b"application/json"]:
            return response.code, json.loads(text)
        return response.code, text

    async def test_malformed_multipart_is_400_json(self) -> None:
        """A multipart body that does not parse: 400 with the JSON envelope,
        never an empty body, and the model is not started."""
        code, payload = await self.post(
            MULTIPART, b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\na'
        )
        self.assertEqual(code, 400)
        self.assertEqual(payload["src"], "llama-swap")
        self.assertEqual(payload["error"]["type"], "invalid_request_error")
        self.assertEqual(
            payload["error"]["message"],
            "the request body could not be read as multipart/form-data "
            "(Content-Type: multipart/form-data; boundary=XyZ): "
            "the body ends before the closing boundary",
        )
        self.assertEqual(self.state("a").value, "stopped")

    async def test_malformed_form_is_400_json(self) -> None:
        code, payload = await self.post(FORM, b"model=a&x=%G1")
        self.assertEqual(code, 400)
        self.assertEqual(
            payload["error"]["message"],
            "the request body could not be read as a form "
            '(Content-Type: application/x-www-form-urlencoded): invalid percent-escape "%G1" '
            "at byte 10",
        )

    async def test_unlabelled_body_is_404_with_reason(self) -> None:
        """No usable Content-Type: llama-swap's 404, with a message that says
        the body could not be read and what it was labelled."""
        code, text = await self.post(b"text/plain", b'{"model":"a"}', accept=b"text/plain")
        self.assertEqual(code, 404)
        self.assertEqual(
            text,
            "llama-swap: the request body could not be read as JSON or a form "
            '(Content-Type: text/plain); send a JSON body with a "model" member '
            "and Content-Type: application/json",
        )

    async def test_unknown_model_named(self) -> None:
        """An unknown model: 404 naming the model and ``GET /v1/models``."""
        code, payload = await self.post(JSON, b'{"model":"lama-3"}')
        self.assertEqual(code, 404)
        self.assertEqual(
            payload["error"]["message"],
            'no local server found for requested model "lama-3"; '
            "GET /v1/models lists the available models",
        )


class DisabledPinTests(ServiceTestCase):
    async def test_disabled_pin_named(self) -> None:
        """A model disabled by the active profile's pin says so, by name."""
        await self.start(
            {"a": responder_model(free_port())}, profiles={"quiet": {"pins": {"a": ""}}}
        )
        response = await treq.put(
            self.url + "/api/profiles/active", data=b'{"name":"quiet"}', pool=self.pool
        )
        self.assertEqual(response.code, 200)
        await response.content()
        response = await treq.post(
            self.url + "/v1/chat/completions",
            data=b'{"model":"a"}',
            headers={b"content-type": [b"application/json"]},
            pool=self.pool,
        )
        self.assertEqual(response.code, 404)
        payload = await response.json()
        self.assertEqual(payload["error"]["message"], 'model "a" is disabled by the active profile')
