"""Shared helpers for integration tests: loopback servers and bounded polling."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, task
from twisted.web.resource import Resource
from twisted.web.server import Site

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESPONDER = os.path.join(HERE, "responder.py")
PYTHON = sys.executable


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listen(resource: Resource, site_factory: Callable[[Resource], Site] = Site) -> Any:
    """Serve ``resource`` on an ephemeral loopback port; returns the port."""
    site = site_factory(resource)
    site.noisy = False
    return reactor.listenTCP(0, site, interface="127.0.0.1")


def base_url(port: Any) -> str:
    return f"http://127.0.0.1:{port.getHost().port}"


async def poll_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Wait until ``predicate()`` is true; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await task.deferLater(reactor, interval, lambda: None)
