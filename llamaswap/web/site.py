"""The ``Site`` llamaswap serves on: request bodies stay in memory."""

from __future__ import annotations

from io import BytesIO

from twisted.web.server import Request, Site


class LlamaSwapRequest(Request):
    """A request whose body is always buffered in memory.

    Twisted spools bodies over 100 kB to a temporary file; we need every body
    in memory anyway (the model name is inside it) and file I/O would block
    the reactor.
    """

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()


class LlamaSwapSite(Site):
    requestFactory = LlamaSwapRequest
    displayTracebacks = False
