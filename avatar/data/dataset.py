"""The per-person dataset on disk (output of ``avatar preprocess``, input of every training stage).

Layout of a dataset directory (all arrays are ``.npy``, opened memory-mapped; nothing requires
the whole clip in RAM)::

    manifest.json          schema, source (path, sha256, fps, size, duration, audio rate), fps=25,
                           size, n_frames, crop_box, intrinsics, features, split, flagged frames,
                           tool versions, the PreprocessConfig that made it
    frames.npy             uint8   [N, S, S, 3]  RGB video frames at 25 fps, square crop, S = size
    masks.npy              uint8   [N, S, S]     0 background, 1 torso/neck, 2 head (face + hair)
    background.npy         uint8   [S, S, 3]     background plate (person removed, holes filled)
    audio.npy              float32 [T]           16 kHz mono waveform, T ~= N * 640
    features.npy           float32 [2N, D]       audio features at 50 Hz (2 per video frame)
    lm2d.npy               float32 [N, 68, 2]    iBUG-300W landmarks, pixels of the stored frames
    lm3d.npy               float32 [N, 68, 3]    canonical pose-free landmarks (scale-normalised)
    lm3d_mean.npy          float32 [68, 3]       the person's mean canonical shape
    blink.npy              float32 [N]           eye aspect ratio (mean of both eyes; low = closed)
    pose.npy               float32 [N, 4, 4]     head-to-camera rigid transform, OpenCV camera
                                                 axes (x right, y down, z forward), smoothed
    face_valid.npy         bool    [N]           False where the face was interpolated, not detected
    preview/contact_sheet.png, preview/signals.png

Conventions:
    * frame i covers audio samples [i*640, (i+1)*640) and feature frames [2i, 2i+2).
    * ``lm3d`` is expressed in the head frame (the frame ``pose`` maps to the camera) divided by
      ``manifest["head_scale"]``; i.e. ``head_scale * lm3d[i]`` are head-frame coordinates and
      ``pose[i] @ [head_scale * lm3d[i], 1]`` are camera coordinates. The canonical scale sets the
      outer-eye-corner distance (points 36 and 45) of ``lm3d_mean`` to 1.
    * intrinsics ``fx, fy, cx, cy`` are in pixels of the stored ``S x S`` frames.
    * split: validation is a contiguous tail ``[val_start, N)``; training is ``[0, val_start)``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from avatar.errors import BundleCorrupt

SCHEMA = "avatar.dataset/1"
FPS = 25
AUDIO_RATE = 16_000
FEATURE_RATE = 50
SAMPLES_PER_FRAME = AUDIO_RATE // FPS  # 640
FEATURES_PER_FRAME = FEATURE_RATE // FPS  # 2

#: array name -> (dtype, shape template); "N" frames, "S" size, "T" samples, "F" features, "D" dim
ARRAYS: dict[str, tuple[str, tuple]] = {
    "frames": ("uint8", ("N", "S", "S", 3)),
    "masks": ("uint8", ("N", "S", "S")),
    "background": ("uint8", ("S", "S", 3)),
    "audio": ("float32", ("T",)),
    "features": ("float32", ("F", "D")),
    "lm2d": ("float32", ("N", 68, 2)),
    "lm3d": ("float32", ("N", 68, 3)),
    "lm3d_mean": ("float32", (68, 3)),
    "blink": ("float32", ("N",)),
    "pose": ("float32", ("N", 4, 4)),
    "face_valid": ("bool", ("N",)),
}

MASK_BACKGROUND, MASK_TORSO, MASK_HEAD = 0, 1, 2

# iBUG-300W index groups (0-based)
JAW = list(range(0, 17))
BROWS = list(range(17, 27))
NOSE = list(range(27, 36))
LEFT_EYE = list(range(36, 42))   # subject's right eye in image-left position, iBUG convention
RIGHT_EYE = list(range(42, 48))
EYES = LEFT_EYE + RIGHT_EYE
MOUTH = list(range(48, 68))      # the 20 mouth landmarks (outer 48-59, inner 60-67)


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels of the stored frames."""

    fx: float
    fy: float
    cx: float
    cy: float

    def matrix(self) -> np.ndarray:
        """float64 [3, 3] camera matrix K."""
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], dtype=np.float64)


class Dataset:
    """Read-only, memory-mapped view of a dataset directory.

    Arrays are exposed as attributes (``ds.frames``, ``ds.lm3d``, ...), each a ``np.memmap``
    (mode ``r``) with the dtype/shape in the module docstring.

    Raises:
        BundleCorrupt: missing manifest/array, unknown schema, or inconsistent shapes.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.is_file():
            raise BundleCorrupt(f"{self.root} is not a dataset (no manifest.json); create one with `avatar preprocess VIDEO --out DIR`")
        try:
            self.manifest: dict = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise BundleCorrupt(f"{mpath} is not valid JSON ({e}); re-run `avatar preprocess`") from e
        if self.manifest.get("schema") != SCHEMA:
            raise BundleCorrupt(f"{self.root}: unknown dataset schema {self.manifest.get('schema')!r} (expected {SCHEMA}); re-run `avatar preprocess`")
        for name in ARRAYS:
            if not (self.root / f"{name}.npy").is_file():
                raise BundleCorrupt(f"{self.root}: missing {name}.npy; the dataset is incomplete, re-run `avatar preprocess`")
        n = self.n_frames
        if self.frames.shape[0] != n or self.lm3d.shape[0] != n or self.features.shape[0] != FEATURES_PER_FRAME * n:
            raise BundleCorrupt(f"{self.root}: array lengths disagree with manifest n_frames={n}; re-run `avatar preprocess`")

    def _load(self, name: str) -> np.ndarray:
        return np.load(self.root / f"{name}.npy", mmap_mode="r")

    def __getattr__(self, name: str) -> np.ndarray:
        if name in ARRAYS:
            arr = self._load(name)
            self.__dict__[name] = arr
            return arr
        raise AttributeError(name)

    @property
    def n_frames(self) -> int:
        return int(self.manifest["n_frames"])

    @property
    def size(self) -> int:
        """Side of the square stored frames, pixels."""
        return int(self.manifest["size"])

    @property
    def fps(self) -> int:
        return int(self.manifest["fps"])

    @cached_property
    def intrinsics(self) -> Intrinsics:
        return Intrinsics(**self.manifest["intrinsics"])

    @property
    def head_scale(self) -> float:
        return float(self.manifest["head_scale"])

    @property
    def feature_kind(self) -> str:
        return str(self.manifest["features"]["kind"])

    @property
    def train_range(self) -> range:
        return range(0, int(self.manifest["split"]["val_start"]))

    @property
    def val_range(self) -> range:
        return range(int(self.manifest["split"]["val_start"]), self.n_frames)

    def __len__(self) -> int:
        return self.n_frames

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r}, n_frames={self.n_frames}, size={self.size}, features={self.feature_kind})"


def open_array_for_write(root: str | Path, name: str, shape: tuple[int, ...]) -> np.memmap:
    """Create ``root/name.npy`` as a writable memory-mapped array with the contract's dtype.

    Raises:
        KeyError: ``name`` is not a dataset array.
    """
    dtype, template = ARRAYS[name]
    if len(shape) != len(template):
        raise ValueError(f"{name}: shape {shape} does not match template {template}")
    return np.lib.format.open_memmap(Path(root) / f"{name}.npy", mode="w+", dtype=dtype, shape=tuple(shape))


def save_array(root: str | Path, name: str, arr: np.ndarray) -> None:
    """Write a small array (``root/name.npy``) with the contract's dtype."""
    dtype, template = ARRAYS[name]
    arr = np.asarray(arr, dtype=dtype)
    if arr.ndim != len(template):
        raise ValueError(f"{name}: ndim {arr.ndim} does not match template {template}")
    np.save(Path(root) / f"{name}.npy", arr)
