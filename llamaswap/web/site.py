"""The ``Site`` llamaswap serves on: request bodies stay in memory."""

from __future__ import annotations

import time
from io import BytesIO
from typing import Any

from twisted.logger import Logger
from twisted.web.server import Request, Site

from llamaswap.core.twistedweb import after_flush
from llamaswap.observe.logformat import request_access_line
from llamaswap.web.plainrequest import PlainBodyRequest

log = Logger()


class LlamaSwapRequest(PlainBodyRequest, Request):
    """A request whose body is always buffered in memory.

    Twisted spools bodies over 100 kB to a temporary file; we need every body
    in memory anyway (the model name is inside it) and file I/O would block
    the reactor.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received_at = time.monotonic()

    def gotLength(self, length: int | None) -> None:
        # Twisted declares ``content = None`` on the class; it holds the body.
        self.content = BytesIO()  # type: ignore[assignment]


class LlamaSwapSite(Site):
    """Serves llamaswap with llama-swap's access-log line format.

    Request bodies are never parsed as forms by Twisted: llamaswap finds the
    model itself, without parsing anything on the hot path that it does not
    need (Twisted would run an email-header parser on every POST's
    ``Content-Type``, and decode every urlencoded or multipart body).
    """

    requestFactory = LlamaSwapRequest
    displayTracebacks = False

    def __init__(self, resource: Any, reactor: Any = None, **kwargs: Any) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor

    def log(self, request: Any) -> None:
        started = getattr(request, "received_at", None)
        duration = time.monotonic() - started if started is not None else 0.0
        after_flush(self._reactor, self._log_access, request, duration)

    def _log_access(self, request: Any, duration: float) -> None:
        line = request_access_line(request, duration=duration)
        if line is not None:
            log.info("{access_line}", access_line=line)
