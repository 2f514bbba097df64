"""CUDA head-ray sampling with nerfacc's occupancy-grid estimator and packed volume rendering.

On CUDA (and only when nerfacc's CUDA extension loads) head rays are marched through
``nerfacc.OccGridEstimator`` (Li et al., "NerfAcc", ICCV 2023, Sec. 4.1; the occupancy grid of
Instant-NGP, Mueller et al. 2022, Sec. 5.1): the estimator traverses only occupied cells of a
``[G, G, G]`` binary grid with a constant step, drops samples behind saturated transmittance
(early stop) and returns a *packed* sample list ``(ray_indices, t_starts, t_ends)``. The field is
evaluated on those samples only and composited with ``render_weight_from_density`` /
``accumulate_along_rays`` in packed mode (NeRF quadrature, Max 1995; Mildenhall et al. 2020,
Eq. 3). Everywhere else :func:`avatar.nerf.render.render_head_rays` keeps the PyTorch sampler.

Conventions: the estimator is the head model's one occupancy grid (:mod:`avatar.nerf.occupancy`:
its state, update schedule and threshold), the same state the CPU sampler reads; its box
(``roi_aabb``) is the head field's ``aabb`` in canonical head units (the coordinates rays are
expressed in), so ray parameters ``t`` are the same as in the PyTorch sampler.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import nerfacc
import torch
from nerfacc import OccGridEstimator

from avatar.nerf.occupancy import render_step_size

log = logging.getLogger(__name__)

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
        estimator: the head's occupancy grid (same device; :func:`avatar.nerf.occupancy.make_grid`).
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


__all__ = ["INFER_ALPHA_THRE", "render_head_rays_nerfacc", "use_nerfacc"]
