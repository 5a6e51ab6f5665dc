"""Tests for the pure scheduler and the single-model swap planner."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from llamaswap.config.model import ModelConfig
from llamaswap.scheduling import (
    IEffects,
    ISwapPlanner,
    Scheduler,
    ShuttingDown,
    SingleModelPlanner,
    Ticket,
    TicketStage,
    UnknownModel,
)


@implementer(IEffects)
class RecordingEffects:
    """Records every effect; grants are refused for tickets in ``gone``."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.gone: set[Ticket] = set()
        self.on_grant: Callable[[Ticket], None] | None = None

    def start_swap(self, target: str, evict: frozenset[str]) -> None:
        self.calls.append(("start_swap", target, evict))

    def grant(self, ticket: Ticket) -> bool:
        self.calls.append(("grant", ticket))
        if ticket in self.gone:
            return False
        if self.on_grant is not None:
            self.on_grant(ticket)
        return True

    def fail(self, ticket: Ticket, message: str) -> None:
        self.calls.append(("fail", ticket, message))

    def queue_position(self, ticket: Ticket, position: int) -> None:
        self.calls.append(("position", ticket, position))

    def stop_models(self, models: frozenset[str]) -> None:
        self.calls.append(("stop", models))

    def of(self, kind: str) -> list[tuple[object, ...]]:
        return [call[1:] for call in self.calls if call[0] == kind]

    def swaps(self) -> list[tuple[object, ...]]:
        return self.of("start_swap")

    def granted(self) -> list[object]:
        return [ticket for (ticket,) in self.of("grant")]

    def failures(self) -> list[tuple[object, ...]]:
        return self.of("fail")

    def positions(self, ticket: Ticket) -> list[object]:
        return [position for (t, position) in self.of("position") if t is ticket]


@implementer(ISwapPlanner)
class TablePlanner:
    """Each target evicts the running models listed for it."""

    def __init__(self, conflicts: Mapping[str, frozenset[str]]) -> None:
        self.conflicts = conflicts

    def evict_set(self, target: str, running: frozenset[str]) -> frozenset[str]:
        return running & self.conflicts.get(target, frozenset())


class SchedulerTestCase(SynchronousTestCase):
    """Builds a scheduler over a recording fake and a table of process states."""

    def build(
        self,
        models: str = "abc",
        planner: ISwapPlanner | None = None,
        limits: Mapping[str, int] | None = None,
        priorities: Mapping[str, int] | None = None,
        **kwargs: object,
    ) -> Scheduler:
        self.effects = RecordingEffects()
        verifyObject(IEffects, self.effects)
        self.states = dict.fromkeys(models, "stopped")
        self.scheduler = Scheduler(
            self.effects,
            planner if planner is not None else SingleModelPlanner(),
            self.states.__getitem__,
            limits if limits is not None else dict.fromkeys(models, 10),
            priorities,
            **kwargs,  # type: ignore[arg-type]
        )
        return self.scheduler

    def request(self, model: str) -> Ticket:
        ticket = self.scheduler.admit(model)
        assert ticket is not None
        self.scheduler.submit(ticket)
        return ticket

    def finish_swap(self, target: str, error: str | None = None) -> None:
        """Apply a swap's outcome to the state table, then report it."""
        if error is None:
            evict = next(e for t, e in reversed(self.effects.swaps()) if t == target)
            for model in evict:  # type: ignore[attr-defined]
                self.states[model] = "stopped"
        self.states[target] = "ready" if error is None else "stopped"
        self.scheduler.swap_done(target, error)

    def serve(self, model: str) -> Ticket:
        """A request for a model that is ready and now busy."""
        self.states[model] = "ready"
        ticket = self.request(model)
        self.assertIs(ticket.stage, TicketStage.GRANTED)
        return ticket

    def test_planner_evicts_all_others(self) -> None:
        """The single-model planner evicts every running model but the target."""
        planner = SingleModelPlanner()
        verifyObject(ISwapPlanner, planner)
        self.assertEqual(planner.evict_set("a", frozenset("abc")), frozenset("bc"))
        self.assertEqual(planner.evict_set("a", frozenset()), frozenset())

    def test_fast_path(self) -> None:
        """A request for a ready model with nothing to evict is granted at once."""
        self.build()
        self.states["a"] = "ready"
        ticket = self.request("a")
        self.assertEqual(self.effects.granted(), [ticket])
        self.assertEqual(self.effects.swaps(), [])
        self.assertEqual((self.scheduler.in_flight("a"), self.scheduler.reserved("a")), (1, 1))
        self.scheduler.serve_done(ticket)
        self.assertEqual((self.scheduler.in_flight("a"), self.scheduler.reserved("a")), (0, 0))
        self.assertIs(ticket.stage, TicketStage.DONE)

    def test_unknown_model(self) -> None:
        """A model the scheduler does not handle is refused before any reservation."""
        self.build()
        self.assertRaises(UnknownModel, self.scheduler.admit, "zzz")
        self.assertEqual(self.scheduler.snapshot().reserved, {})

    def test_on_demand_start(self) -> None:
        """A stopped model is started, and the request is granted when it is ready."""
        self.build()
        ticket = self.request("a")
        self.assertEqual(self.effects.swaps(), [("a", frozenset())])
        self.assertIs(ticket.stage, TicketStage.WAITING)
        self.assertEqual(self.effects.granted(), [])
        self.finish_swap("a")
        self.assertEqual(self.effects.granted(), [ticket])
        self.assertEqual(self.scheduler.in_flight("a"), 1)

    def test_requests_join_one_swap(self) -> None:
        """Three requests for a loading model share one swap and are granted in order."""
        self.build()
        tickets = [self.request("a") for _ in range(3)]
        self.assertEqual(len(self.effects.swaps()), 1)
        self.assertEqual(self.scheduler.snapshot().waiting, {"a": 3})
        self.finish_swap("a")
        self.assertEqual(self.effects.granted(), tickets)
        self.assertEqual(self.scheduler.in_flight("a"), 3)

    def test_swap_error_fails_waiters_and_next_request_retries(self) -> None:
        """A failed start fails every waiter; the next request starts a new attempt."""
        self.build()
        first, second = self.request("a"), self.request("a")
        self.finish_swap("a", "health check timed out after 2m0s")
        self.assertEqual(
            self.effects.failures(),
            [
                (first, "health check timed out after 2m0s"),
                (second, "health check timed out after 2m0s"),
            ],
        )
        self.assertEqual(self.scheduler.reserved("a"), 0)
        self.request("a")
        self.assertEqual(len(self.effects.swaps()), 2)

    def test_busy_model_is_never_evicted(self) -> None:
        """A swap that would stop a model with requests in flight waits for them."""
        self.build()
        busy = [self.serve("a"), self.serve("a")]
        waiting = self.request("b")
        self.assertIs(waiting.stage, TicketStage.QUEUED)
        self.assertEqual(self.effects.swaps(), [])
        self.scheduler.serve_done(busy[0])
        self.assertEqual(self.effects.swaps(), [])
        self.scheduler.serve_done(busy[1])
        self.assertEqual(self.effects.swaps(), [("b", frozenset("a"))])
        self.assertIs(waiting.stage, TicketStage.WAITING)

    def test_queue_on_collision_with_active_swap(self) -> None:
        """A request whose swap would stop another swap's target queues until
        that target is loaded and idle again."""
        self.build()
        loading = self.request("a")
        other = self.request("b")
        self.assertIs(other.stage, TicketStage.QUEUED)
        self.finish_swap("a")
        self.assertEqual(self.effects.swaps(), [("a", frozenset())])
        self.scheduler.serve_done(loading)
        self.assertEqual(self.effects.swaps()[-1], ("b", frozenset("a")))

    def test_shared_victim_collides(self) -> None:
        """Two swaps that would stop the same model do not run together."""
        self.build(planner=TablePlanner({"a": frozenset("c"), "b": frozenset("c")}))
        self.states["c"] = "ready"
        self.request("a")
        blocked = self.request("b")
        self.assertEqual(self.effects.swaps(), [("a", frozenset("c"))])
        self.assertIs(blocked.stage, TicketStage.QUEUED)

    def test_disjoint_swaps_run_in_parallel(self) -> None:
        """Swaps that evict nothing start together and complete independently."""
        self.build(planner=TablePlanner({}))
        a, b = self.request("a"), self.request("b")
        self.assertEqual(self.effects.swaps(), [("a", frozenset()), ("b", frozenset())])
        self.finish_swap("b")
        self.assertEqual(self.effects.granted(), [b])
        self.finish_swap("a")
        self.assertEqual(self.effects.granted(), [b, a])

    def test_collation(self) -> None:
        """Arrivals A B C A B C over exclusive models make 3 swaps serving A A B B C C."""
        self.build()
        tickets = [self.request(model) for model in "abcabc"]
        order = []
        for model in "abc":
            self.finish_swap(model)
            granted = [t for t in self.effects.granted() if t not in order]
            order.extend(granted)
            self.assertEqual(len(granted), 2)
            for ticket in granted:
                self.scheduler.serve_done(ticket)
        self.assertEqual([t.model for t in order], list("aabbcc"))
        self.assertEqual(order, [tickets[i] for i in (0, 3, 1, 4, 2, 5)])
        self.assertEqual(
            self.effects.swaps(),
            [("a", frozenset()), ("b", frozenset("a")), ("c", frozenset("b"))],
        )

    def test_refused_grant_does_not_count(self) -> None:
        """A grant to a client that has gone releases its reservation and is not
        in flight, so the model stays evictable."""
        self.build()
        self.states["a"] = "ready"
        ticket = self.scheduler.admit("a")
        assert ticket is not None
        self.effects.gone.add(ticket)
        self.scheduler.submit(ticket)
        self.assertEqual((self.scheduler.in_flight("a"), self.scheduler.reserved("a")), (0, 0))
        self.assertIs(ticket.stage, TicketStage.DONE)
        self.request("b")
        self.assertEqual(self.effects.swaps(), [("b", frozenset("a"))])

    def test_cancel_queued(self) -> None:
        """A queued request that is cancelled frees its slot and never loads its model."""
        self.build()
        busy = self.serve("a")
        queued = self.request("b")
        self.scheduler.cancel(queued)
        self.assertEqual((self.scheduler.reserved("b"), self.scheduler.queue_length()), (0, 0))
        self.scheduler.serve_done(busy)
        self.assertEqual(self.effects.swaps(), [])

    def test_cancel_swap_waiter(self) -> None:
        """A cancelled swap waiter frees its slot; the load finishes with nobody to serve."""
        self.build()
        ticket = self.request("a")
        self.scheduler.cancel(ticket)
        self.assertEqual(self.scheduler.reserved("a"), 0)
        self.assertEqual(self.scheduler.snapshot().waiting, {"a": 0})
        self.finish_swap("a")
        self.assertEqual(self.effects.granted(), [])
        self.assertEqual(self.scheduler.snapshot().swaps, {})

    def test_cancel_before_submit(self) -> None:
        """A ticket cancelled between admission and submission is released and ignored."""
        self.build()
        ticket = self.scheduler.admit("a")
        assert ticket is not None
        self.scheduler.cancel(ticket)
        self.scheduler.submit(ticket)
        self.assertEqual(self.scheduler.reserved("a"), 0)
        self.assertEqual(self.effects.calls, [])

    def test_cancel_after_grant_is_noop(self) -> None:
        """Cancelling a granted request changes nothing; serve_done releases it."""
        self.build()
        ticket = self.serve("a")
        self.scheduler.cancel(ticket)
        self.assertEqual((self.scheduler.in_flight("a"), self.scheduler.reserved("a")), (1, 1))
        self.scheduler.serve_done(ticket)
        self.assertEqual((self.scheduler.in_flight("a"), self.scheduler.reserved("a")), (0, 0))

    def test_double_release_is_an_error(self) -> None:
        """Finishing a request twice is a programming error, not a silent miscount."""
        self.build()
        ticket = self.serve("a")
        self.scheduler.serve_done(ticket)
        self.assertRaises(AssertionError, self.scheduler.serve_done, ticket)
        self.assertEqual(self.scheduler.reserved("a"), 0)

    def test_default_concurrency_limit(self) -> None:
        """With the config default (10), the eleventh concurrent request is refused."""
        limit = ModelConfig(id="a", argv=("srv",), cmd="srv").concurrency_limit
        self.build(models="a", limits={"a": limit})
        tickets = [self.scheduler.admit("a") for _ in range(11)]
        self.assertEqual(sum(t is not None for t in tickets), 10)
        self.assertIsNone(tickets[-1])

    def test_custom_limit_counts_queued_and_cancel_frees(self) -> None:
        """Queued requests hold their model's capacity until cancelled."""
        self.build(limits={"a": 10, "b": 2, "c": 10})
        self.serve("a")
        queued = [self.request("b"), self.request("b")]
        self.assertIsNone(self.scheduler.admit("b"))
        self.scheduler.cancel(queued[0])
        self.assertIsNotNone(self.scheduler.admit("b"))

    def test_invalid_limit(self) -> None:
        """A limit below one is a configuration error."""
        self.assertRaises(ValueError, self.build, limits={"a": 0})

    def test_priority_order(self) -> None:
        """Queued requests are ordered by priority, then by arrival."""
        self.build(models="xabcd", priorities={"a": 10, "b": 5, "c": 5, "d": 1})
        self.serve("x")
        d1, b1, c1, a1, b2 = (self.request(m) for m in "dbcab")
        self.assertEqual(self.scheduler.snapshot().queued, tuple("abcbd"))
        finals = {t: self.effects.positions(t)[-1] for t in (a1, b1, c1, b2, d1)}
        self.assertEqual(finals, {a1: 1, b1: 2, c1: 3, b2: 4, d1: 5})

    def test_queue_positions(self) -> None:
        """Each queued request hears its 1-based position only when it changes."""
        self.build()
        self.serve("a")
        b1, b2, b3 = (self.request("b") for _ in range(3))
        self.scheduler.cancel(b1)
        self.assertEqual(self.effects.positions(b1), [1])
        self.assertEqual(self.effects.positions(b2), [2, 1])
        self.assertEqual(self.effects.positions(b3), [3, 2])

    def test_unload(self) -> None:
        """Unload fails the waiters of the model's swap and its queued requests,
        stops it, and ignores the forgotten swap's late answer."""
        self.build()
        w1, w2 = self.request("a"), self.request("a")
        queued = self.request("b")
        self.scheduler.unload(["a", "b"])
        self.assertEqual(
            self.effects.failures(),
            [(w1, "group: model unloaded"), (w2, "group: model unloaded")]
            + [(queued, "group: model unloaded")],
        )
        [(stopped,)] = self.effects.of("stop")
        self.assertEqual((type(stopped), stopped), (frozenset, frozenset("ab")))
        self.assertEqual(self.scheduler.snapshot().reserved, {})
        fresh = self.request("a")
        self.assertEqual(len(self.effects.swaps()), 2)
        self.scheduler.swap_done("a", "aborted")
        self.assertIs(fresh.stage, TicketStage.WAITING)
        self.finish_swap("a")
        self.assertEqual(self.effects.granted(), [fresh])

    def test_unload_all(self) -> None:
        """Unloading without names stops every handled model and keeps in-flight counts."""
        self.build(name="matrix")
        busy = self.serve("a")
        self.scheduler.unload()
        self.assertEqual(self.effects.of("stop"), [(frozenset("abc"),)])
        self.assertEqual(self.scheduler.in_flight("a"), 1)
        self.scheduler.serve_done(busy)
        self.assertEqual(self.scheduler.in_flight("a"), 0)

    def test_shutdown(self) -> None:
        """Shutdown fails waiters and queued requests, then refuses new work."""
        self.build()
        waiter = self.request("a")
        queued = self.request("b")
        admitted = self.scheduler.admit("c")
        assert admitted is not None
        self.scheduler.shutdown()
        self.scheduler.submit(admitted)
        message = "group is shutting down"
        self.assertEqual(
            self.effects.failures(), [(waiter, message), (queued, message), (admitted, message)]
        )
        self.assertRaises(ShuttingDown, self.scheduler.admit, "a")
        self.scheduler.swap_done("a", None)
        self.assertEqual(self.effects.granted(), [])
        self.assertEqual(self.scheduler.snapshot().reserved, {})

    def test_state_changed_unblocks(self) -> None:
        """A model stopped outside the scheduler (e.g. TTL) no longer blocks a
        queued request that would have had to evict it."""
        self.build(planner=TablePlanner({"a": frozenset("c"), "b": frozenset("c")}))
        self.states["c"] = "ready"
        self.request("a")
        blocked = self.request("b")
        self.states["c"] = "stopped"
        self.scheduler.state_changed("c")
        self.assertEqual(self.effects.swaps()[-1], ("b", frozenset()))
        self.assertIs(blocked.stage, TicketStage.WAITING)

    def test_reentrant_serve_done(self) -> None:
        """A grant that finishes its request synchronously is counted and released
        exactly once, and the drain it triggers sees consistent counts."""
        self.build()
        self.effects.on_grant = self.scheduler.serve_done
        first, second = self.request("a"), self.request("a")
        queued = self.request("b")
        self.finish_swap("a")
        self.assertEqual(self.effects.granted(), [first, second])
        self.assertEqual(self.scheduler.snapshot().in_flight, {})
        self.assertEqual(self.effects.swaps()[-1], ("b", frozenset("a")))
        self.assertIs(queued.stage, TicketStage.WAITING)

    def test_max_wait_stops_fast_path(self) -> None:
        """Once a queued request has waited max_wait, the running model's new
        requests queue, so the swap happens when its in-flight work drains."""
        clock = Clock()
        self.build(max_wait=30, clock=clock.seconds)
        a1 = self.serve("a")
        b1 = self.request("b")
        clock.advance(10)
        a2 = self.serve("a")
        clock.advance(25)
        a3 = self.request("a")
        self.assertIs(a3.stage, TicketStage.QUEUED)
        self.scheduler.serve_done(a1)
        self.scheduler.serve_done(a2)
        self.assertEqual(self.effects.swaps(), [("b", frozenset("a"))])
        self.finish_swap("b")
        self.assertEqual(self.effects.granted()[-1], b1)
        self.scheduler.serve_done(b1)
        self.assertEqual(self.effects.swaps()[-1], ("a", frozenset("b")))
        self.assertIs(a3.stage, TicketStage.WAITING)


MODELS = ("a", "b", "c")

_actions = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.sampled_from(MODELS), st.booleans()),
        st.tuples(st.just("submit"), st.integers(0, 63)),
        st.tuples(st.just("cancel"), st.integers(0, 63)),
        st.tuples(st.just("swap_done"), st.integers(0, 63), st.booleans()),
        st.tuples(st.just("serve_done"), st.integers(0, 63)),
        st.tuples(st.just("idle_stop"), st.sampled_from(MODELS)),
        st.tuples(st.just("unload"), st.none() | st.frozensets(st.sampled_from(MODELS))),
    ),
    max_size=80,
)


@implementer(IEffects)
class World:
    """Fake processes driven by the scheduler's effects, checking invariants."""

    def __init__(self) -> None:
        self.states = dict.fromkeys(MODELS, "stopped")
        self.pending: list[list[object]] = []  # [target, aborted]
        self.history: dict[Ticket, list[str]] = {}
        self.gone: set[Ticket] = set()
        self.scheduler = Scheduler(
            self, SingleModelPlanner(), self.states.__getitem__, {"a": 3, "b": 10, "c": 10}
        )

    def start_swap(self, target: str, evict: frozenset[str]) -> None:
        assert not [m for m in evict if self.scheduler.in_flight(m)], "evicting a busy model"
        for model in evict:
            self.states[model] = "stopped"
        self.states[target] = "starting"
        self.pending.append([target, False])

    def grant(self, ticket: Ticket) -> bool:
        assert self.states[ticket.model] == "ready", "granted a model that is not ready"
        self.history[ticket].append("refused" if ticket in self.gone else "granted")
        return ticket not in self.gone

    def fail(self, ticket: Ticket, message: str) -> None:
        self.history[ticket].append("failed")

    def queue_position(self, ticket: Ticket, position: int) -> None:
        assert ticket.stage is TicketStage.QUEUED and position >= 1

    def stop_models(self, models: frozenset[str]) -> None:
        for model in models:
            self.states[model] = "stopped"
        for swap in self.pending:
            if swap[0] in models:
                swap[1] = True

    def complete(self, index: int, ok: bool) -> None:
        """Answer the oldest pending swap for the target picked by ``index``."""
        target = self.pending[index % len(self.pending)][0]
        swap = next(s for s in self.pending if s[0] == target)
        self.pending.remove(swap)
        if swap[1]:
            self.scheduler.swap_done(target, "aborted")  # type: ignore[arg-type]
            return
        self.states[target] = "ready" if ok else "stopped"  # type: ignore[index]
        self.scheduler.swap_done(target, None if ok else "boom")  # type: ignore[arg-type]

    def check(self) -> None:
        live = [m for m, s in self.states.items() if s in ("ready", "starting")]
        assert len(live) <= 1, f"two models loaded: {live}"
        for model in MODELS:
            open_tickets = sum(
                t.model == model and t.stage is not TicketStage.DONE for t in self.history
            )
            assert self.scheduler.reserved(model) == open_tickets
            assert 0 <= self.scheduler.in_flight(model) <= open_tickets


class SchedulerPropertyTests(SynchronousTestCase):
    """Random interleavings of requests, swaps, cancellations and unloads."""

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_actions)
    def test_every_ticket_ends_once(self, actions: list[tuple[object, ...]]) -> None:
        """Every admitted request ends exactly once, counts never go negative and
        are zero at rest, one model is loaded at a time, busy models are never evicted."""
        world = World()
        scheduler = world.scheduler
        tickets: list[Ticket] = []
        submitted: set[Ticket] = set()

        def pick(index: object, among: list[Ticket]) -> Ticket | None:
            return among[index % len(among)] if among else None  # type: ignore[operator]

        for action in actions:
            kind = action[0]
            if kind == "admit":
                ticket = scheduler.admit(action[1])  # type: ignore[arg-type]
                if ticket is not None:
                    tickets.append(ticket)
                    world.history[ticket] = []
                    if action[2]:
                        world.gone.add(ticket)
            elif kind == "submit":
                ticket = pick(action[1], [t for t in tickets if t not in submitted])
                if ticket is not None:
                    submitted.add(ticket)
                    scheduler.submit(ticket)
            elif kind == "cancel":
                ticket = pick(action[1], tickets)
                if ticket is not None:
                    waiting = ticket.stage is not TicketStage.GRANTED
                    if waiting and ticket.stage is not TicketStage.DONE:
                        world.history[ticket].append("cancelled")
                    scheduler.cancel(ticket)
            elif kind == "swap_done":
                if world.pending:
                    world.complete(action[1], action[2])  # type: ignore[arg-type]
            elif kind == "serve_done":
                serving = [t for t in tickets if t.stage is TicketStage.GRANTED]
                ticket = pick(action[1], serving)
                if ticket is not None:
                    world.history[ticket].append("served")
                    scheduler.serve_done(ticket)
            elif kind == "idle_stop":
                model = action[1]
                if world.states[model] == "ready" and not scheduler.in_flight(model):  # type: ignore[index]
                    world.states[model] = "stopped"  # type: ignore[index]
                    scheduler.state_changed(model)  # type: ignore[arg-type]
            else:
                scheduler.unload(action[1])  # type: ignore[arg-type]
            world.check()

        for ticket in tickets:
            if ticket not in submitted:
                scheduler.submit(ticket)
        while world.pending or any(t.stage is TicketStage.GRANTED for t in tickets):
            if world.pending:
                world.complete(0, True)
            else:
                ticket = next(t for t in tickets if t.stage is TicketStage.GRANTED)
                world.history[ticket].append("served")
                scheduler.serve_done(ticket)
            world.check()

        self.assertEqual(scheduler.queue_length(), 0)
        endings = [["granted", "served"], ["failed"], ["cancelled"], ["refused"]]
        for ticket in tickets:
            self.assertIn(world.history[ticket], endings)
        for model in MODELS:
            self.assertEqual((scheduler.reserved(model), scheduler.in_flight(model)), (0, 0))
