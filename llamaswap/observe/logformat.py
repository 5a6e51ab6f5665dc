"""The text of log lines: Go time layouts, proxy log lines and access-log lines.

llama-swap writes its proxy log as ``[<timestamp> ][LEVEL] message`` lines,
the timestamp in the Go layout named by ``logTimeFormat`` (``rfc3339``,
``kitchen``, ...), and one access-log line per finished request in its own
format (durations as Go prints them).  Pure functions; nothing here logs.

Log lines cannot lie: a value that comes from a request (path, user agent,
header values, model names) is written through :func:`escape_field`, so CR,
LF, quotes and control characters cannot end a line or a quoted field early;
and every log text is written through :func:`safe_text`, so whatever a
message holds, it cannot put a control character on the console or start a
line that looks like a new log entry (lines after the first start with a tab).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime, tzinfo
from typing import Any

from twisted.logger import LogLevel

from llamaswap.core.loglevels import label

__all__ = [
    "ACCESS_LOG_SKIPS",
    "TIME_LAYOUTS",
    "access_log_line",
    "client_ip",
    "escape_field",
    "format_time",
    "go_duration",
    "proxy_line",
    "request_access_line",
    "safe_text",
    "skip_access_log",
]

# --------------------------------------------------------------------------
# Escaping

_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}


def _escape_char(char: str) -> str:
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape_field(value: str) -> str:
    """``value`` (from a request) as one field of a log line: backslash,
    double quote and every character that is not printable (CR, LF, tab,
    escape sequences, NEL, line and paragraph separators, bidi controls...)
    written as Go-style escapes (``\\n``, ``\\"``, ``\\x1b``, ``\\u2028``)."""
    if value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return "".join(_escape_char(c) if not c.isprintable() or c in '"\\' else c for c in value)


def safe_text(text: str) -> str:
    """Log text made safe to write: characters that are not printable are
    escaped except line feeds and tabs, and every line after the first starts
    with a tab, so no line of it can pass for a log entry of its own."""
    if text.isprintable():
        return text
    text = "".join(c if c.isprintable() or c in "\n\t" else _escape_char(c) for c in text)
    return text.replace("\n", "\n\t")


# --------------------------------------------------------------------------
# Go time layouts

_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _zone_name(dt: datetime) -> str:
    name = dt.tzname() or ""
    if name and not name.startswith(("UTC+", "UTC-", "+", "-")):
        return name
    return _offset(dt, colon=False)  # Go prints -0700 when no abbreviation is known


def _offset(dt: datetime, *, colon: bool, z: bool = False) -> str:
    delta = dt.utcoffset()
    minutes = int(delta.total_seconds() // 60) if delta is not None else 0
    if z and minutes == 0:
        return "Z"
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{mins:02d}" if colon else f"{sign}{hours:02d}{mins:02d}"


def _fraction(dt: datetime, digits: int, trim: bool) -> str:
    text = f"{dt.microsecond:06d}000"[:digits]
    if trim:
        text = text.rstrip("0")
        return "." + text if text else ""
    return "." + text


_TOKENS: dict[str, Callable[[datetime], str]] = {
    "Mon": lambda dt: _DAYS[dt.weekday()][:3],
    "Monday": lambda dt: _DAYS[dt.weekday()],
    "Jan": lambda dt: _MONTHS[dt.month - 1],
    "01": lambda dt: f"{dt.month:02d}",
    "02": lambda dt: f"{dt.day:02d}",
    "_2": lambda dt: f"{dt.day:2d}",
    "2006": lambda dt: f"{dt.year:04d}",
    "06": lambda dt: f"{dt.year % 100:02d}",
    "15": lambda dt: f"{dt.hour:02d}",
    "3": lambda dt: str(dt.hour % 12 or 12),
    "04": lambda dt: f"{dt.minute:02d}",
    "05": lambda dt: f"{dt.second:02d}",
    "PM": lambda dt: "PM" if dt.hour >= 12 else "AM",
    "MST": _zone_name,
    "-0700": lambda dt: _offset(dt, colon=False),
    "Z07:00": lambda dt: _offset(dt, colon=True, z=True),
    ".000": lambda dt: _fraction(dt, 3, False),
    ".000000": lambda dt: _fraction(dt, 6, False),
    ".000000000": lambda dt: _fraction(dt, 9, False),
    ".999999999": lambda dt: _fraction(dt, 9, True),
}

#: Go's named layouts (``time.ANSIC`` ...), as ``{token}`` templates.
TIME_LAYOUTS: Mapping[str, str] = {
    "ansic": "{Mon} {Jan} {_2} {15}:{04}:{05} {2006}",
    "unixdate": "{Mon} {Jan} {_2} {15}:{04}:{05} {MST} {2006}",
    "rubydate": "{Mon} {Jan} {02} {15}:{04}:{05} {-0700} {2006}",
    "rfc822": "{02} {Jan} {06} {15}:{04} {MST}",
    "rfc822z": "{02} {Jan} {06} {15}:{04} {-0700}",
    "rfc850": "{Monday}, {02}-{Jan}-{06} {15}:{04}:{05} {MST}",
    "rfc1123": "{Mon}, {02} {Jan} {2006} {15}:{04}:{05} {MST}",
    "rfc1123z": "{Mon}, {02} {Jan} {2006} {15}:{04}:{05} {-0700}",
    "rfc3339": "{2006}-{01}-{02}T{15}:{04}:{05}{Z07:00}",
    "rfc3339nano": "{2006}-{01}-{02}T{15}:{04}:{05}{.999999999}{Z07:00}",
    "kitchen": "{3}:{04}{PM}",
    "stamp": "{Jan} {_2} {15}:{04}:{05}",
    "stampmilli": "{Jan} {_2} {15}:{04}:{05}{.000}",
    "stampmicro": "{Jan} {_2} {15}:{04}:{05}{.000000}",
    "stampnano": "{Jan} {_2} {15}:{04}:{05}{.000000000}",
}
_TOKEN = re.compile(r"\{([^}]+)\}")


def format_time(layout_name: str, when: float, tz: tzinfo | None = None) -> str | None:
    """``when`` (Unix seconds) in the Go layout named ``layout_name``
    (case-insensitive); ``None`` for an empty or unknown name."""
    template = TIME_LAYOUTS.get(layout_name.strip().lower())
    if template is None:
        return None
    dt = datetime.fromtimestamp(when, tz) if tz is not None else datetime.fromtimestamp(when)
    if dt.tzinfo is None:
        dt = dt.astimezone()
    return _TOKEN.sub(lambda m: _TOKENS[m.group(1)](dt), template)


def proxy_line(
    level: LogLevel,
    message: str,
    *,
    when: float = 0.0,
    time_format: str = "",
    tz: tzinfo | None = None,
) -> bytes:
    """One proxy log line: ``[<timestamp> ][LEVEL] message\\n`` (the message
    made :func:`safe_text`)."""
    line = f"[{label(level)}] {safe_text(message)}\n"
    stamp = format_time(time_format, when, tz) if time_format else None
    if stamp is not None:
        line = f"{stamp} {line}"
    return line.encode("utf-8", "replace")


# --------------------------------------------------------------------------
# Access log

#: Path prefixes left out of the access log (polled often).
ACCESS_LOG_SKIPS = ("/wol-health", "/api/performance", "/metrics")


def skip_access_log(path: str) -> bool:
    """Whether requests to ``path`` are left out of the access log."""
    return path.startswith(ACCESS_LOG_SKIPS)


def client_ip(forwarded_for: str | None, real_ip: str | None, peer: str) -> str:
    """First ``X-Forwarded-For`` entry, else ``X-Real-IP``, else the socket peer."""
    if forwarded_for:
        return forwarded_for.split(",", 1)[0].strip()
    if real_ip:
        return real_ip.strip()
    return peer


def _frac(value: int, precision: int) -> str:
    whole, frac = divmod(value, 10**precision)
    digits = f"{frac:0{precision}d}".rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


def go_duration(seconds: float) -> str:
    """A duration as Go's ``time.Duration.String`` prints it (``1.52s``, ``350ms``)."""
    nanos = round(seconds * 1e9)
    sign = "-" if nanos < 0 else ""
    u = abs(nanos)
    if u == 0:
        return "0s"
    if u < 1_000:
        return f"{sign}{u}ns"
    if u < 1_000_000:
        return f"{sign}{_frac(u, 3)}µs"
    if u < 1_000_000_000:
        return f"{sign}{_frac(u, 6)}ms"
    whole, frac = divmod(u, 1_000_000_000)
    text = f"{_frac(whole % 60 * 1_000_000_000 + frac, 9)}s"
    minutes = whole // 60
    if minutes:
        text = f"{minutes % 60}m{text}"
        hours = minutes // 60
        if hours:
            text = f"{hours}h{text}"
    return sign + text


def access_log_line(
    *,
    client: str,
    method: str,
    path: str,
    proto: str,
    status: int,
    body_bytes: int,
    user_agent: str,
    duration: float,
) -> str:
    """``Request <ip> "<METHOD> <path> <proto>" <status> <bytes> "<ua>" <duration>``,
    every field from the request escaped (:func:`escape_field`)."""
    return _ACCESS_LINE(
        escape_field(client),
        escape_field(method),
        escape_field(path),
        escape_field(proto),
        status,
        body_bytes,
        escape_field(user_agent),
        go_duration(duration),
    )


#: The access line from its escaped fields (client, method, path, protocol,
#: status, body bytes, user agent, duration), the format parsed once.
_ACCESS_LINE = 'Request {} "{} {} {}" {} {} "{}" {}'.format

#: Methods and protocols as the access line writes them, decoded and escaped
#: once; others are decoded and escaped per request.
_HTTP_TOKENS: dict[bytes, str] = {
    token: escape_field(token.decode("latin-1"))
    for token in (
        b"GET",
        b"HEAD",
        b"POST",
        b"PUT",
        b"PATCH",
        b"DELETE",
        b"OPTIONS",
        b"CONNECT",
        b"TRACE",
        b"HTTP/1.0",
        b"HTTP/1.1",
    )
}


def _header(request: Any, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if isinstance(value, bytes) else value


def request_access_line(request: Any, *, duration: float) -> str | None:
    """The access-log line for a finished Twisted ``request``, or ``None``
    for a skipped path.  Uses ``request.code`` and ``request.sentLength``."""
    path = request.path.decode("utf-8", "replace")
    if path.startswith(ACCESS_LOG_SKIPS):  # skip_access_log
        return None
    peer = getattr(request.getClientAddress(), "host", None) or ""
    method = _HTTP_TOKENS.get(request.method)
    if method is None:
        method = escape_field(request.method.decode("latin-1"))
    proto_bytes = request.clientproto or b"HTTP/1.1"
    proto = _HTTP_TOKENS.get(proto_bytes)
    if proto is None:
        proto = escape_field(proto_bytes.decode("latin-1"))
    return _ACCESS_LINE(
        escape_field(
            client_ip(_header(request, b"x-forwarded-for"), _header(request, b"x-real-ip"), peer)
        ),
        method,
        escape_field(path),
        proto,
        int(request.code),
        int(request.sentLength),
        escape_field(_header(request, b"user-agent") or ""),
        go_duration(duration),
    )
