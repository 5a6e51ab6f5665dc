"""The HTTP face of llamaswap.

Model-dispatched inference paths are looked up in one dict built at import
time and handled without Klein's routing machinery: they are the hot path.
Everything else (listing, status, unload, ...) goes through a Klein app.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from klein import Klein
from twisted.internet import defer
from twisted.internet.error import ConnectError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import MethodNotAllowed, NotFound

from llamaswap import __version__
from llamaswap.config import Config
from llamaswap.config.peers import PeerTarget
from llamaswap.observe.bodies import narrow_accept_encoding
from llamaswap.observe.inflight import InflightEntry, InflightTracker
from llamaswap.observe.queries import activity_page_json, parse_activity_query
from llamaswap.observe.recording import ActivityRecorder, Recording
from llamaswap.scheduling import ShuttingDown, Ticket, UnknownModel
from llamaswap.supervision.process import ProcessState
from llamaswap.supervision.router import RequestFailed, Router, TooManyRequests
from llamaswap.supervision.selection import (
    NoModelIdentified,
    ProfileRequestError,
    ProfileState,
    SelectorRuntime,
    SelectorUnavailable,
    UnknownProfile,
    parse_activate_body,
    profile_model_records,
    profiles_json,
    resolve_request,
    rewrite_upstream_path,
    selector_model_records,
)
from llamaswap.upstream.client import UpstreamClient, UpstreamUnavailable, forward_headers
from llamaswap.upstream.extract import extract_model, replace_multipart_model
from llamaswap.upstream.filters import apply_filters
from llamaswap.upstream.peers import (
    peer_model_records,
    peer_url,
    prepare_peer_request,
    rewrite_request_model,
)
from llamaswap.upstream.websocket import is_upgrade, relay_upgrade
from llamaswap.web.auth import ApiKeys, find_credential, unauthorized
from llamaswap.web.cors import preflight
from llamaswap.web.errors import render_error, write_error, write_too_many
from llamaswap.web.loading import LoadingStream, relay_body_only, wants_loading_stream
from llamaswap.web.paths import _GET, INFERENCE_ROUTES, RECORDED_PATHS
from llamaswap.web.streams import StreamsResource
from llamaswap.web.ui import UIResource

log = Logger()

ResponseHook = Callable[[Any], Callable[[bytes], None] | None]


COMFYUI_MODEL = "comfyui_auto"
CAPABILITY_KEYS = ("architecture", "capabilities", "supported_parameters", "context_length")


def capability_fields(raw: Any) -> tuple[dict[str, Any], int]:
    """``/v1/models`` fields for a model's ``capabilities`` (§3.3), and the
    context length for ``meta.n_ctx``."""
    if not isinstance(raw, Mapping):
        return {}, 0
    inputs = [str(v) for v in raw.get("in") or []]
    outputs = [str(v) for v in raw.get("out") or []]
    tools = raw.get("tools") is True
    reranker = raw.get("reranker") is True
    context = raw.get("context") if isinstance(raw.get("context"), int) else 0
    fields: dict[str, Any] = {}
    if inputs or outputs:
        architecture: dict[str, Any] = {"input_modalities": inputs, "output_modalities": outputs}
        if inputs and outputs:
            architecture["modality"] = "+".join(inputs) + "->" + "+".join(outputs)
        fields["architecture"] = architecture
    if inputs or outputs or tools or reranker:
        fields["capabilities"] = {
            "vision": "image" in inputs,
            "audio_transcriptions": "audio" in inputs and "text" in outputs,
            "audio_speech": "text" in inputs and "audio" in outputs,
            "image_generation": "text" in inputs and "image" in outputs,
            "image_to_image": "image" in inputs and "image" in outputs,
            "function_calling": tools,
            "reranker": reranker,
        }
    if tools:
        fields["supported_parameters"] = ["tools", "tool_choice"]
    if context > 0:
        fields["context_length"] = context
    return fields, max(context, 0)


#: Paths answered without an API key (GET/HEAD only), as in llama-swap.
OPEN_PATHS = frozenset({b"/health", b"/wol-health", b"/", b"/upstream", b"/favicon.ico"})


def _client_ip(request: Any) -> str | None:
    peer = request.getClientAddress()
    return getattr(peer, "host", None)


def _query_of(uri: bytes) -> bytes:
    _, sep, query = uri.partition(b"?")
    return query if sep else b""


def _json(request: Any, payload: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload, separators=(",", ":")).encode()


@dataclass(frozen=True)
class _Local:
    """A request for a local model: wait for it, then relay to ``target``."""

    model_id: str
    target: bytes
    #: the client asked for a streamed answer (decides the loading stream)
    streaming: bool = False

    @property
    def name(self) -> str:
        return self.model_id


@dataclass(frozen=True)
class _Remote:
    """A request for a peer's model, ready to send."""

    target: PeerTarget
    url: bytes
    headers: Headers

    @property
    def name(self) -> str:
        return self.target.fqn


class LlamaSwapApp:
    """Request handling for one configuration."""

    app = Klein()

    def __init__(
        self,
        config: Config,
        router: Router,
        client: UpstreamClient,
        recorder: ActivityRecorder | None = None,
        reactor: Any = None,
    ) -> None:
        self.config = config
        self.router = router
        self.client = client
        self.recorder = recorder
        self.api_keys = ApiKeys(config.api_keys)
        #: ``/logs*``, ``/api/events``, ``/api/inflight*`` (set by the service)
        self.streams: StreamsResource | None = None
        self.inflight: InflightTracker | None = None
        #: called with the new active profile name (set by the service)
        self.on_profile_changed: Callable[[str | None], None] | None = None
        self._reactor = reactor
        self._peer_clients: dict[str, UpstreamClient] = {}
        self._set_routing(config)

    def _set_routing(self, config: Config) -> None:
        """Peers, profiles and selectors of ``config`` (a reload starts with
        no profile active, as in llama-swap)."""
        self.peers = config.peers
        self.profiles = config.profiles
        self.profile_state = ProfileState(self.profiles.profiles)
        self.selectors = SelectorRuntime(self.profiles.selectors)
        self.ignore_paths = config.ignore_paths
        self.ignore_websockets = frozenset(
            model_id for model_id, model in config.models.items() if model.ignore_websockets
        )
        self.capabilities = {
            model_id: capability_fields(model.capabilities)
            for model_id, model in config.models.items()
        }
        if self._reactor is not None:
            for peer_id, peer in self.peers.peers.items():
                if peer_id not in self._peer_clients:
                    self._peer_clients[peer_id] = UpstreamClient(
                        self._reactor,
                        connect_timeout=peer.timeouts.connect or 30,
                        idle_timeout=peer.timeouts.idle_conn,
                    )

    def reconfigure(self, config: Config) -> None:
        """Serve ``config`` from the next request on."""
        self.config = config
        self.api_keys = ApiKeys(config.api_keys)
        self._set_routing(config)

    def close(self) -> defer.Deferred[None]:
        """Close the peers' pooled connections."""
        closing = [client.close() for client in self._peer_clients.values()]
        return defer.gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)

    def authorize(self, request: Any) -> bool:
        """Check the request's API key when keys are configured.

        Remembers which header carried the key, so it is not forwarded to
        local upstreams (SPEC decision 5)."""
        if not self.api_keys.enabled:
            return True
        if request.method in _GET and request.path in OPEN_PATHS:
            return True
        credential = find_credential(request.requestHeaders)
        index = None if credential is None else self.api_keys.match(credential.key)
        if index is None:
            return False
        request.llamaswap_credential_header = credential.source.header
        request.llamaswap_api_key_index = index
        return True

    def resource(self) -> Resource:
        return _Root(self)

    # -- model-dispatched requests -------------------------------------------

    def _state_of(self, model_id: str) -> str:
        process = self.router.processes.get(model_id)
        return process.state.value if process is not None else "stopped"

    def handle_inference(self, request: Any, upstream_path: bytes) -> object:
        body = request.content.read() if request.content is not None else b""
        query = _query_of(request.uri)
        ctype = request.getHeader(b"content-type") or b""
        extracted = extract_model(request.method, ctype, body, parse_qs(query) if query else {})
        if not extracted.model:
            return render_error(request, 404, "no model id could be identified")
        try:
            route = resolve_request(
                extracted.model,
                local=self.config.resolve,
                peers=self.peers,
                profile=self.profile_state,
                selectors=self.selectors,
                state_of=self._state_of,
            )
        except NoModelIdentified as exc:
            return render_error(request, 404, str(exc))
        except SelectorUnavailable as exc:
            return render_error(request, 503, str(exc))
        if route.reservation is not None:
            reservation = route.reservation
            request.notifyFinish().addBoth(lambda _: reservation.release())
        if route.requested != extracted.model:
            body, query = rewrite_request_model(body, ctype, request.method, query, route.requested)
        metadata = {"selector": route.selector} if route.selector else None
        if route.peer is not None:
            return self._to_peer(request, route.peer, upstream_path, body, query, metadata)
        model_id = route.model_id
        if model_id is None:
            return render_error(request, 404, "no local server found for requested model")
        model = self.config.models[model_id]
        lowered = ctype.lower()
        if b"application/json" in lowered:
            try:
                body = apply_filters(body, model.filters, route.requested, model.use_model_name)
            except ValueError as exc:
                return render_error(request, 500, str(exc))
        elif model.use_model_name and b"multipart/form-data" in lowered:
            body = replace_multipart_model(ctype, body, model.use_model_name)
        target = upstream_path + (b"?" + query if query else b"")
        recording = self._begin_recording(request, model_id, request.path, body, metadata)
        local = _Local(model_id, target, streaming=extracted.streaming)
        return self._dispatch(request, local, body, recording)

    def _to_peer(
        self,
        request: Any,
        target: PeerTarget,
        path: bytes,
        body: bytes,
        query: bytes,
        metadata: dict[str, str] | None = None,
        *,
        passthrough: bool = False,
    ) -> object:
        headers = forward_headers(request.requestHeaders, client_ip=None)
        ctype = request.getHeader(b"content-type") or b""
        try:
            headers, body, query = prepare_peer_request(
                target, headers, body, ctype, request.method, query, passthrough=passthrough
            )
        except ValueError as exc:
            return render_error(request, 500, str(exc))
        url = peer_url(target, path, query)
        recording = self._begin_recording(request, target.fqn, path, body, metadata)
        return self._dispatch(request, _Remote(target, url, headers), body, recording)

    def _begin_recording(
        self,
        request: Any,
        model_id: str,
        path: bytes,
        body: bytes,
        metadata: dict[str, str] | None = None,
    ) -> Recording | None:
        if self.recorder is None or request.method != b"POST":
            return None
        req_path = path.decode("utf-8", "replace")
        if req_path not in RECORDED_PATHS:
            return None
        return self.recorder.begin(
            model=model_id,
            req_path=req_path,
            req_headers=request.requestHeaders,
            req_body=body,
            api_key_index=getattr(request, "llamaswap_api_key_index", None),
            metadata=metadata,
        )

    def handle_upstream(self, request: Any) -> object:
        """``/upstream/<model>/<rest>``: raw passthrough to a model's server
        (local or peer), the longest matching model name winning."""
        raw_path = request.uri.partition(b"?")[0]
        query = _query_of(request.uri)
        rest = raw_path[len(b"/upstream/") :]
        pinned = rewrite_upstream_path(rest, self.profile_state)
        if pinned is not None:
            rest = pinned
        segments = rest.split(b"/")
        match: tuple[int, str | None, PeerTarget | None] | None = None
        for count in range(1, len(segments) + 1):
            name = unquote(b"/".join(segments[:count]).decode("utf-8", "replace"))
            if not name:
                continue
            model_id = self.config.resolve(name)
            peer = None if model_id is not None else self.peers.resolve(name)
            if model_id is not None or peer is not None:
                match = (count, model_id, peer)
        if match is None:
            return render_error(request, 404, "model not found")
        count, model_id, peer = match
        remaining = b"/" + b"/".join(segments[count:])
        if remaining == b"/" and not raw_path.endswith(b"/"):
            location = b"/upstream/" + b"/".join(segments[:count]) + b"/"
            if query:
                location += b"?" + query
            request.setResponseCode(301 if request.method in (b"GET", b"HEAD") else 308)
            request.setHeader(b"location", location)
            return b""
        body = request.content.read() if request.content is not None else b""
        if peer is not None:
            return self._to_peer(request, peer, remaining, body, query, passthrough=True)
        assert model_id is not None
        if self._state_of(model_id) != "ready" and self._ignored(remaining):
            return render_error(
                request,
                409,
                f"model {model_id} is not loaded; path matches upstream.ignorePaths",
            )
        target = remaining + (b"?" + query if query else b"")
        if is_upgrade(request.requestHeaders):
            return self._upgrade(request, model_id, target, body)
        recording = self._begin_recording(request, model_id, remaining, body)
        streaming = parse_qs(query).get(b"stream") == [b"true"] if query else False
        local = _Local(model_id, target, streaming=streaming)
        return self._dispatch(request, local, body, recording)

    def _ignored(self, path: bytes) -> bool:
        text = path.decode("utf-8", "replace")
        return any(pattern.search(text) for pattern in self.ignore_paths)

    def handle_comfyui(self, request: Any) -> object:
        """``/comfyui/...`` (llama-swap §3.7): the ``comfyui_auto`` model's UI;
        only ``/comfyui/`` itself may start it."""
        raw_path = request.uri.partition(b"?")[0]
        query = _query_of(request.uri)
        if raw_path == b"/comfyui":
            location = b"/comfyui/" + (b"?" + query if query else b"")
            request.setResponseCode(301 if request.method in (b"GET", b"HEAD") else 308)
            request.setHeader(b"location", location)
            return b""
        if COMFYUI_MODEL not in self.config.models:
            return render_error(request, 404, f"local model {COMFYUI_MODEL} not found")
        remaining = raw_path[len(b"/comfyui") :]
        if remaining != b"/" and self._state_of(COMFYUI_MODEL) != "ready":
            return render_error(
                request,
                409,
                f"model {COMFYUI_MODEL} is not loaded; only /comfyui/ can start it",
            )
        body = request.content.read() if request.content is not None else b""
        target = remaining + (b"?" + query if query else b"")
        if is_upgrade(request.requestHeaders):
            return self._upgrade(request, COMFYUI_MODEL, target, body)
        return self._dispatch(request, _Local(COMFYUI_MODEL, target), body)

    def _upgrade(self, request: Any, model_id: str, target: bytes, body: bytes) -> object:
        d = defer.Deferred.fromCoroutine(self._serve_upgrade(request, model_id, target, body))
        d.addErrback(lambda f: log.failure("websocket relay for {model} failed", f, model=model_id))
        return NOT_DONE_YET

    async def _serve_upgrade(self, request: Any, model_id: str, target: bytes, body: bytes) -> None:
        """A WebSocket upgrade: relayed byte for byte once the model is ready.

        With ``compat.ignoreWebsockets`` (always for ``comfyui_auto``) it
        neither starts the model nor counts as in flight (§6.10)."""
        carried = getattr(request, "llamaswap_credential_header", None)
        headers = request.requestHeaders.copy()
        if carried:
            headers.removeHeader(carried)
        client_ip = _client_ip(request)
        if client_ip:
            prior = headers.getRawHeaders(b"x-forwarded-for")
            chain = b", ".join([*(prior or []), client_ip.encode()])
            headers.setRawHeaders(b"x-forwarded-for", [chain])
        if model_id in self.ignore_websockets:
            if self._state_of(model_id) != "ready":
                write_error(
                    request,
                    409,
                    f"model {model_id} is not loaded; ignored websocket requests cannot start it",
                )
                return
            await self._splice(request, self.router.upstream_of(model_id), target, headers, body)
            return
        try:
            lease = await self.router.acquire(model_id)
        except TooManyRequests:
            write_too_many(request)
            return
        except (RequestFailed, ShuttingDown, UnknownModel) as exc:
            write_error(request, 500, f"unspecific error: {exc}")
            return
        try:
            await self._splice(request, lease.upstream, target, headers, body)
        finally:
            lease.release()

    async def _splice(
        self, request: Any, upstream: bytes, target: bytes, headers: Headers, body: bytes
    ) -> None:
        try:
            await relay_upgrade(request, self._reactor, upstream, target, headers, body)
        except ConnectError as exc:
            write_error(request, 502, f"upstream unavailable: {exc}")

    def _dispatch(
        self,
        request: Any,
        destination: _Local | _Remote,
        body: bytes,
        recording: Recording | None = None,
    ) -> object:
        entry = None
        if self.inflight is not None:
            entry = self.inflight.add(
                destination.name,
                request.path,
                request.method,
                request.requestHeaders,
                _client_ip(request),
            )
        d = defer.Deferred.fromCoroutine(self._serve(request, destination, body, recording, entry))
        if entry is not None:
            entry.set_canceller(d.cancel)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(self._serve_failed, request)
        return NOT_DONE_YET

    async def _serve(
        self,
        request: Any,
        destination: _Local | _Remote,
        body: bytes,
        recording: Recording | None,
        entry: InflightEntry | None,
    ) -> None:
        error = "client disconnected"
        hook = self._response_hook(recording, entry)
        try:
            if isinstance(destination, _Local):
                error = await self._serve_local(request, destination, body, hook)
            else:
                error = await self._serve_remote(request, destination, body, hook)
        finally:
            if recording is not None:
                recording.finish(status=request.code, error=error)
            if entry is not None and self.inflight is not None:
                self.inflight.remove(entry)

    def _response_hook(
        self, recording: Recording | None, entry: InflightEntry | None
    ) -> ResponseHook | None:
        """What sees the upstream response: the activity recording and the
        in-flight list (response headers, byte counts)."""
        inflight = self.inflight
        if entry is None or inflight is None:
            return recording.on_response if recording is not None else None

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
        self, request: Any, local: _Local, body: bytes, on_response: ResponseHook | None
    ) -> str:
        """Wait for the model and relay the request.  Returns the error text
        for the activity row when no upstream response arrived ("" if one did)."""
        try:
            # Admission comes first: a 429 is never preceded by a loading stream.
            ticket = self.router.admit(local.model_id)
        except TooManyRequests:
            write_too_many(request)
            return "Too many requests"
        except UnknownModel:
            message = "no local server found for requested model"
            write_error(request, 404, message)
            return message
        except ShuttingDown as exc:
            message = f"unspecific error: {exc}"
            write_error(request, 500, message)
            return message
        waiting = self.router.wait(ticket)
        loading: LoadingStream | None = None
        try:
            if not waiting.called:
                loading = self._loading_stream(request, local, ticket)
                if loading is not None:
                    loading.start()
            lease = await waiting
        except (RequestFailed, ShuttingDown) as exc:
            message = f"unspecific error: {exc}"
            if loading is not None:
                await loading.fail(message)
            else:
                write_error(request, 500, message)
            return message
        except BaseException:
            # Cancelled (client gone, /api/inflight cancel) or a bug: withdraw
            # the ticket if still waiting and silence the loading stream.
            if loading is not None:
                loading.stop()
            waiting.cancel()
            raise
        try:
            carried = getattr(request, "llamaswap_credential_header", None)
            headers = forward_headers(
                request.requestHeaders,
                client_ip=_client_ip(request),
                drop=(carried,) if carried else (),
            )
            target = request
            if loading is not None:
                await loading.finish()
                # The upstream body is appended to our event stream as is: it
                # must not be compressed, and its status/headers go nowhere.
                headers.removeHeader(b"accept-encoding")
                target = relay_body_only(request)
            return await self._relay(
                target,
                self.client,
                lease.upstream + local.target,
                headers,
                body,
                on_response,
                f"upstream {local.model_id} unavailable",
            )
        finally:
            lease.release()

    def _loading_stream(self, request: Any, local: _Local, ticket: Ticket) -> LoadingStream | None:
        """A loading stream for ``request`` when §7.1 asks for one."""
        if self._reactor is None:
            return None
        model = self.config.models.get(local.model_id)
        if model is None:
            return None
        enabled = (
            model.send_loading_state
            if model.send_loading_state is not None
            else self.config.send_loading_state
        )
        ready = self._state_of(local.model_id) == ProcessState.READY.value
        if not wants_loading_stream(local.streaming, enabled, local.target, ready):
            return None
        return LoadingStream(
            request,
            local.model_id,
            self._reactor,
            queue_position=lambda: self.router.queue_position_of(ticket),
        )

    async def _serve_remote(
        self, request: Any, remote: _Remote, body: bytes, on_response: ResponseHook | None
    ) -> str:
        client = self._peer_clients.get(remote.target.peer_id, self.client)
        return await self._relay(
            request, client, remote.url, remote.headers, body, on_response, "peer proxy error"
        )

    async def _relay(
        self,
        request: Any,
        client: UpstreamClient,
        url: bytes,
        headers: Headers,
        body: bytes,
        on_response: ResponseHook | None,
        failure_prefix: str,
    ) -> str:
        if on_response is not None and headers.hasHeader(b"accept-encoding"):
            wanted = b", ".join(headers.getRawHeaders(b"accept-encoding", []))
            headers.setRawHeaders(b"accept-encoding", [narrow_accept_encoding(wanted) or b""])
        try:
            await client.forward(request, url, headers=headers, body=body, on_response=on_response)
        except UpstreamUnavailable as exc:
            message = f"{failure_prefix}: {exc}"
            log.warn("{message}", message=message)
            write_error(request, 502, message)
            return message
        if not request.finished and not request._disconnected:
            request.finish()
        return ""

    def _serve_failed(self, failure: Failure, request: Any) -> None:
        if failure.check(defer.CancelledError):
            # Cancelled while the client is still there: POST /api/inflight/{id}/cancel.
            if not request.finished and not request._disconnected:
                if request.startedWriting:
                    request.loseConnection()  # the client sees a truncated response
                else:
                    write_error(request, 503, "request cancelled")
            return
        log.failure("error while serving {uri}", failure, uri=request.uri)
        write_error(request, 500, f"unspecific error: {failure.getErrorMessage()}")

    # -- Klein routes -----------------------------------------------------------

    @app.handle_errors(NotFound)
    def not_found(self, request: Any, failure: Failure) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"404 page not found\n"

    @app.handle_errors(MethodNotAllowed)
    def wrong_method(self, request: Any, failure: Failure) -> bytes:
        allowed = getattr(failure.value, "valid_methods", None) or []
        request.setResponseCode(405)
        request.setHeader(b"allow", ", ".join(allowed).encode())
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Method Not Allowed\n"

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"OK"

    @app.route("/wol-health", methods=["GET", "HEAD"])
    def wol_health(self, request: Any) -> bytes:
        return self.health(request)

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: Any) -> bytes:
        request.redirect(b"/ui/")
        return b""

    @app.route("/upstream", methods=["GET", "HEAD"])
    def upstream_index(self, request: Any) -> bytes:
        request.redirect(b"/ui/models")
        return b""

    @app.route("/v1/models", methods=["GET", "HEAD"])
    @app.route("/models", methods=["GET", "HEAD"])
    def list_models(self, request: Any) -> bytes:
        origin = request.getHeader(b"origin")
        if origin:
            request.setHeader(b"access-control-allow-origin", origin)
        return _json(request, {"object": "list", "data": self.model_records()})

    def model_records(self) -> list[dict[str, Any]]:
        created = int(time.time())
        records = []
        for model_id, model in self.config.models.items():
            if model.unlisted:
                continue
            record: dict[str, Any] = {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": "llama-swap",
            }
            if model.name.strip():
                record["name"] = model.name.strip()
            if model.description.strip():
                record["description"] = model.description.strip()
            internal: dict[str, Any] = {"type": "model"}
            if model.aliases:
                internal["aliases"] = list(model.aliases)
            user = dict(model.metadata)
            fields, n_ctx = self.capabilities.get(model_id, ({}, 0))
            if fields:
                for key in CAPABILITY_KEYS:
                    user.pop(key, None)
                record.update(fields)
            record["meta"] = {"llamaswap": {**user, **internal}}
            if n_ctx:
                record["meta"]["n_ctx"] = n_ctx
            state = self.router.processes[model_id].state
            loaded = state not in (ProcessState.STOPPED, ProcessState.SHUTDOWN)
            record["status"] = {"value": "loaded" if loaded else "unloaded"}
            records.append(record)
            if self.config.include_aliases_in_list:
                for alias in model.aliases:
                    if alias.strip():
                        alias_record = dict(record, id=alias)
                        alias_record["meta"] = {
                            "llamaswap": {
                                **dict(model.metadata),
                                "type": "alias",
                                "modelID": model_id,
                            }
                        }
                        records.append(alias_record)
        records += peer_model_records(self.peers, created)
        records += selector_model_records(self.profiles, self._state_of, created)
        records += profile_model_records(self.profiles, self.profile_state, created)
        records.sort(key=lambda r: r["id"])
        return records

    @app.route("/api/profiles", methods=["GET", "HEAD"])
    def list_profiles(self, request: Any) -> bytes:
        return _json(request, profiles_json(self.profiles, self.profile_state))

    @app.route("/api/profiles/active", methods=["PUT"])
    def activate_profile(self, request: Any) -> bytes:
        try:
            changed = self.profile_state.activate(parse_activate_body(request.content.read()))
        except ProfileRequestError as exc:
            return render_error(request, 400, str(exc))
        except UnknownProfile as exc:
            return render_error(request, 404, str(exc))
        if changed:
            log.info("active profile changed to {name!r}", name=self.profile_state.active or "")
            if self.on_profile_changed is not None:
                self.on_profile_changed(self.profile_state.active)
        return _json(request, {"active": self.profile_state.active})

    @app.route("/api/version", methods=["GET", "HEAD"])
    def version(self, request: Any) -> bytes:
        return _json(request, {"version": __version__, "commit": "", "build_date": ""})

    @app.route("/api/metrics/activity", methods=["GET", "HEAD"])
    async def activity(self, request: Any) -> bytes:
        try:
            query = parse_activity_query(request.args)
        except ValueError as exc:
            return render_error(request, 400, str(exc))
        if self.recorder is None:
            return _json(request, activity_page_json([], 0, query))
        rows, total = await self.recorder.store.select(query)
        return _json(request, activity_page_json(rows, total, query))

    @app.route("/api/metrics/stats", methods=["GET", "HEAD"])
    async def activity_stats(self, request: Any) -> bytes:
        model = request.args.get(b"model", [b""])[0].decode("utf-8", "replace") or None
        if self.recorder is None:
            return _json(request, {})
        return _json(request, (await self.recorder.store.stats(model)).to_json())

    @app.route("/api/metrics", methods=["GET", "HEAD"])
    async def recent_activity(self, request: Any) -> bytes:
        rows = await self.recorder.store.recent() if self.recorder is not None else []
        return _json(request, [row.to_json() for row in rows])

    @app.route("/metrics", methods=["GET", "HEAD"])
    def prometheus(self, request: Any) -> bytes:
        metrics = self.recorder.metrics if self.recorder is not None else None
        if metrics is None:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"# performance monitor not available\n"
        body, content_type = metrics.render()
        request.setHeader(b"content-type", content_type.encode())
        return body

    @app.route("/api/captures/<capture_id>", methods=["GET", "HEAD"])
    def capture(self, request: Any, capture_id: str) -> bytes:
        try:
            number = int(capture_id)
        except ValueError:
            return render_error(request, 400, "invalid capture ID")
        captures = self.recorder.captures if self.recorder is not None else None
        found = captures.get(number) if captures is not None else None
        if found is None:
            return render_error(request, 404, "capture not found")
        return _json(request, found)

    @app.route("/running", methods=["GET", "HEAD"])
    def running(self, request: Any) -> bytes:
        running = []
        for model_id, process in sorted(self.router.processes.items()):
            if process.state in (ProcessState.STOPPED, ProcessState.SHUTDOWN):
                continue
            model = self.config.models[model_id]
            running.append(
                {
                    "model": model_id,
                    "state": process.state.value,
                    "cmd": model.cmd,
                    "proxy": model.proxy,
                    "ttl": model.ttl,
                    "name": model.name,
                    "description": model.description,
                }
            )
        return _json(request, {"running": running})

    @app.route("/unload", methods=["GET", "HEAD"])
    async def unload_all_legacy(self, request: Any) -> bytes:
        await self.router.unload()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"OK"

    @app.route("/api/models/unload", methods=["POST"])
    async def unload_all(self, request: Any) -> bytes:
        await self.router.unload()
        return _json(request, {"msg": "ok"})

    @app.route("/api/models/unload/<path:name>", methods=["POST"])
    async def unload_one(self, request: Any, name: str) -> bytes:
        model_id = self.config.resolve(name)
        if model_id is None:
            return render_error(request, 404, "model not found")
        await self.router.unload([model_id])
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"OK"


class _Root(Resource):
    """Dispatches the hot paths directly and hands the rest to Klein."""

    isLeaf = True

    def __init__(self, app: LlamaSwapApp) -> None:
        super().__init__()
        self._app = app
        self._klein = app.app.resource()
        self._ui = UIResource()

    def render(self, request: Any) -> object:
        if request.method == b"OPTIONS":
            return preflight(request)
        path = request.path
        if path in (b"/ui", b"/favicon.ico") or path.startswith(b"/ui/"):
            # Static files only (no data): served without a key so the UI
            # can show its own login prompt; every API call it makes is
            # authenticated.
            return self._ui.render(request)
        if not self._app.authorize(request):
            return unauthorized(request)
        route = INFERENCE_ROUTES.get(path)
        if route is not None:
            upstream_path, methods = route
            if request.method not in methods:
                request.setResponseCode(405)
                request.setHeader(b"allow", b", ".join(sorted(methods)))
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"Method Not Allowed\n"
            return self._app.handle_inference(request, upstream_path)
        if path.startswith(b"/upstream/"):
            return self._app.handle_upstream(request)
        if path == b"/comfyui" or path.startswith(b"/comfyui/"):
            return self._app.handle_comfyui(request)
        streams = self._app.streams
        if streams is not None and streams.handles(path):
            return streams.render(request)
        return self._klein.render(request)
