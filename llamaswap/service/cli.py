"""The ``llamaswap`` console script.

``llamaswap -c CONFIG [...]`` runs the twistd plugin in the foreground with
no pidfile; ``llamaswap check-config CONFIG`` validates a config and prints
it resolved (secrets masked unless ``--show-secrets``).
"""

from __future__ import annotations

import sys


def check_config(path: str, *, show_secrets: bool = False) -> int:
    from llamaswap.service.tap import load_or_exit

    config = load_or_exit(path)
    sys.stdout.write(config.resolved_yaml(show_secrets=show_secrets))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check-config"]:
        rest = [arg for arg in args[1:] if arg != "--show-secrets"]
        if len(rest) != 1:
            print("usage: llamaswap check-config [--show-secrets] CONFIG", file=sys.stderr)
            return 2
        return check_config(rest[0], show_secrets="--show-secrets" in args)
    from twisted.application import app
    from twisted.scripts.twistd import ServerOptions, _SomeApplicationRunner

    def run_app(config: object) -> None:
        # Unlike twistd, do not re-raise SIGTERM/SIGINT on the way out: a
        # requested, completed shutdown exits 0.
        _SomeApplicationRunner(config).run()

    sys.argv = [
        "llamaswap",
        "--nodaemon",
        "--pidfile=",
        "--logger=llamaswap.service.logsetup.observer",
        "llamaswap",
        *args,
    ]
    app.run(run_app, ServerOptions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
