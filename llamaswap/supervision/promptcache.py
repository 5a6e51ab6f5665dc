"""Prompt cache carried across swaps (``promptCache: true``, llama-server only).

llama-server can write a slot's KV cache to a file and read it back
(``--slot-save-path``, ``POST /slots/{id}?action=save|restore``).  For a model
with ``promptCache: true``, a :class:`PromptCache` is the lifecycle's hooks
(:class:`~llamaswap.supervision.lifecycle.LifecycleHooks`):

* before the launch, the command gets ``--slot-save-path`` (the model's own
  folder under ``promptCacheDir``, named by the model and its command hash)
  unless it already has one;
* before a stop llamaswap chose (swap, TTL, unload, reload, memory; not a
  crash, not the service's shutdown), every slot holding tokens
  (``GET /slots``) is saved, within the stop's graceful budget;
* after the next start's health check, before the model is ready, those
  saves are restored into the same slots.

Nothing here fails a request or a start: every error is logged.  Files are
checked before they are restored (the manifest of the same command hash
lists them with their size, modification time and a sampled CRC), so a file
of another command, a foreign or a rewritten file is never sent to the
server; llama-server checks the rest (magic, version, token count).  A
model whose restores are not reused :data:`NOOP_LIMIT` times in a row (the
next response's ``timings.cache_n`` is 0) has the feature switched off.

:class:`PromptCaches` holds what outlives one process: the folder, its bound
(``promptCacheMaxBytes``, least recently used files deleted first), the lock
that orders file work, and each model's no-op count.  File work runs in the
reactor's thread pool, never on the reactor.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from llamaswap.config.model import ModelConfig
from llamaswap.config.promptcache import PromptCacheSettings
from llamaswap.core.endpoints import UpstreamEndpoints

__all__ = [
    "NOOP_LIMIT",
    "PromptCache",
    "PromptCaches",
    "command_hash",
    "default_prompt_cache_dir",
    "saves_on",
]

log = Logger()

#: the flag llama-server takes the save folder with.
SAVE_PATH_FLAG = "--slot-save-path"
#: stops that end the service, or a dead child: nothing is saved.
NO_SAVE_REASONS = frozenset({"crash", "shutdown"})
#: of a stop's graceful budget, the part kept for the server's own exit
#: (at most half the budget).
STOP_RESERVE = 5.0
#: one HTTP call to the server at most (also bounded by the budget left).
CALL_TIMEOUT = 60.0
#: all restores of one start at most.
RESTORE_BUDGET = 60.0
#: restores in a row not reused by the next response before the feature is off.
NOOP_LIMIT = 3
#: a response body from ``/slots`` larger than this is not read.
BODY_CAP = 4 * 1024 * 1024
#: bytes at each end of a save file its sampled CRC covers.
CRC_SAMPLE = 1024 * 1024
MANIFEST_SUFFIX = ".prompt-cache.json"
MANIFEST_VERSION = 1
#: our save files: ``<model>-<hash12>-slot<N>.bin`` (``.new`` while unconfirmed).
_OUR_FILE = re.compile(r"^.+-[0-9a-f]{12}-slot\d+\.(bin|new)$")


def saves_on(reason: str | None) -> bool:
    """Whether a stop for ``reason`` saves the slots (a stop llamaswap chose)."""
    return reason is not None and reason not in NO_SAVE_REASONS


def default_prompt_cache_dir(environ: Mapping[str, str]) -> str:
    """``prompt-cache`` in llamaswap's state directory: systemd's
    ``$STATE_DIRECTORY`` (``StateDirectory=`` in the unit), else
    ``$XDG_STATE_HOME/llamaswap``, else ``~/.local/state/llamaswap``."""
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if not state:
        xdg = environ.get("XDG_STATE_HOME") or os.path.join(
            environ.get("HOME") or os.path.expanduser("~"), ".local", "state"
        )
        state = os.path.join(xdg, "llamaswap")
    return os.path.join(state, "prompt-cache")


def command_hash(config: ModelConfig) -> str:
    """What a saved slot must have been made by: the command (its port
    written as ``${PORT}``, so a reload that moves ports keeps the cache) and
    the environment, hashed."""
    port = str(config.port) if config.port is not None else None
    words = []
    for word in config.argv:
        if port is not None and (word == port or word.endswith("=" + port)):
            word = word[: len(word) - len(port)] + "${PORT}"
        words.append(word)
    text = json.dumps({"argv": words, "env": [list(pair) for pair in config.env]})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_path_of(argv: tuple[str, ...]) -> str | None:
    """The ``--slot-save-path`` the command already has, if any."""
    for index, word in enumerate(argv):
        if word == SAVE_PATH_FLAG and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith(SAVE_PATH_FLAG + "="):
            return word.split("=", 1)[1]
    return None


def _safe(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", model_id)[:64] or "model"


@dataclass
class _ModelState:
    """What outlives a process of one model and command."""

    noops: int = 0
    off: bool = False
    #: a restore brought tokens back; the next response says if they were reused.
    awaiting_reuse: bool = False


class PromptCaches:
    """Every model's prompt cache: the folder, its bound, the file lock.

    ``reactor`` provides ``IReactorTime`` and ``IReactorTCP``; ``threads``
    runs a blocking function off the reactor (default: its thread pool).
    """

    def __init__(
        self,
        reactor: Any,
        settings: PromptCacheSettings,
        environ: Mapping[str, str],
        *,
        threads: Callable[..., Deferred[Any]] = deferToThread,
    ) -> None:
        self.reactor = reactor
        self.threads = threads
        self.lock = DeferredLock()
        self._environ = environ
        self._states: dict[tuple[str, str], _ModelState] = {}
        self._current: dict[str, PromptCache] = {}
        self.settings = settings
        self.root = os.path.abspath(settings.dir or default_prompt_cache_dir(environ))
        self.agent = Agent.usingEndpointFactory(reactor, UpstreamEndpoints(reactor))

    def reconfigure(self, settings: PromptCacheSettings) -> None:
        """A reload's ``promptCacheDir`` and ``promptCacheMaxBytes``."""
        self.settings = settings
        self.root = os.path.abspath(settings.dir or default_prompt_cache_dir(self._environ))

    def for_model(self, config: ModelConfig) -> PromptCache | None:
        """The hooks of a process of ``config``; ``None`` without ``promptCache``."""
        if not config.prompt_cache:
            return None
        cache = PromptCache(self, config)
        self._current[config.id] = cache
        return cache

    def state(self, model_id: str, digest: str) -> _ModelState:
        return self._states.setdefault((model_id, digest), _ModelState())

    def observed(self, model_id: str, status: int, cache_n: int) -> None:
        """A response of ``model_id`` ended: ``cache_n`` prompt tokens came
        from its cache (``timings.cache_n``; negative when not reported)."""
        cache = self._current.get(model_id)
        if cache is None or status != 200 or cache_n < 0:
            return
        cache.observed(cache_n)

    def folders(self) -> list[tuple[str, bool]]:
        """Folders the bound covers: the root (every file in it is ours) and
        the commands' own ``--slot-save-path`` folders (only our names)."""
        found = [(self.root, True)]
        for cache in self._current.values():
            if cache.user_folder:
                found.append((cache.folder, False))
        return found


class PromptCache:
    """The prompt cache of one process of one model: its lifecycle hooks."""

    def __init__(self, caches: PromptCaches, config: ModelConfig) -> None:
        self._caches = caches
        self.model_id = config.id
        self.digest = command_hash(config)
        self._url = config.proxy.rstrip("/")
        own = save_path_of(config.argv)
        self.user_folder = own is not None
        self.base = f"{_safe(config.id)}-{self.digest[:12]}"
        self.folder = own or os.path.join(caches.root, self.base)
        #: this run can save: the folder exists and the server was told of it.
        self._usable = False

    @property
    def _state(self) -> _ModelState:
        return self._caches.state(self.model_id, self.digest)

    def _file(self, slot: int, suffix: str = "bin") -> str:
        return f"{self.base}-slot{slot}.{suffix}"

    # -- hooks -----------------------------------------------------------------

    def prepare_argv(self, argv: tuple[str, ...]) -> Deferred[tuple[str, ...]]:
        """The command to start: with ``--slot-save-path`` once its folder exists."""
        if self._state.off:
            self._usable = False
            return succeed(argv)

        def ready(_: object) -> tuple[str, ...]:
            self._usable = True
            return argv if self.user_folder else (*argv, SAVE_PATH_FLAG, self.folder)

        def failed(failure: Failure) -> tuple[str, ...]:
            log.warn(
                "{model} prompt cache: cannot create {folder}: {error}; starting without it",
                model=self.model_id,
                folder=self.folder,
                error=failure.getErrorMessage(),
            )
            self._usable = False
            return argv

        made: Deferred[tuple[str, ...]] = self._caches.threads(
            os.makedirs, self.folder, exist_ok=True
        )
        return made.addCallbacks(ready, failed)

    def before_stop(
        self, reason: str | None, deadline: Callable[[], float]
    ) -> Deferred[None] | None:
        """Save the slots holding tokens, by ``deadline()`` less the server's
        exit reserve; ``None`` when this stop saves nothing."""
        if not saves_on(reason) or not self._usable or self._state.off:
            return None
        return Deferred.fromCoroutine(self._save(reason or "", deadline))

    def before_ready(self) -> Deferred[None]:
        """Restore the saved slots of this command (never fails)."""
        if not self._usable or self._state.off:
            return succeed(None)
        return Deferred.fromCoroutine(self._restore())

    # -- reuse -------------------------------------------------------------------

    def observed(self, cache_n: int) -> None:
        state = self._state
        if not state.awaiting_reuse:
            return
        state.awaiting_reuse = False
        if cache_n > 0:
            state.noops = 0
            return
        state.noops += 1
        if state.noops >= NOOP_LIMIT and not state.off:
            state.off = True
            log.warn(
                "{model} prompt cache switched off: {count} restores in a row were not "
                "reused (timings.cache_n 0 in the next response); it comes back with a "
                "changed command or a restart of llamaswap",
                model=self.model_id,
                count=state.noops,
            )

    # -- saving ------------------------------------------------------------------

    async def _save(self, reason: str, deadline: Callable[[], float]) -> None:
        clock = self._caches.reactor
        began = clock.seconds()
        reserve = min(STOP_RESERVE, max(deadline() - began, 0) / 2)

        def left() -> float:
            return min(CALL_TIMEOUT, deadline() - reserve - clock.seconds())

        try:
            status, slots = await self._call(b"GET", "/slots", None, left())
        except Exception as e:
            log.warn(
                "{model} prompt cache: GET /slots failed, nothing saved: {error}",
                model=self.model_id,
                error=_describe(e),
            )
            return
        if status != 200 or not isinstance(slots, list):
            log.warn(
                "{model} prompt cache: GET /slots answered {status}, nothing saved "
                "(is --no-slots in the command?)",
                model=self.model_id,
                status=status,
            )
            return
        saved: list[tuple[int, int]] = []
        for slot in slots:
            if not isinstance(slot, dict) or not isinstance(slot.get("id"), int):
                continue
            tokens = slot.get("n_prompt_tokens")
            if not isinstance(tokens, int) or tokens <= 0:
                continue
            slot_id = slot["id"]
            if left() <= 0:
                log.warn(
                    "{model} prompt cache: out of stop time, slot {slot} not saved",
                    model=self.model_id,
                    slot=slot_id,
                )
                break
            answer = await self._slot_call(
                slot_id, "save", self._file(slot_id, "new"), left(), f"saving slot {slot_id}"
            )
            if answer is None:
                continue
            n_saved = answer.get("n_saved")
            if isinstance(n_saved, int) and n_saved > 0:
                saved.append((slot_id, n_saved))
                log.info(
                    "{model} prompt cache: saved slot {slot} ({tokens} tokens, {size}) "
                    "before the {reason} stop",
                    model=self.model_id,
                    slot=slot_id,
                    tokens=n_saved,
                    size=_mib(answer.get("n_written")),
                    reason=reason,
                )
        if saved:
            # Confirming the files and keeping the bound need not hold up the
            # stop: the next restore of this model waits for it (the lock).
            finishing = self._caches.lock.run(
                self._caches.threads,
                _confirm_saves,
                self.folder,
                self.base,
                self.digest,
                self.model_id,
                saved,
                self._caches.folders(),
                self._caches.settings.max_bytes,
            )
            finishing.addCallbacks(self._confirmed, self._file_work_failed)

    def _confirmed(self, evicted: list[str]) -> None:
        for name in evicted:
            log.info(
                "prompt cache: deleted {name} (promptCacheMaxBytes reached)",
                name=name,
            )

    def _file_work_failed(self, failure: Failure) -> None:
        log.failure("{model} prompt cache: file work failed", failure, model=self.model_id)

    # -- restoring ---------------------------------------------------------------

    async def _restore(self) -> None:
        clock = self._caches.reactor
        end = clock.seconds() + RESTORE_BUDGET
        try:
            found, ignored = await self._caches.lock.run(
                self._caches.threads, _restorable, self.folder, self.base, self.digest
            )
        except Exception as e:
            log.warn(
                "{model} prompt cache: cannot read {folder}: {error}",
                model=self.model_id,
                folder=self.folder,
                error=_describe(e),
            )
            return
        for name, why in ignored:
            log.warn(
                "{model} prompt cache: ignoring {name}: {why}",
                model=self.model_id,
                name=name,
                why=why,
            )
        restored = 0
        for slot_id, name in found:
            left = min(CALL_TIMEOUT, end - clock.seconds())
            if left <= 0:
                log.warn("{model} prompt cache: restore budget spent", model=self.model_id)
                break
            answer = await self._slot_call(
                slot_id, "restore", name, left, f"restoring slot {slot_id}", f" from {name}"
            )
            if answer is None:
                continue
            tokens = answer.get("n_restored")
            if isinstance(tokens, int) and tokens > 0:
                restored += tokens
                timings = answer.get("timings")
                ms = timings.get("restore_ms") if isinstance(timings, dict) else None
                log.info(
                    "{model} prompt cache: restored slot {slot} ({tokens} tokens) in {ms} ms",
                    model=self.model_id,
                    slot=slot_id,
                    tokens=tokens,
                    ms=round(ms) if isinstance(ms, int | float) else "?",
                )
        if restored:
            self._state.awaiting_reuse = True

    # -- HTTP --------------------------------------------------------------------

    async def _slot_call(
        self, slot_id: int, action: str, filename: str, timeout: float, what: str, source: str = ""
    ) -> dict[str, Any] | None:
        """``POST /slots/{id}?action=save|restore``: the JSON answer, or
        ``None`` after logging why there is none (never raises)."""
        try:
            status, answer = await self._call(
                b"POST", f"/slots/{slot_id}?action={action}", {"filename": filename}, timeout
            )
        except Exception as e:
            log.warn(
                "{model} prompt cache: {what} failed: {error}",
                model=self.model_id,
                what=what,
                error=_describe(e),
            )
            return None
        if status != 200 or not isinstance(answer, dict):
            log.warn(
                "{model} prompt cache: {what}{source} answered {status}: {answer}",
                model=self.model_id,
                what=what,
                source=source,
                status=status,
                answer=_brief(answer),
            )
            return None
        return answer

    def _call(
        self, method: bytes, path: str, body: object, timeout: float
    ) -> Deferred[tuple[int, Any]]:
        """``(status, decoded JSON or None)`` of one call, within ``timeout`` s."""
        if timeout <= 0:
            raise TimeoutError("no time left")
        exchange = Deferred.fromCoroutine(self._exchange(method, path, body))
        return exchange.addTimeout(timeout, self._caches.reactor)

    async def _exchange(self, method: bytes, path: str, body: object) -> tuple[int, Any]:
        headers = Headers({b"Accept": [b"application/json"]})
        producer = None
        if body is not None:
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
            producer = FileBodyProducer(BytesIO(json.dumps(body).encode("utf-8")))
        url = (self._url + path).encode("utf-8")
        response = await self._caches.agent.request(method, url, headers, producer)
        reader = _CappedBody(BODY_CAP)
        response.deliverBody(reader)
        data = await reader.done
        try:
            return response.code, json.loads(data) if data else None
        except ValueError:
            return response.code, data[:200].decode("utf-8", "replace")


class _CappedBody(Protocol):
    """Collects a response body of at most ``cap`` bytes."""

    def __init__(self, cap: int) -> None:
        self.done: Deferred[bytes] = Deferred()
        self._parts: list[bytes] = []
        self._size = 0
        self._cap = cap

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._cap:
            if not self.done.called:
                self.done.errback(ValueError(f"response body over {self._cap} bytes"))
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(b"".join(self._parts))


def _describe(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(str(r.value) for r in reasons)
    text = str(error)
    return text or type(error).__name__


def _brief(answer: object) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return str(answer["error"].get("message", answer["error"]))[:200]
    return str(answer)[:200]


def _mib(value: object) -> str:
    return f"{value / 1024**2:.1f} MiB" if isinstance(value, int) else "? MiB"


# -- file work (in a thread) ----------------------------------------------------


def _sample_crc(path: str, size: int) -> int:
    """CRC-32 of the first and last :data:`CRC_SAMPLE` bytes."""
    with open(path, "rb") as stream:
        crc = zlib.crc32(stream.read(CRC_SAMPLE))
        if size > CRC_SAMPLE:
            stream.seek(max(CRC_SAMPLE, size - CRC_SAMPLE))
            crc = zlib.crc32(stream.read(CRC_SAMPLE), crc)
    return crc


def _read_manifest(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as stream:
            manifest = json.load(stream)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("slots"), dict):
        return None
    return manifest


def _write_manifest(path: str, manifest: dict[str, Any]) -> None:
    part = path + ".part"
    with open(part, "w", encoding="utf-8") as stream:
        json.dump(manifest, stream, indent=1, sort_keys=True)
    os.replace(part, path)


def _matches(folder: str, entry: Any) -> str:
    """Why the file of a manifest ``entry`` is not the one saved ("" if it is)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return "malformed manifest entry"
    path = os.path.join(folder, entry["file"])
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    if stat.st_size != entry.get("bytes") or stat.st_mtime_ns != entry.get("mtime_ns"):
        return "changed since it was saved (size or modification time)"
    if _sample_crc(path, stat.st_size) != entry.get("crc"):
        return "contents changed since it was saved (CRC)"
    return ""


def _restorable(
    folder: str, base: str, digest: str
) -> tuple[list[tuple[int, str]], list[tuple[str, str]]]:
    """The ``(slot, file)`` saves of command ``digest`` in ``folder`` that
    are as saved (marked used now), and the ``(file, why)`` ignored."""
    manifest_path = os.path.join(folder, base + MANIFEST_SUFFIX)
    ignored: list[tuple[str, str]] = []
    if not os.path.isfile(manifest_path):
        return [], ignored
    manifest = _read_manifest(manifest_path)
    if manifest is None or manifest.get("version") != MANIFEST_VERSION:
        return [], [(os.path.basename(manifest_path), "unreadable manifest")]
    if manifest.get("command_hash") != digest:
        return [], [(os.path.basename(manifest_path), "saved by another command")]
    found = []
    now = time.time()
    for key, entry in sorted(manifest["slots"].items()):
        why = _matches(folder, entry)
        if why or not key.isdigit():
            name = entry.get("file") if isinstance(entry, dict) else key
            ignored.append((str(name), why or "malformed manifest entry"))
            continue
        found.append((int(key), entry["file"]))
        entry["used"] = now
    # A missing file was deleted by the bound: nothing to warn about.
    ignored = [(name, why) for name, why in ignored if why != "missing"]
    if found:
        _write_manifest(manifest_path, manifest)
    return found, ignored


def _confirm_saves(
    folder: str,
    base: str,
    digest: str,
    model_id: str,
    saved: list[tuple[int, int]],
    folders: list[tuple[str, bool]],
    max_bytes: int,
) -> list[str]:
    """Move the new saves in place, list them in the manifest, then keep
    every covered folder within ``max_bytes``; returns the files deleted."""
    manifest_path = os.path.join(folder, base + MANIFEST_SUFFIX)
    manifest = _read_manifest(manifest_path)
    if manifest is None or manifest.get("command_hash") != digest:
        manifest = {"version": MANIFEST_VERSION, "slots": {}}
    manifest.update(version=MANIFEST_VERSION, model=model_id, command_hash=digest)
    now = time.time()
    for slot_id, tokens in saved:
        new = os.path.join(folder, f"{base}-slot{slot_id}.new")
        final = os.path.join(folder, f"{base}-slot{slot_id}.bin")
        try:
            os.replace(new, final)
            stat = os.stat(final)
        except OSError:
            manifest["slots"].pop(str(slot_id), None)
            continue
        manifest["slots"][str(slot_id)] = {
            "file": os.path.basename(final),
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "crc": _sample_crc(final, stat.st_size),
            "tokens": tokens,
            "saved": now,
            "used": now,
        }
    _write_manifest(manifest_path, manifest)
    return enforce_bound(folders, max_bytes)


def enforce_bound(folders: list[tuple[str, bool]], max_bytes: int) -> list[str]:
    """Delete save files until those in ``folders`` take at most ``max_bytes``:
    files no manifest vouches for first, then the least recently used.
    ``(folder, all_ours)``: in a folder not all ours only our names count."""
    files: dict[str, tuple[int, float]] = {}  # path -> (bytes, last use; -1 unknown)
    vouched: dict[str, float] = {}
    seen = set()
    for root, all_ours in folders:
        if root in seen or not os.path.isdir(root):
            continue
        seen.add(root)
        walk = os.walk(root) if all_ours else [(root, [], os.listdir(root))]
        for here, _, names in walk:
            for name in names:
                path = os.path.join(here, name)
                if name.endswith(MANIFEST_SUFFIX):
                    manifest = _read_manifest(path)
                    for entry in (manifest or {}).get("slots", {}).values():
                        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                            used = entry.get("used")
                            vouched[os.path.join(here, entry["file"])] = (
                                float(used) if isinstance(used, int | float) else 0.0
                            )
                    continue
                if name.endswith(".part") or (not all_ours and not _OUR_FILE.match(name)):
                    continue
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                if name.endswith(".new") and stat.st_mtime > time.time() - 2 * CALL_TIMEOUT:
                    continue  # a save still being written or confirmed
                if os.path.isfile(path):
                    files[path] = (stat.st_size, stat.st_mtime)
    total = sum(size for size, _ in files.values())
    if total <= max_bytes:
        return []
    # Unknown files first (oldest first), then by last use.
    order = sorted(
        files,
        key=lambda p: (p in vouched, vouched.get(p, files[p][1])),
    )
    deleted = []
    for path in order:
        if total <= max_bytes:
            break
        try:
            os.unlink(path)
        except OSError:
            continue
        total -= files[path][0]
        deleted.append(path)
    return deleted
