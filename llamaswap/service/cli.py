"""The ``llamaswap`` console script.

``llamaswap -c CONFIG [...]`` runs the twistd plugin in the foreground with
no pidfile; ``llamaswap check-config CONFIG`` validates a config and prints
it resolved.
"""

from __future__ import annotations

import sys


def check_config(path: str) -> int:
    from llamaswap.service.tap import load_or_exit

    config = load_or_exit(path)
    sys.stdout.write(config.resolved_yaml())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check-config"]:
        if len(args) != 2:
            print("usage: llamaswap check-config CONFIG", file=sys.stderr)
            return 2
        return check_config(args[1])
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
