"""Audio-to-motion: the shared GeneFace generator (VAE + flow prior), the landmark SyncNet, the
per-person postnet with its frame discriminator, LLE projection, and their metrics.

Public inference API (used by the render pipeline)::

    gen = load_generator(dir)                 # Audio2Motion; .feature_kind, .hubert_path
    expr = gen.predict(features_50hz, temperature=1.0, seed=0)   # float32 [F//2, 68, 3]
    post = load_postnet(dir); expr = post.apply(expr)
    lm3d = lle_project(lm3d, reference, k=10, blend=0.25)
"""

from avatar.motion.generator import Audio2Motion, GeneratorConfig, load_generator
from avatar.motion.lle import lle_project
from avatar.motion.postnet import Postnet, load_postnet, train_postnet

__all__ = [
    "Audio2Motion",
    "GeneratorConfig",
    "Postnet",
    "lle_project",
    "load_generator",
    "load_postnet",
    "train_postnet",
]
