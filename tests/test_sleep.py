"""The sleep tier: a model put to sleep instead of stopped, woken by a request."""

from __future__ import annotations

import json
import signal
from typing import Any

import treq
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, succeed

from llamaswap.config import load_config_text
from llamaswap.config.fields import Report
from llamaswap.config.sleep import SleepConfig, read_sleep
from llamaswap.scheduling.placement import GIB, PlacementPlanner
from llamaswap.supervision.process import ModelProcess, ProcessState, StartError
from tests.support import pid_alive, poll_until
from tests.test_process import ProcessTestCase
from tests.test_service import ServiceTestCase, demo_model

S = ProcessState


class FakeCaller:
    """The sleep tier's HTTP calls: recorded; answered with ``status`` at
    once, or held (``status`` None) until the test answers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.status: int | None = 200
        self.held: list[Deferred[int]] = []

    def __call__(self, method: str, url: str, timeout: float) -> Deferred[int]:
        self.calls.append((method, url))
        if self.status is None:
            d: Deferred[int] = Deferred()
            self.held.append(d)
            return d
        return succeed(self.status)


class SleepConfigTests(ProcessTestCase):
    def test_defaults_are_vllm_calls(self) -> None:
        report = Report()
        config = read_sleep(True, "models.m.sleep", report)
        self.assertEqual(config, SleepConfig(("POST /sleep?level=1",), ("POST /wake_up",), 0))
        self.assertEqual(report.errors, [])

    def test_problems_name_the_key(self) -> None:
        report = Report()
        read_sleep({"enter": ["sleep"], "ttl": -1, "wake": []}, "models.m.sleep", report)
        self.assertEqual(
            report.errors,
            [
                "models.m.sleep.enter: 'sleep' is not METHOD /path (e.g. POST /sleep?level=1)",
                "models.m.sleep.wake: must name at least one call, e.g. POST /wake_up",
                "models.m.sleep.ttl: must be >= 0, got -1",
            ],
        )
        report = Report()
        read_sleep("yes", "models.m.sleep", report)
        self.assertIn("models.m.sleep: must be a mapping", report.errors[0])


class SleepTestCase(ProcessTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.caller = FakeCaller()
        self.evictions: list[str] = []

    def sleepy(self, ttl: int = 0, sleep_ttl: int = 0, **overrides: Any) -> ModelProcess:
        from tests.test_process import model_config

        process = ModelProcess(
            model_config(
                check_endpoint=None,
                ttl=ttl,
                sleep=SleepConfig(ttl=sleep_ttl),
                **overrides,
            ),
            clock=self.clock,
            health_check_timeout=15,
            output=self.monitor,
            environ={"PATH": "/bin"},
            probe=self.probe,
            launcher=self.launcher,
            sleep_caller=self.caller,
        )
        process.add_state_listener(lambda p, old, new: self.events.append((old, new)))
        process.add_eviction_listener(lambda p, reason: self.evictions.append(reason))
        return process

    def asleep(self, **kwargs: Any) -> ModelProcess:
        process = self.sleepy(**kwargs)
        self.successResultOf(process.make_ready())
        self.successResultOf(process.sleep(reason="swap"))
        return process


class SleepTests(SleepTestCase):
    def test_sleep_and_wake_keep_the_same_child(self) -> None:
        """sleep() sends the enter calls to the proxy URL; the child lives on
        (state sleeping, same pid); make_ready() wakes it with the wake calls."""
        process = self.asleep()
        child = self.launcher.children[0]
        self.assertEqual(process.state, S.SLEEPING)
        self.assertEqual(self.caller.calls, [("POST", "http://127.0.0.1:5800/sleep?level=1")])
        self.assertEqual(process.pid, child.pid)
        self.assertEqual(child.signals, [])
        self.assertEqual(self.evictions, ["swap"])
        self.successResultOf(process.make_ready())
        self.assertEqual(process.state, S.READY)
        self.assertEqual(self.caller.calls[-1], ("POST", "http://127.0.0.1:5800/wake_up"))
        self.assertEqual(len(self.launcher.children), 1)
        self.assertEqual(
            self.events,
            [
                (S.STOPPED, S.STARTING),
                (S.STARTING, S.READY),
                (S.READY, S.SLEEPING),
                (S.SLEEPING, S.STARTING),
                (S.STARTING, S.READY),
            ],
        )

    def test_without_sleep_tier_sleep_is_stop(self) -> None:
        process, child = self.ready()
        process.sleep()
        self.assertEqual(process.state, S.STOPPING)
        self.assertEqual(child.signals, [signal.SIGTERM])

    def test_sleep_while_stopped_does_nothing(self) -> None:
        process = self.sleepy()
        self.successResultOf(process.sleep())
        self.assertEqual(process.state, S.STOPPED)
        self.assertEqual(self.caller.calls, [])

    def test_failed_sleep_stops_the_child(self) -> None:
        process = self.sleepy()
        self.successResultOf(process.make_ready())
        child = self.launcher.children[0]
        self.caller.status = 500
        done = process.sleep()
        self.assertNoResult(done)
        self.assertEqual(process.state, S.STOPPING)
        self.assertEqual(child.signals, [signal.SIGTERM])
        child.exit(0)
        self.successResultOf(done)
        self.assertEqual(process.state, S.STOPPED)
        self.assertIn("could not sleep (POST /sleep?level=1: answered 500)", self.logged())

    def test_request_while_falling_asleep_wakes_it_after(self) -> None:
        process = self.sleepy()
        self.successResultOf(process.make_ready())
        self.caller.status = None
        asleep = process.sleep()
        ready = process.make_ready()
        self.assertNoResult(ready)
        self.caller.status = 200
        self.caller.held[0].callback(200)
        self.successResultOf(asleep)
        self.successResultOf(ready)
        self.assertEqual(process.state, S.READY)
        self.assertEqual([url.rsplit("/", 1)[1] for _, url in self.caller.calls][-1], "wake_up")

    def test_failed_wake_restarts(self) -> None:
        """A wake call that fails stops the child and starts a new one; the
        request waiting for it is answered by the new one."""
        process = self.asleep()
        old = self.launcher.children[0]
        self.caller.status = 503
        ready = process.make_ready()
        self.assertNoResult(ready)
        self.assertEqual(process.state, S.STOPPING)
        self.assertEqual(old.signals, [signal.SIGTERM])
        old.exit(0)
        self.successResultOf(ready)
        self.assertEqual(process.state, S.READY)
        self.assertEqual(len(self.launcher.children), 2)
        self.assertIn("could not wake (POST /wake_up: answered 503); restarting it", self.logged())

    def test_stop_while_sleeping(self) -> None:
        process = self.asleep()
        child = self.launcher.children[0]
        stopped = process.stop(reason="unload")
        self.assertEqual(child.signals, [signal.SIGTERM])
        child.exit(0)
        self.successResultOf(stopped)
        self.assertEqual(process.state, S.STOPPED)
        self.assertEqual(self.evictions, ["swap", "unload"])
        self.assert_no_timers()

    def test_crash_while_sleeping(self) -> None:
        process = self.asleep()
        self.launcher.children[0].exit(1)
        self.assertEqual(process.state, S.STOPPED)
        self.assertEqual(self.evictions, ["swap", "crash"])

    def test_death_while_waking_fails_the_waiters_as_died(self) -> None:
        process = self.asleep()
        self.caller.status = None
        ready = process.make_ready()
        self.launcher.children[0].exit(1)
        error = self.failureResultOf(ready, StartError).value
        self.assertTrue(error.died)

    def test_stop_while_waking_aborts(self) -> None:
        process = self.asleep()
        self.caller.status = None
        ready = process.make_ready()
        process.stop()
        self.assertEqual(self.failureResultOf(ready, StartError).value.message, "aborted")
        self.launcher.children[0].exit(0)
        self.assertEqual(process.state, S.STOPPED)


class SleepTTLTests(SleepTestCase):
    def test_ttl_sends_to_sleep_then_sleep_ttl_stops(self) -> None:
        process = self.sleepy(ttl=60, sleep_ttl=600)
        self.successResultOf(process.make_ready())
        self.clock.advance(60)
        self.assertEqual(process.state, S.SLEEPING)
        self.assertIn("going to sleep, TTL of 60s reached", self.logged())
        self.clock.advance(599)
        self.assertEqual(process.state, S.SLEEPING)
        self.clock.advance(1)
        self.assertEqual(process.state, S.STOPPING)
        self.assertIn("sleep TTL of 600s reached", self.logged())
        self.launcher.children[0].exit(0)
        self.assertEqual(self.evictions, ["ttl", "ttl"])
        self.assert_no_timers()

    def test_waking_disarms_the_sleep_ttl(self) -> None:
        process = self.asleep(sleep_ttl=10)
        self.successResultOf(process.make_ready())
        self.clock.advance(100)
        self.assertEqual(process.state, S.READY)

    def test_no_sleep_ttl_sleeps_for_ever(self) -> None:
        process = self.asleep()
        self.assert_no_timers()
        self.assertEqual(process.state, S.SLEEPING)


# --------------------------------------------------------------------------
# Placement: what a sleeping model holds


class _NoRules:
    def evict_set(self, target: str, running: frozenset[str]) -> frozenset[str]:
        return frozenset()


class PlacementSleepTests(ProcessTestCase):
    def planner(self) -> PlacementPlanner:
        gib = GIB
        planner = PlacementPlanner(
            {"gpu0": 10 * gib, "ram": 32 * gib},
            {
                "a": {"gpu0": 8 * gib, "ram": 4 * gib},
                "b": {"gpu0": 8 * gib, "ram": 4 * gib},
                "c": {"gpu0": 1 * gib, "ram": 26 * gib},
            },
            _NoRules(),  # type: ignore[arg-type]
            asleep={"a": {"ram": 4 * gib}},
        )
        return planner

    def test_sleep_frees_the_device(self) -> None:
        """b needs a's GPU memory: a asleep (RAM only) is enough."""
        planner = self.planner()
        self.assertEqual(planner.evict_set("b", frozenset({"a"})), {"a"})
        self.assertTrue(
            planner.sleep_is_enough("b", frozenset({"a"}), frozenset({"a"}), frozenset({"a"}))
        )

    def test_sleeping_models_hold_their_asleep_footprint(self) -> None:
        """With a asleep (4 GiB RAM) and b ready, c (26 GiB RAM) does not
        fit: the cheapest cover may stop the sleeper."""
        planner = self.planner()
        planner.sleeping = lambda: frozenset({"a"})
        self.assertEqual(
            planner.shortfall(frozenset({"b", "c"}), frozenset({"a"})), {"ram": 2 * GIB}
        )
        planner.reload_cost = {"a": 1.0, "b": 5.0}.__getitem__  # type: ignore[method-assign]
        self.assertEqual(planner.evict_set("c", frozenset({"b"})), {"a"})
        planner.reload_cost = {"a": 5.0, "b": 1.0}.__getitem__  # type: ignore[method-assign]
        self.assertEqual(planner.evict_set("c", frozenset({"b"})), {"b"})

    def test_sleep_not_enough_when_its_ram_is_needed(self) -> None:
        planner = self.planner()
        self.assertFalse(
            planner.sleep_is_enough("c", frozenset({"a", "b"}), frozenset({"a"}), frozenset({"a"}))
        )

    def test_asleep_footprint_defaults_to_host_memory(self) -> None:
        config = load_config_text(
            json.dumps(
                {
                    "resources": {"gpu0": "10GiB", "ram": "32GiB"},
                    "models": {
                        "a": {
                            "cmd": "srv --port ${PORT}",
                            "resources": {"gpu0": "8GiB", "ram": "4GiB"},
                            "sleep": True,
                        },
                        "b": {
                            "cmd": "srv --port ${PORT}",
                            "resources": {"gpu0": "8GiB", "ram": "4GiB"},
                            "sleep": {"resources": {"ram": "6GiB"}},
                        },
                    },
                }
            )
        )
        planner = config.routing.planner
        assert isinstance(planner, PlacementPlanner)
        self.assertEqual(dict(planner.asleep_footprint("a")), {"ram": 4 * GIB})
        self.assertEqual(dict(planner.asleep_footprint("b")), {"ram": 6 * GIB})


# --------------------------------------------------------------------------
# End to end: demo upstreams that implement /sleep and /wake_up


class ServiceSleepTests(ServiceTestCase):
    async def chat_ok(self, model: str) -> None:
        response = await self.chat(model)
        body = await response.content()
        self.assertEqual(response.code, 200, body)

    async def test_swap_puts_to_sleep_and_a_request_wakes(self) -> None:
        """A swap away from a model with ``sleep`` puts it to sleep (its
        server lives on, answers 503 to inference); ``/running`` and
        ``/v1/models`` say sleeping; a request for it wakes the same server."""
        await self.start({"a": demo_model("a", sleep=True), "b": demo_model("b")})
        await self.chat_ok("a")
        pid = self.router.processes["a"].pid
        learned = self.service.loading.learned["a"]
        priced = self.router.reload_costs.load_seconds("a")
        await self.chat_ok("b")
        self.assertEqual(self.state("a"), ProcessState.SLEEPING)
        self.assertEqual(self.router.processes["a"].pid, pid)
        self.assertTrue(pid_alive(pid))
        upstream = self.config.models["a"].proxy
        direct = await treq.post(
            upstream + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            pool=self.pool,
        )
        self.assertEqual(direct.code, 503)
        await direct.content()
        running = await (await treq.get(self.url + "/running", pool=self.pool)).json()
        states = {r["model"]: r["state"] for r in running["running"]}
        self.assertEqual(states, {"a": "sleeping", "b": "ready"})
        listed = await (await treq.get(self.url + "/v1/models", pool=self.pool)).json()
        status = {m["id"]: m["status"]["value"] for m in listed["data"]}
        self.assertEqual(status["a"], "sleeping")
        events = [r for r in self.service.model_status() if r["id"] == "a"]
        self.assertEqual(events[0]["state"], "sleeping")
        await self.chat_ok("a")
        self.assertEqual(self.state("a"), ProcessState.READY)
        self.assertEqual(self.router.processes["a"].pid, pid)
        self.assertEqual(self.state("b"), ProcessState.STOPPED)
        # A wake is not a load: the learned load times (the ETA's base, the
        # placement planner's reload cost) stay.
        self.assertEqual(self.service.loading.learned["a"], learned)
        self.assertEqual(self.router.reload_costs.load_seconds("a"), priced)
        await self.settled()

    async def test_failed_wake_restarts(self) -> None:
        await self.start(
            {"a": demo_model("a", sleep={"wake": ["POST /no-such-call"]}), "b": demo_model("b")}
        )
        await self.chat_ok("a")
        pid = self.router.processes["a"].pid
        await self.chat_ok("b")
        self.assertEqual(self.state("a"), ProcessState.SLEEPING)
        await self.chat_ok("a")
        self.assertNotEqual(self.router.processes["a"].pid, pid)
        await poll_until(lambda: not pid_alive(pid))
        await self.settled()

    async def test_ttl_sleeps_then_stops(self) -> None:
        await self.start({"a": demo_model("a", ttl=1, sleep={"ttl": 3})})
        await self.chat_ok("a")
        pid = self.router.processes["a"].pid
        await poll_until(lambda: self.state("a") is ProcessState.SLEEPING, timeout=5)
        self.assertTrue(pid_alive(pid))
        # The public state is "sleeping" from the moment the sleep call is
        # made (FallingAsleep); the server says so once it has handled it.
        answers: list[object] = []
        while answers[-1:] != [{"is_sleeping": True}]:
            self.assertLess(len(answers), 200, answers[-1:])
            if answers:
                await task.deferLater(reactor, 0.01, lambda: None)
            asked = await treq.get(self.config.models["a"].proxy + "/is_sleeping", pool=self.pool)
            answers.append(await asked.json())
        self.assertTrue(pid_alive(pid))
        await poll_until(lambda: self.state("a") is ProcessState.STOPPED, timeout=8)
        await poll_until(lambda: not pid_alive(pid))
        await self.settled()
