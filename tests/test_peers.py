"""Tests for remote peers: config, name resolution, request preparation (§2.3, §4.7)."""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaswap.config.filters import parse_filters
from llamaswap.config.loader import load_config_text
from llamaswap.config.model import ConfigError
from llamaswap.config.peers import Peers, PeerTarget, PeerTimeouts, read_peers
from llamaswap.upstream.client import UpstreamClient, UpstreamUnavailable, forward_headers
from llamaswap.upstream.peers import peer_model_records, peer_url, prepare_peer_request
from llamaswap.web.errors import write_error
from llamaswap.web.site import LlamaSwapSite
from tests.support import base_url, listen

JSON = b"application/json"


def _peers(raw: dict[str, Any], **document: Any) -> Peers:
    peers, problems, _ = read_peers({"peers": raw, **document}, (), {})
    assert not problems, problems
    return peers


def _problems(raw: Any, model_ids: tuple[str, ...] = (), aliases: Any = None, **doc: Any):
    return read_peers({"peers": raw, **doc}, model_ids, aliases or {})[1]


def _warnings(raw: Any) -> list[str]:
    return read_peers({"peers": raw}, (), {})[2]


OPENROUTER = {
    "openrouter": {
        "proxy": "https://openrouter.ai/api",
        "apiKey": "sk-remote",
        "models": ["qwen/qwen3", "llama"],
    },
    "box": {"proxy": "http://10.0.0.2:8080", "models": ["llama", "gemma"]},
}


class PeerConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """A minimal peer gets no key, no filters and the peer timeout defaults
        (responseHeader 60 s, unlike local models)."""
        peer = _peers({"p": {"proxy": "http://h:1", "models": ["m"]}}).peers["p"]
        self.assertEqual(peer.api_key, "")
        self.assertTrue(peer.filters.is_empty)
        self.assertEqual(peer.timeouts, PeerTimeouts())
        self.assertEqual(peer.timeouts.response_header, 60)
        self.assertEqual(peer.timeouts.connect, 30)
        self.assertEqual(peer.timeouts.idle_conn, 90)

    def test_timeouts_override(self) -> None:
        """Configured timeouts replace the defaults key by key; 0 is allowed."""
        peer = _peers(
            {"p": {"proxy": "http://h:1", "models": ["m"], "timeouts": {"responseHeader": 0}}}
        ).peers["p"]
        self.assertEqual(peer.timeouts.response_header, 0)
        self.assertEqual(peer.timeouts.connect, 30)

    def test_model_timeouts(self) -> None:
        """``models.<id>.timeouts`` is read like a peer's, with llama-swap's
        model defaults (no response-header time-out); absent, the model has
        none of its own; bad values are one error each, naming the key."""
        models = load_config_text(
            json.dumps(
                {
                    "models": {
                        "own": {"cmd": "x", "proxy": "http://h:1", "timeouts": {"connect": 5}},
                        "plain": {"cmd": "x", "proxy": "http://h:1"},
                    }
                }
            ),
            environ={},
        ).models
        self.assertEqual(models["own"].timeouts, PeerTimeouts(connect=5, response_header=0))
        self.assertIsNone(models["plain"].timeouts)
        for timeouts, problem in [
            ({"responseHeader": -1}, "models.m.timeouts.responseHeader: must be >= 0, got -1"),
            ({"idleConn": "soon"}, "models.m.timeouts.idleConn: must be an integer, got 'soon'"),
            ([1], "models.m.timeouts: must be a mapping, got a list"),
        ]:
            document = {"models": {"m": {"cmd": "x", "proxy": "http://h:1", "timeouts": timeouts}}}
            with self.subTest(timeouts=timeouts):
                with self.assertRaises(ConfigError) as raised:
                    load_config_text(json.dumps(document), environ={})
                self.assertIn(problem, str(raised.exception))

    def test_duplicate_models_ignored(self) -> None:
        """A model listed twice by one peer is one model, in first-seen order."""
        peer = _peers({"p": {"proxy": "http://h:1", "models": ["b", "a", "b"]}}).peers["p"]
        self.assertEqual(peer.models, ("b", "a"))

    def test_from_loaded_config(self) -> None:
        """Config.peers is read from the macro-expanded document at load."""
        config = load_config_text(
            "macros:\n  host: h.example\n"
            "peers:\n  p:\n    proxy: http://${host}:9/v1base\n    models: [m]\n"
        )
        self.assertEqual(config.peers.peers["p"].proxy, "http://h.example:9/v1base")

    def test_from_config_raises(self) -> None:
        """An invalid peer is a config error naming the key, at load time."""
        with self.assertRaises(ConfigError) as caught:
            load_config_text("peers:\n  p:\n    proxy: http://h:1\n")
        self.assertEqual(
            caught.exception.problems, ("peers.p.models: peer models can not be empty",)
        )


class PeerValidationTests(SynchronousTestCase):
    def test_proxy_required(self) -> None:
        """A peer without proxy is reported at peers.<id>.proxy."""
        self.assertEqual(_problems({"p": {"models": ["m"]}}), ["peers.p.proxy: proxy is required"])

    def test_proxy_must_be_http_url(self) -> None:
        """A proxy that is not an http(s) URL with a host is rejected."""
        self.assertEqual(
            _problems({"p": {"proxy": "ftp://h/x", "models": ["m"]}}),
            ["peers.p.proxy: invalid URL 'ftp://h/x': scheme must be http or https"],
        )
        self.assertEqual(
            _problems({"p": {"proxy": "http://h:port", "models": ["m"]}})[0][:30],
            "peers.p.proxy: invalid URL 'ht",
        )

    def test_models_required(self) -> None:
        """Missing or empty models: "peer models can not be empty"."""
        for models in (None, []):
            self.assertEqual(
                _problems({"openrouter": {"proxy": "http://h", "models": models}}),
                ["peers.openrouter.models: peer models can not be empty"],
            )

    def test_bad_shapes(self) -> None:
        """Non-mapping sections and entries, non-list models and bad timeouts are
        reported with their key paths."""
        self.assertEqual(_problems(["x"]), ["peers: must be a mapping, got a list"])
        self.assertEqual(_problems({"p": "x"}), ["peers.p: must be a mapping, got 'x'"])
        self.assertEqual(
            _problems({"p": {"proxy": "http://h", "models": "m"}}),
            ["peers.p.models: must be a list of strings, got 'm'"],
        )
        self.assertEqual(
            _problems({"p": {"proxy": "http://h", "models": ["m"], "timeouts": {"connect": -1}}}),
            ["peers.p.timeouts.connect: must be >= 0, got -1"],
        )

    def test_filters_validated(self) -> None:
        """Peer filters go through parse_filters with the peer's key path."""
        self.assertEqual(
            _problems({"p": {"proxy": "http://h", "models": ["m"], "filters": {"setParams": 3}}}),
            ["peers.p.filters.setParams: must be a mapping, got 3"],
        )

    def test_fqn_unique_across_peers(self) -> None:
        """Two peers producing the same FQN (IDs may hold "/") is an error."""
        problems = _problems(
            {
                "a": {"proxy": "http://h", "models": ["b/c"]},
                "a/b": {"proxy": "http://h", "models": ["c"]},
            }
        )
        self.assertEqual(
            problems,
            [
                "peers.a/b.models: peer model name 'a/b/c' is ambiguous between "
                "peers.a model 'b/c' and peers.a/b model 'c'"
            ],
        )

    def test_fqn_may_not_name_local_things(self) -> None:
        """An FQN may not equal a local model ID, an alias, a selector ID or a pin."""
        raw = {"p": {"proxy": "http://h", "models": ["m1", "m2", "m3", "m4"]}}
        problems = _problems(
            raw,
            model_ids=("p/m1",),
            aliases={"p/m2": "x"},
            selectors={"p/m3": {"strategy": "pin", "targets": ["x"]}},
            profiles={"work": {"pins": {"p/m4": "x"}}},
        )
        self.assertEqual(
            problems,
            [
                "peers.p.models: fully qualified peer model name 'p/m1' conflicts with model ID 'p/m1'",
                "peers.p.models: fully qualified peer model name 'p/m2' conflicts with an alias of model 'x'",
                "peers.p.models: fully qualified peer model name 'p/m3' conflicts with selectors.p/m3",
                "peers.p.models: fully qualified peer model name 'p/m4' conflicts with profiles.work.pins.p/m4",
            ],
        )

    def test_set_params_by_id_alias_conflict(self) -> None:
        """setParamsByID keys are aliases, so they may not equal an FQN either."""
        config_text = (
            "models:\n  a:\n    cmd: s ${PORT}\n    filters:\n      setParamsByID:\n"
            "        p/m: {x: 1}\n"
            "peers:\n  p:\n    proxy: http://h\n    models: [m]\n"
        )
        with self.assertRaises(ConfigError) as caught:
            load_config_text(config_text)
        self.assertEqual(
            caught.exception.problems,
            (
                "peers.p.models: fully qualified peer model name 'p/m' conflicts with an alias of model 'a'",
            ),
        )

    def test_unknown_keys_warned(self) -> None:
        """Unknown keys under a peer are warnings with a close-match hint."""
        self.assertEqual(
            _warnings({"p": {"proxy": "http://h", "models": ["m"], "apikey": "k"}}),
            ['peers.p.apikey: unknown key (did you mean "apiKey"?)'],
        )


class ResolveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.peers = _peers(OPENROUTER)

    def test_fqn(self) -> None:
        """An FQN reaches its peer, with the bare model name and the peer's settings."""
        target = self.peers.resolve("openrouter/qwen/qwen3")
        assert target is not None
        self.assertEqual(
            (target.peer_id, target.model, target.fqn, target.url_base, target.api_key),
            (
                "openrouter",
                "qwen/qwen3",
                "openrouter/qwen/qwen3",
                "https://openrouter.ai/api",
                "sk-remote",
            ),
        )
        self.assertEqual(target.requested, "openrouter/qwen/qwen3")

    def test_unique_bare_name(self) -> None:
        """A bare name provided by exactly one peer reaches it."""
        target = self.peers.resolve("gemma")
        assert target is not None
        self.assertEqual(
            (target.peer_id, target.model, target.requested), ("box", "gemma", "gemma")
        )

    def test_ambiguous_bare_name(self) -> None:
        """A bare name two peers provide is not routable bare, only by FQN."""
        self.assertIsNone(self.peers.resolve("llama"))
        self.assertEqual(self.peers.resolve("box/llama").peer_id, "box")  # type: ignore[union-attr]
        self.assertEqual(self.peers.resolve("openrouter/llama").peer_id, "openrouter")  # type: ignore[union-attr]

    def test_fqn_beats_bare_name(self) -> None:
        """A name that is one peer's FQN and another's bare model goes to the FQN."""
        peers = _peers(
            {
                "x": {"proxy": "http://h", "models": ["y/z"]},
                "y": {"proxy": "http://h", "models": ["z"]},
            }
        )
        # "y/z" is y's FQN and x's bare name.
        self.assertEqual(peers.resolve("y/z").peer_id, "y")  # type: ignore[union-attr]
        self.assertEqual(peers.routable_names(), frozenset({"x/y/z", "y/z", "z"}))

    def test_unknown(self) -> None:
        """Names no peer provides resolve to None."""
        self.assertIsNone(self.peers.resolve("nothing"))
        self.assertIsNone(self.peers.resolve("openrouter/"))
        self.assertIsNone(Peers().resolve("x"))


def _target(**kw: Any) -> PeerTarget:
    values: dict[str, Any] = {
        "peer_id": "openrouter",
        "model": "qwen/qwen3",
        "fqn": "openrouter/qwen/qwen3",
        "url_base": "https://openrouter.ai/api",
        "api_key": "",
        "filters": parse_filters(None, "f")[0],
        "requested": "openrouter/qwen/qwen3",
    }
    values.update(kw)
    return PeerTarget(**values)


def _headers(**values: str) -> Headers:
    return Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in values.items()})


class PrepareRequestTests(SynchronousTestCase):
    def test_fqn_rewritten_in_place(self) -> None:
        """A JSON body naming the FQN names the bare model; other bytes are kept."""
        body = b'{"model" : "openrouter/qwen/qwen3", "temperature": 1.50,\n "x":"caf\\u00e9"}'
        _, out, query = prepare_peer_request(_target(), Headers(), body, JSON, b"POST", b"")
        self.assertEqual(out, body.replace(b"openrouter/qwen/qwen3", b"qwen/qwen3"))
        self.assertEqual(query, b"")

    def test_any_other_name_rewritten(self) -> None:
        """A body still naming a pin or selector (not yet rewritten) gets the bare name too."""
        body = b'{"model":"chat","n":1}'
        _, out, _ = prepare_peer_request(_target(), Headers(), body, JSON, b"POST", b"")
        self.assertEqual(out, b'{"model":"qwen/qwen3","n":1}')

    def test_bare_name_untouched(self) -> None:
        """A request that already uses the peer's model name is sent as is."""
        body = b'{"model":"qwen/qwen3","n":1}'
        target = _target(requested="qwen/qwen3")
        _, out, _ = prepare_peer_request(target, Headers(), body, JSON, b"POST", b"")
        self.assertEqual(out, body)

    def test_key_injection_overwrites(self) -> None:
        """A peer apiKey replaces both Authorization and x-api-key."""
        headers = _headers(authorization="Bearer client", x_api_key="client", accept="*/*")
        out, _, _ = prepare_peer_request(
            _target(api_key="sk-remote"), headers, b"{}", JSON, b"POST", b""
        )
        self.assertEqual(out.getRawHeaders(b"authorization"), [b"Bearer sk-remote"])
        self.assertEqual(out.getRawHeaders(b"x-api-key"), [b"sk-remote"])
        self.assertEqual(out.getRawHeaders(b"accept"), [b"*/*"])
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer client"])

    def test_no_key_keeps_client_headers(self) -> None:
        """Without apiKey the client's own credentials go through unchanged."""
        headers = _headers(authorization="Basic dTpw", x_api_key="client")
        out, _, _ = prepare_peer_request(_target(), headers, b"{}", JSON, b"POST", b"")
        self.assertEqual(out.getRawHeaders(b"authorization"), [b"Basic dTpw"])
        self.assertEqual(out.getRawHeaders(b"x-api-key"), [b"client"])

    def test_host_and_dropped_headers(self) -> None:
        """Host names the peer (port kept, userinfo never); length, transfer
        encoding and X-Forwarded-* do not reach it."""
        headers = _headers(
            host="localhost:8080",
            content_length="99",
            transfer_encoding="chunked",
            x_forwarded_for="1.2.3.4",
            x_forwarded_proto="http",
        )
        out, _, _ = prepare_peer_request(
            _target(url_base="http://u:p@peer.example:9000/base"),
            headers,
            b"{}",
            JSON,
            b"POST",
            b"",
        )
        self.assertEqual(out.getRawHeaders(b"host"), [b"peer.example:9000"])
        for name in (
            b"content-length",
            b"transfer-encoding",
            b"x-forwarded-for",
            b"x-forwarded-proto",
        ):
            self.assertFalse(out.hasHeader(name), name)

    def test_filters_applied(self) -> None:
        """The peer's JSON filters apply; setParamsByID is keyed by the name the client used."""
        filters, problems = parse_filters(
            {
                "stripParams": "top_k",
                "setParams": {"temperature": 0.1},
                "setParamsByID": {"openrouter/qwen/qwen3": {"max_tokens": 5}},
            },
            "peers.openrouter.filters",
        )
        self.assertEqual(problems, [])
        body = b'{"model":"openrouter/qwen/qwen3","top_k":3,"temperature":1}'
        _, out, _ = prepare_peer_request(
            _target(filters=filters), Headers(), body, JSON, b"POST", b""
        )
        self.assertEqual(
            json.loads(out), {"model": "qwen/qwen3", "temperature": 0.1, "max_tokens": 5}
        )

    def test_filter_failure_is_value_error(self) -> None:
        """A body the filters cannot edit raises ValueError (the caller answers 500)."""
        filters, _ = parse_filters({"setParams": {"a": 1}}, "f")
        with self.assertRaises(ValueError):
            prepare_peer_request(_target(filters=filters), Headers(), b"[1]", JSON, b"POST", b"")

    def test_passthrough_skips_filters(self) -> None:
        """For /upstream no filters apply; a body model equal to the FQN is still
        rewritten, any other model is left alone."""
        filters, _ = parse_filters({"setParams": {"a": 1}}, "f")
        target = _target(filters=filters)
        body = b'{"model":"openrouter/qwen/qwen3"}'
        _, out, _ = prepare_peer_request(
            target, Headers(), body, JSON, b"POST", b"", passthrough=True
        )
        self.assertEqual(out, b'{"model":"qwen/qwen3"}')
        other = b'{"model":"something-else"}'
        _, out, _ = prepare_peer_request(
            target, Headers(), other, JSON, b"POST", b"", passthrough=True
        )
        self.assertEqual(out, other)

    def test_multipart_rewritten(self) -> None:
        """A multipart model field is rewritten in place; other parts untouched."""
        ctype = b"multipart/form-data; boundary=XyZ"
        body = (
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            b"RIFF....\r\n"
            b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
            b"openrouter/qwen/qwen3\r\n--XyZ--\r\n"
        )
        _, out, _ = prepare_peer_request(_target(), Headers(), body, ctype, b"POST", b"")
        self.assertEqual(out, body.replace(b"openrouter/qwen/qwen3", b"qwen/qwen3"))

    def test_form_rewritten(self) -> None:
        """An urlencoded model field is rewritten; other pairs keep their bytes."""
        body = b"a=1%202&model=openrouter%2Fqwen%2Fqwen3&b="
        ctype = b"application/x-www-form-urlencoded"
        _, out, _ = prepare_peer_request(_target(), Headers(), body, ctype, b"POST", b"")
        self.assertEqual(out, b"a=1%202&model=qwen%2Fqwen3&b=")

    def test_get_query_rewritten(self) -> None:
        """A GET names its model in the query; that is where it is rewritten."""
        _, body, query = prepare_peer_request(
            _target(), Headers(), b"", b"", b"GET", b"x=1&model=openrouter/qwen/qwen3"
        )
        self.assertEqual((body, query), (b"", b"x=1&model=qwen%2Fqwen3"))


class PeerUrlTests(SynchronousTestCase):
    def test_path_prefix_kept(self) -> None:
        """The request path is appended to the base URL's path with one slash."""
        for base in ("https://openrouter.ai/api", "https://openrouter.ai/api/"):
            self.assertEqual(
                peer_url(_target(url_base=base), b"/v1/chat/completions"),
                b"https://openrouter.ai/api/v1/chat/completions",
            )
        self.assertEqual(
            peer_url(_target(url_base="http://h:8080"), b"/props", b"model=m"),
            b"http://h:8080/props?model=m",
        )

    def test_queries_merged(self) -> None:
        """A base URL query comes first, the request's query after it."""
        self.assertEqual(
            peer_url(_target(url_base="http://h/x?key=1"), b"/y", b"model=m"),
            b"http://h/x/y?key=1&model=m",
        )


class PeerRecordsTests(SynchronousTestCase):
    def test_records(self) -> None:
        """Each peer model is listed by FQN, named "<peer>: <model>", typed peer, unloaded."""
        records = peer_model_records(_peers(OPENROUTER), created=123)
        self.assertEqual(
            [r["id"] for r in records],
            ["box/llama", "box/gemma", "openrouter/qwen/qwen3", "openrouter/llama"],
        )
        self.assertEqual(
            records[2],
            {
                "id": "openrouter/qwen/qwen3",
                "object": "model",
                "created": 123,
                "owned_by": "llama-swap",
                "name": "openrouter: qwen/qwen3",
                "meta": {"llamaswap": {"type": "peer", "peerID": "openrouter"}},
                "status": {"value": "unloaded"},
            },
        )


class _RemotePeer(Resource):
    """A stand-in for a remote OpenAI-style server: records what it received."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, Headers, bytes]] = []

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        self.seen.append((request.uri, request.requestHeaders, body))
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"model": json.loads(body)["model"]}).encode()


class _Front(Resource):
    """A minimal front: resolve the peer, prepare the request, forward it."""

    isLeaf = True

    def __init__(self, peers: Peers, client: UpstreamClient) -> None:
        super().__init__()
        self.peers = peers
        self.client = client

    def render(self, request: Any) -> object:
        body = request.content.read()
        model = json.loads(body)["model"]
        target = self.peers.resolve(model)
        assert target is not None
        headers = forward_headers(request.requestHeaders, client_ip=None)
        headers, body, query = prepare_peer_request(
            target, headers, body, request.getHeader(b"content-type") or b"", request.method, b""
        )
        url = peer_url(target, request.path, query)
        d = defer.Deferred.fromCoroutine(
            self.client.forward(request, url, headers=headers, body=body)
        )

        def failed(failure: Any) -> None:
            if failure.check(UpstreamUnavailable):
                write_error(request, 502, f"peer proxy error: {failure.value}")

        d.addCallbacks(lambda _: request.finish(), failed)
        return NOT_DONE_YET


class LoopbackPeerTests(TestCase):
    """A real second server plays the peer; requests cross loopback sockets."""

    def setUp(self) -> None:
        self.remote = _RemotePeer()
        remote_port = listen(self.remote)
        self.addCleanup(remote_port.stopListening)
        self.remote_url = base_url(remote_port)
        peers = _peers(
            {"far": {"proxy": self.remote_url + "/api", "apiKey": "sk-peer", "models": ["org/m1"]}}
        )
        self.client = UpstreamClient(reactor)
        self.addCleanup(self.client.close)
        front_port = listen(_Front(peers, self.client), LlamaSwapSite)
        self.addCleanup(front_port.stopListening)
        self.front = base_url(front_port)

    async def test_forwarded_with_bare_name_and_key(self) -> None:
        """The peer receives the bare model name, the injected key in both headers,
        its own Host and the path under its base URL."""
        body = b'{"model": "far/org/m1", "stream": false}'
        response = await treq.post(
            self.front + "/v1/chat/completions",
            data=body,
            headers={b"content-type": [JSON], b"authorization": [b"Bearer mine"]},
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(await response.content()), {"model": "org/m1"})
        [(uri, headers, received)] = self.remote.seen
        self.assertEqual(uri, b"/api/v1/chat/completions")
        self.assertEqual(received, b'{"model": "org/m1", "stream": false}')
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer sk-peer"])
        self.assertEqual(headers.getRawHeaders(b"x-api-key"), [b"sk-peer"])
        self.assertEqual(
            headers.getRawHeaders(b"host"), [self.remote_url.removeprefix("http://").encode()]
        )
