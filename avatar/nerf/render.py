"""Volume rendering of the head field, the torso pass and compositing.

Sampling: ray-box near/far of the head box, stratified samples (jittered in training), and
occupancy skipping through the head's one occupancy grid (:mod:`avatar.nerf.occupancy`, nerfacc's
``OccGridEstimator``; Mueller et al. 2022 Sec. 5.1: the field is only evaluated at samples whose
grid cell is occupied). The dense ``[n_rays, n_samples]`` compositing uses nerfacc's
``render_weight_from_density`` / ``accumulate_along_rays`` (NeRF quadrature, Max 1995;
Mildenhall et al. 2020 Eq. 3), which run on CPU and CUDA with gradients.
"""

from __future__ import annotations

import nerfacc
import torch

from avatar.nerf.cuda_sampler import render_head_rays_nerfacc, use_nerfacc
from avatar.nerf.fields import HeadField
from avatar.nerf.occupancy import occupied
from avatar.nerf.rays import ray_aabb, stratified_samples


def render_head_rays(
    field: HeadField,
    grid: nerfacc.OccGridEstimator | None,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    cond: torch.Tensor,
    code: torch.Tensor,
    n_samples: int,
    jitter: bool = False,
    generator: torch.Generator | None = None,
    amp: bool = False,
) -> dict[str, torch.Tensor]:
    """Render head rays (canonical head frame, canonical units).

    On CUDA with nerfacc's CUDA extension and a ``grid`` given, the rays go through
    :func:`avatar.nerf.cuda_sampler.render_head_rays_nerfacc` (nerfacc's marcher over the grid,
    packed samples; ``amp`` = bfloat16 field MLPs there); otherwise (CPU, or the extension missing)
    the PyTorch sampler below skips the samples whose cell of the same ``grid`` is empty, and
    ignores ``amp``.

    Args:
        grid: the head's occupancy grid (``HeadNerf.estimator``); None evaluates every sample.
        origins, dirs: float32 [N, 3] (dirs unit length).
        cond: float32 [N, cond_dim] condition of each ray's frame; code: [N, ind_dim].
        n_samples: stratified samples per ray inside the head box.

    Returns:
        ``rgb`` [N, 3] (premultiplied by opacity), ``acc`` [N] opacity, ``ambient`` [N] weighted
        mean |ambient coordinate| (L1) along the ray, ``weights`` [N, n_samples], ``depth`` [N].
        (nerfacc path: ``weights`` packed [M] plus ``ray_indices`` [M].)
    """
    if grid is not None and use_nerfacc(origins.device):  # CUDA: nerfacc's marcher
        return render_head_rays_nerfacc(field, grid, origins, dirs, cond, code, n_samples, jitter, amp)
    N = origins.shape[0]
    near, far, hit = ray_aabb(origins, dirs, field.aabb)
    far = torch.where(hit, far, near)
    t0, t1 = stratified_samples(near, far, n_samples, jitter, generator)
    tm = 0.5 * (t0 + t1)
    x = origins[:, None, :] + dirs[:, None, :] * tm[..., None]  # [N, S, 3]
    mask = hit[:, None].expand(N, n_samples)
    if grid is not None:
        mask = mask & occupied(grid, field.normalize(x))
    sigma = torch.zeros(N, n_samples, device=origins.device)
    rgb = torch.zeros(N, n_samples, 3, device=origins.device)
    amb = torch.zeros(N, n_samples, device=origins.device)
    ray_id = torch.arange(N, device=origins.device)[:, None].expand(N, n_samples)[mask]
    if ray_id.numel():
        s, c, a = field(x[mask], dirs[ray_id], cond[ray_id], code[ray_id])
        sigma = sigma.masked_scatter(mask, s.float())
        rgb = rgb.masked_scatter(mask[..., None], c.float())
        amb = amb.masked_scatter(mask, a.float().abs().sum(-1))
    weights, _, _ = nerfacc.render_weight_from_density(t0, t1, sigma)
    return {
        "rgb": nerfacc.accumulate_along_rays(weights, rgb),
        "acc": weights.sum(-1),
        "ambient": (weights * amb).sum(-1),
        "depth": (weights * tm).sum(-1),
        "weights": weights,
    }


def composite(
    background: torch.Tensor,
    head_rgb: torch.Tensor,
    head_acc: torch.Tensor,
    torso_rgb: torch.Tensor | None = None,
    torso_alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """Alpha-over compositing: background plate -> torso -> head (all float32 in [0, 1]).

    ``background`` [N, 3]; ``head_rgb`` [N, 3] premultiplied; ``head_acc`` [N]; torso colour
    [N, 3] (not premultiplied) and alpha [N]. Returns [N, 3].
    """
    under = background
    if torso_rgb is not None:
        under = torso_alpha[:, None] * torso_rgb + (1 - torso_alpha[:, None]) * background
    return head_rgb + (1 - head_acc[:, None]) * under
