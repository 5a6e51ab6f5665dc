"""The ``llamaswap`` console script.

``llamaswap -c CONFIG [...]`` runs the service in the foreground, as
``twistd -n --pidfile= llamaswap`` would, with the same options;
``llamaswap --demo`` runs the bundled demo; ``llamaswap check-config CONFIG``
validates a config and prints it resolved (secrets masked unless
``--show-secrets``).  Each command is a
:class:`Command` (its options and its ``run``) listed in
:attr:`CommandLine.subCommands`.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from llamaswap.service.tap import Options, load_or_exit, version_text


class Command(usage.Options):
    """A ``llamaswap COMMAND``: its options, and :meth:`run`."""

    def opt_version(self) -> None:
        print(version_text())
        raise SystemExit(0)

    def run(self) -> int:
        """Do the command; returns the exit status."""
        raise NotImplementedError


class CheckConfigOptions(Command):
    longdesc = (
        "Load CONFIG as the service would and print it resolved (macros expanded,"
        " ports assigned, secrets shown as ***); a bad config prints one line per"
        " problem and exits 1."
    )
    optFlags = [["show-secrets", None, "Print API keys, tokens and passwords as they are."]]

    def getSynopsis(self) -> str:
        return "Usage: llamaswap check-config [--show-secrets] CONFIG"

    def parseArgs(self, *paths: str) -> None:
        # getopt stops at the first file name: a flag after it is read here.
        if "--show-secrets" in paths:
            self["show-secrets"] = 1
            paths = tuple(p for p in paths if p != "--show-secrets")
        if len(paths) != 1:
            raise usage.UsageError(
                "needs one config file (llamaswap check-config [--show-secrets] CONFIG)"
            )
        self["path"] = paths[0]

    def run(self) -> int:
        return check_config(self)


def check_config(options: CheckConfigOptions) -> int:
    config = load_or_exit(options["path"])
    sys.stdout.write(config.resolved_yaml(show_secrets=bool(options["show-secrets"])))
    return 0


class CommandLine(Options):
    """The service's options plus the commands; without a command it runs."""

    synopsis = (
        "Usage: llamaswap -c CONFIG [options]    run the proxy in the foreground\n"
        "       llamaswap --demo [options]       run the bundled demo\n"
        "       llamaswap COMMAND [args]         see Commands below"
    )
    longdesc = (
        "llamaswap serves many local AI models behind one OpenAI/Anthropic-compatible"
        " endpoint, starting each model's server on demand.  `twistd -n llamaswap` runs"
        " the same service with twistd's options (pid file, logging, daemonizing)."
    )
    subCommands = [
        ["check-config", None, CheckConfigOptions, "Validate a config and print it resolved."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            super().postOptions()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    options = CommandLine()
    try:
        options.parseOptions(args)
    except usage.UsageError as exc:
        command = f" {options.subCommand}" if options.subCommand else ""
        print(f"llamaswap{command}: {exc}", file=sys.stderr)
        print("Run `llamaswap --help` for the options and commands.", file=sys.stderr)
        return 2
    if options.subCommand is not None:
        assert isinstance(options.subOptions, Command)
        return options.subOptions.run()
    return run(options)


def run(options: Options) -> int:
    """Run the service as ``twistd -n --pidfile= llamaswap`` would, with our
    log output, from the options already parsed."""
    from twisted.application.service import ServiceMaker
    from twisted.scripts.twistd import ServerOptions, _SomeApplicationRunner

    server = ServerOptions()
    server.parseOptions(
        ["--nodaemon", "--pidfile=", "--logger=llamaswap.service.logsetup.observer"]
    )
    server.subCommand = "llamaswap"
    server.subOptions = options
    server.loadedPlugins = {
        "llamaswap": ServiceMaker("llamaswap", "llamaswap.service.tap", "", "llamaswap")
    }
    server["no_save"] = True
    # Unlike twistd, do not re-raise SIGTERM/SIGINT on the way out: a
    # requested, completed shutdown exits 0.
    _SomeApplicationRunner(server).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
