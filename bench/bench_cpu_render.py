"""CPU rendering under contention (issues 12 and 18): frames/s of ``AvatarNerf.render`` with the thread
settings of :mod:`avatar.runtime` vs torch's defaults, alone and next to one busy process.

Each configuration runs in a fresh process (OpenMP reads ``OMP_WAIT_POLICY`` once, at start):

- ``runtime``: what every stage does now (``configure_threads()``: threads = usable CPUs, idle
  OpenMP threads sleep: ``OMP_WAIT_POLICY=PASSIVE``);
- ``spin``: the same thread count with OpenMP's default spin-waiting (``OMP_WAIT_POLICY=ACTIVE``,
  what torch did before);
- ``1 thread`` (``AVATAR_THREADS=1``, the documented override).

Each is timed alone and while one other process burns a core (a Python busy loop), interleaved in
one run, so ratios are comparable even on a shared machine. Rendering: ``--frames`` frames at
``--size`` px, one at a time (streaming) and in batches of ``--batch``.

Usage::

    python -m avatar_bench.bench_cpu_render --model DIR [--size 128] [--frames 12] [--batch 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from avatar_bench.common import RESULTS, append_results, commit, machine, markdown_table

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time, os
import avatar.runtime
import numpy as np, torch
from avatar.nerf import load_nerf
from avatar.runtime import configure_threads
model, size, frames, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
configure_threads()  # what every stage calls (AVATAR_THREADS, affinity, quota)
nerf = load_nerf(model, device="cpu")
W = nerf.window
g = torch.Generator().manual_seed(0)
lm = nerf.head.field.cond_net.lm3d_mean[None, None].expand(frames, W, 68, 3).clone()
lm += 0.01 * torch.randn(lm.shape, generator=g)
pose = torch.eye(4).repeat(frames, 1, 1)
info = json.load(open(os.path.join(model, "head", "config.json")))
pose[:] = torch.tensor(np.load(os.path.join(info["dataset"], "pose.npy"))[:frames])
nerf.render(lm[:1], pose[:1], size=size)  # warm-up
t = time.perf_counter()
for i in range(frames):
    nerf.render(lm[i:i + 1], pose[i:i + 1], size=size)
one = frames / (time.perf_counter() - t)
t = time.perf_counter()
for i in range(0, frames, batch):
    nerf.render(lm[i:i + batch], pose[i:i + batch], size=size)
bat = frames / (time.perf_counter() - t)
print(json.dumps({"one": one, "batched": bat, "threads": torch.get_num_threads()}))
"""

CONFIGS = {
    "runtime": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin": {"OMP_WAIT_POLICY": "ACTIVE"},
    "1 thread": {"OMP_WAIT_POLICY": "PASSIVE", "AVATAR_THREADS": "1"},
}


def _run(model: str, size: int, frames: int, batch: int, cfg: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "AVATAR_THREADS")}
    env.update(cfg, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", WORKER, model, str(size), str(frames), str(batch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="avatar train-nerf output (head/ [torso/])")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = []
    res: dict[tuple[str, str], dict] = {}
    for name, cfg in CONFIGS.items():
        for load in ("alone", "1 busy process"):
            busy = None
            if load != "alone":
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.5)
            try:
                r = _run(args.model, args.size, args.frames, args.batch, cfg)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            res[(name, load)] = r
            print(name, load, r, flush=True)
    for name in CONFIGS:
        a, b = res[(name, "alone")], res[(name, "1 busy process")]
        rows.append(
            {
                "threads": f"{name} ({a['threads']})",
                "alone: 1 / batched (fps)": f"{a['one']:.2f} / {a['batched']:.2f}",
                "1 busy process: 1 / batched (fps)": f"{b['one']:.2f} / {b['batched']:.2f}",
                "slowdown (batched)": f"{a['batched'] / max(b['batched'], 1e-9):.2f}x",
            }
        )
    table = markdown_table(rows, list(rows[0]))
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"\n## bench_cpu_render ({started})\n\nmachine: {machine()}; commit {commit()}. Model {args.model} "
        f"rendered at {args.size} px, {args.frames} frames one at a time and in batches of {args.batch}; each "
        f"row a fresh process, alone and next to one busy-loop process, interleaved in one run (the machine "
        f"is shared: compare ratios within this table).\n\n{table}\n"
    )
    print(text)
    append_results(text, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
