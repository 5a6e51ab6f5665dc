"""The ``Site`` llamaswap serves on: request bodies stay in memory."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.web.server import Request, Site

from llamaswap.config.settings import DEFAULT_MAX_REQUEST_BODY_SIZE
from llamaswap.core.twistedweb import after_flush
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
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("timeout", IDLE_TIMEOUT)
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self._max_request_body_size = max_request_body_size

    @property
    def max_request_body_size(self) -> int:
        """``maxRequestBodySize`` of the config being served."""
        return self._max_request_body_size()

    def buildProtocol(self, addr: Any) -> Any:
        return bound_channel(super().buildProtocol(addr))

    def log(self, request: Any) -> None:
        started = getattr(request, "received_at", None)
        duration = time.monotonic() - started if started is not None else 0.0
        after_flush(self._reactor, self._log_access, request, duration)

    def _log_access(self, request: Any, duration: float) -> None:
        line = request_access_line(request, duration=duration)
        if line is not None:
            log.info("{access_line}", access_line=line)
