"""Command-line options and the service tree (``twistd llamaswap``)."""

from __future__ import annotations

import ipaddress
import re
import sys
from typing import Any

from twisted.application import service, strports
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from llamaswap import __version__
from llamaswap.captures import CaptureCache
from llamaswap.config import Config, ConfigError
from llamaswap.config.loader import load_config_sources
from llamaswap.logs import LogMonitor
from llamaswap.logsetup import set_log_level
from llamaswap.prometheus import Metrics
from llamaswap.proxy import UpstreamClient
from llamaswap.recording import ActivityRecorder
from llamaswap.router import Router, build_processes
from llamaswap.store import open_store
from llamaswap.systemd import (
    DrainService,
    Notifier,
    SequentialMultiService,
    ShutdownGrace,
    SystemdNotifyService,
    running_models_status,
)
from llamaswap.web.app import LlamaSwapApp
from llamaswap.web.site import LlamaSwapSite

log = Logger()

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
_ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "tls", "unix", "systemd")


def listen_endpoint(value: str, cert: str | None = None, key: str | None = None) -> str:
    """A Twisted endpoint string for ``--listen`` (llama-swap's ``host:port``
    and ``:port`` forms are accepted too)."""
    kind = value.split(":", 1)[0]
    if kind in _ENDPOINT_TYPES:
        return value
    match = re.fullmatch(r"(?:\[([^\]]*)\]|([^:]*)):(\d+)", value)
    if match is None:
        raise usage.UsageError(f"--listen: not an endpoint or host:port: {value!r}")
    host = match.group(1) if match.group(1) is not None else match.group(2)
    port = match.group(3)
    host = host or "0.0.0.0"
    if host == "localhost":
        host = "127.0.0.1"
    escaped = host.replace(":", r"\:")
    if cert and key:
        return f"ssl:{port}:interface={escaped}:privateKey={key}:certKey={cert}"
    return f"tcp:{port}:interface={escaped}"


def is_loopback_only(endpoint: str) -> bool:
    if endpoint.startswith(("unix:", "systemd:")):
        return True
    found = re.search(r"(?:^|:)interface=((?:\\.|[^:\\])+)", endpoint)
    if not found:
        return False
    host = re.sub(r"\\(.)", r"\1", found.group(1))
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Options(usage.Options):
    synopsis = "-c CONFIG [--listen ENDPOINT]"
    optParameters = [
        ["config", "c", None, "Path to the YAML configuration file."],
        ["listen", "l", DEFAULT_LISTEN, "Twisted endpoint or host:port to listen on."],
        ["config-dir", None, None, "Directory of extra *.yaml files merged after --config."],
        ["tls-cert-file", None, None, "TLS certificate (with --tls-key-file)."],
        ["tls-key-file", None, None, "TLS private key (with --tls-cert-file)."],
    ]
    optFlags = [
        ["watch-config", None, "Reload the configuration when the file changes."],
        ["version", "V", "Print the version and exit."],
    ]

    def postOptions(self) -> None:
        if self["version"]:
            print(f"version: {__version__}")
            raise SystemExit(0)
        if not self["config"] and not self["config-dir"]:
            raise usage.UsageError("at least one of --config or --config-dir must be provided")
        if bool(self["tls-cert-file"]) != bool(self["tls-key-file"]):
            raise usage.UsageError(
                "both --tls-cert-file and --tls-key-file must be provided for TLS"
            )
        listen = self["listen"]
        if self["tls-cert-file"] and listen == DEFAULT_LISTEN:
            listen = "127.0.0.1:8443"
        self["endpoint"] = listen_endpoint(listen, self["tls-cert-file"], self["tls-key-file"])
        self["loaded"] = load_or_exit(self["config"], self["config-dir"])


def load_or_exit(path: str | None, config_dir: str | None = None) -> Config:
    """Load the config; on errors print one line per problem and exit 1."""
    try:
        config = load_config_sources(path, config_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(1) from None
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return config


def build_recorder(config: Config, reactor: Any, metrics: Metrics) -> ActivityRecorder:
    """The activity store (``store.path`` SQLite file, else the in-memory ring
    of ``metricsMaxInMemory`` rows) and capture cache (``captureBuffer`` MiB
    of compressed captures; 0 disables)."""
    document = config.document
    budget = document.get("captureBuffer", 5)
    captures = None
    if isinstance(budget, int) and budget > 0:
        captures = CaptureCache(budget * 1024 * 1024)
    try:
        if captures is None:
            store = open_store(document, reactor)
        else:
            store = open_store(document, reactor, captures.has)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    return ActivityRecorder(reactor, store, captures, metrics)


class LlamaSwapService(service.Service):
    """Owns the router and the model processes; stopping it stops every child."""

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.upstream_log = LogMonitor("upstream")
        self.processes = build_processes(config, reactor, upstream_log=self.upstream_log)
        self.router = Router(config, self.processes)
        self.client = UpstreamClient(reactor)
        performance = config.document.get("performance")
        disabled = isinstance(performance, dict) and performance.get("disabled") is True
        self.metrics = Metrics(system=not disabled)
        for model_id, process in self.processes.items():
            self.metrics.model_state(model_id, process.state.value)
            process.add_state_listener(
                lambda p, old, new: self.metrics.model_state(p.model_id, new.value)
            )
        self.recorder = build_recorder(config, reactor, self.metrics)
        self.app = LlamaSwapApp(config, self.router, self.client, self.recorder)

    def startService(self) -> None:
        super().startService()
        log.info(
            "llamaswap {version} managing {count} models: {models}",
            version=__version__,
            count=len(self.config.models),
            models=", ".join(self.config.models),
        )

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        log.info("stopping every model process")
        timeout = max([m.unload_timeout for m in self.config.models.values()] or [10])
        d = self.router.shutdown(timeout)
        d.addBoth(lambda _: self.client.close())
        d.addBoth(lambda _: self.recorder.store.close())
        d.addCallback(lambda _: log.info("shutdown complete"))
        return d


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    config: Config = options["loaded"]
    set_log_level(config.log_level)
    # Stops run last-added first, one at a time: STOPPING=1, stop listening,
    # wait for in-flight requests (bounded), then stop every model process.
    top = SequentialMultiService()
    core = LlamaSwapService(config, reactor)
    core.setServiceParent(top)
    snapshot = core.router.scheduler.snapshot
    DrainService(
        ShutdownGrace(reactor),
        in_flight=lambda: sum(snapshot().reserved.values()),
        describe=lambda: ", ".join(f"{m}: {n}" for m, n in sorted(snapshot().reserved.items())),
        reactor=reactor,
    ).setServiceParent(top)
    endpoint = options["endpoint"]
    if not is_loopback_only(endpoint):
        log.warn(
            "listening on {endpoint}: reachable from other hosts and no apiKeys are configured",
            endpoint=endpoint,
        )
    site = LlamaSwapSite(core.app.resource())
    web = strports.service(endpoint, site)
    web.setServiceParent(top)
    notify = SystemdNotifyService(
        Notifier.from_environment(), reactor, lambda: running_models_status(core.processes)
    )
    for process in core.processes.values():
        process.add_state_listener(lambda *_: notify.update_status())
    notify.setServiceParent(top)
    return top
