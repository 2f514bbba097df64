"""Head and torso NeRF modules as stored on disk (fields + the buffers needed to render them).

On disk (one directory per part)::

    head/  model.safetensors  config.json  metrics.json  [checkpoint.safetensors  runs/]
    torso/ model.safetensors  config.json  metrics.json  [checkpoint.safetensors  runs/]

``config.json`` holds the :class:`NerfConfig` and the dataset facts needed at inference
(``size``, ``intrinsics``, ``head_scale``, ``n_frames``); weights are safetensors (never pickled).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from avatar.atomic import atomic_file
from avatar.config import from_dict, to_dict
from avatar.errors import BundleCorrupt
from avatar.nerf.fields import HeadConfig, HeadField, TorsoConfig, TorsoField
from avatar.nerf.occupancy import grid_from_legacy_density, make_grid, render_step_size
from avatar.nerf.presets import NerfConfig


def head_aabb(lm3d_mean: np.ndarray, margin: float, top: float = 0.0) -> torch.Tensor:
    """Head box float32 [6] ``(x0, y0, z0, x1, y1, z1)`` in canonical units (x right, y down, z
    forward): the landmark bounding box of ``lm3d_mean`` (float [68, 3]) grown by ``margin`` on every
    side and by ``top`` more above it (-y: room for the hair, which no landmark marks)."""
    lo = lm3d_mean.min(0) - margin
    hi = lm3d_mean.max(0) + margin
    lo[1] -= top
    return torch.tensor(np.concatenate([lo, hi]), dtype=torch.float32)


class HeadNerf(nn.Module):
    """Head field + its occupancy grid. ``n_frames``: training frames (individual codes).

    ``estimator`` is the one occupancy grid (nerfacc's ``OccGridEstimator`` over the head box,
    :mod:`avatar.nerf.occupancy`), read by both samplers. ``step_size`` (canonical units) is the
    marching step that scales density into the grid's ``sigma * step``.

    Loading a state dict saved before the one grid (with the old ``occ.density`` [G, G, G]) takes
    the occupied cells from that density grid (:func:`grid_from_legacy_density`) unless the
    file's estimator was itself updated (a CUDA-trained model).
    """

    def __init__(self, cfg: HeadConfig, n_frames: int, aabb: torch.Tensor, occ_resolution: int, n_samples: int):
        super().__init__()
        self.field = HeadField(cfg, n_frames, aabb)
        self.estimator = make_grid(aabb, occ_resolution)
        self.step_size = render_step_size(aabb, n_samples)
        self.register_load_state_dict_pre_hook(_legacy_grid)


def _legacy_grid(head: HeadNerf, state: dict, prefix: str, *_args) -> None:
    """Load-state-dict pre-hook of :class:`HeadNerf`: a saved ``occ.density`` (files written before
    the one grid) becomes the estimator state (in place of ``state``'s untrained estimator keys)."""
    density = state.pop(prefix + "occ.density", None)
    if density is None:
        return
    occs = state.get(prefix + "estimator.occs")
    if occs is not None and bool((occs != 0).any()):  # the estimator was trained (CUDA): keep it
        return
    grid_from_legacy_density(head.estimator, density, head.step_size)  # the head's own grid (same box)
    state.update(head.estimator.state_dict(prefix=prefix + "estimator."))


class TorsoNerf(nn.Module):
    """Torso field + the background plate (uint8 [S, S, 3]) it was trained over + the person box.

    ``person_box`` float32 [4] ``(x0, y0, x1, y1)`` in frame fractions [0, 1]: the union of the
    person's (head + torso) mask over the training frames, grown by a margin; the renderer
    evaluates the torso only inside it (the torso is trained to be transparent on background
    pixels). Models saved before it existed load with the whole frame ``(0, 0, 1, 1)``.
    """

    def __init__(self, cfg: TorsoConfig, n_frames: int, size: int):
        super().__init__()
        self.field = TorsoField(cfg, n_frames)
        self.register_buffer("background", torch.zeros(size, size, 3, dtype=torch.uint8))
        self.register_buffer("person_box", torch.tensor([0.0, 0.0, 1.0, 1.0]))


def grid_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hash tables, everything else) for Adam's two learning rates."""
    grids, nets = [], []
    for name, p in module.named_parameters():
        (grids if name.endswith(".table") else nets).append(p)
    return grids, nets


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file written to ``path.tmp`` then renamed (never a torn file)."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write_json_atomic(obj: dict, path: Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def part_info(cfg: NerfConfig, ds) -> dict:
    """config.json content for one part."""
    k = ds.intrinsics
    return {
        "config": to_dict(cfg),
        "size": ds.size,
        "n_train_frames": len(ds.train_range),
        "intrinsics": {"fx": k.fx, "fy": k.fy, "cx": k.cx, "cy": k.cy},
        "head_scale": ds.head_scale,
        "window": cfg.head.window,
        "dataset": str(ds.root),
    }


def read_part(part_dir: Path) -> tuple[dict, NerfConfig, dict[str, torch.Tensor]]:
    """(config.json dict, NerfConfig, state dict) of a finished part.

    Raises:
        BundleCorrupt: missing or unreadable files.
    """
    cpath, mpath = part_dir / "config.json", part_dir / "model.safetensors"
    if not cpath.is_file() or not mpath.is_file():
        raise BundleCorrupt(
            f"{part_dir} has no trained model (config.json + model.safetensors); run `avatar train-nerf`"
        )
    try:
        info = json.loads(cpath.read_text())
        cfg = from_dict(NerfConfig, info["config"])
        state = load_file(str(mpath))
    except Exception as e:  # json / safetensors / config errors: all mean a corrupt artifact
        raise BundleCorrupt(f"{part_dir}: unreadable model ({e}); retrain with `avatar train-nerf --overwrite`") from e
    return info, cfg, state


def build_head(cfg: NerfConfig, n_frames: int, aabb: torch.Tensor) -> HeadNerf:
    return HeadNerf(cfg.head, n_frames, aabb, cfg.train.occ_resolution, cfg.train.n_samples)


def build_torso(cfg: NerfConfig, n_frames: int, size: int) -> TorsoNerf:
    return TorsoNerf(cfg.torso, n_frames, size)


def load_head(part_dir: Path, device: torch.device | str = "cpu") -> tuple[HeadNerf, dict]:
    info, cfg, state = read_part(part_dir)
    model = build_head(cfg, info["n_train_frames"], state["field.aabb"])
    model.load_state_dict(state)  # older files: HeadNerf's legacy-grid hook
    return model.to(device).eval(), info


def load_torso(part_dir: Path, device: torch.device | str = "cpu") -> tuple[TorsoNerf, dict]:
    info, cfg, state = read_part(part_dir)
    model = build_torso(cfg, info["n_train_frames"], info["size"])
    state.setdefault("person_box", model.person_box.clone())  # saved before the person box existed
    model.load_state_dict(state)
    return model.to(device).eval(), info
