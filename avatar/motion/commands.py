"""CLI: ``avatar train-generator``, ``avatar train-postnet``, ``avatar eval-motion``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _train_generator(args: argparse.Namespace) -> int:
    from avatar_recipes.train_generator import train_generator

    out = train_generator(
        args.corpus,
        args.out,
        preset=args.preset,
        features=args.features,
        hubert=args.hubert,
        overwrite=args.overwrite,
        steps=args.steps,
        model=args.model,
        seed=args.seed,
        future=args.future,
        progress=not getattr(args, "quiet", False),
    )
    m = json.loads((out / "metrics.json").read_text())
    print(
        f"generator bundle: {out} ({m.get('model', 'vae-flow')}, {m['train_seconds']:.0f} s)\n"
        f"  held-out mouth-opening r {m['val_open_r']:.3f} (Pearson r of predicted vs real lip opening; 0 = no "
        f"lip-sync, 1 = perfect)\n  held-out mouth LMD {m['val_mouth_lmd']:.4f} vs {m['val_mean_shape_mouth_lmd']:.4f} "
        f"for the constant mean shape (lower is better; equal means the mouth does not follow the audio)"
    )
    return 0


def _train_postnet(args: argparse.Namespace) -> int:
    from avatar.motion.postnet import train_postnet

    out = train_postnet(
        args.dataset,
        args.generator,
        args.out,
        preset=args.preset,
        corpus_cache=args.corpus_cache,
        overwrite=args.overwrite,
        seed=args.seed,
        progress=not getattr(args, "quiet", False),
    )
    m = json.loads((out / "metrics.json").read_text())
    print(
        f"postnet bundle: {out}  (val mouth LMD {m['generator_val_mouth_lmd']:.4f} -> {m['val_mouth_lmd']:.4f}, "
        f"checkpoint step {m['best_step']})"
    )
    return 0


def _eval_motion(args: argparse.Namespace) -> int:
    from avatar.data.dataset import Dataset
    from avatar.media import load_audio
    from avatar.motion.generator import load_generator
    from avatar.motion.metrics import evaluate_audio, evaluate_motion, format_table

    gen = load_generator(args.generator)
    report: dict = {}
    if args.dataset:
        r = evaluate_motion(
            gen,
            args.dataset,
            postnet=args.postnet,
            lle_blend=args.lle_blend,
            temperature=args.temperature,
            seed=args.seed,
        )
        report["self_driven"] = r
        rows = {k: v for k, v in r.items() if isinstance(v, dict) and k != "tracked"}
        rows["tracked (reference)"] = {"sync_conf": r["tracked"]["sync_conf"]}
        print(f"self-driven, validation tail of {args.dataset} ({r['frames']} frames)")
        print(format_table(rows, ["mouth_lmd", "lmd", "mouth_lmd_px", "lmd_px", "mouth_open_r", "sync_conf"]))
    if args.clips:
        report["clips"] = _eval_clips(gen, args)
    if args.audio:
        mean = Dataset(args.dataset).lm3d_mean if args.dataset else None
        rows = {}
        for wav in args.audio:
            rows[Path(wav).name] = evaluate_audio(
                gen, load_audio(wav), postnet=args.postnet, temperature=args.temperature, seed=args.seed, lm3d_mean=mean
            )
        rows["digital silence (3 s)"] = evaluate_audio(
            gen,
            np.zeros(48000, np.float32),
            postnet=args.postnet,
            temperature=args.temperature,
            seed=args.seed,
            lm3d_mean=mean,
        )
        report["audio"] = rows
        print("\ndriving audio (no ground truth)")
        print(format_table(rows, ["seconds", "sync_conf", "open_energy_r", "open_mean", "open_std", "motion"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _clip_datasets(paths: list[Path], cache: Path, gen) -> list[Path]:
    """Dataset dirs for ``paths`` (dataset dirs as they are; videos and directories of videos are
    preprocessed into ``cache``, 128 px, once)."""
    from avatar_recipes.train_generator import prepare_corpus

    out = []
    for p in paths:
        if (p / "manifest.json").is_file():
            out.append(p)
        elif p.is_dir():
            out += prepare_corpus(p, cache, gen.feature_kind, gen.hubert_path, progress=False)[0]
        else:
            import shutil
            import tempfile

            with tempfile.TemporaryDirectory() as one:
                shutil.copy2(p, Path(one) / p.name)
                if p.with_suffix(".wav").is_file() and p.suffix != ".wav":
                    shutil.copy2(p.with_suffix(".wav"), Path(one) / p.with_suffix(".wav").name)
                out += prepare_corpus(Path(one), cache, gen.feature_kind, gen.hubert_path, progress=False)[0]
    return out


def _eval_clips(gen, args: argparse.Namespace) -> dict:
    """Whole-clip lip-sync of speakers (videos or datasets) next to the baselines; prints a table."""
    import tempfile

    from avatar.motion.metrics import evaluate_clip, format_table, silence_check

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        rows = {}
        for d in _clip_datasets(args.clips, cache, gen):
            r = evaluate_clip(gen, d, postnet=args.postnet, part=args.part)
            r.update(silence_check(gen, d, postnet=args.postnet))
            rows[d.name[:40]] = r
    keys = [
        "frames",
        "open_r",
        "energy_r",
        "mouth_lmd",
        "mean_shape_mouth_lmd",
        "lmd_ratio",
        "open_std_ratio",
        "silence_z",
    ]
    rows_mean = {k: float(np.nanmean([r[k] for r in rows.values()])) for k in keys}
    table = dict(rows)
    table["mean"] = rows_mean
    print(
        f"whole-clip lip-sync ({args.part}): open_r = Pearson r of predicted vs real mouth opening; energy_r = the "
        "audio-energy baseline's r; lmd_ratio = mouth LMD / the constant mean shape's (< 1 beats it); silence_z = "
        "|opening on digital silence - the person's quiet frames| / their std (<= 1 is right)"
    )
    print(format_table(table, keys))
    return {"per_clip": rows, "mean": rows_mean}


def register(subparsers) -> None:
    """Add ``train-generator``, ``train-postnet`` and ``eval-motion`` to the ``avatar`` CLI."""
    p = subparsers.add_parser(
        "train-generator",
        help="train the shared audio2motion generator + landmark SyncNet on a corpus",
        description="Preprocess every clip of CORPUS_DIR (mp4 with audio, or mp4 + same-named wav) into "
        "OUT/cache (resumable; failing clips are skipped with a warning), train the landmark SyncNet, "
        "then the audio2motion model (tcn by default, or GeneFace's VAE+flow), and write the bundle "
        "atomically into OUT.",
    )
    p.add_argument(
        "corpus",
        type=Path,
        nargs="+",
        metavar="CORPUS_DIR",
        help="directories of talking-head clips (several are pooled)",
    )
    p.add_argument(
        "--model",
        default=None,
        choices=["tcn", "vae-flow"],
        help="audio2motion model (default tcn: generalises to unseen speakers; vae-flow: GeneFace's "
        "VAE with flow prior, which needs an LRS3-sized corpus)",
    )
    p.add_argument("--out", type=Path, required=True, help="generator bundle directory")
    p.add_argument(
        "--preset",
        default="cpu-small",
        choices=["cpu-smoke", "cpu-small", "gpu-full"],
        help="cpu-small: small model, ~10-15 min on 2 cores for the sample corpus; gpu-full: GeneFace sizes "
        "and schedule (the CLI maps these names to the generator's own presets, avatar.pipeline.stages)",
    )
    p.add_argument("--features", default="mel", choices=["mel", "hubert"], help="audio features (default mel)")
    p.add_argument("--hubert", default=None, help="local HuBERT model directory (needed for --features hubert)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's generator steps")
    p.add_argument(
        "--future",
        type=int,
        default=None,
        metavar="FRAMES",
        help="tcn: frames (40 ms) of future audio a frame's motion may depend on (default: the "
        "symmetric receptive field, 12); 4 keeps the lip-sync and lets avatars built on it "
        "stream with 0.28 s of lookahead (docs/WEB.md)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); runs are deterministic per seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in --out")
    p.set_defaults(func=_train_generator)

    p = subparsers.add_parser(
        "train-postnet",
        help="train a person's postnet (domain adaptation of the generator)",
        description="Train the residual CNN postnet + frame discriminator on the person's dataset (paired) and "
        "the corpus (unpaired); the checkpoint is chosen on the validation tail (mouth LMD + sync).",
    )
    p.add_argument("dataset", type=Path, metavar="DATASET", help="the person's dataset (avatar preprocess output)")
    p.add_argument("--generator", type=Path, required=True, help="generator bundle directory")
    p.add_argument("--out", type=Path, required=True, help="postnet bundle directory")
    p.add_argument(
        "--corpus-cache",
        type=Path,
        default=None,
        help="directory of corpus datasets (default: GENERATOR/cache when present)",
    )
    p.add_argument(
        "--preset",
        default="cpu-small",
        choices=["cpu-smoke", "cpu-small", "gpu-full"],
        help="training preset (default cpu-small)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); runs are deterministic per seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in --out")
    p.set_defaults(func=_train_postnet)

    p = subparsers.add_parser(
        "eval-motion",
        help="print audio-to-motion metrics (LMD, mouth-opening r, SyncNet confidence)",
        description="Self-driven metrics on a dataset's validation tail (generator, +postnet, +LLE) and/or "
        "metrics on arbitrary driving audio (SyncNet confidence, mouth opening vs audio energy).",
    )
    p.add_argument(
        "--generator", type=Path, required=True, help="generator bundle directory (or an avatar's generator/)"
    )
    p.add_argument("--dataset", type=Path, default=None, help="the person's dataset")
    p.add_argument("--postnet", type=Path, default=None, help="postnet bundle directory")
    p.add_argument("--audio", nargs="*", default=[], help="driving audio files (any format/rate)")
    p.add_argument(
        "--clips",
        nargs="*",
        type=Path,
        default=[],
        help="talking clips of speakers the generator never saw (videos, directories of videos, or "
        "datasets): whole-clip mouth-opening r and mouth LMD next to the energy and mean-shape "
        "baselines",
    )
    p.add_argument(
        "--part",
        default="all",
        choices=["all", "val"],
        help="for --clips: the whole clip (unseen speakers) or the validation tail (onboarded person)",
    )
    p.add_argument("--cache", type=Path, default=None, help="for --clips: keep the preprocessed clips here")
    p.add_argument("--lle-blend", type=float, default=0.25, help="blend of the LLE variant (0 = skip)")
    p.add_argument("--temperature", type=float, default=1.0, help="generator sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    p.set_defaults(func=_eval_motion)
