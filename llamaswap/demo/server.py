"""A small OpenAI-compatible server that looks like llama.cpp's llama-server.

It needs no GPU and no model file: replies are a fixed text cycled to the
requested length, so a newcomer can watch llamaswap start, health-check,
proxy and swap "models". It is also the fast upstream for benchmarks, so the
request path is lean: one leaf resource with a dispatch table, JSON fragments
and escaped reply tokens prepared at start-up, and streamed tokens written in
batches by a push producer that pauses when the client reads slowly.

The model (:mod:`.model`), streaming (:mod:`.stream`), the generating
endpoints (:mod:`.generation`) and the resource (:mod:`.resource`) live in
their own modules; this one is the command line.

Run it with ``python -m llamaswap.demo --port 8081`` (or the
``llamaswap-demo-upstream`` console script).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

from llamaswap import __version__
from llamaswap.demo.model import DEFAULT_MAX_TOKENS, DEFAULT_MODEL, DEFAULT_REPLY, DemoSettings
from llamaswap.demo.resource import make_site

log = Logger()


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
        return value

    return parse


def _port(text: str) -> int:
    value = _non_negative(int)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text}")
    return int(value)


def _reply(text: str) -> str:
    if not text.split():
        raise argparse.ArgumentTypeError("the reply must contain at least one word")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamaswap-demo-upstream",
        description=(
            "A fake llama-server: an OpenAI-compatible endpoint that needs no GPU and "
            "no model file, for trying llamaswap and for benchmarks."
        ),
    )
    parser.add_argument("--port", type=_port, required=True, help="TCP port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="model name to report (default %(default)s)"
    )
    parser.add_argument(
        "--startup-delay",
        type=_non_negative(float),
        default=0.0,
        metavar="SECONDS",
        help="simulated model load time; /health answers 503 until it has passed",
    )
    parser.add_argument(
        "--load-file",
        default=None,
        metavar="PATH",
        help="a file read while loading (as weights are); /health answers 503 until it is read",
    )
    parser.add_argument(
        "--load-rate",
        type=_non_negative(float),
        default=0.0,
        metavar="MiB/s",
        help="how fast --load-file is read (default 0: at once)",
    )
    parser.add_argument(
        "--tokens-per-second",
        type=_non_negative(float),
        default=0.0,
        metavar="N",
        help="generation speed (default 0: as fast as possible)",
    )
    parser.add_argument(
        "--reply",
        type=_reply,
        default=DEFAULT_REPLY,
        metavar="TEXT",
        help="reply text, cycled to the requested length; {model} is replaced by the model name",
    )
    parser.add_argument(
        "--max-tokens-default",
        type=_non_negative(int),
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help="tokens generated when a request sets no limit (default %(default)s)",
    )
    parser.add_argument(
        "--hold-mib",
        type=_non_negative(int),
        default=0,
        metavar="N",
        help="allocate and touch N MiB at start and hold them (a known memory footprint)",
    )
    return parser


def hold_memory(mib: int) -> bytearray:
    """``mib`` MiB allocated with every page written, so they are resident."""
    held = bytearray(mib * 1024 * 1024)
    page = 4096
    held[::page] = b"\x01" * len(range(0, len(held), page))
    return held


def parse_settings(argv: Sequence[str] | None = None) -> tuple[DemoSettings, str, int]:
    """Parse the command line into settings, the host and the port."""
    args = build_parser().parse_args(argv)
    settings = DemoSettings(
        model=args.model,
        reply=args.reply,
        startup_delay=args.startup_delay,
        tokens_per_second=args.tokens_per_second,
        max_tokens_default=args.max_tokens_default,
        hold_mib=args.hold_mib,
        load_file=args.load_file,
        load_rate=args.load_rate,
    )
    return settings, args.host, args.port


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo server until SIGTERM/SIGINT; returns the exit status."""
    settings, host, port = parse_settings(argv)
    held = hold_memory(settings.hold_mib)  # noqa: F841 (held until exit)
    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stdout, timeFormat="%Y-%m-%d %H:%M:%S")],
        redirectStandardIO=False,
    )
    log.info(
        "llamaswap demo upstream {version} (imitating llama-server), model {model}",
        version=__version__,
        model=settings.model,
    )
    site = make_site(settings, reactor)
    try:
        listening = reactor.listenTCP(port, site, interface=host)  # type: ignore[arg-type]
    except CannotListenError as error:
        log.error("couldn't bind HTTP server socket: {error}", error=error)
        return 1
    bound: Any = listening.getHost()
    log.info(
        "HTTP server is listening, hostname: {host}, port: {port}", host=bound.host, port=bound.port
    )
    display_host = f"[{bound.host}]" if ":" in bound.host else bound.host
    # llama-server prints this line only once the model is ready.
    site.model.when_loaded().addCallback(
        lambda _: log.info(
            "server is listening on http://{host}:{port} - starting the main loop",
            host=display_host,
            port=bound.port,
        )
    )
    reactor.run()
    log.info("server stopped")
    return 0
