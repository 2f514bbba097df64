"""Atomic output: build in a hidden temp dir/file beside the target, rename at the end.

A crash, Ctrl-C or error never leaves a half-written artifact that looks valid at the target path.
Temp names carry the writer's pid (``.NAME.tmp-<pid>-XXXX``, ``.STEM.<pid>.XXXX.tmp.mp4``) so the
leftovers of a killed process are recognised and removed the next time that output is written
(:func:`clean_stale_temps`), without touching a temp that a live process is still writing.

Permissions: finished outputs get the ordinary modes of the process umask (directories
``0o777 & ~umask``, files ``0o666 & ~umask``; 0755/0644 with the usual umask 022), never the 0700/0600
of ``mkdtemp``/``mkstemp``, so a server running as another user (in the same group, with umask 027)
can read what the CLI wrote.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from avatar.errors import InvalidInput, OutputExists, ResourceLimit

log = logging.getLogger(__name__)

#: temps without a pid in their name (written by older versions) count as stale after this long
LEGACY_STALE_S = 3600.0


def umask() -> int:
    """The process umask (read without changing it for long)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_permissions(root: str | Path) -> None:
    """Give ``root`` (file or tree) the umask's ordinary modes: dirs ``0o777 & ~umask``, files
    ``0o666 & ~umask`` (executable bits of files are kept as the umask allows)."""
    root = Path(root)
    mask = umask()
    dmode, fmode = 0o777 & ~mask, 0o666 & ~mask

    def fix(path: Path, is_dir: bool) -> None:
        mode = dmode if is_dir else fmode | (path.stat().st_mode & 0o111 & ~mask)
        os.chmod(path, mode)

    if root.is_file():
        fix(root, False)
        return
    fix(root, True)
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            fix(Path(dirpath) / d, True)
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                fix(p, False)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(parent: str | Path, name: str) -> list[Path]:
    """Remove the leftovers of killed writers of output ``name`` in ``parent``.

    Matches ``.NAME.tmp-<pid>-*`` / ``.NAME.old-<pid>-*`` (atomic dirs) and
    ``.STEM.<pid>.*.tmp.mp4`` (video files) whose pid is not running, and pid-less temps of older
    versions untouched for :data:`LEGACY_STALE_S`. Returns the removed paths. Never raises.
    """
    parent = Path(parent)
    stem = Path(name).stem
    pats = [
        re.compile(rf"\.{re.escape(name)}\.(?:tmp|old)-(?:(\d+)-)?[^/]*"),
        re.compile(rf"\.{re.escape(stem)}\.(?:(\d+)\.)?[^/]*\.tmp\.mp4"),
    ]
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for p in entries:
        for pat in pats:
            m = pat.fullmatch(p.name)
            if not m:
                continue
            pid = m.group(1)
            try:
                if pid is not None:
                    if int(pid) == os.getpid() or pid_alive(int(pid)):
                        break
                elif now - p.lstat().st_mtime < LEGACY_STALE_S:
                    break
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
                log.info("removed stale temporary %s", p)
            except OSError:
                pass
            break
    return removed


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_writable_parent(out: Path) -> None:
    """Check that ``out`` can be created: no ancestor is a file, the nearest existing one is a
    writable directory.

    Raises:
        InvalidInput: with the reason and what to do.
    """
    for anc in reversed(out.parents):
        if anc.exists() and not anc.is_dir():
            raise InvalidInput(f"cannot write {out}: {anc} is a file, not a directory; choose another output path")
    base = _nearest_existing(out.parent)
    if not os.access(base, os.W_OK | os.X_OK):
        raise InvalidInput(
            f"cannot write {out}: directory {base} is not writable; choose another output path or fix its permissions"
        )


def check_free_space(path: str | Path, need_bytes: int, what: str = "the output") -> None:
    """Fail before the work if the filesystem of ``path`` (or its nearest existing ancestor) has
    less than ``need_bytes`` free.

    Raises:
        ResourceLimit: not enough space (message gives both numbers in MB).
    """
    base = _nearest_existing(Path(path))
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return
    if free < need_bytes:
        raise ResourceLimit(
            f"not enough disk space for {what}: {free / 2**20:.0f} MB free at {base}, "
            f"about {need_bytes / 2**20:.0f} MB needed; free some space or choose another location"
        )


def check_output_file(out: str | Path, need_bytes: int = 0) -> Path:
    """Check an output *file* path before expensive work (``avatar render --out``) and remove the
    leftovers of killed earlier writes of it.

    Raises:
        InvalidInput: ``out`` is a directory, an ancestor is a file, or the directory is not writable.
        ResourceLimit: less than ``need_bytes`` free.
    """
    out = Path(out)
    if out.is_dir():
        raise InvalidInput(f"--out {out} is a directory; give a file path such as {out / 'out.mp4'}")
    if out.name in ("", ".", ".."):
        raise InvalidInput(f"--out {out} is not a file name")
    check_writable_parent(out)
    if need_bytes:
        check_free_space(out.parent, need_bytes, str(out))
    if out.parent.is_dir():
        clean_stale_temps(out.parent, out.name)
    return out


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if ``out`` exists and ``overwrite`` is False, or cannot be created;
    removes the temps of killed earlier writes of ``out``.

    Raises:
        OutputExists: ``out`` exists and overwriting was not requested.
        InvalidInput: ``out`` is a file where a directory is expected, an ancestor is a file, or the
            directory is not writable.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExists(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out} is a file, not a directory; choose another --out")
    check_writable_parent(out)
    if out.parent.is_dir():
        clean_stale_temps(out.parent, out.name)
    return out


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError meaning the disk (or quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory; on clean exit move it to ``out`` (replacing it if ``overwrite``).

    On any exception the temp directory is removed and ``out`` is untouched. The finished
    directory gets the umask's ordinary permissions (:func:`normalize_permissions`).

    Raises:
        OutputExists: ``out`` exists and ``overwrite`` is False.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        normalize_permissions(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield ``PATH.tmp`` to write; on clean exit fsync it and rename it over ``path`` (a reader sees
    the old file or the new one, never a torn one). On any exception the temp file is removed.
    The one atomic single-file writer (model weights, JSON side files, manifests)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
