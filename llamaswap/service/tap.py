"""Command-line options and the service tree (``twistd llamaswap``)."""

from __future__ import annotations

import ipaddress
import re
import sys

from twisted.application import service, strports
from twisted.logger import Logger
from twisted.python import usage

from llamaswap import __version__
from llamaswap.config import Config, ConfigError
from llamaswap.config.loader import load_config_sources
from llamaswap.service.activation import inherited_loopback_only
from llamaswap.service.logsetup import set_log_level
from llamaswap.service.reload import ReloadService
from llamaswap.service.shutdown import relayed_requests
from llamaswap.service.systemd import (
    DrainService,
    Notifier,
    SequentialMultiService,
    ShutdownGrace,
    SystemdNotifyService,
    running_models_status,
)
from llamaswap.service.wiring import build_service
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


def is_loopback_only(endpoint: str, unknown: bool = False) -> bool:
    """Whether ``endpoint`` accepts loopback connections only; ``unknown``
    for a ``systemd:`` socket that cannot be inspected."""
    if endpoint.startswith("unix:"):
        return True
    if endpoint.startswith("systemd:"):
        inherited = inherited_loopback_only(endpoint)
        return unknown if inherited is None else inherited
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


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    config: Config = options["loaded"]
    set_log_level(config.log_level)
    # Stops run last-added first, one at a time: STOPPING=1, stop listening,
    # wait for in-flight requests (bounded), then stop every model process.
    top = SequentialMultiService()
    core = build_service(
        config,
        reactor,
        (options["config"], options["config-dir"]),
        # An inherited socket that cannot be inspected keeps the Host check.
        loopback_only=is_loopback_only(options["endpoint"], unknown=True),
    )
    core.setServiceParent(top)
    relayed, describe = relayed_requests(core.router.scheduler.snapshot)
    DrainService(
        ShutdownGrace(reactor),
        in_flight=relayed,
        describe=describe,
        reactor=reactor,  # type: ignore[arg-type]
    ).setServiceParent(top)
    endpoint = options["endpoint"]
    if not is_loopback_only(endpoint) and not config.api_keys:
        log.warn(
            "listening on {endpoint}: reachable from other hosts and no apiKeys are configured",
            endpoint=endpoint,
        )
    site = LlamaSwapSite(
        core.app.resource(),
        reactor,
        max_request_body_size=lambda: core.config.max_request_body_size,
    )
    web = strports.service(endpoint, site)
    web.setServiceParent(top)
    notify = SystemdNotifyService(
        Notifier.from_environment(), reactor, lambda: running_models_status(core.processes)
    )
    core.process_listeners.append(lambda *_: notify.update_status())
    notify.setServiceParent(top)
    ReloadService(core, reactor, watch=options["watch-config"], notify=notify).setServiceParent(top)
    return top
