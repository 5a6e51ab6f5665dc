"""The HTTP edge, attacked: hypothesis-generated requests against a real
``twistd -n llamaswap`` with two demo models (issue 11, point 11).

Methods, raw paths (dot segments, percent-encodings, control bytes),
header sets, bodies of every content type the router reads, truncated and
oversized bodies are sent over raw loopback sockets.  Every answer on an API
path that is an error must be a JSON error envelope; llamaswap itself never
answers 5xx (the demo upstreams do not either); after the run ``/health``
still answers, the log holds no traceback, and nothing leaked: no extra file
descriptors, no in-flight entries, no child outside a running model.

The run is deterministic (``derandomize``) so that CI is not flaky; set
``LLAMASWAP_FUZZ_EXAMPLES`` for a longer, randomised hunt.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from llamaswap.service.tap import free_port_block
from tests.support import PYTHON, REPO, descendants

EXAMPLES = int(os.environ.get("LLAMASWAP_FUZZ_EXAMPLES", "800"))
MODELS = ("fuzz-a", "fuzz-b")
#: Answers larger than this are not read to the end (a stream is cut).
READ_LIMIT = 1 << 20


def _config(directory: str, start_port: int) -> str:
    demo = (
        f"{PYTHON} -c 'from llamaswap.demo.server import main; main()'"
        " --host 127.0.0.1 --port ${PORT}"
    )
    models = {
        name: {"cmd": f"{demo} --model {name} --max-tokens-default 4", "aliases": [f"{name}-alias"]}
        for name in MODELS
    }
    path = os.path.join(directory, "fuzz.yaml")
    with open(path, "w") as f:
        # Its own ports: the default startPort (5800) is shared by other
        # tests running at the same time (trial -j2).
        document = {"healthCheckTimeout": 20, "logLevel": "info", "startPort": start_port}
        json.dump({**document, "models": models}, f)
    return path


def _exchange(port: int, raw: bytes, *, half_close: bool, timeout: float = 30) -> bytes:
    """Send ``raw``, read until the server closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(raw)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer (413) and close before the body is sent
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + timeout
        while size < READ_LIMIT:
            if time.monotonic() > deadline:
                raise AssertionError(f"no end of answer within {timeout}s to {raw[:200]!r}")
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"no answer within {timeout}s to {raw[:200]!r}") from None
            if not data:
                break
            chunks.append(data)
            size += len(data)
        return b"".join(chunks)


def _split(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return status, headers, body


def _dechunk(body: bytes) -> bytes:
    out = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(out)


# -- strategies --------------------------------------------------------------

SEGMENTS = st.sampled_from(
    [
        "..",
        ".",
        "%2e%2e",
        "%2E%2e",
        "%2e",
        ".%2e",
        "a",
        "v1",
        "models",
        "chat",
        "completions",
        "health",
        "%00",
        "%ff",
        "%2f",
        "%5c..",
        "%252e%252e",
        "%E2%82%AC",
        "x y".replace(" ", "%20"),
        "",
        "fuzz-a",
        "fuzz-b",
        "nope",
        "..%2f..%2fetc%2fpasswd",
    ]
)
PREFIXES = st.sampled_from(
    [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/audio/transcriptions",
        "/v1/models",
        "/upstream/fuzz-a/",
        "/upstream/fuzz-b/v1/",
        "/upstream/",
        "/upstream/nope/",
        "/api/models/unload",
        "/api/models/unload/fuzz-a",
        "/api/profiles/active",
        "/api/inflight",
        "/api/captures/",
        "/api/metrics",
        "/running",
        "/unload",
        "/health",
        "/metrics",
        "/logs",
        "/",
        "/completion",
        "/infill",
        "/rerank",
    ]
)


@st.composite
def paths(draw: Any) -> str:
    path = draw(PREFIXES)
    if draw(st.integers(0, 2)) == 0:  # a third of the paths get extra segments
        path += "/".join(draw(st.lists(SEGMENTS, min_size=1, max_size=4)))
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["", "a=1", "stream=true&x=%00", "%zz", "a=1&a=2"]))
    return path


MODEL_VALUES = st.sampled_from(
    [*MODELS, "fuzz-a-alias", "nope", "", "fuzz-a\r\nX-Injected: 1", "../fuzz-a", "ü", None, 7]
)


@st.composite
def bodies(draw: Any) -> tuple[str | None, bytes]:
    """(Content-Type, body)."""
    kind = draw(
        st.sampled_from(
            [
                "json",
                "json-charset",
                "bad-json",
                "form",
                "multipart",
                "bad-multipart",
                "text",
                "binary",
                "none",
                "odd-type",
            ]
        )
    )
    model = draw(MODEL_VALUES)
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if model is not None:
        payload["model"] = model
    if draw(st.booleans()):
        payload["stream"] = True
    if kind in ("json", "json-charset"):
        ctype = "application/json" if kind == "json" else "application/json; charset=UTF-8"
        return ctype, json.dumps(payload).encode()
    if kind == "bad-json":
        text = json.dumps(payload).encode()
        return "application/json", text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    if kind == "form":
        return "application/x-www-form-urlencoded", f"model={model}&x=%zz&&=".encode()
    if kind in ("multipart", "bad-multipart"):
        boundary = draw(st.sampled_from(["XyZ", "a" * 70, "q"]))
        part = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            f"Content-Type: audio/wav\r\n\r\nRIFF....\r\n--{boundary}--\r\n"
        ).encode()
        if kind == "bad-multipart":
            part = part[: draw(st.integers(0, len(part) - 1))]
            boundary = draw(st.sampled_from([boundary, "", "other"]))
        ctype = "multipart/form-data" + (f"; boundary={boundary}" if boundary else "")
        return ctype, part
    if kind == "text":
        return "text/plain", b"model=fuzz-a"
    if kind == "binary":
        return draw(st.sampled_from([None, "application/octet-stream"])), draw(
            st.binary(max_size=300)
        )
    if kind == "odd-type":
        return draw(
            st.sampled_from(
                [";;;", "application/json;;charset", "multipart/", 'a/b; c="unterminated', "*/*"]
            )
        ), b"{}"
    return None, b""


HEADER_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
EXTRA_HEADERS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "User-Agent",
                "Origin",
                "Sec-Fetch-Site",
                "Accept",
                "Accept-Encoding",
                "Authorization",
                "X-Api-Key",
                "Cookie",
                "Connection",
                "Keep-Alive",
                "TE",
                "Upgrade",
                "Expect",
                "Range",
                "X-Forwarded-For",
                "X-Request-Id",
            ]
        ),
        HEADER_VALUES,
    ),
    max_size=5,
)


@st.composite
def requests(draw: Any) -> tuple[bytes, bool]:
    """A raw HTTP/1.1 request and whether the client half-closes after it."""
    method = draw(
        st.sampled_from(
            ["POST", "POST", "POST", "GET", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]
        )
        | st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8)
    )
    path = draw(paths())
    ctype, body = draw(bodies())
    headers = [("Host", draw(st.sampled_from(["127.0.0.1", "localhost", "127.0.0.1:{port}"])))]
    headers.append(("Connection", "close"))
    if ctype is not None:
        headers.append(("Content-Type", ctype))
    headers.extend((n, v) for n, v in draw(EXTRA_HEADERS) if n != "Connection")
    framing = draw(
        st.sampled_from(["length", "length", "chunked", "truncated", "oversized", "none"])
    )
    half_close = False
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
        payload = body
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        step = max(1, len(body) // 3)
        pieces = [body[i : i + step] for i in range(0, len(body), step)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    elif framing == "truncated":
        headers.append(("Content-Length", str(len(body) + 100)))
        payload, half_close = body, True
    elif framing == "oversized":
        headers.append(("Content-Length", str(1 << 40)))
        payload, half_close = body, True
    else:
        payload = b""
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    return head.encode("latin-1") + b"\r\n" + payload, half_close


def _wants_json(raw: bytes) -> bool:
    """An API path whose client did not ask for text errors (``Accept``)."""
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    path = raw.split(b" ", 2)[1]
    accept = [line for line in head.split(b"\r\n") if line.startswith(b"accept:")]
    asks_text = any(b"text/plain" in line or b"text/html" in line for line in accept)
    return not path.startswith(b"/ui") and not asks_text


class EdgeFuzzTests(TestCase):
    timeout = 900

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp()
        start_port = free_port_block(len(MODELS) + 1)
        self.port = start_port + len(MODELS)
        self.log_path = os.path.join(self.tmp, "out.log")
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in cleanup
        env = {**os.environ, "PYTHONPATH": REPO}
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-c",
                "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
                "-n",
                "--pidfile=",
                "llamaswap",
                "-c",
                _config(self.tmp, start_port),
                "--listen",
                f"127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.tmp,
        )
        self.addCleanup(self._stop)
        self._poll(lambda: self._get("/health")[0] == 200, 30, "llamaswap did not come up")

    def _stop(self) -> None:
        children = descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{p}") for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftover = [p for p in children if os.path.exists(f"/proc/{p}/stat") and _not_zombie(p)]
        if leftover:
            for p in leftover:
                os.kill(p, signal.SIGKILL)
            raise AssertionError(f"children left after shutdown: {leftover}")

    def _poll(self, predicate: Any, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if predicate():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(message + "\n" + self._log_text()[-4000:])
            time.sleep(0.05)

    def _log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def _get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        raw = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        return _split(_exchange(self.port, raw.encode(), half_close=False))

    def _fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def test_edge_holds(self) -> None:
        # Warm up: both models started once, so that pools and files exist.
        for name in MODELS:
            body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}]})
            raw = (
                "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
            status, _, answer = _split(_exchange(self.port, raw, half_close=False))
            self.assertEqual(status, 200, answer)
        baseline = self._fds()
        seen: list[int] = []

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize="LLAMASWAP_FUZZ_EXAMPLES" not in os.environ,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(requests())
        def attack(request: tuple[bytes, bool]) -> None:
            raw, half_close = request
            raw = raw.replace(b"{port}", str(self.port).encode())
            answer = _exchange(self.port, raw, half_close=half_close)
            if not answer:
                # Only a client that did not finish its request may go unanswered.
                self.assertTrue(half_close, f"no answer to {raw[:300]!r}")
                return
            status, headers, body = _split(answer)
            seen.append(status)
            self.assertLess(status, 500, f"{status} for {raw[:300]!r}: {body[:300]!r}")
            is_head = raw.startswith(b"HEAD ")
            # A path no route knows is not an API path: it keeps llama-swap's
            # (Go's) plain "404 page not found", which scripts rely on.
            unrouted = status == 404 and body == b"404 page not found\n"
            if status >= 400 and _wants_json(raw) and not is_head and not unrouted:
                self.assertIn(
                    "json", headers.get("content-type", ""), f"{raw[:300]!r}: {answer[:400]!r}"
                )
                envelope = json.loads(body)
                self.assertIn("error", envelope, body[:300])

        attack()
        self.assertTrue(any(s >= 400 for s in seen) and any(s < 400 for s in seen), seen)

        # Still healthy, nothing in flight, no traceback, no leaked descriptors.
        self.assertEqual(self._get("/health")[0], 200)
        self._poll(
            lambda: json.loads(self._get("/api/inflight")[2]) == [],
            30,
            "in-flight entries stranded",
        )
        self._poll(
            lambda: self._fds() <= baseline + 4, 30, f"fds grew from {baseline} to {self._fds()}"
        )
        running = json.loads(self._get("/running")[2])["running"]
        self.assertLessEqual(len(descendants(self.proc.pid)), len(running), running)
        self._get("/api/models/unload", method="POST")
        self._poll(lambda: not descendants(self.proc.pid), 30, "children left after unload")
        log = self._log_text()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled", log)


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
