"""API-key authentication (llama-swap §3.1 in docs/design.md, docs/design.md, difference 5).

The key is read from ``Authorization: Basic`` (the password; the username is
ignored), else ``Authorization: Bearer``, else ``x-api-key``.  Unlike
llama-swap, keys are compared in constant time, and the header that carried a
llamaswap key is not forwarded to local upstreams (:func:`strip_credentials`).
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import hmac
from base64 import b64decode
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.web.http_headers import Headers

from llamaswap.web.errors import render_error

__all__ = [
    "UNAUTHORIZED_MESSAGE",
    "ApiKeys",
    "Credential",
    "CredentialSource",
    "api_key_from_headers",
    "carried_headers",
    "find_credential",
    "strip_credentials",
    "unauthorized",
]

UNAUTHORIZED_MESSAGE = "unauthorized: invalid or missing API key"
WWW_AUTHENTICATE = b'Basic realm="llama-swap"'


class CredentialSource(enum.Enum):
    """Where a client's API key came from."""

    BASIC = "basic"
    BEARER = "bearer"
    X_API_KEY = "x-api-key"

    @property
    def header(self) -> bytes:
        """The request header that carries a key from this source."""
        return b"x-api-key" if self is CredentialSource.X_API_KEY else b"authorization"


@dataclass(frozen=True)
class Credential:
    """A candidate API key and the header it came in (the key is never repr'd)."""

    key: str = field(repr=False)
    source: CredentialSource


def _first(headers: Headers, name: bytes) -> bytes | None:
    values = headers.getRawHeaders(name)
    return values[0] if values else None


def _text(raw: bytes) -> str:
    # surrogateescape keeps arbitrary header bytes comparable byte-for-byte.
    return raw.decode("utf-8", "surrogateescape").strip()


def _basic_password(encoded: bytes) -> str:
    try:
        decoded = b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return ""
    _, colon, password = decoded.partition(b":")
    return _text(password) if colon else ""


def find_credential(headers: Headers) -> Credential | None:
    """The API key a request presents, by llama-swap's precedence.

    Basic password > Bearer token > ``x-api-key``; an undecodable or empty
    Basic password falls through to ``x-api-key``, as in llama-swap.  The
    auth scheme is matched case-insensitively (RFC 9110 §11.1).
    """
    authorization = _first(headers, b"authorization")
    if authorization is not None:
        scheme, _, rest = authorization.strip().partition(b" ")
        scheme = scheme.lower()
        if scheme == b"basic":
            password = _basic_password(rest)
            if password:
                return Credential(password, CredentialSource.BASIC)
        elif scheme == b"bearer":
            token = _text(rest)
            if token:
                return Credential(token, CredentialSource.BEARER)
    api_key = _first(headers, b"x-api-key")
    if api_key is not None and _text(api_key):
        return Credential(_text(api_key), CredentialSource.X_API_KEY)
    return None


def api_key_from_headers(headers: Headers) -> str | None:
    """The candidate API key of a request, or ``None`` when it presents none."""
    credential = find_credential(headers)
    return credential.key if credential else None


def strip_credentials(headers: Headers, source: CredentialSource) -> Headers:
    """A copy of ``headers`` without the header that carried the llamaswap key.

    Other credentials (e.g. an ``x-api-key`` meant for the upstream while the
    llamaswap key came as a Bearer token) are kept.
    """
    stripped = headers.copy()
    stripped.removeHeader(source.header)
    return stripped


def carried_headers(request: Any) -> tuple[bytes, ...]:
    """The request headers that carried a llamaswap key (set by
    :meth:`ApiKeys.authorize`): never forwarded, to local upstreams or peers."""
    carried: tuple[bytes, ...] = getattr(request, "llamaswap_credential_headers", ())
    first = getattr(request, "llamaswap_credential_header", None)
    return carried if first is None or first in carried else (first, *carried)


def _only(headers: Headers, name: bytes) -> Headers:
    values = headers.getRawHeaders(name)
    return Headers({name: values} if values else {})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


#: Paths answered without an API key (GET/HEAD only), as in llama-swap.
OPEN_PATHS = frozenset({b"/health", b"/wol-health", b"/", b"/upstream", b"/favicon.ico"})
_OPEN_METHODS = frozenset({b"GET", b"HEAD"})


class ApiKeys:
    """The configured ``apiKeys``; an empty set means no authentication.

    Candidates are compared as SHA-256 digests with :func:`hmac.compare_digest`
    against every key, without stopping at a match, so the time taken reveals
    neither which key matched nor any key's length.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(key) for key in keys)

    def __repr__(self) -> str:
        return f"<ApiKeys: {len(self._digests)} key(s)>"

    @property
    def enabled(self) -> bool:
        """Whether requests must present a key."""
        return bool(self._digests)

    def match(self, candidate: str | None) -> int | None:
        """The index of the configured key equal to ``candidate``, or ``None``."""
        if candidate is None:
            return None
        digest = _digest(candidate)
        found = -1
        for index, key_digest in enumerate(self._digests):
            equal = hmac.compare_digest(digest, key_digest)
            # Branch-free selection: every key is compared, whatever matched.
            found = (index * equal) + (found * (not equal))
        return None if found < 0 else found

    def check(self, candidate: str | None) -> bool:
        """True when ``candidate`` is one of the configured keys."""
        return self.match(candidate) is not None

    def authorize(self, request: Any) -> bool:
        """Whether ``request`` may proceed: no keys are configured, it is a
        GET/HEAD of an open path, or it presents a configured key.

        Remembers on ``request`` which header carried the key (it is ours, so
        it is not forwarded to local upstreams) and the key's index (for the
        activity log)."""
        if not self._digests:
            return True
        if request.method in _OPEN_METHODS and request.path in OPEN_PATHS:
            return True
        credential = find_credential(request.requestHeaders)
        if credential is None:
            return False
        index = self.match(credential.key)
        if index is None:
            return False
        request.llamaswap_credential_header = credential.source.header
        # web/guard.py: a key the browser adds by itself (Basic) is no
        # proof that the page making the request was given it.
        request.llamaswap_credential_source = credential.source
        request.llamaswap_api_key_index = index
        # A client may send its key in both headers (some SDKs do): every
        # header holding a configured key is ours.
        carried = [credential.source.header]
        for other in (b"authorization", b"x-api-key"):
            if other not in carried:
                found = find_credential(_only(request.requestHeaders, other))
                if found is not None and self.match(found.key) is not None:
                    carried.append(other)
        request.llamaswap_credential_headers = tuple(carried)
        return True


def unauthorized(request: Any) -> bytes:
    """Set the 401 status and headers on ``request``; return the body.

    The message is rendered in the format the client's ``Accept`` asks for.
    """
    request.setHeader(b"www-authenticate", WWW_AUTHENTICATE)
    return render_error(request, 401, UNAUTHORIZED_MESSAGE)
