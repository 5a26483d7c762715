"""The command line: `billing-ingestor serve` (also `python -m ingestor serve`)."""

from __future__ import annotations

import argparse
import sys

import trio

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config, bind=args.bind, data_dir=args.data_dir)
    except ConfigError as exc:
        print(f"billing-ingestor: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    from .service import serve

    try:
        trio.run(serve, settings)
    except StoreError as exc:
        print(f"billing-ingestor: store error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"billing-ingestor: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
