"""The ``avatar`` command.

Each pipeline area registers its own subcommands through a ``register(subparsers)`` function, so
this file only dispatches and turns every failure into a one-line ``error: ...`` message and a
non-zero exit code; ``--debug`` shows the traceback instead:

- :class:`avatar.errors.AvatarError`: its message, ``err.exit_code``;
- OS errors (disk full, permission denied, read-only file system...): exit 74 (EX_IOERR);
- a closed stdout (``avatar show NAME | head``): quiet exit 141 (as a shell's SIGPIPE);
- Ctrl-C: 130; anything else: exit 70 (EX_SOFTWARE) with a hint to rerun with ``--debug``.

A ``--device`` option of any subcommand is checked before the command runs (:func:`check_device`).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from avatar import __version__
from avatar.errors import AvatarError
from avatar.runtime import check_device

EX_SOFTWARE, EX_IOERR, EX_PIPE = 70, 74, 141

#: modules that provide ``register(subparsers)``; each adds one or more subcommands
COMMAND_MODULES = [
    "avatar.pipeline.preprocess",
    "avatar.motion.commands",
    "avatar.nerf.commands",
    "avatar.pipeline.commands",
    "service.commands",
    "recipes.train_emotion",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avatar",
        description="Per-identity NeRF talking-head avatars (GeneFace): preprocess, train, onboard, render, serve.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"avatar {__version__}")
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


def _os_error_message(e: OSError) -> str:
    what = e.strerror or str(e)
    where = f": {e.filename}" if e.filename else ""
    hint = {errno.ENOSPC: "free disk space or choose another output location",
            errno.EDQUOT: "free disk space or choose another output location",
            errno.EACCES: "check the permissions or choose another path",
            errno.EPERM: "check the permissions or choose another path",
            errno.EROFS: "choose a writable location",
            errno.ENOTDIR: "a path component is a file, not a directory",
            errno.EISDIR: "give a file path, not a directory"}.get(e.errno, "")
    return f"{what}{where}" + (f"; {hint}" if hint else "")


def _stdout_closed() -> None:
    """After a BrokenPipeError: point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the ``avatar`` command; returns the exit code (see the module docstring)."""
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
        check_device(getattr(args, "device", None))
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # surface a closed pipe here, not at interpreter exit
        return code
    except BrokenPipeError:
        _stdout_closed()
        return EX_PIPE
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume where supported", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, AvatarError):
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        if isinstance(e, OSError):
            print(f"error: {_os_error_message(e)}", file=sys.stderr)
            return EX_IOERR
        logging.getLogger("avatar").debug("unexpected error", exc_info=True)
        first = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"error: unexpected {type(e).__name__}: {first}; rerun with --debug for the traceback and report it",
              file=sys.stderr)
        return EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
