"""CLI: ``avatar train-nerf`` and ``avatar eval-nerf``."""

from __future__ import annotations

import argparse
import json

from avatar.nerf.presets import PRESETS


def _train(args: argparse.Namespace) -> int:
    from avatar.nerf.trainer import train_nerf

    train_nerf(
        args.dataset,
        args.out,
        part=args.part,
        preset=args.preset,
        steps=args.steps,
        seed=args.seed,
        overwrite=args.overwrite,
        device=args.device,
        progress=not getattr(args, "quiet", False),
    )
    print(args.out)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from avatar.nerf.evaluate import evaluate_nerf, fidelity_table

    m = evaluate_nerf(
        args.dataset,
        args.model,
        out=args.out,
        max_frames=args.max_frames,
        device=args.device,
        progress=not getattr(args, "quiet", False),
    )
    # the table for people, the metrics (without the evaluated frame list) for scripts with --json
    print(json.dumps({k: v for k, v in m.items() if k != "frames"}, indent=2) if args.json else fidelity_table(m))
    return 0


def register(subparsers) -> None:
    """Add ``train-nerf`` and ``eval-nerf`` to the ``avatar`` command."""
    p = subparsers.add_parser(
        "train-nerf",
        help="train the head and torso NeRFs of a dataset",
        description="Train the person's head NeRF, then the torso NeRF on the frozen head (GeneFace/RAD-NeRF "
        "design on hash grids). Writes OUT/head and OUT/torso (model.safetensors, config.json, "
        "metrics.json, TensorBoard runs/). Checkpoints every few hundred steps: rerun the same "
        "command after an interruption to resume; finished parts are kept unless --overwrite.",
    )
    p.add_argument("dataset", help="dataset directory written by `avatar preprocess`")
    p.add_argument("--out", required=True, help="output directory (created; resumed if it holds a checkpoint)")
    p.add_argument(
        "--part",
        choices=["head", "torso", "all"],
        default="all",
        help="what to train (torso needs OUT/head); default: all",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu-small",
        help="cpu-smoke (seconds, tests), cpu-small (~9 min on 2 idle cores at 128 px), gpu-full; default: cpu-small",
    )
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per part (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); runs are deterministic per seed")
    p.add_argument("--overwrite", action="store_true", help="retrain parts that are already finished")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda when available)")
    p.set_defaults(func=_train)

    e = subparsers.add_parser(
        "eval-nerf",
        help="PSNR/SSIM of trained NeRFs on the validation frames",
        description="Render the dataset's validation tail from its tracked landmarks and poses and report PSNR and "
        "SSIM on the full frame, face box and mouth box, beside three baselines (frozen last training frame, "
        "mean training frame, background plate). With --out: metrics.json, table.txt, side_by_side.mp4 "
        "(ground truth | render), PNGs.",
    )
    e.add_argument("dataset", help="dataset directory written by `avatar preprocess`")
    e.add_argument("--model", required=True, help="directory written by `avatar train-nerf` (holds head/ [torso/])")
    e.add_argument("--out", default=None, help="directory for metrics.json, side_by_side.mp4 and PNGs")
    e.add_argument(
        "--max-frames", type=int, default=None, help="evaluate at most this many validation frames (evenly spaced)"
    )
    e.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    e.add_argument(
        "--json",
        action="store_true",
        help="print the metrics as JSON instead of the table "
        "(the full metrics, with the evaluated frames, are in OUT/metrics.json)",
    )
    e.set_defaults(func=_eval)
