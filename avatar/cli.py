"""The ``avatar`` command.

Each pipeline area registers its own subcommands through a ``register(subparsers)`` function, so
this file only dispatches and turns :class:`avatar.errors.AvatarError` into a one-line message and
a non-zero exit code (no traceback for user errors; ``--debug`` shows one).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from avatar.errors import AvatarError

#: modules that provide ``register(subparsers)``; each adds one or more subcommands
COMMAND_MODULES = [
    "avatar.pipeline.preprocess",
    "avatar.motion.commands",
    "avatar.nerf.commands",
    "avatar.pipeline.commands",
    "service.commands",
    "recipes.train_emotion",
    "bench.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avatar",
        description="Per-identity NeRF talking-head avatars (GeneFace): preprocess, train, onboard, render, serve.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # an area not installed in this build
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AvatarError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume where supported", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
