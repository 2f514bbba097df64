"""Process-level runtime settings shared by every stage: how many CPUs this process may really use,
and torch / OpenCV thread pools sized to match.

Why: torch sizes its intra-op pool from the machine's core count and its OpenMP threads busy-wait
(spin) between parallel regions. On a shared machine (other processes, a CPU affinity mask, a
container CPU quota) that oversubscribes the cores: a head NeRF step ran 5-20x slower while one
other process used a core (measured; issues 12 and 18). The fix is
to size the pools from what the process may use (``os.sched_getaffinity`` and the cgroup CPU
quota, like ``os.process_cpu_count`` in Python 3.13 plus the quota) and to let idle OpenMP threads
sleep (``OMP_WAIT_POLICY=PASSIVE``, read by libgomp when torch is first imported).

Every stage entry point (NeRF trainer, renderer, preprocess, generator training) calls
:func:`configure_threads`; it is idempotent and cheap. ``AVATAR_THREADS=N`` overrides the count.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: OMP_WAIT_POLICY below must be set before it loads
    import torch

log = logging.getLogger(__name__)

ENV_THREADS = "AVATAR_THREADS"

# OpenMP reads this once, when libgomp initialises (first `import torch`); setting it here only
# helps if this module is imported before torch, which `avatar/cli.py` and the stage modules do
# through `avatar.runtime` being imported early. An explicit user setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_configured: int | None = None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_dirs(root: Path, proc_cgroup: str | None) -> list[Path]:
    """Candidate cgroup directories of this process, innermost first (v2 unified, then v1 cpu)."""
    dirs: list[Path] = []
    for line in (proc_cgroup or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, rel = parts
        rel = rel.lstrip("/")
        if hid == "0" and controllers == "":
            dirs += [root / rel, root / "unified" / rel]
        elif "cpu" in controllers.split(","):
            for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                dirs.append(root / name / rel)
    dirs += [root, root / "cpu", root / "cpu,cpuacct"]
    return dirs


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | None = None) -> float | None:
    """CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when unlimited / unknown.

    Reads cgroup v2 ``cpu.max`` (``"QUOTA PERIOD"`` or ``"max PERIOD"``) and cgroup v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota ``-1`` = unlimited) of the cgroup named in
    ``/proc/self/cgroup``, falling back to the hierarchy root. ``root`` and ``proc_cgroup`` (the
    text of ``/proc/self/cgroup``) exist for tests. Never raises: unreadable files mean "unknown".
    """
    root = Path(root)
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup"))
    for d in _cgroup_dirs(root, proc_cgroup):
        v2 = _read(d / "cpu.max")
        if v2 is not None:
            fields = v2.split()
            if len(fields) >= 1 and fields[0] != "max":
                try:
                    period = float(fields[1]) if len(fields) > 1 else 100_000.0
                    return float(fields[0]) / period
                except ValueError:
                    return None
            return None
        quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            try:
                q, p = float(quota), float(period)
            except ValueError:
                return None
            return q / p if q > 0 and p > 0 else None
    return None


def usable_cpus() -> int:
    """CPUs this process may really use: ``$AVATAR_THREADS`` if set (>= 1), else
    ``min(len(os.sched_getaffinity(0)), ceil(cgroup quota), $OMP_NUM_THREADS if set)``, at least 1.

    Raises:
        ValueError: ``$AVATAR_THREADS`` is set but not a positive integer.
    """
    env = os.environ.get(ENV_THREADS, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"{ENV_THREADS}={env!r} is not an integer; unset it or pass a thread count >= 1") from None
        if n < 1:
            raise ValueError(f"{ENV_THREADS}={env!r}: need a thread count >= 1")
        return n
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:  # an explicit OpenMP setting is an upper bound
        n = min(n, int(omp))
    return max(1, n)


def configure_threads(n: int | None = None) -> int:
    """Size torch's intra-op pool (and OpenCV's) to ``n`` threads (default :func:`usable_cpus`).

    Idempotent; returns the thread count in force. The inter-op pool is set to the same count the
    first time only (torch allows that once, before any parallel work; later attempts are skipped).
    """
    global _configured
    import torch

    n = int(n) if n is not None else usable_cpus()
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if _configured is None:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # already set, or parallel work already ran: keep torch's
            pass
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass
    if _configured != n:
        log.debug("thread pools: %d (affinity/quota/%s)", n, ENV_THREADS)
    _configured = n
    return n


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op CPU threads (0 = the CPUs this process may use, see
    :func:`usable_cpus`; any n is capped at that count)."""
    import torch

    old = torch.get_num_threads()
    configure_threads(min(n, usable_cpus()) if n > 0 else None)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------
# device selection: the one place that turns a user's ``--device`` / config value into a device


#: the process default set by :func:`default_device` (the ``avatar`` command's ``--device``); None = auto
_default_device: str | None = None


@contextlib.contextmanager
def default_device(device: str | None) -> Iterator[None]:
    """Within the block, :func:`resolve_device` turns ``None`` / ``""`` / ``"auto"`` into ``device``
    instead of "CUDA when available". The ``avatar`` command wraps every subcommand in it with the
    subcommand's ``--device``, so a stage that picks its own device follows the flag. ``None`` or
    ``"auto"`` leaves the choice automatic. Process-wide (not per thread); restored on exit."""
    global _default_device
    old = _default_device
    _default_device = None if device in (None, "", "auto") else str(device)
    try:
        yield
    finally:
        _default_device = old


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device for ``device``: ``None``, ``""`` or ``"auto"`` mean the :func:`default_device`
    when one is set, else CUDA when available, else the CPU; anything else is passed to
    :class:`torch.device` (unchecked; see :func:`check_device`)."""
    import torch

    if device is None or (isinstance(device, str) and device in ("", "auto")):
        if _default_device is not None:
            return torch.device(_default_device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(device: str | None) -> None:
    """Check a ``--device`` value before any work: a torch device string whose backend exists here
    (``None`` passes: the command picks with :func:`resolve_device`).

    Raises:
        InvalidInput: unparsable device, CUDA/MPS requested but unavailable, or a CUDA index beyond
            the visible GPUs.
    """
    if device is None:
        return
    import torch

    from avatar.errors import InvalidInput

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise InvalidInput(f"unknown --device {device!r} ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput(
                f"--device {device}: CUDA is not available on this machine (no GPU, driver or CUDA "
                "build of torch); use --device cpu or omit --device"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInput(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidInput(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InvalidInput(f"--device {device}: unsupported device type {dev.type!r}; use cpu or cuda")


__all__ = ["cgroup_cpu_limit", "check_device", "configure_threads", "cpu_threads", "resolve_device", "usable_cpus"]
