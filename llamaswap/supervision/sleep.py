"""The sleep tier's HTTP calls: put a model's server to sleep, wake it.

A model with ``sleep`` (:mod:`llamaswap.config.sleep`) is sent its ``enter``
calls instead of being stopped, and its ``wake`` calls when a request needs
it again (vLLM: ``POST /sleep?level=1``, ``POST /wake_up``).  The calls go to
the model's proxy URL, in order; any answer but 2xx, a connection error or
a time-out fails the step (the state machine then stops, or restarts, the
server: :mod:`llamaswap.supervision.machine`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, readBody

from llamaswap.config.sleep import split_call

__all__ = ["SleepCaller", "SleepError", "agent_caller", "run_calls"]

#: seconds one call may take (vLLM moves the weights during the call).
CALL_TIMEOUT = 120.0

#: ``caller(method, url, timeout)``: fires with the answer's status code.
SleepCaller = Callable[[str, str, float], "Deferred[int]"]


class SleepError(Exception):
    """A sleep or wake call failed; the message says which and how."""


def agent_caller(reactor: IReactorTime) -> SleepCaller:
    """A :data:`SleepCaller` on a Twisted ``Agent`` (no connection pooling:
    the calls are rare)."""
    agent = Agent(reactor)

    def call(method: str, url: str, timeout: float) -> Deferred[int]:
        async def exchange() -> int:
            response = await agent.request(method.encode(), url.encode())
            await readBody(response)
            return int(response.code)

        d = Deferred.fromCoroutine(exchange())
        d.addTimeout(timeout, reactor)
        return d

    return call


async def run_calls(
    caller: SleepCaller, base_url: str, calls: Sequence[str], timeout: float = CALL_TIMEOUT
) -> None:
    """Send ``calls`` (``METHOD /path``) to ``base_url`` in order; raise
    :class:`SleepError` on the first that does not answer 2xx."""
    base = base_url.rstrip("/")
    for call in calls:
        method, path = split_call(call)
        try:
            status = await caller(method, base + path, timeout)
        except Exception as e:
            raise SleepError(f"{call}: {type(e).__name__}: {e}") from e
        if not 200 <= status < 300:
            raise SleepError(f"{call}: answered {status}")
