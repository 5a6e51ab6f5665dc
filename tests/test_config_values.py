"""Tests for the typed values a loaded Config holds: every section parsed once
at load, defaults applied, secrets kept out of repr, and a config layer that
loads without the web stack."""

from __future__ import annotations

import os
import subprocess
import sys
from textwrap import dedent
from types import MappingProxyType

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import Config, ConfigError, load_config_text
from llamaswap.config.profiles import ProfilesConfig
from llamaswap.config.routing import DEFAULT_MAX_WAIT, RoutingConfig
from llamaswap.config.settings import DEFAULT_IGNORE_PATHS, DEFAULT_SESSION_HEADERS, StoreConfig
from llamaswap.scheduling.groups import GroupPlanner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: a config using every section that holds a secret.
SECRETS = """
macros:
  KEY: macro-secret-1
apiKeys: ["${KEY}", plain-secret-2]
peers:
  p:
    proxy: http://h:1/v1
    apiKey: peer-secret-3
    models: [x]
profiles:
  work: {pins: {chat: p/x}}
selectors:
  s: {strategy: pin, targets: [p/x]}
models:
  m:
    cmd: s ${PORT}
"""


def load(text: str) -> Config:
    return load_config_text(dedent(text), environ={})


def problems(text: str) -> tuple[str, ...]:
    try:
        load(text)
    except ConfigError as e:
        return e.problems
    raise AssertionError("the config loaded")


class LayerTests(SynchronousTestCase):
    def test_loading_imports_no_web(self) -> None:
        """Importing llamaswap.config and loading a config with every section
        pulls in neither twisted.web nor any llamaswap layer above config."""
        script = dedent(
            f"""
            import sys
            import llamaswap.config
            config = llamaswap.config.load_config_text({SECRETS!r}, {{}})
            assert config.peers and config.profiles.selectors, config
            web = sorted(m for m in sys.modules if m.startswith("twisted.web"))
            ours = sorted(
                m for m in sys.modules
                if m.startswith("llamaswap.")
                and not m.startswith(("llamaswap.config", "llamaswap.core", "llamaswap.scheduling"))
            )
            print(web, ours)
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": REPO},
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "[] []")


class SecretTests(SynchronousTestCase):
    def test_repr_hides_secrets(self) -> None:
        """No repr of a config object shows an apiKeys secret (literal or
        through a macro) or a peer apiKey, while the values are kept."""
        config = load(SECRETS)
        self.assertEqual(config.api_keys, ("macro-secret-1", "plain-secret-2"))
        target = config.peers.resolve("p/x")
        assert target is not None
        self.assertEqual((config.peers.peers["p"].api_key, target.api_key), ("peer-secret-3",) * 2)
        shown = [
            repr(config),
            str(config),
            repr(config.peers),
            repr(config.peers.peers["p"]),
            repr(target),
            repr(config.profiles),
            repr(config.routing),
        ]
        for text in shown:
            for secret in ("macro-secret-1", "plain-secret-2", "peer-secret-3"):
                self.assertNotIn(secret, text)
        self.assertIn("http://h:1/v1", repr(config.peers))


class DefaultsTests(SynchronousTestCase):
    def test_loaded_defaults(self) -> None:
        """A config without the keys gets llama-swap's defaults."""
        config = load("models: {m: {cmd: 's ${PORT}'}}\n")
        self.assertEqual(
            (
                config.log_to_stdout,
                config.log_time_format,
                config.capture_buffer_mib,
                config.store,
                config.performance_disabled,
                config.include_aliases_in_list,
                [p.pattern for p in config.ignore_paths],
                config.preload,
                config.ui_session_headers,
            ),
            (
                "proxy",
                "",
                5,
                StoreConfig(None, 1000),
                False,
                False,
                list(DEFAULT_IGNORE_PATHS),
                (),
                DEFAULT_SESSION_HEADERS,
            ),
        )
        self.assertFalse(config.peers)
        self.assertEqual(config.profiles, ProfilesConfig(reserved_names=frozenset({"m"})))
        self.assertIsInstance(config.routing.planner, GroupPlanner)
        self.assertEqual(
            (dict(config.routing.priorities), config.routing.max_wait, config.routing.router),
            ({}, DEFAULT_MAX_WAIT, "group"),
        )
        model = config.models["m"]
        self.assertEqual((dict(model.capabilities), model.ignore_websockets), ({}, False))

    def test_hand_built_defaults(self) -> None:
        """A Config built without the loader has the same defaults."""
        config = Config()
        self.assertEqual(config.routing, RoutingConfig())
        self.assertIsInstance(config.routing.planner, GroupPlanner)
        self.assertEqual(config.routing.planner.evict_set("a", frozenset({"b"})), {"b"})
        self.assertEqual(config, load(""))


class SettingsTests(SynchronousTestCase):
    def test_logging(self) -> None:
        """logToStdout and logTimeFormat as written; empty means the default."""
        config = load("logToStdout: both\nlogTimeFormat: rfc3339\n")
        self.assertEqual((config.log_to_stdout, config.log_time_format), ("both", "rfc3339"))
        config = load("logToStdout: ''\nlogTimeFormat: ~\n")
        self.assertEqual((config.log_to_stdout, config.log_time_format), ("proxy", ""))

    def test_capture_buffer(self) -> None:
        """captureBuffer in MiB; anything but a positive integer disables captures."""
        for text, mib in [
            ("", 5),
            ("captureBuffer: 10\n", 10),
            ("captureBuffer: 0\n", 0),
            ("captureBuffer: -3\n", 0),
            ("captureBuffer: ~\n", 0),
            ("captureBuffer: lots\n", 0),
        ]:
            with self.subTest(text=text):
                self.assertEqual(load(text).capture_buffer_mib, mib)

    def test_store(self) -> None:
        """store.path selects the SQLite file; metricsMaxInMemory <= 0 is the default."""
        self.assertEqual(
            load("store: {path: /tmp/a.db}\nmetricsMaxInMemory: 7\n").store,
            StoreConfig("/tmp/a.db", 7),
        )
        self.assertEqual(load("store: ~\nmetricsMaxInMemory: 0\n").store, StoreConfig(None, 1000))
        self.assertEqual(
            problems("store: {path: ''}\nmetricsMaxInMemory: x\n"),
            ("metricsMaxInMemory: must be an integer", "store.path: must not be empty"),
        )

    def test_flags(self) -> None:
        """performance.disabled and includeAliasesInList count only when true."""
        config = load("performance: {disabled: true}\nincludeAliasesInList: true\n")
        self.assertEqual((config.performance_disabled, config.include_aliases_in_list), (True,) * 2)
        config = load("performance: {disabled: 'yes'}\nincludeAliasesInList: 1\n")
        self.assertEqual(
            (config.performance_disabled, config.include_aliases_in_list), (False,) * 2
        )

    def test_ignore_paths(self) -> None:
        """A non-empty upstream.ignorePaths list replaces the default, compiled;
        bad patterns and non-lists are load errors."""
        config = load("upstream: {ignorePaths: ['^/x', '\\.png$']}\n")
        self.assertEqual([p.pattern for p in config.ignore_paths], ["^/x", "\\.png$"])
        self.assertTrue(config.ignore_paths[1].search("/a.png"))
        config = load("upstream: {ignorePaths: []}\n")
        self.assertEqual([p.pattern for p in config.ignore_paths], list(DEFAULT_IGNORE_PATHS))
        self.assertEqual(
            problems("upstream: {ignorePaths: ['(']}\n"),
            (
                "upstream.ignorePaths[0]: invalid regular expression: "
                "missing ), unterminated subpattern at position 0",
            ),
        )
        self.assertEqual(
            problems("upstream: {ignorePaths: '^/x'}\n"),
            ("upstream.ignorePaths: must be a list of regular expressions",),
        )

    def test_preload(self) -> None:
        """hooks.on_startup.preload: names trimmed, in order; a non-list is an error."""
        config = load("hooks: {on_startup: {preload: [' a ', b, 3]}}\n")
        self.assertEqual(config.preload, ("a", "b", "3"))
        self.assertEqual(load("hooks: {on_startup: {}}\n").preload, ())
        self.assertEqual(
            problems("hooks: {on_startup: {preload: a}}\n"),
            ("hooks.on_startup.preload: must be a list of model names",),
        )

    def test_session_headers(self) -> None:
        """ui.activity.session_id trimmed and de-duplicated; [] disables; a
        non-list means the defaults."""
        config = load("ui: {activity: {session_id: [' A ', a, '', B]}}\n")
        self.assertEqual(config.ui_session_headers, ("A", "B"))
        self.assertEqual(load("ui: {activity: {session_id: []}}\n").ui_session_headers, ())
        self.assertEqual(
            load("ui: {activity: {session_id: X}}\n").ui_session_headers, DEFAULT_SESSION_HEADERS
        )


class ModelFieldTests(SynchronousTestCase):
    TEXT = """
    models:
      m:
        cmd: s ${PORT}
        capabilities: {in: [text, image], out: [text], tools: true, context: 4096}
        compat: {ignoreWebsockets: true}
      comfyui_auto:
        cmd: c ${PORT}
      plain:
        cmd: p ${PORT}
        compat: {ignoreWebsockets: false}
    """

    def test_capabilities(self) -> None:
        """capabilities are kept as written, read-only all the way down."""
        caps = load(self.TEXT).models["m"].capabilities
        self.assertIsInstance(caps, MappingProxyType)
        self.assertEqual(caps["in"], ("text", "image"))
        self.assertEqual((caps["tools"], caps["context"]), (True, 4096))

    def test_ignore_websockets(self) -> None:
        """compat.ignoreWebsockets: true, and always comfyui_auto."""
        models = load(self.TEXT).models
        self.assertEqual(
            {m: models[m].ignore_websockets for m in models},
            {"m": True, "comfyui_auto": True, "plain": False},
        )

    def test_listing_fields_do_not_change_a_model(self) -> None:
        """Changing only capabilities or compat keeps the model equal, so a
        reload keeps its process."""
        before = load(self.TEXT).models["m"]
        after = load(self.TEXT.replace("context: 4096", "context: 8").replace("true}", "false}"))
        self.assertEqual(after.models["m"], before)
        self.assertNotEqual(after.models["m"].capabilities, before.capabilities)


class SectionTests(SynchronousTestCase):
    def test_sections_parsed_at_load(self) -> None:
        """peers, profiles, selectors and routing are typed values on Config."""
        config = load(
            SECRETS + "routing: {scheduler: {settings: {fifo: {priority: {m: 3}, maxWait: 1.5}}}}\n"
        )
        self.assertEqual(list(config.peers.peers), ["p"])
        self.assertEqual(dict(config.profiles.profiles["work"].pins), {"chat": "p/x"})
        self.assertEqual(config.profiles.selectors["s"].targets[0].model_id, "p/x")
        self.assertEqual(
            (dict(config.routing.priorities), config.routing.max_wait), ({"m": 3}, 1.5)
        )

    def test_resolved_yaml(self) -> None:
        """resolved_yaml renders the expanded document in the order written."""
        config = load("macros: {T: 5}\nglobalTTL: ${T}\nmodels: {m: {cmd: 's ${PORT}'}}\n")
        self.assertEqual(
            config.resolved_yaml(),
            "macros:\n  T: 5\nglobalTTL: 5\nmodels:\n  m:\n    cmd: s 5800\n"
            "    proxy: http://localhost:5800\n",
        )
