"""The per-person dataset on disk (output of ``avatar preprocess``, input of every training stage).

Layout of a dataset directory (schema ``avatar.dataset/2``; all arrays are ``.npy``, opened
memory-mapped; nothing requires the whole clip in RAM)::

    manifest.json          schema, source (path, sha256, fps, size, duration, audio rate), fps=25,
                           size, n_frames, crop_box, intrinsics, features, split, flagged frames,
                           tool versions, the PreprocessConfig that made it, ``encoding`` (codecs)
    frames_encoded.npy     uint8   [B]           N encoded images, concatenated: RGB video frames at
    frames_offsets.npy     int64   [N + 1]       25 fps, square crop, S x S (S = size); frame i is
                                                 bytes [offsets[i], offsets[i+1]); JPEG quality 95,
                                                 4:4:4 chroma by default (or PNG: lossless)
    masks_encoded.npy      uint8   [B']          N PNG images (lossless), uint8 [S, S] labels
    masks_offsets.npy      int64   [N + 1]       0 background, 1 torso/neck, 2 head (face + hair)
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

``ds.frames`` / ``ds.masks`` are :class:`EncodedImages`: ``ds.frames[i]`` decodes one frame
(uint8 [S, S, 3] RGB), ``ds.frames.decode_all()`` / ``np.asarray(ds.frames)`` all of them (trainers do
this once at start). Compressed storage is what makes a dataset portable (issue 12): a 5-minute
512 px clip is 5.9 GB of raw frames but a few hundred MB of JPEG q95.

Schema ``avatar.dataset/1`` (raw ``frames.npy`` / ``masks.npy``) is refused with
:class:`DatasetOutdated`; ``python -m avatar.data.convert DIR`` converts one in place.

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
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import numpy as np

from avatar.errors import BundleCorrupt

# the face contracts, re-exported (`X as X` marks an explicit re-export)
from avatar.face.contracts import (
    BROWS as BROWS,
    EYES as EYES,
    JAW as JAW,
    LEFT_EYE as LEFT_EYE,
    MASK_BACKGROUND as MASK_BACKGROUND,
    MASK_HEAD as MASK_HEAD,
    MASK_TORSO as MASK_TORSO,
    MOUTH as MOUTH,
    NOSE as NOSE,
    RIGHT_EYE as RIGHT_EYE,
    Intrinsics,
)
from avatar.timebase import AUDIO_RATE as AUDIO_RATE  # the time base, re-exported (avatar/timebase.py)
from avatar.timebase import FEATURE_RATE as FEATURE_RATE
from avatar.timebase import FEATURES_PER_FRAME
from avatar.timebase import FPS as FPS
from avatar.timebase import SAMPLES_PER_FRAME as SAMPLES_PER_FRAME

SCHEMA = "avatar.dataset/2"
SCHEMA_V1 = "avatar.dataset/1"

#: encoded image sequences: name -> shape template of the decoded array
IMAGES: dict[str, tuple] = {
    "frames": ("N", "S", "S", 3),
    "masks": ("N", "S", "S"),
}
#: default codecs: frames JPEG q95 (4:4:4 chroma), masks PNG (labels must stay exact)
FRAME_CODEC = {"codec": "jpeg", "quality": 95}
MASK_CODEC = {"codec": "png"}

#: array name -> (dtype, shape template); "N" frames, "S" size, "T" samples, "F" features, "D" dim
ARRAYS: dict[str, tuple[str, tuple]] = {
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


class DatasetOutdated(BundleCorrupt):
    """A dataset written by an older version of the format (convertible, see the message)."""


def encode_image(img: np.ndarray, codec: dict) -> bytes:
    """Encode one image.

    Args:
        img: uint8 [H, W, 3] RGB, or uint8 [H, W] single channel (masks).
        codec: ``{"codec": "jpeg", "quality": 1-100}`` (RGB only; 4:4:4 chroma) or ``{"codec": "png"}``.

    Returns:
        The encoded file's bytes.

    Raises:
        ValueError: unknown codec, JPEG for a single-channel image, or an encoder failure.
    """
    import cv2

    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    kind = codec.get("codec")
    if kind == "jpeg":
        if img.ndim != 3:
            raise ValueError("JPEG is for RGB frames; store label masks as PNG (lossless)")
        params = [
            cv2.IMWRITE_JPEG_QUALITY,
            int(codec.get("quality", 95)),
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
        ]
        ok, buf = cv2.imencode(".jpg", img, params)
    elif kind == "png":
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        raise ValueError(f"unknown image codec {kind!r}; use 'jpeg' or 'png'")
    if not ok:
        raise ValueError(f"OpenCV failed to encode a {img.shape} image as {kind}")
    return buf.tobytes()


def decode_image(buf: np.ndarray | bytes, channels: int) -> np.ndarray:
    """Decode one JPEG/PNG image: uint8 [H, W, 3] RGB (``channels=3``) or uint8 [H, W] (``channels=1``).

    Raises:
        BundleCorrupt: the bytes are not a decodable image.
    """
    import cv2

    arr = np.frombuffer(buf, np.uint8) if isinstance(buf, (bytes, bytearray)) else np.asarray(buf, np.uint8)
    img = cv2.imdecode(arr, cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_UNCHANGED)
    if img is None:
        raise BundleCorrupt(
            f"an encoded image ({arr.size} bytes) does not decode; the dataset is damaged, re-run `avatar preprocess`"
        )
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img if img.ndim == 2 else img[..., 0]


class EncodedImages:
    """Read-only sequence of N encoded images of one decoded shape (``frames`` or ``masks``).

    ``x[i]`` decodes image ``i`` (uint8 ndarray of ``x.shape[1:]``); ``x[a:b]`` / ``x[index_array]``
    decode several (stacked); ``np.asarray(x)`` and :meth:`decode_all` decode all of them.
    ``x.shape`` / ``x.dtype`` / ``len(x)`` describe the decoded array without decoding.

    Args:
        data: uint8 [B] concatenated encoded files (typically a memory map).
        offsets: int64 [N + 1] byte offsets into ``data`` (non-decreasing, ``offsets[-1] == B``).
        shape: decoded shape ``(N, S, S, 3)`` or ``(N, S, S)``.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, data: np.ndarray, offsets: np.ndarray, shape: tuple[int, ...]):
        self.data, self.offsets, self.shape = data, np.asarray(offsets, np.int64), tuple(int(v) for v in shape)
        self.channels = 3 if len(self.shape) == 4 else 1
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes_encoded(self) -> int:
        """Bytes of the encoded images (what is stored)."""
        return int(self.offsets[-1] - self.offsets[0])

    def encoded(self, i: int) -> np.ndarray:
        """The stored bytes of image ``i`` (uint8 [b], a view)."""
        return self.data[self.offsets[i] : self.offsets[i + 1]]

    def _decode(self, i: int) -> np.ndarray:
        img = decode_image(self.encoded(i), self.channels)
        if img.shape != self.shape[1:]:
            raise BundleCorrupt(
                f"image {i} decodes to {img.shape}, expected {self.shape[1:]}; re-run `avatar preprocess`"
            )
        return img

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if i < 0:
                i += len(self)
            if not 0 <= i < len(self):
                raise IndexError(f"image {key} out of range [0, {len(self)})")
            return self._decode(i)
        idx = np.arange(len(self))[key]
        return self.decode_all(indices=np.atleast_1d(idx))

    def decode_all(
        self, indices: np.ndarray | None = None, out: np.ndarray | None = None, threads: int | None = None
    ) -> np.ndarray:
        """Decode ``indices`` (default: all) into ``out`` (uint8 [len(indices), *shape[1:]], allocated if
        None), in parallel on ``threads`` threads (default: the CPUs this process may use; OpenCV's
        decoders release the GIL). Returns ``out``."""
        from avatar.runtime import usable_cpus

        idx = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64)
        if out is None:
            out = np.empty((len(idx), *self.shape[1:]), np.uint8)

        def work(j: int) -> None:
            out[j] = self[int(idx[j])]

        n_threads = max(1, min(threads or usable_cpus(), len(idx)))
        if n_threads == 1:
            for j in range(len(idx)):
                work(j)
        else:
            with ThreadPoolExecutor(n_threads) as pool:
                list(pool.map(work, range(len(idx)), chunksize=16))
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self.decode_all()
        return arr if dtype is None else arr.astype(dtype)


class EncodedImageWriter:
    """Append-only writer of ``root/{name}_encoded.npy`` + ``root/{name}_offsets.npy``.

    ``w[i] = img`` (``i`` must be the next index) or :meth:`append` encodes and appends; ``w[i]``
    reads an image back (decoded) before or after :meth:`close`. Memory stays flat: bytes go to
    ``{name}_encoded.part`` as they come and become the ``.npy`` on :meth:`close`.

    Args:
        root: dataset directory being written.
        name: ``"frames"`` or ``"masks"``.
        shape: decoded shape ``(N, S, S, 3)`` / ``(N, S, S)``; N images must be written.
        codec: see :func:`encode_image` (default: :data:`FRAME_CODEC` for frames, :data:`MASK_CODEC` for masks).
        stem: file name stem (default ``name``), e.g. for a temporary sequence that is :meth:`discard`-ed.
    """

    def __init__(
        self, root: str | Path, name: str, shape: tuple[int, ...], codec: dict | None = None, stem: str | None = None
    ):
        if name not in IMAGES or len(shape) != len(IMAGES[name]):
            raise ValueError(f"{name}: not an image sequence of the dataset or wrong shape {shape}")
        self.root, self.name, self.shape = Path(root), stem or name, tuple(int(v) for v in shape)
        self.codec = dict(codec or (FRAME_CODEC if name == "frames" else MASK_CODEC))
        self.channels = 3 if len(self.shape) == 4 else 1
        self._part = self.root / f"{self.name}_encoded.part"
        self._f = open(self._part, "w+b")
        self.offsets = [0]
        self._closed: EncodedImages | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def append(self, img: np.ndarray) -> None:
        if len(self) >= self.shape[0]:
            raise IndexError(f"{self.name}: all {self.shape[0]} images already written")
        img = np.asarray(img)
        if img.shape != self.shape[1:]:
            raise ValueError(f"{self.name}: image shape {img.shape}, expected {self.shape[1:]}")
        buf = encode_image(img, self.codec)
        self._f.seek(0, os.SEEK_END)
        self._f.write(buf)
        self.offsets.append(self.offsets[-1] + len(buf))

    def __setitem__(self, i: int, img: np.ndarray) -> None:
        if int(i) != len(self):
            raise IndexError(f"{self.name}: images are written in order; expected index {len(self)}, got {i}")
        self.append(img)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._closed is not None:
            return self._closed[i]
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name}: image {i} not written yet")
        self._f.flush()
        self._f.seek(self.offsets[i])
        return decode_image(self._f.read(self.offsets[i + 1] - self.offsets[i]), self.channels)

    def discard(self) -> None:
        """Delete what was written (a temporary sequence); the writer is unusable afterwards."""
        self._f.close()
        self._part.unlink(missing_ok=True)

    def close(self) -> EncodedImages:
        """Finish the ``.npy`` files; returns the read view. Raises ValueError if fewer than N images."""
        if self._closed is not None:
            return self._closed
        if len(self) != self.shape[0]:
            raise ValueError(f"{self.name}: {len(self)} of {self.shape[0]} images written")
        total = self.offsets[-1]
        path = self.root / f"{self.name}_encoded.npy"
        with open(path, "wb") as out:
            np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False, "shape": (total,)})
            self._f.flush()
            self._f.seek(0)
            shutil.copyfileobj(self._f, out, 1 << 22)
        self._f.close()
        self._part.unlink()
        np.save(self.root / f"{self.name}_offsets.npy", np.asarray(self.offsets, np.int64))
        self._closed = _open_images(self.root, self.name, self.shape)
        return self._closed


def _open_images(root: Path, name: str, shape: tuple[int, ...]) -> EncodedImages:
    data = np.load(root / f"{name}_encoded.npy", mmap_mode="r")
    offsets = np.load(root / f"{name}_offsets.npy")
    if (
        offsets.ndim != 1
        or len(offsets) != shape[0] + 1
        or offsets[-1] != data.shape[0]
        or np.any(np.diff(offsets) <= 0)
    ):
        raise BundleCorrupt(
            f"{root}: {name}_offsets.npy does not describe {shape[0]} images in {name}_encoded.npy; re-run `avatar preprocess`"
        )
    return EncodedImages(data, offsets, shape)


def image_files(name: str) -> tuple[str, str]:
    """File names of an encoded image sequence: (``{name}_encoded.npy``, ``{name}_offsets.npy``)."""
    return f"{name}_encoded.npy", f"{name}_offsets.npy"


class Dataset:
    """Read-only, memory-mapped view of a dataset directory.

    Arrays are exposed as attributes (``ds.lm3d``, ...), each a ``np.memmap`` (mode ``r``) with the
    dtype/shape in the module docstring; ``ds.frames`` and ``ds.masks`` are :class:`EncodedImages`
    (decoded on access).

    Raises:
        DatasetOutdated: a schema ``avatar.dataset/1`` directory (raw frames; convertible).
        BundleCorrupt: missing manifest/array, unknown schema, or inconsistent shapes.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.is_file():
            raise BundleCorrupt(
                f"{self.root} is not a dataset (no manifest.json); create one with `avatar preprocess VIDEO --out DIR`"
            )
        try:
            self.manifest: dict = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise BundleCorrupt(f"{mpath} is not valid JSON ({e}); re-run `avatar preprocess`") from e
        if self.manifest.get("schema") == SCHEMA_V1:
            raise DatasetOutdated(
                f"{self.root} is a dataset of the old format {SCHEMA_V1} (raw frames.npy, ~20x larger); convert it "
                f"in place with `python -m avatar.data.convert {self.root}` (seconds per minute of video), "
                "or re-run `avatar preprocess`"
            )
        if self.manifest.get("schema") != SCHEMA:
            raise BundleCorrupt(
                f"{self.root}: unknown dataset schema {self.manifest.get('schema')!r} "
                f"(expected {SCHEMA}); re-run `avatar preprocess`"
            )
        files = [f"{name}.npy" for name in ARRAYS] + [f for name in IMAGES for f in image_files(name)]
        for fname in files:
            if not (self.root / fname).is_file():
                raise BundleCorrupt(
                    f"{self.root}: missing {fname}; the dataset is incomplete, re-run `avatar preprocess`"
                )
        n = self.n_frames
        if self.frames.shape[0] != n or self.lm3d.shape[0] != n or self.features.shape[0] != FEATURES_PER_FRAME * n:
            raise BundleCorrupt(
                f"{self.root}: array lengths disagree with manifest n_frames={n}; re-run `avatar preprocess`"
            )

    def _load(self, name: str) -> np.ndarray:
        return np.load(self.root / f"{name}.npy", mmap_mode="r")

    def __getattr__(self, name: str):
        if name in ARRAYS:
            arr = self._load(name)
            self.__dict__[name] = arr
            return arr
        if name in IMAGES:
            S = self.size
            shape = (self.n_frames, S, S, 3) if name == "frames" else (self.n_frames, S, S)
            imgs = _open_images(self.root, name, shape)
            self.__dict__[name] = imgs
            return imgs
        raise AttributeError(name)

    def nbytes_on_disk(self) -> int:
        """Bytes of all files in the dataset directory (recursive)."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

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


def write_dataset(
    root: str | Path, frames, masks, arrays: dict[str, np.ndarray], manifest: dict, frame_codec: dict | None = None
) -> Path:
    """Write a complete dataset directory from in-memory arrays (tests, conversions, small clips;
    ``avatar preprocess`` streams instead).

    Args:
        root: directory to create (must not exist, or be empty).
        frames: uint8 [N, S, S, 3] RGB (anything indexable by frame); masks: uint8 [N, S, S] labels.
        arrays: every name of :data:`ARRAYS` -> array (dtype converted to the contract's).
        manifest: manifest fields; ``schema`` and ``encoding`` are set here.
        frame_codec: default :data:`FRAME_CODEC`.

    Returns:
        ``Path(root)``.

    Raises:
        ValueError: a missing array or a wrong shape.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    missing = set(ARRAYS) - set(arrays)
    if missing:
        raise ValueError(f"write_dataset: missing arrays {sorted(missing)}")
    n, S = len(frames), int(manifest["size"])
    fw = EncodedImageWriter(root, "frames", (n, S, S, 3), frame_codec)
    mw = EncodedImageWriter(root, "masks", (n, S, S))
    for i in range(n):
        fw.append(np.asarray(frames[i]))
        mw.append(np.asarray(masks[i]))
    fw.close()
    mw.close()
    for name, arr in arrays.items():
        save_array(root, name, arr)
    manifest = {**manifest, "schema": SCHEMA, "encoding": {"frames": fw.codec, "masks": mw.codec}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root


def save_array(root: str | Path, name: str, arr: np.ndarray) -> None:
    """Write a small array (``root/name.npy``) with the contract's dtype."""
    dtype, template = ARRAYS[name]
    arr = np.asarray(arr, dtype=dtype)
    if arr.ndim != len(template):
        raise ValueError(f"{name}: ndim {arr.ndim} does not match template {template}")
    np.save(Path(root) / f"{name}.npy", arr)
