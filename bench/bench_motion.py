"""Benchmark audio-to-motion: generator inference speed (seconds of audio per second of compute),
postnet and LLE speed, and the CPU preset training time.

    .venv/bin/python -m avatar_bench.bench_motion [--generator DIR] [--runs 5] [--threads 1]
    .venv/bin/python -m avatar_bench.bench_motion --train-corpus ../shared/data/corpus   # also time training

Without ``--generator`` a randomly initialised model of the CPU preset's size is timed (speed does
not depend on the weights). With ``--train-corpus`` the CPU preset is trained (minutes) into a temp
dir and its wall time (preprocessing + SyncNet + generator) is reported; otherwise the training
time recorded in the ``--generator`` bundle's metrics.json is shown (if any).
Prints a table and appends it to ``bench/RESULTS.md`` (machine, git commit, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from avatar_bench.common import append_results, markdown_table
from avatar_bench.common import commit as _commit
from avatar_bench.common import machine as _machine

ROOT = Path(__file__).resolve().parents[1]


def _median_time(fn, runs: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _random_generator(device: str):
    from avatar.motion.bundle import MotionStats
    from avatar.motion.generator import Audio2Motion, VAEFlowGenerator
    from avatar.motion.syncnet import LandmarkSyncNet
    from avatar.motion.train import PRESETS

    cfg = PRESETS["cpu"]
    torch.manual_seed(0)
    net = VAEFlowGenerator(replace(cfg.generator, feature_dim=80))
    stats = MotionStats("mel", [0.0] * 80, [1.0] * 80, [0.0] * 204, [0.01] * 204)
    return Audio2Motion(net, stats, LandmarkSyncNet(replace(cfg.syncnet, feature_dim=80)), device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", type=Path, default=None, help="generator bundle (default: random CPU-preset model)")
    ap.add_argument("--postnet", type=Path, default=None, help="postnet bundle (default: random)")
    ap.add_argument("--seconds", type=float, default=60.0, help="audio length per inference run, seconds")
    ap.add_argument("--runs", type=int, default=5, help="timed runs (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-corpus", type=Path, default=None, help="also time CPU-preset training on this corpus")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from avatar.motion.generator import load_generator
    from avatar.motion.lle import lle_project
    from avatar.motion.postnet import CNNPostNet, Postnet, PostnetConfig, load_postnet

    gen = load_generator(args.generator, device=args.device) if args.generator else _random_generator(args.device)
    n = int(args.seconds * 25)
    rng = np.random.default_rng(0)
    feats = (
        rng.standard_normal((2 * n, gen.stats.feature_dim)) * np.asarray(gen.stats.feature_std)
        + np.asarray(gen.stats.feature_mean)
    ).astype(np.float32)
    rows = []
    for chunk in (1000, 200):
        t = _median_time(lambda: gen.predict(feats, seed=0, chunk_frames=chunk), args.runs)
        rows.append(
            {
                "stage": f"generator (chunk {chunk} frames)",
                "audio_s": f"{args.seconds:.0f}",
                "median_s": f"{t:.3f}",
                "x_realtime": f"{args.seconds / t:.1f}",
            }
        )
    expr = gen.predict(feats, seed=0)
    pn = (
        load_postnet(args.postnet, device=args.device)
        if args.postnet
        else Postnet(CNNPostNet(PostnetConfig()), gen.stats.expr_mean, gen.stats.expr_std, args.device)
    )
    t = _median_time(lambda: pn.apply(expr), args.runs)
    rows.append(
        {
            "stage": "postnet",
            "audio_s": f"{args.seconds:.0f}",
            "median_s": f"{t:.3f}",
            "x_realtime": f"{args.seconds / t:.1f}",
        }
    )
    ref = expr[:1600] + rng.standard_normal(expr[:1600].shape).astype(np.float32) * 0.01
    t = _median_time(lambda: lle_project(expr, ref, k=10, blend=0.25), args.runs)
    rows.append(
        {
            "stage": "LLE (K=10, 1600 ref frames)",
            "audio_s": f"{args.seconds:.0f}",
            "median_s": f"{t:.3f}",
            "x_realtime": f"{args.seconds / t:.1f}",
        }
    )

    if args.train_corpus:
        from avatar_recipes.train_generator import train_generator

        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = train_generator(args.train_corpus, Path(tmp) / "gen", preset="cpu", progress=False)
            total = time.perf_counter() - t0
            m = json.loads((out / "metrics.json").read_text())
        rows.append(
            {
                "stage": "train cpu preset (preprocess+train)",
                "audio_s": f"{m['train_frames'] / 25:.0f}",
                "median_s": f"{total:.0f}",
                "x_realtime": "-",
            }
        )
        rows.append(
            {
                "stage": "  of which SyncNet+generator",
                "audio_s": "",
                "median_s": f"{m['train_seconds']:.0f}",
                "x_realtime": "-",
            }
        )
    elif args.generator and (args.generator / "metrics.json").is_file():
        m = json.loads((args.generator / "metrics.json").read_text())
        rows.append(
            {
                "stage": f"train {json.loads((args.generator / 'config.json').read_text())['train']['preset']} preset "
                f"(SyncNet+generator, from metrics.json)",
                "audio_s": f"{m['train_frames'] / 25:.0f}",
                "median_s": f"{m['train_seconds']:.0f}",
                "x_realtime": "-",
            }
        )

    cols = list(rows[0])
    table = markdown_table(rows, cols)
    print(table)
    model = f"bundle {args.generator}" if args.generator else "random CPU-preset-size generator"
    header = (
        f"\n## bench_motion: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, commit {_commit()}\n\n"
        f"Machine: {_machine()}; {torch.get_num_threads()} torch thread(s), device {args.device}. {model}. "
        f"Median of {args.runs} runs after a warm-up; x_realtime = seconds of audio per second of compute. "
        f"Machine load at start: {os.getloadavg()[0]:.1f}.\n\n"
    )
    append_results(header + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
