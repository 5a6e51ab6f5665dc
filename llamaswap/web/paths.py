"""The model-dispatched paths (llama-swap §3.2), built once at import.

``INFERENCE_ROUTES`` maps a request path to the path sent upstream and the
methods allowed; ``RECORDED_PATHS`` are the ones whose POSTs become activity
rows (§8.1).  :func:`resolve_dot_segments` keeps the paths passed through to
a model's own server (``/upstream/<model>/...``) inside that model's path.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

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


# --- dot segments (RFC 3986 section 5.2.4) in the paths passed to a model ---


class BadPath(ValueError):
    """A request path that must not reach an upstream (400 with this message)."""


def is_dot_segment(segment: bytes) -> bool:
    """``.`` or ``..``, plain or percent-encoded (``%2e``, ``%2E``)."""
    return segment.lower().replace(b"%2e", b".") in (b".", b"..")


def hides_dot_segment(segment: bytes) -> bool:
    """A segment that is no dot segment itself but becomes one for a server
    that decodes ``%2F`` (or ``\\``) before it resolves dot segments:
    ``..%2Fsecret``."""
    if is_dot_segment(segment) or (b"%" not in segment and b"\\" not in segment):
        return False
    pieces = unquote_to_bytes(segment).replace(b"\\", b"/").split(b"/")
    return any(piece in (b".", b"..") for piece in pieces)


def resolve_dot_segments(segments: list[bytes], root: str) -> list[bytes]:
    """``segments`` (a path below ``root``, split at ``/``) with RFC 3986's
    dot segments removed: ``.`` is dropped, ``..`` drops the segment before
    it, a path ending in either keeps its final slash.  A ``..`` that would
    climb above ``root``, or a segment hiding a dot segment, raises
    :class:`BadPath`."""
    out: list[bytes] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if is_dot_segment(segment):
            if segment.lower().replace(b"%2e", b".") == b"..":
                if not out:
                    raise BadPath(f"invalid path: '..' climbs above {root}")
                out.pop()
            if index == last:
                out.append(b"")
            continue
        if hides_dot_segment(segment):
            raise BadPath("invalid path: a segment hides '..' or '.' behind an encoded slash")
        out.append(segment)
    return out
