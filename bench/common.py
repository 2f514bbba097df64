"""Shared bench helpers: machine description, git commit, appending to ``bench/RESULTS.md``."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

#: the repository checkout (an editable install); in a wheel install this is site-packages
ROOT = Path(__file__).resolve().parents[1]
#: the checkout's ``bench/RESULTS.md``; a wheel does not ship it (pyproject ``exclude-package-data``),
#: so an installed ``python -m avatar_bench.…`` appends to ``RESULTS.md`` in the working directory
RESULTS = Path(__file__).resolve().with_name("RESULTS.md")
if not RESULTS.is_file():
    RESULTS = Path("RESULTS.md")


def machine(device=None) -> str:
    """One line: host, CPU model, core count, torch (+CUDA) version and the GPU if one is used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
        gpu = torch.cuda.get_device_name(device if use_cuda and device is not None else 0) if use_cuda else "no GPU"
        cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
        tv = f", torch {torch.__version__}{cuda}"
    except ImportError:
        gpu, tv = "no GPU", ""
    return f"{platform.node()} ({cpu}, {os.cpu_count()} CPUs{tv}, {gpu})"


def commit() -> str:
    """Short git commit of the checkout, or ``unknown``."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_results(text: str, path: Path = RESULTS) -> None:
    """Append a markdown section to ``bench/RESULTS.md``."""
    with open(path, "a") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def markdown_table(rows: list[dict[str, str]], cols: list[str]) -> str:
    """A padded markdown table of ``rows`` (dicts of strings) with columns ``cols``."""
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]

    def line(vals):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"

    return "\n".join(
        [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line([r[c] for c in cols]) for r in rows]
    )
