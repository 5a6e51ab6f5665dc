"""Config errors a person can act on (issue 12, point 4): a model that
cannot be started says why, YAML errors name the file and line, a command
path that does not exist says "not found" with that path."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError
from llamaswap.config.commands import not_found_message, program_problem
from llamaswap.config.loader import load_config, load_config_sources, load_config_text
from llamaswap.supervision.launcher import ProcessGroupLauncher

NEEDS_SERVER = (
    "needs cmd (the command that starts its server) or proxy"
    " (the URL of a server that is already running)"
)


class MissingServerTests(SynchronousTestCase):
    def problems(self, text: str) -> tuple[str, ...]:
        with self.assertRaises(ConfigError) as raised:
            load_config_text(text, {})
        return raised.exception.problems

    def test_neither_cmd_nor_proxy(self) -> None:
        """A model without cmd or proxy says so, not that ``${PORT}`` is
        missing from the default proxy."""
        self.assertEqual(
            self.problems("models:\n  a:\n    name: A\n"), (f"models.a: {NEEDS_SERVER}",)
        )
        self.assertEqual(
            self.problems('models:\n  a:\n    cmd: ""\n'), (f"models.a: {NEEDS_SERVER}",)
        )

    def test_misspelt_cmd(self) -> None:
        """A misspelt ``cmd`` gets its did-you-mean in the same line."""
        self.assertEqual(
            self.problems("models:\n  a:\n    cmnd: server --port ${PORT}\n"),
            (f'models.a: {NEEDS_SERVER}; "cmnd" is not a key: did you mean "cmd"?',),
        )

    def test_misspelt_proxy(self) -> None:
        """... and a misspelt ``proxy`` its own."""
        self.assertEqual(
            self.problems("models:\n  a:\n    proxi: http://127.0.0.1:9000\n"),
            (f'models.a: {NEEDS_SERVER}; "proxi" is not a key: did you mean "proxy"?',),
        )

    def test_proxy_alone_loads(self) -> None:
        """A model with only a proxy (a server started elsewhere) loads, as
        in llama-swap."""
        config = load_config_text("models:\n  a:\n    proxy: http://127.0.0.1:9000\n", {})
        self.assertEqual(config.models["a"].proxy, "http://127.0.0.1:9000")

    def test_cmd_without_port_keeps_its_message(self) -> None:
        """A cmd without ``${PORT}`` and no proxy is still the ``${PORT}``
        message: there the fix is in cmd or proxy."""
        self.assertEqual(
            self.problems("models:\n  a:\n    cmd: server\n"),
            (
                "models.a.proxy: uses ${PORT} but cmd does not - ${PORT} is only available"
                " when used in cmd",
            ),
        )


class YamlFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.root, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def problems(self, config: str | None, config_dir: str | None = None) -> tuple[str, ...]:
        with self.assertRaises(ConfigError) as raised:
            load_config_sources(config, config_dir, environ={})
        return raised.exception.problems

    def test_syntax_error_names_file_and_line(self) -> None:
        """A YAML error names the file, the line, and where an unclosed
        construct began."""
        path = self.write("c.yaml", 'models:\n  a:\n    cmd: "server\n  b: x\n')
        self.assertEqual(
            self.problems(path),
            (
                f"{path}: invalid YAML at line 5: found unexpected end of stream"
                " (while scanning a quoted scalar at line 3)",
            ),
        )

    def test_indentation_error(self) -> None:
        """A bad indentation names the file and the line it is on."""
        path = self.write("d.yaml", "models:\n  a:\n    cmd: x\n   b: 1\n")
        self.assertEqual(
            self.problems(path),
            (
                f"{path}: invalid YAML at line 4: expected <block end>, but found"
                " '<block mapping start>' (while parsing a block mapping at line 2)",
            ),
        )

    def test_load_config_names_the_file(self) -> None:
        """``load_config(path)`` names the file too."""
        path = self.write("e.yaml", "a: [\n")
        with self.assertRaises(ConfigError) as raised:
            load_config(path)
        self.assertTrue(raised.exception.problems[0].startswith(f"{path}: invalid YAML"))

    def test_config_dir_file_named(self) -> None:
        """In a --config-dir, the broken file is the one named."""
        main = self.write("main.yaml", "models:\n  a:\n    cmd: a ${PORT}\n")
        extra = os.path.join(self.root, "conf.d")
        os.mkdir(extra)
        broken = os.path.join(extra, "10-b.yaml")
        with open(broken, "w") as f:
            f.write("models:\n  b: [\n")
        self.assertEqual(
            self.problems(main, extra),
            (
                f"{broken}: invalid YAML at line 3: expected the node content, but found"
                " '<stream end>'",
            ),
        )

    def test_env_macro_names_the_file(self) -> None:
        """An unset ``${env.X}`` names the file."""
        path = self.write("f.yaml", "models:\n  a:\n    cmd: ${env.NOT_SET_X} ${PORT}\n")
        self.assertEqual(
            self.problems(path), (f"{path}: env: environment variable 'NOT_SET_X' is not set",)
        )


class CommandPathTests(SynchronousTestCase):
    def test_absolute_path_not_found(self) -> None:
        """A command path that does not exist is "not found" with the path."""
        self.assertEqual(
            program_problem("/no/such/llama-server"), "/no/such/llama-server: not found"
        )
        self.assertEqual(
            not_found_message("/no/such/llama-server"), "/no/such/llama-server: not found"
        )

    def test_not_executable(self) -> None:
        """A path to a file that cannot be executed (or a directory) says so."""
        with tempfile.NamedTemporaryFile(delete=False) as f:
            pass
        self.addCleanup(os.unlink, f.name)
        os.chmod(f.name, stat.S_IRUSR | stat.S_IWUSR)
        self.assertEqual(program_problem(f.name), f"{f.name}: not an executable file")
        self.assertEqual(program_problem("/"), "/: not an executable file")

    def test_bare_name(self) -> None:
        """A bare name is looked up in ``PATH``; its message says so."""
        self.assertIsNone(program_problem("llama-server"))
        self.assertIsNone(program_problem("/bin/sh"))
        self.assertEqual(
            not_found_message("no-such-xyz"),
            'exec: "no-such-xyz": executable file not found in $PATH',
        )

    def test_launcher_names_the_path(self) -> None:
        """Starting a model whose absolute command is missing fails with the
        path, not ``$PATH``."""
        launcher = ProcessGroupLauncher(reactor)
        with self.assertRaises(FileNotFoundError) as raised:
            launcher.spawn(["/no/such/server", "--port", "1"], {}, lambda _: None, lambda _: None)
        self.assertEqual(str(raised.exception), "/no/such/server: not found")
