"""Per-identity NeRF talking-head avatars (GeneFace, ICLR 2023).

Stages (one module each): :mod:`avatar.media` (decode/encode), :mod:`avatar.face` (landmarks,
pose, masks), :mod:`avatar.audio` (features), :mod:`avatar.data` (dataset format),
:mod:`avatar.motion` (audio2motion, SyncNet, postnet, emotion), :mod:`avatar.nerf` (hash-grid
NeRFs), :mod:`avatar.pipeline` (onboard / render), :mod:`avatar.store` (avatar bundles).
"""

__version__ = "0.1.0"

import avatar.runtime  # noqa: E402,F401  (sets OMP_WAIT_POLICY=PASSIVE before torch is first imported)
