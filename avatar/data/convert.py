"""Convert a dataset of the old format (``avatar.dataset/1``: raw ``frames.npy`` / ``masks.npy``) to the
current one (``avatar.dataset/2``: JPEG/PNG-encoded frames and masks, see :mod:`avatar.data.dataset`).

Usage::

    python -m avatar.data.convert DATASET_DIR [--png]      # in place
    python -m avatar.data.convert OLD_DIR --out NEW_DIR    # a converted copy; OLD_DIR is untouched

In place, the encoded files are written next to the raw ones, the manifest is replaced atomically
(the dataset is valid in the new format from that moment) and only then the raw arrays are deleted:
an interruption leaves either the old or the new dataset, never neither.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from avatar.atomic import atomic_file
from avatar.data.dataset import ARRAYS, FRAME_CODEC, SCHEMA, SCHEMA_V1, Dataset, EncodedImageWriter, image_files
from avatar.errors import BundleCorrupt, InvalidInput


def convert_v1(
    src: str | Path, out: str | Path | None = None, frame_codec: dict | None = None, progress: bool = True
) -> Path:
    """Convert dataset ``src`` (schema 1) in place (``out=None``) or into a new directory ``out``.

    Returns:
        The converted dataset directory (opens with :class:`avatar.data.dataset.Dataset`).

    Raises:
        BundleCorrupt: ``src`` is not a schema-1 dataset (or lacks its raw arrays).
        InvalidInput: ``out`` exists.
    """
    src = Path(src)
    mpath = src / "manifest.json"
    if not mpath.is_file():
        raise BundleCorrupt(f"{src} is not a dataset (no manifest.json)")
    manifest = json.loads(mpath.read_text())
    if manifest.get("schema") != SCHEMA_V1:
        raise BundleCorrupt(f"{src}: schema {manifest.get('schema')!r}, not {SCHEMA_V1}; nothing to convert")
    for name in ("frames", "masks"):
        if not (src / f"{name}.npy").is_file():
            raise BundleCorrupt(f"{src}: missing {name}.npy; re-run `avatar preprocess`")
    dst = src if out is None else Path(out)
    if out is not None:
        if dst.exists():
            raise InvalidInput(f"{dst} exists; choose a new --out directory")
        dst.mkdir(parents=True)
        for name in ARRAYS:
            shutil.copy2(src / f"{name}.npy", dst / f"{name}.npy")
        if (src / "preview").is_dir():
            shutil.copytree(src / "preview", dst / "preview")
    frames = np.load(src / "frames.npy", mmap_mode="r")
    masks = np.load(src / "masks.npy", mmap_mode="r")
    n = frames.shape[0]
    fw = EncodedImageWriter(dst, "frames", frames.shape, frame_codec or FRAME_CODEC)
    mw = EncodedImageWriter(dst, "masks", masks.shape)
    for i in tqdm(range(n), desc="convert dataset", unit="frame", disable=not progress, file=sys.stderr):
        fw.append(np.asarray(frames[i]))
        mw.append(np.asarray(masks[i]))
    fw.close()
    mw.close()
    del frames, masks
    manifest.update(schema=SCHEMA, encoding={"frames": fw.codec, "masks": mw.codec})
    with atomic_file(dst / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    if out is None:
        for name in ("frames", "masks"):
            (dst / f"{name}.npy").unlink()
    Dataset(dst)  # validates the result
    assert all((dst / f).is_file() for name in ("frames", "masks") for f in image_files(name))
    return dst


def recode_frames(src: str | Path, out: str | Path, frame_codec: dict, progress: bool = True) -> Path:
    """Copy dataset ``src`` (current format) to a new directory ``out`` with its frames re-encoded with
    ``frame_codec`` (e.g. a lossless PNG dataset -> JPEG q95; masks and every other file are copied).

    Raises:
        BundleCorrupt: ``src`` is not a readable dataset. InvalidInput: ``out`` exists.
    """
    ds = Dataset(src)
    out = Path(out)
    if out.exists():
        raise InvalidInput(f"{out} exists; choose a new directory")
    skip = set(image_files("frames"))
    shutil.copytree(ds.root, out, ignore=lambda d, names: [n for n in names if Path(d) == ds.root and n in skip])
    fw = EncodedImageWriter(out, "frames", ds.frames.shape, frame_codec)
    for i in tqdm(range(ds.n_frames), desc="re-encode frames", unit="frame", disable=not progress, file=sys.stderr):
        fw.append(ds.frames[i])
    fw.close()
    manifest = dict(ds.manifest)
    manifest["encoding"] = {**manifest.get("encoding", {}), "frames": fw.codec}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    Dataset(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avatar.data.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", help="dataset directory of schema avatar.dataset/1")
    ap.add_argument("--out", default=None, help="write a converted copy here instead of converting in place")
    ap.add_argument(
        "--png", action="store_true", help="store frames as PNG (lossless, ~3-4x larger) instead of JPEG q95"
    )
    args = ap.parse_args(argv)
    try:
        out = convert_v1(args.dataset, args.out, {"codec": "png"} if args.png else None)
    except (BundleCorrupt, InvalidInput) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
