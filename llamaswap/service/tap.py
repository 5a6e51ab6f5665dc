"""Command-line options and the service tree (``twistd llamaswap``)."""

from __future__ import annotations

import atexit
import errno
import ipaddress
import os
import re
import socket
import sys
import tempfile
from importlib import resources
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from llamaswap import __version__
from llamaswap.config import Config, ConfigError
from llamaswap.config.commands import program_problem
from llamaswap.config.loader import load_config_sources
from llamaswap.core.loglevels import logs_info
from llamaswap.core.text import as_text
from llamaswap.service.activation import inherited_loopback_only
from llamaswap.service.heap import HeapService, settle
from llamaswap.service.logsetup import adopt_twistd_logging, set_log_level, set_log_to_stdout
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


def version_text() -> str:
    """What ``--version`` prints: llamaswap's version, then Twisted's."""
    from twisted import copyright

    return f"llamaswap {__version__} (Twisted {copyright.version})"


#: told when no config is given (the console script and twistd both say it).
NO_CONFIG = (
    "no config given: use -c CONFIG (a YAML file), --config-dir DIR,"
    " or --demo to try the bundled demo"
)


class Options(usage.Options):
    """The options of the service, shared by ``twistd llamaswap`` and the
    ``llamaswap`` console script (which adds its commands on top)."""

    synopsis = "-c CONFIG [--listen ENDPOINT] | --demo"
    optParameters = [
        ["config", "c", None, "Path to the YAML configuration file."],
        ["listen", "l", DEFAULT_LISTEN, "Twisted endpoint or host:port to listen on."],
        ["config-dir", None, None, "Directory of extra *.yaml files merged after --config."],
        ["tls-cert-file", None, None, "TLS certificate (with --tls-key-file)."],
        ["tls-key-file", None, None, "TLS private key (with --tls-cert-file)."],
    ]
    optFlags = [
        ["watch-config", None, "Reload the configuration when the file changes."],
        ["demo", None, "Run the bundled demo (three small demo models, no GPU needed)."],
    ]

    def opt_version(self) -> None:
        """Print llamaswap's and Twisted's versions and exit."""
        print(version_text())
        raise SystemExit(0)

    opt_V = opt_version

    def postOptions(self) -> None:
        if self["demo"] and (self["config"] or self["config-dir"]):
            raise usage.UsageError("--demo runs the bundled demo config: leave out -c/--config-dir")
        if not self["config"] and not self["config-dir"] and not self["demo"]:
            raise usage.UsageError(NO_CONFIG)
        if bool(self["tls-cert-file"]) != bool(self["tls-key-file"]):
            raise usage.UsageError(
                "both --tls-cert-file and --tls-key-file must be provided for TLS"
            )
        listen = self["listen"]
        if self["tls-cert-file"] and listen == DEFAULT_LISTEN:
            listen = "127.0.0.1:8443"
        self["endpoint"] = listen_endpoint(listen, self["tls-cert-file"], self["tls-key-file"])
        if self["demo"]:
            self["config"] = write_demo_config()
        self["loaded"] = load_or_exit(self["config"], self["config-dir"])
        adopt_twistd_logging(self.parent)  # same log output as the console script


def demo_config_path() -> str:
    """The demo config installed with the package (``llamaswap/demo/demo.yaml``)."""
    return str(resources.files("llamaswap.demo").joinpath("demo.yaml"))


def write_demo_config() -> str:
    """A copy of the demo config whose model servers take free ports (not
    the file's ``startPort``), so a second demo on another ``--listen`` port
    works; a reload re-reads the same copy.  Removed when llamaswap exits
    (at reactor shutdown; at exit if it never ran)."""
    with open(demo_config_path(), encoding="utf-8") as stream:
        text = stream.read()
    start = free_port_block(3)
    text = re.sub(r"(?m)^startPort: \d+$", f"startPort: {start}", text)
    fd, path = tempfile.mkstemp(prefix="llamaswap-demo-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(text)
    atexit.register(_remove, path)
    return path


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def free_port_block(size: int, host: str = "127.0.0.1") -> int:
    """The first of ``size`` consecutive ports that were free on ``host``."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((host, 0))
            first = probe.getsockname()[1]
        if first + size > 65536:
            continue
        held = []
        try:
            for port in range(first, first + size):
                s = socket.socket()
                held.append(s)
                s.bind((host, port))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        return first
    raise SystemExit(f"llamaswap: found no {size} free ports in a row on {host} for the demo")


def load_or_exit(path: str | None, config_dir: str | None = None) -> Config:
    """Load the config; on errors print one line per problem and exit 1."""
    try:
        config = load_config_sources(path, config_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        for warning in exc.warnings:
            if not _explained(warning, exc.problems):
                print(f"warning: {warning}", file=sys.stderr)
        raise SystemExit(1) from None
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for model in config.models.values():
        # Only a warning: the file may be there by the time the model starts.
        missing = program_problem(model.argv[0]) if model.argv else None
        if missing:
            print(f"warning: models.{model.id}.cmd: {missing}", file=sys.stderr)
    return config


def _explained(warning: str, problems: tuple[str, ...]) -> bool:
    """Whether an unknown-key ``warning`` is already named by a problem
    (``models.a: needs cmd …; "cmnd" is not a key: did you mean "cmd"?``)."""
    path = warning.split(": ", 1)[0]
    parent, _, key = path.rpartition(".")
    return any(p.startswith(f"{parent}:") and f'"{key}" is not a key' in p for p in problems)


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    config: Config = options["loaded"]
    set_log_level(config.log_level)
    set_log_to_stdout(config.log_to_stdout)
    if options["demo"]:
        # twistd ends by re-raising a stop signal, when atexit does not run.
        reactor.addSystemEventTrigger("after", "shutdown", _remove, options["config"])
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
        access_lines=lambda: logs_info(core.config.log_level),
    )
    site.noisy = False  # no "Starting factory <...>" line; the start-up lines say it
    WebService(
        endpoints.serverFromString(reactor, endpoint),
        site,
        tls=endpoint.startswith(("ssl:", "tls:")),
        daemon=_daemonized(options),
    ).setServiceParent(top)
    notify = SystemdNotifyService(
        Notifier.from_environment(), reactor, lambda: running_models_status(core.processes)
    )
    core.process_listeners.append(lambda *_: notify.update_status())
    notify.setServiceParent(top)
    ReloadService(core, reactor, watch=options["watch-config"], notify=notify).setServiceParent(top)
    HeapService(reactor).setServiceParent(top)
    core.reload_listeners.append(lambda _: settle())
    return top


def _daemonized(options: Options) -> bool:
    """Whether twistd runs us as a daemon (without ``-n``)."""
    twistd = getattr(options, "parent", None)
    return twistd is not None and not twistd.get("nodaemon", True)


def base_urls(address: Any, tls: bool) -> tuple[str, str | None]:
    """The URL to show for a listening ``address`` and, when other hosts can
    reach it, a note saying so."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return f"unix:{as_text(getattr(address, 'name', None) or str(address))}", None
    scheme = "https" if tls else "http"
    note = None
    if host in ("0.0.0.0", "::"):
        note = "on every interface"
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}", note


@implementer(IStreamServerEndpoint)
class _Announced:
    """An endpoint whose ``listen`` logs where to go once it listens."""

    def __init__(self, endpoint: IStreamServerEndpoint, tls: bool) -> None:
        self._endpoint = endpoint
        self._tls = tls

    def listen(self, factory: Any) -> Any:
        return self._endpoint.listen(factory).addCallback(self._announce)

    def _announce(self, port: IListeningPort) -> IListeningPort:
        url, note = base_urls(port.getHost(), self._tls)
        if url.startswith("unix:"):
            log.info("listening on {url}", url=url)
            return port
        log.info(
            "listening on {url}{note} (OpenAI base URL {url}/v1)",
            url=url,
            note=f" {note}" if note else "",
        )
        log.info("web UI: {url}/ui/", url=url)
        return port


class WebService(StreamServerEndpointService):
    """Listens (in ``privilegedStartService``, before twistd drops
    privileges) and logs the URLs.  An address that cannot be listened on
    (in use, not permitted) is one line on stderr and exit status 1, not a
    traceback."""

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: Any, *, tls: bool, daemon: bool = False
    ) -> None:
        super().__init__(_Announced(endpoint, tls), factory)
        self._raiseSynchronously = True  # as strports.service: errors raise at start
        self._daemon = daemon

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as exc:
            if self._daemon:
                # stderr is /dev/null by now: the log file gets the line, and
                # twistd reports the error to the shell that started it.
                log.error("{message}", message=cannot_listen_message(exc))
                raise
            print(cannot_listen_message(exc), file=sys.__stderr__, flush=True)
            raise SystemExit(1) from None


def cannot_listen_message(exc: CannotListenError) -> str:
    """``cannot listen on 127.0.0.1:8080: address already in use ...`` in one line."""
    error = exc.socketError
    reason = getattr(error, "strerror", None) or str(error)
    host = exc.interface or "0.0.0.0"
    address = f"[{host}]:{exc.port}" if ":" in host else f"{host}:{exc.port}"
    hint = "choose another address with --listen, e.g. --listen 127.0.0.1:8081"
    if getattr(error, "errno", None) == errno.EADDRINUSE:
        hint = "is another llamaswap (or another server) running there? " + hint
    return f"llamaswap: cannot listen on {address}: {reason.lower()}; {hint}"
