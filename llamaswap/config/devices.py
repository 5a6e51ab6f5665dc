"""The machine's memory as the placement planner sees it: totals (``auto``),
free amounts (probes) and what a model's processes hold (measurements).

Everything goes through a :class:`DeviceLayer`, a small seam: the real one,
:class:`SystemDevices`, reads host memory with psutil and NVIDIA devices
through NVML (``nvidia-ml-py``, imported as ``pynvml``, initialised on first
use); tests pass a fake.  Every call may block (procfs walks, driver calls):
callers run them in a thread, except the config loader, which already runs
before the reactor or in a thread.

Resource names map to what can be probed: a host name (``ram``, ``mem``,
``host``...: see :func:`llamaswap.config.resources.is_host`) is host memory;
``gpu<N>`` (also ``cuda<N>``, ``nvidia<N>``) is the NVIDIA device with NVML
index ``N``.  Any other name has no probe: its total must be given, its free
amount is unknown and it is not measured.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Collection
from typing import Any, Protocol

import psutil

__all__ = [
    "DeviceError",
    "DeviceLayer",
    "SystemDevices",
    "gpu_index",
    "host_reserve",
    "system_devices",
]

GIB = 1024**3

_GPU = re.compile(r"(?:gpu|cuda|nvidia)(\d+)", re.IGNORECASE)


def gpu_index(name: str) -> int | None:
    """The NVML index resource ``name`` stands for (``gpu1`` -> 1), or ``None``."""
    match = _GPU.fullmatch(name)
    return int(match.group(1)) if match else None


def host_reserve(total: int) -> int:
    """What ``ram: auto`` leaves to the system: 10 % of ``total``, at least
    2 GiB, but never more than half of it (a small machine keeps half)."""
    return min(max(total // 10, 2 * GIB), total // 2)


class DeviceError(Exception):
    """A figure cannot be read (no NVML, no such device, no permission)."""


class DeviceLayer(Protocol):
    """What the planner reads of the machine; every method may block."""

    def host_total(self) -> int:
        """Host memory in bytes (``MemTotal``)."""

    def host_available(self) -> int:
        """Host memory available without swapping (``MemAvailable``)."""

    def group_pids(self, pgid: int) -> set[int]:
        """The live members of process group ``pgid``."""

    def rss(self, pids: Collection[int]) -> int:
        """Resident memory of ``pids`` together (bytes); gone ones count 0."""

    def gpu_total(self, index: int) -> int:
        """Memory of NVIDIA device ``index`` (:class:`DeviceError` without one)."""

    def gpu_free(self, index: int) -> int:
        """Free memory of NVIDIA device ``index``."""

    def gpu_used_by(self, index: int, pids: Collection[int]) -> int:
        """Device memory ``pids`` hold on NVIDIA device ``index``."""


class SystemDevices:
    """The real machine: psutil for host memory, NVML for NVIDIA devices."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._nvml_error: str | None = None

    # -- host -----------------------------------------------------------------

    def host_total(self) -> int:
        return int(psutil.virtual_memory().total)

    def host_available(self) -> int:
        return int(psutil.virtual_memory().available)

    def group_pids(self, pgid: int) -> set[int]:
        members = set()
        for pid in psutil.pids():
            try:
                if os.getpgid(pid) == pgid:
                    members.add(pid)
            except OSError:
                continue
        return members

    def rss(self, pids: Collection[int]) -> int:
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except (psutil.Error, OSError):
                continue
        return total

    # -- NVIDIA ---------------------------------------------------------------

    def _library(self) -> Any:
        """``pynvml``, initialised once; :class:`DeviceError` when unusable."""
        with self._lock:
            if self._nvml is not None:
                return self._nvml
            if self._nvml_error is not None:
                raise DeviceError(self._nvml_error)
            try:
                import pynvml  # type: ignore[import-untyped]

                pynvml.nvmlInit()
            except ImportError:
                self._nvml_error = "NVML is not installed (pip install nvidia-ml-py)"
                raise DeviceError(self._nvml_error) from None
            except Exception as exc:  # pynvml.NVMLError and its many subclasses
                self._nvml_error = f"NVML cannot be used: {exc}"
                raise DeviceError(self._nvml_error) from None
            self._nvml = pynvml
            return pynvml

    def _handle(self, index: int) -> tuple[Any, Any]:
        nvml = self._library()
        try:
            return nvml, nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:
            raise DeviceError(f"no NVIDIA device {index}: {exc}") from None

    def gpu_total(self, index: int) -> int:
        nvml, handle = self._handle(index)
        try:
            return int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        except Exception as exc:
            raise DeviceError(f"NVIDIA device {index}: {exc}") from None

    def gpu_free(self, index: int) -> int:
        nvml, handle = self._handle(index)
        try:
            return int(nvml.nvmlDeviceGetMemoryInfo(handle).free)
        except Exception as exc:
            raise DeviceError(f"NVIDIA device {index}: {exc}") from None

    def gpu_used_by(self, index: int, pids: Collection[int]) -> int:
        nvml, handle = self._handle(index)
        wanted = set(pids)
        total = 0
        try:
            processes = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
            processes += list(nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
        except Exception as exc:
            raise DeviceError(f"NVIDIA device {index}: {exc}") from None
        seen = set()
        for process in processes:
            used = getattr(process, "usedGpuMemory", None)
            if process.pid in wanted and process.pid not in seen and isinstance(used, int):
                seen.add(process.pid)
                total += used
        return total


_SYSTEM: SystemDevices | None = None


def system_devices() -> SystemDevices:
    """The one :class:`SystemDevices` of this process (NVML initialised once)."""
    global _SYSTEM
    if _SYSTEM is None:
        _SYSTEM = SystemDevices()
    return _SYSTEM
