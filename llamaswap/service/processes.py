"""Building the model processes of a configuration, with their logs."""

from __future__ import annotations

import os
from typing import Any

from llamaswap.config import Config, ModelConfig
from llamaswap.observe.logs import LogHub
from llamaswap.supervision.health import http_probe
from llamaswap.supervision.launcher import ProcessGroupLauncher
from llamaswap.supervision.process import ModelProcess
from llamaswap.supervision.router import ProcessFactory


def process_factory(config: Config, reactor: Any, *, logs: LogHub) -> ProcessFactory:
    """Makes one :class:`ModelProcess` per model config, its output going to
    the hub's per-model log monitor.

    ``reactor`` provides ``IReactorTime``, ``IReactorProcess`` and
    ``IReactorTCP`` (children in their own process group, HTTP health checks).
    """
    launcher = ProcessGroupLauncher(reactor)

    def build(model: ModelConfig) -> ModelProcess:
        return ModelProcess(
            model,
            clock=reactor,
            launcher=launcher,
            probe=http_probe(reactor),
            output=logs.model(model.id),
            health_check_timeout=config.health_check_timeout,
            environ=os.environ,
        )

    return build


def build_processes(config: Config, reactor: Any, *, logs: LogHub) -> dict[str, ModelProcess]:
    """One :class:`ModelProcess` per configured model."""
    build = process_factory(config, reactor, logs=logs)
    return {model_id: build(model) for model_id, model in config.models.items()}
