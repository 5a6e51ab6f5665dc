"""Activity rows: one finished model request, as ``/api/metrics/activity`` shows it.

An `ActivityEntry` is made when a recorded request ends (from the `Usage`
its response gave, see `llamaswap.observe.usageparser`) and stored by an
activity store; `ActivityEntry.to_json` is the row's JSON, timestamps in
Go's RFC 3339 spelling.  Querying rows is `llamaswap.observe.queries`'.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from llamaswap.observe.usage import TokenMetrics, Usage

__all__ = ["ActivityEntry", "format_timestamp"]


def format_timestamp(seconds: float) -> str:
    """RFC 3339 in UTC with trailing fractional zeros trimmed (Go's RFC3339Nano)."""
    moment = datetime.fromtimestamp(seconds, UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


@dataclass(frozen=True)
class ActivityEntry:
    """One activity row (llama-swap's ``ActivityLogEntry``); ``timestamp`` is epoch seconds."""

    id: int
    timestamp: float
    model: str
    req_path: str
    resp_content_type: str
    resp_status_code: int
    tokens: TokenMetrics
    duration_ms: int
    has_capture: bool = False
    error_msg: str = ""
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def finished(
        cls,
        *,
        id: int,
        model: str,
        req_path: str,
        resp_content_type: str,
        resp_status_code: int,
        usage: Usage,
        wall_ms: int,
        timestamp: float,
        metadata: Mapping[str, str] | None = None,
    ) -> ActivityEntry:
        """The row of a request that ended after ``wall_ms`` with ``usage``
        (what every activity store's ``add`` records)."""
        return cls(
            id=id,
            timestamp=timestamp,
            model=model,
            req_path=req_path,
            resp_content_type=resp_content_type,
            resp_status_code=resp_status_code,
            tokens=usage.tokens,
            duration_ms=usage.duration_ms(wall_ms),
            error_msg=usage.error_msg,
            metadata=MappingProxyType(dict(metadata or {})),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``/api/metrics/activity`` and ``/api/metrics`` rows."""
        row: dict[str, Any] = {
            "id": self.id,
            "timestamp": format_timestamp(self.timestamp),
            "model": self.model,
            "req_path": self.req_path,
            "resp_content_type": self.resp_content_type,
            "resp_status_code": self.resp_status_code,
            "tokens": self.tokens.to_json(),
            "duration_ms": self.duration_ms,
            "has_capture": self.has_capture,
        }
        if self.error_msg:
            row["error_msg"] = self.error_msg
        if self.metadata:
            row["metadata"] = dict(self.metadata)
        return row
