"""The ``avatar`` command.

Each pipeline area registers its own subcommands through a ``register(subparsers)`` function, so
this file only dispatches and turns every failure into a one-line ``error: ...`` message and a
non-zero exit code; ``--debug`` shows the traceback instead:

- :class:`avatar.errors.AvatarError`: its message, ``err.exit_code``;
- OS errors (disk full, permission denied, read-only file system...): exit 74 (EX_IOERR);
- a closed stdout (``avatar show NAME | head``): quiet exit 141 (as a shell's SIGPIPE);
- a missing optional dependency (:data:`OPTIONAL_MODULES`): the extra to install, exit 69 (EX_UNAVAILABLE);
- Ctrl-C: 130; anything else: exit 70 (EX_SOFTWARE) with a hint to rerun with ``--debug``.

Flags every subcommand shares (added here when its module does not define them, so the command
modules stay short; :func:`_add_shared_flags`):

- ``-q/--quiet`` (warnings and errors only, no progress bars) and ``-v/--verbose`` (debug logs) on
  every subcommand;
- ``--device`` on every subcommand that trains or renders (:data:`DEVICE_COMMANDS`): checked before
  the command runs (:func:`check_device`) and the process default of
  :func:`avatar.runtime.resolve_device` while it runs (:func:`avatar.runtime.default_device`), so
  every stage that picks its own device follows it;
- ``--seed`` (default 0) where the work is sampled or trained (``render``, ``eval-motion``, ``client
  render|stream``, ``train-generator``, ``train-postnet``, ``train-nerf``, ``train-emotion``,
  ``onboard``; their modules define it and hand it to the training code's RNGs);
- ``--json`` on ``list``, ``show``, ``render``, ``onboard``: one JSON object (a list for ``list``) on
  stdout and nothing else (progress and logs go to stderr);
- ``--preset`` takes the one vocabulary ``cpu-smoke | cpu-small | gpu-full`` on every command that
  has it (:data:`PRESET_STAGE`; the registry is :mod:`avatar.pipeline.stages`): the parser accepts
  those names (the old ``smoke | cpu | gpu`` with a one-line deprecation warning) and :func:`main`
  hands the command its stage's own preset name (:func:`_unify_presets`).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from pathlib import Path

from avatar import __version__
from avatar.errors import AvatarError
from avatar.logs import configure as configure_logs
from avatar.runtime import check_device, default_device

EX_UNAVAILABLE, EX_SOFTWARE, EX_IOERR, EX_PIPE = 69, 70, 74, 141

#: optional dependencies -> the pyproject extra that installs them: a command that needs one that is
#: missing ends with "pip install 'avatar[EXTRA]'" and exit 69 (EX_UNAVAILABLE) instead of a traceback
OPTIONAL_MODULES = {
    "av": "preprocess",
    "librosa": "preprocess",
    "soundfile": "preprocess",
    "soxr": "preprocess",
    "transformers": "preprocess",
    "matplotlib": "preprocess",
    "grpc": "serve",
    "grpc_health": "serve",
    "grpc_reflection": "serve",
    "prometheus_client": "serve",
    "aiohttp": "web",
    "aiortc": "web",
    "ray": "ray",
    "triton": "cuda",
}

#: modules that provide ``register(subparsers)``; each adds one or more subcommands
COMMAND_MODULES = [
    "avatar.pipeline.preprocess",
    "avatar.motion.commands",
    "avatar.nerf.commands",
    "avatar.pipeline.commands",
    "avatar_service.commands",
    "avatar_recipes.train_emotion",
]


#: subcommands with ``--preset`` -> the training stage whose preset they pass on (avatar.pipeline.stages.STAGE_PRESETS)
PRESET_STAGE = {
    "onboard": "onboard",
    "demo": "onboard",
    "client onboard": "onboard",
    "train-nerf": "nerf",
    "train-generator": "generator",
    "train-postnet": "postnet",
}

#: subcommands that train or render: each takes ``--device`` (see the module docstring)
DEVICE_COMMANDS = frozenset(
    {
        "preprocess",
        "train-generator",
        "train-postnet",
        "eval-motion",
        "train-nerf",
        "eval-nerf",
        "train-emotion",
        "onboard",
        "render",
        "demo",
        "serve",
    }
)


def _leaf_parsers(sub: argparse._SubParsersAction, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    """(``"client render"``-style path, parser) of every subcommand that runs something."""
    out = []
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        out += _leaf_parsers(nested[0], f"{prefix}{name} ") if nested else [(f"{prefix}{name}", p)]
    return out


def _add_missing(p: argparse.ArgumentParser, names: tuple[str, ...], **kwargs) -> None:
    """Add the option strings of ``names`` that ``p`` does not define yet: to the action that defines
    one of them already (``preprocess --quiet`` gains ``-q``), else as a new action."""
    missing = [n for n in names if n not in p._option_string_actions]
    existing = [p._option_string_actions[n] for n in names if n in p._option_string_actions]
    if existing:
        action = existing[0]
        short, long = [n for n in missing if len(n) == 2], [n for n in missing if len(n) > 2]
        action.option_strings = [*short, *action.option_strings, *long]
        for n in missing:
            p._option_string_actions[n] = action
    elif missing:
        p.add_argument(*missing, **kwargs)


def _add_shared_flags(sub: argparse._SubParsersAction) -> None:
    """``-q/--quiet``, ``-v/--verbose`` on every subcommand, ``--device`` on :data:`DEVICE_COMMANDS`.
    Their defaults are suppressed, so a subcommand never overwrites the same flag given before it."""
    for path, p in _leaf_parsers(sub):
        _add_missing(
            p,
            ("-q", "--quiet"),
            dest="quiet",
            action="store_true",
            default=argparse.SUPPRESS,
            help="warnings and errors only (no info logs, no progress where the command shows it)",
        )
        _add_missing(
            p, ("-v", "--verbose"), dest="verbose", action="count", default=argparse.SUPPRESS, help="debug logs"
        )
        if path in DEVICE_COMMANDS:
            _add_missing(
                p,
                ("--device",),
                default=None,
                help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)",
            )


def _completion(args: argparse.Namespace) -> int:
    """``avatar completion bash|zsh|tcsh``: print a shell completion script for the whole command
    tree, generated by ``shtab`` from this parser (so it never drifts from the flags); file
    arguments complete as paths. Install, e.g.: ``avatar completion bash > ~/.local/share/bash-completion/completions/avatar``
    or, for zsh, ``avatar completion zsh > "${fpath[1]}/_avatar"``."""
    import shtab

    parser = build_parser()
    stack = [parser]
    while stack:  # paths (type=Path) complete as files
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack += list(action.choices.values())
            elif action.type is Path:
                action.complete = shtab.FILE  # type: ignore[attr-defined]
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return 0


def _preset_name(name: str) -> str:
    """argparse ``type`` of ``--preset``: the unified name (an old name is accepted with a warning)."""
    from avatar.errors import InvalidInput
    from avatar.pipeline.stages import unified_preset

    try:
        unified, alias = unified_preset(name)
    except InvalidInput as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if alias:
        print(f"warning: preset {name!r} is deprecated; use {unified!r}", file=sys.stderr)
    return unified


def _unify_presets(sub: argparse._SubParsersAction) -> None:
    """Give the ``--preset`` of every :data:`PRESET_STAGE` command the unified names (the subset of
    them its own choices allow) and record its stage, so :func:`main` can hand it the stage's name."""
    from avatar.pipeline.stages import PRESET_HELP, PRESET_NAMES, unified_preset

    for path, p in _leaf_parsers(sub):
        action = p._option_string_actions.get("--preset")
        if path not in PRESET_STAGE or action is None:
            continue
        allowed = {unified_preset(c)[0] for c in (action.choices or PRESET_NAMES)}
        action.choices = [n for n in PRESET_NAMES if n in allowed]
        action.default = unified_preset(action.default)[0] if action.default else action.default
        action.type = _preset_name
        action.metavar = None
        action.help = (
            f"{PRESET_HELP}; default {action.default}"
            if len(action.choices) == len(PRESET_NAMES)
            else f"{', '.join(action.choices)}; default {action.default}"
        )
        p.set_defaults(preset_stage=PRESET_STAGE[path])


def _log_level(args: argparse.Namespace) -> int:
    if args.debug or getattr(args, "verbose", 0):
        return logging.DEBUG
    return logging.WARNING if getattr(args, "quiet", False) else logging.INFO


def build_parser() -> argparse.ArgumentParser:
    """The ``avatar`` parser: every module of :data:`COMMAND_MODULES` that is installed, plus the
    shared flags (module docstring)."""
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
        except ModuleNotFoundError as e:  # an area not installed in this build (the module or its package)
            if not e.name or not (name == e.name or name.startswith(e.name + ".")):
                raise
            continue
        module.register(sub)
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh, tcsh)",
        description="Print a completion script for the avatar command. bash: "
        "`avatar completion bash > ~/.local/share/bash-completion/completions/avatar`; "
        'zsh: `avatar completion zsh > "${fpath[1]}/_avatar"` (then restart the shell).',
    )
    p.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    p.set_defaults(func=_completion)
    _add_shared_flags(sub)
    _unify_presets(sub)
    return parser


def _os_error_message(e: OSError) -> str:
    what = e.strerror or str(e)
    where = f": {e.filename}" if e.filename else ""
    hint = {
        errno.ENOSPC: "free disk space or choose another output location",
        errno.EDQUOT: "free disk space or choose another output location",
        errno.EACCES: "check the permissions or choose another path",
        errno.EPERM: "check the permissions or choose another path",
        errno.EROFS: "choose a writable location",
        errno.ENOTDIR: "a path component is a file, not a directory",
        errno.EISDIR: "give a file path, not a directory",
    }.get(e.errno, "")
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
    # third-party output (mediapipe C++, TF-Lite, torch warnings) only with -v / --debug (avatar/logs.py)
    configure_logs(bool(getattr(args, "verbose", 0)) or args.debug)
    logging.basicConfig(
        level=_log_level(args),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        check_device(getattr(args, "device", None))
        if getattr(args, "preset_stage", None):  # the unified name -> the stage's own preset name
            from avatar.pipeline.stages import stage_preset

            args.preset = stage_preset(args.preset_stage, args.preset)
        with default_device(getattr(args, "device", None)):
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
        missing = (e.name or "").split(".")[0] if isinstance(e, ModuleNotFoundError) else ""
        if missing in OPTIONAL_MODULES or missing == "mediapipe":
            how = (
                "pip install --no-deps mediapipe==0.10.21 (Python <= 3.12; see the Makefile)"
                if missing == "mediapipe"
                else f"pip install 'avatar[{OPTIONAL_MODULES[missing]}]'"
            )
            print(f"error: this command needs `{missing}`, which is not installed: {how}", file=sys.stderr)
            return EX_UNAVAILABLE
        logging.getLogger("avatar").debug("unexpected error", exc_info=True)
        first = str(e).splitlines()[0][:300] if str(e) else ""
        print(
            f"error: unexpected {type(e).__name__}: {first}; rerun with --debug for the traceback and report it",
            file=sys.stderr,
        )
        return EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
