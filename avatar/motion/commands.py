"""CLI: ``avatar train-generator``, ``avatar train-postnet``, ``avatar eval-motion``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _train_generator(args: argparse.Namespace) -> int:
    from recipes.train_generator import train_generator

    out = train_generator(args.corpus, args.out, preset=args.preset, features=args.features, hubert=args.hubert,
                          overwrite=args.overwrite, steps=args.steps)
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"generator bundle: {out}  (syncnet val acc {metrics['syncnet_val_acc']:.3f}, "
          f"val mouth LMD {metrics['val_mouth_lmd']:.4f}, {metrics['train_seconds']:.0f} s)")
    return 0


def _train_postnet(args: argparse.Namespace) -> int:
    from avatar.motion.postnet import train_postnet

    out = train_postnet(args.dataset, args.generator, args.out, preset=args.preset, corpus_cache=args.corpus_cache,
                        overwrite=args.overwrite)
    m = json.loads((out / "metrics.json").read_text())
    print(f"postnet bundle: {out}  (val mouth LMD {m['generator_val_mouth_lmd']:.4f} -> {m['val_mouth_lmd']:.4f}, "
          f"checkpoint step {m['best_step']})")
    return 0


def _eval_motion(args: argparse.Namespace) -> int:
    from avatar.data.dataset import Dataset
    from avatar.media import load_audio
    from avatar.motion.generator import load_generator
    from avatar.motion.metrics import evaluate_audio, evaluate_motion, format_table

    gen = load_generator(args.generator)
    report: dict = {}
    if args.dataset:
        r = evaluate_motion(gen, args.dataset, postnet=args.postnet, lle_blend=args.lle_blend,
                            temperature=args.temperature, seed=args.seed)
        report["self_driven"] = r
        rows = {k: v for k, v in r.items() if isinstance(v, dict) and k != "tracked"}
        rows["tracked (reference)"] = {"sync_conf": r["tracked"]["sync_conf"]}
        print(f"self-driven, validation tail of {args.dataset} ({r['frames']} frames)")
        print(format_table(rows, ["mouth_lmd", "lmd", "mouth_lmd_px", "lmd_px", "mouth_open_r", "sync_conf"]))
    if args.audio:
        mean = Dataset(args.dataset).lm3d_mean if args.dataset else None
        rows = {}
        for wav in args.audio:
            rows[Path(wav).name] = evaluate_audio(gen, load_audio(wav), postnet=args.postnet, temperature=args.temperature,
                                                  seed=args.seed, lm3d_mean=mean)
        rows["digital silence (3 s)"] = evaluate_audio(gen, np.zeros(48000, np.float32), postnet=args.postnet,
                                                       temperature=args.temperature, seed=args.seed, lm3d_mean=mean)
        report["audio"] = rows
        print("\ndriving audio (no ground truth)")
        print(format_table(rows, ["seconds", "sync_conf", "open_energy_r", "open_mean", "open_std", "motion"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def register(subparsers) -> None:
    """Add ``train-generator``, ``train-postnet`` and ``eval-motion`` to the ``avatar`` CLI."""
    p = subparsers.add_parser(
        "train-generator", help="train the shared audio2motion generator + landmark SyncNet on a corpus",
        description="Preprocess every clip of CORPUS_DIR (mp4 with audio, or mp4 + same-named wav) into "
                    "OUT/cache (resumable; failing clips are skipped with a warning), train the landmark SyncNet, "
                    "then the GeneFace VAE+flow generator, and write the bundle atomically into OUT.")
    p.add_argument("corpus", type=Path, metavar="CORPUS_DIR", help="directory of talking-head clips")
    p.add_argument("--out", type=Path, required=True, help="generator bundle directory")
    p.add_argument("--preset", default="cpu", choices=["smoke", "cpu", "gpu"],
                   help="cpu: small model, ~10-15 min on 2 cores for the sample corpus; gpu: GeneFace sizes and schedule")
    p.add_argument("--features", default="mel", choices=["mel", "hubert"], help="audio features (default mel)")
    p.add_argument("--hubert", default=None, help="local HuBERT model directory (needed for --features hubert)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's generator steps")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in --out")
    p.set_defaults(func=_train_generator)

    p = subparsers.add_parser(
        "train-postnet", help="train a person's postnet (domain adaptation of the generator)",
        description="Train the residual CNN postnet + frame discriminator on the person's dataset (paired) and "
                    "the corpus (unpaired); the checkpoint is chosen on the validation tail (mouth LMD + sync).")
    p.add_argument("dataset", type=Path, metavar="DATASET", help="the person's dataset (avatar preprocess output)")
    p.add_argument("--generator", type=Path, required=True, help="generator bundle directory")
    p.add_argument("--out", type=Path, required=True, help="postnet bundle directory")
    p.add_argument("--corpus-cache", type=Path, default=None,
                   help="directory of corpus datasets (default: GENERATOR/cache when present)")
    p.add_argument("--preset", default="cpu", choices=["smoke", "cpu", "gpu"], help="training preset (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in --out")
    p.set_defaults(func=_train_postnet)

    p = subparsers.add_parser(
        "eval-motion", help="print audio-to-motion metrics (LMD, mouth-opening r, SyncNet confidence)",
        description="Self-driven metrics on a dataset's validation tail (generator, +postnet, +LLE) and/or "
                    "metrics on arbitrary driving audio (SyncNet confidence, mouth opening vs audio energy).")
    p.add_argument("--generator", type=Path, required=True, help="generator bundle directory")
    p.add_argument("--dataset", type=Path, default=None, help="the person's dataset")
    p.add_argument("--postnet", type=Path, default=None, help="postnet bundle directory")
    p.add_argument("--audio", nargs="*", default=[], help="driving audio files (any format/rate)")
    p.add_argument("--lle-blend", type=float, default=0.25, help="blend of the LLE variant (0 = skip)")
    p.add_argument("--temperature", type=float, default=1.0, help="generator sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    p.set_defaults(func=_eval_motion)
