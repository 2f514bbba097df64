"""Atomic directory output: build in a hidden temp dir beside the target, rename at the end.

A crash, Ctrl-C or error never leaves a half-written artifact that looks valid at the target path.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from avatar.errors import OutputExists


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if ``out`` exists and ``overwrite`` is False.

    Raises:
        OutputExists: ``out`` exists and overwriting was not requested.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExists(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory; on clean exit move it to ``out`` (replacing it if ``overwrite``).

    On any exception the temp directory is removed and ``out`` is untouched.

    Raises:
        OutputExists: ``out`` exists and ``overwrite`` is False.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
