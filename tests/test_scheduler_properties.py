"""Property tests for the scheduler over real planners and a fake process table.

A :class:`World` plays the router: it implements :class:`IEffects`, keeps a
table of process states the scheduler reads through ``state_of``, runs swaps
in two phases (stop the evicted models, then start the target) and re-enters
the scheduler from its effects the way clients and processes can (a grant
that finishes its request at once, a failure the client retries, a swap
answered synchronously, a client leaving when its queue position moves).

Random sequences of requests, cancellations, swap answers, serve-done, TTL
stops, crashes, unloads and clock advances are played against
:class:`GroupPlanner` (a ``swap: true`` group, a ``swap: false`` group, a
persistent non-exclusive group and a default-group model) and against
:class:`SingleModelPlanner` with ``max_wait``.  After every step the world
checks the invariants listed in :meth:`World.check`; at the end everything is
driven to rest and every request must have ended exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from llamaswap.scheduling import (
    IEffects,
    ISwapPlanner,
    Scheduler,
    ShuttingDown,
    SingleModelPlanner,
    Ticket,
    TicketStage,
)
from llamaswap.scheduling.groups import Group, GroupPlanner

#: process states that occupy a model's slot in a ``swap: true`` group.
_LOADED = frozenset({"ready", "starting"})

MAX_WAIT = 30.0

# ticket behaviour flags, drawn at admission
GONE = 1  # the client is gone by the time of the grant (grant refused)
SERVE_AT_ONCE = 2  # the grant finishes the request synchronously (re-entrant serve_done)
RETRY = 4  # on failure the client retries once, from inside the fail effect
LEAVE_ON_MOVE = 8  # the client leaves (re-entrant cancel) when told a position >= 2

_FLAGS = st.sampled_from([0, 0, 0, 0, 0, GONE, SERVE_AT_ONCE, RETRY, LEAVE_ON_MOVE, RETRY | 2])

#: how the world answers each start_swap, consumed cyclically.
_START_MODES = st.lists(
    st.sampled_from(["async", "async", "async", "sync_ok", "sync_fail"]), min_size=1, max_size=6
)


@dataclass(eq=False)
class PendingSwap:
    """A start_swap the world has not answered yet."""

    target: str
    evict: frozenset[str]
    phase: str = "evicting"  # then "starting"; the next advance answers
    aborted: bool = False  # the target was unloaded: the answer is "aborted"


@dataclass
class TicketInfo:
    flags: int
    history: list[str] = field(default_factory=list)
    submitted_at: float | None = None
    queued_since: float | None = None
    position: int = 0
    cancel_requested: bool = False
    retried: bool = False


class InvariantError(AssertionError):
    pass


@implementer(IEffects)
class World:
    """Fake processes and clients driven by the scheduler's effects."""

    def __init__(
        self,
        planner: ISwapPlanner,
        models: Iterable[str],
        limits: Mapping[str, int],
        swap_groups: Iterable[frozenset[str]],
        *,
        priorities: Mapping[str, int] | None = None,
        max_wait: float | None = None,
        start_modes: list[str] | None = None,
    ) -> None:
        self.models = tuple(models)
        self.states = dict.fromkeys(self.models, "stopped")
        self.swap_groups = [frozenset(g) for g in swap_groups]
        self.clock = Clock()
        self.pending: list[PendingSwap] = []
        self.tickets: list[Ticket] = []
        self.info: dict[Ticket, TicketInfo] = {}
        self.unsubmitted: list[Ticket] = []
        self.start_modes = start_modes or ["async"]
        self._starts = 0
        #: targets whose successful answer was delivered during this action.
        self.answering: set[str] = set()
        self.check_fairness = max_wait is not None
        self.max_wait = max_wait
        self.planner = planner
        self.closed = False
        self.log: list[str] = []
        verifyObject(IEffects, self)
        self.scheduler = Scheduler(
            self,
            planner,
            self.states.__getitem__,
            limits,
            priorities,
            max_wait=max_wait,
            clock=self.clock.seconds,
        )

    # -- helpers --------------------------------------------------------------

    def fail_check(self, message: str) -> None:
        raise InvariantError(message + "\n  log: " + "\n       ".join(self.log[-40:]))

    def live_targets(self) -> list[PendingSwap]:
        return [swap for swap in self.pending if not swap.aborted]

    def check_loaded(self) -> None:
        """Invariant 3: at most one member of a swap group is ready or starting."""
        for group in self.swap_groups:
            loaded = sorted(m for m in group if self.states[m] in _LOADED)
            if len(loaded) > 1:
                self.fail_check(f"swap group members loaded together: {loaded} {self.states}")

    # -- client side ----------------------------------------------------------

    def admit(self, model: str, flags: int) -> Ticket | None:
        try:
            ticket = self.scheduler.admit(model)
        except ShuttingDown:
            assert self.closed
            return None
        if ticket is not None:
            self.tickets.append(ticket)
            self.info[ticket] = TicketInfo(flags)
            self.log.append(f"admit {model}#{len(self.tickets) - 1} flags={flags}")
        return ticket

    def name(self, ticket: Ticket) -> str:
        return f"{ticket.model}#{self.tickets.index(ticket)}"

    def submit(self, ticket: Ticket) -> None:
        self.info[ticket].submitted_at = self.clock.seconds()
        self.log.append(f"submit {self.name(ticket)}")
        self.scheduler.submit(ticket)

    def request(self, model: str, flags: int) -> Ticket | None:
        ticket = self.admit(model, flags)
        if ticket is not None:
            self.submit(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        self.info[ticket].cancel_requested = True
        self.log.append(f"cancel {self.name(ticket)} ({ticket.stage.value})")
        self.scheduler.cancel(ticket)

    def serve_done(self, ticket: Ticket) -> None:
        self.info[ticket].history.append("served")
        self.log.append(f"serve_done {self.name(ticket)}")
        self.scheduler.serve_done(ticket)

    # -- process side ---------------------------------------------------------

    def notify_stopped(self, model: str) -> None:
        self.log.append(f"state_changed {model} -> {self.states[model]}")
        self.scheduler.state_changed(model)

    def advance(self, index: int, ok: bool) -> None:
        """Move the oldest pending swap of the target picked by ``index`` one phase."""
        target = self.pending[index % len(self.pending)].target
        swap = next(s for s in self.pending if s.target == target)
        if swap.phase == "evicting":
            swap.phase = "starting"
            settled = [m for m in sorted(swap.evict) if self.states[m] == "stopping"]
            for model in settled:
                self.states[model] = "stopped"
            self.log.append(f"evicted {sorted(swap.evict)} for {target} (aborted={swap.aborted})")
            for model in settled:
                self.notify_stopped(model)
            if swap.aborted:
                return
            if self.states[target] == "stopping":  # a restart waits for the stop
                self.states[target] = "stopped"
                self.notify_stopped(target)
            if self.states[target] != "ready":
                self.states[target] = "starting"
            self.check_loaded()
            return
        self.pending.remove(swap)
        if swap.aborted:
            self.log.append(f"swap_done {target} aborted")
            self.scheduler.swap_done(target, "aborted")
        elif ok:
            self.states[target] = "ready"
            self.check_loaded()
            self.answering.add(target)
            self.log.append(f"swap_done {target} ok")
            self.scheduler.swap_done(target, None)
        else:
            self.log.append(f"swap_done {target} failed")
            if self.states[target] == "starting":
                self.states[target] = "stopped"
                self.notify_stopped(target)
            self.scheduler.swap_done(target, "health check timed out after 2m0s")

    def settle(self, model: str) -> None:
        """A stopping process (TTL, unload, eviction) finishes stopping."""
        if self.states[model] == "stopping":
            self.states[model] = "stopped"
            self.notify_stopped(model)

    def idle_candidate(self, model: str) -> bool:
        """Ready and not the target of a swap under way (TTL and crashes are
        only played on such models)."""
        return self.states[model] == "ready" and all(
            swap.target != model for swap in self.live_targets()
        )

    def ttl(self, model: str, immediate: bool) -> None:
        if self.idle_candidate(model) and not self.scheduler.in_flight(model):
            self.log.append(f"ttl {model} immediate={immediate}")
            if immediate:
                self.states[model] = "stopped"
                self.notify_stopped(model)
            else:
                self.states[model] = "stopping"

    def crash(self, model: str) -> None:
        if self.idle_candidate(model):
            self.log.append(f"crash {model} in_flight={self.scheduler.in_flight(model)}")
            self.states[model] = "stopped"
            self.notify_stopped(model)

    def unload(self, models: frozenset[str] | None) -> None:
        self.log.append(f"unload {None if models is None else sorted(models)}")
        self.scheduler.unload(models)

    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.log.append(f"tick {seconds} -> {self.clock.seconds()}")

    def shutdown(self) -> None:
        self.closed = True
        self.log.append("shutdown")
        self.scheduler.shutdown()

    # -- IEffects -------------------------------------------------------------

    def start_swap(self, target: str, evict: frozenset[str]) -> None:
        self.log.append(f"start_swap {target} evict={sorted(evict)}")
        if target in evict:
            self.fail_check(f"{target} evicts itself")
        busy = sorted(m for m in evict if self.scheduler.in_flight(m))
        if busy:  # invariant 4
            self.fail_check(f"swap to {target} evicts busy models {busy}")
        for other in self.live_targets():
            if other.target == target:
                self.fail_check(f"second swap to {target} while one is under way")
            if other.target in evict or target in other.evict or evict & other.evict:
                self.fail_check(f"swap {target}-{sorted(evict)} collides with {other}")
        starters = [t for t in self.tickets if t.model == target and t.stage is TicketStage.WAITING]
        if len(starters) != 1:
            self.fail_check(f"swap to {target} has waiters {starters}, not one starter")
        mode = self.start_modes[self._starts % len(self.start_modes)]
        self._starts += 1
        if mode == "async":
            for model in evict:
                if self.states[model] in _LOADED:
                    self.states[model] = "stopping"
            self.pending.append(PendingSwap(target, evict))
            self.check_loaded()
            return
        # answered before start_swap returns: the scheduler must queue the answer
        for model in evict:
            self.states[model] = "stopped"
        self.states[target] = "ready" if mode == "sync_ok" else "stopped"
        self.check_loaded()
        for model in sorted(evict):
            self.scheduler.state_changed(model)
        if mode == "sync_ok":
            self.answering.add(target)
            self.scheduler.swap_done(target, None)
        else:
            self.scheduler.swap_done(target, "failed to start command")

    def grant(self, ticket: Ticket) -> bool:
        info = self.info[ticket]
        model = ticket.model
        self.log.append(f"grant {self.name(ticket)}")
        if ticket.stage is not TicketStage.GRANTED:
            self.fail_check(f"grant of {ticket} in stage {ticket.stage}")
        if self.states[model] != "ready":  # invariant 6
            self.fail_check(f"granted {model} in state {self.states[model]}")
        if info.history:
            self.fail_check(f"second ending for {self.name(ticket)}: {info.history} + grant")
        if self.check_fairness and model not in self.answering:
            self.check_fair_grant(ticket)
        gone = bool(info.flags & GONE)
        info.history.append("refused" if gone else "granted")
        if not gone and info.flags & SERVE_AT_ONCE:
            self.serve_done(ticket)
        return not gone

    def check_fair_grant(self, ticket: Ticket) -> None:
        """Invariant 5: a request submitted after a queued request for another
        model had waited max_wait does not overtake it by the fast path."""
        assert self.max_wait is not None
        submitted = self.info[ticket].submitted_at
        assert submitted is not None
        for other in self.tickets:
            since = self.info[other].queued_since
            if (
                other.model != ticket.model
                and other.stage is TicketStage.QUEUED
                and since is not None
                and since <= submitted - self.max_wait
            ):
                self.fail_check(
                    f"{self.name(ticket)} (submitted at {submitted}) granted by the fast path "
                    f"although {self.name(other)} has been queued since {since}"
                )

    def fail(self, ticket: Ticket, message: str) -> None:
        info = self.info[ticket]
        self.log.append(f"fail {self.name(ticket)}: {message}")
        if info.history:
            self.fail_check(f"second ending for {self.name(ticket)}: {info.history} + fail")
        if ticket.stage is not TicketStage.DONE or not message:
            self.fail_check(f"fail of {ticket} in stage {ticket.stage}: {message!r}")
        info.history.append("failed")
        if info.flags & RETRY and not info.retried:
            info.retried = True
            self.request(ticket.model, 0)

    def queue_position(self, ticket: Ticket, position: int) -> None:
        info = self.info[ticket]
        if ticket.stage is not TicketStage.QUEUED:
            self.fail_check(f"position for {self.name(ticket)} in stage {ticket.stage}")
        if not 1 <= position <= self.scheduler.queue_length():
            self.fail_check(f"position {position} of {self.scheduler.queue_length()}")
        if info.queued_since is None:
            info.queued_since = self.clock.seconds()
        info.position = position
        if info.flags & LEAVE_ON_MOVE and position >= 2 and not info.cancel_requested:
            self.cancel(ticket)

    def stop_models(self, models: frozenset[str]) -> None:
        self.log.append(f"stop_models {sorted(models)}")
        if not isinstance(models, frozenset) or not models:
            self.fail_check(f"stop_models({models!r})")
        for model in models:
            if self.states[model] in _LOADED:
                self.states[model] = "stopping"
        for swap in self.pending:
            if swap.target in models:
                swap.aborted = True

    # -- invariants -----------------------------------------------------------

    def check(self) -> None:
        """The invariants between top-level actions.  The effects check the
        rest as they happen: no busy victim (start_swap), grants only to
        ready models and fairness (grant), one ending per request (grant,
        fail), no two swap-group members loaded (every state change).

        Here: every request's endings match its stage; reserved and in-flight
        counts equal the open and granted requests (so never negative);
        queue, waiter and swap bookkeeping agree with the world; queue
        positions are current; no queued request could be routed now."""
        self.answering.clear()
        self.check_loaded()
        scheduler = self.scheduler
        open_tickets: Counter[str] = Counter()
        serving: Counter[str] = Counter()
        queued = 0
        waiting: Counter[str] = Counter()
        for ticket in self.tickets:
            info = self.info[ticket]
            stage = ticket.stage
            history = info.history
            # invariant 1: at most one ending, consistent with the stage
            if stage is TicketStage.DONE:
                if history not in (["granted", "served"], ["failed"], ["refused"]) and not (
                    history == [] and info.cancel_requested
                ):
                    self.fail_check(f"{self.name(ticket)} ended with {history}")
            elif stage is TicketStage.GRANTED:
                if history != ["granted"]:
                    self.fail_check(f"{self.name(ticket)} granted with {history}")
            elif history:
                self.fail_check(f"{self.name(ticket)} {stage} with {history}")
            if stage is not TicketStage.DONE:
                open_tickets[ticket.model] += 1
            if stage is TicketStage.GRANTED:
                serving[ticket.model] += 1
            if stage is TicketStage.QUEUED:
                queued += 1
            if stage is TicketStage.WAITING:
                waiting[ticket.model] += 1
        snapshot = scheduler.snapshot()
        for model in self.models:
            reserved, in_flight = scheduler.reserved(model), scheduler.in_flight(model)
            # invariant 2, and the counts match the tickets exactly
            if reserved < 0 or in_flight < 0:
                self.fail_check(f"{model}: reserved={reserved} in_flight={in_flight}")
            if (reserved, in_flight) != (open_tickets[model], serving[model]):
                self.fail_check(
                    f"{model}: reserved={reserved} in_flight={in_flight}, expected "
                    f"{open_tickets[model]} open and {serving[model]} granted"
                )
        if scheduler.queue_length() != queued:
            self.fail_check(f"queue length {scheduler.queue_length()} != {queued} queued tickets")
        if {m: n for m, n in snapshot.waiting.items() if n} != +waiting:
            self.fail_check(f"waiting {dict(snapshot.waiting)} != {dict(waiting)}")
        if not self.closed:
            live = {swap.target for swap in self.live_targets()}
            if not live <= set(snapshot.swaps):
                self.fail_check(f"world swaps {live} not active in {dict(snapshot.swaps)}")
        self.check_positions()
        self.check_work_conserving()

    def check_positions(self) -> None:
        """Every queued request's latest position is its place in the queue."""
        queued = [t for t in self.tickets if t.stage is TicketStage.QUEUED]
        positions = sorted(self.info[t].position for t in queued)
        if positions != list(range(1, len(queued) + 1)):
            self.fail_check(f"stale queue positions {positions}")
        by_position = sorted(queued, key=lambda t: self.info[t].position)
        if tuple(t.model for t in by_position) != self.scheduler.snapshot().queued:
            self.fail_check(f"positions disagree with {self.scheduler.snapshot().queued}")

    def check_work_conserving(self) -> None:
        """Nothing waits without a reason: no queued request could be routed
        now (join a swap, start one, or take the fast path).  The reasons to
        stay queued are the scheduler's: a collision with a swap under way, a
        busy model to evict, or (fast path only) a max_wait hold."""
        scheduler = self.scheduler
        snapshot = scheduler.snapshot()
        now = self.clock.seconds()
        queued = [t for t in self.tickets if t.stage is TicketStage.QUEUED]
        for ticket in queued:
            model = ticket.model
            if model in snapshot.swaps:
                self.fail_check(f"{self.name(ticket)} queued beside a swap to its model")
            live = {m for m, s in self.states.items() if s not in ("stopped", "shutdown")}
            if self.states[model] == "stopping":
                live.discard(model)
            running = frozenset(live | (set(snapshot.swaps) - {model}))
            evict = self.planner.evict_set(model, running)
            if any(
                other in evict or model in other_evict or evict & other_evict
                for other, other_evict in snapshot.swaps.items()
            ):
                continue
            if any(scheduler.in_flight(victim) for victim in evict):
                continue
            if self.states[model] == "stopping":
                # ready -> stopping (TTL) is not reported; the request is
                # routed (a restart) when the stop ends and state_changed comes
                continue
            if evict or self.states[model] != "ready":
                self.fail_check(f"{self.name(ticket)} could start its swap, evicting {evict}")
            held = self.max_wait is not None and any(
                other.model != model
                and self.info[other].queued_since is not None
                and self.info[other].queued_since <= now - self.max_wait
                for other in queued
            )
            if not held:
                self.fail_check(f"{self.name(ticket)} could take the fast path")

    def drive_to_rest(self) -> None:
        """Submit, answer, settle and serve until nothing moves."""
        for _ in range(10_000):
            if self.unsubmitted:
                self.submit(self.unsubmitted.pop(0))
            elif self.pending:
                self.advance(0, True)
            elif any(state == "stopping" for state in self.states.values()):
                self.settle(next(m for m, s in self.states.items() if s == "stopping"))
            else:
                granted = [t for t in self.tickets if t.stage is TicketStage.GRANTED]
                if not granted:
                    break
                self.serve_done(granted[0])
            self.check()
        else:
            self.fail_check("never came to rest")

    def check_rest(self, testcase: SynchronousTestCase) -> None:
        scheduler = self.scheduler
        snapshot = scheduler.snapshot()
        testcase.assertEqual(
            (
                snapshot.queued,
                dict(snapshot.swaps),
                dict(snapshot.reserved),
                dict(snapshot.in_flight),
            ),
            ((), {}, {}, {}),
            self.log[-40:],
        )
        for ticket in self.tickets:
            testcase.assertIs(ticket.stage, TicketStage.DONE, self.name(ticket))
            history = self.info[ticket].history
            testcase.assertIn(
                history,
                [["granted", "served"], ["failed"], ["refused"]]
                + ([[]] if self.info[ticket].cancel_requested else []),
                self.name(ticket),
            )


# -- action sequences -----------------------------------------------------------


def _actions(models: tuple[str, ...], ticks: list[float]) -> st.SearchStrategy:
    """Action lists; the weights make requests, answers and serves common and
    unloads rare enough for queues to build up."""
    model = st.sampled_from(models)
    index = st.integers(0, 63)
    kinds = {
        "request": (8, (model, _FLAGS)),
        "admit": (1, (model, _FLAGS)),
        "submit": (1, (index,)),
        "cancel": (1, (index,)),
        "advance": (6, (index, st.sampled_from([True, True, True, False]))),
        "serve_done": (6, (index,)),
        "ttl": (2, (model, st.booleans())),
        "settle": (1, (model,)),
        "crash": (1, (model,)),
        "unload": (1, (st.none() | st.frozensets(model, min_size=1, max_size=2),)),
        "tick": (3, (st.sampled_from(ticks),)),
    }
    strategies = {kind: st.tuples(st.just(kind), *args) for kind, (_, args) in kinds.items()}
    weighted = [kind for kind, (weight, _) in kinds.items() for _ in range(weight)]
    action = st.sampled_from(weighted).flatmap(strategies.__getitem__)
    return st.lists(action, min_size=30, max_size=90)


def play(world: World, actions: list[tuple], shutdown: bool) -> None:
    def pick(index: int, among: list[Ticket]) -> Ticket | None:
        return among[index % len(among)] if among else None

    for action in actions:
        kind = action[0]
        if kind == "request":
            world.request(action[1], action[2])
        elif kind == "admit":
            ticket = world.admit(action[1], action[2])
            if ticket is not None:
                world.unsubmitted.append(ticket)
        elif kind == "submit":
            ticket = pick(action[1], world.unsubmitted)
            if ticket is not None:
                world.unsubmitted.remove(ticket)
                world.submit(ticket)
        elif kind == "cancel":
            open_tickets = [t for t in world.tickets if t.stage is not TicketStage.DONE]
            ticket = pick(action[1], open_tickets)
            if ticket is not None:
                world.cancel(ticket)
        elif kind == "advance":
            if world.pending:
                world.advance(action[1], action[2])
        elif kind == "serve_done":
            ticket = pick(action[1], [t for t in world.tickets if t.stage is TicketStage.GRANTED])
            if ticket is not None:
                world.serve_done(ticket)
        elif kind == "ttl":
            world.ttl(action[1], action[2])
        elif kind == "settle":
            world.settle(action[1])
        elif kind == "crash":
            world.crash(action[1])
        elif kind == "unload":
            world.unload(action[1])
        else:
            world.tick(action[1])
        world.check()
    if shutdown:
        world.shutdown()
        world.check()
    world.drive_to_rest()


GROUP_MODELS = ("s1", "s2", "t1", "t2", "p1", "d1")
SINGLE_MODELS = ("a", "b", "c", "d")


def group_planner(swap_exclusive: bool, together_exclusive: bool) -> GroupPlanner:
    return GroupPlanner(
        {
            "swapping": Group(("s1", "s2"), swap=True, exclusive=swap_exclusive),
            "together": Group(("t1", "t2"), swap=False, exclusive=together_exclusive),
            "pinned": Group(("p1",), persistent=True, exclusive=False),
        }
    )


_SETTINGS = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class SchedulerInvariantTests(SynchronousTestCase):
    """Random interleavings over real planners; invariants after every step."""

    @_SETTINGS
    @given(
        actions=_actions(GROUP_MODELS, [1.0, 10.0, MAX_WAIT]),
        swap_exclusive=st.booleans(),
        together_exclusive=st.booleans(),
        max_wait=st.sampled_from([None, MAX_WAIT]),
        priorities=st.sampled_from([{}, {}, {"d1": 5, "s2": 1}]),
        start_modes=_START_MODES,
        shutdown=st.booleans(),
    )
    def test_group_planner(
        self,
        actions: list[tuple],
        swap_exclusive: bool,
        together_exclusive: bool,
        max_wait: float | None,
        priorities: dict[str, int],
        start_modes: list[str],
        shutdown: bool,
    ) -> None:
        """Group planner: every request ends once, counts stay exact, one
        member of the swap group is loaded at a time, busy models are never
        evicted, grants go to ready models, the queue never sticks."""
        world = World(
            group_planner(swap_exclusive, together_exclusive),
            GROUP_MODELS,
            {"s1": 2, "s2": 4, "t1": 4, "t2": 4, "p1": 3, "d1": 4},
            [frozenset({"s1", "s2"})],
            priorities=priorities,
            max_wait=max_wait,
            start_modes=start_modes,
        )
        play(world, actions, shutdown)
        world.check_rest(self)

    @_SETTINGS
    @given(
        actions=_actions(SINGLE_MODELS, [1.0, 5.0, 15.0, MAX_WAIT]),
        start_modes=_START_MODES,
        shutdown=st.booleans(),
    )
    def test_single_model_max_wait(
        self, actions: list[tuple], start_modes: list[str], shutdown: bool
    ) -> None:
        """Single-model planner with max_wait: the invariants above (all models
        form one swap group) plus fairness: once a queued request has waited
        max_wait, later requests for other models get no fast-path grant
        while it is still queued."""
        world = World(
            SingleModelPlanner(),
            SINGLE_MODELS,
            {"a": 2, "b": 4, "c": 4, "d": 4},
            [frozenset(SINGLE_MODELS)],
            max_wait=MAX_WAIT,
            start_modes=start_modes,
        )
        play(world, actions, shutdown)
        world.check_rest(self)


class TrickyInterleavingTests(SynchronousTestCase):
    """Deterministic cases for interleavings the property tests revolve around.
    Each runs in a :class:`World`, so every effect is checked as it happens."""

    def single(self, **kwargs: object) -> World:
        kwargs.setdefault("max_wait", MAX_WAIT)
        self.world = World(
            SingleModelPlanner(),
            SINGLE_MODELS,
            dict.fromkeys(SINGLE_MODELS, 10),
            [frozenset(SINGLE_MODELS)],
            **kwargs,  # type: ignore[arg-type]
        )
        return self.world

    def groups(
        self,
        swap_exclusive: bool = True,
        together_exclusive: bool = True,
        max_wait: float | None = None,
    ) -> World:
        self.world = World(
            group_planner(swap_exclusive, together_exclusive),
            GROUP_MODELS,
            dict.fromkeys(GROUP_MODELS, 10),
            [frozenset({"s1", "s2"})],
            max_wait=max_wait,
        )
        return self.world

    def request(self, model: str, flags: int = 0) -> Ticket:
        ticket = self.world.request(model, flags)
        assert ticket is not None
        self.world.check()
        return ticket

    def serve_done(self, ticket: Ticket) -> None:
        self.world.serve_done(ticket)
        self.world.check()

    def answer(self, target: str, ok: bool = True) -> None:
        """Run the oldest pending swap to ``target`` to its answer."""
        world = self.world
        index = next(i for i, swap in enumerate(world.pending) if swap.target == target)
        swap = world.pending[index]
        while swap in world.pending:
            world.advance(index, ok)
            world.check()

    def ready(self, model: str) -> Ticket:
        """Load ``model`` with one request and return that (granted) request."""
        ticket = self.request(model)
        self.answer(model)
        self.assertIs(ticket.stage, TicketStage.GRANTED)
        return ticket

    def starts(self) -> list[str]:
        return [line for line in self.world.log if line.startswith("start_swap")]

    def test_max_wait_boundary_is_inclusive(self) -> None:
        """A request submitted exactly max_wait after another model's request
        queued is held back; one submitted a second earlier is not."""
        world = self.single()
        a1 = self.ready("a")
        b1 = self.request("b")
        world.tick(MAX_WAIT - 1)
        a2 = self.request("a")
        self.assertIs(a2.stage, TicketStage.GRANTED)
        world.tick(1)
        a3 = self.request("a")
        self.assertIs(a3.stage, TicketStage.QUEUED)
        self.serve_done(a1)
        self.serve_done(a2)
        self.assertEqual(self.starts()[-1], "start_swap b evict=['a']")
        self.assertEqual((b1.stage, a3.stage), (TicketStage.WAITING, TicketStage.QUEUED))
        self.answer("b")
        self.serve_done(b1)
        self.assertEqual(self.starts()[-1], "start_swap a evict=['b']")
        world.drive_to_rest()
        world.check_rest(self)

    def test_cancelling_the_old_request_releases_the_hold(self) -> None:
        """Once the request that waited max_wait leaves, a held-back request
        for the running model takes the fast path at once."""
        world = self.single()
        a1 = self.ready("a")
        b1 = self.request("b")
        world.tick(MAX_WAIT)
        a2 = self.request("a")
        self.assertIs(a2.stage, TicketStage.QUEUED)
        world.cancel(b1)
        world.check()
        self.assertIs(a2.stage, TicketStage.GRANTED)
        self.assertEqual(self.world.info[a2].history, ["granted"])
        self.serve_done(a1)
        world.drive_to_rest()
        world.check_rest(self)

    def test_join_during_swap_is_not_held_back(self) -> None:
        """max_wait only stops the fast path: a request arriving while its
        model is still loading joins that load (collation) and is served
        before a request for another model that has waited max_wait.  The
        property test's fairness check exempts such joins for this reason."""
        world = self.single()
        a1 = self.request("a")
        b1 = self.request("b")
        world.tick(MAX_WAIT + 5)
        a2 = self.request("a")
        self.assertIs(a2.stage, TicketStage.WAITING)
        self.answer("a")
        self.assertEqual(
            (a1.stage, a2.stage, b1.stage),
            (TicketStage.GRANTED, TicketStage.GRANTED, TicketStage.QUEUED),
        )
        self.serve_done(a1)
        self.serve_done(a2)
        self.assertIs(b1.stage, TicketStage.WAITING)
        world.drive_to_rest()
        world.check_rest(self)

    def test_priority_request_does_not_overtake_expired_wait(self) -> None:
        """With priorities, a request for the running model that was held back
        at submission (another model's request has waited max_wait) must not
        be granted when the running model's in-flight work drains: the swap
        to the waiting model starts instead (SPEC decision 3)."""
        world = self.single(priorities={"a": 5})
        a1 = self.ready("a")
        b1 = self.request("b")
        world.tick(MAX_WAIT + 1)
        a2 = self.request("a")
        self.assertIs(a2.stage, TicketStage.QUEUED)
        self.assertEqual(world.scheduler.snapshot().queued, ("a", "b"))
        world.serve_done(a1)  # not self.serve_done: world.check would flag it too
        self.assertIs(b1.stage, TicketStage.WAITING)
        self.assertIs(a2.stage, TicketStage.QUEUED)

    def test_unload_during_eviction_then_restart(self) -> None:
        """A swap unloaded while still evicting is forgotten; a new request for
        the same target starts a second swap (which again evicts the sibling
        still stopping), the first answer ("aborted") is ignored and the second
        one serves the new request."""
        world = self.groups()
        s1 = self.ready("s1")
        self.serve_done(s1)
        first = self.request("s2")
        self.assertEqual(world.states["s1"], "stopping")
        world.unload(frozenset({"s2"}))
        world.check()
        self.assertEqual(world.info[first].history, ["failed"])
        second = self.request("s2")
        self.assertEqual(
            self.starts(), ["start_swap s1 evict=[]"] + ["start_swap s2 evict=['s1']"] * 2
        )
        self.answer("s2")  # the forgotten swap: aborted, ignored
        self.assertIs(second.stage, TicketStage.WAITING)
        self.answer("s2")
        self.assertIs(second.stage, TicketStage.GRANTED)
        self.assertEqual((world.states["s1"], world.states["s2"]), ("stopped", "ready"))
        world.drive_to_rest()
        world.check_rest(self)

    def test_request_for_stopping_model_restarts_it(self) -> None:
        """A request for a model that is still stopping (TTL) is no fast path:
        it starts a swap that restarts the model once stopped; a request for
        its swap-group sibling meanwhile waits for that swap rather than
        loading beside it, then evicts it."""
        world = self.groups()
        self.serve_done(self.ready("s1"))
        world.ttl("s1", immediate=False)
        again = self.request("s1")
        self.assertEqual(self.starts()[-1], "start_swap s1 evict=[]")
        sibling = self.request("s2")
        self.assertIs(sibling.stage, TicketStage.QUEUED)
        self.answer("s1")  # stopped (state_changed), then started again
        self.assertEqual((again.stage, sibling.stage), (TicketStage.GRANTED, TicketStage.QUEUED))
        self.serve_done(again)
        self.assertEqual(self.starts()[-1], "start_swap s2 evict=['s1']")
        world.drive_to_rest()
        world.check_rest(self)

    def test_ready_target_queues_behind_busy_model_it_evicts(self) -> None:
        """A ready model is not fast-pathed when loading it would evict
        something: with a non-exclusive group loaded beside an exclusive one,
        a request for the ready exclusive model waits for the other group's
        in-flight work, then a swap to the already-ready model evicts it."""
        world = self.groups(together_exclusive=False)
        s1 = self.ready("s1")
        t1 = self.ready("t1")  # non-exclusive: loads beside s1
        self.assertEqual((world.states["s1"], world.states["t1"]), ("ready", "ready"))
        s1b = self.request("s1")
        self.assertIs(s1b.stage, TicketStage.QUEUED)
        self.serve_done(t1)
        self.assertEqual(self.starts()[-1], "start_swap s1 evict=['t1']")
        self.answer("s1")
        self.assertEqual((s1.stage, s1b.stage), (TicketStage.GRANTED, TicketStage.GRANTED))
        world.drive_to_rest()
        world.check_rest(self)

    def test_held_back_request_outlives_ttl_stop(self) -> None:
        """max_wait holds back requests for every other model, related or not:
        a request for t1 (which loading s2 would not touch) queues behind s2,
        which waits for s1's load.  t1 idles meanwhile, so its TTL may stop it
        (TTL sees in-flight requests only); the stop's state_changed routes the
        held-back request, which restarts t1."""
        world = self.groups(together_exclusive=False, max_wait=MAX_WAIT)
        self.request("s1")
        s2 = self.request("s2")
        self.assertIs(s2.stage, TicketStage.QUEUED)
        world.tick(MAX_WAIT)
        self.serve_done(self.ready("t1"))
        held = self.request("t1")
        self.assertIs(held.stage, TicketStage.QUEUED)
        world.ttl("t1", immediate=False)
        world.check()
        world.settle("t1")
        world.check()
        self.assertIs(held.stage, TicketStage.WAITING)
        self.assertEqual(self.starts().count("start_swap t1 evict=[]"), 2)
        world.drive_to_rest()
        world.check_rest(self)

    def test_crash_of_busy_model_starts_queued_swap(self) -> None:
        """A crashed model no longer blocks a queued swap although its
        in-flight request has not finished; its late serve_done still counts
        down cleanly."""
        world = self.single()
        a1 = self.ready("a")
        b1 = self.request("b")
        self.assertIs(b1.stage, TicketStage.QUEUED)
        world.crash("a")
        world.check()
        self.assertEqual(self.starts()[-1], "start_swap b evict=[]")
        self.assertEqual(world.scheduler.in_flight("a"), 1)
        self.answer("b")
        self.serve_done(a1)
        self.assertEqual(world.scheduler.snapshot().in_flight, {"b": 1})
        world.drive_to_rest()
        world.check_rest(self)

    def test_synchronous_start_failure_and_retry(self) -> None:
        """A start that fails before start_swap returns fails its waiter; the
        client's retry, submitted from inside the fail effect, starts a fresh
        attempt once the failing step is over, and is served by it."""
        world = self.single(start_modes=["sync_fail", "async"])
        first = self.request("a", RETRY)
        self.assertEqual(world.info[first].history, ["failed"])
        retry = world.tickets[-1]
        self.assertIsNot(retry, first)
        self.assertIs(retry.stage, TicketStage.WAITING)
        self.assertEqual(len(self.starts()), 2)
        self.answer("a")
        self.assertIs(retry.stage, TicketStage.GRANTED)
        world.drive_to_rest()
        world.check_rest(self)

    def test_synchronous_start_with_synchronous_serve(self) -> None:
        """A swap answered inside start_swap and grants that finish their
        request inside grant leave exact counts and an empty queue, and the
        queued request for another model swaps in afterwards."""
        world = self.single(start_modes=["sync_ok"])
        a1 = self.request("a", SERVE_AT_ONCE)
        self.assertEqual(world.info[a1].history, ["granted", "served"])
        b1 = self.request("b", SERVE_AT_ONCE)
        self.assertEqual(world.info[b1].history, ["granted", "served"])
        self.assertEqual(self.starts(), ["start_swap a evict=[]", "start_swap b evict=['a']"])
        self.assertEqual(world.scheduler.snapshot().reserved, {})
        world.drive_to_rest()
        world.check_rest(self)
