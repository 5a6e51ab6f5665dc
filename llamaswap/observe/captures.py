"""Request/response captures: zstd-compressed CBOR in a byte-budgeted FIFO.

A capture holds what one recorded request sent and got back, for
``GET /api/captures/{id}``.  `build_capture` applies llama-swap's per-path
field masks and header redaction; `CaptureCache` stores the compressed
captures under a byte budget (counted on compressed bytes), evicting the
oldest first; `CaptureBuffer` collects a response body up to its own cap
while it streams.

Encoding a capture (CBOR, then zstd: milliseconds per MiB) must not stall
the reactor: `CaptureEncoder` runs it in a small thread pool with a bounded
queue, in batches (handing one small capture to a thread costs more than
encoding it), and `CaptureCache.add_later` stores the result back on the reactor
thread.  When the queue is full the capture is dropped, with a log line and
a count (`CaptureCache.dropped`).
"""

from __future__ import annotations

import base64
import enum
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import zstandard
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.http_headers import Headers

from llamaswap.core.text import as_text

#: Header names whose values are replaced by `REDACTED` (compared lowercased).
#: llama-swap's list, plus the other API-key headers clients commonly send.
REDACTED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
    }
)
REDACTED = "[REDACTED]"
#: Default cap on the response body kept for one capture.
DEFAULT_BODY_CAP = 4 * 1024 * 1024
#: zstd level close to Go's ``SpeedBetterCompression``.
ZSTD_LEVEL = 7
#: threads encoding captures.
ENCODER_THREADS = 2
#: captures waiting to be encoded before new ones are dropped; each holds its
#: request and (capped) response body.
ENCODER_QUEUE = 64
#: captures gathered into one batch for the pool: seconds after the first...
BATCH_DELAY = 0.01
#: ...or this many, whichever comes first.
BATCH_SIZE = 32

log = Logger()


class CaptureFields(enum.Flag):
    """Which parts of a request/response a capture keeps."""

    REQ_HEADERS = enum.auto()
    REQ_BODY = enum.auto()
    RESP_HEADERS = enum.auto()
    RESP_BODY = enum.auto()
    REQ_ALL = REQ_HEADERS | REQ_BODY
    RESP_ALL = RESP_HEADERS | RESP_BODY
    ALL = REQ_ALL | RESP_ALL


#: Routes with large binary payloads keep less (llama-swap's masks).
FIELDS_BY_PATH: Mapping[str, CaptureFields] = {
    "/v1/audio/speech": CaptureFields.REQ_ALL | CaptureFields.RESP_HEADERS,
    "/v1/audio/voices": CaptureFields.REQ_HEADERS | CaptureFields.RESP_ALL,
    "/v1/audio/transcriptions": CaptureFields.REQ_HEADERS | CaptureFields.RESP_ALL,
    "/v1/images/generations": CaptureFields.REQ_ALL | CaptureFields.RESP_HEADERS,
    "/v1/images/edits": CaptureFields.REQ_HEADERS | CaptureFields.RESP_HEADERS,
    "/sdapi/v1/txt2img": CaptureFields.REQ_ALL | CaptureFields.RESP_HEADERS,
    "/sdapi/v1/img2img": CaptureFields.REQ_HEADERS | CaptureFields.RESP_HEADERS,
}


def fields_for(path: str) -> CaptureFields:
    """The capture mask for a forwarded path; unlisted paths keep everything."""
    return FIELDS_BY_PATH.get(path, CaptureFields.ALL)


class CaptureBuffer:
    """Collects a (decoded) response body up to ``cap`` bytes, then stops.

    ``write`` fits `UsageParser`'s ``decoded_sink``.  Past the cap nothing more
    is kept and `truncated` becomes true.
    """

    def __init__(self, cap: int = DEFAULT_BODY_CAP) -> None:
        self._cap = cap
        self._buffer = bytearray()
        self.truncated = False

    def __len__(self) -> int:
        return len(self._buffer)

    def write(self, data: bytes) -> None:
        room = self._cap - len(self._buffer)
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        self._buffer += data

    def getvalue(self) -> bytes:
        return bytes(self._buffer)


HeaderSource = Headers | Mapping[Any, Any] | Iterable[tuple[Any, Any]]


@functools.lru_cache(maxsize=1024)
def canonical_header_name(name: str) -> str:
    """Go's canonical MIME header spelling: ``x-api-key`` → ``X-Api-Key``."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def flatten_headers(headers: HeaderSource | None) -> dict[str, str]:
    """Headers as ``{Canonical-Name: first value}``, sensitive values redacted.

    Accepts a Twisted ``Headers`` (its raw header pairs), a mapping, or pairs;
    a value may be one str/bytes or a sequence of them.
    """
    if headers is None:
        return {}
    pairs: Iterable[tuple[Any, Any]]
    if isinstance(headers, Headers):
        pairs = headers.getAllRawHeaders()
    elif isinstance(headers, Mapping):
        pairs = headers.items()
    else:
        pairs = headers
    flat: dict[str, str] = {}
    for name, value in pairs:
        key = canonical_header_name(as_text(name))
        if key in flat:
            continue
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):
            if not value:
                continue
            value = value[0]
        flat[key] = REDACTED if key.lower() in REDACTED_HEADERS else as_text(value)
    return flat


@dataclass(frozen=True)
class Capture:
    """One stored request/response pair (llama-swap's ``ReqRespCapture``)."""

    id: int
    req_path: str
    req_headers: Mapping[str, str] | None
    req_body: bytes | None
    resp_headers: Mapping[str, str] | None
    resp_body: bytes | None
    resp_body_truncated: bool = False

    def to_cbor(self) -> bytes:
        record: dict[str, Any] = {
            "id": self.id,
            "req_path": self.req_path,
            "req_headers": None if self.req_headers is None else dict(self.req_headers),
            "req_body": self.req_body,
            "resp_headers": None if self.resp_headers is None else dict(self.resp_headers),
            "resp_body": self.resp_body,
        }
        if self.resp_body_truncated:
            record["resp_body_truncated"] = True
        return cbor2.dumps(record)


def build_capture(
    *,
    id: int,
    req_path: str,
    req_headers: HeaderSource | None,
    req_body: bytes | None,
    resp_status: int,
    resp_headers: HeaderSource | None,
    resp_body: bytes | CaptureBuffer | None,
    fields: CaptureFields | None = None,
) -> Capture:
    """Assemble a capture as llama-swap does.

    Applies the path's field mask (or ``fields``), redacts sensitive headers,
    drops ``Content-Encoding`` from the response headers (the stored body is
    the decoded one), and keeps no response body for a non-200 response.
    """
    mask = fields if fields is not None else fields_for(req_path)
    if resp_status != 200:
        mask &= ~CaptureFields.RESP_BODY
    stored_resp_headers = None
    if mask & CaptureFields.RESP_HEADERS:
        stored_resp_headers = flatten_headers(resp_headers)
        stored_resp_headers.pop("Content-Encoding", None)
    body: bytes | None = None
    truncated = False
    if mask & CaptureFields.RESP_BODY:
        if isinstance(resp_body, CaptureBuffer):
            body, truncated = resp_body.getvalue(), resp_body.truncated
        else:
            body = resp_body
    return Capture(
        id=id,
        req_path=req_path,
        req_headers=flatten_headers(req_headers) if mask & CaptureFields.REQ_HEADERS else None,
        req_body=req_body if mask & CaptureFields.REQ_BODY else None,
        resp_headers=stored_resp_headers,
        resp_body=body,
        resp_body_truncated=truncated,
    )


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode("ascii")


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    """This thread's compressor (one per thread: they are not thread-safe)."""
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return compressor


def encode_capture(capture: Capture) -> bytes:
    """A capture as stored: zstd-compressed CBOR."""
    # zstd's output object keeps the whole compress-bound allocation
    # (megabytes for a capped body) however small the result: keep a
    # right-sized copy, or every capture pins its worst case in memory.
    return bytes(bytearray(_compressor().compress(capture.to_cbor())))


class CaptureEncoder:
    """Runs encoding jobs off the reactor thread, in batches: at most
    ``max_pending`` queued or running, in a thread pool of ``threads``.

    Handing one job to a thread and its result back costs more than
    encoding a chat-sized capture (a wake-up each way, the GIL passed
    twice): jobs submitted within ``batch_delay`` seconds of each other
    (or ``batch_size`` of them, whichever comes first) go to the pool as
    one batch, and come back with one call to the reactor thread.

    ``pool`` replaces the pool (its owner starts and stops it); the default
    pool starts with the first batch and is stopped by :meth:`stop`.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        threads: int = ENCODER_THREADS,
        max_pending: int = ENCODER_QUEUE,
        pool: ThreadPool | None = None,
        batch_delay: float = BATCH_DELAY,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self._reactor = reactor
        self._owns_pool = pool is None
        self._pool = pool or ThreadPool(0, threads, name="llamaswap-captures")
        self.max_pending = max_pending
        self.batch_delay = batch_delay
        self.batch_size = batch_size
        #: jobs queued or running.
        self.pending = 0
        self.stopped = False
        self._batch: list[tuple[Callable[[], Capture], Deferred[bytes]]] = []
        self._timer: Any = None

    def submit(self, build: Callable[[], Capture]) -> Deferred[bytes] | None:
        """Build and encode a capture in the pool (``build`` runs there);
        None (nothing run) when the queue is full or the encoder has stopped."""
        if self.stopped or self.pending >= self.max_pending:
            return None
        self.pending += 1
        d: Deferred[bytes] = Deferred()
        self._batch.append((build, d))
        if len(self._batch) >= self.batch_size:
            self._send()
        elif self._timer is None:
            self._timer = self._reactor.callLater(self.batch_delay, self._send)
        return d

    def _send(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        if self._owns_pool and not self._pool.started:
            self._pool.start()
        jobs = [job for job, _ in batch]
        outcome = deferToThreadPool(self._reactor, self._pool, _run_jobs, jobs)

        def deliver(results: list[bytes | Failure]) -> None:
            self.pending -= len(batch)
            for (_, d), result in zip(batch, results, strict=True):
                d.callback(result) if not isinstance(result, Failure) else d.errback(result)

        def lost(failure: Failure) -> None:  # the pool itself failed
            self.pending -= len(batch)
            for _, d in batch:
                d.errback(failure)

        outcome.addCallbacks(deliver, lost)

    def stop(self) -> None:
        """Stop the pool (after the batch it runs; batches already queued,
        and the one being gathered, still run)."""
        self.stopped = True
        self._send()
        if self._owns_pool and self._pool.started:
            self._pool.stop()


def _run_jobs(jobs: list[Callable[[], Capture]]) -> list[bytes | Failure]:
    """Runs in a pool thread: each capture built and encoded, or its failure.

    All the batch's captures are compressed in one call: zstd releases the
    GIL while it works, and getting it back, while the reactor thread keeps
    it busy, costs up to a switch interval (5 ms) each time.
    """
    results: list[bytes | Failure] = []
    records: list[bytes | bytearray | memoryview] = []
    for job in jobs:
        try:
            records.append(job().to_cbor())
            results.append(b"")
        except Exception:
            results.append(Failure())
    if records:
        compressed = iter(_compressor().multi_compress_to_buffer(records))
        # Each segment copied out on its own: the shared buffer is freed.
        results = [r if isinstance(r, Failure) else next(compressed).tobytes() for r in results]
    return results


class CaptureCache:
    """Compressed captures by activity id, FIFO-evicted to stay within ``budget_bytes``.

    The budget counts compressed bytes.  :meth:`add` compresses on the
    caller's thread; :meth:`add_later` through ``encoder`` (a
    :class:`CaptureEncoder`), off the reactor.
    """

    def __init__(self, budget_bytes: int, encoder: CaptureEncoder | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.encoder = encoder
        #: captures dropped because the encoder's queue was full.
        self.dropped = 0
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._size = 0
        self._decompressor = zstandard.ZstdDecompressor()

    @property
    def size(self) -> int:
        """Compressed bytes currently held."""
        return self._size

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, id: object) -> bool:
        return id in self._items

    def has(self, id: int) -> bool:
        return id in self._items

    def add(self, capture: Capture) -> bool:
        """Store ``capture``; False (nothing stored) when it alone exceeds the budget."""
        return self.store(capture.id, encode_capture(capture))

    def store(self, id: int, data: bytes) -> bool:
        """Store an encoded capture; False when it alone exceeds the budget."""
        if len(data) > self.budget_bytes:
            return False
        old = self._items.pop(id, None)
        if old is not None:
            self._size -= len(old)
        while self._items and self._size + len(data) > self.budget_bytes:
            _, evicted = self._items.popitem(last=False)
            self._size -= len(evicted)
        self._items[id] = data
        self._size += len(data)
        return True

    def add_later(self, id: int, path: str, build: Callable[[], Capture]) -> Deferred[None]:
        """Build and encode a capture off the reactor (through ``encoder``;
        on this thread without one), then store it.  Fires once it is stored
        or given up: too large (logged), or dropped because the encoder's
        queue is full (logged and counted in :attr:`dropped`)."""
        if self.encoder is None:
            self._stored(self.add(build()), id, path)
            return succeed(None)
        encoded = self.encoder.submit(build)
        if encoded is None:
            if not self.encoder.stopped:
                self.dropped += 1
                log.warn(
                    "capture {id} for {path} dropped: {pending} captures waiting to be "
                    "encoded ({dropped} dropped so far)",
                    id=id,
                    path=path,
                    pending=self.encoder.pending,
                    dropped=self.dropped,
                )
            return succeed(None)
        done = encoded.addCallback(lambda data: self._stored(self.store(id, data), id, path))
        done.addErrback(lambda f: log.failure("capture {id} for {path}", f, id=id, path=path))
        return done

    def _stored(self, stored: bool, id: int, path: str) -> None:
        if not stored:
            log.warn("capture {id} for {path} exceeds captureBuffer; not stored", id=id, path=path)

    def close(self) -> None:
        """Stop the encoder (the service is stopping)."""
        if self.encoder is not None:
            self.encoder.stop()

    def compressed(self, id: int) -> bytes | None:
        """The stored zstd bytes of a capture, or None."""
        return self._items.get(id)

    def get(self, id: int) -> dict[str, Any] | None:
        """The JSON body of ``GET /api/captures/{id}``, or None if absent or evicted.

        Bodies are base64 strings (as Go encodes ``[]byte``) or null.
        ``resp_body_truncated: true`` is added when the body hit its cap.
        """
        data = self._items.get(id)
        if data is None:
            return None
        record = cbor2.loads(self._decompressor.decompress(data))
        result: dict[str, Any] = {
            "id": record["id"],
            "req_path": record["req_path"],
            "req_headers": record["req_headers"],
            "req_body": _b64(record["req_body"]),
            "resp_headers": record["resp_headers"],
            "resp_body": _b64(record["resp_body"]),
        }
        if record.get("resp_body_truncated"):
            result["resp_body_truncated"] = True
        return result
