"""Pure scheduling: who gets a model, when swaps start, what they evict."""

from __future__ import annotations

from llamaswap.scheduling.planner import ISwapPlanner, SingleModelPlanner
from llamaswap.scheduling.scheduler import (
    IEffects,
    Scheduler,
    SchedulerSnapshot,
    ShuttingDown,
    UnknownModel,
)
from llamaswap.scheduling.tickets import Ticket, TicketStage

__all__ = [
    "IEffects",
    "ISwapPlanner",
    "Scheduler",
    "SchedulerSnapshot",
    "ShuttingDown",
    "SingleModelPlanner",
    "Ticket",
    "TicketStage",
    "UnknownModel",
]
