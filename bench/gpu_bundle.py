"""``make gpu-bundle``: one folder (<= 60 MiB) that checks the GPU path on a bare, offline GPU host.

Contents of ``OUT/`` (default ``gpu_bundle/``, git-ignored)::

    gpu_check.sh      bash gpu_check.sh: installs from wheels/ (no network), runs the CUDA tests and
                      python -m avatar_bench.bench_gpu on data/acosta12_512, prints one table (<= 8 min)
    code/             the repository's tracked avatar/, bench/ (as avatar_bench/, its package name),
                      tests/, pyproject.toml, docs/GPU.md; PYTHONPATH=code, nothing is pip-installed
    data/acosta12_512 the first 12 s of speakers/acosta_cnn_71s.mp4 preprocessed at 512 px (compact
                      dataset: JPEG q95 frames, PNG masks)
    data/acosta3_64   the first 3 s at 64 px (the CUDA tests' dataset, $AVATAR_TEST_DATASET)
    wheels/           what a host with CUDA torch + Triton + numpy + OpenCV lacks to train and render:
                      nerfacc (+ rich and its deps), safetensors, tqdm, PyYAML, platformdirs, ninja
                      (nerfacc's JIT build), pytest (+ deps), pytest-timeout; for CPython 3.11-3.13,
                      manylinux x86_64 (pip download, from PyPI)
    MANIFEST.txt      sizes, the commit, how it was made

The datasets are made here with the preprocessing stack (PyAV, mediapipe); the GPU host needs none of
it. Wheels are cached in ``--wheel-cache`` (default ``.whl/gpu_bundle``) so a rebuild needs no network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

from avatar_bench.bench_dataset import DATA, make_compact_dataset
from avatar_bench.common import commit

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 60 * 2**20
PYTHONS = ("3.11", "3.12", "3.13")
#: pure-Python / abi3 / per-Python wheels a torch+Triton+numpy+OpenCV host lacks (installed with --no-deps
#: semantics resolved here: nerfacc needs rich -> markdown-it-py, mdurl, pygments; pytest needs pluggy,
#: iniconfig, packaging)
WHEELS = (
    "nerfacc==0.5.3",
    "rich",
    "markdown-it-py",
    "mdurl",
    "pygments",
    "typing_extensions",
    "safetensors",
    "tqdm",
    "pyyaml",
    "platformdirs",
    "ninja",
    "pytest",
    "pluggy",
    "iniconfig",
    "packaging",
    "pytest-timeout",
)
CODE = ("avatar", "bench", "tests", "pyproject.toml", "docs/GPU.md", "README.md")
#: installed package name -> repository folder (pyproject [tool.setuptools.package-dir])
PACKAGE_DIR = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]

GPU_CHECK = r"""#!/usr/bin/env bash
# Offline GPU check of the avatar NeRF path (made by `make gpu-bundle`; see code/docs/GPU.md).
#   bash gpu_check.sh                 # MINUTES=2 of training in the bench; PYTHON=python3 by default
#   VENV=none: install into $PYTHON's own environment instead of ./.venv; BENCH_ARGS: extra bench_gpu options;
#   DATASET=data/acosta3_64: the bench's dataset (default data/acosta12_512)
# 1. a venv over the host's site packages (keeps its CUDA torch, Triton, numpy, OpenCV), filled from
#    ./wheels with no network; 2. the CUDA tests (nerfacc's CUDA extension JIT-builds here, or the
#    PyTorch sampler is used and the table says so); 3. bench_gpu on the 12 s 512 px dataset; one table.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
MINUTES="${MINUTES:-2}"
DATASET="${DATASET:-data/acosta12_512}"
cd "$HERE"
mkdir -p results
say() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
t0=$(date +%s)
"$PY" - <<'PYEOF' || { say "no usable torch on this host"; exit 2; }
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PYEOF
if [ "${VENV:-}" = none ]; then
    PYX="$PY"
elif [ -x .venv/bin/python ] || "$PY" -m venv --system-site-packages .venv; then
    PYX="$HERE/.venv/bin/python"
else  # e.g. Debian's python3 without python3-venv: install into the host environment instead
    say "python -m venv failed; installing into $PY's own environment"
    rm -rf .venv
    PYX="$PY"
fi
say "installing from ./wheels (offline)"
"$PYX" -m pip install -q --no-index --find-links wheels nerfacc==0.5.3 safetensors tqdm pyyaml platformdirs ninja \
    pytest pytest-timeout 2>&1 | tail -3
export PYTHONPATH="$HERE/code"
export AVATAR_TEST_DATASET="$HERE/data/acosta3_64"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PYX" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability()) if torch.cuda.is_available() else print("")')}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
cd code
mkdir -p ../results
say "nerfacc CUDA extension (JIT build on first use; needs nvcc)"
timeout 300 "$PYX" - <<'PYEOF' > ../results/nerfacc.log 2>&1
import time
t = time.time()
from avatar.nerf.cuda_sampler import _extension_error
err = _extension_error()
print("nerfacc CUDA extension:", "ok" if err is None else "unavailable (" + err[:200] + ") -> PyTorch sampler",
      f"({time.time() - t:.0f} s)")
raise SystemExit(0 if err is None else 1)
PYEOF
nerfacc_rc=$?
tail -3 ../results/nerfacc.log
if [ "$nerfacc_rc" != 0 ]; then
    say "nerfacc CUDA extension unusable (rc=$nerfacc_rc, 124 = build timed out): the PyTorch sampler is used"
    export AVATAR_NO_NERFACC=1
fi
say "CUDA tests"
timeout 240 "$PYX" -m pytest -q -m cuda -p no:cacheprovider tests/test_nerf_cuda.py tests/test_triton_hashgrid.py \
    tests/test_nerf_encoding.py > ../results/pytest_cuda.log 2>&1
test_rc=$?
tail -15 ../results/pytest_cuda.log
say "bench_gpu (${MINUTES} min of training)"
limit=$("$PYX" -c "print(int(60 * float('$MINUTES')) + 300)")
# shellcheck disable=SC2086
timeout "$limit" "$PYX" -m avatar_bench.bench_gpu --dataset "../$DATASET" --minutes "$MINUTES" ${BENCH_ARGS:-} \
    --results ../results/RESULTS.md --json ../results/bench_gpu.json > ../results/bench_gpu.log 2>&1
bench_rc=$?
tail -5 ../results/bench_gpu.log
cd ..
echo
echo "================ GPU check: $(( $(date +%s) - t0 )) s; pytest -m cuda rc=$test_rc; bench rc=$bench_rc ================"
grep -E "passed|failed|error" results/pytest_cuda.log | tail -1
tail -1 results/nerfacc.log
if [ -s results/RESULTS.md ]; then
    cat results/RESULTS.md
else  # the bench did not finish (e.g. timed out): the rows it printed so far
    echo "(bench_gpu did not finish, rc=$bench_rc; rows measured so far:)"
    grep -E "^  (build|check|encoding|data|train|quality|memory|render|onboard) " results/bench_gpu.log
fi
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
"""


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _copy_code(out: Path) -> None:
    """The tracked files of :data:`CODE` into ``out``, each folder under its package name (pyproject's
    ``package-dir``: ``bench/`` -> ``avatar_bench/``), so ``PYTHONPATH=out`` imports them uninstalled."""
    renames = {folder: name for name, folder in PACKAGE_DIR.items()}
    files = subprocess.run(
        ["git", "ls-files", *CODE], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            top, _, rest = f.partition("/")
            dst = out / (f"{renames[top]}/{rest}" if rest and top in renames else f)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def _download_wheels(cache: Path) -> None:
    """``pip download`` the wheels for each Python of :data:`PYTHONS` into ``cache`` (skips what is there)."""
    cache.mkdir(parents=True, exist_ok=True)
    for py in PYTHONS:
        stamp = cache / f".done-{py}"
        if stamp.exists():
            continue
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            py,
            "--implementation",
            "cp",
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "manylinux_2_17_x86_64",
            "--platform",
            "manylinux_2_28_x86_64",
            "-d",
            str(cache),
            *WHEELS,
        ]
        subprocess.run(cmd, check=True)
        stamp.touch()


def build(out: Path, wheel_cache: Path, video: Path, datasets: Path | None = None) -> int:
    """Write the bundle to ``out`` (replaced); returns its size in bytes.

    Raises:
        RuntimeError: the bundle exceeds :data:`LIMIT_BYTES`.
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _copy_code(out / "code")
    data = out / "data"
    data.mkdir()
    for name, seconds, size in (("acosta12_512", 12.0, 512), ("acosta3_64", 3.0, 64)):
        cached = datasets / name if datasets is not None else None
        if cached is not None and (cached / "manifest.json").is_file():
            shutil.copytree(cached, data / name)
        else:
            print(f"preprocessing {video.name}: {seconds:g} s at {size} px -> {name}", flush=True)
            make_compact_dataset(video, seconds, size, data / name, progress=True)
            if datasets is not None:
                datasets.mkdir(parents=True, exist_ok=True)
                shutil.copytree(data / name, cached)
        shutil.rmtree(data / name / "preview", ignore_errors=True)
    _download_wheels(wheel_cache)
    (out / "wheels").mkdir()
    for w in wheel_cache.glob("*.whl"):
        shutil.copy2(w, out / "wheels" / w.name)
    script = out / "gpu_check.sh"
    script.write_text(GPU_CHECK)
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    parts = {p.name: _du(p) for p in sorted(out.iterdir()) if p.is_dir()}
    total = _du(out)
    lines = [
        f"avatar GPU bundle, commit {commit()}",
        f"total {total / 2**20:.1f} MiB (limit {LIMIT_BYTES / 2**20:.0f} MiB)",
    ]
    lines += [f"  {k}/ {v / 2**20:.1f} MiB" for k, v in parts.items()]
    lines += ["run: bash gpu_check.sh   (MINUTES=2 PYTHON=python3 by default)"]
    (out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if total > LIMIT_BYTES:
        raise RuntimeError(f"bundle is {total / 2**20:.1f} MiB > {LIMIT_BYTES / 2**20:.0f} MiB")
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "gpu_bundle")
    ap.add_argument("--video", type=Path, default=DATA / "speakers" / "acosta_cnn_71s.mp4")
    ap.add_argument("--wheel-cache", type=Path, default=ROOT / ".whl" / "gpu_bundle")
    ap.add_argument(
        "--dataset-cache",
        type=Path,
        default=ROOT / ".whl" / "gpu_bundle_datasets",
        help="reuse/keep the preprocessed datasets here (preprocessing 12 s at 512 px takes minutes)",
    )
    args = ap.parse_args(argv)
    if not args.video.is_file():
        print(f"error: {args.video} not found; pass --video or set AVATAR_TEST_DATA", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        build(args.out, args.wheel_cache, args.video, args.dataset_cache)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
