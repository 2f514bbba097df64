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
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from avatar.errors import BundleCorrupt
from avatar.pipeline.controls import BlinkModel

REQUIRED = ["manifest.json", "generator", "postnet", "nerf", "track.safetensors", "blink.json"]


class AvatarModels:
    """Everything needed to render one avatar, loaded on ``device``.

    Raises:
        BundleCorrupt: a required file is missing or unreadable (message names it).
    """

    def __init__(self, root: str | Path, device: str | None = None):
        from avatar.audio import FeatureExtractor
        from avatar.motion import load_generator, load_postnet
        from avatar.nerf import load_nerf

        self.root = Path(root)
        for name in REQUIRED:
            if not (self.root / name).exists():
                raise BundleCorrupt(f"avatar bundle {self.root} is missing {name}; re-onboard it with --overwrite")
        self.manifest = json.loads((self.root / "manifest.json").read_text())
        self.name = self.manifest["name"]
        self.size = int(self.manifest["size"])
        try:
            track = load_file(str(self.root / "track.safetensors"))
        except Exception as e:  # safetensors raises several types for corrupt files
            raise BundleCorrupt(f"{self.root / 'track.safetensors'} is unreadable ({e}); re-onboard with --overwrite") from e
        self.pose_track = track["pose_track"]
        self.lm3d_mean = track["lm3d_mean"]
        self.lm3d_ref = track["lm3d_ref"]
        self.background = track["background"]
        self.blink = BlinkModel.from_dict(json.loads((self.root / "blink.json").read_text()))
        self.generator = load_generator(self.root / "generator", device=device)
        self.postnet = load_postnet(self.root / "postnet", device=device)
        self.nerf = load_nerf(self.root / "nerf", device=device)
        self.nerf.set_background(self.background)
        self._features = FeatureExtractor(self.generator.feature_kind, hubert_path=self.generator.hubert_path)
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
