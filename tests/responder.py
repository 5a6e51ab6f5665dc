"""A small stand-in upstream server for tests (stdlib only, runs as a child).

Prints ``PID <pid>`` at start (and ``GRANDCHILD <pid>`` with
``--spawn-grandchild``), then serves on 127.0.0.1:

- ``GET /health``: 503 until ``--startup-delay`` has passed, then 200
  ``{"status":"ok"}``
- ``POST /v1/chat/completions``: a JSON echo with the request body and its length;
  ``"stream": true`` in the body gives an SSE stream ending in ``[DONE]``
- ``GET /slow?chunks=N&delay=S``: N chunked lines, S seconds apart
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

GRANDCHILD_LIFETIME = 300.0
MAX_CHUNKS = 10_000


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--spawn-grandchild", action="store_true")
    parser.add_argument("--exit-after", type=float, default=None)
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--print", dest="texts", action="append", default=[])
    # accepted and ignored, as an inference server's credentials would be
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--hf-token", default=None)
    parser.add_argument(
        "--print-filler", type=int, default=0, metavar="LINES", help="print LINES filler lines"
    )
    parser.add_argument(
        "--crash-first-start",
        metavar="MARKER",
        default=None,
        help="exit 1 at once if MARKER does not exist yet (creating it): the first start crashes",
    )
    return parser.parse_args(argv)


def spawn_grandchild() -> int:
    """Fork a process that ignores SIGTERM and keeps our stdout open."""
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(GRANDCHILD_LIFETIME)
        os._exit(0)
    return pid


def make_handler(ready_at: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def send_json(self, status: int, value: Any) -> None:
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def echo(self, body: bytes) -> None:
            """Any other path: describe the request that arrived."""
            url = urlsplit(self.path)
            self.send_json(
                200,
                {
                    "method": self.command,
                    "path": url.path,
                    "query": url.query,
                    "content_type": self.headers.get("Content-Type", ""),
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "request_body": body.decode("latin-1"),
                },
            )

        def write_chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/health":
                if time.monotonic() < ready_at:
                    self.send_json(503, {"status": "loading"})
                else:
                    self.send_json(200, {"status": "ok"})
            elif url.path == "/slow":
                query = parse_qs(url.query)
                chunks = min(int(query.get("chunks", ["5"])[0]), MAX_CHUNKS)
                delay = float(query.get("delay", ["0.1"])[0])
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for index in range(chunks):
                        if index:
                            time.sleep(delay)
                        self.write_chunk(b"chunk %d\n" % index)
                    self.write_chunk(b"")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
            elif url.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
                # Not real WebSocket framing: after the 101, echo raw bytes
                # back (prefixed), which is all a byte-for-byte relay needs.
                self.wfile.write(
                    b"HTTP/1.1 101 Switching Protocols\r\n"
                    b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                )
                self.wfile.flush()
                while True:
                    data = self.connection.recv(65536)
                    if not data:
                        break
                    self.connection.sendall(b"echo:" + data)
                self.close_connection = True
            elif url.path == "/":
                self.send_json(200, {"pid": os.getpid()})
            else:
                self.echo(b"")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if urlsplit(self.path).path != "/v1/chat/completions":
                self.echo(body)
                return
            try:
                request = json.loads(body or b"{}")
            except ValueError:
                request = {}
            model = request.get("model", "") if isinstance(request, dict) else ""
            usage = {"prompt_tokens": 25, "completion_tokens": 10, "total_tokens": 35}
            if isinstance(request, dict) and request.get("stream"):
                self.stream_chat(model, usage)
                return
            self.send_json(
                200,
                {
                    "object": "chat.completion",
                    "model": model,
                    "pid": os.getpid(),
                    "request_body_length": len(body),
                    "request_body": body.decode("utf-8", "replace"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )

        def stream_chat(self, model: str, usage: dict[str, int]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            events: list[Any] = [
                {"model": model, "choices": [{"index": 0, "delta": {"content": "hi"}}]}
                for _ in range(3)
            ]
            events.append({"model": model, "choices": [], "usage": usage})
            try:
                for event in events:
                    self.write_chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
                self.write_chunk(b"data: [DONE]\n\n")
                self.write_chunk(b"")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    return Handler


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, lambda signum, frame: (say("SIGINT"), os._exit(0)))
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    say(f"PID {os.getpid()}")
    if args.spawn_grandchild:
        say(f"GRANDCHILD {spawn_grandchild()}")
    for text in args.texts:
        say(text)
    for n in range(args.print_filler):
        sys.stdout.write(f"filler line {n:08d} " + "." * 80 + "\n")
    sys.stdout.flush()
    if args.crash_first_start and not os.path.exists(args.crash_first_start):
        open(args.crash_first_start, "w").close()
        say("crashing on purpose")
        return 1
    if args.exit_after is not None:
        if args.exit_after <= 0:
            return args.exit_code
        threading.Timer(args.exit_after, os._exit, (args.exit_code,)).start()
    ready_at = time.monotonic() + args.startup_delay
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(ready_at))
    server.daemon_threads = True
    say(f"listening on 127.0.0.1:{args.port}")
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
