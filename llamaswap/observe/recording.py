"""Recording model-dispatched requests: activity rows and captures.

A :class:`Recording` follows one request: it sees the upstream response's
headers, parses the body incrementally while it is relayed (never holding it
whole), and when the request ends (completed, failed or abandoned) adds one
activity row and, when enabled, one capture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llamaswap.core.twistedweb import after_flush
from llamaswap.observe.activity import ActivityEntry
from llamaswap.observe.captures import Capture, CaptureBuffer, CaptureCache, build_capture
from llamaswap.observe.prometheus import Metrics, api_key_label
from llamaswap.observe.store import IActivityStore
from llamaswap.observe.usage import Usage
from llamaswap.observe.usageparser import UsageParser

log = Logger()


def _header(headers: Headers, name: bytes) -> str:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else ""


class Recording:
    """One request being recorded."""

    def __init__(
        self,
        recorder: ActivityRecorder,
        *,
        model: str,
        req_path: str,
        req_headers: Headers,
        req_body: bytes,
        started: float,
        api_key_index: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self._recorder = recorder
        self.metadata = metadata
        self.api_key_index = api_key_index
        self.first_byte: float | None = None
        self.model = model
        self.req_path = req_path
        self._req_headers = req_headers
        self._req_body = req_body
        self.started = started
        self.status = 0
        self._content_type = ""
        self._resp_headers: Headers | None = None
        self._parser: UsageParser | None = None
        self._buffer: CaptureBuffer | None = None
        self._done = False
        self._finished_at = started

    def on_response(self, response: IResponse) -> Callable[[bytes], None]:
        """Hook for :meth:`UpstreamClient.forward`: returns the body observer."""
        self.status = response.code
        self._resp_headers = response.headers
        self._content_type = _header(response.headers, b"content-type")
        if self._recorder.captures is not None and response.code == 200:
            self._buffer = CaptureBuffer()
        self._parser = UsageParser(
            self.req_path,
            response.code,
            self._content_type,
            _header(response.headers, b"content-encoding"),
            decoded_sink=self._buffer.write if self._buffer is not None else None,
        )
        feed = self._parser.feed
        clock = self._recorder._clock

        def observe(data: bytes) -> None:
            # Time to first byte ends at the first *body* byte, not the headers.
            if self.first_byte is None and data:
                self.first_byte = clock.seconds()
            feed(data)

        return observe

    def finish(self, *, status: int | None = None, error: str = "") -> None:
        """Record the request once; ``status``/``error`` describe a request
        that got no upstream response (e.g. 502)."""
        if self._done:
            return
        self._done = True
        # Parse, store and capture once the response bytes are on their way.
        self._finished_at = self._recorder._clock.seconds()
        after_flush(self._recorder._clock, self._recorder._record, self, status, error)

    def _usage(self, error: str) -> Usage:
        if self._parser is not None:
            return self._parser.finish()
        return Usage(error_msg=error)


class ActivityRecorder:
    """Creates recordings and stores their rows and captures."""

    def __init__(
        self,
        clock: Any,
        store: IActivityStore,
        captures: CaptureCache | None,
        metrics: Metrics | None = None,
        on_entry: Callable[[ActivityEntry], None] | None = None,
    ) -> None:
        self._clock = clock
        self.store = store
        self.captures = captures
        self.metrics = metrics
        self._on_entry = on_entry
        #: API key index -> its exported name (bounded by the configured keys)
        self._key_names: dict[int, str] = {}

    def begin(
        self,
        *,
        model: str,
        req_path: str,
        req_headers: Headers,
        req_body: bytes,
        api_key_index: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Recording:
        return Recording(
            self,
            model=model,
            req_path=req_path,
            req_headers=req_headers,
            req_body=req_body,
            started=self._clock.seconds(),
            api_key_index=api_key_index,
            metadata=metadata,
        )

    def _record(self, recording: Recording, status: int | None, error: str) -> None:
        usage = recording._usage(error)
        if usage.warning:
            log.debug(
                "{model} {path}: {note}",
                model=recording.model,
                path=recording.req_path,
                note=usage.warning,
            )
        code = recording.status or status or 0
        wall_ms = int((recording._finished_at - recording.started) * 1000)
        if self.metrics is not None:
            tokens = usage.tokens
            ttfb = (
                None if recording.first_byte is None else recording.first_byte - recording.started
            )
            key = recording.api_key_index
            key_name = None
            if key is not None:
                key_name = self._key_names.get(key)
                if key_name is None:
                    key_name = self._key_names[key] = api_key_label(key)
            self.metrics.request_finished(
                recording.model,
                recording.req_path,
                code,
                tokens,
                ttfb,
                tokens.prompt_per_second,
                tokens.tokens_per_second,
                key_name,
            )
        d = self.store.add(
            model=recording.model,
            req_path=recording.req_path,
            resp_content_type=recording._content_type,
            resp_status_code=code,
            usage=usage,
            wall_ms=wall_ms,
            timestamp=recording.started,
            metadata=recording.metadata,
        )
        d.addCallback(self._stored, recording, code)
        d.addErrback(lambda f: log.failure("could not record activity", f))

    def _stored(self, entry: ActivityEntry, recording: Recording, code: int) -> None:
        if self.captures is None:
            self._announce(entry)
            return

        def build() -> Capture:  # runs off the reactor: the request is over
            return build_capture(
                id=entry.id,
                req_path=recording.req_path,
                req_headers=recording._req_headers,
                req_body=recording._req_body,
                resp_status=code,
                resp_headers=recording._resp_headers,
                resp_body=recording._buffer,
            )

        # Announced once its capture is stored (or given up).
        stored = self.captures.add_later(entry.id, recording.req_path, build)
        stored.addCallback(lambda _: self._announce(entry))

    def close(self) -> None:
        """Stop encoding captures (the service is stopping)."""
        if self.captures is not None:
            self.captures.close()

    def _announce(self, entry: ActivityEntry) -> None:
        if self._on_entry is not None:
            self._on_entry(entry)
