"""CUDA head-ray sampling with nerfacc's occupancy-grid estimator and packed volume rendering.

On CUDA (and only when nerfacc's CUDA extension loads) head rays are marched through
``nerfacc.OccGridEstimator`` (Li et al., "NerfAcc", ICCV 2023, Sec. 4.1; the occupancy grid of
Instant-NGP, Mueller et al. 2022, Sec. 5.1): the estimator traverses only occupied cells of a
``[G, G, G]`` binary grid with a constant step, drops samples behind saturated transmittance
(early stop) and returns a *packed* sample list ``(ray_indices, t_starts, t_ends)``. The field is
evaluated on those samples only and composited with ``render_weight_from_density`` /
``accumulate_along_rays`` in packed mode (NeRF quadrature, Max 1995; Mildenhall et al. 2020,
Eq. 3). Everywhere else :func:`avatar.nerf.render.render_head_rays` keeps the PyTorch sampler.

Conventions: the estimator's box (``roi_aabb``) is the head field's ``aabb`` in canonical head
units (the coordinates rays are expressed in), so ray parameters ``t`` are the same as in the
PyTorch sampler. Its state (``estimator.occs`` float32 [G^3] EMA of ``sigma * step``,
``estimator.binaries`` bool [1, G, G, G], ``estimator.aabbs`` [1, 6], ``estimator.resolution``
int32 [3]) lives in the head model's state dict, i.e. in ``model.safetensors`` and checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable

import nerfacc
import torch
from nerfacc import OccGridEstimator

log = logging.getLogger(__name__)

OCC_THRE = 1e-2
"""Occupancy threshold on ``sigma * step`` (per-sample opacity scale), nerfacc's default."""
INFER_ALPHA_THRE = 1e-3
"""Samples with opacity below this are skipped when no gradient is needed (inference)."""

_warned = False


@functools.cache
def _extension_error() -> str | None:
    """None when nerfacc's CUDA extension is importable, else why not (cached: it may JIT-build).
    ``AVATAR_NO_NERFACC=1`` disables it without trying (e.g. after a failed or too slow JIT build)."""
    if os.environ.get("AVATAR_NO_NERFACC", "") not in ("", "0"):
        return "disabled by AVATAR_NO_NERFACC"
    try:
        from nerfacc.cuda._backend import _C
    except Exception as e:  # build/import failure of the extension: any error means "unusable"
        return f"{type(e).__name__}: {e}"
    if _C is None:
        return "nerfacc's CUDA extension is not built and cannot be JIT-built (nvcc not found)"
    return None


def use_nerfacc(device: torch.device | str) -> bool:
    """True when head rays on ``device`` go through :func:`render_head_rays_nerfacc`.

    Requires ``device.type == "cuda"`` and a loadable nerfacc CUDA extension; when CUDA is present
    but the extension is not, logs one warning (per process) and returns False so that callers fall
    back to the PyTorch sampler.
    """
    global _warned
    if torch.device(device).type != "cuda":
        return False
    err = _extension_error()
    if err is None:
        return True
    if not _warned:
        _warned = True
        log.warning(
            "nerfacc CUDA extension unavailable (%s); head rays use the PyTorch sampler. "
            "Install nerfacc with CUDA support (prebuilt wheel or nvcc for its JIT build).",
            err,
        )
    return False


def make_estimator(aabb: torch.Tensor, resolution: int) -> OccGridEstimator:
    """Empty single-level ``OccGridEstimator`` over the head box.

    Args:
        aabb: float32 [6] head box (min xyz, max xyz) in canonical head units.
        resolution: cells per axis G (the preset's ``train.occ_resolution``).
    """
    return OccGridEstimator(roi_aabb=aabb.detach().float().cpu().clone(), resolution=int(resolution), levels=1)


def render_step_size(aabb: torch.Tensor, n_samples: int) -> float:
    """Marching step (canonical units): mean box side / ``n_samples``.

    A ray crossing the box parallel to an axis gets about ``n_samples`` samples in free space,
    the sample density of the PyTorch sampler with the same ``n_samples``.
    """
    ext = (aabb[3:] - aabb[:3]).float()
    return float(ext.mean()) / int(n_samples)


def estimator_is_empty(estimator: OccGridEstimator) -> bool:
    """True while the estimator has never been updated (all ``occs`` zero, nothing would be sampled)."""
    return not bool((estimator.occs != 0).any())


@torch.no_grad()
def estimator_from_grid(estimator: OccGridEstimator, grid_density: torch.Tensor, step: float) -> None:
    """Initialise ``estimator`` from the PyTorch sampler's occupancy grid (models trained without it).

    Args:
        grid_density: float32 [G, G, G] ``OccupancyGrid.density`` (1/unit; +inf = never updated,
            which marks every cell occupied). Same cell layout as the estimator (``ij`` indexing over
            the same box).
        step: marching step (canonical units) that turns density into ``occs = sigma * step``.

    Raises:
        ValueError: the grid and estimator resolutions differ.
    """
    G = tuple(int(r) for r in estimator.resolution.tolist())
    if tuple(grid_density.shape) != G:
        raise ValueError(f"occupancy grid {tuple(grid_density.shape)} does not match the estimator {G}")
    dev = estimator.occs.device
    d = grid_density.to(dev).float()
    if torch.isinf(d).any():
        estimator.occs.fill_(1.0)
        estimator.binaries.fill_(True)
        return
    occs = (d * step).reshape(-1)
    estimator.occs.copy_(occs)
    thre = torch.clamp(occs.mean(), max=OCC_THRE)  # the rule of nerfacc's own update
    estimator.binaries.copy_((occs > thre).view(estimator.binaries.shape))


@torch.no_grad()
def grid_from_estimator(estimator: OccGridEstimator, step: float) -> torch.Tensor:
    """``occs / step`` as a density grid float32 [G, G, G] for the PyTorch sampler's ``OccupancyGrid``."""
    G = [int(r) for r in estimator.resolution.tolist()]
    return (estimator.occs.float() / step).reshape(G).clone()


def update_estimator(
    estimator: OccGridEstimator,
    field,
    cond_fn: Callable[[], torch.Tensor],
    step: int,
    n_samples: int,
    every: int,
    warmup: int,
) -> None:
    """One training-step call of ``OccGridEstimator.update_every_n_steps`` for the head field.

    Every ``every`` steps the occupancy ``sigma(x) * step_size`` is evaluated at jittered cell
    centres (all cells during the first ``warmup`` steps, then a quarter uniform + a quarter
    occupied) under the condition ``cond_fn()`` ([1, cond_dim], called only on update steps), and
    EMA-maxed into ``estimator.occs`` (decay 0.95); ``binaries = occs > min(mean, OCC_THRE)``.
    Density is evaluated in float32 (no autocast). ``estimator`` must be in training mode.
    """
    step_size = render_step_size(field.aabb, n_samples)
    cache: dict[str, torch.Tensor] = {}

    def occ_eval_fn(x: torch.Tensor) -> torch.Tensor:
        if "cond" not in cache:
            cache["cond"] = cond_fn()
        with torch.autocast("cuda", enabled=False):
            sigma = field.density(x, cache["cond"].float().expand(len(x), -1))[0].float()
        return (sigma * step_size)[:, None]

    estimator.update_every_n_steps(step, occ_eval_fn, occ_thre=OCC_THRE, warmup_steps=warmup, n=every)


def render_head_rays_nerfacc(
    field,
    estimator: OccGridEstimator,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    cond: torch.Tensor,
    code: torch.Tensor,
    n_samples: int,
    jitter: bool = False,
    amp: bool = False,
) -> dict[str, torch.Tensor]:
    """Render head rays through the occupancy-grid estimator (CUDA only), packed samples.

    Args:
        field: :class:`avatar.nerf.fields.HeadField`.
        estimator: its ``OccGridEstimator`` (same device; see :func:`make_estimator`).
        origins, dirs: float32 [N, 3] canonical head frame (dirs unit length).
        cond: float32 [N, cond_dim] per-ray condition; code: [N, ind_dim] individual code.
        n_samples: sets the marching step (:func:`render_step_size`).
        jitter: stratified start offset of the march (training).
        amp: run the field MLPs / grids under ``torch.autocast("cuda", bfloat16)`` (inference);
            densities, transmittance and compositing are always float32. With ``amp=False`` an
            enclosing autocast (the trainer's) is left in charge of the field.
        Low-opacity samples (``< INFER_ALPHA_THRE``) are skipped when gradients are disabled.

    Returns:
        ``rgb`` [N, 3] premultiplied by opacity, ``acc`` [N], ``ambient`` [N] weighted |ambient
        coordinate| (L1), ``depth`` [N] (sum of weight x mid-sample t, as the PyTorch path),
        and the packed ``weights`` [M] with their ``ray_indices`` int64 [M] (M = kept samples).
    """
    N = origins.shape[0]
    step = render_step_size(field.aabb, n_samples)
    field_ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    def sigma_fn(t_starts: torch.Tensor, t_ends: torch.Tensor, ray_indices: torch.Tensor) -> torch.Tensor:
        x = origins[ray_indices] + dirs[ray_indices] * ((t_starts + t_ends) * 0.5)[:, None]
        with field_ctx():
            return field.density(x, cond[ray_indices])[0].float()

    ray_indices, t_starts, t_ends = estimator.sampling(
        origins,
        dirs,
        sigma_fn=sigma_fn,
        render_step_size=step,
        stratified=jitter,
        alpha_thre=0.0 if torch.is_grad_enabled() else INFER_ALPHA_THRE,
    )
    ray_indices = ray_indices.long()
    dev = origins.device
    if ray_indices.numel() == 0:
        z = torch.zeros(N, device=dev)
        return {
            "rgb": torch.zeros(N, 3, device=dev),
            "acc": z,
            "ambient": z.clone(),
            "depth": z.clone(),
            "weights": torch.zeros(0, device=dev),
            "ray_indices": ray_indices,
        }
    tm = 0.5 * (t_starts + t_ends)
    x = origins[ray_indices] + dirs[ray_indices] * tm[:, None]
    with field_ctx():
        sigma, rgb, amb = field(x, dirs[ray_indices], cond[ray_indices], code[ray_indices])
    with torch.autocast("cuda", enabled=False):
        weights, _, _ = nerfacc.render_weight_from_density(
            t_starts.float(), t_ends.float(), sigma.float(), ray_indices=ray_indices, n_rays=N
        )
        values = torch.cat(
            (rgb.float(), torch.ones_like(tm)[:, None], amb.float().abs().sum(-1, keepdim=True), tm[:, None].float()),
            -1,
        )  # [M, 6]
        acc = nerfacc.accumulate_along_rays(weights, values, ray_indices=ray_indices, n_rays=N)  # [N, 6]
    return {
        "rgb": acc[:, :3],
        "acc": acc[:, 3],
        "ambient": acc[:, 4],
        "depth": acc[:, 5],
        "weights": weights,
        "ray_indices": ray_indices,
    }


__all__ = [
    "INFER_ALPHA_THRE",
    "OCC_THRE",
    "estimator_from_grid",
    "estimator_is_empty",
    "grid_from_estimator",
    "make_estimator",
    "render_head_rays_nerfacc",
    "render_step_size",
    "update_estimator",
    "use_nerfacc",
]
