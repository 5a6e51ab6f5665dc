"""The ``llamaswap`` console script.

``llamaswap -c CONFIG [...]`` runs the service in the foreground, as
``twistd -n --pidfile= llamaswap`` would, with the same options;
``llamaswap --demo`` runs the bundled demo; ``llamaswap check-config CONFIG``
validates a config and prints it resolved (secrets masked unless
``--show-secrets``); ``llamaswap simulate CONFIG [OTHER] --trace FILE``
replays a trace through configs (:mod:`llamaswap.simulate`).  Each command is a
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


class SimulateOptions(Command):
    longdesc = (
        "Replay a request trace (the activity store's SQLite file, store.path, or JSON lines"
        ' of {"model", "arrival", "duration"} in seconds) through the scheduler and planners'
        " of CONFIG (and OTHER_CONFIG) on a virtual clock, and print per config: swaps,"
        " seconds spent loading, queue wait p50/p99 per model and peak reserved per"
        " resource.  See docs/placement.md."
    )
    optParameters = [["trace", "t", None, "The trace file (required)."]]
    optFlags = [["json", None, "Print JSON for machines."]]

    def __init__(self) -> None:
        super().__init__()
        self["load-times"] = {}

    def getSynopsis(self) -> str:
        return (
            "Usage: llamaswap simulate CONFIG [OTHER_CONFIG] --trace FILE"
            " [--load-time MODEL=SECONDS ...] [--json]"
        )

    def opt_load_time(self, value: str) -> None:
        """MODEL=SECONDS: how long MODEL loads (repeatable; else learned from a store trace, else guessed from its footprint, else 10)."""  # noqa: E501
        from llamaswap.simulate.command import parse_load_time

        try:
            model, seconds = parse_load_time(value)
        except ValueError as exc:
            raise usage.UsageError(str(exc)) from None
        self["load-times"][model] = seconds

    def parseOptions(self, options: list[str] | None = None) -> None:
        # getopt stops at the first file name, and the synopsis puts the
        # options after the configs: take the file names out first.
        args = list(sys.argv[1:] if options is None else options)
        takes_value = {"--trace", "-t", "--load-time"}
        flags: list[str] = []
        paths: list[str] = []
        while args:
            arg = args.pop(0)
            if arg == "--":
                paths.extend(args)
                break
            if arg.startswith("-") and arg != "-":
                flags.append(arg)
                if arg in takes_value:
                    if not args:
                        raise usage.UsageError(f"option {arg} requires argument")
                    flags.append(args.pop(0))
            else:
                paths.append(arg)
        super().parseOptions([*flags, "--", *paths])

    def parseArgs(self, *paths: str) -> None:
        if len(paths) not in (1, 2):
            raise usage.UsageError("needs one or two config files")
        self["paths"] = paths

    def postOptions(self) -> None:
        if not self["trace"]:
            raise usage.UsageError("needs --trace FILE")

    def run(self) -> int:
        from llamaswap.simulate.command import simulate

        return simulate(
            self["paths"], self["trace"], self["load-times"], as_json=bool(self["json"])
        )


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
        ["simulate", None, SimulateOptions, "Replay a request trace through configs."],
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
