"""``avatar train-emotion CLIPS_DIR [CLIPS_DIR ...] --out DIR``: train the EAT-style category emotion model.

Clips are labelled by file name (MEAD ``<speaker>_front_<label>_level<k>_<n>.mp4``, spectre's
``MEAD_<speaker>_level_<k>_<label>_<n>.mp4``, or ``eamm_<label>.mp4``; files without a label are
skipped, so a mixed corpus folder can be passed); audio is not needed. Each speaker with a
``neutral`` clip gives neutral-relative targets; speakers without one use the shared-statistics
neutral estimate (see :mod:`avatar.motion.emotion.neutral`). Typical::

    avatar train-emotion ../shared/data/emotion ../shared/data/corpus2 --cache /tmp/emotion_tracks
 The default output location used by renders is
the store's ``shared/emotion`` (:attr:`avatar.store.AvatarStore.emotion_dir`).
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add the ``train-emotion`` subcommand."""
    p = subparsers.add_parser(
        "train-emotion",
        help="train the emotion (EAT-style category) model on labelled emotional clips",
        description="Track labelled emotional clips (e.g. MEAD: M030_front_happy_level3_001.mp4), and train "
        "emotion code -> mapping network -> deformation network predicting a landmark displacement. "
        "Writes model.safetensors, config.json and metrics.json.",
    )
    p.add_argument(
        "clips_dir",
        metavar="CLIPS_DIR",
        nargs="+",
        help="folder(s) of labelled clips (label in the file name; unlabelled files are skipped)",
    )
    p.add_argument(
        "--out", default=None, help="output directory (default: the store's shared/emotion, used by every avatar)"
    )
    p.add_argument(
        "--holdout",
        default=None,
        metavar="SPEAKER",
        help="speaker id (e.g. W009) kept out of training; per-label cosine metrics are computed on it",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default 1500)")
    p.add_argument("--cache", default=None, metavar="DIR", help="cache tracked landmarks here (re-runs skip tracking)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); runs are deterministic per seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from avatar.errors import InvalidInput
    from avatar.motion.emotion import EmotionConfig, train_emotion
    from avatar.store import AvatarStore

    cfg = EmotionConfig(holdout=args.holdout, seed=args.seed)
    if args.steps is not None:
        if args.steps < 1:
            raise InvalidInput(f"--steps must be >= 1, got {args.steps}")
        cfg.steps = args.steps
    out = args.out or AvatarStore().emotion_dir
    metrics = train_emotion(
        args.clips_dir,
        out,
        cfg,
        overwrite=args.overwrite,
        cache_dir=args.cache,
        progress=not getattr(args, "quiet", False),
    )
    summary = {"out": str(out), "train_s": round(metrics["train_s"], 1), "final_loss": round(metrics["final_loss"], 4)}
    if "holdout" in metrics:
        summary["holdout_mean_cosine"] = round(metrics["holdout"]["mean_cosine"], 3)
    print(json.dumps(summary))
    return 0
