"""Footprint estimates from tiny GGUF files written with ``gguf``'s writer."""

from __future__ import annotations

import os

import gguf
import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError, load_config_text
from llamaswap.config.estimate import EstimateError, estimate, gguf_path
from llamaswap.config.resources import is_host

# the tiny model: 2 layers, 64 wide, 4 heads, 2 KV heads (head size 16)
EMBED = 100 * 64 * 4  # token_embd, f32: always on the host
LAYER = 64 * 64 * 2  # one f16 tensor per layer
OUTPUT = 64 * 100 * 4  # output, f32
#: KV cache per layer for 256 tokens of f16: 256 × 2 heads × (16 + 16) × 2 bytes
KV_LAYER = 256 * 2 * (16 + 16) * 2


def write_model(path: str, head_count_kv: int | list[int] = 2) -> str:
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_block_count(2)
    writer.add_context_length(1024)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    if isinstance(head_count_kv, list):
        writer.add_key_value(
            "llama.attention.head_count_kv",
            head_count_kv,
            gguf.GGUFValueType.ARRAY,
            sub_type=gguf.GGUFValueType.UINT32,
        )
    else:
        writer.add_head_count_kv(head_count_kv)
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    for layer in range(2):
        writer.add_tensor(f"blk.{layer}.attn_q.weight", np.zeros((64, 64), dtype=np.float16))
    writer.add_tensor("output.weight", np.zeros((100, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class EstimateTests(SynchronousTestCase):
    def setUp(self) -> None:
        os.makedirs(self.mktemp())
        self.path = write_model(os.path.join(self.mktemp() + "-m.gguf"))

    def cmd(self, *flags: str) -> list[str]:
        return ["llama-server", "--port", "5800", "-m", self.path, *flags]

    def test_all_layers_on_the_device(self) -> None:
        """No -ngl: every layer and the output on the device; the token
        embeddings on the host; KV for every layer on the device."""
        found = estimate(self.cmd("-c", "256"))
        self.assertEqual(found.device, 2 * LAYER + OUTPUT + 2 * KV_LAYER)
        self.assertEqual(found.host, EMBED)

    def test_partial_offload(self) -> None:
        found = estimate(self.cmd("-c", "256", "-ngl", "1"))
        self.assertEqual(found.device, LAYER + KV_LAYER)
        self.assertEqual(found.host, EMBED + LAYER + OUTPUT + KV_LAYER)
        found = estimate(self.cmd("--ctx-size=256", "--n-gpu-layers", "0"))
        self.assertEqual(found.device, 0)

    def test_cache_types_and_context(self) -> None:
        """q8_0 keys take 34 bytes per 32 elements; -c 0 is the model's 1024."""
        found = estimate(self.cmd("-c", "256", "-ctk", "q8_0", "-ngl", "99"))
        kv_layer = int(256 * 2 * (16 * 34 / 32 + 16 * 2))
        self.assertEqual(found.device, 2 * LAYER + OUTPUT + 2 * kv_layer)
        found = estimate(self.cmd("-c", "0"))
        self.assertEqual(found.device, 2 * LAYER + OUTPUT + 2 * KV_LAYER * 4)
        found = estimate(self.cmd())  # llama.cpp's default context: 4096
        self.assertEqual(found.device, 2 * LAYER + OUTPUT + 2 * KV_LAYER * 16)

    def test_kv_heads_per_layer(self) -> None:
        path = write_model(self.mktemp() + ".gguf", head_count_kv=[2, 0])
        found = estimate(["llama-server", "-m", path, "-c", "256"])
        self.assertEqual(found.device, 2 * LAYER + OUTPUT + KV_LAYER)

    def test_not_estimable(self) -> None:
        self.assertIsNone(gguf_path(["server", "-m", "/nonexistent/m.gguf"]))
        self.assertIsNone(gguf_path(["server"]))
        with self.assertRaises(EstimateError):
            estimate(["server", "-m", "/nonexistent/m.gguf"])
        broken = self.mktemp() + ".gguf"
        with open(broken, "wb") as stream:
            stream.write(b"not a gguf file at all")
        with self.assertRaises(EstimateError) as caught:
            estimate(["server", "-m", broken])
        self.assertIn("cannot read", str(caught.exception))
        with self.assertRaises(EstimateError):
            estimate(self.cmd("-ctk", "q9_9"))
        with self.assertRaises(EstimateError):
            estimate(self.cmd("-c", "lots"))

    def test_host_names(self) -> None:
        self.assertTrue(is_host("ram"))
        self.assertTrue(is_host("mem"))
        self.assertFalse(is_host("gpu0"))

    def load(self, model: str, machine: str = "{gpu0: 1MiB, ram: 1MiB}") -> object:
        text = f"resources: {machine}\nmodels:\n  a:\n{model}"
        return load_config_text(text, environ={})

    def test_config_estimate(self) -> None:
        """``estimate`` takes the device share for a device resource and the
        host share for ``ram``, with source "estimated"."""
        loaded = self.load(
            f"    cmd: llama-server --port ${{PORT}} -m {self.path} -c 256 -ngl 1\n"
            "    resources: {gpu0: estimate, ram: estimate}\n"
        )
        footprints = loaded.resources.footprints["a"]  # type: ignore[attr-defined]
        self.assertEqual(footprints["gpu0"].bytes, LAYER + KV_LAYER)
        self.assertEqual(footprints["ram"].bytes, EMBED + LAYER + OUTPUT + KV_LAYER)
        self.assertEqual(footprints["gpu0"].source, "estimated")
        self.assertEqual(loaded.warnings, ())  # type: ignore[attr-defined]

    def test_config_undeclared_is_estimated(self) -> None:
        """A model without resources whose command names a GGUF is estimated."""
        loaded = self.load(f"    cmd: llama-server --port ${{PORT}} -m {self.path} -c 256\n")
        resources = loaded.resources  # type: ignore[attr-defined]
        self.assertEqual(
            resources.bytes_of("a"), {"gpu0": 2 * LAYER + OUTPUT + 2 * KV_LAYER, "ram": EMBED}
        )
        self.assertEqual(loaded.warnings, ())  # type: ignore[attr-defined]
        # two devices: which one is not ours to guess; the model runs alone
        loaded = self.load(
            f"    cmd: llama-server --port ${{PORT}} -m {self.path}\n",
            "{gpu0: 1MiB, gpu1: 1MiB}",
        )
        self.assertEqual(
            loaded.warnings,  # type: ignore[attr-defined]
            (
                "models.a.resources: not declared, and the machine has several devices to "
                "choose from; the model needs the whole machine (it runs alone)",
            ),
        )

    def test_config_estimate_too_large(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.load(
                f"    cmd: llama-server --port ${{PORT}} -m {self.path} -c 256\n"
                "    resources: {gpu0: estimate}\n",
                "{gpu0: 64KiB, ram: 1MiB}",
            )
        (problem,) = caught.exception.problems
        self.assertTrue(
            problem.startswith("models.a.resources.gpu0: estimated 105KiB from "), problem
        )
        self.assertTrue(problem.endswith("more than the machine has (gpu0: 64KiB)"), problem)
