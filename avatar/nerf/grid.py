"""Hash-grid hyper-parameters and level layout: the one definition shared by every hash-grid
backend (the PyTorch autograd Function and :class:`~avatar.nerf.encoding.HashGridEncoding` in
``avatar/nerf/encoding.py``, the Triton kernels in ``avatar/nerf/triton_hashgrid.py``) and by the
field configs (``avatar/nerf/fields.py``). The exact index/interpolation semantics are written in
``avatar/nerf/encoding.py``'s module docstring.

It sits below both backends so that neither imports the other for its constants (they used to
import each other).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PRIMES", "GridConfig", "HashGridConfig", "level_layout"]


@dataclass
class GridConfig:
    """Hash-grid hyper-parameters of one field, as stored in the field configs of a bundle (the grid's
    dimension comes from the field; :meth:`HashGridConfig.of` adds it)."""

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 16
    base_resolution: int = 16
    finest_resolution: int = 2048


PRIMES = (1, 2654435761, 805459861)


def _as_int32(v: int) -> int:
    """Two's-complement int32 with the same low 32 bits (so int32 products wrap like uint32)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


@dataclass
class HashGridConfig:
    """Hash-grid hyper-parameters (names as in tiny-cuda-nn's ``HashGrid`` encoding config)."""

    dim: int = 3
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    finest_resolution: int | None = 2048
    per_level_scale: float | None = None

    @classmethod
    def of(cls, grid: GridConfig, dim: int) -> HashGridConfig:
        """The full encoding config of a field's :class:`GridConfig` on a ``dim``-D domain."""
        return cls(
            dim,
            grid.n_levels,
            grid.n_features_per_level,
            grid.log2_hashmap_size,
            grid.base_resolution,
            grid.finest_resolution,
        )

    def resolved_per_level_scale(self) -> float:
        if self.finest_resolution is not None:
            if self.n_levels == 1:
                return 1.0
            return math.exp((math.log(self.finest_resolution) - math.log(self.base_resolution)) / (self.n_levels - 1))
        if self.per_level_scale is None:
            raise ValueError("give finest_resolution or per_level_scale")
        return float(self.per_level_scale)

    def tcnn_config(self) -> dict:
        """The equivalent ``tinycudann.Encoding`` config."""
        return {
            "otype": "HashGrid",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.resolved_per_level_scale(),
            "interpolation": "Linear",
        }


def level_layout(cfg: HashGridConfig) -> tuple[list[float], list[int], list[int], list[int]]:
    """Per level: ``scale_l`` (float32-rounded), resolution ``R_l``, rows ``T_l``, row offset."""
    log2_b = math.log2(cfg.resolved_per_level_scale())
    scales, res, rows, offsets = [], [], [], []
    off = 0
    for lvl in range(cfg.n_levels):
        s = float(torch.tensor(2.0 ** (lvl * log2_b), dtype=torch.float32) * cfg.base_resolution - 1.0)
        r = int(math.ceil(s)) + 1
        t = min(-(-(r**cfg.dim) // 8) * 8, 1 << cfg.log2_hashmap_size)
        scales.append(s)
        res.append(r)
        rows.append(t)
        offsets.append(off)
        off += t
    return scales, res, rows, offsets
