"""Dataset format 2 (issue 12): frames JPEG/PNG-encoded in one array + offsets, masks PNG (exact),
decoded once for training; format-1 datasets are refused with a conversion command that works."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avatar.data.convert import convert_v1, main as convert_main
from avatar.data.dataset import (
    SCHEMA,
    SCHEMA_V1,
    Dataset,
    DatasetOutdated,
    EncodedImageWriter,
    decode_image,
    encode_image,
)
from avatar.errors import BundleCorrupt
from synthetic_dataset import make_dataset


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def _raw(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(ds.frames), np.asarray(ds.masks)


def test_codecs_roundtrip():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    img = np.stack([(xx * 4) % 256, (yy * 4) % 256, (xx + yy) % 256], -1).astype(np.uint8)
    assert np.array_equal(decode_image(encode_image(img, {"codec": "png"}), 3), img)
    jpg = decode_image(encode_image(img, {"codec": "jpeg", "quality": 95}), 3)
    assert jpg.shape == img.shape and _psnr(jpg, img) > 35
    labels = rng.integers(0, 3, (64, 64)).astype(np.uint8)
    assert np.array_equal(decode_image(encode_image(labels, {"codec": "png"}), 1), labels)
    with pytest.raises(ValueError, match="PNG"):
        encode_image(labels, {"codec": "jpeg"})
    with pytest.raises(BundleCorrupt):
        decode_image(b"not an image", 3)


def test_dataset_roundtrip_and_indexing(tmp_path):
    ds = Dataset(make_dataset(tmp_path / "ds", n_frames=12, size=64))
    assert ds.manifest["schema"] == SCHEMA and ds.manifest["encoding"]["frames"]["codec"] == "jpeg"
    frames, masks = _raw(ds)
    assert frames.shape == (12, 64, 64, 3) and frames.dtype == np.uint8 and masks.shape == (12, 64, 64)
    assert set(np.unique(masks)) == {0, 1, 2}
    assert np.array_equal(ds.frames[-1], frames[11]) and np.array_equal(ds.frames[3:6], frames[3:6])
    assert np.array_equal(ds.masks[np.array([5, 1])], masks[[5, 1]])
    assert np.array_equal(ds.frames.decode_all(threads=1), ds.frames.decode_all(threads=3))
    with pytest.raises(IndexError):
        ds.frames[12]
    # stored size: far below raw (synthetic frames are smooth; real numbers in bench/RESULTS.md)
    raw_bytes = frames.nbytes + masks.nbytes
    assert ds.frames.nbytes_encoded + ds.masks.nbytes_encoded < raw_bytes / 3


def test_writer_order_and_completeness(tmp_path):
    w = EncodedImageWriter(tmp_path, "masks", (2, 8, 8))
    w[0] = np.ones((8, 8), np.uint8)
    with pytest.raises(IndexError, match="in order"):
        w[2] = np.ones((8, 8), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        w.append(np.ones((4, 4), np.uint8))
    assert np.array_equal(w[0], np.ones((8, 8), np.uint8))  # readable before close
    with pytest.raises(ValueError, match="1 of 2"):
        w.close()
    w.append(np.full((8, 8), 2, np.uint8))
    imgs = w.close()
    assert len(imgs) == 2 and imgs[1][0, 0] == 2 and not (tmp_path / "masks_encoded.part").exists()


def test_damaged_offsets_are_reported(tmp_path):
    root = make_dataset(tmp_path / "ds", n_frames=10, size=32)
    off = np.load(root / "frames_offsets.npy")
    np.save(root / "frames_offsets.npy", off[:-1])
    with pytest.raises(BundleCorrupt, match="frames_offsets"):
        Dataset(root).frames


def _as_v1(root) -> tuple[np.ndarray, np.ndarray]:
    """Rewrite a format-2 dataset as format 1 (raw frames.npy / masks.npy), as older versions wrote it."""
    ds = Dataset(root)
    frames, masks = _raw(ds)
    np.save(root / "frames.npy", frames)
    np.save(root / "masks.npy", masks)
    for name in ("frames", "masks"):
        (root / f"{name}_encoded.npy").unlink()
        (root / f"{name}_offsets.npy").unlink()
    m = json.loads((root / "manifest.json").read_text())
    m["schema"] = SCHEMA_V1
    m.pop("encoding")
    (root / "manifest.json").write_text(json.dumps(m))
    return frames, masks


def test_old_format_is_refused_and_converts(tmp_path):
    root = make_dataset(tmp_path / "ds", n_frames=10, size=32)
    frames, masks = _as_v1(root)
    with pytest.raises(DatasetOutdated, match="python -m avatar.data.convert"):
        Dataset(root)
    # a converted copy (source untouched), then in place
    copy = convert_v1(root, tmp_path / "copy", {"codec": "png"}, progress=False)
    assert (root / "frames.npy").exists()
    c = Dataset(copy)
    assert np.array_equal(np.asarray(c.frames), frames) and np.array_equal(np.asarray(c.masks), masks)
    assert convert_main([str(root)]) == 0
    d = Dataset(root)
    assert not (root / "frames.npy").exists() and not (root / "masks.npy").exists()
    assert np.array_equal(np.asarray(d.masks), masks) and _psnr(np.asarray(d.frames), frames) > 35
    assert convert_main([str(root)]) == 2  # already converted: a clear error, nothing touched


def test_training_pixels_decoded_once_match_per_batch_decoding(tmp_path, monkeypatch):
    from avatar.nerf import datamanager

    ds = Dataset(make_dataset(tmp_path / "ds", n_frames=10, size=32))
    frames, masks = _raw(ds)
    rng = np.random.default_rng(0)
    f, y, x = rng.integers(0, 10, 200), rng.integers(0, 32, 200), rng.integers(0, 32, 200)
    once = datamanager.FramePixels(ds, torch.device("cpu"))
    assert once.decoded
    monkeypatch.setattr(datamanager, "DECODE_BUDGET_BYTES", 0)
    lazy = datamanager.FramePixels(ds, torch.device("cpu"))
    assert not lazy.decoded
    for px in (once, lazy):
        rgb, lab = px.gather(f, y, x)
        assert torch.equal(rgb, torch.from_numpy(frames[f, y, x])) and torch.equal(
            lab, torch.from_numpy(masks[f, y, x])
        )
        assert np.array_equal(px.mask(4), masks[4])
