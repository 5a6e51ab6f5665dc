"""Serving one request whose destination is known: admit, wait, relay, record.

A request for a local model is admitted by the router (a full concurrency
budget is a 429 at once), waits for its model (streaming chat completions
watch a loading stream meanwhile), is relayed with the proxy client and
released; one for a peer's model is relayed straight away.  Either way it is
listed in flight while it runs and, for the recorded paths, becomes an
activity row when it ends.  Cancelling it (the client went away,
``POST /api/inflight/{id}/cancel``) withdraws it wherever it is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET

from llamaswap.config.peers import PeerTarget
from llamaswap.core.twistedweb import write_now
from llamaswap.observe.bodies import narrow_accept_encoding
from llamaswap.observe.inflight import InflightEntry, InflightTracker
from llamaswap.observe.prometheus import Metrics
from llamaswap.observe.recording import ActivityRecorder, Recording
from llamaswap.scheduling import ShuttingDown, Ticket, UnknownModel
from llamaswap.supervision.process import ProcessState
from llamaswap.supervision.router import RequestFailed, Router, TooManyRequests
from llamaswap.upstream.client import (
    UpstreamClient,
    UpstreamNotConnected,
    UpstreamUnavailable,
    forward_headers,
)
from llamaswap.upstream.peerhealth import PeerHealth
from llamaswap.web.auth import carried_headers
from llamaswap.web.early import EarlyHead, EarlySend
from llamaswap.web.errors import json_envelope, write_error, write_too_many
from llamaswap.web.loading import LoadingStream, relay_body_only, wants_loading_stream
from llamaswap.web.paths import RECORDED_PATHS
from llamaswap.web.requestinfo import client_gone, client_ip
from llamaswap.web.routing import Routing

log = Logger()

#: Sees the upstream response; may return an observer of its body chunks.
ResponseHook = Callable[[Any], Callable[[bytes], None] | None]


@dataclass(frozen=True)
class LocalModel:
    """A request for a local model: wait for it, then relay to ``target``."""

    model_id: str
    #: path and query sent to the model's server
    target: bytes
    #: the client asked for a streamed answer (decides the loading stream)
    streaming: bool = False
    #: the body to send when it is not the one ``serve`` was given (a replica)
    body: bytes | None = None

    @property
    def name(self) -> str:
        return self.model_id


@dataclass(frozen=True)
class PeerModel:
    """A request for a peer's model, ready to send."""

    target: PeerTarget
    url: bytes
    headers: Headers
    #: the body to send when it is not the one ``serve`` was given (a replica)
    body: bytes | None = None

    @property
    def name(self) -> str:
        return self.target.fqn


class RequestServer:
    """Serves requests to their destination, one coroutine per request."""

    def __init__(
        self,
        routing: Routing,
        router: Router,
        client: UpstreamClient,
        recorder: ActivityRecorder,
        inflight: InflightTracker,
        metrics: Metrics,
        reactor: Any,
    ) -> None:
        self._routing = routing
        self._router = router
        self._client = client
        self._recorder = recorder
        self._inflight = inflight
        self._metrics = metrics
        self._reactor = reactor

    def serve(
        self,
        request: Any,
        destination: LocalModel | PeerModel,
        body: bytes,
        recorded_path: bytes | None = None,
        metadata: dict[str, str] | None = None,
        alternatives: Sequence[LocalModel | PeerModel] = (),
        early: EarlySend | None = None,
    ) -> object:
        """Serve ``request`` with ``body``; a POST to ``recorded_path`` (one of
        the recorded paths) becomes an activity row with ``metadata``.
        ``alternatives`` are replicas of a peer ``destination``, tried in
        order when no connection to the one before could be made (nothing
        was sent to it: a generation never runs twice).  ``early`` is what
        `send_early` did for a local ``destination`` already."""
        name = destination.name
        recording = None
        if recorded_path is not None:
            recording = self._begin_recording(request, name, recorded_path, body, metadata)
        entry = self._inflight.add(
            name,
            request.path,
            request.method,
            request.requestHeaders,
            client_ip(request),
        )
        d = defer.Deferred.fromCoroutine(
            self._serve(request, destination, body, recording, entry, alternatives, early)
        )
        entry.set_canceller(d.cancel)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(self._serve_failed, request)
        return NOT_DONE_YET

    def _begin_recording(
        self,
        request: Any,
        name: str,
        path: bytes,
        body: bytes,
        metadata: dict[str, str] | None,
    ) -> Recording | None:
        if request.method != b"POST":
            return None
        req_path = path.decode("utf-8", "replace")
        if req_path not in RECORDED_PATHS:
            return None
        return self._recorder.begin(
            model=name,
            req_path=req_path,
            req_headers=request.requestHeaders,
            req_body=body,
            api_key_index=getattr(request, "llamaswap_api_key_index", None),
            metadata=metadata,
        )

    async def _serve(
        self,
        request: Any,
        destination: LocalModel | PeerModel,
        body: bytes,
        recording: Recording | None,
        entry: InflightEntry,
        alternatives: Sequence[LocalModel | PeerModel] = (),
        early: EarlySend | None = None,
    ) -> None:
        error = "client disconnected"
        hook = self._response_hook(recording, entry)
        chain = [destination, *alternatives]
        try:
            for index, choice in enumerate(chain):
                sent = body if choice.body is None else choice.body
                if isinstance(choice, LocalModel):
                    error = await self._serve_local(request, choice, sent, hook, early)
                    break
                try:
                    error = await self._serve_peer(
                        request, choice, sent, hook, failover=index + 1 < len(chain)
                    )
                    break
                except UpstreamNotConnected as exc:
                    log.warn(
                        "peer {peer} unreachable ({reason}); trying the next replica",
                        peer=choice.target.peer_id,
                        reason=exc,
                    )
        finally:
            if recording is not None:
                recording.finish(status=request.code, error=error)
            self._inflight.remove(entry)

    async def _serve_peer(
        self, request: Any, peer: PeerModel, body: bytes, hook: ResponseHook, *, failover: bool
    ) -> str:
        """Relay to a peer, telling its health what happened.  With
        ``failover``, a connection that could not be made raises
        :class:`UpstreamNotConnected` (nothing written) instead of a 502."""
        health = self._routing.health
        peer_id = peer.target.peer_id
        health.started(peer_id, peer.target.model)
        try:
            return await self._relay(
                request,
                self._routing.peer_client(peer_id),
                peer.url,
                peer.headers,
                body,
                hook,
                "peer proxy error",
                on_retry=functools.partial(self._metrics.upstream_retry, peer.name),
                health=(health, peer_id),
                failover=failover,
            )
        finally:
            health.finished(peer_id, peer.target.model)

    def _response_hook(self, recording: Recording | None, entry: InflightEntry) -> ResponseHook:
        """What sees the upstream response: the activity recording and the
        in-flight list (response headers, byte counts)."""
        inflight = self._inflight

        def on_response(response: Any) -> Callable[[bytes], None]:
            inflight.response_started(entry, response.headers)
            observe = recording.on_response(response) if recording is not None else None

            def chunk(data: bytes) -> None:
                inflight.add_bytes(entry, len(data))
                if observe is not None:
                    observe(data)

            return chunk

        return on_response

    async def _serve_local(
        self,
        request: Any,
        local: LocalModel,
        body: bytes,
        on_response: ResponseHook,
        early: EarlySend | None = None,
    ) -> str:
        """Admit, wait for the model, relay (from where ``early`` left off).
        Returns the error text for the activity row when no upstream response
        arrived ("" if one did)."""
        if early is not None:
            ticket, waiting = early.adopt()
        else:
            try:
                # Admission comes first: a 429 is never preceded by a loading stream.
                ticket = self._router.admit(local.model_id)
            except TooManyRequests:
                write_too_many(request)
                return "Too many requests"
            except UnknownModel:
                message = "no local server found for requested model"
                write_error(request, 404, message)
                return message
            except ShuttingDown as exc:
                message = f"unspecific error: {exc}"
                write_error(request, 503, message)
                return message
            waiting = self._router.wait(ticket)
        loading: LoadingStream | None = None
        waited_since: float | None = None
        try:
            if not waiting.called:
                # Only a request that waits reads the clock (twice) and is
                # counted in the queue-wait histogram.
                waited_since = self._reactor.seconds()
                loading = self._loading_stream(request, local, ticket)
                if loading is not None:
                    loading.start()
            lease = await waiting
        except (RequestFailed, ShuttingDown) as exc:
            message = f"unspecific error: {exc}"
            if loading is not None:
                await loading.fail(message)
            else:
                # Stopping: the request waited for a model that will not start.
                write_error(request, 503 if self._router.scheduler.closing else 500, message)
            return message
        except BaseException:
            # Cancelled (client gone, /api/inflight cancel) or a bug: withdraw
            # the ticket if still waiting and silence the loading stream.
            if loading is not None:
                loading.stop()
            waiting.cancel()
            raise
        try:
            if waited_since is not None:
                self._metrics.queue_wait(local.model_id, self._reactor.seconds() - waited_since)
            sent = early.response if early is not None else None
            # (what was sent early had its headers made from the same request)
            headers = _upstream_headers(request) if sent is None else Headers()
            target = request
            if loading is not None:
                await loading.finish()
                # The upstream body is appended to our event stream as is: it
                # must not be compressed, and its status/headers go nowhere.
                headers.removeHeader(b"accept-encoding")
                target = relay_body_only(request)
            return await self._relay(
                target,
                self._routing.model_client(local.model_id) or self._client,
                lease.upstream + local.target,
                headers,
                body,
                on_response,
                f"upstream {local.model_id} unavailable",
                on_retry=functools.partial(self._metrics.upstream_retry, local.model_id),
                sent=sent,
            )
        finally:
            lease.release()

    def send_early(self, head: EarlyHead, local: LocalModel) -> EarlySend | None:
        """Admit a request for ``local`` before Twisted has read it and, when
        its model is granted at once, send it (see :mod:`llamaswap.web.early`);
        ``None``, with nothing done, when admission refuses it (the usual
        path then answers)."""
        try:
            ticket = self._router.admit(local.model_id)
        except (TooManyRequests, UnknownModel, ShuttingDown):
            return None
        early = EarlySend(head, local, ticket, self._router.wait(ticket))
        lease = early.granted
        if lease is not None:
            headers = _upstream_headers(head)
            _narrow(headers)
            client = self._routing.model_client(local.model_id) or self._client
            response = client.send(
                head.method,
                lease.upstream + local.target,
                headers=headers,
                body=local.body or b"",
                on_retry=functools.partial(self._metrics.upstream_retry, local.model_id),
            )
            early.sent(response, write_now(self._reactor), alone=not self._inflight)
        return early

    def _loading_stream(
        self, request: Any, local: LocalModel, ticket: Ticket
    ) -> LoadingStream | None:
        """A loading stream for ``request`` when it asks for a streamed chat
        completion of a model that loads with ``sendLoadingState``."""
        config = self._routing.state.config
        model = config.models.get(local.model_id)
        if model is None:
            return None
        enabled = (
            model.send_loading_state
            if model.send_loading_state is not None
            else config.send_loading_state
        )
        ready = self._routing.state_of(local.model_id) == ProcessState.READY.value
        if not wants_loading_stream(local.streaming, enabled, local.target, ready):
            return None
        return LoadingStream(
            request,
            local.model_id,
            self._reactor,
            queue_position=lambda: self._router.queue_position_of(ticket),
            load_progress=lambda: self._router.load_progress(local.model_id),
        )

    async def _relay(
        self,
        request: Any,
        client: UpstreamClient,
        url: bytes,
        headers: Headers,
        body: bytes,
        on_response: ResponseHook,
        failure_prefix: str,
        on_retry: Callable[[], None] | None = None,
        *,
        health: tuple[PeerHealth, str] | None = None,
        failover: bool = False,
        sent: defer.Deferred[Any] | None = None,
    ) -> str:
        if sent is None:
            _narrow(headers)
        if health is not None:
            seen = on_response

            def on_response(response: Any) -> Callable[[bytes], None] | None:
                health[0].responded(health[1])
                return seen(response)

        try:
            await client.forward(
                request,
                url,
                headers=headers,
                body=body,
                on_response=on_response,
                on_retry=on_retry,
                on_stream_broken=functools.partial(_stream_broken, request),
                sent=sent,
            )
        except UpstreamUnavailable as exc:
            if health is not None and isinstance(exc, UpstreamNotConnected):
                health[0].connect_failed(health[1], str(exc))
                if failover:
                    raise
            message = f"{failure_prefix}: {exc}"
            log.warn("{message}", message=message)
            write_error(request, exc.status, message)
            return message
        if not client_gone(request):
            request.finish()
            # The response's last bytes go out now, before what ending a
            # request costs here (the lease, the in-flight list, the
            # activity row, unwinding these coroutines): a client sending
            # its next request at once then finds the reactor free.
            write_now(self._reactor)
        return ""

    def _serve_failed(self, failure: Failure, request: Any) -> None:
        if failure.check(defer.CancelledError):
            # Cancelled while the client is still there: POST /api/inflight/{id}/cancel.
            if not client_gone(request):
                if request.startedWriting:
                    request.loseConnection()  # the client sees a truncated response
                else:
                    write_error(request, 503, "request cancelled")
            return
        log.failure("error while serving {uri}", failure, uri=request.uri)
        write_error(request, 500, f"unspecific error: {failure.getErrorMessage()}")


def _upstream_headers(request: Any) -> Headers:
    """The headers a request for a local model is sent upstream with
    (before `_narrow`)."""
    return forward_headers(
        request.requestHeaders,
        client_ip=client_ip(request),
        drop=carried_headers(request),
    )


def _narrow(headers: Headers) -> None:
    """Usage is read from the response body: only gzip/deflate can be
    decoded, so ``Accept-Encoding`` asks for those alone."""
    if headers.hasHeader(b"accept-encoding"):
        wanted = b", ".join(headers.getRawHeaders(b"accept-encoding", []))
        headers.setRawHeaders(b"accept-encoding", [narrow_accept_encoding(wanted) or b""])


def _stream_broken(request: Any, message: str) -> None:
    """An event stream whose upstream broke off ends with an error event
    (issue 15), as a loading stream's errors do (difference 6)."""
    if client_gone(request):
        return
    request.write(b"data: " + json_envelope(502, message) + b"\n\n")
