"""Tests for profiles and selectors: config, activation, request-time rewriting,
selector strategies and listings (§2.5, §2.6, §3.3, §3.8, §4.2–§4.4)."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config.loader import load_config_text
from llamaswap.config.model import ConfigError
from llamaswap.config.peers import Peers, read_peers
from llamaswap.config.profiles import Profile, ProfilesConfig, planner_coexistence, read_profiles
from llamaswap.scheduling.groups import Group, GroupPlanner
from llamaswap.supervision.selection import (
    NoModelIdentified,
    ProfileRequestError,
    ProfileState,
    SelectorRuntime,
    SelectorUnavailable,
    UnknownProfile,
    parse_activate_body,
    profile_model_records,
    profiles_json,
    resolve_request,
    rewrite_for_profile,
    rewrite_upstream_path,
    selector_model_records,
)

MODEL_IDS = ("llama", "qwen", "gemma", "big")
ALIASES = {"l": "llama", "qwen:hot": "qwen"}  # "qwen:hot" as a setParamsByID key
PEERS, _, _ = read_peers(
    {
        "peers": {
            "cloud": {"proxy": "https://cloud.example/api", "models": ["gpt", "shared", "llama"]},
            "box": {"proxy": "http://10.0.0.2", "models": ["shared", "mistral"]},
        }
    },
    MODEL_IDS,
    ALIASES,
)


def _together(ids: tuple[str, ...]) -> bool:
    return True


def _read(
    document: dict[str, Any], can_coexist: Any = _together
) -> tuple[ProfilesConfig, list[str]]:
    profiles, problems, _ = read_profiles(document, MODEL_IDS, ALIASES, PEERS, can_coexist)
    return profiles, problems


def _ok(document: dict[str, Any]) -> ProfilesConfig:
    config, problems = _read(document)
    assert not problems, problems
    return config


def _problems(document: dict[str, Any], can_coexist: Any = _together) -> list[str]:
    return _read(document, can_coexist)[1]


def validate_peers(document: dict[str, Any]) -> list[str]:
    return read_peers(document, MODEL_IDS, ALIASES)[1]


def profile_warnings(document: dict[str, Any]) -> list[str]:
    return read_profiles(document, (), {}, Peers(), _together)[2]


class ProfileConfigTests(SynchronousTestCase):
    def test_targets_that_resolve(self) -> None:
        """Pins may target a model ID, alias, setParamsByID key, FQN, unique bare
        peer name or selector; empty and null targets mean disabled."""
        config = _ok(
            {
                "selectors": {"fast": {"strategy": "pin", "targets": ["qwen"]}},
                "profiles": {
                    "work": {
                        "description": "day time",
                        "pins": {
                            "a": "llama",
                            "b": "l",
                            "c": "qwen:hot",
                            "d": "cloud/gpt",
                            "e": "mistral",
                            "f": "fast",
                            "g": "",
                            "h": None,
                        },
                    }
                },
            }
        )
        profile = config.profiles["work"]
        self.assertEqual(profile.description, "day time")
        self.assertEqual(profile.pins["g"], "")
        self.assertEqual(profile.pins["h"], "")
        self.assertEqual(profile.pins["f"], "fast")

    def test_legacy_list_rejected(self) -> None:
        """The old list syntax is refused with a migration hint."""
        [problem] = _problems({"profiles": {"old": ["llama", "qwen"]}})
        self.assertTrue(
            problem.startswith("profiles.old: the legacy list syntax is no longer supported")
        )
        self.assertIn('"pins"', problem)

    def test_shape_problems(self) -> None:
        """Blank names, missing or empty pins, blank pin names and non-string
        targets are reported with their key paths."""
        self.assertEqual(
            _problems({"profiles": {" ": {"pins": {"a": "llama"}}}}),
            ["profiles: profile names can not be blank"],
        )
        self.assertEqual(
            _problems({"profiles": {"p": {"description": "x"}}}),
            ["profiles.p.pins: must contain at least one entry"],
        )
        self.assertEqual(
            _problems({"profiles": {"p": {"pins": {}}}}),
            ["profiles.p.pins: must contain at least one entry"],
        )
        self.assertEqual(
            _problems({"profiles": {"p": {"pins": {"  ": "llama"}}}}),
            ["profiles.p.pins: pin names can not be blank"],
        )
        self.assertEqual(
            _problems({"profiles": {"p": {"pins": {"a": ["llama"]}}}}),
            ["profiles.p.pins.a: must be a string, got a list"],
        )
        self.assertEqual(_problems({"profiles": "x"}), ["profiles: must be a mapping, got 'x'"])

    def test_unknown_target(self) -> None:
        """A target that reaches nothing is an unknown model."""
        self.assertEqual(
            _problems({"profiles": {"p": {"pins": {"a": "nope"}}}}),
            ["profiles.p.pins.a: references unknown model 'nope'"],
        )

    def test_ambiguous_bare_peer_target(self) -> None:
        """A bare name two peers provide is not a valid target."""
        self.assertEqual(
            _problems({"profiles": {"p": {"pins": {"a": "shared"}}}}),
            ["profiles.p.pins.a: references unknown model 'shared'"],
        )

    def test_no_chaining(self) -> None:
        """A target that is only another pin does not resolve."""
        self.assertEqual(
            _problems({"profiles": {"p": {"pins": {"a": "llama", "b": "a"}}}}),
            ["profiles.p.pins.b: references unknown model 'a'"],
        )

    def test_pin_may_shadow_model_id(self) -> None:
        """A pin named like a local model is allowed (it redirects that model)."""
        self.assertEqual(_problems({"profiles": {"p": {"pins": {"llama": "qwen"}}}}), [])

    def test_pin_may_not_be_peer_fqn(self) -> None:
        """A pin named like a peer FQN is rejected by the peer namespace check."""
        document = {
            "peers": {"cloud": {"proxy": "http://h", "models": ["gpt"]}},
            "profiles": {"p": {"pins": {"cloud/gpt": "llama"}}},
        }
        self.assertEqual(
            validate_peers(document),
            [
                "peers.cloud.models: fully qualified peer model name 'cloud/gpt' "
                "conflicts with profiles.p.pins.cloud/gpt"
            ],
        )

    def test_unknown_keys_warned(self) -> None:
        """Unknown profile and selector keys are warnings with close-match hints."""
        self.assertEqual(
            profile_warnings(
                {
                    "profiles": {"p": {"pin": {"a": "b"}}},
                    "selectors": {
                        "s": {"strategy": "pin", "target": [], "settings": {"spilover": 2}}
                    },
                }
            ),
            [
                'selectors.s.target: unknown key (did you mean "targets"?)',
                'selectors.s.settings.spilover: unknown key (did you mean "spillover"?)',
                'profiles.p.pin: unknown key (did you mean "pins"?)',
            ],
        )

    def test_from_loaded_config(self) -> None:
        """Config.profiles is read at load against the config's models,
        aliases and peers; problems raise ConfigError."""
        text = (
            "models:\n  a:\n    cmd: s ${PORT}\n    aliases: [aa]\n"
            "profiles:\n  p:\n    pins:\n      x: aa\n      y: ~\n"
        )
        config = load_config_text(text)
        profiles = config.profiles
        self.assertEqual(dict(profiles.profiles["p"].pins), {"x": "aa", "y": ""})
        with self.assertRaises(ConfigError) as caught:
            load_config_text(text.replace("x: aa", "x: zz"))
        self.assertEqual(
            caught.exception.problems, ("profiles.p.pins.x: references unknown model 'zz'",)
        )


class SelectorConfigTests(SynchronousTestCase):
    def test_valid_selector(self) -> None:
        """Targets resolve to real IDs / FQNs; listing fields and spillover are kept."""
        config = _ok(
            {
                "selectors": {
                    "chat": {
                        "strategy": "spillover",
                        "targets": ["l", "qwen:hot", "cloud/gpt"],
                        "settings": {"spillover": 3},
                        "name": " Chat ",
                        "description": "any chat model",
                        "metadata": {"tier": 1},
                        "unlisted": "yes",
                    }
                }
            }
        )
        selector = config.selectors["chat"]
        self.assertEqual(
            [(t.name, t.model_id, t.local) for t in selector.targets],
            [("l", "llama", True), ("qwen:hot", "qwen", True), ("cloud/gpt", "cloud/gpt", False)],
        )
        self.assertEqual((selector.spillover, selector.unlisted), (3, True))
        self.assertEqual(dict(selector.metadata), {"tier": 1})

    def test_spillover_defaults_to_one(self) -> None:
        """settings.spillover defaults to 1."""
        config = _ok({"selectors": {"s": {"strategy": "spillover", "targets": ["llama"]}}})
        self.assertEqual(config.selectors["s"].spillover, 1)

    def test_strategy_problems(self) -> None:
        """strategy is required and must be warm, pin or spillover."""
        self.assertEqual(
            _problems({"selectors": {"s": {"targets": ["llama"]}}}),
            ["selectors.s.strategy: is required (warm, pin or spillover)"],
        )
        self.assertEqual(
            _problems({"selectors": {"s": {"strategy": "random", "targets": ["llama"]}}}),
            ["selectors.s.strategy: unknown strategy 'random' (valid: warm, pin, spillover)"],
        )

    def test_target_problems(self) -> None:
        """Targets must be non-empty, resolvable and not selectors."""
        self.assertEqual(
            _problems({"selectors": {"s": {"strategy": "pin"}}}),
            ["selectors.s.targets: must contain at least one entry"],
        )
        self.assertEqual(
            _problems({"selectors": {"s": {"strategy": "pin", "targets": ["llama", "nope"]}}}),
            ["selectors.s.targets[1]: references unknown model 'nope'"],
        )
        self.assertEqual(
            _problems(
                {
                    "selectors": {
                        "s": {"strategy": "pin", "targets": ["t"]},
                        "t": {"strategy": "pin", "targets": ["llama"]},
                    }
                }
            ),
            ["selectors.s.targets[0]: references selector 't'; selector chaining is not supported"],
        )

    def test_warm_targets_local(self) -> None:
        """warm selectors may only target local models."""
        self.assertEqual(
            _problems(
                {"selectors": {"s": {"strategy": "warm", "targets": ["llama", "cloud/gpt"]}}}
            ),
            ['selectors.s.targets[1]: must resolve to a local model for strategy "warm"'],
        )

    def test_spillover_unique_resolved_targets(self) -> None:
        """spillover targets must be distinct after resolution (an alias and its model clash)."""
        self.assertEqual(
            _problems({"selectors": {"s": {"strategy": "spillover", "targets": ["llama", "l"]}}}),
            [
                "selectors.s.targets[1]: duplicate resolved model 'llama' (also selectors.s.targets[0])"
            ],
        )

    def test_spillover_setting_at_least_one(self) -> None:
        """settings.spillover must be an integer >= 1."""
        self.assertEqual(
            _problems(
                {
                    "selectors": {
                        "s": {
                            "strategy": "spillover",
                            "targets": ["llama"],
                            "settings": {"spillover": 0},
                        }
                    }
                }
            ),
            ["selectors.s.settings.spillover: must be >= 1, got 0"],
        )

    def test_spillover_coexistence_asked(self) -> None:
        """The planner decides whether local spillover targets can run together;
        it is asked with the real IDs of the local targets only."""
        asked: list[tuple[str, ...]] = []

        def never(ids: tuple[str, ...]) -> bool:
            asked.append(ids)
            return False

        document = {
            "selectors": {"s": {"strategy": "spillover", "targets": ["l", "cloud/gpt", "qwen"]}}
        }
        [problem] = _problems(document, never)
        self.assertEqual(asked, [("llama", "qwen")])
        self.assertTrue(
            problem.startswith(
                "selectors.s.targets: local targets 'llama', 'qwen' can not all be loaded at the same time"
            )
        )
        self.assertEqual(_problems(document, lambda ids: True), [])

    def test_planner_coexistence(self) -> None:
        """The planner adapter allows targets that evict nothing of each other:
        one swap: false group yes, a swapping group or two exclusive groups no."""
        planner = GroupPlanner(
            {
                "free": Group(members=("llama", "qwen"), swap=False),
                "solo": Group(members=("gemma",)),
            }
        )
        can = planner_coexistence(planner)
        self.assertTrue(can(("llama", "qwen")))
        self.assertFalse(can(("llama", "gemma")))
        self.assertFalse(
            planner_coexistence(GroupPlanner({"g": Group(members=("llama", "qwen"))}))(
                ("llama", "qwen")
            )
        )

    def test_single_local_target_needs_no_planner(self) -> None:
        """With one local target there is nothing to coexist with."""
        document = {
            "selectors": {"s": {"strategy": "spillover", "targets": ["llama", "cloud/gpt"]}}
        }
        self.assertEqual(_problems(document, lambda ids: self.fail("asked")), [])

    def test_selector_id_conflicts(self) -> None:
        """A selector ID may not be a model ID or alias (or, via peers, an FQN)."""
        self.assertEqual(
            _problems({"selectors": {"llama": {"strategy": "pin", "targets": ["qwen"]}}}),
            ["selectors.llama: selector ID conflicts with model ID 'llama'"],
        )
        self.assertEqual(
            _problems({"selectors": {"qwen:hot": {"strategy": "pin", "targets": ["qwen"]}}}),
            ["selectors.qwen:hot: selector ID conflicts with an alias of model 'qwen'"],
        )
        document = {
            "peers": {"cloud": {"proxy": "http://h", "models": ["gpt"]}},
            "selectors": {"cloud/gpt": {"strategy": "pin", "targets": ["llama"]}},
        }
        self.assertEqual(
            validate_peers(document),
            [
                "peers.cloud.models: fully qualified peer model name 'cloud/gpt' conflicts with selectors.cloud/gpt"
            ],
        )


WORK = Profile("work", "day", {"chat": "qwen", "llama": "gemma", "off": "", "org/model": "big"})
PROFILES = ProfilesConfig(profiles={"work": WORK, "home": Profile("home", "", {"chat": "llama"})})


class ProfileStateTests(SynchronousTestCase):
    def test_starts_inactive(self) -> None:
        """No profile is active at start."""
        state = ProfileState(PROFILES.profiles)
        self.assertIsNone(state.active)
        self.assertIsNone(state.snapshot())

    def test_activate_and_deactivate(self) -> None:
        """Activation reports whether the selection changed; None and "" deactivate."""
        state = ProfileState(PROFILES.profiles)
        self.assertTrue(state.activate("work"))
        self.assertFalse(state.activate("work"))
        self.assertEqual(state.active, "work")
        self.assertIs(state.snapshot(), WORK)
        self.assertTrue(state.activate("home"))
        self.assertTrue(state.activate(""))
        self.assertIsNone(state.active)
        self.assertFalse(state.activate(None))

    def test_unknown_profile(self) -> None:
        """An unknown name raises UnknownProfile with the 404 text; the selection stays."""
        state = ProfileState(PROFILES.profiles)
        state.activate("work")
        with self.assertRaises(UnknownProfile) as caught:
            state.activate("nope")
        self.assertEqual(str(caught.exception), 'profile "nope" not found')
        self.assertEqual(state.active, "work")

    def test_profiles_json(self) -> None:
        """GET /api/profiles lists profiles sorted by ID, disabled pins as ""."""
        state = ProfileState(PROFILES.profiles)
        state.activate("work")
        self.assertEqual(
            profiles_json(PROFILES, state),
            {
                "active": "work",
                "profiles": [
                    {"id": "home", "description": "", "pins": {"chat": "llama"}},
                    {
                        "id": "work",
                        "description": "day",
                        "pins": {"chat": "qwen", "llama": "gemma", "off": "", "org/model": "big"},
                    },
                ],
            },
        )
        self.assertIsNone(profiles_json(PROFILES, ProfileState(PROFILES.profiles))["active"])


class ActivateBodyTests(SynchronousTestCase):
    def test_names(self) -> None:
        """A string names the profile; null and "" deactivate."""
        self.assertEqual(parse_activate_body(b'{"name":"work"}'), "work")
        self.assertEqual(parse_activate_body(b' \n{"name": "work"} trailing'), "work")
        self.assertIsNone(parse_activate_body(b'{"name":null}'))
        self.assertIsNone(parse_activate_body(b'{"name":""}'))

    def test_messages(self) -> None:
        """Bad bodies get llama-swap's exact 400 messages."""
        cases = {
            b"": "invalid profile request",
            b"{": "invalid profile request",
            b"[1]": "invalid profile request",
            b"null": "profile name is required",
            b"{}": "profile name is required",
            b'{"Name":"x"}': "profile name is required",
            b'{"name":3}': "profile name must be a string or null",
            b'{"name":["x"]}': "profile name must be a string or null",
        }
        for body, message in cases.items():
            with self.subTest(body=body):
                with self.assertRaises(ProfileRequestError) as caught:
                    parse_activate_body(body)
                self.assertEqual(str(caught.exception), message)
                self.assertIsInstance(caught.exception, ValueError)


class ProfileRewriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = ProfileState(PROFILES.profiles)
        self.state.activate("work")

    def test_pin_lookup(self) -> None:
        """A pinned name maps to its target; others are left alone (None)."""
        self.assertEqual(rewrite_for_profile("chat", self.state), "qwen")
        self.assertEqual(rewrite_for_profile("llama", self.state), "gemma")
        self.assertIsNone(rewrite_for_profile("qwen", self.state))
        self.assertIsNone(rewrite_for_profile("chat", ProfileState(PROFILES.profiles)))

    def test_disabled_pin(self) -> None:
        """A disabled pin gives "" (the caller answers 404 no model id)."""
        self.assertEqual(rewrite_for_profile("off", self.state), "")

    def test_upstream_longest_pin(self) -> None:
        """On /upstream the longest pin equal to leading segments is replaced;
        the rest of the path keeps the client's encoding."""
        state = ProfileState({"p": Profile("p", "", {"org": "llama", "org/model": "big"})})
        state.activate("p")
        self.assertEqual(rewrite_upstream_path(b"org/model/v1/a%20b?", state), b"big/v1/a%20b?")
        self.assertEqual(rewrite_upstream_path(b"org/other", state), b"llama/other")
        self.assertEqual(rewrite_upstream_path(b"org", state), b"llama")
        self.assertEqual(rewrite_upstream_path(b"org%2Fmodel/x", state), b"big/x")
        self.assertIsNone(rewrite_upstream_path(b"organic/x", state))
        self.assertIsNone(rewrite_upstream_path(b"org/model/x", None))

    def test_upstream_disabled_pin(self) -> None:
        """A disabled pin empties the /upstream path (answered "model not found")."""
        self.assertEqual(rewrite_upstream_path(b"off/health", self.state), b"")


def _spill(
    spillover: int = 1, targets: tuple[str, ...] = ("llama", "qwen", "gemma")
) -> SelectorRuntime:
    config = _ok(
        {
            "selectors": {
                "s": {
                    "strategy": "spillover",
                    "targets": list(targets),
                    "settings": {"spillover": spillover},
                }
            }
        }
    )
    return SelectorRuntime(config.selectors)


def _states(**states: str):
    return lambda model_id: states.get(model_id, "stopped")


class SelectorStrategyTests(SynchronousTestCase):
    def test_pin(self) -> None:
        """pin always picks the first target, whatever is loaded."""
        runtime = SelectorRuntime(
            _ok({"selectors": {"s": {"strategy": "pin", "targets": ["l", "qwen"]}}}).selectors
        )
        choice = runtime.choose("s", _states(qwen="ready"))
        self.assertEqual((choice.target, choice.model_id), ("l", "llama"))
        choice.release()

    def test_warm(self) -> None:
        """warm picks the first ready target, else the first starting, else the first."""
        document = {
            "selectors": {"s": {"strategy": "warm", "targets": ["llama", "gemma", "qwen:hot"]}}
        }
        runtime = SelectorRuntime(_ok(document).selectors)
        self.assertEqual(
            runtime.choose("s", _states(gemma="starting", qwen="ready")).target, "qwen:hot"
        )
        self.assertEqual(
            runtime.choose("s", _states(gemma="starting", qwen="stopping")).target, "gemma"
        )
        self.assertEqual(runtime.choose("s", _states()).target, "llama")

    def test_spillover_cold_start(self) -> None:
        """With nothing loaded or reserved, the first cold target is reserved."""
        runtime = _spill()
        choice = runtime.choose("s", _states())
        self.assertEqual(choice.target, "llama")
        self.assertEqual(dict(runtime.reservations("s")), {"llama": 1})

    def test_spillover_fills_then_spills(self) -> None:
        """Loaded targets take work until each holds settings.spillover
        reservations; then the next request spills onto a cold target."""
        runtime = _spill(spillover=2)
        states = _states(llama="ready")
        picks = [runtime.choose("s", states).target for _ in range(3)]
        self.assertEqual(picks, ["llama", "llama", "qwen"])
        # qwen is now active through its reservation, below the threshold: it fills next.
        self.assertEqual(runtime.choose("s", states).target, "qwen")
        self.assertEqual(runtime.choose("s", states).target, "gemma")
        self.assertEqual(dict(runtime.reservations("s")), {"llama": 2, "qwen": 2, "gemma": 1})

    def test_spillover_all_busy_least_reserved(self) -> None:
        """With no cold target left, the least-reserved active target is chosen."""
        runtime = _spill(targets=("llama", "qwen"))
        states = _states(llama="ready", qwen="ready")
        held = [runtime.choose("s", states) for _ in range(4)]
        self.assertEqual(dict(runtime.reservations("s")), {"llama": 2, "qwen": 2})
        held[0].release()
        self.assertEqual(runtime.choose("s", states).target, "llama")

    def test_spillover_round_robin_ties(self) -> None:
        """Ties among equally reserved active targets rotate round-robin."""
        runtime = _spill(spillover=5)
        states = _states(llama="ready", qwen="starting", gemma="ready")
        picks = []
        for _ in range(6):
            choice = runtime.choose("s", states)
            picks.append(choice.target)
            choice.release()
        self.assertEqual(picks, ["llama", "qwen", "gemma", "llama", "qwen", "gemma"])

    def test_release_exactly_once(self) -> None:
        """A reservation counts until released; a second release changes nothing."""
        runtime = _spill()
        first = runtime.choose("s", _states())
        second = runtime.choose("s", _states(llama="starting"))
        self.assertEqual((first.target, second.target), ("llama", "qwen"))
        first.release()
        first.release()
        self.assertFalse(first.held)
        self.assertEqual(dict(runtime.reservations("s")), {"qwen": 1})
        second.release()
        self.assertEqual(dict(runtime.reservations("s")), {})

    def test_stopping_targets_skipped(self) -> None:
        """Stopping and shut-down targets take no new work, even when reserved."""
        runtime = _spill()
        choice = runtime.choose("s", _states(llama="stopping", qwen="shutdown"))
        self.assertEqual(choice.target, "gemma")

    def test_all_stopping(self) -> None:
        """When every target is stopping the selector is unavailable (503 text)."""
        runtime = _spill(targets=("llama", "qwen"))
        with self.assertRaises(SelectorUnavailable) as caught:
            runtime.choose("s", _states(llama="stopping", qwen="stopping"))
        self.assertEqual(str(caught.exception), 'selector "s" has no available spillover targets')
        self.assertEqual(dict(runtime.reservations("s")), {})

    def test_peer_active_only_through_reservations(self) -> None:
        """A peer target is cold until reserved; its state is never asked."""
        runtime = _spill(targets=("cloud/gpt", "llama"))
        asked: list[str] = []

        def state_of(model_id: str) -> str:
            asked.append(model_id)
            return "ready"

        first = runtime.choose("s", state_of)
        # llama is ready and unreserved: it is below the threshold, so it wins.
        self.assertEqual(first.target, "llama")
        second = runtime.choose("s", state_of)
        self.assertEqual(second.target, "cloud/gpt")
        self.assertNotIn("cloud/gpt", asked)
        third = runtime.choose("s", state_of)
        self.assertIn(third.target, ("llama", "cloud/gpt"))

    def test_unknown_selector(self) -> None:
        """Choosing for a name that is no selector is a KeyError."""
        self.assertRaises(KeyError, _spill().choose, "nope", _states())
        self.assertNotIn("nope", _spill())


RESOLVE_CONFIG = _ok(
    {
        "selectors": {"fast": {"strategy": "pin", "targets": ["cloud/gpt"]}},
        "profiles": {"p": {"pins": {"chat": "fast", "llama": "qwen", "off": None, "gpt": "gemma"}}},
    }
)


def _local(name: str) -> str | None:
    if name in MODEL_IDS:
        return name
    return ALIASES.get(name)


class ResolvePrecedenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = ProfileState(RESOLVE_CONFIG.profiles)
        self.selectors = SelectorRuntime(RESOLVE_CONFIG.selectors)

    def _resolve(self, name: str, active: str | None = None):
        self.state.activate(active)
        return resolve_request(
            name,
            local=_local,
            peers=PEERS,
            profile=self.state,
            selectors=self.selectors,
            state_of=_states(),
        )

    def test_local_then_alias(self) -> None:
        """Model IDs and aliases reach local models, keeping the requested name."""
        route = self._resolve("llama")
        self.assertEqual((route.requested, route.model_id, route.peer), ("llama", "llama", None))
        route = self._resolve("qwen:hot")
        self.assertEqual((route.requested, route.model_id), ("qwen:hot", "qwen"))

    def test_local_beats_bare_peer_name(self) -> None:
        """A peer model named like a local model: the bare name stays local, the FQN goes out."""
        self.assertEqual(self._resolve("llama").model_id, "llama")
        route = self._resolve("cloud/llama")
        self.assertIsNone(route.model_id)
        self.assertEqual((route.peer.peer_id, route.peer.model), ("cloud", "llama"))  # type: ignore[union-attr]

    def test_peer_fqn_then_unique_bare(self) -> None:
        """FQNs and unique bare names reach peers; ambiguous bare names reach nothing."""
        self.assertEqual(self._resolve("box/shared").peer.peer_id, "box")  # type: ignore[union-attr]
        self.assertEqual(self._resolve("gpt").peer.fqn, "cloud/gpt")  # type: ignore[union-attr]
        route = self._resolve("shared")
        self.assertEqual((route.model_id, route.peer), (None, None))

    def test_selector_before_local(self) -> None:
        """A selector ID is rewritten to its chosen target first."""
        route = self._resolve("fast")
        self.assertEqual((route.requested, route.selector), ("cloud/gpt", "fast"))
        self.assertEqual(route.peer.model, "gpt")  # type: ignore[union-attr]
        self.assertIsNotNone(route.reservation)

    def test_profile_pin_first(self) -> None:
        """An active pin applies before everything: it may shadow a model ID or a
        bare peer name and may lead to a selector."""
        route = self._resolve("llama", active="p")
        self.assertEqual((route.requested, route.model_id), ("qwen", "qwen"))
        route = self._resolve("gpt", active="p")
        self.assertEqual((route.requested, route.model_id, route.peer), ("gemma", "gemma", None))
        route = self._resolve("chat", active="p")
        self.assertEqual((route.requested, route.selector), ("cloud/gpt", "fast"))
        self.assertIsNone(self._resolve("chat").peer)

    def test_disabled_pin(self) -> None:
        """A disabled pin means no model could be identified."""
        with self.assertRaises(NoModelIdentified) as caught:
            self._resolve("off", active="p")
        self.assertEqual(str(caught.exception), "no model id could be identified")
        self.assertIsNone(self._resolve("off").model_id)


class ListingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = _ok(
            {
                "selectors": {
                    "chat": {
                        "strategy": "spillover",
                        "targets": ["llama", "cloud/gpt"],
                        "settings": {"spillover": 2},
                        "name": " Chat ",
                        "metadata": {"type": "mine", "tier": 1},
                    },
                    "first": {"strategy": "pin", "targets": ["qwen", "llama"]},
                    "hidden": {"strategy": "warm", "targets": ["llama"], "unlisted": True},
                },
                "profiles": {
                    "p": {
                        "pins": {
                            "alias-pin": "llama",
                            "llama": "qwen",
                            "l": "qwen",
                            "gpt": "qwen",
                            "cloud/llama": "qwen",
                            "hidden": "qwen",
                            "off": "",
                        }
                    }
                },
            }
        )

    def test_selector_records(self) -> None:
        """Listed selectors carry their strategy, targets and spillover; loaded
        when a local target is ready or starting (pin: first target only)."""
        records = selector_model_records(self.config, _states(llama="starting"), created=7)
        self.assertEqual([r["id"] for r in records], ["chat", "first"])
        chat, first = records
        self.assertEqual(
            chat,
            {
                "id": "chat",
                "object": "model",
                "created": 7,
                "owned_by": "llama-swap",
                "name": "Chat",
                "meta": {
                    "llamaswap": {
                        "type": "selector",
                        "tier": 1,
                        "strategy": "spillover",
                        "targets": ["llama", "cloud/gpt"],
                        "spillover": 2,
                    }
                },
                "status": {"value": "loaded"},
            },
        )
        self.assertEqual(first["status"], {"value": "unloaded"})
        self.assertNotIn("spillover", first["meta"]["llamaswap"])

    def test_profile_pin_records(self) -> None:
        """Only the active profile's enabled pins whose names exist nowhere else
        are listed, typed profile and unloaded."""
        state = ProfileState(self.config.profiles)
        self.assertEqual(profile_model_records(self.config, state, created=7), [])
        state.activate("p")
        self.assertEqual(
            profile_model_records(self.config, state, created=7),
            [
                {
                    "id": "alias-pin",
                    "object": "model",
                    "created": 7,
                    "owned_by": "llama-swap",
                    "meta": {"llamaswap": {"type": "profile"}},
                    "status": {"value": "unloaded"},
                }
            ],
        )
