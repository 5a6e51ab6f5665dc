"""Guards against web pages that drive llamaswap through the user's browser
(docs/security.md).

**DNS rebinding.**  A page on ``evil.example`` whose name is re-pointed at
127.0.0.1 becomes same-origin with llamaswap in the browser's eyes, but its
requests still say ``Host: evil.example``.  So every request's ``Host`` must
be a loopback name or address (``localhost``, ``*.localhost``, 127.x.x.x,
``[::1]``, any port) or be listed in ``allowedHosts``.  This holds when
llamaswap listens on loopback only; when it listens on other addresses,
``allowedHosts`` applies if it is set and any ``Host`` is accepted if it is
not.  A request without ``Host`` (HTTP/1.0 scripts) is no browser's and
passes.

**Cross-site management calls.**  Calls that change state (see
:func:`changes_state`) are refused when a browser says they come from
another site: an ``Origin`` that is neither the request's own host nor in
``allowedOrigins``, or, without ``Origin``, ``Sec-Fetch-Site: cross-site``
or ``same-site`` (another port of ``localhost`` is another application).
A key sent as ``Authorization: Bearer`` or ``x-api-key`` lifts the guard:
a page can only send those if it was given the key.  A Basic-auth key does
not, because browsers attach remembered Basic credentials by themselves.
Requests without these headers (curl, SDKs, scripts) are not affected, and
neither are the inference endpoints, which keep llama-swap's CORS answers.
"""

from __future__ import annotations

from typing import Any

from llamaswap.config import Config
from llamaswap.config.browser import (
    DEFAULT_PORTS,
    is_loopback_host,
    origin_key,
    split_authority,
)
from llamaswap.web.auth import CredentialSource
from llamaswap.web.errors import render_error

__all__ = ["BrowserGuard", "changes_state"]

_SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
_KEY_HEADERS = frozenset({CredentialSource.BEARER, CredentialSource.X_API_KEY})
_OTHER_SITE = frozenset({b"cross-site", b"same-site"})
#: distinct ``Host`` values whose verdict is remembered (per configuration)
_VERDICTS_KEPT = 64
_SHOWN_LENGTH = 100


def changes_state(method: bytes, path: bytes) -> bool:
    """Whether a management request changes llamaswap's state.

    ``/unload`` (a GET, as in llama-swap), every method but GET/HEAD/OPTIONS
    under ``/api/`` (unloading, profile switches, in-flight cancel), and any
    request through ``/upstream/`` or ``/comfyui`` (it starts the model: the
    UI's "load" button uses ``/upstream/<model>/health``)."""
    if path == b"/unload" or path.startswith(b"/upstream/"):
        return True
    if path == b"/comfyui" or path.startswith(b"/comfyui/"):
        return True
    return path.startswith(b"/api/") and method not in _SAFE_METHODS


def _shown(raw: bytes) -> str:
    """A header value fit for an error message: bounded, printable."""
    text = raw[:_SHOWN_LENGTH].decode("latin-1")
    text = "".join(c if c.isprintable() and c.isascii() else f"\\x{ord(c):02x}" for c in text)
    return text + ("…" if len(raw) > _SHOWN_LENGTH else "")


class BrowserGuard:
    """Both guards, for a listener that is (or is not) on loopback only.

    The configuration is passed per request, so a reload applies to the next
    request; the verdict for a ``Host`` value is remembered per configuration
    (a few dozen values at most) to keep the hot path at a dict lookup."""

    def __init__(self, *, loopback_only: bool) -> None:
        self.loopback_only = loopback_only
        self._verdicts: dict[bytes, bool] = {}
        self._verdicts_for: Config | None = None

    # -- Host ----------------------------------------------------------------

    def _host_allowed(self, config: Config, raw: bytes) -> bool:
        if config is not self._verdicts_for or len(self._verdicts) >= _VERDICTS_KEPT:
            self._verdicts = {}
            self._verdicts_for = config
        verdict = self._verdicts.get(raw)
        if verdict is None:
            verdict = self._verdicts[raw] = self._judge_host(config, raw)
        return verdict

    def _judge_host(self, config: Config, raw: bytes) -> bool:
        if not raw.strip():
            return True  # no authority at all: not a browser
        try:
            parts = split_authority(raw.decode("ascii"))
        except UnicodeDecodeError:
            return False
        if parts is None:
            return False
        host, port = parts
        return is_loopback_host(host) or config.allowed_hosts.allows(host, port)

    def refused_host(self, headers: Any, config: Config) -> bytes | None:
        """The first ``Host`` value among request ``headers`` that is
        refused, or ``None`` when they are acceptable."""
        if not self.loopback_only and not config.allowed_hosts.entries:
            return None
        for raw in headers.getRawHeaders(b"host") or ():
            if not self._host_allowed(config, raw):
                return raw
        return None

    def refuse_host(self, request: Any, config: Config) -> bytes | None:
        """``None`` when ``request``'s ``Host`` is acceptable; else the body
        of the ``403`` set on ``request``."""
        raw = self.refused_host(request.requestHeaders, config)
        return None if raw is None else self._host_refused(request, raw)

    def _host_refused(self, request: Any, raw: bytes) -> bytes:
        shown = _shown(raw)
        if self.loopback_only:
            why = (
                "llamaswap listens on loopback only, where it accepts loopback names "
                "and the names in allowedHosts"
            )
        else:
            why = "it is not a loopback name and not in allowedHosts"
        message = (
            f'host "{shown}" is not allowed: {why}; to reach llamaswap by this name, '
            "add the name to allowedHosts in the config"
        )
        return render_error(request, 403, message, "host_not_allowed")

    # -- cross-site ----------------------------------------------------------

    def refuse_cross_site(self, request: Any, config: Config) -> bytes | None:
        """``None`` when ``request`` (a call that :func:`changes_state`) may
        proceed; else the body of the ``403`` set on ``request``."""
        if getattr(request, "llamaswap_credential_source", None) in _KEY_HEADERS:
            return None
        headers = request.requestHeaders
        origins = headers.getRawHeaders(b"origin")
        if origins:
            for raw in origins:
                if not self._origin_allowed(request, config, raw):
                    return self._cross_site_refused(request, f'origin "{_shown(raw)}"')
            return None
        fetch_site = headers.getRawHeaders(b"sec-fetch-site")
        if fetch_site and fetch_site[0].strip().lower() in _OTHER_SITE:
            site = _shown(fetch_site[0].strip().lower())
            return self._cross_site_refused(request, f"a page on another site ({site})")
        return None

    @staticmethod
    def _origin_allowed(request: Any, config: Config, raw: bytes) -> bool:
        try:
            origin = origin_key(raw.decode("ascii"))
        except UnicodeDecodeError:
            origin = None
        if config.allowed_origins.allows(origin):
            return True
        return origin is not None and _same_origin(origin, request.getHeader(b"host"))

    @staticmethod
    def _cross_site_refused(request: Any, who: str) -> bytes:
        message = (
            f"cross-site request refused: {who} may not change llamaswap's state; "
            "add the page's origin to allowedOrigins in the config, or send an API key "
            "(apiKeys) as Authorization: Bearer or x-api-key"
        )
        return render_error(request, 403, message, "cross_site_refused")


def _same_origin(origin: str, host: bytes | None) -> bool:
    """Whether the canonical ``origin`` names the request's own ``Host``
    (compared as host and port, the port defaulting by the origin's scheme:
    behind a TLS proxy the request itself arrives as plain HTTP)."""
    if not host:
        return False
    try:
        parts = split_authority(host.decode("ascii"))
    except UnicodeDecodeError:
        return False
    if parts is None:
        return False
    scheme, _, authority = origin.partition("://")
    origin_parts = split_authority(authority)
    if origin_parts is None:
        return False
    default = DEFAULT_PORTS.get(scheme)
    host_name, host_port = parts
    origin_name, origin_port = origin_parts
    return host_name == origin_name and (host_port or default) == (origin_port or default)
