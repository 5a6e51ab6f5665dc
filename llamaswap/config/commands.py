"""Turning a configured ``cmd``/``cmdStop`` string into an argv.

No shell is involved: comment lines are dropped, ``\\`` line continuations and
newlines become plain whitespace, and the rest is split with POSIX shell-word
rules (quotes and backslash escapes, no expansion).
"""

from __future__ import annotations

import os
import shlex


def _is_comment(line: str) -> bool:
    return line.strip().startswith("#")


def strip_comment_lines(cmd: str) -> str:
    """``cmd`` without the lines whose trimmed text starts with ``#``."""
    return "\n".join(line for line in cmd.split("\n") if not _is_comment(line))


def split_command(cmd: str) -> tuple[str, ...]:
    """Split a (possibly multi-line) command into its argv, which may be empty.

    Raises :class:`ValueError` for unbalanced quoting or a trailing escape.
    """
    lines = []
    for line in cmd.split("\n"):
        trimmed = line.strip()
        if trimmed.startswith("#"):
            continue
        lines.append(trimmed[:-1] + " " if trimmed.endswith("\\") else line)
    return tuple(shlex.split("\n".join(lines), posix=True))


def parse_command(cmd: str) -> tuple[str, ...]:
    """:func:`split_command`, raising :class:`ValueError` for an empty command."""
    argv = split_command(cmd)
    if not argv:
        raise ValueError("empty command")
    return argv


def program_problem(program: str) -> str | None:
    """Why ``program``, given as a path (``/opt/llama/llama-server``,
    ``./server``), cannot be run: ``not found`` or ``not an executable file``.
    ``None`` when it can, and for a bare name (looked up in ``PATH`` at start)."""
    if "/" not in program:
        return None
    if not os.path.exists(program):
        return f"{program}: not found"
    if os.path.isdir(program) or not os.access(program, os.X_OK):
        return f"{program}: not an executable file"
    return None


def not_found_message(program: str) -> str:
    """Why ``program`` could not be started: for a path, what is wrong with
    that path; for a bare name, that ``PATH`` has no such program."""
    return program_problem(program) or f'exec: "{program}": executable file not found in $PATH'
