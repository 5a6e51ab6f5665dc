"""The management API on Klein: health, listings, profiles, metrics,
captures, running models and unloading.  None of it is on the hot path."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from llamaswap import __version__
from llamaswap.config.resources import resources_json
from llamaswap.observe.queries import activity_page_json, parse_activity_query
from llamaswap.observe.recording import ActivityRecorder
from llamaswap.scheduling import ShuttingDown
from llamaswap.supervision.process import ProcessState
from llamaswap.supervision.router import RequestFailed, Router, TooManyRequests
from llamaswap.supervision.selection import (
    ProfileRequestError,
    UnknownProfile,
    parse_activate_body,
    profiles_json,
)
from llamaswap.web.errors import method_not_allowed, render_error
from llamaswap.web.listings import model_records, running_command
from llamaswap.web.routing import Routing

log = Logger()


def _json(request: Any, payload: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload, separators=(",", ":")).encode()


class AdminApi:
    """The Klein app behind every path the dispatcher does not handle itself."""

    app = Klein()

    def __init__(
        self,
        routing: Routing,
        router: Router,
        recorder: ActivityRecorder,
        on_profile_changed: Callable[[str | None], None],
        resource_report: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._resource_report = resource_report
        self._routing = routing
        self._router = router
        self._recorder = recorder
        self._on_profile_changed = on_profile_changed

    def resource(self) -> IResource:
        """A resource serving this API."""
        return self.app.resource()

    @app.handle_errors(NotFound)
    def not_found(self, request: Any, failure: Failure) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"404 page not found\n"

    @app.handle_errors(MethodNotAllowed)
    def wrong_method(self, request: Any, failure: Failure) -> bytes:
        allowed = getattr(failure.value, "valid_methods", None) or []
        return method_not_allowed(request, [method.encode() for method in allowed])

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"OK"

    @app.route("/wol-health", methods=["GET", "HEAD"])
    def wol_health(self, request: Any) -> bytes:
        return self.health(request)

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: Any) -> bytes:
        request.redirect(b"/ui/")
        return b""

    @app.route("/upstream", methods=["GET", "HEAD"])
    def upstream_index(self, request: Any) -> bytes:
        request.redirect(b"/ui/models")
        return b""

    @app.route("/v1/models", methods=["GET", "HEAD"])
    @app.route("/models", methods=["GET", "HEAD"])
    def list_models(self, request: Any) -> bytes:
        origin = request.getHeader(b"origin")
        if origin:
            request.setHeader(b"access-control-allow-origin", origin)
        # The answer depends on Origin (echoed or not): caches must not share it.
        request.setHeader(b"vary", b"Origin")
        records = model_records(self._routing.state, self._routing.state_of, self._routing.health)
        return _json(request, {"object": "list", "data": records})

    @app.route("/api/profiles", methods=["GET", "HEAD"])
    def list_profiles(self, request: Any) -> bytes:
        state = self._routing.state
        return _json(request, profiles_json(state.profiles, state.profile_state))

    @app.route("/api/profiles/active", methods=["PUT"])
    def activate_profile(self, request: Any) -> bytes:
        profile_state = self._routing.state.profile_state
        try:
            changed = profile_state.activate(parse_activate_body(request.content.read()))
        except ProfileRequestError as exc:
            return render_error(request, 400, str(exc))
        except UnknownProfile as exc:
            return render_error(request, 404, str(exc))
        if changed:
            log.info("active profile changed to {name!r}", name=profile_state.active or "")
            self._on_profile_changed(profile_state.active)
        return _json(request, {"active": profile_state.active})

    @app.route("/api/version", methods=["GET", "HEAD"])
    def version(self, request: Any) -> bytes:
        return _json(request, {"version": __version__, "commit": "", "build_date": ""})

    @app.route("/api/metrics/activity", methods=["GET", "HEAD"])
    async def activity(self, request: Any) -> bytes:
        try:
            query = parse_activity_query(request.args)
        except ValueError as exc:
            return render_error(request, 400, str(exc))
        rows, total = await self._recorder.store.select(query)
        return _json(request, activity_page_json(rows, total, query))

    @app.route("/api/metrics/stats", methods=["GET", "HEAD"])
    async def activity_stats(self, request: Any) -> bytes:
        model = request.args.get(b"model", [b""])[0].decode("utf-8", "replace") or None
        return _json(request, (await self._recorder.store.stats(model)).to_json())

    @app.route("/api/metrics", methods=["GET", "HEAD"])
    async def recent_activity(self, request: Any) -> bytes:
        rows = await self._recorder.store.recent()
        return _json(request, [row.to_json() for row in rows])

    @app.route("/metrics", methods=["GET", "HEAD"])
    def prometheus(self, request: Any) -> bytes:
        metrics = self._recorder.metrics
        if metrics is None:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"# performance monitor not available\n"
        body, content_type = metrics.render()
        request.setHeader(b"content-type", content_type.encode())
        return body

    @app.route("/api/captures/<capture_id>", methods=["GET", "HEAD"])
    def capture(self, request: Any, capture_id: str) -> bytes:
        try:
            number = int(capture_id)
        except ValueError:
            return render_error(request, 400, "invalid capture ID")
        captures = self._recorder.captures
        found = captures.get(number) if captures is not None else None
        if found is None:
            return render_error(request, 404, "capture not found")
        return _json(request, found)

    @app.route("/running", methods=["GET", "HEAD"])
    def running(self, request: Any) -> bytes:
        config = self._routing.state.config
        models = config.models
        running = []
        for model_id, process in sorted(self._router.processes.items()):
            if process.state in (ProcessState.STOPPED, ProcessState.SHUTDOWN):
                continue
            model = models[model_id]
            running.append(
                {
                    "model": model_id,
                    "state": process.state.value,
                    "cmd": running_command(config, model_id),
                    "proxy": model.proxy,
                    "ttl": model.ttl,
                    "name": model.name,
                    "description": model.description,
                }
            )
        return _json(request, {"running": running})

    def _log_unload(self, request: Any, models: list[str] | None = None) -> None:
        """One line naming what is unloaded (all: the models running) and who asked."""
        processes = self._router.processes
        running = {m for m, p in processes.items() if p.state is not ProcessState.STOPPED}
        if models is None:
            models = sorted(running)
        else:
            models = [m if m in running else f"{m} (not running)" for m in models]
        client = request.getClientAddress()
        log.info(
            "unloading {models}: asked by {method} {path} from {client}",
            models=", ".join(models) or "nothing (no model is running)",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
            client=getattr(client, "host", client),
        )

    @app.route("/unload", methods=["GET", "HEAD"])
    async def unload_all_legacy(self, request: Any) -> bytes:
        self._log_unload(request)
        await self._router.unload()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"OK"

    @app.route("/api/models/unload", methods=["POST"])
    async def unload_all(self, request: Any) -> bytes:
        self._log_unload(request)
        await self._router.unload()
        return _json(request, {"msg": "ok"})

    @app.route("/api/models/unload/<path:name>", methods=["POST"])
    async def unload_one(self, request: Any, name: str) -> bytes:
        model_id = self._routing.state.config.resolve(name)
        if model_id is None:
            return render_error(request, 404, "model not found")
        self._log_unload(request, [model_id])
        await self._router.unload([model_id])
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"OK"

    @app.route("/api/resources", methods=["GET", "HEAD"])
    def resources(self, request: Any) -> bytes:
        if self._resource_report is not None:
            return _json(request, self._resource_report())
        processes = self._router.processes

        def state_of(model_id: str) -> str:
            process = processes.get(model_id)
            return "stopped" if process is None else process.state.value

        return _json(
            request,
            resources_json(
                self._routing.state.config.resources,
                state_of,
                device_of=self._router.device_of,
            ),
        )

    @app.route("/api/models/load/<path:name>", methods=["POST"])
    async def load_one(self, request: Any, name: str) -> bytes:
        """Start a model through the scheduler (as a preload does); answer
        once it is ready, or with the error."""
        model_id = self._routing.state.config.resolve(name)
        if model_id is None:
            return render_error(request, 404, "model not found")
        try:
            lease = await self._router.acquire(model_id)
        except TooManyRequests:
            return render_error(request, 429, "Too many requests")
        except (RequestFailed, ShuttingDown) as exc:
            return render_error(request, 502, f"loading {model_id} failed: {exc}")
        lease.release()
        return _json(request, {"model": model_id, "state": "ready"})
