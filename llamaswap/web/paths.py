"""The model-dispatched paths (llama-swap §3.2), built once at import.

``INFERENCE_ROUTES`` maps a request path to the path sent upstream and the
methods allowed; ``RECORDED_PATHS`` are the ones whose POSTs become activity
rows (§8.1).
"""

from __future__ import annotations

_POST = frozenset({b"POST"})
_GET = frozenset({b"GET", b"HEAD"})
_BOTH = _GET | _POST

_JSON_POSTS = (
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/embeddings",
    "/reranking",
    "/rerank",
    "/v1/rerank",
    "/v1/reranking",
    "/infill",
    "/completion",
    "/v1/audio/speech",
    "/v1/images/generations",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
    "/v1/audio/transcriptions",
    "/v1/images/edits",
)
_VERSIONLESS = (
    "chat/completions",
    "responses",
    "completions",
    "messages",
    "messages/count_tokens",
    "embeddings",
    "rerank",
    "reranking",
)


def _routes() -> dict[bytes, tuple[bytes, frozenset[bytes]]]:
    routes: dict[bytes, tuple[bytes, frozenset[bytes]]] = {}
    for path in _JSON_POSTS:
        routes[path.encode()] = (path.encode(), _POST)
    for path in _VERSIONLESS:
        routes[f"/v/{path}".encode()] = (f"/{path}".encode(), _POST)
    routes[b"/v1/audio/voices"] = (b"/v1/audio/voices", _BOTH)
    routes[b"/sdapi/v1/loras"] = (b"/sdapi/v1/loras", _GET)
    routes[b"/props"] = (b"/props", _GET)
    routes[b"/audioapi/v1/tasks/run"] = (b"/v1/tasks/run", _POST)
    return routes


#: request path -> (path sent upstream, allowed methods)
INFERENCE_ROUTES = _routes()

#: POST paths recorded in the activity log: every model-dispatched path.
RECORDED_PATHS = frozenset(
    path.decode() for path, (_, methods) in INFERENCE_ROUTES.items() if b"POST" in methods
)
