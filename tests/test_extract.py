"""Model extraction and byte-exact model rewrites."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.upstream.extract import (
    extract_model,
    json_top_level,
    multipart_fields,
    replace_form_model,
    replace_json_model,
    replace_multipart_model,
)
from llamaswap.web.errors import json_envelope, render_error

JSON = b"application/json; charset=utf-8"
BOUNDARY = b"XyZ"
MULTIPART = b"multipart/form-data; boundary=" + BOUNDARY


def multipart(*fields: tuple[bytes, bytes], filename: bytes | None = None) -> bytes:
    parts = []
    for name, value in fields:
        disposition = b'form-data; name="' + name + b'"'
        if filename and name == b"file":
            disposition += b'; filename="' + filename + b'"'
        parts.append(
            b"--"
            + BOUNDARY
            + b"\r\nContent-Disposition: "
            + disposition
            + b"\r\n\r\n"
            + value
            + b"\r\n"
        )
    return b"".join(parts) + b"--" + BOUNDARY + b"--\r\n"


class ExtractTests(SynchronousTestCase):
    def test_get_uses_query(self) -> None:
        """GET requests name the model and stream flag in the query."""
        found = extract_model(b"GET", b"", b"", {b"model": [b"m1"], b"stream": [b"true"]})
        self.assertEqual((found.model, found.streaming), ("m1", True))

    def test_json_body(self) -> None:
        """JSON bodies: top-level model (scalars stringified) and stream truthiness."""
        found = extract_model(b"POST", JSON, b'{"stream": 1, "model": "a/b:q4"}', {})
        self.assertEqual((found.model, found.streaming), ("a/b:q4", True))
        self.assertEqual(extract_model(b"POST", JSON, b'{"model": 7}', {}).model, "7")
        self.assertEqual(extract_model(b"POST", JSON, b'{"stream": "true"}', {}).streaming, True)
        self.assertEqual(extract_model(b"POST", JSON, b'{"stream": false}', {}).streaming, False)

    def test_non_ascii_bodies(self) -> None:
        """Raw non-ASCII bytes in an unlabelled or urlencoded body are read,
        not an exception (found by the edge fuzz suite: a 500)."""
        form = b"application/x-www-form-urlencoded"
        self.assertEqual(extract_model(b"POST", form, "model=ü&x=1".encode(), {}).model, "ü")
        self.assertEqual(extract_model(b"POST", form, b"model=%C3%BC", {}).model, "ü")
        found = extract_model(b"POST", b"", b"\x80", {})
        self.assertEqual(found.model, "")
        self.assertIn("could not be read as JSON or a form", found.missing)

    def test_nested_model_is_not_top_level(self) -> None:
        """A ``model`` key inside a nested object is not the requested model."""
        body = b'{"messages": [{"model": "inner"}], "x": {"model": "deep"}}'
        self.assertEqual(extract_model(b"POST", JSON, body, {}).model, "")

    def test_json_ignores_query(self) -> None:
        """A JSON body never falls back to the query."""
        found = extract_model(b"POST", JSON, b"{}", {b"model": [b"q"]})
        self.assertEqual(found.model, "")

    def test_invalid_json_yields_no_model(self) -> None:
        """Invalid JSON simply yields no model."""
        self.assertEqual(extract_model(b"POST", JSON, b'{"model": "a",', {}).model, "")
        self.assertEqual(extract_model(b"POST", JSON, b"[1]", {}).model, "")
        self.assertIsNone(json_top_level(b'{"a":1} trailing'))

    def test_json_reads_as_the_offset_scanner_does(self) -> None:
        """The model and stream flag come out as the byte-exact scanner used
        for rewrites reads them (the C parser is used for speed)."""
        bodies = [
            b'{"model":"a","stream":true}',
            b' \r\n{ "model" : "a" , "stream" : "True" } \n',
            b'{"model":"a","model":"b","stream":1,"stream":0}',
            b'{"model":null}',
            b'{"model":7,"stream":"1"}',
            b'{"model":2.5,"stream":"t"}',
            b'{"model":true}',
            b'{"model":{"x":"y"},"stream":[1]}',
            b'{"stream":true}',
            '{"model":"caf\u00e9","stream":" TRUE "}'.encode(),
            b'{"model":"a"} x',
            b'["model"]',
            b"\xef\xbb\xbf{}",
            b'{"model":"\xff"}',
            b"",
        ]
        for body in bodies:
            top = json_top_level(body)
            got = extract_model(b"POST", JSON, body, {})
            if top is None:
                self.assertEqual((got.model, got.streaming), ("", False), body)
                self.assertIn("JSON", got.missing, body)
                continue
            model = top["model"][0] if "model" in top else None
            stream = top["stream"][0] if "stream" in top else None
            if isinstance(model, bool):
                expected_model = "true" if model else "false"
            elif isinstance(model, (int, float)):
                expected_model = json.dumps(model)
            else:
                expected_model = model if isinstance(model, str) else ""
            if isinstance(stream, bool):
                expected_stream = stream
            elif isinstance(stream, (int, float)):
                expected_stream = stream != 0
            else:
                expected_stream = isinstance(stream, str) and stream.strip().lower() in (
                    "1",
                    "t",
                    "true",
                )
            self.assertEqual((got.model, got.streaming), (expected_model, expected_stream), body)

    def test_multipart_field_then_query(self) -> None:
        """multipart bodies: the model field, else the query."""
        body = multipart((b"file", b"\x00binary\r\n--not-boundary"), (b"model", b"whisper"))
        found = extract_model(b"POST", MULTIPART, body, {})
        self.assertEqual(found.model, "whisper")
        found = extract_model(b"POST", MULTIPART, multipart((b"file", b"x")), {b"model": [b"q"]})
        self.assertEqual(found.model, "q")

    def test_urlencoded_and_other(self) -> None:
        """Other bodies: urlencoded field, else query."""
        found = extract_model(
            b"POST", b"application/x-www-form-urlencoded", b"model=sd%2Fxl&stream=true", {}
        )
        self.assertEqual((found.model, found.streaming), ("sd/xl", True))
        found = extract_model(b"POST", b"text/plain", b"hello", {b"model": [b"q"]})
        self.assertEqual(found.model, "q")


class RewriteTests(SynchronousTestCase):
    def test_json_rewrite_keeps_every_other_byte(self) -> None:
        """Only the model value changes: numbers, order, escapes and
        whitespace stay exactly as sent."""
        body = b'{ "z": 1.50, "model" :  "old", "s": "\\u00e9\\n", "e": 1e3 ,"n":[ 1 ] }'
        out = replace_json_model(body, "new/model")
        self.assertEqual(
            out, b'{ "z": 1.50, "model" :  "new/model", "s": "\\u00e9\\n", "e": 1e3 ,"n":[ 1 ] }'
        )

    def test_json_rewrite_inserts_missing_model(self) -> None:
        """A body without model gets one; an empty object too."""
        self.assertEqual(replace_json_model(b'{"a": 1}', "m"), b'{"model":"m","a": 1}')
        self.assertEqual(replace_json_model(b"{}", "m"), b'{"model":"m"}')
        self.assertEqual(json.loads(replace_json_model('{"ü": "é"}'.encode(), "ö"))["model"], "ö")

    def test_json_rewrite_leaves_non_objects(self) -> None:
        """Bodies that are not JSON objects are returned unchanged."""
        self.assertEqual(replace_json_model(b"[1,2]", "m"), b"[1,2]")
        self.assertEqual(replace_json_model(b"{broken", "m"), b"{broken")

    def test_multipart_rewrite_in_place(self) -> None:
        """Only the model part's content changes in a multipart body."""
        body = multipart((b"file", b"RIFF\x00\x01"), (b"model", b"alias"), (b"language", b"en"))
        out = replace_multipart_model(MULTIPART, body, "real-name")
        self.assertEqual(out, body.replace(b"\r\n\r\nalias\r\n", b"\r\n\r\nreal-name\r\n"))
        self.assertEqual(multipart_fields(MULTIPART, out, (b"model",)), {b"model": b"real-name"})

    def test_form_rewrite(self) -> None:
        """urlencoded: the model pair is replaced, others kept verbatim."""
        self.assertEqual(replace_form_model(b"a=1&model=x&b=%20", "y z"), b"a=1&model=y+z&b=%20")
        self.assertEqual(replace_form_model(b"a=1", "m"), b"a=1&model=m")


class _Request:
    def __init__(self, accept: bytes) -> None:
        self.accept = accept
        self.code = 200
        self.headers: dict[bytes, bytes] = {}

    def getHeader(self, name: bytes) -> bytes | None:
        return self.accept if name == b"accept" else None

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value


class ErrorFormatTests(SynchronousTestCase):
    def test_json_by_default(self) -> None:
        """Without a text Accept, errors are the OpenAI-style envelope."""
        request = _Request(b"application/json")
        body = render_error(request, 404, "no model id could be identified")
        self.assertEqual(request.code, 404)
        self.assertEqual(
            json.loads(body),
            {
                "src": "llama-swap",
                "error": {
                    "message": "no model id could be identified",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "not_found",
                },
            },
        )

    def test_plain_and_html(self) -> None:
        """text/plain and text/html clients get those formats."""
        request = _Request(b"text/plain, */*")
        self.assertEqual(render_error(request, 500, "boom"), b"llama-swap: boom")
        request = _Request(b"text/html")
        self.assertEqual(
            render_error(request, 502, "<x>"),
            b"<html><body><h1>llama-swap</h1><p>&lt;x&gt;</p></body></html>",
        )

    def test_types_by_status(self) -> None:
        """type/code follow the status table."""
        cases = {
            400: ("invalid_request_error", "bad_request"),
            401: ("authentication_error", "unauthorized"),
            409: ("invalid_request_error", "conflict"),
            418: ("invalid_request_error", "invalid_request"),
            429: ("rate_limit_error", "rate_limit_exceeded"),
            502: ("server_error", "bad_gateway"),
            503: ("server_error", "service_unavailable"),
            500: ("server_error", "internal_error"),
        }
        for status, (kind, code) in cases.items():
            error = json.loads(json_envelope(status, "m"))["error"]
            self.assertEqual((error["type"], error["code"]), (kind, code))
