"""GPU benchmark on a preprocessed dataset: one call measures what serving and onboarding need.

``python -m avatar_bench.bench_gpu --dataset DIR --minutes M`` (no video, no preprocessing: a dataset made by
``avatar preprocess`` anywhere, e.g. on a CPU host, copied over) reports in one table (printed, and
appended to ``bench/RESULTS.md`` with machine, git commit and date):

- **build**: which hash-grid backends and extensions load here (Triton, tiny-cuda-nn, nerfacc's CUDA
  extension, which JIT-builds on first use; its build time) and Triton vs PyTorch agreement;
- **encoding**: hash-grid points/s, forward and forward+backward (table + input gradient), per
  backend (``torch``, ``triton``, ``tcnn`` when importable) on the preset's head grid;
- **data**: dataset size on disk and the one-time decode of its frames;
- **train**: head then torso NeRF (``gpu-full``) for a fixed wall time (2/3 and 1/3 of ``--minutes``):
  steps/s in the steady state, peak GPU memory, validation PSNR (full frame, face box) on the
  dataset's validation tail after that time;
- **render**: GPU memory per loaded avatar, composited head+torso frames/s at 256 and 512 px
  (batch 1 and batched, per hash-grid backend) and concurrent 25 fps streams per device (best fps / 25);
- **onboard**: extrapolated ``gpu-full`` onboarding time of 5 minutes of video: preprocessing at the
  rate recorded in the dataset's manifest (measured where the dataset was made) + the preset's head
  and torso steps at the measured steps/s.

Usage::

    python -m avatar_bench.bench_gpu --dataset DIR --minutes 4     # on the GPU host (see docs/GPU.md, gpu_check.sh)
    python -m avatar_bench.bench_gpu --dataset DIR --quick         # tiny preset/sizes on any device (tests, CPU)

Timings are medians of ``--runs`` after a warm-up run (which pays JIT/autotuning).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from avatar.runtime import resolve_device
from avatar_bench.common import commit as _commit
from avatar_bench.common import RESULTS
from avatar_bench.common import machine as _machine

STREAM_FPS = 25
ONBOARD_MINUTES = 5.0

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
        t.add(
            "build",
            "triton",
            triton.__version__,
            "",
            "kernels " + ("compiled" if device.type == "cuda" else "run in Triton's interpreter (CPU)"),
        )
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
        from avatar.nerf.cuda_sampler import _extension_error

        t0 = time.perf_counter()
        err = _extension_error()  # the check the renderer/trainer use (honours AVATAR_NO_NERFACC)
        state = "ok" if err is None else "unavailable: PyTorch sampler"
        t.add(
            "build",
            "nerfacc CUDA extension",
            state,
            "",
            f"load/JIT build {time.perf_counter() - t0:.0f} s" + ("" if err is None else f"; {err}"[:100]),
        )
    else:
        t.add("build", "nerfacc CUDA extension", "n/a", "", "no GPU: the pure-PyTorch sampler is used")
    return ok


def _grid_cfg(preset: str):
    from avatar.nerf.grid import HashGridConfig
    from avatar.nerf.presets import get_preset

    return HashGridConfig.of(get_preset(preset).head.grid, 3)


def bench_encoding(t: Table, device: torch.device, preset: str, n_points: int, runs: int, ok: dict[str, bool]) -> None:
    """Points/s of the hash grid, forward and forward+backward, per backend; checks Triton == torch."""
    from avatar.nerf.encoding import HashGridEncoding
    from avatar.nerf.triton_hashgrid import hashgrid_triton

    cfg = _grid_cfg(preset)
    enc = HashGridEncoding(
        3,
        cfg.n_levels,
        cfg.n_features_per_level,
        cfg.log2_hashmap_size,
        cfg.base_resolution,
        cfg.finest_resolution,
        backend="torch",
    ).to(device)
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
        enc_tcnn = HashGridEncoding(
            3,
            cfg.n_levels,
            cfg.n_features_per_level,
            cfg.log2_hashmap_size,
            cfg.base_resolution,
            cfg.finest_resolution,
            backend="tcnn",
        ).to(device)
        with torch.no_grad():
            enc_tcnn.table.copy_(enc.table)
        fns["tcnn"] = enc_tcnn

    if "triton" in fns:
        with torch.no_grad():
            diff = (triton_fn(x) - torch_fn(x)).abs().amax(1)
        frac = float((diff > 1e-4).float().mean())
        t.add(
            "check",
            "triton vs torch: max |diff|",
            float(diff.max()),
            "",
            f"{frac:.1e} of points > 1e-4 (FMA at cell edges)",
        )

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


# ----------------------------------------------------------------------------- training / quality / render
def bench_data(t: Table, dataset: Path) -> None:
    """Dataset size and the one-time decode of its frames + masks (what the trainer does at start)."""
    from avatar.data import Dataset

    ds = Dataset(dataset)
    size = ds.nbytes_on_disk()
    minutes = ds.n_frames / 25 / 60
    t.add(
        "data",
        f"dataset {ds.n_frames} frames at {ds.size} px",
        size / 2**20,
        "MiB",
        f"{size / 2**20 / minutes * ONBOARD_MINUTES:,.0f} MiB per {ONBOARD_MINUTES:g} min; frames "
        f"{ds.manifest.get('encoding', {}).get('frames', {}).get('codec', '?')}",
    )
    t0 = time.perf_counter()
    ds.frames.decode_all()
    ds.masks.decode_all()
    sec = time.perf_counter() - t0
    t.add("data", "decode all frames + masks once", ds.n_frames / sec, "frames/s", f"{sec:.1f} s")


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_train(t: Table, dataset: Path, out: Path, preset: str, seconds: float, device: torch.device) -> dict:
    """Head then torso NeRF for ``2/3`` and ``1/3`` of ``seconds``; returns {part: steps/s}."""
    from avatar.nerf.presets import get_preset
    from avatar.nerf.trainer import train_nerf

    cfg = get_preset(preset)
    rates = {}
    for part, share, planned in (("head", 2 / 3, cfg.train.head_steps), ("torso", 1 / 3, cfg.train.torso_steps)):
        stamps: list[tuple[float, float]] = []
        _peak_reset(device)
        t0 = time.perf_counter()
        train_nerf(
            dataset,
            out,
            part=part,
            preset=preset,
            progress=False,
            device=str(device),
            overwrite=True,
            max_seconds=seconds * share,
            callback=lambda frac, msg: stamps.append((time.perf_counter(), frac)),
        )
        wall = time.perf_counter() - t0
        done = json.loads((out / part / "metrics.json").read_text())["steps"]
        if len(stamps) >= 3:
            (a, fa), (b, fb) = stamps[len(stamps) // 10 or 1], stamps[-1]  # skip the first 10% (warm-up)
            rate = (fb - fa) * planned / max(b - a, 1e-9)
        else:
            rate = done / max(wall, 1e-9)
        rates[part] = rate
        note = f"{done} steps in {wall:.0f} s (incl. decode, warm-up, save)"
        t.add("train", f"{part} NeRF steps/s ({preset})", rate, "steps/s", note)
        if device.type == "cuda":
            t.add("train", f"{part} training peak GPU memory", torch.cuda.max_memory_allocated(device) / 2**30, "GiB")
    return rates


@torch.no_grad()
def bench_quality(t: Table, dataset: Path, out: Path, device: torch.device, max_frames: int) -> None:
    """Validation PSNR (full frame and face box, tracked landmarks + poses of the validation tail)."""
    from avatar.data import Dataset
    from avatar.nerf import load_nerf
    from avatar.nerf.evaluate import psnr
    from avatar.nerf.datamanager import face_box, landmark_window

    ds = Dataset(dataset)
    nerf = load_nerf(out, device=str(device))
    nerf.set_background(np.asarray(ds.background))
    val = np.asarray(ds.val_range)
    val = val[np.unique(np.linspace(0, len(val) - 1, min(max_frames, len(val))).round().astype(int))]
    win = landmark_window(ds.n_frames, val, nerf.window)
    lm, pose, blink = (torch.from_numpy(np.asarray(a)[i]) for a, i in ((ds.lm3d, win), (ds.pose, val), (ds.blink, val)))
    full, face = [], []
    for j in range(0, len(val), 4):
        imgs = nerf.render(lm[j : j + 4], pose[j : j + 4], blink[j : j + 4]).cpu().numpy()
        for k, f in enumerate(val[j : j + 4]):
            gt = ds.frames[int(f)]
            x0, y0, x1, y1 = face_box(np.asarray(ds.lm2d[f]), ds.size)
            full.append(psnr(imgs[k], gt))
            face.append(psnr(imgs[k][y0:y1, x0:x1], gt[y0:y1, x0:x1]))
    t.add(
        "quality",
        "validation PSNR, full frame",
        float(np.mean(full)),
        "dB",
        f"{len(val)} frames of the tail, after the timed training",
    )
    t.add("quality", "validation PSNR, face box", float(np.mean(face)), "dB")


def bench_render(
    t: Table,
    dataset: Path,
    out: Path,
    device: torch.device,
    sizes: tuple[int, ...],
    batch: int,
    runs: int,
    compile_: bool = False,
) -> float:
    """Memory per loaded avatar, composited render fps per size and batch; returns the best fps at the
    largest size."""
    from avatar.data import Dataset
    from avatar.nerf import load_nerf
    from avatar.nerf.datamanager import landmark_window

    _peak_reset(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    nerf = load_nerf(out, device=str(device))
    if device.type == "cuda":
        t.add(
            "memory",
            "GPU memory per loaded avatar (peak)",
            (torch.cuda.max_memory_allocated(device) - before) / 2**20,
            "MiB",
            "torch.cuda.max_memory_allocated around load_nerf",
        )
    n_bytes = sum(
        p.numel() * p.element_size()
        for m in (nerf.head, nerf.torso)
        if m is not None
        for p in list(m.parameters()) + list(m.buffers())
    )
    t.add("memory", "NeRF weights (params + buffers)", n_bytes / 2**20, "MiB")
    ds = Dataset(dataset)
    nerf.set_background(np.asarray(ds.background))
    idx = np.arange(min(batch, ds.n_frames))
    win = landmark_window(ds.n_frames, idx, nerf.window)
    lm = torch.from_numpy(np.asarray(ds.lm3d)[win]).to(device)  # [B, W, 68, 3]
    pose = torch.from_numpy(np.asarray(ds.pose)[idx]).to(device)  # [B, 4, 4]
    blink = torch.from_numpy(np.asarray(ds.blink)[idx]).to(device)  # [B]
    best = 0.0
    for size in sizes:
        best = 0.0
        for b in sorted({1, len(idx)}):
            sec = _timed(lambda b=b: nerf.render(lm[:b], pose[:b], blink[:b], size=size), runs, device)
            best = max(best, b / sec)
            t.add(
                "render",
                f"head+torso {size} px, batch {b}",
                b / sec,
                "frames/s",
                f"{nerf.n_samples} samples/ray, hash grid {_grid_backends(nerf)}",
            )
        t.add(
            "render",
            f"concurrent {STREAM_FPS} fps streams at {size} px",
            best / STREAM_FPS,
            "streams",
            "best fps / 25 (render only; audio->landmarks excluded)",
        )
    b, size = len(idx), sizes[-1]
    for backend in ("torch", "triton", "tcnn"):
        if backend == _grid_backends(nerf) or not _set_grid_backend(nerf, backend, device):
            continue
        sec = _timed(lambda: nerf.render(lm[:b], pose[:b], blink[:b], size=size), runs, device)
        t.add("render", f"head+torso {size} px, batch {b}", b / sec, "frames/s", f"hash grid {backend}")
    _set_grid_backend(nerf, "auto", device)
    if compile_:
        try:
            t0 = time.perf_counter()
            nerf.compile()
            nerf.render(lm[:b], pose[:b], blink[:b], size=size)
            _sync(device)
            ct = time.perf_counter() - t0
            sec = _timed(lambda: nerf.render(lm[:b], pose[:b], blink[:b], size=size), runs, device)
            t.add(
                "render",
                f"head+torso {size} px, batch {b}, torch.compile",
                b / sec,
                "frames/s",
                f"compile + first render {ct:.0f} s",
            )
        except Exception as e:  # a compiler failure must not cost the rest of the table
            t.add(
                "render",
                f"head+torso {size} px, batch {b}, torch.compile",
                "failed",
                "",
                f"{type(e).__name__}: {e}"[:100],
            )
    return best


def onboarding_estimate(t: Table, dataset: Path, preset: str, rates: dict) -> None:
    """Extrapolated onboarding of ``ONBOARD_MINUTES`` of video with ``preset``."""
    from avatar.data import Dataset
    from avatar.nerf.presets import get_preset

    ds = Dataset(dataset)
    cfg = get_preset(preset)
    frames = ONBOARD_MINUTES * 60 * 25
    pre = ds.manifest.get("elapsed_s")
    pre_s = pre / ds.n_frames * frames if pre else None
    head_s = cfg.train.head_steps / max(rates["head"], 1e-9)
    torso_s = cfg.train.torso_steps / max(rates["torso"], 1e-9)
    if pre_s is not None:
        t.add(
            "onboard",
            f"preprocess {ONBOARD_MINUTES:g} min of video",
            pre_s / 60,
            "min",
            f"dataset's own rate ({pre:.0f} s for {ds.n_frames} frames, on the host that made it)",
        )
    t.add("onboard", f"head NeRF, {cfg.train.head_steps:,} steps", head_s / 60, "min", "at the measured steps/s")
    t.add("onboard", f"torso NeRF, {cfg.train.torso_steps:,} steps", torso_s / 60, "min", "at the measured steps/s")
    total = head_s + torso_s + (pre_s or 0.0)
    t.add(
        "onboard",
        f"{preset} onboarding of {ONBOARD_MINUTES:g} min (extrapolated)",
        total / 60,
        "min",
        "preprocess + head + torso (postnet: seconds)"
        if pre_s is not None
        else "NeRFs only (no preprocessing time in the manifest)",
    )


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
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dataset", type=Path, required=True, help="preprocessed dataset directory (avatar preprocess)")
    ap.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall time of head + torso training (default 6, or 0.1 with --quick)",
    )
    ap.add_argument("--quick", action="store_true", help="cpu-smoke preset and tiny sizes; runs on CPU in seconds")
    ap.add_argument("--preset", default=None, help="NeRF preset (default gpu-full, or cpu-smoke with --quick)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument(
        "--runs", type=int, default=None, help="timed runs per measurement (median; default 3, 1 with --quick)"
    )
    ap.add_argument("--batch", type=int, default=None, help="frames per batched render (default 8, 2 with --quick)")
    ap.add_argument("--out", type=Path, default=None, help="keep the trained NeRFs here (default: a temp dir)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append to")
    ap.add_argument("--no-results", action="store_true", help="print only; do not append to --results")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--compile", action="store_true", help="also time the render with torch.compile'd fields")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible; use --device cpu --quick", file=sys.stderr)
        return 2
    if not (args.dataset / "manifest.json").is_file():
        print(
            f"error: {args.dataset} is not a dataset (no manifest.json); make one with `avatar preprocess`",
            file=sys.stderr,
        )
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    quick = args.quick
    preset = args.preset or ("cpu-smoke" if quick else "gpu-full")
    minutes = args.minutes if args.minutes is not None else (0.1 if quick else 6.0)
    runs = args.runs or (1 if quick else 3)
    batch = args.batch or (2 if quick else 8)
    n_points = (1 << 12 if device.type == "cpu" else 1 << 16) if quick else 1 << 20
    from avatar.data import Dataset

    S = Dataset(args.dataset).size
    sizes = (max(16, S // 2), S) if quick else (256, 512)

    t = Table()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"bench_gpu: {_machine(device)}; preset {preset}; {minutes:g} min training; commit {_commit()}", flush=True)
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_gpu_")
        out = Path(tmp.name)
    try:
        ok = check_build(t, device)
        bench_encoding(t, device, preset, n_points, runs, ok)
        bench_data(t, args.dataset)
        rates = bench_train(t, args.dataset, out, preset, minutes * 60, device)
        bench_quality(t, args.dataset, out, device, max_frames=4 if quick else 16)
        bench_render(t, args.dataset, out, device, sizes, batch, runs, compile_=args.compile)
        onboarding_estimate(t, args.dataset, preset, rates)
    finally:
        if tmp is not None:
            tmp.cleanup()

    header = (
        f"\n## bench_gpu{' --quick' if quick else ''} ({started})\n\n"
        f"machine: {_machine(device)}; commit {_commit()}; preset {preset}; dataset {args.dataset.name} "
        f"({S} px); {minutes:g} min of training; median of {runs} runs after a warm-up\n\n"
    )
    print("\n" + header + t.markdown())
    if args.json is not None:
        args.json.write_text(
            json.dumps([dict(zip(("section", "item", "value", "unit", "note"), r)) for r in t.rows], indent=1) + "\n"
        )
    if not args.no_results:
        with open(args.results, "a") as f:
            f.write(header + t.markdown() + "\n")
        print(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
