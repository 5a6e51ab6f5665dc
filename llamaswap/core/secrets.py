"""Masking secrets wherever a command, an environment or a config is shown.

One rule, used by every surface that shows configuration (``/running``, the
process start line in the logs and so ``/api/events``, ``check-config``,
config reprs): a value is a secret when the name it is given under says
key, token, secret or password (case-insensitive):

- a command-line option: ``--api-key X``, ``--api-key=X``, ``-hf-token X``;
- an environment entry: ``HF_TOKEN=…``, ``OPENAI_API_KEY=…`` (in ``env:``
  or as a ``NAME=value`` word of a command, as ``env`` takes them).

Options naming a file, path or directory (``--ssl-key-file cert.key``) name
where a secret lives, not the secret, and are shown.  A secret is replaced by
:data:`MASK`; the rest of the text keeps its layout.  Known secret values (the
configured ``apiKeys``) may also be given, and are masked wherever they occur.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence

__all__ = [
    "MASK",
    "is_secret_name",
    "join_argv",
    "mask_argv",
    "mask_command",
    "mask_env",
    "mask_env_pairs",
    "mask_known",
    "one_line_command",
    "shown_command",
]

#: What a secret is shown as.
MASK = "***"

#: One word of a name (split at ``-``, ``_``, ``.``): ``key``, ``apikey``,
#: ``token``, ``hftoken``, ``secret``, ``password``, … but not ``tokens``
#: (``--tokens-per-second``, ``--max-tokens``) nor ``tokenizer``.
_SECRET_WORD = re.compile(
    r"[a-z]*(?:key|keys|token|secret|secrets|passw(?:or)?d|pwd)", re.IGNORECASE
)
_WORDS = re.compile(r"[-_.]+")
#: The last word of an option that names where a secret is, not the secret.
_LOCATION_WORD = re.compile(r"(?:file|path|dir|directory)$", re.IGNORECASE)
_OPTION = re.compile(r"-{1,2}(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?P<eq>=)?", re.ASCII)
_ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)=", re.ASCII)


def is_secret_name(name: str) -> bool:
    """Whether a value given under ``name`` (an option or variable) is a secret."""
    words = _WORDS.split(name)
    return any(_SECRET_WORD.fullmatch(w) for w in words) and not _LOCATION_WORD.search(name)


def _secret_prefix(word: str) -> tuple[str | None, bool]:
    """For one argv word: ``(prefix, takes_next)``.  ``prefix`` is the part
    kept when the word itself carries a secret after ``=`` (``None`` when it
    carries none); ``takes_next`` says the following word is the secret."""
    option = _OPTION.match(word)
    if option is not None and is_secret_name(option.group("name")):
        if option.group("eq"):
            return word[: option.end()], False
        return None, option.end() == len(word)
    assignment = _ASSIGNMENT.match(word)
    if assignment is not None and is_secret_name(assignment.group("name")):
        return word[: assignment.end()], False
    return None, False


def _is_option(word: str) -> bool:
    return word.startswith("--") and len(word) > 2


def mask_argv(argv: Iterable[str]) -> list[str]:
    """``argv`` with every secret option value and secret ``NAME=value``
    replaced by :data:`MASK`."""
    out: list[str] = []
    mask_next = False
    for word in argv:
        if mask_next and not _is_option(word):
            out.append(MASK)
            mask_next = False
            continue
        prefix, mask_next = _secret_prefix(word)
        out.append(word if prefix is None else prefix + MASK)
    return out


def mask_env(env: Iterable[str]) -> list[str]:
    """``NAME=value`` environment entries with the values of secret names
    replaced by :data:`MASK`."""
    out = []
    for entry in env:
        name, eq, _ = entry.partition("=")
        out.append(name + eq + MASK if eq and is_secret_name(name) else entry)
    return out


def mask_env_pairs(env: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """``(name, value)`` environment pairs, secret values replaced by :data:`MASK`."""
    return tuple((name, MASK if is_secret_name(name) else value) for name, value in env)


#: What separates shell words (as :mod:`shlex` has it).
_BLANKS = " \t\r\n"


def _words(text: str) -> list[tuple[int, int]]:
    """The spans of ``text``'s shell words (POSIX quoting, no expansion); an
    unterminated quote runs to the end.  Never fails: only for showing."""
    spans = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in _BLANKS:
            i += 1
            continue
        start = i
        quote = ""
        while i < n:
            c = text[i]
            if quote == "'":
                if c == "'":
                    quote = ""
            elif c == "\\" and i + 1 < n and text[i + 1] != "\n":
                i += 1
            elif quote == '"':
                if c == '"':
                    quote = ""
            elif c in "'\"":
                quote = c
            elif c in _BLANKS or (c == "\\" and i + 1 < n):
                break
            i += 1
        if i > start:
            spans.append((start, i))
        if i < n and text[i] == "\\":
            i += 1  # a line continuation: the backslash separates words
    return spans


def _unquoted(word: str) -> str:
    try:
        parts = shlex.split(word, posix=True)
    except ValueError:
        return word
    return parts[0] if len(parts) == 1 else word


def _is_comment(line: str) -> bool:
    return line.strip().startswith("#")


def _chunks(cmd: str) -> list[str]:
    """``cmd`` cut before and after each comment line, so that a quote in a
    comment cannot swallow the next lines."""
    chunks: list[str] = []
    current: list[str] = []
    for line in re.split(r"(?<=\n)", cmd):
        if _is_comment(line):
            if current:
                chunks.append("".join(current))
                current = []
            chunks.append(line)
        else:
            current.append(line)
    if current:
        chunks.append("".join(current))
    return chunks


def _mask_chunk(text: str, spans: list[tuple[int, int]]) -> str:
    out = []
    last = 0
    mask_next = False
    for start, end in spans:
        word = text[start:end]
        plain = _unquoted(word)
        # an unterminated quote may have run over the end of its line
        tail = word[len(word.rstrip()) :]
        if mask_next and not _is_option(plain):
            out.append(text[last:start] + MASK + tail)
            last = end
            mask_next = False
            continue
        prefix, mask_next = _secret_prefix(plain)
        if prefix is not None:
            if word[:1] in "'\"":  # the whole word is quoted: show it unquoted
                out.append(text[last:start] + prefix + MASK + tail)
            else:
                out.append(text[last : start + word.find("=") + 1] + MASK + tail)
            last = end
    out.append(text[last:])
    return "".join(out)


def mask_command(cmd: str) -> str:
    """``cmd`` (a possibly multi-line command string) with every secret value
    replaced by :data:`MASK`, its layout and quoting otherwise unchanged;
    commented-out lines are masked too."""
    return "".join(
        _mask_chunk(chunk, _comment_words(chunk) if _is_comment(chunk) else _words(chunk))
        for chunk in _chunks(cmd)
    )


def _comment_words(line: str) -> list[tuple[int, int]]:
    """A comment's words: prose, so quotes (``don't``) quote nothing."""
    return [match.span() for match in re.finditer(r"[^ \t\r\n]+", line)]


def mask_known(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each non-empty known secret masked where it stands as a
    whole word (not inside a longer name: a short key must not mangle text)."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", MASK, text)
    return text


def one_line_command(cmd: str) -> str:
    """``cmd`` as one readable line: comment lines dropped, ``\\`` line
    continuations and newlines joined, words separated by single spaces
    (quoted text is kept as written)."""
    kept = "\n".join(chunk for chunk in _chunks(cmd) if not _is_comment(chunk))
    return " ".join(kept[start:end] for start, end in _words(kept))


def join_argv(argv: Sequence[str]) -> str:
    """``argv`` shown as one line (for log lines), secrets masked."""
    return " ".join(mask_argv(argv))


def shown_command(cmd: str, known: Iterable[str] = ()) -> str:
    """``cmd`` as an API shows it (``/running``): one line, secrets masked,
    and the ``known`` secret values masked wherever they occur."""
    return mask_known(mask_command(one_line_command(cmd)), known)
