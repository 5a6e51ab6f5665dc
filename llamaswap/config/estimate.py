"""Footprint estimates from a GGUF file and a llama.cpp command line.

What a llama.cpp server holds while loaded is, to first order, its weights
and its KV cache.  Both come from the GGUF named by ``-m``/``--model``
(read with the ``gguf`` package: its metadata and tensor table, never the
tensor data) and the command's flags:

- weights: the bytes of every tensor.  Layers ``blk.<i>.*`` with ``i`` below
  ``-ngl`` (absent: every layer, llama.cpp's default) are on the device, the
  others on the host; the output tensors are on the device when every layer
  is, the token embeddings always on the host.
- KV cache: ``-c`` tokens (absent: 4096; 0: the model's context length) ×
  per layer ``head_count_kv`` × (``key_length`` × the size of a ``-ctk``
  element + ``value_length`` × the size of a ``-ctv`` element; ``f16``
  unless given), on the device for offloaded layers.  ``-np`` slots share
  the ``-c`` tokens, so they do not change the total.

Compute buffers and the runtime itself are not counted: declare a footprint
where the estimate is too low.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Estimate", "EstimateError", "estimate", "gguf_path"]

DEFAULT_CONTEXT = 4096
_MODEL_FLAGS = ("-m", "--model")
_CONTEXT_FLAGS = ("-c", "--ctx-size")
_CACHE_K_FLAGS = ("-ctk", "--cache-type-k")
_CACHE_V_FLAGS = ("-ctv", "--cache-type-v")
_LAYER_FLAGS = ("-ngl", "--gpu-layers", "--n-gpu-layers")


class EstimateError(Exception):
    """The footprint cannot be estimated; the message says why."""


@dataclass(frozen=True)
class Estimate:
    """Bytes held on the device and on the host."""

    device: int
    host: int
    #: the GGUF file read.
    path: str


def _flag(argv: Sequence[str], names: tuple[str, ...]) -> str | None:
    """The value of the last of ``names`` in ``argv`` (``-x v`` or ``--x=v``)."""
    value = None
    for index, arg in enumerate(argv):
        if arg in names and index + 1 < len(argv):
            value = argv[index + 1]
        else:
            for name in names:
                if name.startswith("--") and arg.startswith(name + "="):
                    value = arg[len(name) + 1 :]
    return value


def gguf_path(argv: Sequence[str]) -> str | None:
    """The ``.gguf`` file the command names with ``-m``, if it exists."""
    path = _flag(argv, _MODEL_FLAGS)
    if path is None or not path.lower().endswith(".gguf") or not os.path.isfile(path):
        return None
    return path


def _int_flag(argv: Sequence[str], names: tuple[str, ...], default: int) -> int:
    value = _flag(argv, names)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise EstimateError(f"{names[0]} {value!r} is not an integer") from None


def _element_bytes(cache_type: str) -> float:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        kind = GGMLQuantizationType[cache_type.upper()]
    except KeyError:
        raise EstimateError(f"unknown KV cache type {cache_type!r}") from None
    block, size = GGML_QUANT_SIZES[kind]
    return size / block


def _value(field: Any) -> Any:
    """A metadata value: a string, a number, or a list (one per layer)."""
    from gguf import GGUFValueType

    parts = [field.parts[index] for index in field.data]
    main = field.types[0] if field.types else None
    if main == GGUFValueType.STRING:
        return bytes(parts[0]).decode("utf-8", "replace")
    if main == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return None  # vocabularies and the like: nothing we need
        return [part.tolist()[0] for part in parts]
    return parts[0].tolist()[0]


#: what an estimate needs from one GGUF file: its metadata keys (without the
#: architecture prefix) and every tensor's name and size.
_Summary = tuple[dict[str, Any], tuple[tuple[str, int], ...]]
#: (path, size, mtime) -> summary: a reload does not read an unchanged file again.
_summaries: dict[tuple[str, int, int], _Summary] = {}
_WANTED = (
    "block_count",
    "context_length",
    "embedding_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
)


def _summary(path: str) -> _Summary:
    try:
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        cached = _summaries.get(key)
        if cached is not None:
            return cached
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except (OSError, ValueError, IndexError, KeyError) as exc:
        raise EstimateError(f"cannot read {path}: {exc}") from None
    arch_field = reader.get_field("general.architecture")
    arch = _value(arch_field) if arch_field is not None else None
    metadata: dict[str, Any] = {}
    for name in _WANTED:
        field = reader.get_field(f"{arch}.{name}")
        if field is not None:
            metadata[name] = _value(field)
    tensors = tuple((tensor.name, int(tensor.n_bytes)) for tensor in reader.tensors)
    if len(_summaries) >= 64:
        _summaries.clear()
    _summaries[key] = (metadata, tensors)
    return metadata, tensors


def estimate(argv: Sequence[str]) -> Estimate:
    """Estimate the footprint of the llama.cpp command ``argv``.  Raises
    :class:`EstimateError`."""
    path = gguf_path(argv)
    if path is None:
        raise EstimateError("the command names no existing .gguf file (-m)")
    metadata, tensors = _summary(path)
    layers = metadata.get("block_count")
    if not isinstance(layers, int):
        raise EstimateError(f"{path}: no architecture or block count in its metadata")
    offloaded = _int_flag(argv, _LAYER_FLAGS, layers)
    offloaded = layers if offloaded < 0 else min(offloaded, layers)

    device = host = 0
    for name, size in tensors:
        if name.startswith("blk."):
            on_device = int(name.split(".")[1]) < offloaded
        else:
            on_device = offloaded == layers and not name.startswith("token_embd")
        if on_device:
            device += size
        else:
            host += size

    context = _int_flag(argv, _CONTEXT_FLAGS, DEFAULT_CONTEXT)
    if context <= 0:
        context = int(metadata.get("context_length") or DEFAULT_CONTEXT)
    heads = metadata.get("attention.head_count")
    heads_kv = metadata.get("attention.head_count_kv")
    width = metadata.get("embedding_length")
    per_layer_heads = heads_kv if heads_kv is not None else heads
    if per_layer_heads is None or width is None:
        raise EstimateError(f"{path}: no attention head count or embedding length")
    first_heads = per_layer_heads[0] if isinstance(per_layer_heads, list) else per_layer_heads
    head_size = width // (heads[0] if isinstance(heads, list) else heads or first_heads or 1)
    key_length = metadata.get("attention.key_length") or head_size
    value_length = metadata.get("attention.value_length") or head_size
    k_bytes = _element_bytes(_flag(argv, _CACHE_K_FLAGS) or "f16")
    v_bytes = _element_bytes(_flag(argv, _CACHE_V_FLAGS) or "f16")
    for layer in range(layers):
        kv_heads = per_layer_heads[layer] if isinstance(per_layer_heads, list) else per_layer_heads
        size = round(context * kv_heads * (key_length * k_bytes + value_length * v_bytes))
        if layer < offloaded:
            device += size
        else:
            host += size
    return Estimate(device, host, path)
