"""llamaswap: on-demand model server swapping behind an OpenAI-compatible proxy."""

__version__ = "0.1.0"
