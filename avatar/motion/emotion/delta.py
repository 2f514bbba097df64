"""The render hook: an emotion delta on the canonical landmarks, per absolute frame index.

The render engine (:class:`avatar.pipeline.render.MotionEngine`) adds it after the postnet and the
eyes/blinks, before the NeRF. Lip sync is preserved by construction: the lip-closure landmarks and
the lower jaw keep the audio-driven motion (:data:`~.geometry.FROZEN`, delta = 0); the mouth
corners may move. The result is clamped to the person's own landmark range (``models.lm3d_ref``)
widened by :data:`CLAMP_MARGIN`, so the NeRF stays near its training data (anchors D.4 caution).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from avatar.errors import AvatarNotFound, InvalidInput

from .geometry import MOVABLE_MASK, causal_windows, pingpong, region_scale, speech_features
from .model import EmotionNet, load_emotion_model
from .reference import reference_displacement
from .schedule import LABELS, MAX_STRENGTH, parse_emotion_schedule, schedule_weights

#: clamp bound widening, as a fraction of the person's per-landmark range
CLAMP_MARGIN = 0.25


def find_emotion_model(root: Path) -> Path | None:
    """``root/emotion`` (bundle-local) first, then ``root/../../shared/emotion`` (the store's)."""
    for cand in (root / "emotion", root.parent.parent / "shared" / "emotion"):
        if (cand / "model.safetensors").is_file():
            return cand
    return None


def clamp_to_reference(
    out: np.ndarray, inp: np.ndarray, lm3d_ref: np.ndarray, margin: float = CLAMP_MARGIN
) -> np.ndarray:
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
        win = causal_windows(seq, self.window)[len(past) :]
        for f, v in zip(frames[-(self.window - 1) :] if self.window > 1 else [], feats[-(self.window - 1) :]):
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
        d = self.delta(lm3d, frames) * MOVABLE_MASK[None]
        return clamp_to_reference(lm3d + d, lm3d, self.ref).astype(np.float32)


def _load_model(models, required: bool, what: str) -> EmotionNet | None:
    net = getattr(models, "_emotion_model", None)
    if net is not None:
        return net
    where = find_emotion_model(Path(models.root))
    if where is None:
        if not required:
            return None
        raise AvatarNotFound(
            f"no emotion model for emotion {what!r} (looked in {Path(models.root) / 'emotion'} and "
            f"{Path(models.root).parent.parent / 'shared' / 'emotion'}); train one with "
            "`avatar train-emotion CLIPS_DIR --out STORE/shared/emotion`, or render with emotion 'neutral'"
        )
    net = load_emotion_model(where)
    models._emotion_model = net
    return net


def build_emotion_delta(models, options) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The render engine's emotion hook.

    Args:
        models: needs ``root`` (Path), ``lm3d_mean`` float32 [68, 3], ``lm3d_ref`` float32 [M, 68, 3]
            (:class:`avatar.pipeline.bundle.AvatarModels`).
        options: :class:`avatar.pipeline.render.RenderOptions` (``emotion`` label or schedule,
            ``emotion_strength`` 0..1.5, ``emotion_video`` overriding the label; an optional
            ``emotion_neutral_video`` attribute names a neutral clip of the reference's person).
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
        neutral = getattr(options, "emotion_neutral_video", None)
        key = (str(p.resolve()), p.stat().st_mtime if p.exists() else None, str(neutral))
        if key not in cache:
            net = _load_model(models, required=False, what=str(p))  # its shared neutral statistics, if any
            cache[key] = reference_displacement(
                p,
                np.asarray(models.lm3d_mean, np.float32),
                neutral_path=neutral,
                stats=net.neutral_stats() if net is not None else None,
            )
        return EmotionDelta(models, schedule, strength, None, cache[key])
    net = None
    if any(label != "neutral" for label, _ in schedule):
        net = _load_model(models, required=True, what=options.emotion)
    if net is None:
        strength = 0.0  # all-neutral schedule: the identity
    return EmotionDelta(models, schedule, strength, net, None)
