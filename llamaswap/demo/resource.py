"""The demo's HTTP API as one leaf resource with a dispatch table, and the
site serving it (loading starts when the site listens)."""

from __future__ import annotations

import base64
import struct
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from llamaswap.demo.generation import Generation
from llamaswap.demo.model import (
    BUILD_INFO,
    CONTEXT_SIZE,
    EMBEDDING_SIZE,
    DemoModel,
    DemoSettings,
    dumps,
    pseudo_embedding,
)
from llamaswap.demo.web import (
    BadRequest,
    Handler,
    error_body,
    error_response,
    json_response,
    read_body,
    requested_model,
)

log = Logger()


class DemoResource(Resource):
    """The whole HTTP API as one leaf resource with a dispatch table."""

    isLeaf = True

    def __init__(self, model: DemoModel) -> None:
        super().__init__()
        self._model = model
        self._settings = model.settings
        self._clock = model.clock
        generation = Generation(model)

        created = int(self._clock.seconds())
        name = self._settings.model
        self._health_ok = dumps({"status": "ok"})
        self._loading = error_body(503, "Loading model")
        self._sleeping = error_body(503, "Model is sleeping")
        #: put to sleep by ``POST /sleep`` (vLLM's sleep mode): inference
        #: answers 503 until ``POST /wake_up``.
        self.asleep = False
        self._models_body = dumps(
            {
                "models": [
                    {"name": name, "model": name, "type": "model", "capabilities": ["completion"]}
                ],
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": created,
                        "owned_by": "llamacpp",
                        "meta": {"n_ctx_train": CONTEXT_SIZE, "n_embd": EMBEDDING_SIZE},
                    }
                ],
            }
        )
        self._props_body = dumps(
            {
                "default_generation_settings": {
                    "n_ctx": CONTEXT_SIZE,
                    "params": {"n_predict": self._settings.max_tokens_default},
                },
                "total_slots": 1,
                "model_alias": name,
                "model_path": name,
                "build_info": BUILD_INFO,
            }
        )

        chat: dict[bytes, Handler] = {b"POST": generation.chat}
        completions: dict[bytes, Handler] = {b"POST": generation.completions}
        embeddings: dict[bytes, Handler] = {b"POST": self._embeddings}
        health: dict[bytes, Handler] = {b"GET": self._health}
        models: dict[bytes, Handler] = {b"GET": self._models}
        self._routes: dict[bytes, dict[bytes, Handler]] = {
            b"/health": health,
            b"/v1/health": health,
            b"/v1/models": models,
            b"/models": models,
            b"/props": {b"GET": self._props},
            b"/v1/chat/completions": chat,
            b"/chat/completions": chat,
            b"/v1/completions": completions,
            b"/completions": completions,
            b"/completion": {b"POST": generation.native_completion},
            b"/v1/embeddings": embeddings,
            b"/embeddings": embeddings,
            b"/sleep": {b"POST": self._sleep},
            b"/wake_up": {b"POST": self._wake_up},
            b"/is_sleeping": {b"GET": self._is_sleeping},
        }
        # Like llama-server, these answer while the model is still loading.
        self._while_loading = {b"/health", b"/v1/health", b"/v1/models", b"/models"}
        #: these answer while asleep
        self._while_asleep = {*self._while_loading, b"/sleep", b"/wake_up", b"/is_sleeping"}

    # -- dispatch ----------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"server", b"llama.cpp")
        path = request.path
        routes = self._routes.get(path)
        if routes is None:
            return error_response(request, 404, "File Not Found")
        method = b"GET" if request.method == b"HEAD" else request.method
        handler = routes.get(method)
        if handler is None:
            request.setHeader(b"allow", b", ".join(routes))
            return error_response(request, 405, "Method Not Allowed")
        if not self._model.loaded and path not in self._while_loading:
            return json_response(request, 503, self._loading)
        if self.asleep and path not in self._while_asleep:
            return json_response(request, 503, self._sleeping)
        try:
            return handler(request)
        except BadRequest as error:
            return error_response(request, 400, str(error))

    # -- simple endpoints ----------------------------------------------------

    def _health(self, request: Request) -> bytes:
        if self._model.loaded:
            return json_response(request, 200, self._health_ok)
        return json_response(request, 503, self._loading)

    def _models(self, request: Request) -> bytes:
        return json_response(request, 200, self._models_body)

    def _sleep(self, request: Request) -> bytes:
        self.asleep = True
        args: dict[bytes, list[bytes]] = request.args or {}
        log.info("sleeping (level {depth})", depth=args.get(b"level", [b"1"])[0].decode())
        return json_response(request, 200, dumps({"status": "ok"}))

    def _wake_up(self, request: Request) -> bytes:
        self.asleep = False
        log.info("awake")
        return json_response(request, 200, dumps({"status": "ok"}))

    def _is_sleeping(self, request: Request) -> bytes:
        return json_response(request, 200, dumps({"is_sleeping": self.asleep}))

    def _props(self, request: Request) -> bytes:
        return json_response(request, 200, self._props_body)

    # -- embeddings ----------------------------------------------------------

    def _embeddings(self, request: Request) -> bytes:
        body = read_body(request)
        source = body.get("input", body.get("content"))
        if source is None:
            raise BadRequest('"input" or "content" must be provided')
        if isinstance(source, str) or (
            isinstance(source, list) and source and all(isinstance(t, int) for t in source)
        ):
            items: list[object] = [source]
        elif isinstance(source, list) and source:
            items = list(source)
        else:
            raise BadRequest('"input" must be a string or a non-empty array')
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadRequest('"encoding_format" must be "float" or "base64"')

        data: list[dict[str, Any]] = []
        prompt_tokens = 0
        for index, item in enumerate(items):
            if isinstance(item, str):
                if not item:
                    raise BadRequest("Input content cannot be empty")
                prompt_tokens += max(1, len(item.split()))
            elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
                prompt_tokens += len(item)
            else:
                raise BadRequest('each "input" item must be a non-empty string or token array')
            vector = pseudo_embedding(item)
            embedding: list[float] | str
            if encoding == "base64":
                packed = struct.pack(f"<{len(vector)}f", *vector)
                embedding = base64.b64encode(packed).decode("ascii")
            else:
                embedding = vector
            data.append({"embedding": embedding, "index": index, "object": "embedding"})
        payload = {
            "model": requested_model(body, self._settings.model),
            "object": "list",
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            "data": data,
        }
        return json_response(request, 200, dumps(payload))


class DemoSite(Site):
    """The demo's HTTP site: loading starts when it starts listening.

    It logs one line per finished request, like llama-server.
    """

    noisy = False

    def __init__(self, model: DemoModel) -> None:
        super().__init__(DemoResource(model))
        self.model = model

    def startFactory(self) -> None:
        super().startFactory()
        self.model.start_loading()

    def stopFactory(self) -> None:
        self.model.stop_loading()
        super().stopFactory()

    def log(self, request: Request) -> None:  # type: ignore[override]
        client = request.getClientAddress()
        log.info(
            "request: {method} {path} {client} {code}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
            client=getattr(client, "host", "-"),
            code=request.code,
        )


def make_site(settings: DemoSettings, clock: IReactorTime) -> DemoSite:
    """Build the demo site; the model starts loading when the site listens."""
    return DemoSite(DemoModel(settings, clock))
