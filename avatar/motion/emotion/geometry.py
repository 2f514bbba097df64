"""Landmark groups and geometry shared by the category model and the reference-video path.

Everything works on canonical lm3d [68, 3] (iBUG-300W order; identity-free after subtracting a
neutral shape; pose-free; outer-eye-corner distance of the mean = 1; see :mod:`avatar.data.dataset`).
"""

from __future__ import annotations

import numpy as np

from avatar.data.dataset import BROWS, EYES, JAW, MOUTH, NOSE

#: landmarks that keep the audio-driven motion: inner lips, outer-lip centre points, lower jaw
LIP_CLOSURE = tuple(range(60, 68)) + (50, 51, 52, 56, 57, 58)
LOWER_JAW = tuple(range(4, 13))
FROZEN = tuple(sorted(set(LIP_CLOSURE) | set(LOWER_JAW)))
#: landmarks an emotion may move (brows, eyes, nose, cheeks/upper jaw, mouth corners + neighbours)
MOVABLE = tuple(i for i in range(68) if i not in FROZEN)
#: speech landmarks fed to the deformation network (lip closure + chin): what audio drives
SPEECH = tuple(sorted(set(LIP_CLOSURE) | {7, 8, 9}))
#: points on which emotion direction and size are evaluated (brows, eyes, mouth corners)
EVAL_POINTS = tuple(BROWS + EYES + [48, 54])
#: regions for per-region proportion retargeting
REGIONS = {"jaw": JAW, "brows": BROWS, "nose": NOSE, "eyes": EYES, "mouth": MOUTH}
#: points an emotion barely moves: nose (27-35) and the four eye corners. Measured on MEAD M030 +
#: W009 (7 labels each): mean displacement 0.008-0.018 there vs 0.03-0.055 on brows, mouth and
#: even the face contour (0-3, 13-16), so identity (a neutral template) is aligned on these.
STABLE = tuple(NOSE) + (36, 39, 42, 45)
#: left-right mirror permutation of the 68 iBUG points
MIRROR = (
    tuple(range(16, -1, -1))
    + tuple(range(26, 16, -1))
    + (27, 28, 29, 30, 35, 34, 33, 32, 31)
    + (45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40)
    + (54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55)
    + (64, 63, 62, 61, 60, 67, 66, 65)
)
#: labels that are not left-right symmetric (FACS: contempt is the unilateral AU14)
ASYMMETRIC = ("contempt",)

MOVABLE_MASK = np.zeros((68, 1), np.float32)
MOVABLE_MASK[list(MOVABLE)] = 1.0


def region_scale(src_mean: np.ndarray, dst_mean: np.ndarray) -> np.ndarray:
    """Per-landmark, per-axis proportion retargeting scale float32 [68, 3]: for each region (jaw,
    brows, nose, eyes, mouth) the ratio of the destination's to the source's extent (std about the
    region centroid) along x, y, z, clipped to [0.5, 2]. Multiply a source displacement by it."""
    out = np.ones((68, 3), np.float32)
    for idx in REGIONS.values():
        s = np.asarray(src_mean, np.float64)[idx]
        d = np.asarray(dst_mean, np.float64)[idx]
        ratio = (d.std(0) + 1e-6) / (s.std(0) + 1e-6)
        out[idx] = np.clip(ratio, 0.5, 2.0)
    return out


def expression_range(track: np.ndarray) -> np.ndarray:
    """Per-region expression range of a canonical track, float32 [68, 1]: for each region the RMS
    distance of its points from their track mean (canonical units), broadcast to its points.

    Args:
        track: float32 [N, 68, 3] canonical landmarks of one person (N >= 2).
    """
    track = np.asarray(track, np.float64)
    out = np.ones((68, 1), np.float32)
    dev = track - track.mean(0, keepdims=True)
    for idx in REGIONS.values():
        out[idx] = float(np.sqrt((dev[:, idx] ** 2).sum(-1).mean()))
    return out


def range_scale(src_track: np.ndarray, dst_track: np.ndarray) -> np.ndarray:
    """Per-region ratio of the destination's to the source's :func:`expression_range`, float32
    [68, 1], clipped to [0.5, 2] (the "scale of the avatar's own expression range" retargeting)."""
    return np.clip(expression_range(dst_track) / (expression_range(src_track) + 1e-6), 0.5, 2.0).astype(np.float32)


def mirror(d: np.ndarray) -> np.ndarray:
    """Left-right mirror of displacements [..., 68, 3] (point permutation + x negated)."""
    m = np.asarray(d)[..., list(MIRROR), :].copy()
    m[..., 0] *= -1
    return m


def symmetrize(d: np.ndarray) -> np.ndarray:
    """The left-right symmetric part ``(d + mirror(d)) / 2`` of displacements [..., 68, 3]."""
    return 0.5 * (np.asarray(d) + mirror(d))


def similarity_fit(src: np.ndarray, dst: np.ndarray, idx=STABLE) -> np.ndarray:
    """``src`` [68, 3] moved by the least-squares similarity (Umeyama) that maps ``src[idx]`` onto
    ``dst[idx]``; float64 [68, 3]."""
    from avatar.face.pose import umeyama

    s, r, t = umeyama(np.asarray(src)[list(idx)], np.asarray(dst)[list(idx)])
    return (s * (r @ np.asarray(src, np.float64).T)).T + t


def cosine(a: np.ndarray, b: np.ndarray, idx=EVAL_POINTS) -> float:
    """Cosine between two displacements [68, 3] on the points ``idx`` (flattened)."""
    x, y = np.asarray(a, np.float64)[list(idx)].ravel(), np.asarray(b, np.float64)[list(idx)].ravel()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12))


def norm(a: np.ndarray, idx=EVAL_POINTS) -> float:
    """L2 norm of a displacement [68, 3] on the points ``idx`` (canonical units)."""
    return float(np.linalg.norm(np.asarray(a, np.float64)[list(idx)]))


def speech_features(lm3d: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Speech state per frame: float32 [K, len(SPEECH)*3] = (lm3d - mean) at :data:`SPEECH`."""
    return (np.asarray(lm3d, np.float32)[:, list(SPEECH)] - np.asarray(mean, np.float32)[list(SPEECH)]).reshape(
        len(lm3d), -1
    )


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
