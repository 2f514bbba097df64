"""A small synthetic dataset in the on-disk format of :mod:`avatar.data.dataset`, written with numpy
and OpenCV only (no PyAV, mediapipe or librosa), for tests that must run without the preprocessing
stack. The scene is a bright disc (the "head") over a torso band on a textured background, seen by
the dataset's default camera; landmarks are a fixed face-like cloud whose mouth opens and closes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from avatar.data.dataset import FEATURES_PER_FRAME, SAMPLES_PER_FRAME, SCHEMA, write_dataset


def make_dataset(root: str | Path, n_frames: int = 60, size: int = 64, seed: int = 0) -> Path:
    """Write a dataset of ``n_frames`` frames of ``size`` px at ``root`` (must not exist); returns it."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    n, S = int(n_frames), int(size)
    # canonical landmarks: outer eye corners (36, 45) 1 unit apart, a face-sized cloud around them
    mean = np.concatenate([rng.uniform([-0.8, -1.0, -0.3], [0.8, 1.0, 0.3], (68, 3))]).astype(np.float32)
    mean[36], mean[45] = (-0.5, -0.3, 0.0), (0.5, -0.3, 0.0)
    t = np.arange(n, dtype=np.float32)
    lm3d = np.repeat(mean[None], n, 0)
    lm3d[:, 57, 1] += 0.1 * np.sin(t / 3.0)  # lower lip moves
    head_scale = 0.09
    pose = np.repeat(np.eye(4, dtype=np.float32)[None], n, 0)
    pose[:, :3, 3] = (0.0, 0.0, 0.6)
    pose[:, 0, 3] += 0.002 * np.sin(t / 5.0)  # a little head motion
    f = 1200.0 / 512.0 * S
    K = {"fx": f, "fy": f, "cx": S / 2.0, "cy": S / 2.0}
    cam = lm3d * head_scale + pose[:, None, :3, 3]
    lm2d = np.stack((K["fx"] * cam[..., 0] / cam[..., 2] + K["cx"], K["fy"] * cam[..., 1] / cam[..., 2] + K["cy"]), -1)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    background = (128 + 60 * np.sin(xx / 5.0)[..., None] * np.array([1.0, 0.5, -0.5])).clip(0, 255).astype(np.uint8)
    frames = np.empty((n, S, S, 3), np.uint8)
    masks = np.zeros((n, S, S), np.uint8)
    for i in range(n):
        cx = S / 2 + pose[i, 0, 3] * f / 0.6
        head = (xx - cx) ** 2 + (yy - 0.45 * S) ** 2 < (0.22 * S) ** 2
        torso = (yy > 0.7 * S) & (np.abs(xx - S / 2) < 0.3 * S)
        img = background.copy()
        img[torso] = (40, 60, 160)
        img[head] = (220, 180, 150)
        mouth = head & ((xx - cx) ** 2 / 4 + (yy - 0.55 * S) ** 2 < (0.03 * S * (1.5 + np.sin(i / 3.0))) ** 2)
        img[mouth] = (120, 30, 40)
        frames[i] = img
        masks[i][torso] = 1
        masks[i][head] = 2
    val_start = n - max(5, n // 10)
    arrays = {
        "background": background,
        "audio": (0.1 * rng.standard_normal(n * SAMPLES_PER_FRAME)).astype(np.float32),
        "features": rng.standard_normal((FEATURES_PER_FRAME * n, 80)).astype(np.float32),
        "lm2d": lm2d.astype(np.float32),
        "lm3d": lm3d,
        "lm3d_mean": mean,
        "blink": np.full(n, 0.3, np.float32),
        "pose": pose,
        "face_valid": np.ones(n, bool),
    }
    manifest = {
        "schema": SCHEMA,
        "fps": 25,
        "size": S,
        "n_frames": n,
        "intrinsics": K,
        "head_scale": head_scale,
        "features": {"kind": "mel", "dim": 80},
        "split": {"val_start": val_start, "n_train": val_start, "n_val": n - val_start},
        "source": {"path": "synthetic"},
        "crop_box": {"x0": 0, "y0": 0, "side": S},
    }
    write_dataset(root, frames, masks, arrays, manifest)
    json.loads((root / "manifest.json").read_text())
    return root
