"""The neutral reference: what an emotion displacement is measured against.

An emotion is a displacement from the person's *neutral* face (EAMM, Ji et al. SIGGRAPH 2022,
Sec. 3.3 learns ``kp_video - kp_audio`` against the neutral, audio-driven keypoints; EAT, Gan et
al. ICCV 2023, Sec. 3.4 the emotional minus the neutral keypoints). Subtracting a clip's *own* mean
instead removes a held expression (MEAD clips hold one emotion throughout). Sources of a neutral,
best first:

1. a recorded neutral clip of the same person (exact up to tracking noise);
2. a neutral segment inside the clip itself (:func:`neutral_segment`: the clip's least
   expressive frames, accepted only when they are clearly less expressive than the rest);
3. an estimate from shared statistics (:func:`estimate_neutral`): the mean recorded-neutral
   shape, similarity-aligned on the emotion-stable points (:data:`~.geometry.STABLE`), plus a
   least-squares fit of identity directions (principal components of the recorded neutral shapes)
   *jointly* with expression directions (the labels' mean displacements), so the identity part
   cannot absorb the expression. Only the identity part becomes the neutral.

Measured (tracked MEAD M030 / W009, each estimated from the other speaker's statistics plus the
W015 neutral clip, 7 labels x 2 speakers): the displacement against the estimated neutral points
like the displacement against the recorded neutral with cosine 0.83 on average (min 0.69) and is
1.19x its size; aligning on the face contour instead of nose + eye corners gave 0.74, and identity
directions taken from ~60 in-the-wild talking clips (corpus/, corpus2/) instead of the MEAD neutrals
gave 0.66-0.68 (their capture and their own expressions differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import EVAL_POINTS, similarity_fit

#: at most this many identity directions are kept
MAX_IDENTITY = 4
#: a clip has a neutral segment when the mean shapes of its least and most expressive fifths of
#: frames differ by at least this much on EVAL_POINTS (canonical units). Measured: 0.04-0.16 within
#: the 16 MEAD M030/W009 clips (each holds one expression, with some onset), 0.13-0.24 for the 28
#: joins neutral clip + emotional clip of the same person; 0.17 separates without false positives
#: on the held clips and finds 16 of the 28 joins (the rest fall back to the estimate).
SEGMENT_CONTRAST = 0.17
SEGMENT_MIN_FRAMES = 12


@dataclass
class NeutralStats:
    """Shared neutral/expression statistics (canonical units).

    Attributes:
        template: float32 [68, 3] mean of the recorded neutral shapes (Procrustes-aligned on
            :data:`~.geometry.STABLE`).
        id_basis: float32 [K, 68, 3] orthonormal identity directions about the template (K may be 0).
        ex_basis: float32 [M, 68, 3] unit-norm expression directions (M may be 0).
        ridge: Tikhonov weight of the joint least-squares fit.
    """

    template: np.ndarray
    id_basis: np.ndarray
    ex_basis: np.ndarray
    ridge: float = 0.01

    @classmethod
    def from_template(cls, template: np.ndarray) -> "NeutralStats":
        """Statistics with a template only (no identity / expression directions)."""
        z = np.zeros((0, 68, 3), np.float32)
        return cls(np.asarray(template, np.float32), z, z)


def build_neutral_stats(
    neutrals: list[np.ndarray], displacements: list[np.ndarray], max_identity: int = MAX_IDENTITY, ridge: float = 0.01
) -> NeutralStats:
    """Shared statistics from recorded neutral shapes and measured expression displacements.

    Args:
        neutrals: float [68, 3] neutral mean shapes of different people (>= 1).
        displacements: float [68, 3] emotion displacements measured against recorded neutrals
            (e.g. per-label means); zero-norm ones are dropped.
        max_identity: number of identity principal components kept (at most len(neutrals) - 1).
    Raises:
        ValueError: no neutral shape.
    """
    if not neutrals:
        raise ValueError("build_neutral_stats needs at least one neutral shape")
    shapes = np.stack([np.asarray(n, np.float64) for n in neutrals])
    ref = shapes.mean(0)
    for _ in range(3):  # generalised Procrustes on the stable points
        shapes = np.stack([similarity_fit(s, ref) for s in shapes])
        ref = shapes.mean(0)
    k = min(max_identity, len(shapes) - 1)
    if k > 0:
        _, sv, vt = np.linalg.svd((shapes - ref).reshape(len(shapes), -1), full_matrices=False)
        keep = [i for i in range(k) if sv[i] > 1e-6]
        id_basis = vt[keep].reshape(-1, 68, 3)
    else:
        id_basis = np.zeros((0, 68, 3))
    ex = [np.asarray(d, np.float64) for d in displacements if np.linalg.norm(d) > 1e-9]
    ex_basis = np.stack([d / np.linalg.norm(d) for d in ex]) if ex else np.zeros((0, 68, 3))
    return NeutralStats(ref.astype(np.float32), id_basis.astype(np.float32), ex_basis.astype(np.float32), ridge)


def estimate_neutral(clip_mean: np.ndarray, stats) -> np.ndarray:
    """Neutral shape of a person seen only in (possibly) expressive frames, float32 [68, 3].

    ``base`` = the template similarity-aligned to ``clip_mean`` on :data:`~.geometry.STABLE`;
    ``clip_mean - base`` is fitted by ridge least squares with identity and expression directions
    jointly; the neutral is ``base`` + the identity part (the expression part and the residual stay
    in the displacement).

    Args:
        clip_mean: float [68, 3] mean canonical shape of the clip(s).
        stats: :class:`NeutralStats`, or a float [68, 3] template (then only the alignment is done).
    """
    if not isinstance(stats, NeutralStats):
        stats = NeutralStats.from_template(stats)
    s = np.asarray(clip_mean, np.float64)
    base = similarity_fit(stats.template, s)
    if len(stats.id_basis) == 0:
        return base.astype(np.float32)
    b = np.asarray(stats.id_basis, np.float64).reshape(len(stats.id_basis), 204)
    x = np.asarray(stats.ex_basis, np.float64).reshape(len(stats.ex_basis), 204)
    a = np.concatenate([b, x])
    r = (s - base).ravel()
    c = np.linalg.solve(a @ a.T + stats.ridge * np.eye(len(a)), a @ r)
    return (base + (c[: len(b)] @ b).reshape(68, 3)).astype(np.float32)


def expression_energy(lm: np.ndarray, neutral: np.ndarray, smooth: int = 9) -> np.ndarray:
    """Per-frame distance from ``neutral`` on :data:`~.geometry.EVAL_POINTS`, float64 [N],
    moving-averaged over ``smooth`` frames (blinks and speech are short; expressions are held)."""
    ev = list(EVAL_POINTS)
    e = np.linalg.norm(
        (np.asarray(lm, np.float64)[:, ev] - np.asarray(neutral, np.float64)[ev]).reshape(len(lm), -1), axis=1
    )
    if smooth > 1 and len(e) >= smooth:
        e = np.convolve(np.pad(e, smooth // 2, mode="edge"), np.ones(smooth) / smooth, mode="valid")
    return e


def neutral_segment(
    lm: np.ndarray, neutral_guess: np.ndarray, contrast: float = SEGMENT_CONTRAST, min_frames: int = SEGMENT_MIN_FRAMES
) -> np.ndarray | None:
    """Frames of a clip that form a neutral segment, or None when the clip has none.

    The least expressive fifth of the frames (by :func:`expression_energy` against
    ``neutral_guess``) counts as a neutral segment only if its mean shape differs from the mean
    shape of the most expressive fifth by >= ``contrast`` on :data:`~.geometry.EVAL_POINTS` and it
    has >= ``min_frames`` frames: a clip that holds one expression throughout (all MEAD clips) has
    no such contrast, and using its "least expressive" frames would remove the held expression again.

    Args:
        lm: float [N, 68, 3] canonical landmarks of one clip.
        neutral_guess: float [68, 3] a neutral estimate (:func:`estimate_neutral`).
    Returns:
        bool [N] mask of the segment's frames, or None.
    """
    if len(lm) < 5 * min_frames:
        return None
    lm = np.asarray(lm, np.float64)
    e = expression_energy(lm, neutral_guess)
    lo, hi = e <= np.quantile(e, 0.2), e >= np.quantile(e, 0.8)
    ev = list(EVAL_POINTS)
    if lo.sum() < min_frames or np.linalg.norm(lm[hi].mean(0)[ev] - lm[lo].mean(0)[ev]) < contrast:
        return None
    return lo
