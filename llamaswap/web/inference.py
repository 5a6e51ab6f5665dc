"""Requests addressed to a model: which model (local or a peer's) serves them.

Three entry points, each ending in :class:`RequestServer` (or the WebSocket
relay) with a destination:

* the model-dispatched inference paths (``/v1/chat/completions``...): the
  model named in the body or query, resolved through the active profile,
  selectors, local ids and aliases and the peers; filters and
  ``useModelName`` applied to the body;
* ``/upstream/<model>/<path>``: a raw passthrough, the longest model name
  prefix winning;
* ``/comfyui/...``: the ``comfyui_auto`` model's own UI.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, unquote

from llamaswap.config.entries import COMFYUI_MODEL_ID as COMFYUI_MODEL
from llamaswap.config.peers import PeerTarget
from llamaswap.supervision.selection import (
    NoModelIdentified,
    Route,
    SelectorUnavailable,
    resolve_request,
    rewrite_upstream_path,
)
from llamaswap.upstream.client import forward_headers
from llamaswap.upstream.extract import extract_model, replace_multipart_model
from llamaswap.upstream.filters import apply_filters
from llamaswap.upstream.peers import (
    peer_url,
    prepare_peer_request,
    rewrite_request_model,
)
from llamaswap.upstream.websocket import is_upgrade
from llamaswap.web.auth import carried_headers
from llamaswap.web.early import EarlyHead, EarlySend
from llamaswap.web.errors import render_error
from llamaswap.web.paths import (
    BadPath,
    hides_dot_segment,
    is_dot_segment,
    resolve_dot_segments,
)
from llamaswap.web.requestinfo import query_of
from llamaswap.web.routing import Routing
from llamaswap.web.serving import LocalModel, PeerModel, RequestServer
from llamaswap.web.websockets import WebSocketRelay


def unknown_model(name: str) -> str:
    """The 404 message for a model name nothing serves (llama-swap's words
    first, then the name and where the names are)."""
    return (
        f"no local server found for requested model {json.dumps(name)}; "
        "GET /v1/models lists the available models"
    )


def _redirect(request: Any, location: bytes) -> bytes:
    """Add the missing slash: 301 for GET/HEAD, 308 (method kept) otherwise."""
    request.setResponseCode(301 if request.method in (b"GET", b"HEAD") else 308)
    request.setHeader(b"location", location)
    return b""


class ModelRequests:
    """Finds the destination of a request addressed to a model."""

    def __init__(
        self, routing: Routing, serving: RequestServer, websockets: WebSocketRelay
    ) -> None:
        self._routing = routing
        self._serving = serving
        self._websockets = websockets

    def inference(self, request: Any, upstream_path: bytes) -> object:
        """A model-dispatched path, sent upstream as ``upstream_path``."""
        state = self._routing.state
        body = request.content.read() if request.content is not None else b""
        query = query_of(request.uri)
        ctype = request.getHeader(b"content-type") or b""
        extracted = extract_model(request.method, ctype, body, parse_qs(query) if query else {})
        if extracted.malformed:
            return render_error(request, 400, extracted.missing)
        if not extracted.model:
            return render_error(request, 404, extracted.missing)
        try:
            route = self._resolve(extracted.model)
        except NoModelIdentified:
            return render_error(
                request,
                404,
                f"model {json.dumps(extracted.model)} is disabled by the active profile",
            )
        except SelectorUnavailable as exc:
            return render_error(request, 503, str(exc))
        if route.reservation is not None:
            reservation = route.reservation
            request.notifyFinish().addBoth(lambda _: reservation.release())
        if route.requested != extracted.model:
            body, query = rewrite_request_model(body, ctype, request.method, query, route.requested)
        metadata = {"selector": route.selector} if route.selector else None
        pinned = route.peer is not None and route.peer.fqn == route.requested
        replicas = [] if pinned else state.peers.replicas(route.requested)
        if replicas:
            return self._to_replicas(
                request, route.requested, route.model_id, replicas, upstream_path, body, query,
                extracted.streaming, metadata,
            )  # fmt: skip
        if route.peer is not None:
            if not self._routing.health.available(route.peer.peer_id):
                return self._peer_down(request, route.requested, [route.peer.peer_id])
            return self._to_peer(request, route.peer, upstream_path, body, query, metadata)
        model_id = route.model_id
        if model_id is None:
            return render_error(request, 404, unknown_model(extracted.model))
        local = self._local(
            request, model_id, route.requested, upstream_path, body, query, extracted.streaming
        )
        if isinstance(local, bytes):
            return local
        return self._serving.serve(request, local, local.body or b"", request.path, metadata)

    def _resolve(self, name: str) -> Route:
        """Where a request for model ``name`` goes (see `resolve_request`)."""
        state = self._routing.state
        return resolve_request(
            name,
            local=state.config.resolve,
            peers=state.peers,
            profile=state.profile_state,
            selectors=state.selectors,
            state_of=self._routing.state_of,
        )

    def early(self, head: EarlyHead, upstream_path: bytes, body: bytes) -> EarlySend | None:
        """The early path's route (see :mod:`llamaswap.web.early`) for a POST
        of JSON ``body`` to a model-dispatched path without a query: what
        :meth:`inference` decides, when that is a local model reached by the
        name as sent (no profile pin, selector or replica, filters applied
        without error); ``None``, with nothing done, for anything else."""
        ctype = head.getHeader(b"content-type") or b""
        if b"application/json" not in ctype.lower():
            return None
        extracted = extract_model(b"POST", ctype, body, {})
        state = self._routing.state
        if extracted.malformed or not extracted.model or extracted.model in state.selectors:
            return None
        try:
            route = self._resolve(extracted.model)
        except (NoModelIdentified, SelectorUnavailable):
            return None
        model_id = route.model_id
        if model_id is None or route.requested != extracted.model or route.reservation is not None:
            return None
        if state.peers.replicas(route.requested):
            return None
        model = state.config.models[model_id]
        try:
            body = apply_filters(body, model.filters, route.requested, model.use_model_name)
        except ValueError:
            return None
        local = LocalModel(model_id, upstream_path, streaming=extracted.streaming, body=body)
        return self._serving.send_early(head, local)

    def take_early(self, request: Any, early: EarlySend) -> object:
        """Serve ``request``, which the early path began (`early`)."""
        local = early.take(request).local
        return self._serving.serve(request, local, local.body or b"", request.path, early=early)

    def _local(
        self,
        request: Any,
        model_id: str,
        requested: str,
        upstream_path: bytes,
        body: bytes,
        query: bytes,
        streaming: bool,
    ) -> LocalModel | bytes:
        """A local destination with its body (filters, ``useModelName``
        applied), or the body of an error already set on ``request``."""
        model = self._routing.state.config.models[model_id]
        ctype = request.getHeader(b"content-type") or b""
        lowered = ctype.lower()
        if b"application/json" in lowered:
            try:
                body = apply_filters(body, model.filters, requested, model.use_model_name)
            except ValueError as exc:
                return render_error(request, 500, str(exc))
        elif model.use_model_name and b"multipart/form-data" in lowered:
            body = replace_multipart_model(ctype, body, model.use_model_name)
        target = upstream_path + (b"?" + query if query else b"")
        return LocalModel(model_id, target, streaming=streaming, body=body)

    def _peer_down(self, request: Any, name: str, peer_ids: list[str]) -> bytes:
        """503 at once for a request only down peers could serve, with
        ``Retry-After`` until the next probe of the first to be probed."""
        health = self._routing.health
        retry = min(health.retry_after(p) for p in peer_ids)
        request.setHeader(b"retry-after", b"%d" % retry)
        down = ", ".join(
            f"{p} ({status.error})" if (status := health.status(p)) and status.error else p
            for p in peer_ids
        )
        return render_error(
            request, 503, f"model {json.dumps(name)} is unavailable: peer down: {down}"
        )

    def _to_replicas(
        self,
        request: Any,
        name: str,
        model_id: str | None,
        replicas: list[PeerTarget],
        upstream_path: bytes,
        body: bytes,
        query: bytes,
        streaming: bool,
        metadata: dict[str, str] | None,
    ) -> object:
        """A model several nodes serve (issue 15): the healthy ones in order
        (loaded first, then fewest in flight, then local before peers in
        configured order); the first one is tried, the others take over if
        it cannot be connected to."""
        health = self._routing.health
        ranked: list[tuple[tuple[int, int, int], str | PeerTarget]] = []
        if model_id is not None:
            loaded = self._routing.state_of(model_id) == "ready"
            ranked.append(((0 if loaded else 1, self._routing.in_flight(model_id), 0), model_id))
        for index, peer in enumerate(replicas, start=1):
            if not health.available(peer.peer_id):
                continue
            loaded = health.loaded(peer.peer_id, peer.model)
            ranked.append(((0 if loaded else 1, health.in_flight(peer.peer_id), index), peer))
        if not ranked:
            return self._peer_down(request, name, [p.peer_id for p in replicas])
        ranked.sort(key=lambda item: item[0])
        chain: list[LocalModel | PeerModel] = []
        for _, choice in ranked:
            if isinstance(choice, str):
                local = self._local(request, choice, name, upstream_path, body, query, streaming)
                if isinstance(local, bytes):
                    return local
                chain.append(local)
            else:
                prepared = self._peer_destination(request, choice, upstream_path, body, query)
                if isinstance(prepared, bytes):
                    return prepared
                chain.append(prepared)
        first = chain[0]
        return self._serving.serve(
            request, first, first.body or b"", request.path, metadata, alternatives=chain[1:]
        )

    def _peer_destination(
        self,
        request: Any,
        target: PeerTarget,
        path: bytes,
        body: bytes,
        query: bytes,
        *,
        passthrough: bool = False,
    ) -> PeerModel | bytes:
        """A prepared peer request, or the body of an error set on ``request``."""
        # A peer gets its own apiKey or the client's other headers, never ours.
        headers = forward_headers(
            request.requestHeaders, client_ip=None, drop=carried_headers(request)
        )
        ctype = request.getHeader(b"content-type") or b""
        try:
            headers, body, query = prepare_peer_request(
                target, headers, body, ctype, request.method, query, passthrough=passthrough
            )
        except ValueError as exc:
            return render_error(request, 500, str(exc))
        return PeerModel(target, peer_url(target, path, query), headers, body=body)

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
        prepared = self._peer_destination(
            request, target, path, body, query, passthrough=passthrough
        )
        if isinstance(prepared, bytes):
            return prepared
        return self._serving.serve(request, prepared, prepared.body or b"", path, metadata)

    def upstream(self, request: Any) -> object:
        """``/upstream/<model>/<rest>``: raw passthrough to a model's server
        (local or peer), the longest matching model name winning."""
        state = self._routing.state
        raw_path = request.uri.partition(b"?")[0]
        query = query_of(request.uri)
        rest = raw_path[len(b"/upstream/") :]
        pinned = rewrite_upstream_path(rest, state.profile_state)
        if pinned is not None:
            rest = pinned
        segments = rest.split(b"/")
        # A model name never holds a dot segment: names end before the first.
        named = next(
            (i for i, seg in enumerate(segments) if is_dot_segment(seg) or hides_dot_segment(seg)),
            len(segments),
        )
        if named == 0:
            return render_error(request, 400, "invalid path: a dot segment in the model name")
        match: tuple[int, str | None, PeerTarget | None] | None = None
        for count in range(1, named + 1):
            name = unquote(b"/".join(segments[:count]).decode("utf-8", "replace"))
            if not name:
                continue
            model_id = state.config.resolve(name)
            peer = None if model_id is not None else state.peers.resolve(name)
            if model_id is not None or peer is not None:
                match = (count, model_id, peer)
        if match is None:
            shown = json.dumps(raw_path.decode("latin-1"))
            return render_error(
                request,
                404,
                f"model not found: no model name starts the path {shown}; "
                "GET /v1/models lists the available models",
            )
        count, model_id, peer = match
        root = b"/upstream/" + b"/".join(segments[:count]) + b"/"
        try:
            below = resolve_dot_segments(segments[count:], root.decode("latin-1"))
        except BadPath as exc:
            return render_error(request, 400, str(exc))
        remaining = b"/" + b"/".join(below)
        if remaining == b"/" and not raw_path.endswith(b"/"):
            location = b"/upstream/" + b"/".join(segments[:count]) + b"/"
            return _redirect(request, location + (b"?" + query if query else b""))
        body = request.content.read() if request.content is not None else b""
        if peer is not None:
            if not self._routing.health.available(peer.peer_id):
                return self._peer_down(request, peer.fqn, [peer.peer_id])
            return self._to_peer(request, peer, remaining, body, query, passthrough=True)
        assert model_id is not None
        if self._routing.state_of(model_id) != "ready" and state.ignored(remaining):
            return render_error(
                request,
                409,
                f"model {model_id} is not loaded; path matches upstream.ignorePaths",
            )
        target = remaining + (b"?" + query if query else b"")
        if is_upgrade(request.requestHeaders):
            return self._websockets.upgrade(request, model_id, target, body)
        streaming = parse_qs(query).get(b"stream") == [b"true"] if query else False
        local = LocalModel(model_id, target, streaming=streaming)
        return self._serving.serve(request, local, body, remaining)

    def comfyui(self, request: Any) -> object:
        """``/comfyui/...``: the ``comfyui_auto`` model's UI, as in llama-swap:
        only ``/comfyui/`` itself may start the model."""
        raw_path = request.uri.partition(b"?")[0]
        query = query_of(request.uri)
        if raw_path == b"/comfyui":
            return _redirect(request, b"/comfyui/" + (b"?" + query if query else b""))
        if COMFYUI_MODEL not in self._routing.state.config.models:
            return render_error(request, 404, f"local model {COMFYUI_MODEL} not found")
        try:
            below = resolve_dot_segments(raw_path[len(b"/comfyui/") :].split(b"/"), "/comfyui/")
        except BadPath as exc:
            return render_error(request, 400, str(exc))
        remaining = b"/" + b"/".join(below)
        if remaining != b"/" and self._routing.state_of(COMFYUI_MODEL) != "ready":
            return render_error(
                request,
                409,
                f"model {COMFYUI_MODEL} is not loaded; only /comfyui/ can start it",
            )
        body = request.content.read() if request.content is not None else b""
        target = remaining + (b"?" + query if query else b"")
        if is_upgrade(request.requestHeaders):
            return self._websockets.upgrade(request, COMFYUI_MODEL, target, body)
        return self._serving.serve(request, LocalModel(COMFYUI_MODEL, target), body)
