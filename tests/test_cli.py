"""What a newcomer sees (issue 12): the ``llamaswap`` command line, the
start-up lines, start-up errors, the Ctrl-C hint and the unload log line,
each checked by its text in real subprocesses of both ``llamaswap`` and
``twistd -n llamaswap``; and the demo run from outside the checkout."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import socket
import tempfile

import treq
from twisted.internet import reactor, utils
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import CannotListenError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap import __version__
from llamaswap.config import load_config
from llamaswap.core.text import count_of
from llamaswap.service.shutdown import SECOND_SIGNAL_HINT
from llamaswap.service.tap import (
    NO_CONFIG,
    base_urls,
    cannot_listen_message,
    demo_config_path,
    write_demo_config,
)
from tests.support import PYTHON, REPO, RESPONDER, ServiceProcess, free_port, poll_until
from tests.test_twistd import TWISTD

#: the ``llamaswap`` console script, as its generated wrapper runs it.
LLAMASWAP = [
    "-c",
    "import sys; from llamaswap.service.cli import main; sys.argv[0] = 'llamaswap';"
    " sys.exit(main())",
]
TWISTD_RUN = [*TWISTD, "-n", "--pidfile=", "llamaswap"]


async def run(argv: list[str], cwd: str = REPO) -> tuple[str, str, int]:
    """``python ARGV`` to its end: stdout, stderr, exit status."""
    out, err, code = await utils.getProcessOutputAndValue(
        PYTHON, argv, env={**os.environ, "PYTHONPATH": REPO}, path=cwd, reactor=reactor
    )
    return out.decode(), err.decode(), code


def write_config(test: TestCase, models: dict[str, object]) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump({"models": models}, f)
    test.addCleanup(os.unlink, f.name)
    return f.name


def responder_model() -> dict[str, str]:
    port = free_port()
    return {"cmd": f"{PYTHON} {RESPONDER} --port {port}", "proxy": f"http://127.0.0.1:{port}"}


class CommandLineTests(TestCase):
    timeout = 60

    async def test_help_is_llamaswaps(self) -> None:
        """``llamaswap --help`` is llamaswap's: its usage, its commands and
        the common options; twistd is mentioned only as the other way."""
        out, err, code = await run([*LLAMASWAP, "--help"])
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("Usage: llamaswap -c CONFIG [options]"), out)
        self.assertNotIn("Usage: twistd", out)
        for text in ("check-config", "--listen", "--demo", "--config-dir", "--version"):
            self.assertIn(text, out)
        self.assertIn("Commands:\n    check-config", out)

    async def test_version(self) -> None:
        """``--version`` prints llamaswap's version and Twisted's, with both
        entry points."""
        from twisted import copyright

        expected = f"llamaswap {__version__} (Twisted {copyright.version})\n"
        for argv in ([*LLAMASWAP, "--version"], [*TWISTD, "llamaswap", "--version"]):
            out, err, code = await run(argv)
            self.assertEqual((out, code), (expected, 0), err)

    async def test_no_arguments(self) -> None:
        """No arguments: says what is missing, with public option names only,
        and how to get help; exit status 2."""
        out, err, code = await run(LLAMASWAP)
        self.assertEqual(code, 2)
        self.assertEqual(
            err.splitlines(),
            [
                "llamaswap: no config given: use -c CONFIG (a YAML file), --config-dir DIR,"
                " or --demo to try the bundled demo",
                "Run `llamaswap --help` for the options and commands.",
            ],
        )
        self.assertNotIn("--nodaemon", err + out)

    async def test_twistd_without_config(self) -> None:
        """``twistd llamaswap`` without a config says the same."""
        out, err, code = await run([*TWISTD, "-n", "llamaswap"])
        self.assertNotEqual(code, 0)
        self.assertIn(f"twistd -n: {NO_CONFIG}\n", out + err)

    async def test_check_config_needs_a_file(self) -> None:
        """``check-config`` without a file says so, in llamaswap's words."""
        out, err, code = await run([*LLAMASWAP, "check-config"])
        self.assertEqual(code, 2)
        self.assertEqual(
            err.splitlines()[0],
            "llamaswap check-config: needs one config file (llamaswap check-config [--show-secrets] CONFIG)",
        )

    async def test_check_config_help(self) -> None:
        """``check-config --help`` shows its own usage line."""
        out, err, code = await run([*LLAMASWAP, "check-config", "--help"])
        self.assertEqual(code, 0, err)
        self.assertTrue(
            out.startswith("Usage: llamaswap check-config [--show-secrets] CONFIG\n"), out
        )

    async def test_unknown_option(self) -> None:
        """An unknown option is one line naming it, then where help is."""
        out, err, code = await run([*LLAMASWAP, "--lisen", "x"])
        self.assertEqual(code, 2)
        self.assertEqual(err.splitlines()[0], "llamaswap: option --lisen not recognized")

    async def test_demo_with_config_is_refused(self) -> None:
        """``--demo`` runs the bundled config: with ``-c`` too it is an error."""
        out, err, code = await run([*LLAMASWAP, "--demo", "-c", "x.yaml"])
        self.assertEqual(code, 2)
        self.assertEqual(
            err.splitlines()[0],
            "llamaswap: --demo runs the bundled demo config: leave out -c/--config-dir",
        )

    async def test_command_path_not_found_warned(self) -> None:
        """check-config warns that an absolute command path does not exist,
        naming the path (not ``$PATH``)."""
        config = write_config(self, {"a": {"cmd": "/no/such/dir/llama-server --port ${PORT}"}})
        out, err, code = await run([*LLAMASWAP, "check-config", config])
        self.assertEqual(code, 0, err)
        self.assertEqual(
            err.splitlines(), ["warning: models.a.cmd: /no/such/dir/llama-server: not found"]
        )

    async def test_config_problems_name_the_file(self) -> None:
        """A model without cmd or proxy and a YAML error: lines a person can
        act on, naming the key or the file and line."""
        config = write_config(self, {"a": {"cmnd": "server --port ${PORT}"}})
        out, err, code = await run([*LLAMASWAP, "-c", config])
        self.assertEqual(code, 1)
        self.assertEqual(
            err.splitlines(),
            [
                "models.a: needs cmd (the command that starts its server) or proxy (the URL"
                ' of a server that is already running); "cmnd" is not a key: did you mean'
                ' "cmd"?'
            ],
        )
        with open(config, "w") as f:
            f.write('models:\n  a:\n    cmd: "server\n')
        out, err, code = await run([*LLAMASWAP, "check-config", config])
        self.assertEqual(code, 1)
        self.assertEqual(
            err.splitlines(),
            [
                f"{config}: invalid YAML at line 4: found unexpected end of stream"
                " (while scanning a quoted scalar at line 3)"
            ],
        )


class PortInUseTests(TestCase):
    timeout = 60

    async def _check(self, argv: list[str]) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            config = write_config(self, {"a": responder_model()})
            out, err, code = await run([*argv, "-c", config, "--listen", f"127.0.0.1:{port}"])
        self.assertEqual(code, 1, out + err)
        self.assertNotIn("Traceback", out + err)
        self.assertEqual(
            err.splitlines(),
            [
                f"llamaswap: cannot listen on 127.0.0.1:{port}: address already in use;"
                " is another llamaswap (or another server) running there? choose another"
                " address with --listen, e.g. --listen 127.0.0.1:8081"
            ],
        )

    async def test_console_script(self) -> None:
        """``llamaswap`` on a port in use: one line naming the address and
        ``--listen``, exit status 1, no traceback."""
        await self._check(LLAMASWAP)

    async def test_twistd(self) -> None:
        """``twistd -n llamaswap`` on a port in use: the same."""
        await self._check(TWISTD_RUN)

    async def test_twistd_daemon(self) -> None:
        """Daemonized (stderr is gone), the line goes to twistd's log file
        and twistd reports the failure to the shell; exit status 1."""
        root = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, root)
        logfile = os.path.join(root, "twistd.log")
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            out, err, code = await run(
                [
                    *TWISTD,
                    f"--pidfile={os.path.join(root, 'pid')}",
                    f"--logfile={logfile}",
                    "llamaswap",
                    "-c",
                    write_config(self, {"a": responder_model()}),
                    "--listen",
                    f"127.0.0.1:{port}",
                ]
            )
        self.assertEqual(code, 1, out + err)
        self.assertIn("An error has occurred", out + err)
        with open(logfile) as f:
            self.assertIn(
                f"llamaswap: cannot listen on 127.0.0.1:{port}: address already in use", f.read()
            )


class StartAndStopTests(TestCase):
    timeout = 60

    async def _serve(self, argv: list[str], models: dict[str, object], expected: str) -> str:
        """Start, check the first lines, start ``a`` and unload it through
        the API (all, then by name), stop with SIGINT; returns the output."""
        port = free_port()
        running = ServiceProcess([*argv, "-c", write_config(self, models)], port)
        await running.wait_up()
        url = f"http://127.0.0.1:{port}"
        ours = [
            line.split("] ", 1)[1]
            for line in running.text().splitlines()
            if "[llamaswap." in line and "] " in line
        ]
        self.assertEqual(
            ours[:3],
            [f"listening on {url} (OpenAI base URL {url}/v1)", f"web UI: {url}/ui/", expected],
        )
        self.assertNotIn("Starting factory", running.text())
        started = await treq.get(url + "/upstream/a/health", pool=running.pool)
        await started.content()
        self.assertEqual(started.code, 200, running.text())
        for path in ("/api/models/unload", "/api/models/unload/a"):
            response = await treq.post(url + path, pool=running.pool)
            await response.content()
            self.assertEqual(response.code, 200)
        running.transport.signalProcess(signal.SIGINT)
        await running.ended
        text = running.text()
        self.assertIn("unloading a: asked by POST /api/models/unload from 127.0.0.1", text)
        self.assertIn(
            "unloading a (not running): asked by POST /api/models/unload/a from 127.0.0.1", text
        )
        self.assertIn(SECOND_SIGNAL_HINT, text)
        self.assertIn("press Ctrl-C again", SECOND_SIGNAL_HINT)
        self.assertIn("shutdown complete", text)
        return text

    async def test_console_script(self) -> None:
        """``llamaswap``: the first lines name the URL, the UI and the models
        (``2 models``); an unload is logged; the first Ctrl-C says that a
        second one stops at once."""
        models = {"a": responder_model(), "b": responder_model()}
        await self._serve(LLAMASWAP, models, f"llamaswap {__version__} managing 2 models: a, b")

    async def test_twistd(self) -> None:
        """``twistd -n llamaswap``: the same lines (``1 model``)."""
        models = {"a": responder_model()}
        await self._serve(TWISTD_RUN, models, f"llamaswap {__version__} managing 1 model: a")


class DemoTests(TestCase):
    timeout = 90

    async def _ask(self, running: ServiceProcess) -> None:
        body = {
            "model": "demo-small",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
        }
        response = await treq.post(
            running.url + "/v1/chat/completions", json=body, pool=running.pool
        )
        self.assertEqual(response.code, 200, running.text())
        reply = await response.json()
        self.assertIn("demo-small", reply["choices"][0]["message"]["content"], reply)

    async def test_demo_outside_the_checkout(self) -> None:
        """``llamaswap --demo`` runs the demo config installed with the
        package from any directory, its model servers start from the
        installed console script, and a second copy on another ``--listen``
        port runs beside the first."""
        elsewhere = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, elsewhere)
        first = ServiceProcess([*LLAMASWAP, "--demo"], free_port(), cwd=elsewhere)
        second = ServiceProcess([*LLAMASWAP, "--demo"], free_port(), cwd=elsewhere)
        try:
            await first.wait_up()
            await second.wait_up()
            await self._ask(first)
            await self._ask(second)
        finally:
            for running in (first, second):
                if not running.ended.called:
                    running.transport.signalProcess(signal.SIGTERM)
            await poll_until(lambda: first.ended.called and second.ended.called, timeout=20)
        self.assertEqual(first.text().count("demo-small Health check passed"), 1, first.text())

    async def test_twistd_demo_copy_removed(self) -> None:
        """``twistd -n llamaswap --demo`` removes its copy of the demo config
        when stopped, though twistd ends by re-raising the signal."""
        # Its own temporary directory: other demo runs (tests beside this
        # one) put their copies in the shared one.
        private = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, private, True)
        pattern = os.path.join(private, "llamaswap-demo-*.yaml")
        running = ServiceProcess([*TWISTD_RUN, "--demo"], free_port(), env={"TMPDIR": private})
        try:
            await running.wait_up()
            mine = set(glob.glob(pattern))
            self.assertEqual(len(mine), 1, mine)
        finally:
            if not running.ended.called:
                running.transport.signalProcess(signal.SIGTERM)
            await running.ended
        self.assertFalse(any(os.path.exists(path) for path in mine), running.text())


class AddressTextTests(SynchronousTestCase):
    def test_urls(self) -> None:
        """The start-up URL: loopback as it is, every interface shown as a
        loopback URL with a note, IPv6 in brackets, https for TLS, unix
        sockets by path."""
        self.assertEqual(
            base_urls(IPv4Address("TCP", "127.0.0.1", 8080), tls=False),
            ("http://127.0.0.1:8080", None),
        )
        self.assertEqual(
            base_urls(IPv4Address("TCP", "0.0.0.0", 8080), tls=True),
            ("https://127.0.0.1:8080", "on every interface"),
        )
        self.assertEqual(
            base_urls(IPv6Address("TCP", "::1", 9000), tls=False), ("http://[::1]:9000", None)
        )
        self.assertEqual(
            base_urls(UNIXAddress("/run/l.sock"), tls=False), ("unix:/run/l.sock", None)
        )

    def test_cannot_listen_other_reasons(self) -> None:
        """Another reason than "in use" is named as it is, with ``--listen``."""
        error = CannotListenError("0.0.0.0", 80, PermissionError(errno.EACCES, "Permission denied"))
        self.assertEqual(
            cannot_listen_message(error),
            "llamaswap: cannot listen on 0.0.0.0:80: permission denied; choose another"
            " address with --listen, e.g. --listen 127.0.0.1:8081",
        )

    def test_count_of(self) -> None:
        """``1 model``, ``2 models``, ``0 models``."""
        self.assertEqual(
            [count_of(n, "model") for n in (0, 1, 2)], ["0 models", "1 model", "2 models"]
        )

    def test_demo_config_is_package_data(self) -> None:
        """The demo config is inside the package (setup.cfg ships it), runs
        the installed demo console script (no checkout path), and loads; the
        copy ``--demo`` runs has its model servers on free ports."""
        import configparser

        path = demo_config_path()
        self.assertTrue(path.endswith(os.path.join("llamaswap", "demo", "demo.yaml")), path)
        setup = configparser.ConfigParser()
        setup.read(os.path.join(REPO, "setup.cfg"))
        self.assertEqual(setup["options.package_data"]["llamaswap.demo"], "demo.yaml")
        self.assertIn(
            "llamaswap-demo-upstream = llamaswap.demo.server:main",
            setup["options.entry_points"]["console_scripts"],
        )
        copy = write_demo_config()
        self.addCleanup(os.unlink, copy)
        config = load_config(copy)
        self.assertEqual(sorted(config.models), ["demo-embed", "demo-large", "demo-small"])
        for model in config.models.values():
            self.assertEqual(model.argv[0], "llamaswap-demo-upstream")
        self.assertNotEqual(config.start_port, 5800)
