"""Sending an inference request to its model before Twisted has read it.

A streamed answer's first token waits for the request to reach the model's
server, and the upstream cannot start before it is sent.  Reading a request
the usual way (Twisted's ``Request``, the dispatcher, the activity row and
the in-flight list, then the send) takes a few hundred microseconds of Python
once the process has sat idle.  For the plainest, most common request (a
POST of JSON to an inference path, whole in one read, for a local model
that is ready and has room), the decisions that the send needs are made
first, from the head and body as they arrived:

1. the host guard and authentication, with the same checks the dispatcher
   makes (`~llamaswap.web.guard.BrowserGuard.refused_host`,
   `~llamaswap.web.auth.ApiKeys.authorize`);
2. the route, with the same functions as the model-dispatched paths
   (`~llamaswap.web.inference.ModelRequests.early`);
3. admission by the router and, when the model is granted at once, the
   send (`~llamaswap.web.serving.RequestServer.send_early`).

Then Twisted reads the request as usual, and the dispatcher hands it to
`EarlySend.take`, and serves it from where the early path left off (the
serving coroutine adopts the admission): the books (activity row,
in-flight list) are written while the upstream works.

Anything else, and any request the early path is not sure about, goes the
usual way, untouched: what the early path does is only ever done *instead*
of the same step of the usual path, never beside it.  A request the early
path began and the dispatcher did not take (which would be a bug) is undone
when the read ends: its upstream request is aborted and its place released.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from llamaswap.core.transport import let_others_run
from llamaswap.scheduling import Ticket
from llamaswap.supervision.router import Lease

log = Logger()

#: request attributes ``ApiKeys.authorize`` sets (carried over by `EarlySend.take`)
_CREDENTIALS = (
    "llamaswap_credential_header",
    "llamaswap_credential_source",
    "llamaswap_api_key_index",
    "llamaswap_credential_headers",
)

#: request headers that make a request not plain enough for the early path
_UNUSUAL = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"content-encoding"))


class EarlyHead:
    """A request as the early path knows it: the parts of ``twisted.web``'s
    ``Request`` that the host guard, authentication and routing read
    (``method``, ``path``, ``uri``, ``requestHeaders``, ``getHeader``,
    ``getClientAddress``), and the attributes authentication sets."""

    def __init__(self, method: bytes, path: bytes, headers: Any, peer: Any) -> None:
        self.method = method
        self.path = path
        self.uri = path
        self.requestHeaders = headers
        self._peer = peer

    def getHeader(self, name: bytes) -> bytes | None:
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def getClientAddress(self) -> Any:
        return self._peer


def plain_body(headers: Any, rest: bytes, limit: int) -> bool:
    """Whether ``rest`` (the data after the head) is exactly the request's
    body, framed by one ``Content-Length``, within ``limit``, with nothing
    unusual asked (no other framing, ``Expect``, ``Upgrade`` or
    ``Content-Encoding``)."""
    if len(rest) > limit:
        return False
    lengths = None
    for name, values in headers.getAllRawHeaders():
        lowered = name.lower()
        if lowered in _UNUSUAL:
            return False
        if lowered == b"content-length":
            lengths = values
    return lengths is not None and len(lengths) == 1 and lengths[0] == b"%d" % len(rest)


def _peek(result: object, box: list[object]) -> object:
    box.append(result)
    return result


class EarlySend:
    """A request admitted (and, if its model was granted at once, sent)
    before Twisted read it; the dispatcher takes it over (`take`) in the
    same read.  An `~llamaswap.core.twistedweb.EarlyStart`."""

    def __init__(self, head: EarlyHead, local: Any, ticket: Ticket, waiting: defer.Deferred[Lease]):
        self.head = head
        #: the `~llamaswap.web.serving.LocalModel` it is for
        self.local = local
        self.ticket = ticket
        #: the router's answer (it may have fired already)
        self.waiting = waiting
        #: the upstream response, once the request was sent (`UpstreamClient.send`)
        self.response: defer.Deferred[Any] | None = None
        self._taken = False
        box: list[object] = []
        waiting.addBoth(_peek, box)
        #: the lease when the model was granted at once
        self.granted: Lease | None = box[0] if box and isinstance(box[0], Lease) else None

    def sent(self, response: defer.Deferred[Any], written: bool, alone: bool = True) -> None:
        """The request went upstream (``written``: onto the socket already).

        ``alone``: no other request is in flight here.  Only then is the
        core yielded to the woken upstream: with others in flight the
        reactor has their work to do, and the upstream runs when it waits
        for more, or on another core; a yield per request under load only
        adds a system call and a switch to each (measured alternately at
        64 clients: 2% less CPU per request without it)."""
        self.response = response
        if written and alone:
            _let_upstream_run()

    def take(self, request: Any) -> EarlySend:
        """The dispatcher serves ``request`` (the same request, now read by
        Twisted) from here on: it carries what authentication found."""
        head = self.head.__dict__
        for name in _CREDENTIALS:
            if name in head:
                setattr(request, name, head[name])
        return self

    def adopt(self) -> tuple[Ticket, defer.Deferred[Lease]]:
        """The serving coroutine owns the admission (and the upstream
        request) from here on; until then `settle` would undo them."""
        self._taken = True
        return self.ticket, self.waiting

    def settle(self) -> None:
        if self._taken:
            return
        log.error(
            "a request sent early to {model} was not taken over; it is aborted",
            model=self.local.model_id,
        )
        if self.response is not None:
            self.response.addErrback(lambda _: None)
            self.response.cancel()
        if self.granted is not None:
            self.granted.release()
        else:
            self.waiting.addErrback(lambda _: None)
            self.waiting.cancel()


#: Let the process the send woke (the model's server, often woken on this
#: core) run now, before the rest of the request's handling here.
_let_upstream_run: Callable[[], None] = let_others_run
