"""Third-party log noise, silenced unless verbose (``avatar -v`` or ``AVATAR_VERBOSE=1``).

Why: mediapipe (its graphs log through absl / glog, its models through TF-Lite) writes warnings from
C++ straight to file descriptor 2 ("W0000 ... inference_feedback_manager.cc ...", "Created
TensorFlow Lite XNNPACK delegate"), and torch / transformers emit Python warnings and log records.
None of it is actionable for a user and it buried the real messages of a render (issue 18: a
764 KB log). What is done, unless verbose:

* :func:`configure` (the CLI calls it first; importing this module applies the environment part):
  ``GLOG_minloglevel=2``, ``TF_CPP_MIN_LOG_LEVEL=3`` and ``ABSL_MIN_LOG_LEVEL=2`` in the
  environment (read by the native libraries when they load, and inherited by worker processes),
  absl's Python logger at ERROR, Python warnings raised inside third-party packages ignored, and
  the log records of a few chatty packages at WARNING or above. A value the user set is kept.
* :func:`quiet_native`: a context manager that points fd 2 at ``/dev/null`` for its body (the
  face trackers wrap graph creation, each ``process`` call and ``close`` in it) and always restores
  it, also on exceptions. It is re-entrant and thread-safe (one redirection while any thread is
  inside), and keeps the window short: Python's own messages (progress bars, log lines) written
  between two frames are not affected.

Verbose mode (``AVATAR_VERBOSE=1``, set by ``avatar -v`` / ``--debug`` so spawned workers inherit
it) leaves everything as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator

ENV_VERBOSE = "AVATAR_VERBOSE"

#: environment read by native libraries when they load: glog/absl (mediapipe) and TF-Lite
QUIET_ENV = {"GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "3", "ABSL_MIN_LOG_LEVEL": "2"}

#: packages whose Python warnings are hidden unless verbose (regex on the warning's module)
QUIET_WARNING_MODULES = r"(torch|mediapipe|google\.protobuf|absl|transformers|librosa|nerfacc|av)(\.|$)"

#: Python loggers of third-party packages held at WARNING (absl: ERROR) unless verbose
QUIET_LOGGERS = ("transformers", "torch", "matplotlib", "PIL", "numba", "urllib3", "mediapipe")

_set_by_us: set[str] = set()
_lock = threading.Lock()
_depth = 0
_saved_fd: int | None = None


def verbose() -> bool:
    """True when third-party output is kept (``$AVATAR_VERBOSE`` set to anything but ``""``/``0``)."""
    return os.environ.get(ENV_VERBOSE, "") not in ("", "0")


def _apply_env() -> None:
    for k, v in QUIET_ENV.items():
        if k not in os.environ:
            os.environ[k] = v
            _set_by_us.add(k)


def configure(verbose_: bool = False) -> None:
    """Set the process's third-party logging: quiet (default) or everything (``verbose_=True``).

    Verbose sets ``$AVATAR_VERBOSE=1`` (inherited by worker processes) and removes the quieting
    environment variables this module set (not the user's). Call before mediapipe / torch do real
    work; the environment part only takes effect for libraries not yet loaded. Never raises.
    """
    if verbose_:
        os.environ[ENV_VERBOSE] = "1"
        for k in list(_set_by_us):
            os.environ.pop(k, None)
        _set_by_us.clear()
        return
    if verbose():  # AVATAR_VERBOSE=1 from the environment wins
        return
    _apply_env()
    warnings.filterwarnings("ignore", module=QUIET_WARNING_MODULES)
    for name in QUIET_LOGGERS:
        lg = logging.getLogger(name)
        if lg.level < logging.WARNING:
            lg.setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_native() -> Iterator[None]:
    """Send file descriptor 2 to ``/dev/null`` for the body, unless :func:`verbose`.

    For native libraries that write to stderr themselves (mediapipe's C++ graph, TF-Lite). The
    original descriptor is restored when the outermost body exits, normally or by an exception.
    Other threads' stderr output is dropped while a body runs: keep bodies short (one call).
    Without a usable fd 2 (closed, or a test runner without one) it does nothing.
    """
    global _depth, _saved_fd
    if verbose():
        yield
        return
    with _lock:
        if _depth == 0:
            _saved_fd = _redirect()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved_fd is not None:
                try:
                    os.dup2(_saved_fd, 2)
                finally:
                    os.close(_saved_fd)
                    _saved_fd = None


def _redirect() -> int | None:
    """Point fd 2 at /dev/null; returns a duplicate of the old fd 2 (None when there is none)."""
    try:
        sys.stderr.flush()  # what Python buffered goes out before the swap
    except (AttributeError, OSError, ValueError):
        pass
    try:
        saved = os.dup(2)
    except OSError:
        return None
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
    except OSError:
        os.close(saved)
        return None
    return saved


if not verbose():
    _apply_env()
