"""NeRF throughput: hash-grid encoding, head field, training steps, rendering frames/s.

Rows (median of ``--runs`` after one warm-up run):

- ``encoding``: points/s of ``HashGridEncoding`` (3-D, 16 levels x 2, T = 2^19, 16..2048), forward +
  backward (table and input gradients), batch 65,536; ``--compile`` adds a ``torch.compile`` row
  and reports the compile time;
- ``head field``: points/s of the whole head field (grids + ambient + MLPs), fwd + bwd, batch 65,536;
- ``train step``: steps/s of the head trainer on a dataset (``--dataset``; skipped without one);
- ``render``: frames/s of ``AvatarNerf.render`` at 128, 256, 512 px (head + torso + compositing)
  with a trained model (``--model``, e.g. ``avatar train-nerf`` output) or a freshly initialised
  one with all occupancy cells occupied (worst case: no empty-space skipping).

Usage::

    python -m avatar_bench.bench_nerf [--runs 3] [--dataset DS] [--model DIR] [--preset cpu-small] [--device cuda]

Prints a table and appends it to ``bench/RESULTS.md`` (machine, git commit, date).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from avatar.runtime import resolve_device
from avatar_bench.common import append_results

ROOT = Path(__file__).resolve().parents[1]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, runs: int, dev: torch.device) -> float:
    fn()
    _sync(dev)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_encoding(dev, runs: int, compile_: bool) -> list[tuple[str, str, str]]:
    from avatar.nerf.encoding import HashGridEncoding

    rows = []
    enc = HashGridEncoding(dim=3, n_levels=16, log2_hashmap_size=19, base_resolution=16, finest_resolution=2048).to(dev)
    x = torch.rand(65536, 3, device=dev, requires_grad=True)

    def step(e=enc):
        y = e(x)
        y.sum().backward()

    t = _median_time(step, runs, dev)
    rows.append(
        (
            "encoding fwd+bwd (65,536 x 3-D)",
            f"{65536 / t / 1e3:.1f} k points/s",
            f"backend {'tcnn' if enc._use_tcnn(x) else 'torch'}",
        )
    )
    if compile_:
        cenc = torch.compile(enc)
        t0 = time.perf_counter()
        step(cenc)
        _sync(dev)
        tc = time.perf_counter() - t0
        t = _median_time(lambda: step(cenc), runs, dev)
        rows.append(("encoding fwd+bwd, torch.compile", f"{65536 / t / 1e3:.1f} k points/s", f"compile {tc:.1f} s"))
    return rows


def bench_field(dev, runs: int, preset: str) -> list[tuple[str, str, str]]:
    from avatar.nerf.fields import HeadField
    from avatar.nerf.presets import get_preset

    cfg = get_preset(preset)
    field = HeadField(cfg.head, 100, torch.tensor([-2.0, -2, -2, 2, 2, 2])).to(dev)
    n = 65536
    x = torch.rand(n, 3, device=dev) * 4 - 2
    d = torch.nn.functional.normalize(torch.randn(n, 3, device=dev), dim=-1)
    cond = torch.randn(n, cfg.head.cond_dim, device=dev)
    code = torch.zeros(n, cfg.head.ind_dim, device=dev)

    def step():
        s, c, a = field(x, d, cond, code)
        (s.sum() + c.sum() + a.sum()).backward()

    t = _median_time(step, runs, dev)
    return [(f"head field fwd+bwd ({preset})", f"{n / t / 1e3:.1f} k points/s", "batch 65,536")]


def bench_train(dev, runs: int, preset: str, dataset: str | None) -> list[tuple[str, str, str]]:
    if not dataset:
        return []
    from avatar.data.dataset import Dataset
    from avatar.nerf.presets import get_preset
    from avatar.nerf.datamanager import Scene
    from avatar.nerf.model import build_head
    from avatar.nerf.trainer import _head_step, _make_optimizer, _update_grid

    cfg = get_preset(preset)
    scene = Scene(Dataset(dataset), cfg, dev)
    head = build_head(cfg, len(scene.train), scene.aabb).to(dev)
    scene.init_head_stats(head)
    opt = _make_optimizer(head, cfg)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    t = cfg.train
    head.train()
    _update_grid(head, scene, rng, -(-t.occ_warmup // t.occ_every) * t.occ_every)  # the first scheduled update

    def steps():
        for _ in range(5):
            loss, _ = _head_step(head, scene, rng, gen, 100, 1000)
            opt.zero_grad()
            loss.backward()
            opt.step()

    t = _median_time(steps, runs, dev) / 5
    rays = cfg.train.frames_per_step * cfg.train.rays_per_frame
    return [
        (
            f"head train step ({preset})",
            f"{1 / t:.2f} steps/s",
            f"{rays} rays x {cfg.train.n_samples} samples, size {scene.size}",
        )
    ]


def bench_render(dev, runs: int, preset: str, model: str | None) -> list[tuple[str, str, str]]:
    from avatar.data.dataset import Intrinsics
    from avatar.nerf.inference import AvatarNerf, load_nerf
    from avatar.nerf.model import build_head, build_torso
    from avatar.nerf.presets import get_preset

    if model:
        nerf = load_nerf(model, device=str(dev))
        note = f"trained model {Path(model).name}"
        lm = nerf.head.field.cond_net.lm3d_mean
    else:
        cfg = get_preset(preset)
        lm = torch.zeros(68, 3)
        head = build_head(cfg, 10, torch.tensor([-1.5, -1.5, -1.5, 1.5, 1.5, 1.5]))
        nerf = AvatarNerf(
            head,
            build_torso(cfg, 10, 512),
            512,
            Intrinsics(1200.0, 1200.0, 256.0, 256.0),
            0.09,
            cfg.head.window,
            device=dev,
            n_samples=cfg.train.n_samples,
        )
        note = f"untrained {preset}, all cells occupied (worst case)"
    pose = torch.eye(4, device=dev)[None]
    pose[0, 2, 3] = 0.75
    if model:
        pose = pose.clone()
    win = lm.to(dev)[None, None].expand(1, nerf.window, 68, 3)
    rows = []
    for size in (128, 256, 512):
        t = _median_time(lambda: nerf.render(win, pose, size=size), max(1, runs if size < 512 else 1), dev)
        rows.append((f"render {size}x{size}", f"{1 / t:.2f} frames/s", note))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dataset", default=None, help="dataset for the training-step row")
    ap.add_argument("--model", default=None, help="train-nerf output for the rendering rows (real occupancy)")
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--device", default=None)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile of the encoding")
    ap.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    rows = bench_encoding(dev, args.runs, args.compile)
    rows += bench_field(dev, args.runs, args.preset)
    rows += bench_train(dev, args.runs, args.preset, args.dataset)
    rows += bench_render(dev, args.runs, args.preset, args.model)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "?"
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "no GPU"
    machine = (
        f"{platform.node() or 'host'} {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {gpu}"
    )
    lines = [
        f"\n## bench_nerf ({datetime.date.today()}, commit {commit})\n",
        f"Machine: {machine}. Median of {args.runs} runs.\n",
        "| what | result | notes |",
        "|---|---|---|",
    ] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        append_results(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
