"""A stand-in for llama-server's slots API (stdlib only, runs as a child).

Serves on 127.0.0.1:

- ``GET /health``: 200 ``{"status":"ok"}``
- ``GET /slots``: ``--parallel`` slots; a slot that served a request has
  ``n_prompt_tokens`` (a restored slot, like llama-server's, has not)
- ``POST /v1/chat/completions``: the prompt's words are its tokens; the slot
  with the longest common prefix serves it; ``timings.cache_n`` is that prefix
- ``POST /slots/N?action=save|restore`` with ``{"filename": ...}``: the slot's
  tokens written to / read from ``--slot-save-path``; a file that is not a
  save (no magic line) is refused with 400, as llama-server refuses one
- ``GET /calls``: the slot actions received, in order
- ``GET /argv``: the command line

``--hang-saves`` makes every save wait forever; ``--fail-saves`` answers 500.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

MAGIC = "FAKE-LLAMA-SLOT v1"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--slot-save-path", default=None)
    parser.add_argument("--hang-saves", action="store_true")
    parser.add_argument("--fail-saves", action="store_true")
    parser.add_argument("--tag", default="")  # changes the command (and its hash)
    return parser.parse_args(argv)


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lock = threading.Lock()
        self.slots: list[list[str]] = [[] for _ in range(args.parallel)]
        self.used = [False] * args.parallel
        self.calls: list[dict[str, Any]] = []


def common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/health":
                self.reply(200, {"status": "ok"})
            elif path == "/slots":
                with state.lock:
                    slots = []
                    for index, tokens in enumerate(state.slots):
                        slot: dict[str, Any] = {"id": index, "is_processing": False}
                        if state.used[index]:
                            slot["n_prompt_tokens"] = len(tokens)
                        slots.append(slot)
                self.reply(200, slots)
            elif path == "/calls":
                with state.lock:
                    self.reply(200, list(state.calls))
            elif path == "/argv":
                self.reply(200, sys.argv)
            else:
                self.reply(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            body = self.body()
            if url.path == "/v1/chat/completions":
                text = " ".join(m.get("content", "") for m in body.get("messages", []))
                tokens = text.split()
                with state.lock:
                    best = max(
                        range(len(state.slots)),
                        key=lambda i: common_prefix(state.slots[i], tokens),
                    )
                    cached = common_prefix(state.slots[best], tokens)
                    state.slots[best] = tokens
                    state.used[best] = True
                self.reply(
                    200,
                    {
                        "object": "chat.completion",
                        "choices": [{"message": {"role": "assistant", "content": "ok"}}],
                        "usage": {"prompt_tokens": len(tokens), "completion_tokens": 1},
                        "timings": {
                            "cache_n": cached,
                            "prompt_n": len(tokens) - cached,
                            "predicted_n": 1,
                        },
                    },
                )
                return
            if url.path.startswith("/slots/"):
                self.slot_action(int(url.path.rsplit("/", 1)[1]), url.query, body)
                return
            self.reply(404, {"error": {"message": "not found"}})

        def slot_action(self, slot: int, query: str, body: Any) -> None:
            action = parse_qs(query).get("action", [""])[0]
            filename = body.get("filename", "")
            with state.lock:
                state.calls.append({"slot": slot, "action": action, "filename": filename})
            if state.args.slot_save_path is None:
                self.reply(501, {"error": {"message": "start it with --slot-save-path"}})
                return
            if not 0 <= slot < len(state.slots) or "/" in filename:
                self.reply(400, {"error": {"message": "Invalid slot ID"}})
                return
            path = os.path.join(state.args.slot_save_path, filename)
            if action == "save":
                if state.args.hang_saves:
                    threading.Event().wait()
                if state.args.fail_saves:
                    self.reply(500, {"error": {"message": "Unable to save slot"}})
                    return
                with state.lock:
                    tokens = list(state.slots[slot])
                data = (MAGIC + "\n" + json.dumps(tokens)).encode()
                with open(path, "wb") as stream:
                    stream.write(data)
                self.reply(
                    200,
                    {
                        "id_slot": slot,
                        "filename": filename,
                        "n_saved": len(tokens),
                        "n_written": len(data),
                    },
                )
            elif action == "restore":
                try:
                    with open(path, "rb") as stream:
                        magic, _, rest = stream.read().decode().partition("\n")
                    if magic != MAGIC:
                        raise ValueError("bad magic")
                    tokens = json.loads(rest)
                except (OSError, ValueError) as e:
                    self.reply(
                        400,
                        {
                            "error": {
                                "message": f"Unable to restore slot: invalid slot save file ({e})"
                            }
                        },
                    )
                    return
                with state.lock:
                    state.slots[slot] = tokens
                self.reply(
                    200,
                    {
                        "id_slot": slot,
                        "filename": filename,
                        "n_restored": len(tokens),
                        "n_read": 1,
                        "timings": {"restore_ms": 1.0},
                    },
                )
            else:
                self.reply(400, {"error": {"message": "Invalid action"}})

    return Handler


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.slot_save_path is not None and not os.path.isdir(args.slot_save_path):
        sys.stderr.write(f"not a directory: {args.slot_save_path}\n")
        sys.exit(1)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(State(args)))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
