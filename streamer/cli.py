"""The `streamer` command: thin argument parsing that calls into the package.

Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from streamer import __version__
from streamer.config import Config, ConfigError, load_config, redacted, secret_values, to_toml
from streamer.observability import configure_logging

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"streamer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", metavar="PATH", help="config.toml (default: $STREAMER_CONFIG)")
        return sub

    run = command("run", "run the daemon")
    run.add_argument(
        "--dev-mongo",
        action="store_true",
        help="start a throwaway local replica set (needs the dev extra) unless "
        "STREAMER_MONGO__URI is set",
    )
    command("config", "print the effective configuration, secrets redacted")
    command("doctor", "check the deployment (SPEC §8): each check PASS/WARN/FAIL with the fix")
    explain = command("explain", "why a message did or did not notify each member, in words")
    explain.add_argument("message_id", metavar="MESSAGE_ID")
    explain.add_argument("--user", metavar="USERNAME_OR_ID", help="explain for this member only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        if args.command == "config":
            sys.stdout.write(to_toml(redacted(config)))
            return EXIT_OK
        if args.command == "doctor":
            return _doctor(config)
        if args.command == "explain":
            return _explain(config, args.message_id, args.user)
    except ConfigError as exc:  # the file, or a URI pymongo refuses
        print(f"streamer: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.log, secret_values(config))
    return _run(config, dev_mongo=args.dev_mongo)


def _doctor(config: Config) -> int:
    from streamer import doctor

    # The report is the output; only errors may interleave with it as log lines.
    configure_logging(dataclasses.replace(config.log, level="error"), secret_values(config))
    return doctor.main(config, sys.stdout)


def _explain(config: Config, message_id: str, user: str | None) -> int:
    from streamer import explain

    configure_logging(dataclasses.replace(config.log, level="error"), secret_values(config))
    return explain.main(config, message_id, user, sys.stdout, sys.stderr)


def _run(config: Config, dev_mongo: bool) -> int:
    from streamer import app

    return app.main(config, dev_mongo=dev_mongo)
