"""Reading a request without Twisted's form parsing.

Twisted's ``Request.requestReceived`` parses every POST's ``Content-Type``
with the stdlib ``email`` package to decide whether to decode a form body
(Twisted releases without ``parsePOSTFormSubmission``, or with it on, do so
before looking at the switch).  llamaswap reads bodies itself, so
:class:`PlainBodyRequest` replaces that step: the query string becomes
``request.args`` exactly as Twisted makes it, the body is left whole and unread, and the
``Content-Type`` is parsed, lazily and once, by our own small parser.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.http import parse_qs

from llamaswap.core.contenttype import ContentType, parse_content_type

if TYPE_CHECKING:
    from twisted.web.server import Request as _Base
else:
    _Base = object


class PlainBodyRequest(_Base):
    """Mixin for a :class:`twisted.web.server.Request` subclass (put it first)."""

    _content_type: ContentType | None = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.content is not None:
            self.content.seek(0, 0)
        self.method, self.uri = command, path
        self.clientproto = version
        self.path, question, query = path.partition(b"?")
        self.args = parse_qs(query, 1) if question else {}
        self.process()

    @property
    def content_type(self) -> ContentType:
        """The request's parsed ``Content-Type`` (empty media type when absent)."""
        parsed = self._content_type
        if parsed is None:
            values = self.requestHeaders.getRawHeaders(b"content-type")
            parsed = self._content_type = parse_content_type(values[0] if values else None)
        return parsed
