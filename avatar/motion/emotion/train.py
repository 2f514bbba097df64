"""Training of the category emotion model (:mod:`.model`): weighted MSE fit on the targets of
:mod:`.targets`, per-label gain calibration, and the whole run (tracking -> fit -> held-out metrics
of :mod:`.evaluate` -> files).

After the fit, a per-label gain calibrates strength 1 to the real displacement size of the training
speakers with a recorded neutral (the MSE fit to several people shrinks towards their average, whose
norm is smaller than the typical person's).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from avatar.errors import InvalidInput
from avatar.runtime import resolve_device

from .evaluate import baselines, evaluate_speaker
from .geometry import MOVABLE, causal_windows, norm, region_scale, speech_features
from .model import EmotionConfig, EmotionNet, save_emotion_model
from .neutral import NeutralStats
from .schedule import LABELS
from .targets import build_training_set, speaker_displacements
from .tracks import SpeakerTracks, track_speakers

log = logging.getLogger(__name__)

#: per-label calibration gains are clipped to this range
GAIN_RANGE = (0.5, 3.0)


def fit_emotion_net(x, labels, y, w, stats, cfg: EmotionConfig, progress: bool = True) -> tuple[EmotionNet, dict]:
    """Train :class:`EmotionNet` by weighted MSE on the movable points (CPU or CUDA).

    ``stats`` is a :class:`~.neutral.NeutralStats` (or a float [68, 3] template)."""
    dev = resolve_device().type
    threads = torch.get_num_threads()
    if dev == "cpu":
        torch.set_num_threads(1)  # a small MLP: extra threads only oversubscribe shared CPUs (measured 20x slower)
    try:
        return _fit(x, labels, y, w, stats, cfg, dev, progress)
    finally:
        torch.set_num_threads(threads)


def _fit(x, labels, y, w, stats, cfg: EmotionConfig, dev: str, progress: bool) -> tuple[EmotionNet, dict]:
    from tqdm import tqdm

    from avatar.errors import TrainingDiverged

    if not isinstance(stats, NeutralStats):
        stats = NeutralStats.from_template(stats)
    torch.manual_seed(cfg.seed)
    net = EmotionNet(cfg)
    net.in_mean.copy_(torch.from_numpy(x.mean(0)))
    net.in_std.copy_(torch.from_numpy(x.std(0) + 1e-4))
    scale = float(np.sqrt((y**2).sum(-1).mean()) + 1e-6)
    net.out_scale.fill_(scale)
    net.set_neutral_stats(stats)
    net.to(dev)
    X, L, Y = (torch.from_numpy(a).to(dev) for a in (x, labels, y))
    p = torch.from_numpy(w / w.sum()).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    losses = []
    for _ in tqdm(range(cfg.steps), desc="train-emotion", unit="step", disable=not progress):
        idx = torch.multinomial(p, cfg.batch, replacement=True, generator=gen)
        pred = net(X[idx], L[idx])
        loss = ((pred - Y[idx]) ** 2).sum(-1).mean() / scale**2 * (68 / len(MOVABLE))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    if not math.isfinite(losses[-1]):
        raise TrainingDiverged("emotion training produced NaN; lower --lr or check the clips")
    net.eval().cpu()
    return net, {"final_loss": float(np.mean(losses[-50:])), "out_scale": scale, "n_frames": int(len(x))}


def calibrate_gain(net: EmotionNet, tracks: list[SpeakerTracks]) -> dict[str, float]:
    """Set ``net.gain`` per label so that, on the training speakers with a recorded neutral, the
    mean predicted size on :data:`~.geometry.EVAL_POINTS` (each speaker's own clip as speech input,
    retargeted to the speaker) equals the mean real size; labels no such speaker has keep gain 1.
    Gains are clipped to :data:`GAIN_RANGE`. Returns {label: gain}."""
    net.gain.fill_(1.0)
    stats = net.neutral_stats()
    window = net.cfg.window
    gains = {}
    for label in LABELS[1:]:
        pred_n, real_n = [], []
        for st in tracks:
            if st.neutral_mean is None or label not in st.clips:
                continue
            real = speaker_displacements(st, stats)[label]
            scale = region_scale(stats.template, st.neutral_mean)
            for lm in st.clips[label]:
                pred = net.predict(causal_windows(speech_features(lm, lm.mean(0)), window), label).mean(0) * scale
                pred_n.append(norm(pred))
                real_n.append(norm(real))
        if pred_n:
            gains[label] = float(np.clip(np.mean(real_n) / (np.mean(pred_n) + 1e-9), *GAIN_RANGE))
            net.gain[LABELS.index(label)] = gains[label]
    return gains


def train_emotion(
    clips_dir,
    out: str | Path,
    cfg: EmotionConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    tracks: list[SpeakerTracks] | None = None,
    cache_dir: str | Path | None = None,
) -> dict:
    """Train the category emotion model on labelled clips and save it to ``out``.

    Args:
        clips_dir: folder (or list of folders) of clips named as in :mod:`.tracks` (MEAD
            ``<speaker>_front_<label>_level<k>_<n>.mp4``, spectre ``MEAD_<speaker>_level_<k>_<label>_<n>.mp4``,
            ``eamm_<label>.mp4``); audio is not needed. Ignored when ``tracks`` is given.
        out: output directory (model.safetensors, config.json, metrics.json).
        cfg: hyper-parameters; ``cfg.holdout`` names a speaker kept out for evaluation.
        tracks: pre-tracked speakers (skips tracking; used by tests and the benchmark).
        cache_dir: cache of tracked points (:func:`~.tracks.track_clip`).
    Returns:
        the metrics dict (also written as metrics.json): training speakers, times, loss, gains and,
        with a holdout, its per-label metrics and the two baselines (:func:`baselines`).
    Raises:
        InvalidInput: bad folder / no usable clips / unknown holdout. OutputExists: ``out`` exists.
    """
    from avatar.atomic import check_output_dir

    cfg = cfg or EmotionConfig()
    check_output_dir(out, overwrite)
    t0 = time.perf_counter()
    tracks = tracks if tracks is not None else track_speakers(clips_dir, progress=progress, cache_dir=cache_dir)
    t_track = time.perf_counter() - t0
    held = [st for st in tracks if st.speaker == cfg.holdout]
    if cfg.holdout is not None and not held:
        raise InvalidInput(
            f"holdout speaker {cfg.holdout!r} not found; speakers: {sorted(st.speaker for st in tracks)}"
        )
    net, metrics = train_on(tracks, cfg, progress=progress)
    metrics["track_s"] = t_track
    if held:
        rows = evaluate_speaker(net, held[0], cfg.window, allow_estimated=True)
        train = [st for st in tracks if st.speaker != cfg.holdout]
        metrics["holdout"] = {
            "speaker": cfg.holdout,
            "labels": rows,
            "mean_cosine": float(np.mean([r["cosine"] for r in rows.values()])),
            "baselines": baselines(train, held[0], net.neutral_stats()),
        }
    save_emotion_model(net, cfg, metrics, out, overwrite=overwrite)
    log.info("emotion model written to %s (train %.1f s)", out, metrics["train_s"])
    return metrics


def train_on(tracks: list[SpeakerTracks], cfg: EmotionConfig, progress: bool = False) -> tuple[EmotionNet, dict]:
    """Build the training set from ``tracks`` minus ``cfg.holdout``, fit and calibrate; returns
    (net, metrics without the holdout part)."""
    train = [st for st in tracks if st.speaker != cfg.holdout]
    x, lab, y, w, stats = build_training_set(train, cfg.window, cfg.no_neutral_weight, cfg.symmetric)
    t1 = time.perf_counter()
    net, fit = fit_emotion_net(x, lab, y, w, stats, cfg, progress=progress)
    gains = calibrate_gain(net, train) if cfg.calibrate else {}
    t_train = time.perf_counter() - t1
    return net, {
        "train_speakers": [st.speaker for st in train],
        "recorded_neutral": [st.speaker for st in train if st.neutral_mean is not None],
        "train_s": t_train,
        "gains": gains,
        **fit,
    }
