"""Configuration: YAML -> frozen, validated :class:`Config`."""

from llamaswap.config.loader import load_config, load_config_sources, load_config_text
from llamaswap.config.model import Config, ConfigError, ModelConfig

__all__ = [
    "Config",
    "ConfigError",
    "ModelConfig",
    "load_config",
    "load_config_sources",
    "load_config_text",
]
