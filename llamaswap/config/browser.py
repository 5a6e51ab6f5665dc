"""``allowedHosts`` and ``allowedOrigins``: the names a browser may reach
llamaswap by, and the other web sites that may manage it (docs/security.md).

Both are parsed once at load into frozen matchers; the web layer
(``web/guard.py``) asks them per request.  The parsing of ``host[:port]``
and of origins lives here too, so that a config entry and a request header
are read by the same rules: lower case, IPv6 without brackets, one trailing
dot dropped, the scheme's default port dropped from an origin.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamaswap.config.problems import describe

__all__ = [
    "AllowedHosts",
    "AllowedOrigins",
    "is_loopback_host",
    "origin_key",
    "read_allowed_hosts",
    "read_allowed_origins",
    "split_authority",
]

#: default ports dropped from origins, so ``https://x:443`` is ``https://x``
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

# A DNS name or IPv4 address as it appears in Host: letters, digits, "-",
# "_" (found in the wild) and dots; browsers send IDNs as punycode.
_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")


def _ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def split_authority(text: str) -> tuple[str, int | None] | None:
    """``host[:port]`` (``[v6][:port]``; a bare IPv6 address too) as
    ``(host, port)``: the host lower-cased, without brackets or a trailing
    dot; ``None`` when it is not a well-formed authority."""
    text = text.strip().lower()
    port_text: str | None = None
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1 :]
        if end < 0 or not _ipv6(host):
            return None
        if rest:
            if not rest.startswith(":"):
                return None
            port_text = rest[1:]
    elif text.count(":") > 1:
        return (text, None) if _ipv6(text) else None
    else:
        host, colon, rest = text.partition(":")
        port_text = rest if colon else None
        if host.endswith("."):
            host = host[:-1]
        if not _NAME.fullmatch(host):
            return None
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
        return None
    port = int(port_text)
    return (host, port) if 0 < port < 65536 else None


def is_loopback_host(host: str) -> bool:
    """``localhost``, ``*.localhost`` (RFC 6761: always loopback), any
    127.0.0.0/8 address, ``::1`` and IPv4-mapped loopback (``host`` as
    :func:`split_authority` returns it)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def origin_key(text: str) -> str | None:
    """An origin (``scheme://host[:port]``, a trailing ``/`` tolerated) in
    canonical form: lower case, IPv6 bracketed, the default port dropped;
    ``None`` for anything else (``null``, a path, a bad port)."""
    scheme, sep, authority = text.strip().lower().partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return None
    if authority.endswith("/"):
        authority = authority[:-1]
    if not authority or "/" in authority or "@" in authority:
        return None
    parts = split_authority(authority)
    if parts is None:
        return None
    host, port = parts
    shown = f"[{host}]" if ":" in host else host
    if port is None or port == DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{shown}"
    return f"{scheme}://{shown}:{port}"


@dataclass(frozen=True)
class AllowedHosts:
    """``allowedHosts``: ``Host`` values accepted besides the loopback names.

    An entry is an exact name or address (any port), ``name:port`` (that
    port only), ``*.suffix`` (every name ending in ``.suffix``) or ``*``
    (any host)."""

    #: the entries as written, lower-cased (for messages)
    entries: tuple[str, ...] = ()
    any_host: bool = False
    names: frozenset[str] = frozenset()
    addresses: frozenset[tuple[str, int]] = frozenset()
    #: ``".example.com"`` for ``*.example.com``
    suffixes: tuple[str, ...] = ()

    def allows(self, host: str, port: int | None) -> bool:
        """Whether ``host[:port]`` (as :func:`split_authority` returns it) is listed."""
        if self.any_host or host in self.names:
            return True
        if port is not None and (host, port) in self.addresses:
            return True
        return any(host.endswith(suffix) for suffix in self.suffixes)


@dataclass(frozen=True)
class AllowedOrigins:
    """``allowedOrigins``: web origins (``https://app.example.com``) whose
    pages may make state-changing management calls; ``*`` for any."""

    entries: tuple[str, ...] = ()
    any_origin: bool = False
    origins: frozenset[str] = frozenset()

    def allows(self, origin: str | None) -> bool:
        """Whether ``origin`` (canonical, see :func:`origin_key`) is listed."""
        return self.any_origin or (origin is not None and origin in self.origins)


Problems = list[tuple[int, str]]


def _entries(document: Mapping[str, Any], key: str) -> tuple[list[tuple[int, str]], Problems]:
    """``(index, text)`` of the string entries of the list ``document[key]``
    (lower case), and ``(index, line)`` for each problem found."""
    raw = document.get(key)
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], [(-1, f"{key}: must be a list of strings, got {describe(raw)}")]
    entries: list[tuple[int, str]] = []
    problems: Problems = []
    for index, value in enumerate(raw):
        if isinstance(value, str) and value.strip():
            entries.append((index, value.strip().lower()))
        else:
            problems.append(
                (index, f"{key}[{index}]: must be a non-empty string, got {describe(value)}")
            )
    return entries, problems


def _lines(problems: Problems) -> list[str]:
    """The problem lines in the order of the entries they name."""
    return [line for _, line in sorted(problems)]


def read_allowed_hosts(document: Mapping[str, Any]) -> tuple[AllowedHosts, list[str]]:
    """``allowedHosts`` and the problems found."""
    entries, problems = _entries(document, "allowedHosts")
    names: set[str] = set()
    addresses: set[tuple[str, int]] = set()
    suffixes: list[str] = []
    any_host = False
    for index, text in entries:
        if text == "*":
            any_host = True
            continue
        if text.startswith("*."):
            parts = split_authority(text[2:])
            if parts is not None and parts[1] is None and ":" not in parts[0]:
                suffixes.append("." + parts[0])
                continue
        else:
            parts = split_authority(text)
            if parts is not None:
                host, port = parts
                if port is None:
                    names.add(host)
                else:
                    addresses.add((host, port))
                continue
        problems.append(
            (
                index,
                f"allowedHosts[{index}]: must be a host name or address (optionally "
                f"with :port), *.domain or *, got {text!r}",
            )
        )
    hosts = AllowedHosts(
        tuple(text for _, text in entries),
        any_host,
        frozenset(names),
        frozenset(addresses),
        tuple(suffixes),
    )
    return hosts, _lines(problems)


def read_allowed_origins(document: Mapping[str, Any]) -> tuple[AllowedOrigins, list[str]]:
    """``allowedOrigins`` and the problems found."""
    entries, problems = _entries(document, "allowedOrigins")
    origins: set[str] = set()
    any_origin = False
    for index, text in entries:
        if text == "*":
            any_origin = True
            continue
        key = origin_key(text)
        if key is None:
            problems.append(
                (
                    index,
                    f"allowedOrigins[{index}]: must be an origin like https://app.example.com "
                    f"(scheme://host[:port], no path) or *, got {text!r}",
                )
            )
        else:
            origins.add(key)
    allowed = AllowedOrigins(tuple(text for _, text in entries), any_origin, frozenset(origins))
    return allowed, _lines(problems)
