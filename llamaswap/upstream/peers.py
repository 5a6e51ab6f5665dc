"""Sending a request to a remote peer (llama-swap §4.7 in docs/design.md).

The peers themselves are configuration (:mod:`llamaswap.config.peers`,
``Config.peers``).  A request for a peer model is rewritten by
:func:`prepare_peer_request`: the bare model name replaces whatever name the
client used, the peer's JSON filters are applied, its ``apiKey`` replaces the
client's credentials and ``Host`` names the peer.  The caller then sends it
with ``UpstreamClient.forward`` to :func:`peer_url`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from twisted.web.http_headers import Headers

from llamaswap.config.peers import Peers, PeerTarget, fqn
from llamaswap.upstream.extract import (
    extract_model,
    multipart_fields,
    replace_form_model,
    replace_json_model,
    replace_multipart_model,
)
from llamaswap.upstream.filters import apply_filters

if TYPE_CHECKING:
    from llamaswap.upstream.peerhealth import PeerHealth

__all__ = [
    "join_url",
    "peer_model_records",
    "peer_url",
    "prepare_peer_request",
    "rewrite_request_model",
]

#: headers Go's reverse proxy drops in Rewrite mode; peers never see them.
_DROPPED_TOWARDS_PEER = (b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto")


def _is_get(method: bytes) -> bool:
    return method in (b"GET", b"HEAD")


def _query_has_model(query: bytes) -> bool:
    return any(pair.split(b"=", 1)[0] == b"model" for pair in query.split(b"&") if pair)


def rewrite_request_model(
    body: bytes, content_type: bytes, method: bytes, query: bytes, model: str
) -> tuple[bytes, bytes]:
    """``(body, query)`` with the requested model set to ``model`` wherever the
    request encodes it (§4.5): the query for GET/HEAD, the JSON ``model``
    member (in place), the multipart ``model`` field, or an urlencoded field;
    a POST whose model came from the query gets it replaced there."""
    if _is_get(method):
        return body, replace_form_model(query, model) if _query_has_model(query) else query
    ctype = content_type.lower()
    if b"application/json" in ctype:
        return replace_json_model(body, model), query
    if b"multipart/form-data" in ctype:
        if b"model" in multipart_fields(content_type, body, (b"model",)):
            return replace_multipart_model(content_type, body, model), query
    elif body and b"model" in parse_qs(body, keep_blank_values=True):
        return replace_form_model(body, model), query
    if _query_has_model(query):
        return body, replace_form_model(query, model)
    return body, query


def prepare_peer_request(
    target: PeerTarget,
    headers: Headers,
    body: bytes,
    content_type: bytes,
    method: bytes,
    query: bytes,
    *,
    passthrough: bool = False,
) -> tuple[Headers, bytes, bytes]:
    """The headers, body and query to send to ``target``'s peer.

    ``headers`` are those meant for the upstream (``forward_headers``); a
    copy is returned.  When the request names the model by anything other
    than the peer's own name (an FQN, a pin, a selector), that name is
    replaced by the bare one; with ``passthrough`` only a body naming the
    requested name or the FQN is rewritten.
    JSON bodies get the peer's filters (``setParamsByID`` keyed by the name
    the client asked for) unless ``passthrough`` (``/upstream``).  A peer
    ``apiKey`` overwrites ``Authorization`` and ``x-api-key``; ``Host`` names
    the peer.  Raises ``ValueError`` when a filter cannot be applied (500)."""
    if not passthrough and b"application/json" in content_type.lower():
        body = apply_filters(body, target.filters, target.requested)
    current = extract_model(method, content_type, body, parse_qs(query) if query else {}).model
    if current and current != target.model:
        # A model-dispatched request is routed by its model, whatever name it
        # still carries (an FQN, or a pin or selector name not yet rewritten);
        # on /upstream the body is the client's own business unless it names
        # the model the path named.
        if not passthrough or current in (target.requested, target.fqn):
            body, query = rewrite_request_model(body, content_type, method, query, target.model)
    out = headers.copy()
    for name in (b"content-length", b"transfer-encoding", *_DROPPED_TOWARDS_PEER):
        out.removeHeader(name)
    if target.api_key:
        key = target.api_key.encode("utf-8")
        out.setRawHeaders(b"authorization", [b"Bearer " + key])
        out.setRawHeaders(b"x-api-key", [key])
    out.setRawHeaders(b"host", [_host(target.url_base).encode("idna")])
    return out, body, query


def _host(url: str) -> str:
    """``host[:port]`` of ``url``, without any userinfo."""
    return urlsplit(url).netloc.rpartition("@")[2]


def peer_url(target: PeerTarget, path: bytes, query: bytes = b"") -> bytes:
    """The peer URL for a request ``path`` (and raw ``query``): the path is
    appended to the base URL's path with one slash between, queries merged."""
    return join_url(target.url_base, path, query)


def join_url(url_base: str, path: bytes, query: bytes = b"") -> bytes:
    """``path`` (and ``query``) under the base URL ``url_base``, as :func:`peer_url`."""
    base = urlsplit(url_base)
    prefix = base.path.encode("utf-8")
    if prefix.endswith(b"/") and path.startswith(b"/"):
        joined = prefix + path[1:]
    elif prefix and not prefix.endswith(b"/") and not path.startswith(b"/"):
        joined = prefix + b"/" + path
    else:
        joined = prefix + path
    if not joined.startswith(b"/"):
        joined = b"/" + joined
    queries = [q for q in (base.query.encode("utf-8"), query) if q]
    url = f"{base.scheme}://{_host(url_base)}".encode("idna") + joined
    return url + (b"?" + b"&".join(queries) if queries else b"")


def peer_model_records(
    peers: Peers, created: int, health: PeerHealth | None = None
) -> list[dict[str, Any]]:
    """``/v1/models`` records for every peer model, by FQN (§3.3); bare names
    are never listed.  Without ``health`` peers are always ``unloaded``, as
    in llama-swap; with it a down peer's models are ``unavailable`` and a
    model its ``/running`` shows ready is ``loaded``, and
    ``meta.llamaswap.peer`` says what is known of the peer (issue 15)."""
    records = []
    for peer_id in sorted(peers.peers):
        status = health.status(peer_id) if health is not None else None
        for model in peers.peers[peer_id].models:
            meta: dict[str, Any] = {"type": "peer", "peerID": peer_id}
            value = "unloaded"
            if status is not None:
                meta["peer"] = status.describe()
                if status.up is False:
                    value = "unavailable"
                elif status.up and model in status.loaded:
                    value = "loaded"
            records.append(
                {
                    "id": fqn(peer_id, model),
                    "object": "model",
                    "created": created,
                    "owned_by": "llama-swap",
                    "name": f"{peer_id}: {model}",
                    "meta": {"llamaswap": meta},
                    "status": {"value": value},
                }
            )
    return records
