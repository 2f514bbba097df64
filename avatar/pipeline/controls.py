"""Expression and head-motion controls applied to the landmark/pose tracks before the NeRFs.

* Head pose replay (GeneFace/RAD-NeRF render with the training video's poses): the tracked pose
  track is replayed as a ping-pong loop (forward, then backward), so there is never a jump at the
  loop point; ``speed`` re-times it (EMO's head-motion speed), ``amplitude`` scales the deviation
  from the mean pose (SadTalker's pose style strength), ``still`` holds the mean pose.
* Blinks (SadTalker's blink control): blink events from a seeded Poisson process at the person's
  own blink rate (or a user rate), each a raised-cosine closure of the eye landmarks towards the
  person's own closed-eye shape (measured from the tracked eye aspect ratio).

All functions are deterministic in the absolute frame index, so a streaming session and a batch
render produce identical tracks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from avatar.data.dataset import EYES, FPS

BLINK_FRAMES = 7  # a blink lasts ~0.28 s at 25 fps (typical human blink 0.1-0.4 s)


def mean_pose(track: np.ndarray) -> np.ndarray:
    """Chordal L2 mean rotation and mean translation of a pose track.

    Args:
        track: float32 [M, 4, 4] head-to-camera transforms.
    Returns:
        float32 [4, 4].
    """
    out = np.eye(4, dtype=np.float32)
    out[:3, :3] = Rotation.from_matrix(track[:, :3, :3].astype(np.float64)).mean().as_matrix()
    out[:3, 3] = track[:, :3, 3].mean(0)
    return out


class PoseReplay:
    """Replays a tracked pose track as a smooth ping-pong loop with speed / amplitude controls.

    Args:
        track: float32 [M, 4, 4] tracked head-to-camera poses (the training part of the video).
        speed: playback speed (1 = as recorded; 0.5 = half as fast). Must be > 0.
        amplitude: scale of rotation/translation deviations from the mean pose (0 = still, 1 =
            as recorded, up to 2).
        still: hold the mean pose (same as ``amplitude=0``).
    """

    def __init__(self, track: np.ndarray, speed: float = 1.0, amplitude: float = 1.0, still: bool = False):
        self.track = np.asarray(track, dtype=np.float32)
        self.mean = mean_pose(self.track)
        self.speed = float(speed)
        self.amplitude = 0.0 if still else float(amplitude)
        r_mean = Rotation.from_matrix(self.mean[:3, :3].astype(np.float64))
        # deviations from the mean as rotation vectors (small angles: linear interpolation is smooth)
        self._dev_rot = (r_mean.inv() * Rotation.from_matrix(self.track[:, :3, :3].astype(np.float64))).as_rotvec()
        self._dev_t = self.track[:, :3, 3].astype(np.float64) - self.mean[:3, 3]
        self._r_mean = r_mean

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """Poses for absolute output frame indices.

        Args:
            frames: int [K] output frame indices (>= 0).
        Returns:
            float32 [K, 4, 4].
        """
        frames = np.asarray(frames, dtype=np.float64)
        m = len(self.track)
        if m == 1 or self.amplitude == 0.0:
            dev_rot = np.zeros((len(frames), 3))
            dev_t = np.zeros((len(frames), 3))
        else:
            u = frames * self.speed
            period = 2 * (m - 1)
            p = np.mod(u, period)
            pos = np.where(p <= m - 1, p, period - p)
            i0 = np.clip(np.floor(pos).astype(int), 0, m - 1)
            i1 = np.clip(i0 + 1, 0, m - 1)
            w = (pos - i0)[:, None]
            dev_rot = (1 - w) * self._dev_rot[i0] + w * self._dev_rot[i1]
            dev_t = (1 - w) * self._dev_t[i0] + w * self._dev_t[i1]
        out = np.tile(np.eye(4, dtype=np.float32), (len(frames), 1, 1))
        out[:, :3, :3] = (self._r_mean * Rotation.from_rotvec(self.amplitude * dev_rot)).as_matrix()
        out[:, :3, 3] = self.mean[:3, 3] + self.amplitude * dev_t
        return out


@dataclass
class BlinkModel:
    """The person's blink statistics and eye shapes (canonical lm3d frame).

    Attributes:
        rate_per_min: blinks per minute measured on the training video.
        eyes_open: float32 [12, 3] mean open-eye landmarks (iBUG 36-47).
        eyes_closed_delta: float32 [12, 3] displacement from open to fully closed eyes.
    """

    rate_per_min: float
    eyes_open: np.ndarray
    eyes_closed_delta: np.ndarray

    @staticmethod
    def fit(lm3d: np.ndarray, ear: np.ndarray, fps: int = FPS) -> "BlinkModel":
        """Measure blink rate and closed-eye shape from a tracked clip.

        A blink is a run of frames whose eye aspect ratio falls below 70% of the clip's median
        (Soukupova & Cech 2016 use a fixed EAR threshold; a relative one adapts to the person).

        Args:
            lm3d: float32 [N, 68, 3] canonical landmarks; ear: float32 [N] eye aspect ratio.
        """
        lm3d = np.asarray(lm3d, dtype=np.float32)
        ear = np.asarray(ear, dtype=np.float32)
        med = float(np.median(ear))
        closed = ear < 0.7 * med
        is_open = ear > 0.95 * med
        onsets = int(np.sum(closed[1:] & ~closed[:-1]) + (1 if closed[:1].any() else 0))
        minutes = max(len(ear) / fps / 60.0, 1e-6)
        rate = onsets / minutes
        eyes_open = lm3d[is_open][:, EYES].mean(0) if is_open.any() else lm3d[:, EYES].mean(0)
        if closed.sum() >= 2:
            # the most-closed frames define the closed shape
            idx = np.argsort(ear)[: max(2, int(closed.sum() // 2))]
            delta = lm3d[idx][:, EYES].mean(0) - eyes_open
        else:
            # no blink observed: close the lids geometrically (upper lid meets lower lid)
            delta = np.zeros_like(eyes_open)
            for upper, lower in ((1, 5), (2, 4), (7, 11), (8, 10)):
                mid = 0.5 * (eyes_open[upper] + eyes_open[lower])
                delta[upper] = mid - eyes_open[upper]
                delta[lower] = mid - eyes_open[lower]
        # typical human rate is 10-20/min; a clip with too few blinks falls back to 12/min
        rate = float(np.clip(rate, 4.0, 30.0)) if onsets >= 2 else 12.0
        return BlinkModel(rate, eyes_open.astype(np.float32), delta.astype(np.float32))

    def to_dict(self) -> dict:
        return {
            "rate_per_min": self.rate_per_min,
            "eyes_open": self.eyes_open.tolist(),
            "eyes_closed_delta": self.eyes_closed_delta.tolist(),
        }

    @staticmethod
    def from_dict(d: dict) -> "BlinkModel":
        return BlinkModel(
            float(d["rate_per_min"]),
            np.asarray(d["eyes_open"], np.float32),
            np.asarray(d["eyes_closed_delta"], np.float32),
        )


class BlinkSchedule:
    """Deterministic blink closure amount per absolute frame (0 open .. 1 closed).

    Inter-blink intervals are drawn from a seeded exponential distribution (Poisson process) with
    a 1 s refractory minimum; the closure of each blink is a raised cosine over ``BLINK_FRAMES``.

    Args:
        rate_per_min: blinks per minute (0 disables blinking).
        seed: RNG seed; the same seed gives the same schedule.
    """

    def __init__(self, rate_per_min: float, seed: int = 0):
        if rate_per_min < 0:
            raise ValueError("blink rate must be >= 0")
        self.rate = float(rate_per_min)
        self._rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xB1])
        self._onsets: list[int] = []
        self._next = 0.0

    def _extend(self, until: int) -> None:
        mean_gap = 60.0 * FPS / self.rate
        while self._next <= until + BLINK_FRAMES:
            # shifted exponential: a 1 s refractory period plus an exponential remainder, so the
            # mean gap (hence the rate) is exactly the requested one (max() would bias it low)
            gap = FPS * 1.0 + self._rng.exponential(max(mean_gap - FPS * 1.0, 0.0))
            self._next += gap
            self._onsets.append(int(round(self._next)))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """float32 [K] closure amount for int frame indices ``frames``."""
        frames = np.asarray(frames, dtype=np.int64)
        out = np.zeros(len(frames), dtype=np.float32)
        if self.rate == 0 or len(frames) == 0:
            return out
        self._extend(int(frames.max()))
        onsets = np.asarray(self._onsets)
        phase = frames[:, None] - onsets[None, :]
        inside = (phase >= 0) & (phase < BLINK_FRAMES)
        bump = 0.5 - 0.5 * np.cos(2 * np.pi * (phase + 0.5) / BLINK_FRAMES)
        out = np.where(inside, bump, 0.0).max(axis=1).astype(np.float32)
        return out


def apply_eyes(lm3d: np.ndarray, closure: np.ndarray, blink: BlinkModel) -> np.ndarray:
    """Replace the eye landmarks by the person's open eyes closed by ``closure``.

    Args:
        lm3d: float32 [K, 68, 3]; closure: float32 [K] in [0, 1].
    Returns:
        float32 [K, 68, 3] (a copy).
    """
    out = np.array(lm3d, dtype=np.float32, copy=True)
    out[:, EYES] = blink.eyes_open[None] + closure[:, None, None] * blink.eyes_closed_delta[None]
    return out
