#!/usr/bin/env python3
"""CPU cost of reading one request on llamaswap's HTTP channel, in-process.

Feeds a typical chat-completion request (head and body in one read, as
clients send it) to a ``LlamaSwapSite`` channel over and over, with a trivial
leaf resource, and reports the best per-request time of several rounds for
the head read in one pass (``one_pass_heads``, the default) and for
Twisted's line-by-line path::

    python bench/request_head.py [--rounds 10] [--requests 2000]

It measures the server side of the request path up to the resource (head,
``Request``, body, ``process``, render, the response write) and nothing of
the network; figures are comparable within one run only.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from llamaswap.web import limits
from llamaswap.web.site import LlamaSwapSite

BODY = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"stream":true}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Accept-Encoding: identity\r\nContent-Length: %d\r\n"
    b"Content-Type: application/json\r\n\r\n" % len(BODY) + BODY
)


class _Leaf(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


def per_request_us(one_pass: bool, rounds: int, requests: int) -> float:
    """The best of ``rounds`` rounds of ``requests`` requests, in µs each."""
    keep = limits.one_pass_heads
    if not one_pass:
        limits.one_pass_heads = lambda channel: None  # type: ignore[assignment]
    try:
        site = LlamaSwapSite(_Leaf(), reactor=Clock())
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    finally:
        limits.one_pass_heads = keep
    site.log = lambda request: None  # type: ignore[method-assign]
    transport = StringTransport()
    protocol.makeConnection(transport)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(requests):
            protocol.dataReceived(REQUEST)
            transport.clear()
        best = min(best, (time.perf_counter() - start) / requests * 1e6)
    protocol.connectionLost(None)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    for _ in range(3):
        line = per_request_us(False, args.rounds, args.requests)
        one = per_request_us(True, args.rounds, args.requests)
        print(f"line by line {line:5.1f} us   one pass {one:5.1f} us   ({one / line:.2f}x)")


if __name__ == "__main__":
    main()
