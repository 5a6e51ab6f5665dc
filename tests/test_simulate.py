"""The policy simulator (issue 16 point 4): hand-checked traces through the
real scheduler and planners on the virtual clock, both trace formats (the
store file written by the store's own code), the baseline policies, and
``llamaswap simulate`` in a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap.config import Config, load_config_text
from llamaswap.observe.store import SqliteActivityStore
from llamaswap.observe.usage import TokenMetrics, Usage
from llamaswap.simulate import Request, Simulation, TraceError, learned_load_times, read_trace
from llamaswap.simulate.command import parse_load_time
from llamaswap.simulate.engine import load_times_for, percentile
from llamaswap.simulate.policies import CountLRUPlanner, MemoryLRUPlanner
from tests.test_cli import LLAMASWAP, run

GIB = 1024**3


def config(models: dict[str, dict[str, Any]], **top: Any) -> Config:
    """A config whose models run ``llama-server`` (never started here)."""
    document = {
        **top,
        "models": {
            model: {"cmd": f"llama-server --port ${{PORT}} -m /none/{model}.gguf", **extra}
            for model, extra in models.items()
        },
    }
    return load_config_text(json.dumps(document))


ONE_AT_A_TIME = config({"a": {}, "b": {}, "c": {}})


def fitting(**extra: Any) -> Config:
    """24 GiB of gpu0; a, b and c hold 10 GiB each: two fit at once."""
    return config(
        {m: {"resources": {"gpu0": "10GiB"}, **extra} for m in ("a", "b", "c")},
        resources={"gpu0": "24GiB"},
    )


def trace(*rows: tuple[str, float, float]) -> list[Request]:
    return [Request(model, arrival, duration) for model, arrival, duration in rows]


def write(test: SynchronousTestCase, text: str, suffix: str = ".jsonl") -> str:
    with tempfile.NamedTemporaryFile("w", suffix=suffix, delete=False) as f:
        f.write(text)
    test.addCleanup(os.unlink, f.name)
    return f.name


class HandCheckedTests(SynchronousTestCase):
    def test_one_at_a_time_waits_for_the_busy_model(self) -> None:
        """b arrives while a loads and serves: it waits for a's request to end
        (t=7), then for its own load (3 s): 9 s."""
        sim = Simulation(ONE_AT_A_TIME, {"a": 5, "b": 3})
        outcome = sim.run(trace(("a", 0, 2), ("b", 1, 1), ("a", 20, 1)))
        self.assertEqual(outcome.swaps, 3)
        self.assertEqual(outcome.load_seconds, 13)
        self.assertEqual(dict(outcome.evictions), {"swap": 2})
        self.assertEqual(outcome.models["a"].waits, [5, 5])
        self.assertEqual(outcome.models["b"].waits, [9])
        self.assertEqual(outcome.duration, 26)
        self.assertEqual(sim.loaded(), {"a"})
        self.assertEqual(outcome.peak_reserved, {})

    def test_models_that_fit_stay_loaded(self) -> None:
        outcome = Simulation(fitting(), {"a": 4, "b": 4}).run(
            trace(("a", 0, 1), ("b", 10, 1), ("a", 20, 1), ("b", 30, 1))
        )
        self.assertEqual(outcome.swaps, 2)
        self.assertEqual(outcome.load_seconds, 8)
        self.assertEqual(dict(outcome.evictions), {})
        self.assertEqual(outcome.models["a"].waits, [4, 0])
        self.assertEqual(outcome.models["b"].waits, [4, 0])
        self.assertEqual(outcome.peak_reserved, {"gpu0": 20 * GIB})
        self.assertEqual(outcome.totals, {"gpu0": 24 * GIB})

    def test_the_placement_planner_evicts_the_rarely_used(self) -> None:
        """a is asked three times, b once and more recently: to make room for
        c ours evicts b (lower request rate); plain LRU evicts a."""
        requests = trace(("a", 0, 1), ("a", 10, 1), ("a", 20, 1), ("b", 30, 1), ("c", 40, 1))
        ours = Simulation(fitting(), dict.fromkeys("abc", 4.0))
        outcome = ours.run(requests)
        self.assertEqual(ours.loaded(), {"a", "c"})
        self.assertEqual((outcome.swaps, dict(outcome.evictions)), (3, {"memory": 1}))
        self.assertEqual(outcome.models["c"].waits, [4])
        resources = fitting().resources
        assert resources is not None
        lru = Simulation(
            fitting(),
            dict.fromkeys("abc", 4.0),
            policy=lambda usage: MemoryLRUPlanner(
                resources.totals, {m: resources.bytes_of(m) for m in "abc"}, usage
            ),
        )
        outcome = lru.run(requests)
        self.assertEqual(lru.loaded(), {"b", "c"})
        self.assertEqual(dict(outcome.evictions), {"memory": 1})
        self.assertEqual(outcome.over_budget_starts, 0)

    def test_matrix_sets(self) -> None:
        """a & b may run together, c alone: c evicts both, a evicts c."""
        matrix = config(
            {"a": {}, "b": {}, "c": {}},
            routing={
                "router": {
                    "use": "matrix",
                    "settings": {"matrix": {"sets": {"pair": "a & b", "solo": "c"}}},
                }
            },
        )
        sim = Simulation(matrix, dict.fromkeys("abc", 2.0))
        outcome = sim.run(trace(("a", 0, 1), ("b", 10, 1), ("c", 20, 1), ("a", 30, 1)))
        self.assertEqual((outcome.swaps, dict(outcome.evictions)), (4, {"swap": 3}))
        self.assertEqual(sim.loaded(), {"a"})

    def test_persistent_group_stays(self) -> None:
        """c's persistent group is never evicted by the other group's loads;
        c's group is exclusive, so asking for c again stops b (llama-swap's
        rule even for a ready target) without loading anything."""
        grouped = config(
            {"a": {}, "b": {}, "c": {}},
            groups={
                "keep": {"persistent": True, "members": ["c"]},
                "rest": {"members": ["a", "b"]},
            },
        )
        sim = Simulation(grouped, dict.fromkeys("abc", 2.0))
        outcome = sim.run(trace(("c", 0, 1), ("a", 10, 1), ("b", 20, 1), ("c", 30, 1)))
        self.assertEqual((outcome.swaps, dict(outcome.evictions)), (3, {"swap": 2}))
        self.assertEqual(outcome.models["c"].waits, [2, 0])
        self.assertEqual(sim.loaded(), {"c"})

    def test_count_lru(self) -> None:
        sim = Simulation(
            ONE_AT_A_TIME, dict.fromkeys("abc", 2.0), policy=lambda u: CountLRUPlanner(2, u)
        )
        outcome = sim.run(trace(("a", 0, 1), ("b", 10, 1), ("a", 20, 1), ("c", 30, 1)))
        self.assertEqual(sim.loaded(), {"a", "c"})
        self.assertEqual((outcome.swaps, dict(outcome.evictions)), (3, {"swap": 1}))
        self.assertEqual(outcome.models["a"].waits, [2, 0])

    def test_over_budget_starts_counted(self) -> None:
        """Count-LRU knows no sizes: three 10 GiB models in 24 GiB overflow."""
        sim = Simulation(
            fitting(), dict.fromkeys("abc", 1.0), policy=lambda u: CountLRUPlanner(3, u)
        )
        outcome = sim.run(trace(("a", 0, 1), ("b", 10, 1), ("c", 20, 1)))
        self.assertEqual(outcome.over_budget_starts, 1)
        self.assertEqual(outcome.peak_reserved, {"gpu0": 30 * GIB})

    def test_count_lru_refuses_a_zero_limit(self) -> None:
        sim = Simulation(ONE_AT_A_TIME)
        self.assertRaises(ValueError, CountLRUPlanner, 0, sim.usage)

    def test_ttl_unloads_an_idle_model(self) -> None:
        """ready at 2, done at 3, stopped at 13 (ttl 10); at 20 it loads again."""
        sim = Simulation(config({"a": {"ttl": 10}}), {"a": 2})
        outcome = sim.run(trace(("a", 0, 1), ("a", 20, 1), ("a", 22.5, 1)))
        self.assertEqual((outcome.swaps, dict(outcome.evictions)), (2, {"ttl": 2}))
        self.assertEqual(outcome.models["a"].waits, [2, 2, 0])
        self.assertEqual(outcome.duration, 33.5)  # the last TTL stop
        self.assertEqual(sim.loaded(), frozenset())

    def test_preload_before_the_trace(self) -> None:
        preloaded = config({"a": {}, "b": {}}, hooks={"on_startup": {"preload": ["a"]}})
        outcome = Simulation(preloaded, {"a": 5, "b": 5}).run(trace(("a", 100, 1)))
        self.assertEqual(outcome.swaps, 1)
        self.assertEqual(outcome.models["a"].waits, [0])
        self.assertEqual(outcome.models["a"].requests, 1)

    def test_concurrency_limit_refuses(self) -> None:
        limited = config({"a": {"concurrencyLimit": 1}})
        outcome = Simulation(limited, {"a": 5}).run(trace(("a", 0, 1), ("a", 1, 1), ("a", 9, 1)))
        result = outcome.models["a"]
        self.assertEqual((result.requests, result.served, result.rejected), (3, 2, 1))
        self.assertEqual(result.waits, [5, 0])

    def test_aliases_and_unknown_models(self) -> None:
        aliased = config({"a": {"aliases": ["alpha"]}})
        outcome = Simulation(aliased, {"a": 1}).run(trace(("alpha", 0, 1), ("zeta", 1, 1)))
        self.assertEqual(outcome.models["a"].served, 1)
        self.assertEqual(dict(outcome.skipped), {"zeta": 1})

    def test_stop_time_delays_the_swap(self) -> None:
        outcome = Simulation(ONE_AT_A_TIME, {"a": 1, "b": 1}, stop_time=2).run(
            trace(("a", 0, 1), ("b", 10, 1))
        )
        self.assertEqual(outcome.models["b"].waits, [3])

    def test_peak_counted_with_given_footprints(self) -> None:
        """A config without resources is measured against footprints given."""
        outcome = Simulation(
            ONE_AT_A_TIME,
            {"a": 1, "b": 1},
            footprints={"a": {"gpu0": 10 * GIB}, "b": {"gpu0": 12 * GIB}},
            totals={"gpu0": 24 * GIB},
        ).run(trace(("a", 0, 1), ("b", 10, 1)))
        self.assertEqual(outcome.peak_reserved, {"gpu0": 12 * GIB})

    def test_json_shape(self) -> None:
        outcome = Simulation(fitting(), {"a": 4, "b": 4}, name="fit").run(
            trace(("a", 0, 1), ("b", 10, 1))
        )
        document = json.loads(json.dumps(outcome.to_json()))
        self.assertEqual(
            set(document),
            {
                "name",
                "swaps",
                "load_seconds",
                "evictions",
                "wait_p50",
                "wait_p99",
                "models",
                "peak_reserved",
                "totals",
                "over_budget_starts",
                "skipped",
                "duration",
            },
        )
        self.assertEqual(
            document["models"]["a"],
            {
                "requests": 1,
                "served": 1,
                "rejected": 0,
                "failed": 0,
                "wait_p50": 4,
                "wait_p99": 4,
                "wait_max": 4,
            },
        )
        self.assertEqual(document["peak_reserved"], {"gpu0": 20 * GIB})


class LoadTimeTests(SynchronousTestCase):
    def test_precedence(self) -> None:
        """Given, then learned, then the footprint guess (10 GiB at 2 GiB/s),
        then the default; one figure per model for every config."""
        times = load_times_for([ONE_AT_A_TIME, fitting()], {"a": 1.5}, {"a": 9, "b": 7})
        self.assertEqual(times, {"a": 1.5, "b": 7, "c": 5.0})
        self.assertEqual(load_times_for([ONE_AT_A_TIME]), dict.fromkeys("abc", 10.0))

    def test_parse_load_time(self) -> None:
        self.assertEqual(parse_load_time("coder=12.5"), ("coder", 12.5))
        self.assertEqual(parse_load_time("org/m=v1=3"), ("org/m=v1", 3.0))
        for bad in ("coder", "=3", "coder=", "coder=-1", "coder=nan", "coder=inf"):
            self.assertRaises(ValueError, parse_load_time, bad)

    def test_percentile(self) -> None:
        self.assertIsNone(percentile([], 50))
        self.assertEqual(percentile([3.0, 1.0, 2.0], 50), 2.0)
        self.assertEqual(percentile([float(i) for i in range(1, 101)], 99), 99.0)


class JsonLinesTests(SynchronousTestCase):
    def test_read(self) -> None:
        path = write(
            self,
            '{"model": "b", "arrival": 1700000010.5, "duration": 2}\n\n'
            '{"model": "a", "arrival": 1700000000, "duration": 0.5}\n',
        )
        self.assertEqual(
            read_trace(path), [Request("a", 1700000000, 0.5), Request("b", 1700000010.5, 2)]
        )

    def test_problems_name_the_line(self) -> None:
        for text, problem in [
            ("{nope\n", ":1: not JSON"),
            ("[1]\n", ":1: expected an object"),
            ('{"arrival": 0, "duration": 1}\n', ":1: model must be"),
            ('{"model": "a", "arrival": "0", "duration": 1}\n', ":1: arrival must be"),
            ('{"model": "a", "arrival": 0, "duration": 1}\n{"model": "a", "arrival": 0}\n',
             ":2: duration must be"),
            ('{"model": "a", "arrival": 0, "duration": -1}\n', ":1: duration must be"),
        ]:  # fmt: skip
            path = write(self, text)
            with self.assertRaises(TraceError) as caught:
                read_trace(path)
            self.assertIn(path + problem, str(caught.exception))

    def test_missing_file(self) -> None:
        with self.assertRaises(TraceError) as caught:
            read_trace("/nonexistent/trace.jsonl")
        self.assertIn("/nonexistent/trace.jsonl: cannot read the trace", str(caught.exception))


class StoreTraceTests(TestCase):
    """A store file written by the store itself replays as its rows."""

    async def test_store_rows(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "activity.db")
        store = SqliteActivityStore(path, reactor)
        # 12 s wall; llama.cpp timings say 10 s generating and 1 s of prompt
        # (50 of 60 prompt tokens not from the cache): waited 1 s for a load.
        timed = TokenMetrics(
            input_tokens=60,
            cache_tokens=10,
            output_tokens=100,
            prompt_per_second=50.0,
            tokens_per_second=10.0,
        )
        for model, wall, tokens, at in [
            ("a", 12_000, timed, 1000.25),
            ("b", 3_000, TokenMetrics(), 1010.0),  # no timings: wall time
            ("a", 11_500, timed, 1020.0),
            ("a", 10_800, timed, 1030.0),  # waited 0.8 s: not a load
        ]:
            await store.add(
                model=model,
                req_path="/v1/chat/completions",
                resp_content_type="application/json",
                resp_status_code=200,
                usage=Usage(tokens=tokens),
                wall_ms=wall,
                timestamp=at,
            )
        await store.close()
        requests = read_trace(path)
        self.assertEqual([(r.model, r.arrival) for r in requests], [
            ("a", 1000.25), ("b", 1010.0), ("a", 1020.0), ("a", 1030.0),
        ])  # fmt: skip
        self.assertEqual([r.duration for r in requests], [11.0, 3.0, 11.0, 10.8])
        self.assertAlmostEqual(requests[0].waited or 0, 1.0)
        self.assertIsNone(requests[1].waited)
        self.assertEqual(requests[3].waited, 0)  # timings longer than the wall: capped
        # waits of a: 1.0, 0.5 and 0; only the one of at least a second counts
        self.assertEqual(learned_load_times(requests), {"a": 1.0})
        # a (load 1 s) serves 1..12; b waits for it, loads 2 s: 14..17; a
        # evicts b at 19.75, ready at 20.75; the last a joins it at 29.75.
        outcome = Simulation(config({"a": {}, "b": {}}), {"a": 1, "b": 2}).run(requests)
        self.assertEqual(outcome.swaps, 3)
        self.assertEqual(outcome.models["a"].waits, [1, 1, 0])
        self.assertEqual(outcome.models["b"].waits, [4.25])
        # the console script on the same file: a's load time is the learned 1 s
        one = write(self, json.dumps({"models": {m: {"cmd": "llama-server --port ${PORT}"}
                                                 for m in "ab"}}), ".yaml")  # fmt: skip
        out, err, code = await run([*LLAMASWAP, "simulate", one, "--trace", path, "--json"])
        self.assertEqual(code, 0, err)
        document = json.loads(out)
        self.assertEqual(
            document["load_times"],
            {
                "a": {"seconds": 1.0, "source": "learned"},
                "b": {"seconds": 10.0, "source": "default"},
            },
        )
        self.assertEqual(document["trace"]["requests"], 4)
        self.assertEqual(document["configs"][0]["swaps"], 3)

    def test_not_a_store(self) -> None:
        path = write(self, "", suffix=".db")
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE other (x)")
        connection.close()
        with self.assertRaises(TraceError) as caught:
            read_trace(path)
        self.assertIn(f"{path}: not an activity store", str(caught.exception))


class CommandLineTests(TestCase):
    """``llamaswap simulate`` in a real subprocess."""

    def files(self) -> tuple[str, str, str]:
        one = write(self, json.dumps({"models": {m: {"cmd": "llama-server --port ${PORT}"}
                                                 for m in "ab"}}), ".yaml")  # fmt: skip
        fit = write(
            self,
            json.dumps(
                {
                    "resources": {"gpu0": "24GiB"},
                    "models": {
                        m: {"cmd": "llama-server --port ${PORT}", "resources": {"gpu0": "10GiB"}}
                        for m in "ab"
                    },
                }
            ),
            ".yaml",
        )
        rows = [("a", 0), ("b", 20), ("a", 40), ("b", 60)]
        trace_path = write(
            self,
            "".join(json.dumps({"model": m, "arrival": t, "duration": 1}) + "\n" for m, t in rows),
        )
        return one, fit, trace_path

    async def test_text(self) -> None:
        one, fit, trace_path = self.files()
        out, err, code = await run(
            [*LLAMASWAP, "simulate", one, fit, "--trace", trace_path, "--load-time", "a=5"]
        )
        self.assertEqual((code, err), (0, ""))
        self.assertIn("load times: a 5.0s (given), b 5.0s (guessed)", out)
        self.assertIn(f"{one}:\n  swaps 4, loading 20.0s, evictions: 3 swap\n", out)
        self.assertIn(
            f"{fit}:\n  swaps 2, loading 10.0s\n  peak reserved: gpu0 20GiB of 24GiB\n", out
        )
        self.assertIn("  a             2       2        0  0.0s  5.0s\n", out)

    async def test_json(self) -> None:
        one, fit, trace_path = self.files()
        out, err, code = await run([*LLAMASWAP, "simulate", "--json", "-t", trace_path, one, fit])
        self.assertEqual(code, 0, err)
        document = json.loads(out)
        self.assertEqual(set(document), {"trace", "load_times", "configs"})
        self.assertEqual(document["trace"], {"path": trace_path, "requests": 4, "span": 60.0})
        self.assertEqual(document["load_times"]["a"], {"seconds": 5.0, "source": "guessed"})
        self.assertEqual([c["name"] for c in document["configs"]], [one, fit])
        self.assertEqual([c["swaps"] for c in document["configs"]], [4, 2])
        self.assertEqual([c["load_seconds"] for c in document["configs"]], [20.0, 10.0])

    async def test_usage_errors(self) -> None:
        one, _, trace_path = self.files()
        for argv, message in [
            ([one], "needs --trace FILE"),
            ([one, "--trace"], "option --trace requires argument"),
            (["--trace", trace_path], "needs one or two config files"),
            ([one, one, one, "--trace", trace_path], "needs one or two config files"),
            (
                [one, "--trace", trace_path, "--load-time", "a"],
                "--load-time: expected MODEL=SECONDS",
            ),
        ]:
            out, err, code = await run([*LLAMASWAP, "simulate", *argv])
            self.assertEqual(code, 2, err)
            self.assertIn(f"llamaswap simulate: {message}", err)

    async def test_unreadable_inputs(self) -> None:
        one, _, trace_path = self.files()
        bad = write(self, json.dumps({"models": {"a": {}}}), ".yaml")
        out, err, code = await run([*LLAMASWAP, "simulate", bad, "--trace", trace_path])
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"{bad}: models.a", err)
        yaml_trace = write(self, "- model: a\n")
        out, err, code = await run([*LLAMASWAP, "simulate", one, "--trace", yaml_trace])
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"{yaml_trace}:1: not JSON", err)


_MODELS = ("a", "b", "c", "d")
_requests = st.lists(
    st.tuples(
        st.sampled_from(_MODELS),
        st.integers(0, 600).map(lambda tenths: tenths / 10),
        st.integers(0, 100).map(lambda tenths: tenths / 10),
    ),
    max_size=40,
)
_sizes = st.fixed_dictionaries({m: st.integers(1, 24) for m in _MODELS})


class PropertyTests(SynchronousTestCase):
    """Whatever the trace: every request ends, nothing waits a negative time,
    and policies that know sizes never go over budget."""

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(_requests, _sizes, st.sampled_from(["ours", "memory-LRU", "count-LRU"]))
    def test_invariants(
        self, rows: list[tuple[str, float, float]], sizes: dict[str, int], policy: str
    ) -> None:
        placed = config(
            {m: {"resources": {"gpu0": f"{sizes[m]}GiB"}} for m in _MODELS},
            resources={"gpu0": "24GiB"},
        )
        resources = placed.resources
        assert resources is not None
        footprints = {m: resources.bytes_of(m) for m in _MODELS}
        policies: dict[str, Any] = {
            "ours": None,
            "memory-LRU": lambda u: MemoryLRUPlanner(resources.totals, footprints, u),
            "count-LRU": lambda u: CountLRUPlanner(2, u),
        }
        sim = Simulation(placed, dict.fromkeys(_MODELS, 3.0), policy=policies[policy])
        outcome = sim.run(trace(*rows))
        ended = sum(m.served + m.rejected + m.failed for m in outcome.models.values())
        self.assertEqual(ended, len(rows))
        self.assertTrue(all(w >= 0 for w in outcome.all_waits()))
        self.assertEqual(outcome.swaps * 3.0, outcome.load_seconds)
        if policy != "count-LRU":
            self.assertEqual(outcome.over_budget_starts, 0)
            self.assertLessEqual(outcome.peak_reserved["gpu0"], 24 * GIB)

    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(_requests)
    def test_one_at_a_time_holds_one(self, rows: list[tuple[str, float, float]]) -> None:
        """Without resources, at most one model holds its footprint at once."""
        one = config({m: {} for m in _MODELS})
        sim = Simulation(
            one,
            dict.fromkeys(_MODELS, 3.0),
            footprints={m: {"gpu0": 10 * GIB} for m in _MODELS},
            totals={"gpu0": 10 * GIB},
        )
        outcome = sim.run(trace(*rows))
        self.assertEqual(outcome.over_budget_starts, 0)
        ended = sum(m.served + m.rejected for m in outcome.models.values())
        self.assertEqual(ended, len(rows))
        self.assertEqual(sum(m.failed for m in outcome.models.values()), 0)
