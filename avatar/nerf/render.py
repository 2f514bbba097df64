"""Volume rendering of the head field, the torso pass and compositing.

Sampling: ray-box near/far of the head box, stratified samples (jittered in training), and
occupancy skipping through a coarse density grid (torch-ngp / nerfacc ``OccGridEstimator``
idea, Mueller et al. 2022 Sec. 5.1: the field is only evaluated at samples whose grid cell is
occupied). The dense ``[n_rays, n_samples]`` compositing uses nerfacc's
``render_weight_from_density`` / ``accumulate_along_rays`` (NeRF quadrature, Max 1995;
Mildenhall et al. 2020 Eq. 3), which run on CPU and CUDA with gradients.
"""

from __future__ import annotations

import nerfacc
import torch
from torch import nn

from avatar.nerf.cuda_sampler import render_head_rays_nerfacc, use_nerfacc
from avatar.nerf.fields import HeadField
from avatar.nerf.rays import ray_aabb, stratified_samples


class OccupancyGrid(nn.Module):
    """Coarse density grid ``[G, G, G]`` over the head box; cells below threshold are skipped.

    ``density`` starts at +inf (everything occupied) until the first :meth:`update`.
    Updates take an exponential-decayed running max of densities at jittered cell centres
    (torch-ngp: decay 0.95, threshold ``min(mean density, density_thresh)``).
    """

    def __init__(self, resolution: int, density_thresh: float = 0.5, decay: float = 0.95):
        super().__init__()
        self.resolution = resolution
        self.density_thresh = density_thresh
        self.decay = decay
        self.register_buffer("density", torch.full((resolution,) * 3, float("inf")))

    @torch.no_grad()
    def update(self, density_fn, generator: torch.Generator | None = None, chunk: int = 65536) -> None:
        """``density_fn``: points in [0, 1]^3 box coordinates [N, 3] -> sigma [N]."""
        G = self.resolution
        dev = self.density.device
        ax = torch.arange(G, device=dev, dtype=torch.float32)
        cells = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
        pts = (cells + torch.rand(cells.shape, generator=generator).to(dev)) / G
        new = torch.cat([density_fn(pts[i : i + chunk]) for i in range(0, pts.shape[0], chunk)]).reshape(G, G, G)
        old = self.density
        self.density = torch.where(torch.isinf(old), new, torch.maximum(old * self.decay, new))

    def threshold(self) -> float:
        d = self.density
        if torch.isinf(d).any():
            return float("-inf")
        return min(float(d.mean()), self.density_thresh)

    def occupied(self, u: torch.Tensor) -> torch.Tensor:
        """Box coordinates [..., 3] in [0, 1] -> bool [...] (True = evaluate the field)."""
        G = self.resolution
        idx = (u.clamp(0, 1 - 1e-6) * G).long()
        return self.density[idx[..., 0], idx[..., 1], idx[..., 2]] > self.threshold()


def render_head_rays(
    field: HeadField,
    occ: OccupancyGrid | None,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    cond: torch.Tensor,
    code: torch.Tensor,
    n_samples: int,
    jitter: bool = False,
    generator: torch.Generator | None = None,
    estimator: nerfacc.OccGridEstimator | None = None,
    amp: bool = False,
) -> dict[str, torch.Tensor]:
    """Render head rays (canonical head frame, canonical units).

    On CUDA with nerfacc's CUDA extension and an ``estimator`` given, the rays go through
    :func:`avatar.nerf.cuda_sampler.render_head_rays_nerfacc` (occupancy-grid estimator, packed
    samples; ``amp`` = bfloat16 field MLPs there); otherwise (CPU, or the extension missing) the
    PyTorch sampler below, for which ``estimator`` and ``amp`` are ignored.

    Args:
        origins, dirs: float32 [N, 3] (dirs unit length).
        cond: float32 [N, cond_dim] condition of each ray's frame; code: [N, ind_dim].
        n_samples: stratified samples per ray inside the head box.

    Returns:
        ``rgb`` [N, 3] (premultiplied by opacity), ``acc`` [N] opacity, ``ambient`` [N] weighted
        mean |ambient coordinate| (L1) along the ray, ``weights`` [N, n_samples], ``depth`` [N].
        (nerfacc path: ``weights`` packed [M] plus ``ray_indices`` [M].)
    """
    if estimator is not None and use_nerfacc(origins.device):  # CUDA: nerfacc estimator
        return render_head_rays_nerfacc(field, estimator, origins, dirs, cond, code, n_samples, jitter, amp)
    N = origins.shape[0]
    near, far, hit = ray_aabb(origins, dirs, field.aabb)
    far = torch.where(hit, far, near)
    t0, t1 = stratified_samples(near, far, n_samples, jitter, generator)
    tm = 0.5 * (t0 + t1)
    x = origins[:, None, :] + dirs[:, None, :] * tm[..., None]  # [N, S, 3]
    mask = hit[:, None].expand(N, n_samples)
    if occ is not None:
        mask = mask & occ.occupied(field.normalize(x))
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
