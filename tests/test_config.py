"""Tests for the config loader and macro engine (reference §2.1, §2.2, §2.7)."""

from __future__ import annotations

import os
from pathlib import Path
from textwrap import dedent
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import Config, ConfigError, ModelConfig, load_config, load_config_text
from llamaswap.config.macros import format_value

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "config.example.yaml"


def load(text: str, **environ: str) -> Config:
    return load_config_text(dedent(text), environ=environ)


def resolved(config: Config) -> Any:
    """The resolved document, as ``check-config --show-secrets`` prints it."""
    return yaml.safe_load(config.resolved_yaml(show_secrets=True))


class ConfigTestCase(SynchronousTestCase):
    def problems(self, text: str, **environ: str) -> tuple[str, ...]:
        """The problems of a config that must fail to load."""
        with self.assertRaises(ConfigError) as raised:
            load(text, **environ)
        return raised.exception.problems

    def assertProblem(self, text: str, problem: str, **environ: str) -> None:
        self.assertEqual(self.problems(text, **environ), (problem,))

    def model(self, text: str, model_id: str = "m", **environ: str) -> ModelConfig:
        return load(text, **environ).models[model_id]


class DefaultsTests(ConfigTestCase):
    def test_empty_document(self) -> None:
        """An empty or comment-only document loads as the default config."""
        for text in ("", "# nothing here\n", "---\n"):
            with self.subTest(text=text):
                self.assertEqual(load(text), Config())

    def test_global_defaults(self) -> None:
        """Unset globals take llama-swap's defaults."""
        config = load("models: {}\n")
        self.assertEqual(
            (
                config.health_check_timeout,
                config.start_port,
                config.log_level,
                config.global_ttl,
                config.unload_timeout,
                config.send_loading_state,
            ),
            (120, 5800, "info", 0, 10, False),
        )
        self.assertEqual(config.warnings, ())

    def test_model_defaults(self) -> None:
        """A model with only a ${PORT} cmd gets the default proxy, health path and limits."""
        model = self.model(
            """
            models:
              m:
                cmd: server --port ${PORT}
            """
        )
        self.assertEqual(
            model,
            ModelConfig(
                id="m",
                argv=("server", "--port", "5800"),
                cmd="server --port 5800",
                proxy="http://localhost:5800",
                check_endpoint="/health",
                ttl=0,
                unload_timeout=10,
                concurrency_limit=10,
                send_loading_state=None,
                port=5800,
            ),
        )

    def test_null_values_mean_default(self) -> None:
        """Keys present with a null value behave as if unset."""
        model = self.model(
            """
            models:
              m:
                cmd: server --port ${PORT}
                proxy:
                ttl:
                checkEndpoint:
                aliases:
            """
        )
        self.assertEqual(
            (model.proxy, model.ttl, model.check_endpoint, model.aliases),
            ("http://localhost:5800", 0, "/health", ()),
        )

    def test_empty_cmd_allowed(self) -> None:
        """An empty cmd loads (with an explicit proxy) and gives an empty argv."""
        model = self.model(
            """
            models:
              m:
                proxy: http://127.0.0.1:9000
            """
        )
        self.assertEqual((model.cmd, model.argv), ("", ()))

    def test_models_sorted(self) -> None:
        """``Config.models`` iterates in sorted model-id order."""
        config = load(
            """
            models:
              zeta: {cmd: z, proxy: "http://h:1"}
              alpha: {cmd: a, proxy: "http://h:2"}
              mid: {cmd: m, proxy: "http://h:3"}
            """
        )
        self.assertEqual(list(config.models), ["alpha", "mid", "zeta"])


class GlobalKeyTests(ConfigTestCase):
    def test_values(self) -> None:
        """Global keys are read into the config."""
        config = load(
            """
            healthCheckTimeout: 60
            startPort: 9000
            logLevel: DEBUG
            globalTTL: 300
            unloadTimeout: 5
            sendLoadingState: true
            """
        )
        self.assertEqual(
            (
                config.health_check_timeout,
                config.start_port,
                config.log_level,
                config.global_ttl,
                config.unload_timeout,
                config.send_loading_state,
            ),
            (60, 9000, "debug", 300, 5, True),
        )

    def test_health_check_timeout_minimum(self) -> None:
        """healthCheckTimeout below 15 is raised to 15."""
        self.assertEqual(load("healthCheckTimeout: 3\n").health_check_timeout, 15)

    def test_start_port_minimum(self) -> None:
        """startPort must be at least 1."""
        self.assertProblem("startPort: 0\n", "startPort: must be >= 1, got 0")

    def test_global_ttl_negative(self) -> None:
        """globalTTL must not be negative."""
        self.assertProblem("globalTTL: -1\n", "globalTTL: must be >= 0, got -1")

    def test_unload_timeout(self) -> None:
        """unloadTimeout 0 means the default 10; negative is an error."""
        self.assertEqual(load("unloadTimeout: 0\n").unload_timeout, 10)
        self.assertProblem("unloadTimeout: -2\n", "unloadTimeout: must be >= 0, got -2")

    def test_unknown_log_level(self) -> None:
        """An unknown logLevel is a warning and falls back to info."""
        config = load("logLevel: verbose\n")
        self.assertEqual(config.log_level, "info")
        self.assertEqual(config.warnings, ("logLevel: unknown level 'verbose', using \"info\"",))

    def test_wrong_types(self) -> None:
        """Values of the wrong type name the key and the value."""
        self.assertEqual(
            self.problems(
                """
                healthCheckTimeout: abc
                startPort: [1]
                globalTTL: 1.5
                sendLoadingState: maybe
                """
            ),
            (
                "healthCheckTimeout: must be an integer, got 'abc'",
                "startPort: must be an integer, got a list",
                "globalTTL: must be an integer, got 1.5",
                "sendLoadingState: must be true or false, got 'maybe'",
            ),
        )

    def test_quoted_number_is_not_an_integer(self) -> None:
        """A quoted number is a string, as in llama-swap."""
        self.assertProblem('globalTTL: "10"\n', "globalTTL: must be an integer, got '10'")

    def test_yaml11_bool_words(self) -> None:
        """Boolean keys accept the YAML 1.1 words (yes/no/on/off) like yaml.v3 does."""
        self.assertTrue(load("sendLoadingState: yes\n").send_loading_state)


class ModelKeyTests(ConfigTestCase):
    def test_all_keys(self) -> None:
        """Every supported model key is read into ModelConfig."""
        model = self.model(
            """
            globalTTL: 100
            models:
              m:
                cmd: |
                  server
                  --port ${PORT}
                cmdStop: kill -TERM ${PID}
                proxy: http://127.0.0.1:${PORT}/base
                env: ["A=1", "B=x=y", "C="]
                aliases: [one, two]
                checkEndpoint: " /ready "
                ttl: 30
                unloadTimeout: 7
                unlisted: true
                useModelName: upstream-name
                name: "  Pretty  "
                description: "  Words.  "
                metadata: {k: v}
                concurrencyLimit: 3
                sendLoadingState: false
            """
        )
        self.assertEqual(
            model,
            ModelConfig(
                id="m",
                argv=("server", "--port", "5800"),
                cmd="server\n--port 5800\n",
                cmd_stop="kill -TERM ${PID}",
                proxy="http://127.0.0.1:5800/base",
                env=(("A", "1"), ("B", "x=y"), ("C", "")),
                aliases=("one", "two"),
                check_endpoint="/ready",
                ttl=30,
                unload_timeout=7,
                unlisted=True,
                use_model_name="upstream-name",
                name="Pretty",
                description="Words.",
                metadata={"k": "v"},
                concurrency_limit=3,
                send_loading_state=False,
                port=5800,
            ),
        )

    def test_ttl_defaults_to_global(self) -> None:
        """ttl unset or -1 takes globalTTL."""
        config = load(
            """
            globalTTL: 50
            models:
              a: {cmd: "x ${PORT}"}
              b: {cmd: "x ${PORT}", ttl: -1}
              c: {cmd: "x ${PORT}", ttl: 0}
            """
        )
        self.assertEqual([m.ttl for m in config.models.values()], [50, 50, 0])

    def test_ttl_negative(self) -> None:
        """ttl below -1 is an error naming the key path."""
        self.assertProblem(
            """
            models:
              llama:
                cmd: server --port ${PORT}
                ttl: -5
            """,
            "models.llama.ttl: must be >= 0, got -5",
        )

    def test_unload_timeout(self) -> None:
        """Model unloadTimeout 0 or unset takes the global value; negative is an error."""
        config = load(
            """
            unloadTimeout: 20
            models:
              a: {cmd: "x ${PORT}"}
              b: {cmd: "x ${PORT}", unloadTimeout: 0}
            """
        )
        self.assertEqual([m.unload_timeout for m in config.models.values()], [20, 20])
        self.assertProblem(
            """
            models:
              a: {cmd: "x ${PORT}", unloadTimeout: -1}
            """,
            "models.a.unloadTimeout: must be >= 0, got -1",
        )

    def test_concurrency_limit(self) -> None:
        """concurrencyLimit 0 means 10; negative is an error."""
        self.assertEqual(
            self.model("models: {m: {cmd: 'x ${PORT}', concurrencyLimit: 0}}").concurrency_limit,
            10,
        )
        self.assertProblem(
            "models: {m: {cmd: 'x ${PORT}', concurrencyLimit: -1}}",
            "models.m.concurrencyLimit: must be >= 0, got -1",
        )

    def test_comfyui_concurrency(self) -> None:
        """The comfyui_auto model admits at least 50 requests, as in llama-swap."""
        self.assertEqual(
            self.model(
                "models: {comfyui_auto: {cmd: 'x ${PORT}'}}", "comfyui_auto"
            ).concurrency_limit,
            50,
        )

    def test_check_endpoint(self) -> None:
        """checkEndpoint "none" disables health checks; other values must start with "/"."""
        self.assertIsNone(
            self.model("models: {m: {cmd: 'x ${PORT}', checkEndpoint: none}}").check_endpoint
        )
        self.assertProblem(
            "models: {m: {cmd: 'x ${PORT}', checkEndpoint: health}}",
            'models.m.checkEndpoint: must start with "/" or be "none", got \'health\'',
        )

    def test_proxy_must_be_http_url(self) -> None:
        """proxy must be an http(s) URL with a host."""
        for proxy, reason in (
            ("ftp://host:1", "scheme must be http or https"),
            ("localhost:8080", "scheme must be http or https"),
            ("http://:8080", "missing host"),
        ):
            with self.subTest(proxy=proxy):
                self.assertProblem(
                    f"models: {{m: {{cmd: x, proxy: '{proxy}'}}}}",
                    f"models.m.proxy: invalid URL '{proxy}': {reason}",
                )

    def test_proxy_bad_port(self) -> None:
        """A proxy URL with a non-numeric port is rejected."""
        [problem] = self.problems("models: {m: {cmd: x, proxy: 'http://h:abc'}}")
        self.assertTrue(problem.startswith("models.m.proxy: invalid URL 'http://h:abc': "), problem)

    def test_env_needs_equals(self) -> None:
        """Each env entry must be KEY=VALUE."""
        self.assertEqual(
            self.problems("models: {m: {cmd: 'x ${PORT}', env: [A=1, FOO, =x]}}"),
            (
                "models.m.env[1]: must be KEY=VALUE, got 'FOO'",
                "models.m.env[2]: must be KEY=VALUE, got '=x'",
            ),
        )

    def test_unparseable_cmd(self) -> None:
        """A cmd with unbalanced quotes is reported at load."""
        self.assertProblem(
            "models: {m: {cmd: 'x \"open ${PORT}'}}",
            "models.m.cmd: cannot parse command: No closing quotation",
        )

    def test_wrong_types(self) -> None:
        """Model keys of the wrong type name the key path and the value."""
        self.assertEqual(
            self.problems(
                """
                models:
                  a:
                    cmd: x ${PORT}
                    ttl: abc
                    aliases: one
                    unlisted: 3
                    metadata: [1]
                    name: {x: 1}
                """
            ),
            (
                "models.a.ttl: must be an integer, got 'abc'",
                "models.a.aliases: must be a list of strings, got 'one'",
                "models.a.unlisted: must be true or false, got 3",
                "models.a.name: must be a string, got a mapping",
                "models.a.metadata: must be a mapping, got a list",
            ),
        )

    def test_scalars_read_as_strings(self) -> None:
        """Numbers in string keys are read as their text, as yaml.v3 does."""
        model = self.model("models: {m: {cmd: 'x ${PORT}', name: 7, aliases: [1.5, true]}}")
        self.assertEqual((model.name, model.aliases), ("7", ("1.5", "true")))

    def test_prewarm_switch(self) -> None:
        """``prewarm`` is on by default, off with false, a bool or an error;
        it is not compared on reload."""
        self.assertTrue(self.model("models: {m: {cmd: 'x ${PORT}'}}").prewarm)
        off = self.model("models: {m: {cmd: 'x ${PORT}', prewarm: false}}")
        self.assertFalse(off.prewarm)
        self.assertEqual(off, self.model("models: {m: {cmd: 'x ${PORT}'}}"))
        self.assertProblem(
            "models: {m: {cmd: 'x ${PORT}', prewarm: 2}}",
            "models.m.prewarm: must be true or false, got 2",
        )

    def test_model_not_a_mapping(self) -> None:
        """A model entry must be a mapping."""
        self.assertProblem("models: {m: [1]}", "models.m: must be a mapping, got a list")

    def test_models_not_a_mapping(self) -> None:
        """models must be a mapping."""
        self.assertProblem("models: [a]\n", "models: must be a mapping, got a list")

    def test_all_problems_collected(self) -> None:
        """Problems in several models and globals are all reported together."""
        self.assertEqual(
            self.problems(
                """
                globalTTL: -1
                models:
                  a: {cmd: "x ${PORT}", ttl: -5}
                  b: {cmd: "x ${PORT}", concurrencyLimit: -2}
                """
            ),
            (
                "globalTTL: must be >= 0, got -1",
                "models.a.ttl: must be >= 0, got -5",
                "models.b.concurrencyLimit: must be >= 0, got -2",
            ),
        )


class AliasTests(ConfigTestCase):
    def test_aliases_resolve(self) -> None:
        """Aliases map to their model's id."""
        config = load("models: {m: {cmd: 'x ${PORT}', aliases: [a1, a2]}}")
        self.assertEqual(dict(config.aliases), {"a1": "m", "a2": "m"})
        self.assertEqual(config.resolve("a2"), "m")

    def test_duplicate_across_models(self) -> None:
        """An alias used by two models is an error on the later one."""
        self.assertProblem(
            """
            models:
              b: {cmd: "x ${PORT}", aliases: [x]}
              a: {cmd: "x ${PORT}", aliases: [x]}
            """,
            'models.b.aliases: duplicate alias "x" (also used by model "a")',
        )

    def test_duplicate_within_model(self) -> None:
        """An alias listed twice for one model is an error."""
        self.assertProblem(
            "models: {a: {cmd: 'x ${PORT}', aliases: [x, x]}}",
            'models.a.aliases: duplicate alias "x"',
        )

    def test_alias_equals_model_id(self) -> None:
        """An alias may not be another model's id."""
        self.assertProblem(
            """
            models:
              a: {cmd: "x ${PORT}", aliases: [b]}
              b: {cmd: "x ${PORT}"}
            """,
            'models.a.aliases: alias "b" is already a model id',
        )

    def test_empty_alias_ignored(self) -> None:
        """An empty alias is dropped with a warning."""
        config = load("models: {a: {cmd: 'x ${PORT}', aliases: ['', x]}}")
        self.assertEqual(config.models["a"].aliases, ("x",))
        self.assertEqual(config.warnings, ("models.a.aliases: empty alias ignored",))

    def test_set_params_by_id_keys_become_aliases(self) -> None:
        """filters.setParamsByID keys (macro-expanded) other than the model id are aliases."""
        config = load(
            """
            models:
              m:
                cmd: x ${PORT}
                filters:
                  setParamsByID:
                    "${MODEL_ID}:${PORT}": {temperature: 0.5}
                    m: {temperature: 1}
            """
        )
        self.assertEqual(dict(config.aliases), {"m:5800": "m"})
        self.assertEqual(config.models["m"].aliases, ("m:5800",))
        self.assertEqual(
            resolved(config)["models"]["m"]["filters"]["setParamsByID"],
            {"m:5800": {"temperature": 0.5}, "m": {"temperature": 1}},
        )

    def test_set_params_by_id_key_conflicts(self) -> None:
        """setParamsByID keys may not be another model's id or alias."""
        self.assertEqual(
            self.problems(
                """
                models:
                  m:
                    cmd: x ${PORT}
                    filters:
                      setParamsByID:
                        n: {a: 1}
                        taken: {a: 1}
                  n: {cmd: "y ${PORT}", aliases: [taken]}
                """
            ),
            (
                'models.m.filters.setParamsByID: key "n" conflicts with an existing model id',
                'models.m.filters.setParamsByID: duplicate alias "taken" (also used by model "n")',
            ),
        )


class PortTests(ConfigTestCase):
    def test_sorted_allocation(self) -> None:
        """Ports go to models in sorted id order, skipping models whose cmd has no ${PORT}."""
        config = load(
            """
            startPort: 9000
            models:
              zeta: {cmd: "z --port ${PORT}"}
              beta: {cmd: "b", proxy: "http://h:1"}
              alpha: {cmd: "a --port ${PORT}"}
              gamma: {cmd: "g --port ${PORT}"}
            """
        )
        self.assertEqual(
            {model.id: model.port for model in config.models.values()},
            {"alpha": 9000, "beta": None, "gamma": 9001, "zeta": 9002},
        )
        self.assertEqual(config.models["zeta"].proxy, "http://localhost:9002")

    def test_port_used_everywhere_in_model(self) -> None:
        """${PORT} expands in every model value; alone it keeps the integer type."""
        model = self.model(
            """
            models:
              m:
                cmd: server --port ${PORT}
                checkEndpoint: /health?port=${PORT}
                aliases: ["m-${PORT}"]
                metadata:
                  port: ${PORT}
                  url: "http://x:${PORT}"
            """
        )
        self.assertEqual(model.check_endpoint, "/health?port=5800")
        self.assertEqual(model.aliases, ("m-5800",))
        self.assertEqual(dict(model.metadata), {"port": 5800, "url": "http://x:5800"})

    def test_port_from_macro(self) -> None:
        """A cmd that gets ${PORT} through a macro is assigned a port."""
        model = self.model(
            """
            macros:
              SERVER: llama-server --port ${PORT}
            models:
              m: {cmd: "${SERVER} -m x.gguf"}
            """
        )
        self.assertEqual(model.argv, ("llama-server", "--port", "5800", "-m", "x.gguf"))

    def test_start_port_from_macro(self) -> None:
        """startPort may itself be a macro."""
        config = load(
            """
            macros:
              FIRST: 6200
            startPort: ${FIRST}
            models:
              m: {cmd: "s ${PORT}"}
            """
        )
        self.assertEqual((config.start_port, config.models["m"].port), (6200, 6200))

    def test_proxy_uses_port_but_cmd_does_not(self) -> None:
        """The default proxy needs ${PORT} in cmd."""
        self.assertProblem(
            "models: {a: {cmd: server --port 8080}}",
            "models.a.proxy: uses ${PORT} but cmd does not - ${PORT} is only available"
            " when used in cmd",
        )

    def test_other_key_uses_port_but_cmd_does_not(self) -> None:
        """Any model value using ${PORT} needs ${PORT} in cmd."""
        self.assertProblem(
            "models: {a: {cmd: x, proxy: 'http://h:1', name: 'on ${PORT}'}}",
            "models.a.name: uses ${PORT} but cmd does not - ${PORT} is only available"
            " when used in cmd",
        )

    def test_port_in_comment_allocates_nothing(self) -> None:
        """Comment lines are stripped before expansion: their ${PORT} takes no port."""
        config = load(
            """
            models:
              a:
                cmd: |
                  server --port 7000
                  # --port ${PORT}
                proxy: http://127.0.0.1:7000
              b:
                cmd: server --port ${PORT}
            """
        )
        self.assertEqual((config.models["a"].port, config.models["b"].port), (None, 5800))
        self.assertEqual(config.models["a"].cmd, "server --port 7000\n")


class MacroTests(ConfigTestCase):
    def test_global_macros(self) -> None:
        """Global macros expand in model values and are kept in Config.macros."""
        config = load(
            """
            macros:
              DIR: /models
              CTX: 4096
            models:
              m:
                cmd: server --port ${PORT} -m ${DIR}/m.gguf -c ${CTX}
            """
        )
        self.assertEqual(config.models["m"].cmd, "server --port 5800 -m /models/m.gguf -c 4096")
        self.assertEqual(dict(config.macros), {"DIR": "/models", "CTX": 4096})

    def test_typed_metadata(self) -> None:
        """A value that is exactly one macro keeps the macro's type; others interpolate."""
        model = self.model(
            """
            macros:
              INT: 42
              FLOAT: 0.5
              BIG: 1000000.0
              BOOL: true
              STR: text
            models:
              m:
                cmd: x ${PORT}
                metadata:
                  int: ${INT}
                  float: ${FLOAT}
                  bool: ${BOOL}
                  str: ${STR}
                  mixed: "${INT}/${FLOAT}/${BOOL}/${BIG}"
            """
        )
        self.assertEqual(
            dict(model.metadata),
            {"int": 42, "float": 0.5, "bool": True, "str": "text", "mixed": "42/0.5/true/1e+06"},
        )

    def test_nested_metadata(self) -> None:
        """Macros expand inside nested maps and lists, but not in map keys."""
        model = self.model(
            """
            macros:
              N: 3
            models:
              m:
                cmd: x ${PORT}
                metadata:
                  "${N}":
                    list: ["${N}", "n=${N}", {deep: "${MODEL_ID}"}]
            """
        )
        self.assertEqual(dict(model.metadata), {"${N}": {"list": [3, "n=3", {"deep": "m"}]}})

    def test_model_macro_overrides_global_in_place(self) -> None:
        """A model macro replaces the global of the same name where it was declared."""
        config = load(
            """
            macros:
              tag: global
              msg: value-${tag}
            models:
              a:
                macros:
                  tag: model-level
                cmd: echo ${msg} ${PORT}
              b:
                cmd: echo ${msg} ${PORT}
            """
        )
        self.assertEqual(config.models["a"].argv[:2], ("echo", "value-model-level"))
        self.assertEqual(config.models["b"].argv[:2], ("echo", "value-global"))

    def test_model_macro_may_use_globals(self) -> None:
        """A model-only macro is appended after the globals and may reference them."""
        model = self.model(
            """
            macros:
              DIR: /models
            models:
              m:
                macros:
                  FILE: ${DIR}/${MODEL_ID}.gguf
                cmd: server -m ${FILE} --port ${PORT}
            """
        )
        self.assertEqual(model.argv[2], "/models/m.gguf")

    def test_macro_in_macro_lifo(self) -> None:
        """Macros may reference earlier macros, through several levels."""
        model = self.model(
            """
            macros:
              base: /models
              path: ${base}/llama
              full: ${path}/model.gguf
            models:
              m: {cmd: "load ${full} ${PORT}"}
            """
        )
        self.assertEqual(model.argv, ("load", "/models/llama/model.gguf", "5800"))

    def test_forward_reference_rejected(self) -> None:
        """A macro referencing a later macro leaves an unknown macro."""
        self.assertProblem(
            """
            macros:
              A: ${B}
              B: b
            models:
              m: {cmd: "echo ${A} ${PORT}"}
            """,
            "models.m.cmd: unknown macro '${B}'",
        )

    def test_model_macro_does_not_leak(self) -> None:
        """A model macro is not visible to other models."""
        self.assertProblem(
            """
            models:
              owner:
                macros: {LOCAL: x}
                cmd: echo ${LOCAL} ${PORT}
              other:
                cmd: echo ${LOCAL} ${PORT}
            """,
            "models.other.cmd: unknown macro '${LOCAL}'",
        )

    def test_model_id(self) -> None:
        """${MODEL_ID} expands to the model id, also through global macros."""
        model = self.model(
            """
            macros:
              RUN: podman run --name ${MODEL_ID}
            models:
              my-model: {cmd: "${RUN} -p ${PORT}", name: "Model ${MODEL_ID}"}
            """,
            "my-model",
        )
        self.assertEqual((model.argv[3], model.name), ("my-model", "Model my-model"))

    def test_self_reference(self) -> None:
        """A macro containing itself is rejected."""
        self.assertProblem(
            "macros: {loop: 'x-${loop}'}\n", "macros.loop: macro 'loop' contains self-reference"
        )

    def test_reserved_names(self) -> None:
        """PORT, MODEL_ID and PID may not be declared, globally or per model."""
        self.assertEqual(
            self.problems(
                """
                macros:
                  PORT: 1
                  MODEL_ID: x
                models:
                  m:
                    macros: {PID: 3}
                    cmd: x
                """
            ),
            (
                "macros.PORT: macro name 'PORT' is reserved",
                "macros.MODEL_ID: macro name 'MODEL_ID' is reserved",
                "models.m.macros.PID: macro name 'PID' is reserved",
            ),
        )

    def test_invalid_declarations(self) -> None:
        """Macro names must match ^[a-zA-Z0-9_-]+$ and be < 64 chars; values must be scalars."""
        long_name = "a" * 64
        self.assertEqual(
            self.problems(
                f"""
                macros:
                  bad.name: 1
                  {long_name}: 1
                  list: [1]
                  nothing:
                  ok-name_1: fine
                """
            ),
            (
                "macros.bad.name: macro name 'bad.name' contains invalid characters,"
                " must match pattern ^[a-zA-Z0-9_-]+$",
                f"macros.{long_name}: macro name '{long_name}' exceeds maximum length"
                " of 63 characters",
                "macros.list: macro 'list' has invalid type list, must be a scalar type"
                " (string, int, float, or bool)",
                "macros.nothing: macro 'nothing' has invalid type null, must be a scalar type"
                " (string, int, float, or bool)",
            ),
        )

    def test_pid_deferred_in_cmd_stop(self) -> None:
        """${PID} survives in cmdStop, also when introduced by a macro."""
        model = self.model(
            """
            macros:
              STOP: kill ${PID}
            models:
              m:
                cmd: server ${PORT}
                cmdStop: |
                  # a comment ${PID}
                  ${STOP}
            """
        )
        self.assertEqual(model.cmd_stop, "kill ${PID}\n")

    def test_pid_elsewhere_rejected(self) -> None:
        """${PID} anywhere but cmdStop is an error."""
        self.assertProblem(
            "models: {m: {cmd: 'server ${PORT} ${PID}'}}",
            "models.m.cmd: macro '${PID}' is only available in cmdStop",
        )

    def test_unknown_macro(self) -> None:
        """Unknown macros are reported with their key path."""
        self.assertEqual(
            self.problems(
                """
                hooks:
                  on_startup:
                    preload: ["${NOPE}", "${MODEL_ID}"]
                models:
                  a:
                    cmd: x ${FOO} ${PORT}
                    metadata:
                      list: [ok, "${BAR}"]
                """
            ),
            (
                "hooks.on_startup.preload[0]: unknown macro '${NOPE}'",
                "hooks.on_startup.preload[1]: macro '${MODEL_ID}' is only available inside models",
                "models.a.cmd: unknown macro '${FOO}'",
                "models.a.metadata.list[1]: unknown macro '${BAR}'",
            ),
        )

    def test_unknown_macro_not_also_a_type_error(self) -> None:
        """A key with an unknown macro gets that one problem, not a type error too."""
        self.assertProblem("globalTTL: ${NOPE}\n", "globalTTL: unknown macro '${NOPE}'")

    def test_globals_expand_in_top_level_values(self) -> None:
        """Global macros expand, typed, in every top-level value except models."""
        config = load(
            """
            macros:
              TTL: 120
              LOADING: true
              KEY: secret
            globalTTL: ${TTL}
            sendLoadingState: ${LOADING}
            apiKeys: ["${KEY}", "pre-${KEY}"]
            """
        )
        self.assertEqual((config.global_ttl, config.send_loading_state), (120, True))
        self.assertEqual(resolved(config)["apiKeys"], ["secret", "pre-secret"])
        self.assertEqual(resolved(config)["macros"], {"TTL": 120, "LOADING": True, "KEY": "secret"})

    def test_go_value_formatting(self) -> None:
        """Interpolated values are formatted like Go's %v."""
        self.assertEqual(
            [
                format_value(v)
                for v in (True, False, 3, 0.5, 1.0, 100000.0, 1e6, 1.5e-5, 0.0001, -2.5)
            ],
            ["true", "false", "3", "0.5", "1", "100000", "1e+06", "1.5e-05", "0.0001", "-2.5"],
        )

    def test_document_holds_expanded_models(self) -> None:
        """The resolved document has each model expanded, with its declared macros kept."""
        config = load(
            """
            models:
              m:
                macros: {X: "1"}
                cmd: "s ${X} ${PORT}"
                timeouts: {connect: 5}
            """
        )
        self.assertEqual(
            resolved(config)["models"]["m"],
            {
                "cmd": "s 1 5800",
                "timeouts": {"connect": 5},
                "proxy": "http://localhost:5800",
                "macros": {"X": "1"},
            },
        )


class EnvMacroTests(ConfigTestCase):
    def test_substituted(self) -> None:
        """${env.X} is replaced by the variable's value."""
        model = self.model("models: {m: {cmd: 'server -m ${env.MODEL} ${PORT}'}}", MODEL="/x.gguf")
        self.assertEqual(model.argv[2], "/x.gguf")

    def test_unset(self) -> None:
        """Every unset variable is reported."""
        self.assertEqual(
            self.problems("a: ${env.ONE}\nb: ${env.TWO}\nc: ${env.ONE}\n"),
            (
                "env: environment variable 'ONE' is not set",
                "env: environment variable 'TWO' is not set",
            ),
        )

    def test_in_comments_ignored(self) -> None:
        """Env macros that only occur in comments need not be set."""
        config = load(
            """
            # ${env.MISSING}
            logLevel: debug # ${env.ALSO_MISSING}
            models:
              m:
                cmd: |
                  server ${PORT}
                  # ${env.IN_CMD_COMMENT_LINE} is cmd content, not a YAML comment
            """,
            IN_CMD_COMMENT_LINE="x",
        )
        self.assertEqual(config.log_level, "debug")

    def test_flow_list(self) -> None:
        """Env macros work in flow lists, which only parse after substitution."""
        config = load("apiKeys: [${env.KEY}, b] # ${env.MISSING}\n", KEY="k1")
        self.assertEqual(resolved(config)["apiKeys"], ["k1", "b"])

    def test_escaping(self) -> None:
        """Backslashes and double quotes are escaped for double-quoted YAML."""
        config = load('quoted: "${env.V}"\nplain: ${env.V}\n', V='a"b\\c')
        self.assertEqual(resolved(config)["quoted"], 'a"b\\c')
        self.assertEqual(resolved(config)["plain"], 'a\\"b\\\\c')

    def test_newline_rejected(self) -> None:
        """Values with newlines cannot be substituted."""
        self.assertProblem(
            "a: ${env.V}\n",
            "env: environment variable 'V' contains newlines or null bytes which are not"
            " allowed in YAML substitution",
            V="x\ny",
        )

    def test_defaults_to_os_environ(self) -> None:
        """Without an explicit environ, os.environ is used."""
        self.patch(os, "environ", {"LLAMASWAP_TEST_VAR": "7"})
        config = load_config_text("globalTTL: ${env.LLAMASWAP_TEST_VAR}\n")
        self.assertEqual(config.global_ttl, 7)


class YamlTests(ConfigTestCase):
    def test_syntax_error(self) -> None:
        """YAML syntax errors name the line."""
        self.assertProblem(
            "models:\n  a: [\n",
            "config: invalid YAML at line 3: expected the node content, but found '<stream end>'",
        )

    def test_duplicate_key(self) -> None:
        """Duplicate mapping keys are an error, as in yaml.v3."""
        self.assertProblem(
            "globalTTL: 1\nglobalTTL: 2\n",
            'config: invalid YAML at line 2: mapping key "globalTTL" already defined at line 1',
        )

    def test_top_level_not_mapping(self) -> None:
        """The top level must be a mapping."""
        self.assertProblem("- a\n- b\n", "config: top level must be a mapping, got a list")

    def test_yaml12_scalars(self) -> None:
        """Plain scalars resolve as in yaml.v3: no yes/no bools, dates or base 60."""
        model = self.model(
            """
            models:
              m:
                cmd: x ${PORT}
                metadata: {a: yes, b: 2024-01-01, c: 1:20, d: 0x10, e: 0o17, f: 1_000, g: .5}
            """
        )
        self.assertEqual(
            dict(model.metadata),
            {"a": "yes", "b": "2024-01-01", "c": "1:20", "d": 16, "e": 15, "f": 1000, "g": 0.5},
        )

    def test_anchors_and_merge_keys(self) -> None:
        """Anchors and ``<<`` merge keys work and expand per model."""
        config = load(
            """
            defaults: &base
              cmd: echo ${LOCAL} ${PORT}
              ttl: 5
            models:
              first:
                <<: *base
                macros: {LOCAL: one}
              second:
                <<: *base
                ttl: 9
                macros: {LOCAL: two}
            """
        )
        self.assertEqual(
            [(m.argv[1], m.ttl) for m in config.models.values()], [("one", 5), ("two", 9)]
        )

    def test_numeric_keys_are_text(self) -> None:
        """Mapping keys keep their text, so a numeric model id stays as written."""
        config = load("models:\n  007: {cmd: 'x ${PORT}'}\n")
        self.assertEqual(list(config.models), ["007"])


class UnknownKeyTests(ConfigTestCase):
    def test_warnings_with_suggestion(self) -> None:
        """Unknown keys are warnings with a close known key suggested."""
        config = load(
            """
            globalTtl: 5
            zzz: 1
            models:
              a:
                cmd: x ${PORT}
                tll: 3
            """
        )
        self.assertEqual(
            config.warnings,
            (
                'globalTtl: unknown key (did you mean "globalTTL"?)',
                "zzz: unknown key",
                'models.a.tll: unknown key (did you mean "ttl"?)',
            ),
        )

    def test_later_feature_keys_accepted(self) -> None:
        """Keys implemented by later features neither warn nor fail."""
        config = load(
            """
            logTimeFormat: rfc3339
            logToStdout: both
            logRequests: true
            metricsMaxInMemory: 100
            captureBuffer: 10
            store: {path: /tmp/x.db}
            ui: {activity: {session_id: [X-Session-ID]}}
            performance: {every: 10s}
            includeAliasesInList: true
            apiKeys: [k]
            upstream: {ignorePaths: [x]}
            hooks: {on_startup: {preload: [m]}}
            profiles: {}
            selectors: {}
            peers: {}
            routing: {}
            groups: {}
            compat: {}
            models:
              m:
                cmd: x ${PORT}
                filters: {stripParams: temperature}
                timeouts: {connect: 5}
                compat: {ignoreWebsockets: true}
                capabilities: {in: [text]}
                healthCheckTimeout: 30
            """
        )
        self.assertEqual(config.warnings, ())
        self.assertEqual(resolved(config)["logToStdout"], "both")


class FileTests(ConfigTestCase):
    def test_unreadable(self) -> None:
        """A missing file is a one-line error naming the path."""
        path = self.mktemp()
        with self.assertRaises(ConfigError) as raised:
            load_config(path)
        self.assertEqual(
            raised.exception.problems, (f"{path}: cannot read config: No such file or directory",)
        )

    def test_reads_file(self) -> None:
        """load_config reads and loads a file."""
        path = self.mktemp()
        Path(path).write_text("globalTTL: 9\n", encoding="utf-8")
        self.assertEqual(load_config(path).global_ttl, 9)

    def test_example_config(self) -> None:
        """etc/config.example.yaml loads without errors or warnings."""
        config = load_config(str(EXAMPLE))
        self.assertEqual(config.warnings, ())
        self.assertEqual(
            {model.id: model.port for model in config.models.values()},
            {
                "llama3.1-8b": 5800,
                "nomic-embed": 5801,
                "qwen2.5-7b": 5802,
                "vllm-qwen-vl": 5803,
                "whisper": None,
            },
        )
        self.assertEqual(config.resolve("qwen"), "qwen2.5-7b")
