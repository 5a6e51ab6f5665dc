"""Command line, plugin discovery and start-up errors."""

from __future__ import annotations

import os
import tempfile

import yaml
from twisted.internet import reactor, utils
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap.service.tap import DEFAULT_LISTEN, Options, is_loopback_only, listen_endpoint
from tests.support import PYTHON

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ListenTests(SynchronousTestCase):
    def test_endpoint_strings_pass_through(self) -> None:
        """Twisted endpoint strings are used as they are."""
        for value in (
            "tcp:8080:interface=0.0.0.0",
            "unix:/run/l.sock",
            "systemd:domain=INET:index=0",
        ):
            self.assertEqual(listen_endpoint(value), value)

    def test_llama_swap_forms(self) -> None:
        """llama-swap's host:port, :port and [v6]:port forms are accepted."""
        self.assertEqual(listen_endpoint(":8080"), "tcp:8080:interface=0.0.0.0")
        self.assertEqual(listen_endpoint("localhost:9000"), "tcp:9000:interface=127.0.0.1")
        self.assertEqual(listen_endpoint("[::1]:9000"), r"tcp:9000:interface=\:\:1")
        self.assertEqual(
            listen_endpoint("127.0.0.1:8443", cert="c.pem", key="k.pem"),
            "ssl:8443:interface=127.0.0.1:privateKey=k.pem:certKey=c.pem",
        )
        self.assertRaises(usage.UsageError, listen_endpoint, "nonsense")

    def test_loopback_detection(self) -> None:
        """Only loopback interfaces and unix sockets count as local (systemd
        sockets: tests/test_activation.py)."""
        self.assertTrue(is_loopback_only(DEFAULT_LISTEN))
        self.assertTrue(is_loopback_only(r"tcp:1:interface=\:\:1"))
        self.assertTrue(is_loopback_only("unix:/tmp/x"))
        self.assertFalse(is_loopback_only("tcp:8080:interface=0.0.0.0"))
        self.assertFalse(is_loopback_only("tcp:8080"))

    def test_options_require_a_config(self) -> None:
        """Neither --config nor --config-dir is a usage error."""
        self.assertRaises(usage.UsageError, Options().parseOptions, [])

    def test_tls_needs_both_files(self) -> None:
        """Only one of the TLS files is a usage error."""
        self.assertRaises(
            usage.UsageError, Options().parseOptions, ["-c", "x.yaml", "--tls-cert-file", "c"]
        )

    def test_plugin_is_found(self) -> None:
        """twistd finds the llamaswap plugin."""
        from twisted.application.service import IServiceMaker

        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("llamaswap", names)


class StartupErrorTests(TestCase):
    timeout = 60

    async def run_cli(self, *args: str) -> tuple[bytes, bytes, int]:
        result = await utils.getProcessOutputAndValue(
            PYTHON, ["-m", "llamaswap", *args], env=dict(os.environ), path=REPO, reactor=reactor
        )
        return result

    async def test_config_errors_one_line_each(self) -> None:
        """A bad config prints one line per problem naming the key path and
        exits non-zero without a traceback."""
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(
                "models:\n  a:\n    cmd: x --port ${PORT}\n    ttl: -5\n    tll: 3\n  b:\n    cmd: y\n"
            )
        self.addCleanup(os.unlink, f.name)
        out, err, code = await self.run_cli("-c", f.name)
        self.assertNotEqual(code, 0)
        text = err.decode()
        self.assertNotIn("Traceback", text)
        self.assertIn("models.a.ttl: must be >= 0, got -5", text.splitlines())
        self.assertTrue(any(line.startswith("models.b.proxy") for line in text.splitlines()), text)
        self.assertIn('did you mean "ttl"', text)

    async def test_check_config_prints_resolved(self) -> None:
        """check-config prints the resolved config with ports assigned."""
        out, err, code = await self.run_cli("check-config", os.path.join(REPO, "etc", "demo.yaml"))
        self.assertEqual(code, 0, err)
        self.assertIn(b"--port 5800", out)
        models = yaml.safe_load(out)["models"]
        self.assertFalse([m for m in models.values() if "${PORT}" in m["cmd"]], out)
        self.assertIn("--tokens-per-second 40", models["demo-small"]["cmd"])

    async def test_version(self) -> None:
        """--version prints the version and exits 0."""
        from llamaswap import __version__

        out, err, code = await self.run_cli("--version")
        self.assertEqual(code, 0, err)
        self.assertIn(__version__.encode(), out)


class ConfigDirTests(SynchronousTestCase):
    def write(self, directory: str, name: str, text: str) -> str:
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_config_dir_merges_after_config(self) -> None:
        """--config-dir files merge after --config in name order: models add
        up, lists concatenate."""
        from llamaswap.config.loader import load_config_sources

        root = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, root)
        main = self.write(root, "main.yaml", "apiKeys: [k1]\nmodels:\n  a:\n    cmd: a ${PORT}\n")
        extra = os.path.join(root, "conf.d")
        os.mkdir(extra)
        self.write(extra, "20-c.yaml", "models:\n  c:\n    cmd: c ${PORT}\n")
        self.write(extra, "10-b.yml", "apiKeys: [k2]\nmodels:\n  b:\n    cmd: b ${PORT}\n")
        self.write(extra, "notes.txt", "ignored")
        config = load_config_sources(main, extra, environ={})
        self.assertEqual(list(config.models), ["a", "b", "c"])
        self.assertEqual(config.api_keys, ("k1", "k2"))
        self.assertEqual(config.models["c"].port, 5802)

    def test_duplicate_model_across_files(self) -> None:
        """The same model id in two sources is an error naming the file."""
        from llamaswap.config import ConfigError
        from llamaswap.config.loader import load_config_sources

        root = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, root)
        main = self.write(root, "main.yaml", "models:\n  a:\n    cmd: a ${PORT}\n")
        extra = os.path.join(root, "d")
        os.mkdir(extra)
        self.write(extra, "x.yaml", "models:\n  a:\n    cmd: other ${PORT}\n")
        with self.assertRaises(ConfigError) as caught:
            load_config_sources(main, extra, environ={})
        self.assertIn('duplicate models "a"', caught.exception.problems[0])


class ExampleConfigTests(TestCase):
    async def test_example_config_builds_the_service(self) -> None:
        """Every section of etc/config.example.yaml is understood by the
        running service: routing, peers, profiles and selectors."""
        from llamaswap.config import load_config
        from llamaswap.scheduling.groups import GroupPlanner
        from llamaswap.service.wiring import build_service

        config = load_config(os.path.join(REPO, "etc", "config.example.yaml"))
        core = build_service(config, reactor)
        self.assertIsInstance(core.router.planner, GroupPlanner)
        self.assertIn("gpu-box/llama-3.3-70b", core.app.peers.routable_names())
        self.assertIn("quick", core.app.profiles.profiles)
        self.assertIn("any-chat", core.app.profiles.selectors)
        ids = [record["id"] for record in core.app.model_records()]
        self.assertIn("any-chat", ids)
        self.assertNotIn("nomic-embed", ids)
        await core.recorder.store.close()
        await core.app.close()
