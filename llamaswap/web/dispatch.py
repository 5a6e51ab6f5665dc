"""The one place that decides which part of llamaswap answers a request.

In order: the ``Host`` check against DNS rebinding (every request, see
:mod:`~llamaswap.web.guard`), CORS preflight (any ``OPTIONS``, before
authentication), the UI's static files (no key needed, so the UI can show
its own login prompt; every API call it makes is authenticated),
authentication, the model-dispatched inference paths (the hot path: one dict
lookup, no Klein routing), the cross-site check of state-changing management
calls, ``/upstream/...``, ``/comfyui...``, the log/event/in-flight streams,
and finally the Klein admin API for everything else.  The dispatcher only
chooses; each part does its own work.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.web.resource import IResource, Resource

from llamaswap.web.auth import unauthorized
from llamaswap.web.cors import preflight
from llamaswap.web.early import EarlyHead, EarlySend, plain_body
from llamaswap.web.errors import method_not_allowed, render_error
from llamaswap.web.guard import BrowserGuard, changes_state
from llamaswap.web.inference import ModelRequests
from llamaswap.web.paths import INFERENCE_ROUTES
from llamaswap.web.routing import Routing
from llamaswap.web.streams import StreamsResource


class Dispatcher(Resource):
    """llamaswap's root resource (a leaf: it reads ``request.path`` itself)."""

    isLeaf = True

    def __init__(
        self,
        routing: Routing,
        models: ModelRequests,
        streams: StreamsResource,
        ui: IResource,
        admin: IResource,
        guard: BrowserGuard,
    ) -> None:
        super().__init__()
        self._routing = routing
        self._models = models
        self._streams = streams
        self._ui = ui
        self._admin = admin
        self._guard = guard

    def render(self, request: Any) -> object:
        early = getattr(request, "early_start", None)
        if early is not None:
            return self._models.take_early(request, early)
        refused = self._guard.refuse_host(request, self._routing.state.config)
        if refused is not None:
            return refused
        if request.method == b"OPTIONS":
            return preflight(request)
        path = request.path
        if path in (b"/ui", b"/favicon.ico") or path.startswith(b"/ui/"):
            return self._ui.render(request)
        if not self._routing.state.api_keys.authorize(request):
            return unauthorized(request)
        route = INFERENCE_ROUTES.get(path)
        if route is not None:
            upstream_path, methods = route
            if request.method not in methods:
                return method_not_allowed(request, sorted(methods))
            return self._models.inference(request, upstream_path)
        if changes_state(request.method, path):
            refused = self._guard.refuse_cross_site(request, self._routing.state.config)
            if refused is not None:
                return refused
        if path.startswith(b"/upstream/"):
            return self._models.upstream(request)
        if path == b"/comfyui" or path.startswith(b"/comfyui/"):
            return self._models.comfyui(request)
        if self._streams.handles(path):
            return self._streams.render(request)
        if not _utf8(path):
            # Klein would answer this with a bare text/html 400.
            return render_error(request, 400, "the request path is not UTF-8 once percent-decoded")
        return self._admin.render(request)

    def early_start(
        self, channel: Any, method: bytes, target: bytes, version: bytes, headers: Any, rest: bytes
    ) -> EarlySend | None:
        """The early path (:mod:`llamaswap.web.early`) for a request head that
        arrived whole, with ``rest`` of the data after it: the same checks as
        :meth:`render` for a model-dispatched path, then the route."""
        if method != b"POST" or version != b"HTTP/1.1":
            return None
        route = INFERENCE_ROUTES.get(target)
        if route is None or method not in route[1]:
            return None
        limit = getattr(getattr(channel, "site", None), "max_request_body_size", None)
        if limit is None or not plain_body(headers, rest, limit):
            return None
        state = self._routing.state
        if self._guard.refused_host(headers, state.config) is not None:
            return None
        head = EarlyHead(method, target, headers, channel.getPeer())
        if not state.api_keys.authorize(head):
            return None
        return self._models.early(head, route[0], rest)


def _utf8(path: bytes) -> bool:
    try:
        unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
