"""Building the model processes of a configuration, with their logs."""

from __future__ import annotations

import os
from typing import Any

from llamaswap.config import Config, ModelConfig
from llamaswap.observe.logs import LogHub
from llamaswap.supervision.health import http_probe
from llamaswap.supervision.launcher import ProcessGroupLauncher
from llamaswap.supervision.process import ModelProcess
from llamaswap.supervision.promptcache import PromptCaches
from llamaswap.supervision.router import ProcessFactory


def process_factory(
    config: Config, reactor: Any, *, logs: LogHub, prompt_caches: PromptCaches | None = None
) -> ProcessFactory:
    """Makes one :class:`ModelProcess` per model config, its output going to
    the hub's per-model log monitor.

    ``reactor`` provides ``IReactorTime``, ``IReactorProcess`` and
    ``IReactorTCP`` (children in their own process group, HTTP health checks).
    ``prompt_caches`` (taking this config's ``promptCacheDir`` and
    ``promptCacheMaxBytes``) gives ``promptCache: true`` models their hooks.
    """
    launcher = ProcessGroupLauncher(reactor)
    if prompt_caches is not None:
        prompt_caches.reconfigure(config.prompt_cache)

    def build(model: ModelConfig) -> ModelProcess:
        return ModelProcess(
            model,
            clock=reactor,
            launcher=launcher,
            probe=http_probe(reactor),
            output=logs.model(model.id),
            health_check_timeout=config.health_check_timeout,
            environ=os.environ,
            hooks=prompt_caches.for_model(model) if prompt_caches is not None else None,
        )

    return build


def build_processes(
    config: Config, reactor: Any, *, logs: LogHub, prompt_caches: PromptCaches | None = None
) -> dict[str, ModelProcess]:
    """One :class:`ModelProcess` per configured model."""
    build = process_factory(config, reactor, logs=logs, prompt_caches=prompt_caches)
    return {model_id: build(model) for model_id, model in config.models.items()}
