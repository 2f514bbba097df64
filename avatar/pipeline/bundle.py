"""Loading an avatar bundle for rendering (the models + person-specific tracks).

Bundle directory (written atomically by :mod:`avatar.pipeline.onboard`)::

    manifest.json          schema avatar.bundle/1, name, size, fps, created, source (path, sha256),
                           preset, stage configs, metrics, tool versions, stage wall times
    generator/             the shared audio2motion generator it was onboarded with (a copy)
    postnet/               the person's postnet
    nerf/head, nerf/torso  the person's NeRFs
    track.safetensors      pose_track float32 [M,4,4] (training poses, replayed), lm3d_mean
                           float32 [68,3], lm3d_ref float32 [K,68,3] (LLE reference set),
                           background uint8 [S,S,3]
    blink.json             :class:`avatar.pipeline.controls.BlinkModel`

Loading validates the bundle first (:func:`avatar.store.bundle.validate_bundle`: schema, required
keys and files, SHA-256 of every file recorded at write time), then checks the track's tensor shapes
against the manifest, that every weight is finite, and turns any failure of the model loaders
(wrong-shaped weights for the stored config, malformed JSON) into :class:`BundleCorrupt`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from avatar.errors import AvatarError, BundleCorrupt
from avatar.pipeline.controls import BlinkModel
from avatar.store.bundle import MANIFEST, REQUIRED_ENTRIES, validate_bundle

REQUIRED = [MANIFEST, *REQUIRED_ENTRIES]
_HINT = "re-onboard it with --overwrite"


def _load_part(name: str, part: str, fn):
    """Run a loader; anything but an AvatarError or out-of-memory becomes BundleCorrupt naming ``part``."""
    import torch

    try:
        return fn()
    except (AvatarError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # loaders raise KeyError/ValueError/RuntimeError (shape mismatch), SafetensorError, ...
        raise BundleCorrupt(
            f"avatar {name!r} is broken: {part} cannot be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); {_HINT}"
        ) from e


def check_finite_weights(root: str | Path, name: str) -> None:
    """Check every floating-point tensor of every ``*.safetensors`` under ``root`` is finite.

    Raises:
        BundleCorrupt: a NaN/Inf weight or an unreadable file (message names the file and tensor).
    """
    import torch
    from safetensors import safe_open

    root = Path(root)
    for path in sorted(root.rglob("*.safetensors")):
        rel = path.relative_to(root).as_posix()

        def scan():
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise BundleCorrupt(f"avatar {name!r} is broken: {rel} tensor {key!r} holds NaN/Inf; {_HINT}")

        _load_part(name, rel, scan)


def _check_track(track: dict, size: int, name: str) -> None:
    shapes = {k: tuple(v.shape) for k, v in track.items()}
    want = {
        "pose_track": lambda s: len(s) == 3 and s[0] > 0 and s[1:] == (4, 4),
        "lm3d_mean": lambda s: s == (68, 3),
        "lm3d_ref": lambda s: len(s) == 3 and s[0] > 0 and s[1:] == (68, 3),
        "background": lambda s: s == (size, size, 3),
    }
    for key, ok in want.items():
        if key not in shapes:
            raise BundleCorrupt(f"avatar {name!r} is broken: track.safetensors lacks {key!r}; {_HINT}")
        if not ok(shapes[key]):
            raise BundleCorrupt(
                f"avatar {name!r} is broken: track.safetensors {key!r} has shape "
                f"{list(shapes[key])} (size {size}); {_HINT}"
            )
    for key in ("pose_track", "lm3d_mean", "lm3d_ref"):
        if not np.isfinite(track[key]).all():
            raise BundleCorrupt(f"avatar {name!r} is broken: track.safetensors {key!r} holds NaN/Inf; {_HINT}")


class AvatarModels:
    """Everything needed to render one avatar, loaded on ``device``.

    Args:
        root: the bundle directory. device: torch device (None = CUDA if available).
        verify: validate the bundle first (checksums, shapes, finite weights); only tests skip it.
    Raises:
        BundleCorrupt: a required file is missing, damaged (checksum), of the wrong shape for its
            config, holds non-finite weights or is otherwise unreadable (message names it).
    """

    def __init__(self, root: str | Path, device: str | None = None, verify: bool = True):
        from avatar.audio import FeatureExtractor
        from avatar.motion import load_generator, load_postnet
        from avatar.nerf import load_nerf

        self.root = Path(root)
        name = self.root.name
        self.manifest = validate_bundle(self.root, name, verify_hashes=verify)
        if verify:
            check_finite_weights(self.root, name)
        self.name = self.manifest["name"]
        self.size = int(self.manifest["size"])
        track = _load_part(name, "track.safetensors", lambda: load_file(str(self.root / "track.safetensors")))
        _check_track(track, self.size, name)
        self.pose_track = track["pose_track"]
        self.lm3d_mean = track["lm3d_mean"]
        self.lm3d_ref = track["lm3d_ref"]
        self.background = track["background"]
        self.blink = _load_part(
            name, "blink.json", lambda: BlinkModel.from_dict(json.loads((self.root / "blink.json").read_text()))
        )
        self.generator = _load_part(name, "generator", lambda: load_generator(self.root / "generator", device=device))
        self.postnet = _load_part(name, "postnet", lambda: load_postnet(self.root / "postnet", device=device))
        self.nerf = _load_part(name, "nerf", lambda: load_nerf(self.root / "nerf", device=device))
        _load_part(name, "background", lambda: self.nerf.set_background(self.background))
        self._features = _load_part(
            name,
            "generator feature config",
            lambda: FeatureExtractor(self.generator.feature_kind, hubert_path=self.generator.hubert_path),
        )
        self._emotion_model = None

    def features(self, wav: np.ndarray, n_frames: int) -> np.ndarray:
        """float32 [2*n_frames, D] features of the generator's kind for a 16 kHz window."""
        return self._features(wav, n_frames=n_frames)

    def lle(self, lm3d: np.ndarray, blend: float) -> np.ndarray:
        """GeneFace++ LLE projection onto the person's training landmarks (K=10)."""
        from avatar.motion import lle_project

        return lle_project(lm3d, self.lm3d_ref, k=10, blend=blend)

    def emotion_delta(self, options):
        """A callable ``(lm3d [K,68,3], frames [K]) -> lm3d`` adding the emotion, or None."""
        if options.emotion_video is None and (options.emotion == "neutral" or options.emotion_strength == 0):
            return None
        from avatar.motion.emotion import build_emotion_delta

        return build_emotion_delta(self, options)
