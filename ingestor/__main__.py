"""The command line (also `python -m ingestor ...`).

billing-ingestor serve [--bind HOST:PORT] [--data-dir DIR] [--config FILE]
billing-ingestor keys new --role ingest|read|admin [--tenant T ...]
"""

from __future__ import annotations

import argparse
import re
import resource
import sys
import tomllib

from .auth import Role, new_key
from .config import load_settings
from .errors import ConfigError, StoreError
from .logs import setup_logging

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="billing-ingestor", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the ingestor")
    serve.add_argument("--bind", help="HOST:PORT to listen on (default 127.0.0.1:8081)")
    serve.add_argument("--data-dir", help="where the store and deliveries live (default ./data)")
    serve.add_argument("--config", help="a TOML file of settings")
    serve.add_argument(
        "--workers", type=int, help="worker processes sharing the port and the store (default 1)"
    )
    keys = commands.add_parser("keys", help="API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = key_commands.add_parser(
        "new", help="make a new random API key and print the config lines for it"
    )
    new.add_argument("--role", required=True, choices=["ingest", "read", "admin"])
    new.add_argument(
        "--tenant",
        action="append",
        default=[],
        dest="tenants",
        help="a tenant the key acts for; repeat for more, or '*' for every tenant"
        " (admin keys always act for every tenant)",
    )
    return parser


def _new_key(role: Role, tenants: list[str]) -> int:
    if not tenants:
        if role != "admin":
            print(
                "billing-ingestor: give --tenant (repeat it for more), or --tenant '*'"
                " for every tenant",
                file=sys.stderr,
            )
            return 2
        tenants = ["*"]
    key, table = new_key(role, list(dict.fromkeys(tenants)))
    try:
        # The same checks the server makes when it reads the table.
        load_settings(environ={}, api_keys=[tomllib.loads(table)["api_keys"][0]])
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        print(f"billing-ingestor: {exc}", file=sys.stderr)
        return 2
    print("A new API key. It is shown only now and is stored nowhere; hand it to the client:")
    print()
    print(f"    {key}")
    print()
    print("Add these lines to the config file (the key appears only as its SHA-256):")
    print()
    print(table, end="")
    return 0


def _raise_open_files_limit() -> None:
    """Take the hard limit of open files as the soft one, as Go's runtime does.

    Each client connection holds a descriptor. A soft limit below the hard
    one (systemd gives a service 1,024, and a shell's `ulimit -n` may give
    less) left the clients past it waiting to be accepted until another
    closed, 75 s for an idle keep-alive one, while the hard limit, set by
    the operator or the platform, would have held them all.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # a hard limit the kernel caps lower (nr_open)
            return


def _one_line(exc: Exception) -> str:
    """`exc`'s message on one line: a driver's may span several (libpq's
    "Connection refused" is followed by a line "Is the server running ...")."""
    return re.sub(r"\s*[\r\n]\s*", " ", str(exc)).strip()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keys":
        return _new_key(args.role, args.tenants)
    try:
        settings = load_settings(
            args.config, bind=args.bind, data_dir=args.data_dir, workers=args.workers
        )
    except ConfigError as exc:
        print(f"billing-ingestor: configuration error: {_one_line(exc)}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    _raise_open_files_limit()
    from .service import ignore_stop_signals
    from .workers import run_alone, run_workers

    try:
        if settings.workers > 1:
            return run_workers(settings)
        run_alone(settings)
    except StoreError as exc:
        print(f"billing-ingestor: store error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"billing-ingestor: cannot start: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signals were noted: nothing had started
        return 0
    finally:
        ignore_stop_signals()  # the supervisor's, once its workers have stopped
    return 0


if __name__ == "__main__":
    sys.exit(main())
