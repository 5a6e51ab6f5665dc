"""Configuration: YAML -> frozen, validated :class:`Config`."""

from llamaswap.config.model import Config, ConfigError, ModelConfig

__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", "load_config_text"]


def load_config(path: str) -> Config:
    from llamaswap.config.loader import load_config as _load

    return _load(path)


def load_config_text(text: str, environ: dict[str, str] | None = None) -> Config:
    from llamaswap.config.loader import load_config_text as _load

    return _load(text, environ)
