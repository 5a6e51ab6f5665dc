"""Tests for API-key auth and CORS preflight (reference §3.1, SPEC decision 5)."""

from __future__ import annotations

import hmac
import json
from base64 import b64encode

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from llamaswap.config.keys import api_key_strings, validate_api_keys
from llamaswap.web import auth
from llamaswap.web.auth import (
    ApiKeys,
    Credential,
    CredentialSource,
    api_key_from_headers,
    find_credential,
    strip_credentials,
    unauthorized,
)
from llamaswap.web.cors import DEFAULT_ALLOW_HEADERS, allow_headers, preflight


def basic(user: str, password: str) -> bytes:
    return b"Basic " + b64encode(f"{user}:{password}".encode())


def headers(**values: bytes) -> Headers:
    return Headers({name.replace("_", "-").encode(): [value] for name, value in values.items()})


def request(**values: bytes) -> DummyRequest:
    req = DummyRequest([b""])
    for name, value in values.items():
        req.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value])
    return req


class ExtractionTests(SynchronousTestCase):
    def test_basic_password(self) -> None:
        """Basic auth yields the password; the username is ignored."""
        found = find_credential(headers(authorization=basic("anyone", "k1")))
        self.assertEqual(found, Credential("k1", CredentialSource.BASIC))
        self.assertEqual(api_key_from_headers(headers(authorization=basic("", "a:b"))), "a:b")

    def test_bearer(self) -> None:
        """A Bearer token is the key."""
        found = find_credential(headers(authorization=b"Bearer k2"))
        self.assertEqual(found, Credential("k2", CredentialSource.BEARER))

    def test_x_api_key(self) -> None:
        """x-api-key is used when Authorization carries no key."""
        found = find_credential(headers(x_api_key=b"k3"))
        self.assertEqual(found, Credential("k3", CredentialSource.X_API_KEY))

    def test_precedence(self) -> None:
        """Basic beats x-api-key, Bearer beats x-api-key."""
        both = headers(authorization=basic("u", "basic-key"), x_api_key=b"header-key")
        self.assertEqual(api_key_from_headers(both), "basic-key")
        both = headers(authorization=b"Bearer bearer-key", x_api_key=b"header-key")
        self.assertEqual(api_key_from_headers(both), "bearer-key")

    def test_bad_basic_falls_through(self) -> None:
        """Undecodable, colon-less or password-less Basic falls through to x-api-key."""
        for value in (b"Basic !!!", b"Basic " + b64encode(b"nocolon"), basic("u", "")):
            with self.subTest(value=value):
                found = find_credential(headers(authorization=value, x_api_key=b"k"))
                self.assertEqual(found, Credential("k", CredentialSource.X_API_KEY))

    def test_scheme_case_insensitive(self) -> None:
        """Auth schemes match in any case."""
        self.assertEqual(api_key_from_headers(headers(authorization=b"bearer k")), "k")
        self.assertEqual(api_key_from_headers(headers(authorization=b"BASIC dTpw")), "p")

    def test_none(self) -> None:
        """No credential, an unknown scheme or empty values give None."""
        self.assertIsNone(api_key_from_headers(Headers()))
        self.assertIsNone(api_key_from_headers(headers(authorization=b"Digest x")))
        self.assertIsNone(api_key_from_headers(headers(authorization=b"Bearer ", x_api_key=b"")))

    def test_repr_hides_key(self) -> None:
        """A credential's repr does not show the key."""
        self.assertNotIn("secret", repr(Credential("secret", CredentialSource.BEARER)))


class ApiKeysTests(SynchronousTestCase):
    def test_check(self) -> None:
        """Configured keys pass; anything else, including None, fails."""
        keys = ApiKeys(["alpha", "beta"])
        self.assertTrue(keys.enabled)
        self.assertTrue(keys.check("alpha"))
        self.assertTrue(keys.check("beta"))
        for candidate in ("gamma", "alph", "alphaa", "", None, "\u00e9"):
            with self.subTest(candidate=candidate):
                self.assertFalse(keys.check(candidate))

    def test_match_index(self) -> None:
        """match() tells which key matched (for per-key metrics)."""
        keys = ApiKeys(["alpha", "beta"])
        self.assertEqual(keys.match("beta"), 1)
        self.assertEqual(keys.match("alpha"), 0)
        self.assertIsNone(keys.match("x"))

    def test_disabled(self) -> None:
        """No keys means auth is off; repr shows no secrets."""
        self.assertFalse(ApiKeys([]).enabled)
        self.assertNotIn("alpha", repr(ApiKeys(["alpha"])))

    def test_compares_every_key_in_constant_time(self) -> None:
        """Every key is compared with hmac.compare_digest, even after a match."""
        calls: list[tuple[bytes, bytes]] = []
        compare_digest = hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return compare_digest(a, b)

        self.patch(auth.hmac, "compare_digest", spy)
        keys = ApiKeys(["one", "two", "three"])
        self.assertTrue(keys.check("one"))
        self.assertEqual(len(calls), 3)
        self.assertEqual({len(a) for a, _ in calls} | {len(b) for _, b in calls}, {32})


class StripTests(SynchronousTestCase):
    def test_strip_authorization(self) -> None:
        """A key from Authorization removes Authorization only, in a copy."""
        original = headers(authorization=b"Bearer k", x_api_key=b"upstream", accept=b"*/*")
        stripped = strip_credentials(original, CredentialSource.BEARER)
        self.assertFalse(stripped.hasHeader(b"authorization"))
        self.assertEqual(stripped.getRawHeaders(b"x-api-key"), [b"upstream"])
        self.assertEqual(stripped.getRawHeaders(b"accept"), [b"*/*"])
        self.assertTrue(original.hasHeader(b"authorization"))
        basic_stripped = strip_credentials(original, CredentialSource.BASIC)
        self.assertFalse(basic_stripped.hasHeader(b"authorization"))

    def test_strip_x_api_key(self) -> None:
        """A key from x-api-key removes x-api-key only."""
        original = headers(authorization=b"Token other", x_api_key=b"k")
        stripped = strip_credentials(original, CredentialSource.X_API_KEY)
        self.assertFalse(stripped.hasHeader(b"x-api-key"))
        self.assertEqual(stripped.getRawHeaders(b"authorization"), [b"Token other"])


class UnauthorizedTests(SynchronousTestCase):
    def test_json(self) -> None:
        """401, WWW-Authenticate and the JSON envelope by default."""
        req = request()
        body = unauthorized(req)
        self.assertEqual(req.responseCode, 401)
        self.assertEqual(
            req.responseHeaders.getRawHeaders(b"www-authenticate"), [b'Basic realm="llama-swap"']
        )
        error = json.loads(body)["error"]
        self.assertEqual(error["message"], "unauthorized: invalid or missing API key")
        self.assertEqual(error["type"], "authentication_error")

    def test_plain_text(self) -> None:
        """Accept: text/plain gets the plain-text message."""
        req = request(accept=b"text/plain")
        self.assertEqual(unauthorized(req), b"llama-swap: unauthorized: invalid or missing API key")
        self.assertEqual(req.responseCode, 401)


class ValidateApiKeysTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """Non-empty keys without spaces are valid; None means no keys."""
        self.assertEqual(validate_api_keys(["a", "b-c_d"]), [])
        self.assertEqual(validate_api_keys(None), [])
        self.assertEqual(validate_api_keys([]), [])

    def test_problems(self) -> None:
        """Empty keys and keys with whitespace are reported by index."""
        self.assertEqual(
            validate_api_keys(["ok", "", "has space", None, "tab\there", {"a": 1}]),
            [
                "apiKeys[1]: empty api key",
                "apiKeys[2]: api key cannot contain spaces",
                "apiKeys[3]: empty api key",
                "apiKeys[4]: api key cannot contain spaces",
                "apiKeys[5]: must be a string",
            ],
        )
        self.assertEqual(validate_api_keys("abc"), ["apiKeys: must be a list of strings"])

    def test_numeric_keys(self) -> None:
        """A key YAML typed as a number is valid and used as its text."""
        self.assertEqual(validate_api_keys([12345]), [])
        self.assertEqual(api_key_strings([12345, "k"]), ("12345", "k"))
        self.assertEqual(api_key_strings(None), ())


class PreflightTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Any OPTIONS gets 204 with the permissive CORS headers and no body."""
        req = request()
        self.assertEqual(preflight(req), b"")
        self.assertEqual(req.responseCode, 204)
        get = req.responseHeaders.getRawHeaders
        self.assertEqual(get(b"access-control-allow-origin"), [b"*"])
        self.assertEqual(
            get(b"access-control-allow-methods"), [b"GET, POST, PUT, PATCH, DELETE, OPTIONS"]
        )
        self.assertEqual(
            get(b"access-control-allow-headers"),
            [b"Content-Type, Authorization, Accept, X-Requested-With"],
        )
        self.assertEqual(get(b"access-control-max-age"), [b"86400"])
        self.assertIsNone(get(b"vary"))

    def test_echo_sanitised(self) -> None:
        """Requested headers are echoed trimmed, joined by ', ', invalid names dropped."""
        req = request(
            access_control_request_headers=b'x-custom,  Content-Type ,bad header,a"b,,x_y'
        )
        preflight(req)
        self.assertEqual(
            req.responseHeaders.getRawHeaders(b"access-control-allow-headers"),
            [b"x-custom, Content-Type, x_y"],
        )
        self.assertEqual(
            req.responseHeaders.getRawHeaders(b"vary"), [b"Access-Control-Request-Headers"]
        )

    def test_token_characters(self) -> None:
        """Every RFC 7230 tchar is kept; separators and non-ASCII are not."""
        self.assertEqual(allow_headers(b"!#$%&'*+-.^_`|~09azAZ"), b"!#$%&'*+-.^_`|~09azAZ")
        for bad in (b"a(b", b"a:b", b"a/b", b"a;b", b"caf\xc3\xa9", b"a\tb"):
            with self.subTest(bad=bad):
                self.assertEqual(allow_headers(bad), DEFAULT_ALLOW_HEADERS)

    def test_nothing_valid_gives_default(self) -> None:
        """When no requested name survives, the default list is sent."""
        self.assertEqual(allow_headers(b" , ,"), DEFAULT_ALLOW_HEADERS)
        self.assertEqual(allow_headers(None), DEFAULT_ALLOW_HEADERS)
