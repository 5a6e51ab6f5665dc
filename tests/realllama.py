"""Where the real llama-server built by ``../shared/tools/real-llama/setup.sh`` is.

The build directory is ``$LLAMASWAP_REAL_LLAMA_DIR``, else ``.real-llama`` in
the repository, else ``/work/real-llama`` when it exists; its ``env.sh``
gives ``LLAMA_SERVER``, ``TINY_GGUF`` and ``TINY_EOS_GGUF``.  Tests that need
the server skip with :func:`find_real_llama`'s reason when it is not built.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANDIDATES = (os.path.join(REPO, ".real-llama"), "/work/real-llama")


@dataclass(frozen=True)
class RealLlama:
    dir: str
    server: str
    tiny: str
    tiny_eos: str


def real_llama_dir() -> str:
    chosen = os.environ.get("LLAMASWAP_REAL_LLAMA_DIR")
    if chosen:
        return chosen
    for candidate in CANDIDATES:
        if os.path.isdir(candidate):
            return candidate
    return CANDIDATES[0]


def find_real_llama() -> tuple[RealLlama | None, str]:
    """The built server and its models, or ``None`` and why not."""
    folder = real_llama_dir()
    env_sh = os.path.join(folder, "env.sh")
    if not os.path.isfile(env_sh):
        return None, (
            f"no real llama-server: {env_sh} missing (build it with "
            "../shared/tools/real-llama/setup.sh DIR, DIR being $LLAMASWAP_REAL_LLAMA_DIR "
            "or .real-llama)"
        )
    try:
        out = subprocess.run(
            [
                "bash",
                "-c",
                'source "$1" && printf "%s\\n" "$LLAMA_SERVER" "$TINY_GGUF" "$TINY_EOS_GGUF"',
                "env",
                env_sh,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"no real llama-server: cannot read {env_sh}: {e}"
    if len(out) < 3:
        return None, f"no real llama-server: {env_sh} does not set LLAMA_SERVER/TINY_GGUF"
    found = RealLlama(folder, out[0], out[1], out[2])
    for path in (found.server, found.tiny, found.tiny_eos):
        if not os.path.exists(path):
            return None, f"no real llama-server: {path} missing (the build did not finish?)"
    return found, ""
