"""The event bus, the log → event bridge and the in-flight tracker."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llamaswap.config import Config, load_config_text
from llamaswap.config.model import ModelConfig
from llamaswap.observe.events import (
    Event,
    EventBus,
    bridge_logs,
    follow_processes,
    model_status_records,
    ui_config_payload,
)
from llamaswap.observe.inflight import InflightTracker
from llamaswap.observe.logs import LogHub
from llamaswap.supervision.process import ProcessState


class Recorder:
    """Collects decoded event payloads by kind."""

    def __init__(self, bus: EventBus, limit: int = 1024) -> None:
        self.events: list[Event] = []
        self.subscription = bus.subscribe(self.events.append, limit=limit)

    def payloads(self, kind: str | None = None) -> list[Any]:
        return [e.payload() for e in self.events if kind is None or e.kind == kind]


class EventTests(SynchronousTestCase):
    def test_sse_frame_double_encodes(self) -> None:
        """The SSE frame is ``event:message``/``data:`` with the payload as a JSON string."""
        event = Event.of("profileChanged", {"active": "ä"})
        self.assertEqual(
            event.sse,
            'event:message\ndata:{"type":"profileChanged","data":"{\\"active\\":\\"ä\\"}"}\n\n'.encode(),
        )
        envelope = json.loads(event.sse[len(b"event:message\ndata:") :])
        self.assertEqual(json.loads(envelope["data"]), {"active": "ä"})

    def test_typed_helpers(self) -> None:
        """Each helper publishes its kind with the documented payload."""
        bus = EventBus()
        recorder = Recorder(bus)
        bus.model_status([{"id": "a"}])
        bus.log_data("proxy", "line\n")
        bus.activity(7)
        bus.inflight({"operation": "remove", "id": "1"})
        bus.profile_changed(None)
        bus.ui_config({"activity": {"session_id": []}})
        self.assertEqual(
            [(e.kind, e.payload()) for e in recorder.events],
            [
                ("modelStatus", [{"id": "a"}]),
                ("logData", {"source": "proxy", "data": "line\n"}),
                ("activity", {"id": 7}),
                ("inflight", {"operation": "remove", "id": "1"}),
                ("profileChanged", {"active": None}),
                ("uiConfig", {"activity": {"session_id": []}}),
            ],
        )

    def test_unsubscribe(self) -> None:
        """Calling the subscription stops delivery and removes it."""
        bus = EventBus()
        recorder = Recorder(bus)
        recorder.subscription()
        bus.activity(1)
        self.assertEqual(recorder.events, [])
        self.assertEqual(len(bus), 0)

    def test_slow_subscriber_drops_with_one_warning(self) -> None:
        """A paused subscriber keeps at most ``limit`` events, drops the rest
        with a single WARN, and others still get everything."""
        warnings: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(warnings.append)
        self.addCleanup(globalLogPublisher.removeObserver, warnings.append)
        bus = EventBus()
        slow = Recorder(bus, limit=3)
        fast = Recorder(bus)
        slow.subscription.pause()
        for index in range(10):
            bus.activity(index)
        self.assertEqual(slow.subscription.queued, 3)
        self.assertEqual(slow.subscription.dropped, 7)
        self.assertEqual(len(fast.events), 10)
        dropped = [w for w in warnings if "too slow" in w.get("log_format", "")]
        self.assertEqual(len(dropped), 1)
        slow.subscription.resume()
        self.assertEqual(slow.payloads(), [{"id": 0}, {"id": 1}, {"id": 2}])
        bus.activity(99)
        self.assertEqual(slow.payloads()[-1], {"id": 99})

    def test_queue_is_bounded_in_bytes(self) -> None:
        """A paused subscriber's queue is also bounded by payload bytes."""
        bus = EventBus()
        got: list[Event] = []
        subscription = bus.subscribe(got.append, limit=100, max_bytes=40)
        subscription.pause()
        for _ in range(5):
            bus.log_data("upstream", "x" * 10)  # 41 bytes of payload JSON each
        self.assertEqual((subscription.queued, subscription.dropped), (1, 4))
        subscription.resume()
        self.assertEqual(len(got), 1)

    def test_drop_warning_does_not_loop_through_logs(self) -> None:
        """The drop WARN, bridged back as logData, is itself dropped quietly."""
        hub = LogHub()
        observer = hub.proxy_observer("info")
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        bus = EventBus()
        stop = bridge_logs(hub, bus)
        self.addCleanup(stop)
        slow = Recorder(bus, limit=1)
        slow.subscription.pause()
        bus.activity(1)
        bus.activity(2)
        bus.activity(3)
        self.assertEqual(hub.proxy.history().count(b"too slow"), 1)
        self.assertEqual(slow.subscription.dropped, 3)

    def test_close_unsubscribes_everyone(self) -> None:
        """close() removes every subscriber."""
        bus = EventBus()
        Recorder(bus)
        Recorder(bus)
        bus.close()
        self.assertEqual(len(bus), 0)


class SourceTests(SynchronousTestCase):
    def test_bridge_publishes_log_data(self) -> None:
        """Proxy and upstream chunks become logData events; split UTF-8 survives."""
        hub = LogHub()
        bus = EventBus()
        recorder = Recorder(bus)
        stop = bridge_logs(hub, bus)
        hub.proxy.write(b"[INFO] hi\n")
        data = "é\n".encode()
        hub.model("m").write(data[:1])
        hub.model("m").write(data[1:])
        hub.mux.write(b"not bridged")
        stop()
        hub.proxy.write(b"after stop")
        self.assertEqual(
            recorder.payloads("logData"),
            [{"source": "proxy", "data": "[INFO] hi\n"}, {"source": "upstream", "data": "é\n"}],
        )

    def test_model_status_follows_processes(self) -> None:
        """Every process state change publishes the model status list."""
        config = Config(
            models={
                "b": ModelConfig(id="b", argv=("x",), cmd="x"),
                "a": ModelConfig(
                    id="a", argv=("x",), cmd="x", aliases=("al",), name="A", unlisted=True
                ),
            }
        )
        processes = {"a": FakeProcess(), "b": FakeProcess()}
        bus = EventBus()
        recorder = Recorder(bus)
        follow_processes(bus, processes.values(), lambda: model_status_records(config, processes))
        processes["a"].set(ProcessState.STARTING)
        self.assertEqual(
            recorder.payloads("modelStatus"),
            [
                [
                    {
                        "id": "a",
                        "name": "A",
                        "description": "",
                        "state": "starting",
                        "unlisted": True,
                        "peerID": "",
                        "aliases": ["al"],
                    },
                    {
                        "id": "b",
                        "name": "",
                        "description": "",
                        "state": "stopped",
                        "unlisted": False,
                        "peerID": "",
                    },
                ]
            ],
        )


class UiConfigTests(SynchronousTestCase):
    def test_session_headers(self) -> None:
        """Defaults when unset; trimmed, de-duplicated, empties dropped; [] disables."""
        self.assertEqual(
            ui_config_payload(load_config_text("")),
            {"activity": {"session_id": ["X-Session-ID", "X-Litellm-Session-Id"]}},
        )
        document = "ui: {activity: {session_id: [' A ', a, '', B]}}"
        self.assertEqual(
            ui_config_payload(load_config_text(document)),
            {"activity": {"session_id": ["A", "B"]}},
        )
        disabled = "ui: {activity: {session_id: []}}"
        self.assertEqual(
            ui_config_payload(load_config_text(disabled)), {"activity": {"session_id": []}}
        )


class FakeProcess:
    """The observation side of a ModelProcess."""

    def __init__(self) -> None:
        self.state = ProcessState.STOPPED
        self._listeners: list[Any] = []

    def add_state_listener(self, fn: Any) -> None:
        self._listeners.append(fn)

    def set(self, new: ProcessState) -> None:
        old, self.state = self.state, new
        for fn in self._listeners:
            fn(self, old, new)


class InflightTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.bus = EventBus()
        self.recorder = Recorder(self.bus)
        self.tracker = InflightTracker(self.clock, self.bus)

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def ops(self) -> list[Any]:
        return self.recorder.payloads("inflight")

    def add(self, path: str = "/v1/chat/completions") -> Any:
        return self.tracker.add(
            "m",
            path,
            "POST",
            Headers({b"Authorization": [b"Bearer sk"], b"content-type": [b"a", b"b"]}),
            "127.0.0.1",
            {"k": "v"},
        )

    def test_lifecycle_events(self) -> None:
        """add → upsert, response headers → upsert, remove → remove; ids count up."""
        entry = self.add()
        self.clock.advance(0)
        self.clock.advance(0.5)
        self.tracker.response_started(entry, {b"content-type": [b"text/event-stream"]})
        self.tracker.remove(entry)
        self.clock.advance(0)
        first, second, third = self.ops()
        self.assertEqual(first["operation"], "upsert")
        self.assertEqual(
            first["request"],
            {
                "id": "1",
                "timestamp": "1970-01-01T00:16:40Z",
                "model": "m",
                "req_path": "/v1/chat/completions",
                "method": "POST",
                "req_headers": {"Authorization": "[REDACTED]", "Content-Type": "a"},
                "remote_ip": "127.0.0.1",
                "resp_headers": {},
                "resp_bytes": 0,
                "elapsed_ms": 0,
                "metadata": {"k": "v"},
            },
        )
        self.assertEqual(second["request"]["resp_headers"], {"Content-Type": "text/event-stream"})
        self.assertEqual(second["request"]["elapsed_ms"], 500)
        self.assertEqual(third, {"operation": "remove", "id": "1"})
        self.assertEqual(self.add().id, "2")
        self.tracker.close()

    def test_byte_updates_are_throttled(self) -> None:
        """Byte counts upsert at most every 250 ms, with a trailing update."""
        entry = self.add()
        self.clock.advance(0)
        for _ in range(8):
            self.clock.advance(1 / 16)
            self.tracker.add_bytes(entry, 10)
        self.clock.advance(0)
        # Added at t=0, 10 bytes every 1/16 s: trailing updates fire at 0.25
        # and 0.5, each just before that instant's bytes arrive.
        counts = [op["request"]["resp_bytes"] for op in self.ops()]
        self.assertEqual(counts, [0, 30, 70])
        self.clock.advance(0.25)
        self.assertEqual(self.ops()[-1]["request"]["resp_bytes"], 80)
        self.tracker.add_bytes(entry, 5)
        self.tracker.remove(entry)
        self.clock.advance(1)
        self.assertEqual(self.ops()[-1], {"operation": "remove", "id": "1"})

    def test_outbox_overflow_publishes_a_snapshot(self) -> None:
        """More than 128 queued operations collapse into one snapshot."""
        entries = [self.add(f"/p{i}") for i in range(130)]
        self.tracker.remove(entries[0])
        self.clock.advance(0)
        (only,) = self.ops()
        self.assertEqual(only["operation"], "snapshot")
        self.assertEqual(len(only["requests"]), 129)
        self.assertEqual(only["requests"][0]["id"], "2")
        self.tracker.remove(entries[1])
        self.clock.advance(0)
        self.assertEqual(self.ops()[-1], {"operation": "remove", "id": "2"})

    def test_cancel(self) -> None:
        """cancel(id) runs the registered canceller; unknown ids give False."""
        entry = self.add()
        cancelled: list[bool] = []
        entry.set_canceller(lambda: cancelled.append(True))
        self.assertTrue(self.tracker.cancel("1"))
        self.assertEqual(cancelled, [True])
        self.assertFalse(self.tracker.cancel("2"))
        self.tracker.remove(entry)
        self.assertFalse(self.tracker.cancel("1"))
        self.clock.advance(0)

    def test_snapshot(self) -> None:
        """snapshot() lists current entries with fresh elapsed times."""
        self.add()
        self.clock.advance(2)
        (record,) = self.tracker.snapshot()
        self.assertEqual(record["elapsed_ms"], 2000)
        self.tracker.close()
