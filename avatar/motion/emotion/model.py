"""The category emotion model (EAT-style): emotion code -> mapping network -> deformation network.

EAT (Gan et al., ICCV 2023): Sec. 3.3 emotion latent + mapping network ("emotion prompt"),
Sec. 3.4 emotional deformation network (EDN) predicting a keypoint displacement. EAT predicts a
45-d delta on 15 implicit 3-D keypoints; ours predicts [68, 3] on GeneFace's canonical landmarks
from a causal window of the audio-driven speech landmarks (anchors D.4 option b).

Training targets are displacements from each speaker's *neutral* shape (:mod:`.neutral`): a
recorded neutral clip when the speaker has one, else the shared-statistics estimate (weighted by
``no_neutral_weight``: its identity error is part of the target). Symmetric labels are trained on
the left-right symmetric part of the displacement (tracking and head-pose asymmetries are noise;
contempt is unilateral and kept as is). After training, a per-label gain calibrates strength 1 to
the real displacement size of the training speakers with a recorded neutral (the MSE fit to several
people shrinks towards their average, whose norm is smaller than the typical person's).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from avatar.data.dataset import MOUTH
from avatar.errors import BundleCorrupt, InvalidInput
from avatar.runtime import resolve_device

from .geometry import (ASYMMETRIC, MOVABLE, MOVABLE_MASK, SPEECH, causal_windows, cosine, norm,
                       region_scale, speech_features, symmetrize)
from .neutral import MAX_IDENTITY, NeutralStats, build_neutral_stats, estimate_neutral
from .schedule import LABELS
from .tracks import SpeakerTracks, track_speakers

log = logging.getLogger(__name__)

SCHEMA = "avatar.emotion/2"
_OLD_SCHEMAS = ("avatar.emotion/1",)
#: per-label calibration gains are clipped to this range
GAIN_RANGE = (0.5, 3.0)


@dataclass
class EmotionConfig:
    """Hyper-parameters of the category emotion model (stored as ``config.json``).

    Attributes:
        embed_dim: emotion code size (EAT's latent_dim 16).
        code_dim: mapping-network output (the "emotion prompt").
        hidden: deformation-network width.
        window: causal window of speech frames fed to the deformation network (25 fps).
        steps, batch, lr, weight_decay: AdamW training schedule.
        no_neutral_weight: loss weight of clips whose speaker has no neutral clip (their neutral is
            estimated from shared statistics, so their targets carry identity error).
        symmetric: train symmetric labels (all but :data:`~.geometry.ASYMMETRIC`) on the
            left-right symmetric part of the displacement.
        calibrate: fit the per-label gain so that strength 1 equals the real size on average.
        holdout: speaker id excluded from training and used for the held-out metrics (or None).
        seed: RNG seed.
    """

    embed_dim: int = 16
    code_dim: int = 64
    hidden: int = 256
    window: int = 5
    steps: int = 1500
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    no_neutral_weight: float = 0.5
    symmetric: bool = True
    calibrate: bool = True
    holdout: str | None = None
    seed: int = 0


class EmotionNet(nn.Module):
    """Emotion code -> mapping network -> deformation network -> displacement.

    ``forward(speech [B, window*len(SPEECH)*3] float32, label int64 [B]) -> delta [B, 68, 3]``
    (canonical units, calibrated: strength 1), zero at :data:`~.geometry.FROZEN` points and for
    the neutral label (EAT Sec. 3.3: emotion latent + mapping network; Sec. 3.4: emotional
    deformation network). Buffers carry the input normalisation, the per-label ``gain`` and the
    shared neutral statistics (``template``, ``id_basis``/``n_identity``, ``ex_basis``) that the
    reference-video path also uses.
    """

    def __init__(self, cfg: EmotionConfig):
        super().__init__()
        d_in = cfg.window * len(SPEECH) * 3
        self.embedding = nn.Embedding(len(LABELS), cfg.embed_dim)
        self.mapping = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.code_dim), nn.LeakyReLU(0.2),
                                     nn.Linear(cfg.code_dim, cfg.code_dim), nn.LeakyReLU(0.2),
                                     nn.Linear(cfg.code_dim, cfg.code_dim))
        self.deform = nn.Sequential(nn.Linear(d_in + cfg.code_dim, cfg.hidden), nn.LeakyReLU(0.2),
                                    nn.Linear(cfg.hidden, cfg.hidden), nn.LeakyReLU(0.2),
                                    nn.Linear(cfg.hidden, 68 * 3))
        self.register_buffer("in_mean", torch.zeros(d_in))
        self.register_buffer("in_std", torch.ones(d_in))
        self.register_buffer("out_scale", torch.ones(1))
        self.register_buffer("gain", torch.ones(len(LABELS)))
        self.register_buffer("template", torch.zeros(68, 3))  # training speakers' mean neutral shape
        self.register_buffer("id_basis", torch.zeros(MAX_IDENTITY, 68, 3))
        self.register_buffer("n_identity", torch.zeros((), dtype=torch.int64))
        self.register_buffer("ex_basis", torch.zeros(len(LABELS) - 1, 68, 3))
        self.register_buffer("mask", torch.from_numpy(MOVABLE_MASK.copy()))
        self.cfg = cfg

    def forward(self, speech: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        code = self.mapping(self.embedding(label))
        x = (speech - self.in_mean) / self.in_std
        out = self.deform(torch.cat([x, code], -1)).view(-1, 68, 3) * self.out_scale * self.gain[label][:, None, None]
        return out * self.mask * (label != 0).to(out.dtype)[:, None, None]

    def neutral_stats(self) -> NeutralStats:
        """The shared neutral statistics stored with the model (:class:`~.neutral.NeutralStats`)."""
        k = int(self.n_identity)
        ex = self.ex_basis.numpy()
        ex = ex[np.linalg.norm(ex.reshape(len(ex), -1), axis=1) > 0]
        return NeutralStats(self.template.numpy().copy(), self.id_basis.numpy()[:k].copy(), ex.copy())

    def set_neutral_stats(self, stats: NeutralStats) -> None:
        """Store ``stats`` in the buffers (identity directions beyond :data:`MAX_IDENTITY` dropped)."""
        self.template.copy_(torch.from_numpy(np.asarray(stats.template, np.float32)))
        k = min(len(stats.id_basis), MAX_IDENTITY)
        self.id_basis.zero_()
        if k:
            self.id_basis[:k] = torch.from_numpy(np.asarray(stats.id_basis[:k], np.float32))
        self.n_identity.fill_(k)
        self.ex_basis.zero_()
        m = min(len(stats.ex_basis), len(self.ex_basis))
        if m:
            self.ex_basis[:m] = torch.from_numpy(np.asarray(stats.ex_basis[:m], np.float32))

    def predict(self, speech: np.ndarray, label: str) -> np.ndarray:
        """float32 [K, 68, 3] displacement for speech windows [K, D] and one label (no grad)."""
        with torch.no_grad():
            return self(torch.from_numpy(np.asarray(speech, np.float32)), torch.full((len(speech),), LABELS.index(label))).numpy()


# ---------------------------------------------------------------------------------------------
# targets
def neutral_stats_from_tracks(tracks: list[SpeakerTracks]) -> NeutralStats:
    """Shared statistics from the speakers with a recorded neutral clip: their neutral shapes
    (identity) and the per-label mean of their displacements (expression directions).

    Raises:
        InvalidInput: no speaker has a neutral clip.
    """
    rec = [st for st in tracks if st.neutral_mean is not None]
    if not rec:
        raise InvalidInput("training needs at least one speaker with a neutral clip (e.g. M030_front_neutral_level1_001.mp4)")
    per_label = []
    for label in LABELS[1:]:
        ds = [np.concatenate(st.clips[label]).mean(0) - st.neutral_mean for st in rec if label in st.clips]
        if ds:
            per_label.append(np.mean(ds, 0) * MOVABLE_MASK)
    return build_neutral_stats([st.neutral_mean for st in rec], per_label)


def speaker_neutral(st: SpeakerTracks, stats: NeutralStats) -> tuple[np.ndarray, bool]:
    """(neutral float32 [68, 3], estimated?) of a speaker: the recorded neutral mean, else
    :func:`~.neutral.estimate_neutral` of the mean over all its clips."""
    if st.neutral_mean is not None:
        return st.neutral_mean, False
    return estimate_neutral(np.concatenate([lm for v in st.clips.values() for lm in v]).mean(0), stats), True


def speaker_displacements(st: SpeakerTracks, stats: NeutralStats, symmetric: bool = False) -> dict[str, np.ndarray]:
    """{label: float32 [68, 3]} mean displacement of each emotional label from the speaker's neutral
    (:func:`speaker_neutral`), movable points only; symmetric part when ``symmetric`` (except
    :data:`~.geometry.ASYMMETRIC` labels)."""
    neutral, _ = speaker_neutral(st, stats)
    out = {}
    for label, lms in st.clips.items():
        if label == "neutral":
            continue
        d = (np.concatenate(lms).mean(0) - neutral) * MOVABLE_MASK
        out[label] = (symmetrize(d) if symmetric and label not in ASYMMETRIC else d).astype(np.float32)
    return out


def build_training_set(tracks: list[SpeakerTracks], window: int, no_neutral_weight: float, symmetric: bool = True):
    """(speech windows float32 [M, window*|SPEECH|*3], labels int64 [M], targets float32 [M, 68, 3],
    weights float32 [M], :class:`~.neutral.NeutralStats`).

    Target = tracked lm3d minus the speaker's neutral (:func:`speaker_neutral`), zero at
    :data:`~.geometry.FROZEN` (EAMM-style neutral-relative displacement with the mouth interior
    masked), symmetric part for symmetric labels when ``symmetric``. Speech input = the clip's lip
    closure / chin landmarks relative to the clip's own mean (the speech motion, emotion offset
    removed), in a causal window. Each clip has total weight 1 (``no_neutral_weight`` for speakers
    without a neutral clip).

    Raises:
        InvalidInput: no speaker with a neutral clip, or no emotional clip.
    """
    stats = neutral_stats_from_tracks(tracks)
    xs, ys, ls, ws = [], [], [], []
    for st in tracks:
        neutral, estimated = speaker_neutral(st, stats)
        weight = no_neutral_weight if estimated else 1.0
        for label, lms in st.clips.items():
            if label == "neutral":
                continue
            for lm in lms:
                y = (lm - neutral[None]) * MOVABLE_MASK[None]
                if symmetric and label not in ASYMMETRIC:
                    y = symmetrize(y)
                xs.append(causal_windows(speech_features(lm, lm.mean(0)), window))
                ys.append(y)
                ls.append(np.full(len(lm), LABELS.index(label), np.int64))
                ws.append(np.full(len(lm), weight / len(lm), np.float32))  # each clip counts once
    if not xs:
        raise InvalidInput("training needs emotional (non-neutral) clips besides the neutral ones")
    return (np.concatenate(xs).astype(np.float32), np.concatenate(ls), np.concatenate(ys).astype(np.float32),
            np.concatenate(ws), stats)


# ---------------------------------------------------------------------------------------------
# fitting
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
    scale = float(np.sqrt((y ** 2).sum(-1).mean()) + 1e-6)
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
        loss = ((pred - Y[idx]) ** 2).sum(-1).mean() / scale ** 2 * (68 / len(MOVABLE))
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


# ---------------------------------------------------------------------------------------------
# evaluation
def evaluate_speaker(net: EmotionNet, st: SpeakerTracks, window: int | None = None, allow_estimated: bool = False) -> dict:
    """Held-out metrics on one speaker, per emotional label.

    Truth: the mean of the label's clips minus the speaker's recorded neutral mean (or, with
    ``allow_estimated``, the shared-statistics estimate from ``net``'s statistics: flagged
    ``estimated_truth``). Prediction: the model's displacement averaged over the speaker's neutral
    clip frames used as the "audio-driven neutral" speech input (the label clip's frames, relative to
    their mean, when there is no neutral clip), retargeted to the speaker (:func:`~.geometry.region_scale`).

    Returns:
        {label: {"cosine", "size_ratio", "mouth_lmd", "pred_norm", "real_norm", "estimated_truth"}}
        with cosine / norms on :data:`~.geometry.EVAL_POINTS`; ``mouth_lmd`` = mean L2 of the 20
        mouth points of the predicted displacement (canonical units).
    Raises:
        InvalidInput: no neutral clip and not ``allow_estimated``.
    """
    window = window or net.cfg.window
    if st.neutral_mean is None and not allow_estimated:
        raise InvalidInput(f"speaker {st.speaker} has no neutral clip; it cannot be evaluated")
    stats = net.neutral_stats()
    neutral, estimated = speaker_neutral(st, stats)
    scale = region_scale(stats.template, neutral)
    real_all = speaker_displacements(st, stats)
    rows = {}
    for label, real in real_all.items():
        src = st.clips["neutral"][0] if "neutral" in st.clips else np.concatenate(st.clips[label])
        pred = net.predict(causal_windows(speech_features(src, src.mean(0)), window), label) * scale
        a = pred.mean(0)
        rows[label] = {"cosine": cosine(a, real), "size_ratio": norm(a) / (norm(real) + 1e-12),
                       "mouth_lmd": float(np.linalg.norm(pred[:, list(MOUTH)], axis=-1).mean()),
                       "pred_norm": norm(a), "real_norm": norm(real), "estimated_truth": estimated}
    return rows


def baselines(train: list[SpeakerTracks], held: SpeakerTracks, stats: NeutralStats) -> dict:
    """The two trivial baselines of a held-out evaluation, per label of ``held``.

    * ``average``: cosine / size ratio of the plain mean of the training speakers' displacements
      (each against its recorded or estimated neutral; no symmetrisation, no retargeting);
    * ``copy``: mean over training speakers of the cosine / size ratio of copying that one
      speaker's displacement (the expected score of picking one at random).

    Truth as in :func:`evaluate_speaker` (recorded neutral, else the estimate from ``stats``).
    Returns {label: {"average_cos", "average_size", "copy_cos", "copy_size", "n_train"}}; labels no
    training speaker has are left out.
    """
    truth = speaker_displacements(held, stats)
    train_d = [speaker_displacements(st, stats) for st in train]
    out = {}
    for label, real in truth.items():
        ds = [d[label] for d in train_d if label in d]
        if not ds:
            continue
        avg = np.mean(ds, 0)
        out[label] = {"average_cos": cosine(avg, real), "average_size": norm(avg) / (norm(real) + 1e-12),
                      "copy_cos": float(np.mean([cosine(d, real) for d in ds])),
                      "copy_size": float(np.mean([norm(d) / (norm(real) + 1e-12) for d in ds])), "n_train": len(ds)}
    return out


# ---------------------------------------------------------------------------------------------
# persistence
def save_emotion_model(net: EmotionNet, cfg: EmotionConfig, metrics: dict, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``metrics.json`` atomically to ``out``."""
    from safetensors.torch import save_file

    from avatar.atomic import atomic_dir
    from avatar.config import save_json, to_dict

    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(Path(tmp) / "model.safetensors"))
        save_json({"schema": SCHEMA, "labels": list(LABELS), "speech_points": list(SPEECH),
                   "config": to_dict(cfg)}, Path(tmp) / "config.json")
        save_json(metrics, Path(tmp) / "metrics.json")
    return Path(out)


def load_emotion_model(path: str | Path) -> EmotionNet:
    """Load a model written by :func:`save_emotion_model` (safetensors only; never unpickles).

    A model of the previous schema (``avatar.emotion/1``: no gain, no neutral statistics) loads with
    gain 1 and its template as the only statistics.

    Raises:
        BundleCorrupt: missing/unreadable files or a different schema.
    """
    from safetensors.torch import load_file

    from avatar.config import from_dict, load_json

    path = Path(path)
    try:
        meta = load_json(path / "config.json")
        schema = meta.get("schema")
        if schema not in (SCHEMA, *_OLD_SCHEMAS) or tuple(meta.get("labels", ())) != LABELS:
            raise BundleCorrupt(f"{path}: not an {SCHEMA} model; retrain it with `avatar train-emotion`")
        known = set(EmotionConfig.__dataclass_fields__)
        cfg = from_dict(EmotionConfig, {k: v for k, v in meta["config"].items() if k in known})
        net = EmotionNet(cfg)
        state = load_file(str(path / "model.safetensors"))
        missing, unexpected = net.load_state_dict(state, strict=schema == SCHEMA)
        if unexpected or not set(missing) <= {"gain", "id_basis", "n_identity", "ex_basis"}:
            raise BundleCorrupt(f"{path}: unexpected tensors {unexpected} / missing {missing}")
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise BundleCorrupt(f"{path}: emotion model unreadable ({e}); retrain it with `avatar train-emotion CLIPS_DIR --out {path}`") from e
    net.cfg = cfg
    return net.eval()


def train_emotion(clips_dir, out: str | Path, cfg: EmotionConfig | None = None,
                  overwrite: bool = False, progress: bool = True, tracks: list[SpeakerTracks] | None = None,
                  cache_dir: str | Path | None = None) -> dict:
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
        raise InvalidInput(f"holdout speaker {cfg.holdout!r} not found; speakers: {sorted(st.speaker for st in tracks)}")
    net, metrics = train_on(tracks, cfg, progress=progress)
    metrics["track_s"] = t_track
    if held:
        rows = evaluate_speaker(net, held[0], cfg.window, allow_estimated=True)
        train = [st for st in tracks if st.speaker != cfg.holdout]
        metrics["holdout"] = {"speaker": cfg.holdout, "labels": rows,
                              "mean_cosine": float(np.mean([r["cosine"] for r in rows.values()])),
                              "baselines": baselines(train, held[0], net.neutral_stats())}
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
    return net, {"train_speakers": [st.speaker for st in train],
                 "recorded_neutral": [st.speaker for st in train if st.neutral_mean is not None],
                 "train_s": t_train, "gains": gains, **fit}
