"""The avatar bundle format on disk and its validator.

A bundle is a directory ``avatars/<name>/``::

    manifest.json          schema avatar.bundle/1 and the keys of :data:`REQUIRED_KEYS`, plus
                           ``files``: {relative path: {"sha256": hex, "size": bytes}} for every
                           other file of the bundle (recorded when the bundle is written)
    generator/ postnet/ nerf/ track.safetensors blink.json   (see :mod:`avatar.pipeline.bundle`)

:func:`validate_bundle` is used by the store (listing, ``info``), by loading for rendering and by the
server. ``quick`` validation checks the manifest schema, required keys and types, that the required
entries exist and that every recorded file is present with its recorded size; full validation also
verifies every file's SHA-256, so flipped bytes in a weights file are caught before rendering.
Bundles written before checksums were recorded (no ``files`` key) pass the structural checks only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path, PurePosixPath

from avatar.errors import BundleCorrupt

BUNDLE_SCHEMA = "avatar.bundle/1"
MANIFEST = "manifest.json"
#: entries every bundle has beside the manifest
REQUIRED_ENTRIES = ("generator", "postnet", "nerf", "track.safetensors", "blink.json")
#: manifest keys every bundle has, with the type each must have
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "schema": str,
    "name": str,
    "size": int,
    "fps": (int, float),
    "created": str,
}
_HINT = "re-onboard it with --overwrite"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte blocks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digests(root: str | Path) -> dict[str, dict]:
    """``{relative posix path: {"sha256", "size"}}`` of every file under ``root`` except the manifest.

    Called when a bundle is written; the result goes into the manifest's ``files``.
    """
    root = Path(root)
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        out[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return out


def _corrupt(name: str, what: str) -> BundleCorrupt:
    return BundleCorrupt(f"avatar {name!r} is broken: {what}; {_HINT}")


def read_manifest(root: str | Path, name: str | None = None) -> dict:
    """Read and schema-check ``root/manifest.json`` (required keys and their types).

    Args:
        root: bundle directory. name: the avatar's name for messages (default: the directory name).
    Returns:
        the manifest dict.
    Raises:
        BundleCorrupt: unreadable/non-object JSON, unknown schema, a missing or mistyped key, a
            non-positive size/fps, or a malformed ``files`` table. Messages never contain paths.
    """
    root = Path(root)
    name = name or root.name
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise _corrupt(name, "manifest.json is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(name, f"manifest.json is unreadable ({type(e).__name__})") from e
    if not isinstance(manifest, dict):
        raise _corrupt(name, "manifest.json is not a JSON object")
    if manifest.get("schema") != BUNDLE_SCHEMA:
        raise _corrupt(name, f"unknown bundle schema {str(manifest.get('schema'))[:40]!r}")
    for key, typ in REQUIRED_KEYS.items():
        value = manifest.get(key)
        if value is None:
            raise _corrupt(name, f"manifest.json lacks {key!r}")
        if not isinstance(value, typ) or isinstance(value, bool):
            raise _corrupt(name, f"manifest.json {key!r} has the wrong type ({type(value).__name__})")
    if manifest["size"] <= 0 or not (math.isfinite(manifest["fps"]) and manifest["fps"] > 0):
        raise _corrupt(name, "manifest.json has a non-positive size or fps")
    if "metrics" in manifest and not isinstance(manifest["metrics"], dict):
        raise _corrupt(name, "manifest.json 'metrics' is not an object")
    files = manifest.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise _corrupt(name, "manifest.json 'files' is not an object")
        for rel, entry in files.items():
            p = PurePosixPath(rel)
            if p.is_absolute() or ".." in p.parts or not rel or rel == MANIFEST:
                raise _corrupt(name, f"manifest.json lists an invalid file path {rel[:60]!r}")
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("sha256"), str)
                or not isinstance(entry.get("size"), int)
            ):
                raise _corrupt(name, f"manifest.json entry for {rel!r} lacks sha256/size")
    return manifest


def validate_bundle(root: str | Path, name: str | None = None, verify_hashes: bool = True) -> dict:
    """Validate an avatar bundle directory; returns its manifest.

    Args:
        root: bundle directory. name: avatar name for messages (default: directory name).
        verify_hashes: also check every recorded file's SHA-256 (reads every byte; False checks
            presence and sizes only, which is what listings use).
    Raises:
        BundleCorrupt: see :func:`read_manifest`; a required entry is missing; a recorded file is
            missing, has another size or another SHA-256; an unrecorded weights file was added.
    """
    root = Path(root)
    name = name or root.name
    manifest = read_manifest(root, name)
    for entry in REQUIRED_ENTRIES:
        if not (root / entry).exists():
            raise _corrupt(name, f"{entry} is missing")
    files = manifest.get("files")
    if files is None:  # written before checksums were recorded: structural checks only
        return manifest
    for rel, entry in files.items():
        path = root / rel
        try:
            size = path.stat().st_size
        except OSError:
            raise _corrupt(name, f"{rel} is missing") from None
        if size != entry["size"]:
            raise _corrupt(name, f"{rel} has {size} bytes, the manifest records {entry['size']}")
        if verify_hashes:
            try:
                digest = sha256_file(path)
            except OSError as e:
                raise _corrupt(name, f"{rel} is unreadable ({e.strerror})") from e
            if digest != entry["sha256"]:
                raise _corrupt(name, f"{rel} does not match its recorded SHA-256 (the file was modified or damaged)")
    for dirpath, _dirs, names in os.walk(root):
        for fn in names:
            rel = (Path(dirpath) / fn).relative_to(root).as_posix()
            if fn.endswith(".safetensors") and rel not in files:
                raise _corrupt(name, f"{rel} is not recorded in the manifest")
    return manifest
