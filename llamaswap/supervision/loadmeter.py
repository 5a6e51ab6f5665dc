"""How far a starting model's server has read its weights.

Two sources, both read while the model starts:

* the process group's reads, from ``/proc``: per member, the largest of the
  bytes it read from disk (``read_bytes`` in ``/proc/<pid>/io``, which an
  ``mmap`` load faulting its pages in from disk also counts), the offsets of
  its open descriptors on the model's files (``/proc/<pid>/fdinfo``: a
  ``read()`` loader's progress, even when the page cache answered) and the
  resident part of its mappings of those files (``Rss`` in
  ``/proc/<pid>/smaps``: an ``mmap`` loader's, llama.cpp's default, even
  from the page cache), summed over the group against the files' total size
  (:func:`group_bytes_read`);
* llama-server's load log: llama.cpp's default progress prints one ``.`` per
  percent of the tensors loaded (:func:`log_percent`; newer llama-server
  builds report progress only to their router mode, so there is no line).

:func:`group_bytes_read` reads ``/proc`` and is meant for a thread.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

import psutil

_DOTS = re.compile(r"^\.+$")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _disk_reads(pid: int) -> int:
    for line in _read(f"/proc/{pid}/io").splitlines():
        key, _, value = line.partition(":")
        if key == "read_bytes":
            return int(value)
    return 0


def _offsets(pid: int, files: frozenset[str]) -> int:
    """Sum of the offsets of ``pid``'s descriptors open on ``files``."""
    total = 0
    folder = f"/proc/{pid}/fd"
    for fd in os.listdir(folder):
        try:
            if os.readlink(os.path.join(folder, fd)) not in files:
                continue
            for line in _read(f"/proc/{pid}/fdinfo/{fd}").splitlines():
                if line.startswith("pos:"):
                    total += int(line[4:])
                    break
        except OSError:
            continue  # closed meanwhile
    return total


def _mapped(pid: int, files: frozenset[str]) -> int:
    """Resident bytes of ``pid``'s mappings of ``files``."""
    total = 0
    counting = False
    for line in _read(f"/proc/{pid}/smaps").splitlines():
        first = line.split(None, 1)[0] if line else ""
        if first.endswith(":"):
            if counting and first == "Rss:":
                total += int(line.split()[1]) * 1024
            continue
        # a mapping's header: address perms offset dev inode [pathname]
        parts = line.split(None, 5)
        counting = len(parts) == 6 and parts[5] in files
    return total


def _members(pgid: int) -> list[int]:
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                members.append(pid)
        except OSError:
            continue
    return members


def file_sizes(paths: Iterable[str]) -> dict[str, int]:
    """Resolved path -> size of each path that is a regular file (others left out)."""
    sizes = {}
    for path in paths:
        try:
            real = os.path.realpath(path)
            if os.path.isfile(real):
                sizes[real] = os.stat(real).st_size
        except OSError:
            continue
    return sizes


def group_bytes_read(pgid: int, sizes: Mapping[str, int]) -> int:
    """Bytes of the files in ``sizes`` (resolved paths) that the process
    group ``pgid`` has read, at most their total size (blocking)."""
    files = frozenset(sizes)
    total = 0
    for pid in _members(pgid):
        try:
            total += max(_disk_reads(pid), _offsets(pid, files), _mapped(pid, files))
        except (OSError, ValueError):
            continue  # gone, or not ours to read
    return min(total, sum(sizes.values()))


def log_percent(lines: Iterable[str]) -> float | None:
    """Loading percent shown by llama-server's log (its line of dots, one
    per percent), or ``None`` when the lines show none."""
    found = None
    for line in lines:
        text = line.strip()
        if _DOTS.match(text):
            found = float(min(len(text), 100))
    return found
