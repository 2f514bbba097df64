"""Emotion deltas on canonical landmarks: EAT-style category model and EAMM-style reference video.

Both produce an additive displacement on the canonical lm3d [68, 3] (identity-free, pose-free,
outer-eye-corner distance of the mean = 1; see :mod:`avatar.data.dataset`) that the render engine
adds after the postnet and before the eyes/blinks and the NeRF (:class:`avatar.pipeline.render.MotionEngine`).

* **Category (EAT, Gan et al. ICCV 2023, Sec. 3.3-3.4)**: a learned emotion code (``nn.Embedding``,
  EAT's emotion latent) -> mapping network (EAT's ``MappingDeepNetwork``) -> emotional deformation
  network (EAT's EDN) predicting the displacement from a causal window of the audio-driven speech
  landmarks. EAT predicts a 45-d delta on 15 implicit 3-D keypoints; ours predicts [68, 3] on
  GeneFace's landmarks (anchors D.4 option b). Trained by :func:`train_emotion` on labelled clips.
* **Reference video (EAMM, Ji et al. SIGGRAPH 2022, Sec. 3.3)**: EAMM learns the displacement as
  ``kp_video - kp_audio``; with a tracked 3-D landmark space we can measure it directly: the
  reference's canonical landmarks minus its own mean shape (identity removed), the mouth occluded
  (EAMM's mouth-region occlusion, so the reference's speech does not leak), smoothed, retargeted to
  the avatar's proportions and looped ping-pong.

Lip sync is preserved by construction: the lip-closure landmarks (:data:`LIP_CLOSURE`: inner lips
60-67 and the outer-lip centre points) and the lower jaw keep the audio-driven motion (delta = 0);
the mouth corners 48/54 may move. The result is clamped to the person's own landmark range
(``models.lm3d_ref``) widened by :data:`CLAMP_MARGIN`, so the NeRF stays near its training data
(anchors D.4 caution).

Emotion may change over time with a schedule in ``RenderOptions.emotion``:
``"happy"`` or ``"neutral,happy@2.0,sad@5.5"`` (label switches at seconds, raised-cosine
crossfade of :data:`CROSSFADE_S`). The delta callable works on absolute frame indices, so batch
renders, block-wise rendering and streams agree.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from avatar.data.dataset import BROWS, EYES, FPS, JAW, MOUTH, NOSE
from avatar.errors import AvatarNotFound, BundleCorrupt, InvalidInput, NoFaceDetected

log = logging.getLogger(__name__)

#: the 8 MEAD labels, in the order of the embedding table (same set as render.EMOTIONS)
LABELS = ("neutral", "happy", "angry", "sad", "surprised", "disgusted", "fear", "contempt")
MAX_STRENGTH = 1.5
CROSSFADE_S = 0.3
#: clamp bound widening, as a fraction of the person's per-landmark range
CLAMP_MARGIN = 0.25
#: landmarks that keep the audio-driven motion: inner lips, outer-lip centre points, lower jaw
LIP_CLOSURE = tuple(range(60, 68)) + (50, 51, 52, 56, 57, 58)
LOWER_JAW = tuple(range(4, 13))
FROZEN = tuple(sorted(set(LIP_CLOSURE) | set(LOWER_JAW)))
#: landmarks an emotion may move (brows, eyes, nose, cheeks/upper jaw, mouth corners + neighbours)
MOVABLE = tuple(i for i in range(68) if i not in FROZEN)
#: speech landmarks fed to the deformation network (lip closure + chin): what audio drives
SPEECH = tuple(sorted(set(LIP_CLOSURE) | {7, 8, 9}))
#: points on which emotion direction is evaluated (brows, eyes, mouth corners)
EVAL_POINTS = tuple(BROWS + EYES + [48, 54])
#: regions for per-region proportion retargeting
REGIONS = {"jaw": JAW, "brows": BROWS, "nose": NOSE, "eyes": EYES, "mouth": MOUTH}
MAX_REFERENCE_FRAMES = 60 * FPS  # a reference longer than 60 s is truncated (it loops anyway)

_MOVABLE_MASK = np.zeros((68, 1), np.float32)
_MOVABLE_MASK[list(MOVABLE)] = 1.0


# ---------------------------------------------------------------------------------------------
# schedule
def parse_emotion_schedule(text: str) -> list[tuple[str, float]]:
    """Parse ``"happy"`` or ``"neutral,happy@2.0,sad@5.5"`` into ``[(label, start_seconds), ...]``.

    The first entry may omit ``@t`` (starts at 0 s); later entries need strictly increasing times.

    Raises:
        InvalidInput: unknown label, bad or non-increasing time.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(f"emotion must be a label or schedule like 'neutral,happy@2.0'; got {text!r}")
    out: list[tuple[str, float]] = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        m = re.fullmatch(r"([a-z]+)\s*(?:@\s*([0-9]*\.?[0-9]+)\s*s?)?", part.lower())
        if not m:
            raise InvalidInput(f"bad emotion schedule entry {part!r}; write LABEL or LABEL@SECONDS, e.g. 'neutral,happy@2.0'")
        label, t = m.group(1), m.group(2)
        if label not in LABELS:
            raise InvalidInput(f"unknown emotion {label!r}; choose one of {', '.join(LABELS)}")
        if t is None and i > 0:
            raise InvalidInput(f"emotion schedule entry {part!r} needs a start time, e.g. '{label}@2.0'")
        start = 0.0 if t is None else float(t)
        if out and start <= out[-1][1]:
            raise InvalidInput(f"emotion schedule times must increase; {part!r} starts at {start} s, not after {out[-1][1]} s")
        out.append((label, start))
    if out[0][1] > 0:
        out.insert(0, ("neutral", 0.0))
    return out


def schedule_weights(schedule: list[tuple[str, float]], frames: np.ndarray, fps: int = FPS,
                     crossfade_s: float = CROSSFADE_S) -> dict[str, np.ndarray]:
    """Per-label blend weights at absolute ``frames`` (int [K]) -> {label: float32 [K]}, summing to 1.

    A switch at ``t`` crossfades with a raised cosine over ``[t - crossfade_s/2, t + crossfade_s/2]``.
    """
    t = np.asarray(frames, np.float64) / fps
    k = len(t)
    w_seg = np.zeros((len(schedule), k))
    # progress of each switch j (0 before, 1 after)
    prog = [np.ones(k)]
    for _, start in schedule[1:]:
        u = np.clip((t - (start - crossfade_s / 2)) / crossfade_s, 0.0, 1.0) if crossfade_s > 0 else (t >= start) * 1.0
        prog.append(0.5 - 0.5 * np.cos(np.pi * u))
    prog.append(np.zeros(k))
    for j in range(len(schedule)):
        w_seg[j] = prog[j] - prog[j + 1] if j + 1 < len(prog) else prog[j]
    w_seg = np.clip(w_seg, 0.0, 1.0)
    out: dict[str, np.ndarray] = {}
    for (label, _), w in zip(schedule, w_seg):
        out[label] = out.get(label, np.zeros(k, np.float32)) + w.astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# geometry helpers
def region_scale(src_mean: np.ndarray, dst_mean: np.ndarray) -> np.ndarray:
    """Per-landmark, per-axis retargeting scale float32 [68, 3]: for each region (jaw, brows, nose,
    eyes, mouth) the ratio of the destination's to the source's extent (std about the region
    centroid) along x, y, z, clipped to [0.5, 2]. Multiply a source displacement by it."""
    out = np.ones((68, 3), np.float32)
    for idx in REGIONS.values():
        s = np.asarray(src_mean, np.float64)[idx]
        d = np.asarray(dst_mean, np.float64)[idx]
        ratio = (d.std(0) + 1e-6) / (s.std(0) + 1e-6)
        out[idx] = np.clip(ratio, 0.5, 2.0)
    return out


def speech_features(lm3d: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Speech state per frame: float32 [K, len(SPEECH)*3] = (lm3d - mean) at :data:`SPEECH`."""
    return (np.asarray(lm3d, np.float32)[:, list(SPEECH)] - np.asarray(mean, np.float32)[list(SPEECH)]).reshape(len(lm3d), -1)


def causal_windows(feats: np.ndarray, window: int) -> np.ndarray:
    """float32 [K, D] -> [K, window*D]: frame t gets frames t-window+1..t (edge-replicated)."""
    k = len(feats)
    idx = np.clip(np.arange(k)[:, None] + np.arange(-window + 1, 1)[None], 0, k - 1)
    return feats[idx].reshape(k, -1)


def pingpong(frames: np.ndarray, n: int) -> np.ndarray:
    """Ping-pong loop indices int [K] into a track of length ``n`` (0..n-1..0..)."""
    frames = np.asarray(frames, np.int64)
    if n <= 1:
        return np.zeros_like(frames)
    period = 2 * (n - 1)
    p = np.mod(frames, period)
    return np.where(p < n, p, period - p)


# ---------------------------------------------------------------------------------------------
# tracking (reuses avatar.face; no tracker of our own)
@dataclass
class TrackedClip:
    """One tracked clip: ``points`` float32 [N, 478, 3] FaceMesh pixels (gaps filled)."""

    path: Path
    points: np.ndarray


def track_clip(path: str | Path, max_frames: int | None = None, min_face_fraction: float = 0.5) -> TrackedClip:
    """Track a video's face with :class:`avatar.face.landmarks.FaceMeshTracker` at 25 fps.

    Raises:
        InvalidMedia: unreadable / truncated file (from :mod:`avatar.media`).
        NoFaceDetected: fewer than ``min_face_fraction`` of frames show a face.
    """
    from avatar.face.landmarks import FaceMeshTracker, fill_gaps
    from avatar.media import iter_video_frames

    pts, valid = [], []
    with FaceMeshTracker() as tracker:
        for i, img in enumerate(iter_video_frames(path, fps=FPS)):
            if max_frames is not None and i >= max_frames:
                break
            res = tracker(img)
            valid.append(res is not None)
            pts.append(res.points if res is not None else np.zeros((478, 3), np.float32))
    n = len(valid)
    found = int(np.sum(valid))
    if n == 0 or found < max(2, min_face_fraction * n):
        raise NoFaceDetected(f"{path}: a face was found in only {found} of {n} frames; "
                             "use a video showing one frontal face throughout")
    points = np.stack(pts).astype(np.float32)
    fill_gaps(points, np.asarray(valid), max_gap=n)
    return TrackedClip(Path(path), points)


def canonicalise_speaker(clips: list[TrackedClip], neutral: list[TrackedClip] | None = None):
    """Canonical landmarks of several clips of ONE speaker in one common head frame and scale.

    The head-frame shape is the generalised-Procrustes mean (:func:`avatar.face.pose.mean_shape`)
    of the neutral clips (all clips when none); the scale sets the outer-eye-corner distance of the
    neutral mean to 1 (the dataset convention).

    Returns:
        (list of float32 [N_i, 68, 3] per clip in ``clips`` order, float32 [68, 3] neutral mean or
        None when no neutral clip was given).
    """
    from avatar.face.pose import canonical_landmarks, mean_shape

    base = neutral if neutral else clips
    pts = np.concatenate([c.points for c in base])
    step = max(1, len(pts) // 400)  # the Procrustes mean needs no more than ~400 frames
    shape, rigid = mean_shape(pts[::step])
    ref_lm, _, hs = canonical_landmarks(pts, shape, rigid)
    out = []
    for c in clips:
        lm, _, h = canonical_landmarks(c.points, shape, rigid)
        out.append((lm * (h / hs)).astype(np.float32))
    neutral_mean = ref_lm.mean(0).astype(np.float32) if neutral else None
    return out, neutral_mean


# ---------------------------------------------------------------------------------------------
# the category model (EAT-style)
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
            estimated from the template, so their targets carry identity error).
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
    holdout: str | None = None
    seed: int = 0


class EmotionNet(nn.Module):
    """Emotion code -> mapping network -> deformation network -> displacement.

    ``forward(speech [B, window*len(SPEECH)*3] float32, label int64 [B]) -> delta [B, 68, 3]``
    (canonical units), zero at :data:`FROZEN` points and for the neutral label (EAT Sec. 3.3:
    emotion latent + mapping network; Sec. 3.4: emotional deformation network).
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
        self.register_buffer("template", torch.zeros(68, 3))  # training speakers' mean neutral shape
        self.register_buffer("mask", torch.from_numpy(_MOVABLE_MASK.copy()))

    def forward(self, speech: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        code = self.mapping(self.embedding(label))
        x = (speech - self.in_mean) / self.in_std
        out = self.deform(torch.cat([x, code], -1)).view(-1, 68, 3) * self.out_scale
        return out * self.mask * (label != 0).to(out.dtype)[:, None, None]


def _label_of(stem: str) -> str | None:
    tokens = stem.lower().split("_")
    hits = [t for t in tokens if t in LABELS]
    return hits[0] if hits else None


def _speaker_of(stem: str) -> str:
    """``M030_front_happy_level3_001`` -> ``M030``; a name without ``_front_`` is its own speaker."""
    return stem.split("_front_")[0] if "_front_" in stem else stem


def list_clips(clips_dir: str | Path) -> dict[str, list[tuple[str, Path]]]:
    """Labelled clips by speaker: {speaker: [(label, path), ...]} from file names
    (``<speaker>_front_<label>_level<k>_<n>.mp4``, ``eamm_<label>.mp4``).

    Raises:
        InvalidInput: not a directory, or no labelled clip in it.
    """
    d = Path(clips_dir)
    if not d.is_dir():
        raise InvalidInput(f"{d} is not a directory; pass a folder of labelled clips such as M030_front_happy_level3_001.mp4")
    out: dict[str, list[tuple[str, Path]]] = {}
    for p in sorted(d.iterdir()):
        if p.suffix.lower() not in (".mp4", ".mov", ".mkv", ".avi", ".webm"):
            continue
        label = _label_of(p.stem)
        if label is None:
            log.warning("skipping %s: no emotion label (%s) in its name", p.name, ", ".join(LABELS))
            continue
        out.setdefault(_speaker_of(p.stem), []).append((label, p))
    if not out:
        raise InvalidInput(f"{d} has no labelled clips; name them like M030_front_happy_level3_001.mp4 or eamm_sad.mp4")
    return out


@dataclass
class SpeakerTracks:
    """Canonical tracks of one speaker: {label: [float32 [N, 68, 3], ...]}, neutral mean [68, 3]
    (None when the speaker has no neutral clip)."""

    speaker: str
    clips: dict[str, list[np.ndarray]] = field(default_factory=dict)
    neutral_mean: np.ndarray | None = None


def track_speakers(clips_dir: str | Path, speakers: list[str] | None = None, progress: bool = True) -> list[SpeakerTracks]:
    """Track and canonicalise every labelled clip (unreadable or faceless clips are skipped with a
    warning). ``speakers`` restricts to those ids."""
    from tqdm import tqdm

    from avatar.errors import InvalidMedia

    listing = list_clips(clips_dir)
    if speakers is not None:
        listing = {s: v for s, v in listing.items() if s in speakers}
    out = []
    todo = sum(len(v) for v in listing.values())
    bar = tqdm(total=todo, unit="clip", desc="track", disable=not progress)
    for spk, items in listing.items():
        tracked: list[tuple[str, TrackedClip]] = []
        for label, path in items:
            try:
                tracked.append((label, track_clip(path)))
            except InvalidMedia as e:  # includes NoFaceDetected
                log.warning("skipping %s: %s", path.name, e)
            bar.update(1)
        if not tracked:
            continue
        neutral = [c for lab, c in tracked if lab == "neutral"]
        lms, nmean = canonicalise_speaker([c for _, c in tracked], neutral or None)
        st = SpeakerTracks(spk, neutral_mean=nmean)
        for (label, _), lm in zip(tracked, lms):
            st.clips.setdefault(label, []).append(lm)
        out.append(st)
    bar.close()
    return out


def estimate_neutral(clip_mean: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Neutral shape of a speaker without a neutral clip: the template neutral scaled per axis to
    the speaker's face extent (identity-stable jaw + nose points), float32 [68, 3]."""
    idx = JAW + NOSE
    c_t, c_m = template[idx].mean(0), clip_mean[idx].mean(0)
    s = (clip_mean[idx] - c_m).std(0) / ((template[idx] - c_t).std(0) + 1e-6)
    return ((template - c_t) * s + c_m).astype(np.float32)


def _neutral_of(st: SpeakerTracks, template: np.ndarray) -> np.ndarray:
    if st.neutral_mean is not None:
        return st.neutral_mean
    return estimate_neutral(np.concatenate([lm for v in st.clips.values() for lm in v]).mean(0), template)


def build_training_set(tracks: list[SpeakerTracks], window: int, no_neutral_weight: float):
    """(speech windows float32 [M, window*|SPEECH|*3], labels int64 [M], targets float32 [M, 68, 3],
    weights float32 [M], template float32 [68, 3]).

    Target = tracked lm3d minus the speaker's neutral mean, zero at :data:`FROZEN` (EAMM-style
    neutral-relative displacement with the mouth interior masked). Speech input = the clip's lip
    closure / chin landmarks relative to the clip's own mean (the speech motion, emotion offset
    removed), in a causal window.
    """
    neutrals = [st.neutral_mean for st in tracks if st.neutral_mean is not None]
    if not neutrals:
        raise InvalidInput("training needs at least one speaker with a neutral clip (e.g. M030_front_neutral_level1_001.mp4)")
    template = np.mean(neutrals, 0).astype(np.float32)
    xs, ys, ls, ws = [], [], [], []
    for st in tracks:
        neutral = _neutral_of(st, template)
        weight = 1.0 if st.neutral_mean is not None else no_neutral_weight
        for label, lms in st.clips.items():
            if label == "neutral":
                continue
            for lm in lms:
                xs.append(causal_windows(speech_features(lm, lm.mean(0)), window))
                ys.append((lm - neutral[None]) * _MOVABLE_MASK[None])
                ls.append(np.full(len(lm), LABELS.index(label), np.int64))
                ws.append(np.full(len(lm), weight / len(lm), np.float32))  # each clip counts once
    if not xs:
        raise InvalidInput("training needs emotional (non-neutral) clips besides the neutral ones")
    return (np.concatenate(xs).astype(np.float32), np.concatenate(ls), np.concatenate(ys).astype(np.float32),
            np.concatenate(ws), template)


def fit_emotion_net(x, labels, y, w, template, cfg: EmotionConfig, progress: bool = True) -> tuple[EmotionNet, dict]:
    """Train :class:`EmotionNet` by weighted MSE on the movable points (CPU or CUDA)."""

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if dev == "cpu":
        torch.set_num_threads(1)  # a small MLP: extra threads only oversubscribe shared CPUs (measured 20x slower)
    try:
        return _fit(x, labels, y, w, template, cfg, dev, progress)
    finally:
        torch.set_num_threads(threads)


def _fit(x, labels, y, w, template, cfg: EmotionConfig, dev: str, progress: bool) -> tuple[EmotionNet, dict]:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    net = EmotionNet(cfg)
    net.in_mean.copy_(torch.from_numpy(x.mean(0)))
    net.in_std.copy_(torch.from_numpy(x.std(0) + 1e-4))
    scale = float(np.sqrt((y ** 2).sum(-1).mean()) + 1e-6)
    net.out_scale.fill_(scale)
    net.template.copy_(torch.from_numpy(template))
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
        from avatar.errors import TrainingDiverged

        raise TrainingDiverged("emotion training produced NaN; lower --lr or check the clips")
    net.eval().cpu()
    return net, {"final_loss": float(np.mean(losses[-50:])), "out_scale": scale, "n_frames": int(len(x))}


def evaluate_speaker(net: EmotionNet, st: SpeakerTracks, window: int) -> dict:
    """Held-out metrics on a speaker with a neutral clip.

    For each label: cosine between the predicted displacement (mean over the neutral clip's frames
    used as the 'audio-driven neutral' input, retargeted to the speaker) and the real one (mean of
    the emotional clip minus the neutral mean) on :data:`EVAL_POINTS`; mouth LMD (mean L2 over the
    20 mouth points, canonical units) between neutral output and emotional output; and the
    max |output - input| at strength 0 (must be 0).
    """
    if st.neutral_mean is None or "neutral" not in st.clips:
        raise InvalidInput(f"speaker {st.speaker} has no neutral clip; it cannot be evaluated")
    neutral_lm = st.clips["neutral"][0]
    nmean = st.neutral_mean
    scale = region_scale(net.template.numpy(), nmean)
    xin = torch.from_numpy(causal_windows(speech_features(neutral_lm, nmean), window))
    ev = list(EVAL_POINTS)
    rows = {}
    for label, lms in st.clips.items():
        if label == "neutral":
            continue
        with torch.no_grad():
            pred = net(xin, torch.full((len(xin),), LABELS.index(label))).numpy() * scale
        real = (np.concatenate(lms) - nmean).mean(0)
        a, b = pred.mean(0)[ev].ravel(), real[ev].ravel()
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
        mouth = list(MOUTH)
        lmd = float(np.linalg.norm(pred[:, mouth], axis=-1).mean())
        rows[label] = {"cosine": cos, "mouth_lmd": lmd, "pred_norm": float(np.linalg.norm(a)), "real_norm": float(np.linalg.norm(b))}
    return rows


def save_emotion_model(net: EmotionNet, cfg: EmotionConfig, metrics: dict, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``metrics.json`` atomically to ``out``."""
    from safetensors.torch import save_file

    from avatar.atomic import atomic_dir
    from avatar.config import save_json

    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(Path(tmp) / "model.safetensors"))
        save_json({"schema": "avatar.emotion/1", "labels": list(LABELS), "speech_points": list(SPEECH),
                   "config": _cfg_dict(cfg)}, Path(tmp) / "config.json")
        save_json(metrics, Path(tmp) / "metrics.json")
    return Path(out)


def _cfg_dict(cfg: EmotionConfig) -> dict:
    from avatar.config import to_dict

    return to_dict(cfg)


def load_emotion_model(path: str | Path) -> EmotionNet:
    """Load a model written by :func:`save_emotion_model` (safetensors only; never unpickles).

    Raises:
        BundleCorrupt: missing/unreadable files or a different schema.
    """
    from safetensors.torch import load_file

    from avatar.config import from_dict, load_json

    path = Path(path)
    try:
        meta = load_json(path / "config.json")
        if meta.get("schema") != "avatar.emotion/1" or tuple(meta.get("labels", ())) != LABELS:
            raise BundleCorrupt(f"{path}: not an avatar.emotion/1 model; retrain it with `avatar train-emotion`")
        cfg = from_dict(EmotionConfig, meta["config"])
        net = EmotionNet(cfg)
        net.load_state_dict(load_file(str(path / "model.safetensors")))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise BundleCorrupt(f"{path}: emotion model unreadable ({e}); retrain it with `avatar train-emotion CLIPS_DIR --out {path}`") from e
    net.cfg = cfg
    return net.eval()


def train_emotion(clips_dir: str | Path, out: str | Path, cfg: EmotionConfig | None = None,
                  overwrite: bool = False, progress: bool = True, tracks: list[SpeakerTracks] | None = None) -> dict:
    """Train the category emotion model on labelled clips and save it to ``out``.

    Args:
        clips_dir: folder of clips named ``<speaker>_front_<label>_level<k>_<n>.mp4`` /
            ``eamm_<label>.mp4`` (audio not needed).
        out: output directory (model.safetensors, config.json, metrics.json).
        cfg: hyper-parameters; ``cfg.holdout`` names a speaker kept out for evaluation.
        tracks: pre-tracked speakers (skips tracking; used by the benchmark).
    Returns:
        the metrics dict (also written as metrics.json).
    Raises:
        InvalidInput: bad folder / no usable clips / unknown holdout. OutputExists: ``out`` exists.
    """
    from avatar.atomic import check_output_dir

    cfg = cfg or EmotionConfig()
    check_output_dir(out, overwrite)
    t0 = time.perf_counter()
    tracks = tracks if tracks is not None else track_speakers(clips_dir, progress=progress)
    t_track = time.perf_counter() - t0
    held = [st for st in tracks if st.speaker == cfg.holdout]
    if cfg.holdout is not None and not held:
        raise InvalidInput(f"holdout speaker {cfg.holdout!r} not found; speakers: {sorted(st.speaker for st in tracks)}")
    train = [st for st in tracks if st.speaker != cfg.holdout]
    x, lab, y, w, template = build_training_set(train, cfg.window, cfg.no_neutral_weight)
    t1 = time.perf_counter()
    net, fit = fit_emotion_net(x, lab, y, w, template, cfg, progress=progress)
    t_train = time.perf_counter() - t1
    metrics = {"train_speakers": [st.speaker for st in train], "track_s": t_track, "train_s": t_train, **fit}
    if held:
        rows = evaluate_speaker(net, held[0], cfg.window)
        metrics["holdout"] = {"speaker": cfg.holdout, "labels": rows,
                              "mean_cosine": float(np.mean([r["cosine"] for r in rows.values()]))}
    save_emotion_model(net, cfg, metrics, out, overwrite=overwrite)
    log.info("emotion model written to %s (train %.1f s)", out, t_train)
    return metrics


# ---------------------------------------------------------------------------------------------
# the reference-video path (EAMM-style)
def reference_displacement(path: str | Path, avatar_mean: np.ndarray, smooth_s: float = 0.28) -> np.ndarray:
    """Time-varying expression displacement of a reference video, retargeted to the avatar.

    Tracks the reference, removes pose and scale (canonical landmarks), removes identity by
    subtracting the reference's own mean shape, occludes the mouth/jaw (:data:`FROZEN` = 0),
    smooths with a zero-phase Savitzky-Golay filter (``smooth_s`` seconds) and scales each region by
    the avatar's/reference's extent ratio (:func:`region_scale`).

    Args:
        path: the reference video (any fps; read at 25 fps, at most 60 s).
        avatar_mean: float32 [68, 3] the avatar's mean canonical shape.
    Returns:
        float32 [R, 68, 3] displacement per reference frame (canonical units).
    Raises:
        InvalidMedia: unreadable file. NoFaceDetected: no face in most frames.
    """
    from scipy.signal import savgol_filter

    clip = track_clip(path, max_frames=MAX_REFERENCE_FRAMES)
    (lm,), _ = canonicalise_speaker([clip])
    mean = lm.mean(0)
    disp = (lm - mean[None]) * _MOVABLE_MASK[None]
    w = int(round(smooth_s * FPS)) | 1
    if len(disp) >= w and w >= 5:
        disp = savgol_filter(disp, w, 2, axis=0, mode="interp")
    return (disp * region_scale(mean, avatar_mean)[None]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the render hook
def find_emotion_model(root: Path) -> Path | None:
    """``root/emotion`` (bundle-local) first, then ``root/../../shared/emotion`` (the store's)."""
    for cand in (root / "emotion", root.parent.parent / "shared" / "emotion"):
        if (cand / "model.safetensors").is_file():
            return cand
    return None


def clamp_to_reference(out: np.ndarray, inp: np.ndarray, lm3d_ref: np.ndarray, margin: float = CLAMP_MARGIN) -> np.ndarray:
    """Clamp ``out`` per landmark and axis to the person's range (``lm3d_ref`` [M, 68, 3] min..max
    widened by ``margin`` x range) but never tighter than the input ``inp`` (audio motion kept)."""
    lo, hi = lm3d_ref.min(0), lm3d_ref.max(0)
    pad = margin * (hi - lo)
    lo = np.minimum(lo - pad, inp)
    hi = np.maximum(hi + pad, inp)
    return np.clip(out, lo, hi)


class EmotionDelta:
    """The callable returned by :func:`build_emotion_delta`.

    ``__call__(lm3d float32 [K, 68, 3], frames int [K]) -> float32 [K, 68, 3]``. Keeps the last
    ``window - 1`` frames of speech input by absolute frame index, so consecutive blocks see a
    continuous causal window (blocks arrive in order in batch renders and streams alike).
    """

    def __init__(self, models, schedule, strength: float, net: EmotionNet | None, ref_disp: np.ndarray | None):
        self.mean = np.asarray(models.lm3d_mean, np.float32)
        self.ref = np.asarray(models.lm3d_ref, np.float32)
        self.schedule = schedule
        self.strength = float(strength)
        self.net = net
        self.ref_disp = ref_disp
        self.window = net.cfg.window if net is not None else 1
        self.scale = region_scale(net.template.numpy(), self.mean) if net is not None else None
        self._hist: dict[int, np.ndarray] = {}

    def delta(self, lm3d: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """float32 [K, 68, 3] displacement (before clamping) at strength 1 x ``strength``."""
        k = len(frames)
        if self.ref_disp is not None:
            return self.ref_disp[pingpong(frames, len(self.ref_disp))] * self.strength
        feats = speech_features(lm3d, self.mean)
        first = int(frames[0]) if k else 0
        past = [self._hist.get(first - j) for j in range(self.window - 1, 0, -1)]
        past = [p if p is not None else feats[0] for p in past]
        seq = np.concatenate([np.stack(past).reshape(-1, feats.shape[1]), feats]) if past else feats
        win = causal_windows(seq, self.window)[len(past):]
        for f, v in zip(frames[-(self.window - 1):] if self.window > 1 else [], feats[-(self.window - 1):]):
            self._hist[int(f)] = v
        for key in [key for key in self._hist if key < first + k - self.window]:
            del self._hist[key]
        weights = schedule_weights(self.schedule, frames)
        out = np.zeros((k, 68, 3), np.float32)
        x = torch.from_numpy(win)
        for label, w in weights.items():
            if label == "neutral" or not np.any(w > 0):
                continue
            with torch.no_grad():
                d = self.net(x, torch.full((k,), LABELS.index(label))).numpy()
            out += w[:, None, None] * d
        return out * self.scale[None] * self.strength

    def __call__(self, lm3d: np.ndarray, frames: np.ndarray) -> np.ndarray:
        if self.strength == 0.0:
            return lm3d
        lm3d = np.asarray(lm3d, np.float32)
        frames = np.asarray(frames, np.int64)
        d = self.delta(lm3d, frames) * _MOVABLE_MASK[None]
        return clamp_to_reference(lm3d + d, lm3d, self.ref).astype(np.float32)


def build_emotion_delta(models, options) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The render engine's emotion hook.

    Args:
        models: needs ``root`` (Path), ``lm3d_mean`` float32 [68, 3], ``lm3d_ref`` float32 [M, 68, 3]
            (:class:`avatar.pipeline.bundle.AvatarModels`).
        options: :class:`avatar.pipeline.render.RenderOptions` (``emotion`` label or schedule,
            ``emotion_strength`` 0..1.5, ``emotion_video`` overriding the label).
    Returns:
        ``f(lm3d float32 [K, 68, 3], frames int [K]) -> float32 [K, 68, 3]``, deterministic; strength 0
        returns its input unchanged.
    Raises:
        InvalidInput: unknown label / bad schedule / strength outside [0, 1.5].
        InvalidMedia / NoFaceDetected: unreadable reference video / no face in it.
        AvatarNotFound: a non-neutral label but no trained emotion model.
        BundleCorrupt: the emotion model is unreadable.
    """
    strength = float(options.emotion_strength)
    if not (0.0 <= strength <= MAX_STRENGTH) or math.isnan(strength):
        raise InvalidInput(f"emotion strength must be in [0, {MAX_STRENGTH}], got {options.emotion_strength}")
    schedule = parse_emotion_schedule(options.emotion)
    if strength == 0.0:  # the identity, bit for bit (nothing is loaded or tracked)
        return EmotionDelta(models, schedule, 0.0, None, None)
    if options.emotion_video:
        cache = models.__dict__.setdefault("_emotion_ref_cache", {})
        p = Path(options.emotion_video)
        key = (str(p.resolve()), p.stat().st_mtime if p.exists() else None)
        if key not in cache:
            cache[key] = reference_displacement(p, np.asarray(models.lm3d_mean, np.float32))
        return EmotionDelta(models, schedule, strength, None, cache[key])
    net = None
    if any(label != "neutral" for label, _ in schedule) and strength > 0:
        net = getattr(models, "_emotion_model", None)
        if net is None:
            where = find_emotion_model(Path(models.root))
            if where is None:
                raise AvatarNotFound(
                    f"no emotion model for emotion {options.emotion!r} (looked in {Path(models.root) / 'emotion'} and "
                    f"{Path(models.root).parent.parent / 'shared' / 'emotion'}); train one with "
                    "`avatar train-emotion CLIPS_DIR --out STORE/shared/emotion`, or render with emotion 'neutral'")
            net = load_emotion_model(where)
            models._emotion_model = net
    if net is None:
        strength = 0.0  # all-neutral schedule: the identity
    return EmotionDelta(models, schedule, strength, net, None)
