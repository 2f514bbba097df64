"""The head NeRF's one occupancy grid: nerfacc's ``OccGridEstimator``, on every device.

Occupancy skipping (Instant-NGP, Mueller et al. 2022, Sec. 5.1; NerfAcc, Li et al. ICCV 2023,
Sec. 4.1): a binary ``[G, G, G]`` grid over the head box marks the cells where the density is worth
evaluating. One state serves both samplers: on CUDA nerfacc's ray marcher traverses it
(:mod:`avatar.nerf.cuda_sampler`); on the CPU the PyTorch sampler of :mod:`avatar.nerf.render`
looks its stratified samples up in it (:func:`occupied`). Its update is nerfacc's
``update_every_n_steps`` (plain PyTorch, runs on the CPU too), called by the trainer for both.

State (in the head model's state dict under ``estimator.``, i.e. ``model.safetensors`` and
checkpoints): ``occs`` float32 [G^3] running max (EMA decay 0.95) of ``sigma * step``,
``binaries`` bool [1, G, G, G], ``aabbs`` float32 [1, 6] (the head field's ``aabb``, canonical head
units), ``resolution`` int32 [3]. A new grid has every cell occupied (``binaries`` all True,
``occs`` zero) until the first update.

Schedule (preset ``train.occ_warmup`` W, ``train.occ_every`` n): no update before step W (the
field is still noise); from W on one update every n steps, each evaluating every cell: the rule
of torch-ngp / RAD-NeRF and of the PyTorch grid this replaces, so CPU training does what it did
before (nerfacc's own rule, a quarter of uniform plus a quarter of occupied cells after its warmup,
trained the acosta head ~10 % faster on the CPU at the same quality within the spread of two seeds,
bench/RESULTS.md 2026-12-06; a later change can take it with a GPU run to check it); the threshold is
``binaries = occs > min(mean(occs), DENSITY_THRE * step)``, i.e. a cell is occupied where its density
exceeds ``min(mean density, DENSITY_THRE)`` (torch-ngp's rule and value; nerfacc's default
``occ_thre = 0.01`` on ``sigma * step`` keeps 5-10x thinner cells at our step sizes, and on the real
acosta test clip left a translucent haze around the head: mean alpha outside the head mask 0.03-0.05
after 120 cpu-smoke steps, against 0.006-0.011 with this threshold).

Before this module (models saved up to 2026-12-06) the CPU sampler kept its own density grid
``occ.density`` [G, G, G] with the same threshold; :func:`grid_from_legacy_density` turns such a
file's grid into this state with the same cells occupied, so old avatars render bit-identically on
the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from nerfacc import OccGridEstimator

DENSITY_THRE = 0.5
"""Upper bound of the occupancy threshold in density units (1/canonical unit); the grid's own unit is
``sigma * step``, so nerfacc gets ``occ_thre = DENSITY_THRE * step``."""


def make_grid(aabb: torch.Tensor, resolution: int) -> OccGridEstimator:
    """Single-level ``OccGridEstimator`` over the head box with every cell occupied.

    Args:
        aabb: float32 [6] head box (min xyz, max xyz) in canonical head units.
        resolution: cells per axis G (the preset's ``train.occ_resolution``).
    """
    grid = OccGridEstimator(roi_aabb=aabb.detach().float().cpu().clone(), resolution=int(resolution), levels=1)
    grid.binaries.fill_(True)
    return grid


def render_step_size(aabb: torch.Tensor, n_samples: int) -> float:
    """Marching step (canonical units): mean box side / ``n_samples``.

    A ray crossing the box parallel to an axis gets about ``n_samples`` samples in free space,
    the sample density of the PyTorch sampler with the same ``n_samples``; ``sigma * step`` is the
    per-sample opacity scale the grid stores.
    """
    ext = (aabb[3:] - aabb[:3]).float()
    return float(ext.mean()) / int(n_samples)


def occupied(grid: OccGridEstimator, u: torch.Tensor) -> torch.Tensor:
    """Box coordinates float [..., 3] in [0, 1] (``HeadField.normalize``) -> bool [...], True where
    the cell is occupied (the field is evaluated there). Same cell layout as nerfacc's marcher
    (``ij`` indexing over ``aabbs[0]``)."""
    res = grid.resolution.to(u.device)
    idx = (u.clamp(0, 1 - 1e-6) * res).long()
    return grid.binaries[0, idx[..., 0], idx[..., 1], idx[..., 2]]


def update_grid(
    grid: OccGridEstimator,
    field,
    cond_fn: Callable[[], torch.Tensor],
    step: int,
    n_samples: int,
    every: int,
    warmup: int,
) -> None:
    """The training-step update of the occupancy grid (schedule in the module docstring).

    On update steps the occupancy ``sigma(x) * step_size`` is evaluated at the jittered centres of all cells
    (``torch.rand``: the global RNG, which checkpoints store) under the condition ``cond_fn()``
    (float32 [1, cond_dim], called only on update steps) and EMA-maxed into ``grid.occs``. Density is
    evaluated in float32 (no autocast). ``grid`` must be in training mode.

    Args:
        field: :class:`avatar.nerf.fields.HeadField` (``density(x, cond)`` and ``aabb``).
        step: the optimiser step about to run (0-based).
        n_samples, every, warmup: the preset's ``n_samples``, ``occ_every``, ``occ_warmup``.
    """
    if step < warmup or step % every:  # not an update step: nothing to compute on the hot path
        return
    step_size = render_step_size(field.aabb, n_samples)
    cache: dict[str, torch.Tensor] = {}

    def occ_eval_fn(x: torch.Tensor) -> torch.Tensor:
        if "cond" not in cache:
            cache["cond"] = cond_fn()
        with torch.autocast(x.device.type, enabled=False):
            sigma = field.density(x, cache["cond"].float().expand(len(x), -1))[0].float()
        return (sigma * step_size)[:, None]

    # warmup_steps > step: nerfacc evaluates every cell (the schedule in the module docstring)
    grid.update_every_n_steps(step, occ_eval_fn, occ_thre=DENSITY_THRE * step_size, warmup_steps=step + 1, n=every)


@torch.no_grad()
def grid_from_legacy_density(grid: OccGridEstimator, density: torch.Tensor, step: float) -> None:
    """Set ``grid`` from the density grid of a model saved before the one grid (in place).

    The occupied cells are the ones the old PyTorch sampler evaluated (``density > min(mean,
    DENSITY_THRE)``, the rule :func:`update_grid` keeps; all of them while the grid was never updated,
    +inf), so CPU renders of old models do not change; ``occs = density * step`` carries the values
    on for further updates.

    Args:
        density: float32 [G, G, G] the old ``occ.density`` (1/unit; +inf = never updated).
        step: :func:`render_step_size` of the model.

    Raises:
        ValueError: the density grid and ``grid`` resolutions differ.
    """
    G = tuple(int(r) for r in grid.resolution.tolist())
    if tuple(density.shape) != G:
        raise ValueError(f"occupancy grid {tuple(density.shape)} does not match the estimator {G}")
    d = density.to(grid.occs.device).float()
    if torch.isinf(d).any():
        grid.occs.zero_()
        grid.binaries.fill_(True)
        return
    grid.occs.copy_((d * step).reshape(-1))
    thre = min(float(d.mean()), DENSITY_THRE)
    grid.binaries.copy_((d > thre).view(grid.binaries.shape))


__all__ = [
    "DENSITY_THRE",
    "grid_from_legacy_density",
    "make_grid",
    "occupied",
    "render_step_size",
    "update_grid",
]
