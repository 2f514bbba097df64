"""GPU benchmark: builds/checks the CUDA path and times every stage that matters for serving.

One run, one table (appended to ``bench/RESULTS.md`` with machine, git commit and date):

- **build**: which hash-grid backends and extensions load here (Triton, tiny-cuda-nn, nerfacc's
  CUDA extension, which JIT-builds on first use) and whether Triton matches the PyTorch backend;
- **encoding**: hash-grid points/s, forward and forward+backward (table + input gradient), for the
  ``torch``, ``triton`` and (if importable) ``tcnn`` backends, on the onboarding preset's head grid;
- **onboard**: wall time of ``avatar.pipeline.onboard.onboard(video, ...)`` (preprocessing
  included) and its per-stage seconds; the shared generator is trained first if none is given
  (timed separately: it is shared by all avatars);
- **train**: NeRF head training steps/s on the onboarded dataset (steady state, after warm-up);
- **memory**: GPU memory per loaded avatar (``torch.cuda.max_memory_allocated`` around
  ``avatar.api.load``), or parameter bytes on CPU;
- **render**: composited head+torso frames/s at 256 and 512 px (batch 1 and batched), and the
  number of concurrent 25 fps streams one device sustains (batched fps / 25).

Usage (on the GPU machine, after ``pip install -e .[cuda]``, see docs/GPU.md)::

    python -m bench.bench_gpu                   # gpu-full preset: hours (onboarding dominates)
    python -m bench.bench_gpu --skip-onboard --store DIR   # reuse an onboarded store (keep_work)
    python -m bench.bench_gpu --quick           # tiny sizes, any device: checks that it runs

All timings are medians of ``--runs`` after a warm-up run (which pays JIT/autotuning).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import commit as _commit
from bench.common import machine as _machine

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AVATAR_TEST_DATA", ROOT.parent / "shared" / "data"))
VIDEO = DATA / "speakers" / "acosta_cnn_71s.mp4"
STREAM_FPS = 25

log = logging.getLogger("bench_gpu")


# ----------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, runs: int, device: torch.device) -> float:
    """Median seconds of ``runs`` calls of ``fn`` after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Table:
    """Rows of (section, item, value, unit, note)."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, section: str, item: str, value, unit: str = "", note: str = "") -> None:
        if isinstance(value, float):
            value = f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        self.rows.append((section, item, str(value), unit, note))
        print(f"  {section:9s} {item:42s} {value!s:>12s} {unit:10s} {note}", flush=True)

    def markdown(self) -> str:
        lines = ["| section | item | value | unit | note |", "|---|---|---:|---|---|"]
        lines += [f"| {' | '.join(r)} |" for r in self.rows]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- build / checks
def check_build(t: Table, device: torch.device) -> dict[str, bool]:
    """Which backends load here; returns {name: usable}."""
    from avatar.nerf import triton_hashgrid as th

    ok = {"torch": True}
    try:
        import triton

        ok["triton"] = th.triton_available(device)
        t.add("build", "triton", triton.__version__, "", "kernels " + ("compiled" if device.type == "cuda"
                                                                         else "run in Triton's interpreter (CPU)"))
    except Exception as e:  # ImportError or a broken install
        ok["triton"] = False
        t.add("build", "triton", "missing", "", f"{type(e).__name__}: {e}"[:80])
    try:
        import tinycudann  # noqa: F401

        ok["tcnn"] = device.type == "cuda"
        t.add("build", "tinycudann", "ok" if ok["tcnn"] else "no GPU", "")
    except Exception as e:
        ok["tcnn"] = False
        t.add("build", "tinycudann", "missing", "", f"{type(e).__name__}: {e}"[:80])
    if device.type == "cuda":
        t0 = time.perf_counter()
        try:
            from nerfacc.cuda._backend import _C

            state = "ok" if _C is not None else "failed to build"
        except Exception as e:
            state = f"failed ({type(e).__name__})"
        t.add("build", "nerfacc CUDA extension", state, "", f"load/JIT build {time.perf_counter() - t0:.0f} s")
    else:
        t.add("build", "nerfacc CUDA extension", "n/a", "", "no GPU: the pure-PyTorch sampler is used")
    return ok


def _grid_cfg(preset: str):
    from avatar.nerf.encoding import HashGridConfig
    from avatar.nerf.presets import get_preset

    g = get_preset(preset).head.grid
    return HashGridConfig(3, g.n_levels, g.n_features_per_level, g.log2_hashmap_size, g.base_resolution,
                          g.finest_resolution)


def bench_encoding(t: Table, device: torch.device, preset: str, n_points: int, runs: int,
                   ok: dict[str, bool]) -> None:
    """Points/s of the hash grid, forward and forward+backward, per backend; checks Triton == torch."""
    from avatar.nerf.encoding import HashGridEncoding
    from avatar.nerf.triton_hashgrid import hashgrid_triton

    cfg = _grid_cfg(preset)
    enc = HashGridEncoding(3, cfg.n_levels, cfg.n_features_per_level, cfg.log2_hashmap_size, cfg.base_resolution,
                           cfg.finest_resolution, backend="torch").to(device)
    with torch.no_grad():
        enc.table.uniform_(-1, 1)
    x = torch.rand(n_points, 3, device=device)
    g = torch.randn(n_points, enc.output_dim, device=device)
    desc = f"{cfg.n_levels}x{cfg.n_features_per_level}, T=2^{cfg.log2_hashmap_size}, B={n_points:,}"

    def torch_fn(xx):
        return enc(xx)

    def triton_fn(xx):
        return hashgrid_triton(xx, enc.table, enc.cfg)

    fns = {"torch": torch_fn}
    if ok.get("triton"):
        fns["triton"] = triton_fn
    if ok.get("tcnn"):
        enc_tcnn = HashGridEncoding(3, cfg.n_levels, cfg.n_features_per_level, cfg.log2_hashmap_size,
                                    cfg.base_resolution, cfg.finest_resolution, backend="tcnn").to(device)
        with torch.no_grad():
            enc_tcnn.table.copy_(enc.table)
        fns["tcnn"] = enc_tcnn

    if "triton" in fns:
        with torch.no_grad():
            diff = (triton_fn(x) - torch_fn(x)).abs().amax(1)
        frac = float((diff > 1e-4).float().mean())
        t.add("check", "triton vs torch: max |diff|", float(diff.max()), "", f"{frac:.1e} of points > 1e-4 (FMA at cell edges)")

    for name, fn in fns.items():
        with torch.no_grad():
            sec = _timed(lambda fn=fn: fn(x), runs, device)
        t.add("encoding", f"{name} forward ({desc})", n_points / sec, "points/s")
        xg = x.clone().requires_grad_(True)
        params = [xg, enc_tcnn.table if name == "tcnn" else enc.table]

        def step(fn=fn, params=params):
            out = fn(params[0])
            torch.autograd.grad(out, params, g)

        sec = _timed(step, runs, device)
        t.add("encoding", f"{name} fwd+bwd, table+x grad", n_points / sec, "points/s")


# ----------------------------------------------------------------------------- pipeline stages
def ensure_generator(t: Table, store, generator: Path | None, quick: bool) -> Path:
    """The shared generator: ``generator`` if given, the store's if trained, else train one (timed)."""
    from recipes.train_generator import train_generator

    if generator is not None:
        return generator
    if (store.generator_dir / "config.json").is_file():
        return store.generator_dir
    preset = "smoke" if quick else "gpu"
    t0 = time.perf_counter()
    train_generator(DATA / "corpus", store.generator_dir, preset=preset, progress=True)
    t.add("onboard", f"shared generator training ({preset})", time.perf_counter() - t0, "s", "once per deployment")
    return store.generator_dir


def bench_onboard(t: Table, store, video: Path, preset: str, generator: Path) -> None:
    from avatar.pipeline.onboard import onboard

    t0 = time.perf_counter()
    onboard(video, "bench", store=store, preset=preset, generator=generator, overwrite=True, keep_work=True)
    total = time.perf_counter() - t0
    stages = store.manifest("bench").get("stage_seconds", {})
    t.add("onboard", f"onboard {video.name} ({preset}), total", total, "s", "preprocessing included")
    for k, v in stages.items():
        t.add("onboard", f"  stage {k}", float(v), "s")


def bench_training(t: Table, dataset: Path, preset: str, steps: int, device: torch.device) -> None:
    """Head NeRF steps/s in the steady state (between the first and last progress callbacks)."""
    from avatar.nerf.trainer import train_nerf

    stamps: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench_nerf_") as tmp:
        train_nerf(dataset, tmp, part="head", preset=preset, steps=steps, progress=False,
                   callback=lambda frac, msg: stamps.append((time.perf_counter(), frac)), device=str(device))
    if len(stamps) < 3:
        t.add("train", f"head steps/s ({preset})", "n/a", "", f"only {len(stamps)} progress callbacks")
        return
    (t0, f0), (t1, f1) = stamps[len(stamps) // 10 or 1], stamps[-1]  # skip the first 10% (warm-up)
    t.add("train", f"head NeRF steps/s ({preset})", (f1 - f0) * steps / max(t1 - t0, 1e-9), "steps/s",
          f"{steps} steps")


def bench_render(t: Table, store, device: torch.device, sizes: tuple[int, ...], batch: int, runs: int) -> None:
    """Memory per loaded avatar and composited render fps; streams per device."""
    from avatar.api import load
    from avatar.data import Dataset
    from avatar.nerf.trainer import landmark_window

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    av = load("bench", store=store, device=str(device))
    nerf = av.models.nerf
    if device.type == "cuda":
        t.add("memory", "GPU memory per loaded avatar (peak)", (torch.cuda.max_memory_allocated(device) - before) / 2**20,
              "MiB", "torch.cuda.max_memory_allocated around avatar.api.load")
    n_bytes = sum(p.numel() * p.element_size() for m in (av.models.generator, av.models.postnet, nerf.head, nerf.torso)
                  if isinstance(m, torch.nn.Module) for p in list(m.parameters()) + list(m.buffers()))
    t.add("memory", "avatar weights (params + buffers)", n_bytes / 2**20, "MiB")

    ds = Dataset(store.work_dir("bench") / "dataset")
    idx = np.arange(min(batch, ds.n_frames))
    win = landmark_window(ds.n_frames, idx, nerf.window)
    lm = torch.from_numpy(np.asarray(ds.lm3d)[win])          # [B, W, 68, 3]
    pose = torch.from_numpy(np.asarray(ds.pose)[idx])       # [B, 4, 4]
    blink = torch.from_numpy(np.asarray(ds.blink)[idx])     # [B]
    for size in sizes:
        best = 0.0
        for b in sorted({1, len(idx)}):
            sec = _timed(lambda b=b: nerf.render(lm[:b], pose[:b], blink[:b], size=size), runs, device)
            fps = b / sec
            best = max(best, fps)
            t.add("render", f"head+torso {size} px, batch {b}", fps, "frames/s", f"{nerf.n_samples} samples/ray, "
                  f"hash grid {_grid_backends(nerf)}")
        t.add("render", f"concurrent {STREAM_FPS} fps streams at {size} px", best / STREAM_FPS, "streams",
              "best fps / 25 (render only; audio->landmarks excluded)")
    # the same render with each other hash-grid backend the encoding module accepts
    b, size = len(idx), sizes[-1]
    for backend in ("torch", "triton", "tcnn"):
        if backend == _grid_backends(nerf) or not _set_grid_backend(nerf, backend, device):
            continue
        sec = _timed(lambda: nerf.render(lm[:b], pose[:b], blink[:b], size=size), runs, device)
        t.add("render", f"head+torso {size} px, batch {b}", b / sec, "frames/s", f"hash grid {backend}")
    _set_grid_backend(nerf, "auto", device)


def _grid_modules(nerf):
    from avatar.nerf.encoding import HashGridEncoding

    mods = [nerf.head] + ([nerf.torso] if nerf.torso is not None else [])
    return [m for root in mods for m in root.modules() if isinstance(m, HashGridEncoding)]


def _grid_backends(nerf) -> str:
    return ",".join(sorted({m.backend for m in _grid_modules(nerf)}))


def _set_grid_backend(nerf, backend: str, device: torch.device) -> bool:
    """Switch every hash grid of ``nerf`` to ``backend`` if this build of the encoding supports it
    (on this device); returns False (and changes nothing) otherwise."""
    from avatar.nerf.encoding import HashGridEncoding

    if backend in ("tcnn", "triton") and device.type != "cuda":
        return False  # tcnn needs CUDA; Triton on CPU is the interpreter (verification only)
    try:
        HashGridEncoding(2, 2, 2, 8, 4, 16, backend=backend)
    except ValueError:
        return False
    for m in _grid_modules(nerf):
        m.backend = backend
    return True


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (cpu-smoke preset); runs on CPU in minutes")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument("--video", type=Path, default=VIDEO, help="speaker video to onboard")
    ap.add_argument("--store", type=Path, default=None, help="avatar store (default: a temp dir, removed)")
    ap.add_argument("--generator", type=Path, default=None, help="shared generator bundle (default: train one)")
    ap.add_argument("--skip-onboard", action="store_true",
                    help="reuse avatar 'bench' (and its work/bench/dataset) already in --store")
    ap.add_argument("--train-steps", type=int, default=None, help="head steps timed for steps/s")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible; use --device cpu --quick", file=sys.stderr)
        return 2
    if args.skip_onboard and args.store is None:
        print("error: --skip-onboard needs --store (the store holding avatar 'bench')", file=sys.stderr)
        return 2
    if not args.skip_onboard and not args.video.is_file():
        print(f"error: video {args.video} not found; pass --video or set AVATAR_TEST_DATA", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    quick = args.quick
    preset = "cpu-smoke" if quick else "gpu-full"
    n_points = (1 << 12 if device.type == "cpu" else 1 << 16) if quick else 1 << 20
    sizes = (64, 128) if quick else (256, 512)
    batch = 2 if quick else 8
    steps = args.train_steps or (40 if quick else 500)

    from avatar.store import AvatarStore

    t = Table()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"bench_gpu: {_machine(device)}; preset {preset}; commit {_commit()}", flush=True)
    tmp = None
    store_root = args.store
    if store_root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_gpu_")
        store_root = Path(tmp.name) / "store"
    store = AvatarStore(store_root)
    try:
        ok = check_build(t, device)
        bench_encoding(t, device, preset, n_points, args.runs, ok)
        if not args.skip_onboard:
            gen = ensure_generator(t, store, args.generator, quick)
            bench_onboard(t, store, args.video, preset, gen)
        bench_training(t, store.work_dir("bench") / "dataset", preset, steps, device)
        bench_render(t, store, device, sizes, batch, args.runs)
    finally:
        if tmp is not None:
            tmp.cleanup()

    header = (f"\n## bench_gpu{' --quick' if quick else ''} ({started})\n\n"
              f"machine: {_machine(device)}; commit {_commit()}; preset {preset}; median of {args.runs} runs "
              f"after a warm-up\n\n")
    with open(args.results, "a") as f:
        f.write(header + t.markdown() + "\n")
    print(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
