"""Secrets never leave and are never shown (issue 11.2), commands shown
readably (issue 12.6): the masking rules, config reprs, ``check-config``,
``/running``, the start line in the logs and ``/api/events``, and the
credential headers sent to local upstreams and to peers."""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from base64 import b64encode
from typing import Any

import treq
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, utils
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from llamaswap.config.commands import split_command
from llamaswap.config.loader import load_config_text
from llamaswap.core.secrets import (
    MASK,
    is_secret_name,
    join_argv,
    mask_argv,
    mask_command,
    mask_env,
    mask_known,
    one_line_command,
    shown_command,
)
from llamaswap.supervision.process import StartError
from tests import test_process, test_service
from tests.support import PYTHON, REPO, RESPONDER, base_url, free_port, listen, poll_until

SECRETS = ("sk-global", "sk-local", "hf_xyz", "hf_env", "sk-peer", "sk-openai")

CONFIG = """\
apiKeys: [sk-global]
macros:
  HF_SECRET: hf_xyz
models:
  a:
    cmd: |
      llama-server --port ${PORT}
        # old: --api-key sk-global
        --api-key sk-local \\
        --hf-token=${HF_SECRET} -m model.gguf -k sk-peer
    cmdStop: stopper --api-key sk-local ${PID}
    env:
      - HF_TOKEN=hf_env
      - OPENAI_API_KEY=sk-openai
      - CUDA_VISIBLE_DEVICES=0
peers:
  far:
    proxy: http://10.0.0.2:8080
    apiKey: sk-peer
    models: [m1]
"""


def _config() -> Any:
    return load_config_text(CONFIG, environ={})


class SecretNameTests(SynchronousTestCase):
    def test_words_not_substrings(self) -> None:
        """A name is secret by a whole word: ``--tokens-per-second`` and
        ``--max-tokens`` are not, ``--hf-token`` and ``--apikey`` are."""
        self.assertEqual(
            mask_argv(["srv", "--tokens-per-second", "40", "--max-tokens", "8", "--apikey", "s"]),
            ["srv", "--tokens-per-second", "40", "--max-tokens", "8", "--apikey", "***"],
        )

    def test_names(self) -> None:
        """Names saying key, token, secret or password (any case) are secret;
        options naming a file, path or directory are not."""
        for name in ("api-key", "hf-token", "API_KEY", "HF_TOKEN", "client-secret", "Password"):
            self.assertTrue(is_secret_name(name), name)
        for name in ("port", "model", "ssl-key-file", "keyfile-path", "ctx-size", "host"):
            self.assertFalse(is_secret_name(name), name)


class MaskArgvTests(SynchronousTestCase):
    def test_option_forms(self) -> None:
        """``--opt X``, ``--opt=X`` and ``-opt X`` are masked, case-insensitively;
        other words are kept."""
        argv = [
            "llama-server",
            "--api-key",
            "sk-1",
            "--HF-TOKEN=hf_2",
            "-hf-token",
            "hf_3",
            "--port",
            "8080",
            "--client-secret",
            "s4",
            "--db-password=p5",
        ]
        self.assertEqual(
            mask_argv(argv),
            [
                "llama-server",
                "--api-key",
                MASK,
                "--HF-TOKEN=" + MASK,
                "-hf-token",
                MASK,
                "--port",
                "8080",
                "--client-secret",
                MASK,
                "--db-password=" + MASK,
            ],
        )

    def test_assignments(self) -> None:
        """``NAME=value`` words with a secret name (as ``env`` takes them) are masked."""
        self.assertEqual(
            mask_argv(["env", "HF_TOKEN=hf_1", "LANG=C", "python", "-m", "x"]),
            ["env", "HF_TOKEN=" + MASK, "LANG=C", "python", "-m", "x"],
        )

    def test_flag_without_value(self) -> None:
        """A secret-named option followed by another long option takes no value."""
        self.assertEqual(
            mask_argv(["x", "--no-api-key", "--port", "1", "--ssl-key-file", "k.pem"]),
            ["x", "--no-api-key", "--port", "1", "--ssl-key-file", "k.pem"],
        )

    def test_join(self) -> None:
        """join_argv is the masked argv on one line, for log lines."""
        self.assertEqual(join_argv(["s", "--api-key", "k", "-m", "x"]), "s --api-key *** -m x")

    def test_env(self) -> None:
        """``env`` entries with a secret name are masked, others are kept."""
        self.assertEqual(
            mask_env(["HF_TOKEN=hf_1", "OPENAI_API_KEY=sk", "CUDA_VISIBLE_DEVICES=0", "ODD"]),
            ["HF_TOKEN=***", "OPENAI_API_KEY=***", "CUDA_VISIBLE_DEVICES=0", "ODD"],
        )


#: Other words never name a secret (no k, s or t); no word holds a NUL or a
#: line break (a quoted line starting with ``#`` would be a comment line).
_NOT_VALUES = "\x00\n\r"
_NOT_WORDS = _NOT_VALUES + "kKsStT"


class MaskCommandTests(SynchronousTestCase):
    def test_layout_kept(self) -> None:
        """A multi-line command keeps its lines, indentation and continuations;
        only the secret values change."""
        cmd = "server --port 5800 \\\n  --api-key sk-1 \\\n  --hf-token=hf_2 -m m.gguf\n"
        self.assertEqual(
            mask_command(cmd),
            "server --port 5800 \\\n  --api-key *** \\\n  --hf-token=*** -m m.gguf\n",
        )

    def test_quoted_values(self) -> None:
        """Quoted values (with spaces) are masked whole."""
        self.assertEqual(
            mask_command("""s --api-key "a b" --token='c d' "--secret=e f" -x 'y z'"""),
            "s --api-key *** --token=*** --secret=*** -x 'y z'",
        )

    def test_value_after_continuation(self) -> None:
        """The value on the line after its option is masked."""
        self.assertEqual(mask_command("s --api-key \\\n  sk-1 -m x"), "s --api-key \\\n  *** -m x")

    def test_comment_lines(self) -> None:
        """Commented-out options are masked too, and a quote in a comment
        does not hide the next line's secret."""
        cmd = "s\n# don't: --api-key old\n  --token new -m x"
        self.assertEqual(mask_command(cmd), "s\n# don't: --api-key ***\n  --token *** -m x")

    def test_known_values(self) -> None:
        """Known secret values are masked wherever they stand as a word, not
        inside longer words."""
        self.assertEqual(
            mask_known("s -k sk-1 --x=sk-1 'sk-1' sk-1b a", ["sk-1", "", "a"]),
            "s -k *** --x=*** '***' sk-1b ***",
        )

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.text(st.characters(blacklist_characters=_NOT_WORDS), max_size=8), max_size=6),
        st.sampled_from(["--api-key", "--hf-token", "-token", "--Client-Secret"]),
        st.text(st.characters(blacklist_characters=_NOT_VALUES), min_size=1, max_size=8),
        st.booleans(),
        st.integers(min_value=0, max_value=6),
    )
    def test_command_agrees_with_argv(
        self, words: list[str], option: str, value: str, joined: bool, at: int
    ) -> None:
        """Masking a command string masks exactly what masking its argv does:
        split(mask_command(cmd)) == mask_argv(split(cmd)), whatever the quoting."""
        words = list(words)
        pair = [f"{option}={value}"] if joined else [option, value]
        words[at:at] = pair
        cmd = shlex.join(words)
        self.assertEqual(list(split_command(mask_command(cmd))), mask_argv(split_command(cmd)))
        masked = mask_argv(words)
        position = min(at, len(words) - len(pair))
        if joined:
            self.assertEqual(masked[position], f"{option}={MASK}")
        elif not (value.startswith("--") and len(value) > 2):
            self.assertEqual(masked[position + 1], MASK)


class OneLineTests(SynchronousTestCase):
    def test_continuations_and_newlines_joined(self) -> None:
        """Continuations, newlines and runs of blanks become single spaces;
        comment lines are dropped; quoted text is kept as written."""
        cmd = 'server  --port 5800 \\\n    # note\n    -m "a  b"\n  --ctx 4096\n'
        self.assertEqual(one_line_command(cmd), 'server --port 5800 -m "a  b" --ctx 4096')

    def test_shown_command(self) -> None:
        """What /running shows: one line, secrets masked, known values masked."""
        self.assertEqual(
            shown_command("s \\\n --api-key x \\\n  -k known", ["known"]),
            "s --api-key *** -k ***",
        )


class ConfigReprTests(SynchronousTestCase):
    def test_reprs_hold_no_secret(self) -> None:
        """The reprs of the config, a model and the peers show no secret,
        while showing the rest (the masked option, other env entries)."""
        config = _config()
        for shown in (repr(config), repr(config.peers), str(config)):
            for secret in SECRETS:
                self.assertNotIn(secret, shown)
        model = repr(config.models["a"])
        # A model alone knows no key values: it masks by name (`-k sk-peer` stays).
        for secret in ("sk-local", "hf_xyz", "hf_env", "sk-openai"):
            self.assertNotIn(secret, model)
        self.assertIn("'--api-key', '***'", model)
        self.assertIn("('CUDA_VISIBLE_DEVICES', '0')", model)
        self.assertIn("('HF_TOKEN', '***')", model)

    def test_known_secrets(self) -> None:
        """known_secrets lists apiKeys and peers' apiKey values."""
        self.assertEqual(_config().known_secrets(), ("sk-global", "sk-peer"))


class ResolvedYamlTests(SynchronousTestCase):
    def test_masked(self) -> None:
        """check-config's document masks apiKeys, peer apiKey, secret
        options (in cmd, cmdStop and comments), secret env entries and
        macros holding secrets; the rest is shown."""
        text = _config().resolved_yaml()
        for secret in SECRETS:
            self.assertNotIn(secret, text)
        document = yaml.safe_load(text)
        self.assertEqual(document["apiKeys"], [MASK])
        self.assertEqual(document["peers"]["far"]["apiKey"], MASK)
        self.assertEqual(document["macros"], {"HF_SECRET": MASK})
        model = document["models"]["a"]
        self.assertEqual(
            model["env"], ["HF_TOKEN=***", "OPENAI_API_KEY=***", "CUDA_VISIBLE_DEVICES=0"]
        )
        self.assertEqual(model["cmdStop"], "stopper --api-key *** ${PID}")
        self.assertIn("--api-key *** \\\n  --hf-token=*** -m model.gguf -k ***", model["cmd"])

    def test_show_secrets(self) -> None:
        """With show_secrets every value is shown as resolved."""
        text = _config().resolved_yaml(show_secrets=True)
        for secret in ("sk-global", "sk-local", "hf_xyz", "hf_env", "sk-peer"):
            self.assertIn(secret, text)

    def test_block_scalars(self) -> None:
        """A multi-line command is printed as a ``|`` block scalar, one line
        of YAML per line of the command, and reads back the same (apart from
        trailing blanks)."""
        config = load_config_text(
            "models:\n  a:\n    cmd: |\n      server --port ${PORT}   \n        -m x.gguf\n",
            environ={},
        )
        text = config.resolved_yaml()
        self.assertIn("    cmd: |\n      server --port 5800\n        -m x.gguf\n", text)
        self.assertEqual(
            yaml.safe_load(text)["models"]["a"]["cmd"], "server --port 5800\n  -m x.gguf\n"
        )


class CheckConfigCommandTests(TestCase):
    """``llamaswap check-config`` run as a user runs it."""

    timeout = 60

    def setUp(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(CONFIG)
        self.addCleanup(os.unlink, f.name)
        self.path = f.name

    async def run_cli(self, *args: str) -> tuple[str, str, int]:
        out, err, code = await utils.getProcessOutputAndValue(
            PYTHON, ["-m", "llamaswap", *args], env=dict(os.environ), path=REPO, reactor=reactor
        )
        return out.decode(), err.decode(), code

    async def test_masked_by_default(self) -> None:
        """check-config prints no secret, and multi-line commands as block scalars."""
        out, err, code = await self.run_cli("check-config", self.path)
        self.assertEqual(code, 0, err)
        for secret in SECRETS:
            self.assertNotIn(secret, out)
        self.assertIn(
            "    cmd: |\n"
            "      llama-server --port 5800\n"
            "        --api-key *** \\\n"
            "        --hf-token=*** -m model.gguf -k ***\n",
            out,
        )
        self.assertIn("apiKey: '***'", out)

    async def test_show_secrets(self) -> None:
        """--show-secrets (before or after the file) prints them."""
        for args in (("--show-secrets", self.path), (self.path, "--show-secrets")):
            out, err, code = await self.run_cli("check-config", *args)
            self.assertEqual(code, 0, err)
            self.assertIn("--api-key sk-local", out)
            self.assertIn("- sk-global", out)
            self.assertIn("apiKey: sk-peer", out)

    async def test_usage(self) -> None:
        """A missing file argument names the option in the usage line."""
        out, err, code = await self.run_cli("check-config", "--show-secrets")
        self.assertEqual(code, 2)
        self.assertIn("check-config [--show-secrets] CONFIG", err)


class ProcessLogTests(test_process.ProcessTestCase):
    """The supervisor's log lines and start errors, with fake children."""

    ARGV = ("server", "--port", "5800", "--api-key", "sk-local", "HF_TOKEN=hf_env")

    def test_start_line_masked(self) -> None:
        """The 'started pid' line shows the command with its secrets masked."""
        self.ready(argv=self.ARGV)
        self.assertIn(
            "m started pid 1001: server --port 5800 --api-key *** HF_TOKEN=***", self.logged()
        )
        self.assertNotIn("sk-local", self.logged())

    def test_start_error_masked(self) -> None:
        """A command that cannot be started is named with its secrets masked."""
        self.launcher.missing.add("server")
        failure = self.failureResultOf(self.make(argv=self.ARGV).make_ready(), StartError)
        self.assertEqual(
            failure.value.message,
            "failed to start command 'server --port 5800 --api-key *** HF_TOKEN=***': "
            "no such program server",
        )

    def test_cmd_stop_line_masked(self) -> None:
        """The 'running cmdStop' line masks the stop command's secrets."""
        process, child = self.ready(cmd_stop="stopper --token sk-stop ${PID}")
        process.stop(2)
        self.assertEqual(self.launcher.children[1].argv, ("stopper", "--token", "sk-stop", "1001"))
        self.assertIn("m running cmdStop: stopper --token *** 1001", self.logged())
        self.assertNotIn("sk-stop", self.logged())
        self.launcher.children[1].exit(0)
        child.exit(0)
        self.clock.advance(1)
        self.assert_no_timers()


class _RecordingPeer(Resource):
    """A remote peer on loopback: records the headers of every request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Headers] = []

    def render(self, request: Any) -> bytes:
        self.seen.append(request.requestHeaders.copy())
        request.setHeader(b"content-type", b"application/json")
        return b'{"object": "list", "data": []}'


KEY = "sk-llamaswap"


def _auth(**headers: str) -> dict[bytes, list[bytes]]:
    return {
        b"content-type": [b"application/json"],
        **{name.replace("_", "-").encode(): [value.encode()] for name, value in headers.items()},
    }


class ServiceSecretsTests(test_service.ServiceTestCase):
    """The whole service on loopback with a real child and real peers."""

    async def start_with_peers(self) -> None:
        self.keyed = _RecordingPeer()
        self.bare = _RecordingPeer()
        peers = {}
        for name, peer, key in (("keyed", self.keyed, "sk-peer"), ("bare", self.bare, "")):
            port = listen(peer)
            self.addCleanup(port.stopListening)
            peers[name] = {
                "proxy": base_url(port),
                "models": [f"{name}-m"],
                "check": {"interval": 0},
            }
            if key:
                peers[name]["apiKey"] = key
        port = self.model_port = free_port()
        model = test_service.responder_model(port)
        model["cmd"] = (
            f"env HF_TOKEN=hf_env {PYTHON} {RESPONDER}\n"
            f"  # was: --api-key sk-old\n"
            f"  --port {port} \\\n  --api-key sk-local \\\n  --hf-token=hf_xyz\n"
        )
        await self.start({"a": model}, apiKeys=[KEY], peers=peers)

    async def post(self, path: str, body: dict[str, Any], **headers: str) -> Any:
        response = await treq.post(
            self.url + path,
            data=json.dumps(body).encode(),
            headers=_auth(**headers),
            pool=self.pool,
        )
        return response.code, await response.content()

    async def test_local_upstream_never_gets_our_key(self) -> None:
        """The header that carried our key (Bearer, x-api-key, or both when a
        client sends it twice) does not reach the local upstream; a different
        credential meant for the upstream does."""
        await self.start_with_peers()
        cases = [
            ({"authorization": f"Bearer {KEY}"}, {}),
            ({"x_api_key": KEY}, {}),
            ({"authorization": "Basic " + b64encode(f"me:{KEY}".encode()).decode()}, {}),
            ({"authorization": f"Bearer {KEY}", "x_api_key": KEY}, {}),
            ({"authorization": f"Bearer {KEY}", "x_api_key": "theirs"}, {"x-api-key": "theirs"}),
        ]
        for sent, kept in cases:
            code, content = await self.post("/v1/embeddings", {"model": "a"}, **sent)
            self.assertEqual(code, 200, content)
            received = json.loads(content)["headers"]
            self.assertNotIn(KEY, json.dumps(received), sent)
            for name, value in kept.items():
                self.assertEqual(received.get(name), value)

    async def test_peers_get_their_own_key_or_none_of_ours(self) -> None:
        """A peer with an apiKey gets it in both headers; a peer without one
        gets no header that carried our key, whichever header it came in."""
        await self.start_with_peers()
        cases = [
            {"authorization": f"Bearer {KEY}"},
            {"x_api_key": KEY},
            {"authorization": f"Bearer {KEY}", "x_api_key": KEY},
        ]
        for sent in cases:
            for model in ("keyed-m", "bare-m"):
                code, content = await self.post("/v1/chat/completions", {"model": model}, **sent)
                self.assertEqual(code, 200, content)
        self.assertEqual(len(self.keyed.seen), 3)
        self.assertEqual(len(self.bare.seen), 3)
        for headers in self.keyed.seen:
            self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer sk-peer"])
            self.assertEqual(headers.getRawHeaders(b"x-api-key"), [b"sk-peer"])
        for headers in self.bare.seen:
            self.assertIsNone(headers.getRawHeaders(b"authorization"))
            self.assertIsNone(headers.getRawHeaders(b"x-api-key"))
        # /upstream/<peer model>/… is a peer request too.
        response = await treq.get(
            self.url + "/upstream/bare-m/v1/models",
            headers={b"authorization": [f"Bearer {KEY}".encode()]},
            pool=self.pool,
        )
        self.assertEqual(response.code, 200, await response.content())
        self.assertIsNone(self.bare.seen[-1].getRawHeaders(b"authorization"))

    async def test_client_credential_for_peer_passes(self) -> None:
        """With our key in Authorization, a client's own x-api-key for a peer
        without apiKey goes through (llama-swap passes client headers)."""
        await self.start_with_peers()
        code, content = await self.post(
            "/v1/chat/completions",
            {"model": "bare-m"},
            authorization=f"Bearer {KEY}",
            x_api_key="t",
        )
        self.assertEqual(code, 200, content)
        self.assertIsNone(self.bare.seen[-1].getRawHeaders(b"authorization"))
        self.assertEqual(self.bare.seen[-1].getRawHeaders(b"x-api-key"), [b"t"])

    async def test_running_logs_and_events_masked(self) -> None:
        """/running shows cmd on one line with secrets masked; the start line
        in /logs and in /api/events' log data masks them too."""
        await self.start_with_peers()
        code, content = await self.post(
            "/v1/embeddings", {"model": "a"}, authorization=f"Bearer {KEY}"
        )
        self.assertEqual(code, 200, content)
        auth = {b"authorization": [f"Bearer {KEY}".encode()]}
        running = await (await treq.get(self.url + "/running", headers=auth, pool=self.pool)).json()
        [entry] = running["running"]
        self.assertEqual(
            entry["cmd"],
            f"env HF_TOKEN=*** {PYTHON} {RESPONDER} --port {self.model_port}"
            " --api-key *** --hf-token=***",
        )
        logs = await (await treq.get(self.url + "/logs", headers=auth, pool=self.pool)).text()
        self.assertIn("started pid", logs)
        started = [line for line in logs.splitlines() if "started pid" in line]
        self.assertIn("--api-key *** --hf-token=***", started[0])
        response = await treq.get(
            self.url + "/api/events", headers=auth, pool=self.pool, unbuffered=True
        )
        received: list[bytes] = []
        collecting = treq.collect(response, received.append)
        collecting.addErrback(lambda f: None)
        await poll_until(lambda: b'"type":"inflight"' in b"".join(received).replace(b" ", b""))
        collecting.cancel()
        response.original._transport.loseConnection()
        events = b"".join(received).decode()
        self.assertIn("started pid", events)
        models = await (
            await treq.get(self.url + "/v1/models", headers=auth, pool=self.pool)
        ).text()
        for shown in (json.dumps(running), logs, events, models):
            for secret in ("sk-local", "hf_xyz", "hf_env", "sk-peer", KEY):
                self.assertNotIn(secret, shown)
