"""Tests for :mod:`llamaswap.config.commands`."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config.commands import parse_command, split_command, strip_comment_lines


class StripCommentLinesTests(SynchronousTestCase):
    def test_drops_comment_lines(self) -> None:
        """Lines whose trimmed text starts with ``#`` are removed, others kept verbatim."""
        cmd = "server \\\n  # --old-flag\n#--port 1\n  --port 2 # inline stays"
        self.assertEqual(strip_comment_lines(cmd), "server \\\n  --port 2 # inline stays")

    def test_no_comments(self) -> None:
        """A command without comment lines is returned unchanged."""
        self.assertEqual(strip_comment_lines("a\nb"), "a\nb")


class ParseCommandTests(SynchronousTestCase):
    def test_quoting(self) -> None:
        """Arguments are split with POSIX shell-word rules (reference §5.2 examples)."""
        cmd = '/bin/app -a "double quotes" --arg4 \'"string in string"\' -c "\'single quoted\'"'
        self.assertEqual(
            parse_command(cmd),
            (
                "/bin/app",
                "-a",
                "double quotes",
                "--arg4",
                '"string in string"',
                "-c",
                "'single quoted'",
            ),
        )

    def test_backslash_escape(self) -> None:
        """A backslash escapes the next character outside quotes."""
        self.assertEqual(parse_command(r"echo a\ b"), ("echo", "a b"))

    def test_multiline(self) -> None:
        """Newlines are plain whitespace; trailing backslashes are continuations."""
        cmd = "llama-server \\\n  --port 8080 \\\n  -m model.gguf\n  --ctx-size 4096\n"
        self.assertEqual(
            parse_command(cmd),
            ("llama-server", "--port", "8080", "-m", "model.gguf", "--ctx-size", "4096"),
        )

    def test_comment_lines_dropped(self) -> None:
        """Comment lines, even indented ones, contribute no arguments."""
        cmd = "server\n  # --disabled 'x\n--enabled"
        self.assertEqual(parse_command(cmd), ("server", "--enabled"))

    def test_inline_hash_is_an_argument(self) -> None:
        """A ``#`` after arguments is not a comment: no shell is involved."""
        self.assertEqual(parse_command("echo a #b"), ("echo", "a", "#b"))

    def test_no_expansion(self) -> None:
        """Variables, globs and pipes are passed through literally."""
        self.assertEqual(parse_command("echo $HOME * | x"), ("echo", "$HOME", "*", "|", "x"))

    def test_empty(self) -> None:
        """A command that is empty after comment removal is rejected."""
        for cmd in ("", "   \n  ", "# only a comment\n", "\\"):
            with self.subTest(cmd=cmd):
                with self.assertRaises(ValueError) as raised:
                    parse_command(cmd)
                self.assertEqual(str(raised.exception), "empty command")

    def test_unbalanced_quote(self) -> None:
        """Unbalanced quoting raises ValueError."""
        self.assertRaises(ValueError, parse_command, "echo 'open")

    def test_split_command_allows_empty(self) -> None:
        """``split_command`` returns an empty argv instead of raising."""
        self.assertEqual(split_command("# nothing"), ())
