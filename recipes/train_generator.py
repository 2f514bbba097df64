"""Recipe: train the shared audio2motion generator + landmark SyncNet on a corpus directory.

``avatar train-generator CORPUS_DIR [CORPUS_DIR ...] --out DIR [--model tcn|vae-flow] [--preset cpu-small|gpu-full]
[--features mel|hubert] [--hubert PATH]``

1. Every clip of every CORPUS_DIR (``*.mp4``/``.mov``/... with audio, or ``NAME.mp4`` + ``NAME.wav``) is preprocessed
   at a small frame size (only landmarks and audio features are used) into
   ``DIR/cache/<name>-<sha256[:12]>``. Resumable: cached clips are skipped; clips that fail with a
   user error (no face, no audio, ...) are skipped with a warning naming them.
2. SyncNet, then the audio2motion model (:func:`avatar.motion.train.train_generator`): ``tcn``
   (:mod:`avatar.motion.regression`, the default) or GeneFace's ``vae-flow``.
3. The bundle (weights, configs, stats, metrics) is written atomically into DIR; ``DIR/cache`` is
   kept for later runs and for postnet training (``--corpus-cache``).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

from avatar.errors import AvatarError, InvalidInput, OutputExists
from avatar.store.bundle import sha256_file

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
CACHE_SIZE = 128  # frame side of the cached datasets, pixels (frames are not used by these models)


def _sha12(path: Path) -> str:
    return sha256_file(path)[:12]


def find_clips(corpus: Path) -> list[tuple[Path, Path | None]]:
    """(video, separate audio or None) for every clip of ``corpus`` (recursive, sorted).

    Raises: InvalidInput when the directory does not exist or holds no video.
    """
    if not corpus.is_dir():
        raise InvalidInput(
            f"corpus directory {corpus} does not exist; give a directory of talking-head clips (mp4 [+ same-named wav])"
        )
    clips = []
    for v in sorted(p for p in corpus.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file()):
        wav = v.with_suffix(".wav")
        clips.append((v, wav if wav.is_file() else None))
    if not clips:
        raise InvalidInput(f"no video clips ({', '.join(VIDEO_EXTS)}) in {corpus}")
    return clips


def _upgrade_cached(dataset: Path) -> None:
    """Convert a cached dataset of an older format in place (the corpus cache is ours to rewrite)."""
    from avatar.data.dataset import Dataset, DatasetOutdated

    try:
        Dataset(dataset)
    except DatasetOutdated:
        from avatar.data.convert import convert_v1

        log.info("converting cached %s to the current dataset format", dataset.name)
        convert_v1(dataset, progress=False)


def prepare_corpus(
    corpus: Path,
    cache: Path,
    features: str = "mel",
    hubert: str | None = None,
    progress: bool = True,
    size: int = CACHE_SIZE,
) -> tuple[list[Path], list[str]]:
    """Preprocess every clip into ``cache`` (skipping cached ones). Returns (dataset dirs, skipped names)."""
    from avatar.pipeline.preprocess import PreprocessConfig, preprocess

    cache.mkdir(parents=True, exist_ok=True)
    cfg = PreprocessConfig(size=size, audio_features=features, hubert_path=hubert)
    done, skipped = [], []
    clips = find_clips(corpus)
    for i, (video, audio) in enumerate(clips, 1):
        key = f"{video.stem}-{_sha12(video)}"
        if audio is not None:
            key += f"-{_sha12(audio)}"
        key += f"-{features}"
        out = cache / key
        if (out / "manifest.json").is_file():
            log.info("[%d/%d] %s: cached", i, len(clips), video.name)
            _upgrade_cached(out)
            done.append(out)
            continue
        log.info("[%d/%d] preprocessing %s%s", i, len(clips), video.name, f" + {audio.name}" if audio else "")
        try:
            preprocess(video, out, cfg, audio=audio, overwrite=True, progress=progress)
            done.append(out)
        except AvatarError as e:
            log.warning("skipping %s: %s", video, e)
            skipped.append(video.name)
    if not done:
        raise InvalidInput(f"no clip of {corpus} could be preprocessed (skipped: {', '.join(skipped)})")
    return done, skipped


def with_future(cfg, future: int):
    """``cfg`` (a TrainGeneratorConfig) with the tcn's right receptive field cut to ``future`` frames.

    Raises: InvalidInput for a vae-flow config or a value outside [0, the symmetric receptive field].
    """
    if cfg.model != "tcn":
        raise InvalidInput(f"--future needs the tcn generator (--model tcn), not {cfg.model}")
    if not 0 <= int(future) <= cfg.regression.receptive_frames():
        raise InvalidInput(f"--future must be in [0, {cfg.regression.receptive_frames()}] frames, got {future}")
    return replace(cfg, regression=replace(cfg.regression, future=int(future)))


def train_generator(
    corpus: str | Path | list,
    out: str | Path,
    preset: str = "cpu",
    features: str = "mel",
    hubert: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    steps: int | None = None,
    size: int = CACHE_SIZE,
    model: str | None = None,
    seed: int | None = None,
    future: int | None = None,
) -> Path:
    """Corpus directory (or several) -> generator bundle in ``out`` (see module docstring).

    ``steps`` overrides the preset's training steps; ``size`` is the cached datasets' frame side;
    ``model`` ("tcn" or "vae-flow") overrides the preset's audio2motion model; ``seed`` the preset's
    seed (``TrainGeneratorConfig.seed``: SyncNet and generator initialisation and window sampling);
    ``future`` the tcn's frames of future audio (``RegressionConfig.future``: its right receptive field,
    the generator's share of the streaming lookahead; None = symmetric, 12 frames). An avatar
    onboarded on a ``future=4`` generator gets a causal postnet and streams with 0.28 s of lookahead
    at block 2 (docs/WEB.md).

    Raises: OutputExists (a bundle is already there and not ``overwrite``), InvalidInput (bad
    corpus / preset / features), FeatureMismatch, TrainingDiverged.
    """
    from avatar.motion.train import PRESETS
    from avatar.motion.train import train_generator as train

    corpora = [Path(c) for c in (corpus if isinstance(corpus, (list, tuple)) else [corpus])]
    out = Path(out)
    if not corpora:
        raise InvalidInput("give at least one corpus directory")
    if preset not in PRESETS:
        raise InvalidInput(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if features not in ("mel", "hubert"):
        raise InvalidInput(f"--features must be mel or hubert, got {features!r}")
    if features == "hubert" and not hubert:
        raise InvalidInput("--features hubert needs --hubert PATH (a local HuBERT model directory)")
    if (out / "config.json").exists() and not overwrite:
        raise OutputExists(f"{out} already holds a generator; choose another --out or pass --overwrite")
    cfg = PRESETS[preset]
    if model is not None:
        if model not in ("tcn", "vae-flow"):
            raise InvalidInput(f"--model must be tcn or vae-flow, got {model!r}")
        cfg = replace(cfg, model=model)
    if steps is not None:
        cfg = replace(cfg, steps=int(steps), regression_fit=replace(cfg.regression_fit, steps=int(steps)))
    if seed is not None:
        cfg = replace(cfg, seed=int(seed))
    if future is not None:
        cfg = with_future(cfg, future)
    cache = out / "cache"
    # the cache lives beside the bundle files: keep it out of the atomic swap, then put it back
    staging = out.parent / f".{out.name}.cache"
    if staging.exists() and not cache.exists():
        out.mkdir(parents=True, exist_ok=True)
        os.replace(staging, cache)
    datasets, skipped = [], []
    for c in corpora:
        find_clips(c)  # fail fast on a missing/empty directory, before any preprocessing
    for c in corpora:
        d, s = prepare_corpus(c, cache, features, hubert, progress, size)
        datasets += d
        skipped += s
    out.mkdir(parents=True, exist_ok=True)
    os.replace(cache, staging)
    datasets = [staging / d.name for d in datasets]
    try:
        train(
            datasets,
            out,
            cfg,
            overwrite=True,
            progress=progress,
            hubert_path=hubert,
            extra_metrics={"corpus": [str(c) for c in corpora], "skipped_clips": skipped},
        )
    finally:
        if (out / "cache").exists():
            shutil.rmtree(out / "cache")
        out.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out / "cache")
    return out
