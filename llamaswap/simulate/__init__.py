"""The policy simulator: what a config would have done with a request trace.

``llamaswap simulate CONFIG [OTHER_CONFIG] --trace FILE`` (docs/placement.md,
"Simulating your traffic") replays a trace (:mod:`.trace`) through the real
:class:`~llamaswap.scheduling.Scheduler` and the config's planners on a
virtual clock (:mod:`.engine`): starting a model is "ready after its load
time", a request is "done after its duration".  No process, socket or
reactor is involved, so a day of traffic replays in about a second.
"""

from __future__ import annotations

from llamaswap.simulate.engine import Outcome, Simulation, Usage
from llamaswap.simulate.trace import Request, TraceError, learned_load_times, read_trace

__all__ = [
    "Outcome",
    "Request",
    "Simulation",
    "TraceError",
    "Usage",
    "learned_load_times",
    "read_trace",
]
