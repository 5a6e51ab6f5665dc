"""Logs that cannot lie (issue 11.8): request values with CR, LF, quotes and
control characters neither break nor forge a log line."""

from __future__ import annotations

import io
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from llamaswap.observe.logformat import (
    access_log_line,
    client_ip,
    escape_field,
    request_access_line,
    safe_text,
)
from llamaswap.observe.logs import LogHub
from llamaswap.service.journal import format_journal_event, format_text_event
from llamaswap.web.site import LlamaSwapSite

#: an access-log line, its quoted fields allowing only escaped quotes.
ACCESS = re.compile(
    r'^Request (?P<client>.*?) "(?P<method>\S*) (?P<path>(?:[^"\\]|\\.)*) '
    r'(?P<proto>\S*)" (?P<status>\d+) (?P<bytes>\d+) "(?P<ua>(?:[^"\\]|\\.)*)" \S+$'
)

HOSTILE = [
    '\r\n2026-01-01T00:00:00+0000 [llamaswap.web.site#info] Request 6.6.6.6 "GET /forged',
    'curl/8" 200 0 "x',
    "\x1b[2J\x1b[31mred\x1b]0;title\x07",
    "nel\x85line\u2028sep\u2029par\x0bvt\x0cff\x1cfs",
    "bidi \u202eevil\u202c zero\u200bwidth",
    "back\\slash \\n not a newline",
    "nul\x00 del\x7f",
]


def unescape(text: str) -> str:
    """Reverse :func:`escape_field` (its escapes are Python's)."""
    return text.encode("ascii", "backslashreplace").decode("unicode_escape")


def single_line(text: str) -> bool:
    return len(text.splitlines()) == 1 and text.isprintable()


class EscapeFieldTests(SynchronousTestCase):
    def test_hostile_values(self) -> None:
        """Each hostile value becomes one printable line without a bare quote,
        and reads back as it was."""
        for value in HOSTILE:
            escaped = escape_field(value)
            self.assertTrue(single_line(escaped), repr(escaped))
            self.assertNotRegex(escaped, r'(?<!\\)(?:\\\\)*"')
            self.assertEqual(unescape(escaped), value)

    def test_plain_values_unchanged(self) -> None:
        """Ordinary values (UTF-8 model names too) are written as they are."""
        for value in ("/v1/chat/completions", "Mozilla/5.0 (X11)", "qwen-2.5:7b", "modèle"):
            self.assertEqual(escape_field(value), value)

    @given(st.text())
    def test_any_text(self, value: str) -> None:
        """For any text: one printable line, no bare quote, reversible."""
        escaped = escape_field(value)
        self.assertTrue(escaped == "" or single_line(escaped), repr(escaped))
        self.assertNotRegex(escaped, r'(?<!\\)(?:\\\\)*"')
        self.assertEqual(unescape(escaped), value)


class AccessLineTests(SynchronousTestCase):
    @given(
        client=st.text(),
        method=st.text(),
        path=st.text(),
        proto=st.text(),
        user_agent=st.text(),
    )
    def test_any_request_is_one_parsable_line(
        self, client: str, method: str, path: str, proto: str, user_agent: str
    ) -> None:
        """Whatever a request holds, its access-log line is one printable line
        whose quoted fields read back as the request's values."""
        line = access_log_line(
            client=client,
            method=method,
            path=path,
            proto=proto,
            status=200,
            body_bytes=2,
            user_agent=user_agent,
            duration=0.001,
        )
        self.assertTrue(single_line(line), repr(line))
        if " " not in method + proto:
            match = ACCESS.match(line)
            assert match is not None, line
            self.assertEqual(unescape(match["ua"]), user_agent)
            self.assertEqual(unescape(match["path"]), path)


class _Finished:
    """The parts of a finished twisted.web request the access log reads."""

    def __init__(
        self,
        method: bytes,
        proto: bytes | None,
        path: bytes,
        headers: dict[bytes, bytes],
    ) -> None:
        self.method = method
        self.clientproto = proto
        self.path = path
        self._headers = headers
        self.code = 200
        self.sentLength = 7

    def getHeader(self, name: bytes) -> bytes | None:
        return self._headers.get(name)

    def getClientAddress(self) -> Any:
        return IPv4Address("TCP", "127.0.0.1", 4242)


_METHODS = st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"get", b'PO"ST']) | st.binary()
_PROTOS = st.sampled_from([None, b"HTTP/1.0", b"HTTP/1.1", b"HTTP/1.1\r\n"]) | st.binary()
_HEADER_NAMES = st.sampled_from([b"x-forwarded-for", b"x-real-ip", b"user-agent"])


class RequestAccessLineTests(SynchronousTestCase):
    @given(
        method=_METHODS,
        proto=_PROTOS,
        path=st.binary().map(lambda b: b"/v1/" + b),
        headers=st.dictionaries(_HEADER_NAMES, st.binary()),
    )
    def test_same_line_as_from_fields(
        self, method: bytes, proto: bytes | None, path: bytes, headers: dict[bytes, bytes]
    ) -> None:
        """The line of a request (common methods and protocols escaped once)
        is the line `access_log_line` writes from its decoded fields."""
        request = _Finished(method, proto, path, headers)

        def header(name: bytes) -> str | None:
            value = headers.get(name)
            return None if value is None else value.decode("latin-1")

        self.assertEqual(
            request_access_line(request, duration=0.25),
            access_log_line(
                client=client_ip(header(b"x-forwarded-for"), header(b"x-real-ip"), "127.0.0.1"),
                method=method.decode("latin-1"),
                path=path.decode("utf-8", "replace"),
                proto=(proto or b"HTTP/1.1").decode("latin-1"),
                status=200,
                body_bytes=7,
                user_agent=header(b"user-agent") or "",
                duration=0.25,
            ),
        )


class _Ok(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


class RealRequestTests(SynchronousTestCase):
    def test_no_access_line_when_not_wanted(self) -> None:
        """``access_lines`` (the config's ``logLevel`` above info) is asked at
        each request's end: while it says no, no access line is made."""
        wanted = [False]
        clock = Clock()
        site = LlamaSwapSite(_Ok(), reactor=clock, access_lines=lambda: wanted[0])
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(StringTransport())
        with capturedLogs() as events:
            for flag in (False, True, False):
                wanted[0] = flag
                channel.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: h\r\n\r\n")
                clock.advance(1)
        channel.connectionLost(None)
        access = [e for e in events if "access_line" in e]
        self.assertEqual(len(access), 1, events)

    def test_hostile_request_logs_one_line_everywhere(self) -> None:
        """A request whose path, user agent and X-Forwarded-For carry control
        characters, quotes and a forged log line is logged as one line on
        the console, in the journal and in the proxy log (the UI)."""
        clock = Clock()
        site = LlamaSwapSite(_Ok(), reactor=clock)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(StringTransport())
        with capturedLogs() as events:
            channel.dataReceived(
                # Twisted refuses C0 controls in the path; DEL, quotes pass.
                b'GET /v1/models\x7f"x\\ HTTP/1.1\r\nHost: h\r\n'
                b'User-Agent: ua" 200 0 "\x1b[31m\x85[INFO] forged\x0c\r\n'
                b'X-Forwarded-For: 6.6.6.6 "GET /\x85x, 10.0.0.1\r\n\r\n'
            )
            clock.advance(1)
        channel.connectionLost(None)
        access = [e for e in events if "access_line" in e]
        self.assertEqual(len(access), 1, events)
        event = access[0]
        console = format_text_event(event) or ""
        self.assertEqual(console.count("\n"), 1, console)
        self.assertTrue(single_line(console.rstrip("\n")), repr(console))
        journal = format_journal_event(event) or ""
        self.assertEqual(journal.count("\n"), 1, journal)
        hub = LogHub("proxy")
        hub.proxy_observer()(event)
        proxy = hub.proxy.history().decode()
        self.assertTrue(single_line(proxy.rstrip("\n")), repr(proxy))
        line = formatEvent(event)
        match = ACCESS.match(line)
        assert match is not None, line
        self.assertEqual(unescape(match["ua"]), 'ua" 200 0 "\x1b[31m\x85[INFO] forged\x0c')
        self.assertEqual(unescape(match["client"]), '6.6.6.6 "GET /\x85x')
        self.assertEqual(unescape(match["path"]), '/v1/models\x7f"x\\')


class SafeTextTests(SynchronousTestCase):
    def test_no_line_passes_for_an_entry(self) -> None:
        """Any log message (a field not escaped at its call site, a
        traceback): control characters escaped, later lines start with a tab,
        in every output."""
        log = Logger(namespace="llamaswap.test")
        with capturedLogs() as events:
            log.info(
                "unknown model {model}", model="x\n[ERROR] forged\r\x1b[31mred\u2028sep\x85nel"
            )
        event = events[0]
        for text in (
            format_text_event(event) or "",
            format_journal_event(event) or "",
        ):
            lines = text.rstrip("\n").split("\n")
            self.assertEqual(len(lines), 2, text)
            self.assertTrue(all(line.replace("\t", "").isprintable() for line in lines))
            # (The journal drops colour codes before escaping.)
            self.assertRegex(lines[1], r"\t\[ERROR\] forged\\r(\\x1b\[31m)?red\\u2028sep\\x85nel$")
        hub = LogHub("proxy")
        hub.proxy_observer(LogLevel.debug)(event)
        proxy = hub.proxy.history().decode().rstrip("\n").split("\n")
        self.assertEqual(proxy[0], "[INFO] unknown model x")
        self.assertEqual(proxy[1], "\t[ERROR] forged\\r\\x1b[31mred\\u2028sep\\x85nel")

    def test_printable_text_unchanged(self) -> None:
        self.assertEqual(safe_text("a plain line"), "a plain line")
        self.assertEqual(safe_text("two\nlines\tand tab"), "two\n\tlines\tand tab")

    def test_console_writes_nothing_else(self) -> None:
        """``format_text_event`` output has a timestamp, system and the safe
        message: nothing of the message can move the cursor or clear the
        screen."""
        out = io.StringIO()
        out.write(
            format_text_event(
                {
                    "log_format": "{x}",
                    "x": "\x1b[2J\x1b[H",
                    "log_level": LogLevel.info,
                    "log_namespace": "ns",
                    "log_time": 0.0,
                }
            )
            or ""
        )
        self.assertNotIn("\x1b", out.getvalue())
        self.assertIn("\\x1b[2J\\x1b[H", out.getvalue())
