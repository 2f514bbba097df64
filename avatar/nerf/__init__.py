"""Head and torso NeRFs on multiresolution hash grids (GeneFace / RAD-NeRF design).

Public API: :func:`load_nerf` / :class:`AvatarNerf` (inference), :func:`train_nerf` (training),
:class:`HashGridEncoding` (the encoding), presets in :mod:`avatar.nerf.presets`.
"""

from avatar.nerf.encoding import HashGridEncoding
from avatar.nerf.inference import AvatarNerf, load_nerf


def train_nerf(*args, **kwargs):
    """See :func:`avatar.nerf.trainer.train_nerf`."""
    from avatar.nerf.trainer import train_nerf as _train

    return _train(*args, **kwargs)


__all__ = ["AvatarNerf", "HashGridEncoding", "load_nerf", "train_nerf"]
