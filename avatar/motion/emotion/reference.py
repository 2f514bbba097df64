"""The reference-video path (EAMM-style): transfer the expression a reference video shows.

EAMM (Ji et al., SIGGRAPH 2022, Sec. 3.3) learns the emotion displacement as ``kp_video -
kp_audio``: the emotional keypoints minus the neutral, audio-driven ones, with the reference's
mouth region occluded so its speech does not leak. With a tracked 3-D landmark space we measure it
directly:

1. track the reference and bring it to canonical landmarks (pose and scale removed);
2. subtract the reference person's *neutral* shape (:mod:`.neutral`): a recorded neutral clip of
   that person when given, else a neutral segment of the clip itself when it has one, else the
   shared-statistics estimate (from the emotion model's statistics when a model is available,
   else the avatar's own mean shape as the template). Not the clip's own mean: that removes a
   held expression (MEAD clips hold one emotion throughout: cosine -0.07..0.09 with the real
   displacement before this fix, issue 14);
3. occlude lips and lower jaw (:data:`~.geometry.FROZEN` = 0: lip sync stays with the audio), smooth
   in time (zero-phase Savitzky-Golay);
4. retarget per region to the avatar (:func:`retarget_scale`) and loop ping-pong at render time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatar.data.dataset import FPS

from .geometry import MOVABLE_MASK, range_scale, region_scale
from .neutral import NeutralStats, estimate_neutral, neutral_segment
from .tracks import MAX_REFERENCE_FRAMES, TrackedClip, canonicalise_speaker, track_clip

log = logging.getLogger(__name__)

#: retargeting modes of :func:`retarget_scale`
RETARGET = ("proportions", "range")


@dataclass
class ReferenceExpression:
    """A measured reference expression: ``disp`` float32 [R, 68, 3] per reference frame (canonical
    units, movable points only, before retargeting), the reference ``neutral`` [68, 3], the
    reference ``track`` [R, 68, 3] and ``neutral_source`` ("clip", "segment" or "estimate")."""

    disp: np.ndarray
    neutral: np.ndarray
    track: np.ndarray
    neutral_source: str


def measure_reference(
    clip: TrackedClip, neutral_clip: TrackedClip | None = None, stats=None, smooth_s: float = 0.28
) -> ReferenceExpression:
    """Expression displacement of a tracked reference against its person's neutral (steps 1-3).

    Args:
        clip: the tracked reference.
        neutral_clip: a tracked neutral clip of the same person, or None.
        stats: :class:`~.neutral.NeutralStats` or a float [68, 3] template for the estimate (needed
            when ``neutral_clip`` is None).
        smooth_s: Savitzky-Golay window in seconds (< 0.2 s: no smoothing).
    Raises:
        ValueError: neither ``neutral_clip`` nor ``stats``.
    """
    from scipy.signal import savgol_filter

    if neutral_clip is not None:
        (lm,), neutral = canonicalise_speaker([clip], [neutral_clip])
        source = "clip"
    else:
        if stats is None:
            raise ValueError("measure_reference needs a neutral clip or neutral statistics")
        (lm,), _ = canonicalise_speaker([clip])
        neutral = estimate_neutral(lm.mean(0), stats)
        source = "estimate"
        seg = neutral_segment(lm, neutral)
        if seg is not None:
            neutral, source = lm[seg].mean(0), "segment"
    disp = (lm - neutral[None]) * MOVABLE_MASK[None]
    w = int(round(smooth_s * FPS)) | 1
    if len(disp) >= w and w >= 5:
        disp = savgol_filter(disp, w, 2, axis=0, mode="interp")
    return ReferenceExpression(disp.astype(np.float32), np.asarray(neutral, np.float32), lm, source)


def retarget_scale(
    ref: ReferenceExpression, avatar_mean: np.ndarray, avatar_track: np.ndarray | None = None, mode: str = "proportions"
) -> np.ndarray:
    """Per-landmark retargeting scale from the reference person to the avatar, float32 [68, 3].

    * ``"proportions"`` (default): the avatar's / reference's region extent of the *neutral* shapes
      (:func:`~.geometry.region_scale`);
    * ``"range"``: additionally the ratio of the avatar's own expression range (per-region RMS
      motion of its training landmarks ``avatar_track``) to the reference's
      (:func:`~.geometry.range_scale`).

    Measured on MEAD M030 <-> W009 (7 labels): transferred/real size 1.16 and 0.92 with proportions,
    1.60 and 0.74 with the talking-range ratio (the range of a talking clip is dominated by
    speech and blinks, not by expression), at equal cosine; hence the default.

    Raises:
        ValueError: unknown mode, or ``"range"`` without ``avatar_track``.
    """
    if mode not in RETARGET:
        raise ValueError(f"retarget mode must be one of {RETARGET}, got {mode!r}")
    scale = region_scale(ref.neutral, avatar_mean)
    if mode == "range":
        if avatar_track is None:
            raise ValueError("retarget mode 'range' needs the avatar's landmark track")
        scale = scale * range_scale(ref.track, avatar_track)
    return scale.astype(np.float32)


def reference_displacement(
    path: str | Path,
    avatar_mean: np.ndarray,
    smooth_s: float = 0.28,
    neutral_path: str | Path | None = None,
    stats=None,
    avatar_track: np.ndarray | None = None,
    retarget: str = "proportions",
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """Time-varying expression displacement of a reference video, retargeted to the avatar.

    Args:
        path: the reference video (any fps; read at 25 fps, at most 60 s).
        avatar_mean: float32 [68, 3] the avatar's mean canonical shape.
        smooth_s: temporal smoothing window (seconds).
        neutral_path: optional neutral video of the reference person (best neutral source).
        stats: shared neutral statistics (:meth:`EmotionNet.neutral_stats`); None = the avatar's
            mean shape as the template.
        avatar_track: float32 [M, 68, 3] the avatar's training landmarks (for ``retarget="range"``).
        retarget: :func:`retarget_scale` mode.
        cache_dir: cache of tracked points.
    Returns:
        float32 [R, 68, 3] displacement per reference frame (canonical units), 0 at the lips and
        lower jaw.
    Raises:
        InvalidMedia: unreadable file. NoFaceDetected: no face in most frames.
    """
    clip = track_clip(path, max_frames=MAX_REFERENCE_FRAMES, cache_dir=cache_dir)
    neutral_clip = (
        track_clip(neutral_path, max_frames=MAX_REFERENCE_FRAMES, cache_dir=cache_dir) if neutral_path else None
    )
    if stats is None:
        stats = NeutralStats.from_template(avatar_mean)
    ref = measure_reference(clip, neutral_clip, stats, smooth_s)
    log.info("reference %s: neutral from %s", Path(path).name, ref.neutral_source)
    return (ref.disp * retarget_scale(ref, avatar_mean, avatar_track, retarget)[None]).astype(np.float32)
