"""The ``Site`` llamaswap serves on: request bodies stay in memory."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString, unquote
from twisted.web.server import Request, Site
from twisted.web.server import version as server_version

from llamaswap.config.settings import DEFAULT_MAX_REQUEST_BODY_SIZE
from llamaswap.core.twistedweb import (
    EARLY_SEEN,
    EarlyStart,
    EarlyStarter,
    after_flush,
    plain_leaf,
    start_early,
)
from llamaswap.observe.logformat import request_access_line
from llamaswap.web.limits import IDLE_TIMEOUT, BoundedRequest, bound_channel
from llamaswap.web.plainrequest import PlainBodyRequest

log = Logger()


class LlamaSwapRequest(BoundedRequest, PlainBodyRequest, Request):
    """A request whose body is always buffered in memory, up to
    ``maxRequestBodySize`` (:class:`~llamaswap.web.limits.BoundedRequest`),
    and read without Twisted's form parsing
    (:class:`~llamaswap.web.plainrequest.PlainBodyRequest`).

    The order matters: ``BoundedRequest.requestReceived`` (a refused request
    goes no further) runs first and hands on to ``PlainBodyRequest``'s, which
    replaces ``Request``'s and does not call it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received_at = time.monotonic()

    def process(self) -> None:
        """``Request.process`` for a site whose root is a leaf that reads
        ``request.path`` itself (llamaswap's dispatcher): the same default
        headers and path attributes, without walking a resource tree or
        asking the root for an encoder, and with a ``Date`` formatted once a
        second.  Any other root takes Twisted's own ``process``."""
        channel: Any = self.channel
        site = channel.site
        root = getattr(site, "leaf_root", None)
        if root is None or self.path == b"*":
            super().process()
            return
        self.site = site
        started = self._start_early(site.early_start)
        headers = self.responseHeaders
        headers.setRawHeaders(b"Server", [server_version])
        headers.setRawHeaders(b"Date", [http_date(time.time())])
        self.prepath = []
        self.postpath = list(map(unquote, self.path[1:].split(b"/")))
        self.sitepath: list[bytes] = []
        try:
            self.render(root)
        except BaseException:
            self.processingFailed(Failure())
        finally:
            if started is not None:
                started.settle()

    def _start_early(self, start: EarlyStarter | None) -> EarlyStart | None:
        """Show the whole request to the site's early starter, now that its
        body is read, unless the starter saw all of it with the head already
        (`~llamaswap.core.twistedweb.one_pass_heads`).  Most clients write a
        request's head and its body separately (Python's ``http.client``
        does), and the body then arrives in a later read: this is the early
        path for them (:mod:`llamaswap.web.early`).  What it returns is set
        as ``early_start``, and settled once the request was rendered."""
        if start is None or getattr(self, "early_start", None) is not None:
            return None
        content = self.content
        if content is None:
            return None
        body = content.getvalue()
        if len(body) <= getattr(self, EARLY_SEEN, -1):
            return None  # seen whole with the head, and declined then
        started = start_early(
            start, self.channel, self.method, self.uri, self.clientproto, self.requestHeaders, body
        )
        if started is not None:
            self.early_start = started
        return started


def http_date(now: float) -> bytes:
    """The ``Date`` header for ``now``, formatted once per second."""
    second = int(now)
    if second != _date_cache[0]:
        _date_cache[0], _date_cache[1] = second, datetimeToString(second)
    return _date_cache[1]


#: the second last formatted and its ``Date`` value
_date_cache: list[Any] = [-1, b""]


class LlamaSwapSite(Site):
    """Serves llamaswap with llama-swap's access-log line format.

    Request bodies are never parsed as forms by Twisted: llamaswap finds the
    model itself, without parsing anything on the hot path that it does not
    need (Twisted would run an email-header parser on every POST's
    ``Content-Type``, and decode every urlencoded or multipart body).
    """

    requestFactory = LlamaSwapRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: Any,
        reactor: Any = None,
        max_request_body_size: Callable[[], int] = lambda: DEFAULT_MAX_REQUEST_BODY_SIZE,
        access_lines: Callable[[], bool] = lambda: True,
        **kwargs: Any,
    ) -> None:
        """``access_lines``: whether access lines are logged now (the
        config's ``logLevel`` lets info lines through); when not, none is
        made, instead of being made and then dropped by every observer."""
        kwargs.setdefault("timeout", IDLE_TIMEOUT)
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self._max_request_body_size = max_request_body_size
        self._access_lines = access_lines
        #: the root when requests can skip the resource-tree walk (`LlamaSwapRequest.process`)
        self.leaf_root = resource if plain_leaf(resource) else None
        #: what a request head that arrives whole is shown first (the
        #: dispatcher's early path, :mod:`llamaswap.web.early`)
        self.early_start = getattr(self.leaf_root, "early_start", None)

    @property
    def max_request_body_size(self) -> int:
        """``maxRequestBodySize`` of the config being served."""
        return self._max_request_body_size()

    def buildProtocol(self, addr: Any) -> Any:
        return bound_channel(super().buildProtocol(addr), early=self.early_start)

    def log(self, request: Any) -> None:
        if not self._access_lines():
            return
        started = getattr(request, "received_at", None)
        duration = time.monotonic() - started if started is not None else 0.0
        after_flush(self._reactor, self._log_access, request, duration)

    def _log_access(self, request: Any, duration: float) -> None:
        line = request_access_line(request, duration=duration)
        if line is not None:
            log.info("{access_line}", access_line=line)
