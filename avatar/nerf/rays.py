"""Camera rays, ray-box intersection and the stratified sampler used on CPU (and as the CUDA
fallback when nerfacc's CUDA extension is unavailable).

Conventions: OpenCV pinhole camera (x right, y down, z forward), pixel ``(u, v)`` centres at
``u + 0.5``; ``pose`` is head-to-camera (dataset contract), so rays are generated in the
*head frame* by moving the camera with the inverse pose (head-centric NeRF, GeneFace Sec. 3.3 /
RAD-NeRF). Head-frame coordinates are divided by ``head_scale`` (the canonical landmark units).
"""

from __future__ import annotations

import torch

from avatar.data.dataset import Intrinsics


def camera_rays(
    pix: torch.Tensor, intrinsics: Intrinsics | torch.Tensor, cam_to_world: torch.Tensor, world_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through pixel centres.

    Args:
        pix: float32 [N, 2] integer pixel coordinates (x = column, y = row), pixels.
        intrinsics: fx, fy, cx, cy in pixels (or float32 [4] tensor).
        cam_to_world: float32 [N, 4, 4] (or [4, 4]) camera-to-world rigid transform.
        world_scale: world coordinates are divided by this (e.g. ``head_scale``).

    Returns:
        origins float32 [N, 3] and unit directions float32 [N, 3] in world coordinates.
    """
    if isinstance(intrinsics, Intrinsics):
        fx, fy, cx, cy = intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy
    else:
        fx, fy, cx, cy = (float(v) for v in intrinsics)
    d_cam = torch.stack(((pix[:, 0] + 0.5 - cx) / fx, (pix[:, 1] + 0.5 - cy) / fy, torch.ones_like(pix[:, 0])), -1)
    if cam_to_world.dim() == 2:
        cam_to_world = cam_to_world.expand(pix.shape[0], 4, 4)
    R = cam_to_world[:, :3, :3]
    d = torch.einsum("nij,nj->ni", R, d_cam)
    d = d / d.norm(dim=-1, keepdim=True)
    o = cam_to_world[:, :3, 3] / world_scale
    return o, d


def ray_aabb(
    origins: torch.Tensor, dirs: torch.Tensor, aabb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab-method ray / axis-aligned box intersection.

    Args:
        origins, dirs: float32 [N, 3]; aabb: float32 [6] (xmin, ymin, zmin, xmax, ymax, zmax).

    Returns:
        near [N], far [N] (ray parameter, same units as the box) and hit bool [N]; ``near >= 0``.
    """
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (aabb[:3] - origins) * inv
    t1 = (aabb[3:] - origins) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far, far > near


def stratified_samples(
    near: torch.Tensor, far: torch.Tensor, n_samples: int, jitter: bool, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified sample intervals between ``near`` and ``far`` (NeRF, Mildenhall et al. 2020, Eq. 2).

    Returns ``t_starts``, ``t_ends`` float32 [N, n_samples]; with ``jitter`` the bins are shifted
    by one uniform offset per ray (training), else sample at bin starts (deterministic).
    """
    u = torch.linspace(0.0, 1.0, n_samples + 1, device=near.device)
    span = (far - near).clamp(min=0.0)[:, None]
    edges = near[:, None] + span * u[None, :]
    if jitter:
        off = torch.rand(near.shape[0], 1, device=near.device, generator=generator) * (span / n_samples)
        edges = edges + off
    return edges[:, :-1], edges[:, 1:]


def project_points(points: torch.Tensor, pose: torch.Tensor, intrinsics: Intrinsics) -> torch.Tensor:
    """Project head-frame points float32 [..., 3] with head-to-camera ``pose`` [4, 4] -> pixels [..., 2]."""
    cam = points @ pose[:3, :3].T + pose[:3, 3]
    z = cam[..., 2:3].clamp(min=1e-6)
    return torch.cat(
        (intrinsics.fx * cam[..., :1] / z + intrinsics.cx, intrinsics.fy * cam[..., 1:2] / z + intrinsics.cy), -1
    )


def box_pixel_bounds_batch(
    aabb: torch.Tensor, pose: torch.Tensor, intrinsics: Intrinsics, world_scale: float, size: int
) -> torch.Tensor:
    """:func:`box_pixel_bounds` for a batch of poses, computed on the poses' device (no host sync).

    Args:
        aabb: float32 [6] box in head units; pose: float32 [B, 4, 4] head-to-camera transforms.

    Returns:
        int64 [B, 4] ``(x0, y0, x1, y1)`` per pose, exclusive ends, clipped to ``[0, size]``; the same
        numbers as :func:`box_pixel_bounds` pose by pose.
    """
    lo, hi = aabb[:3], aabb[3:]
    corners = torch.stack([torch.stack([(hi if (c >> i) & 1 else lo)[i] for i in range(3)]) for c in range(8)])
    pts = (corners * world_scale).to(pose.device)  # [8, 3]
    cam = torch.einsum("kj,bij->bki", pts, pose[:, :3, :3]) + pose[:, None, :3, 3]  # [B, 8, 3]
    z = cam[..., 2:3].clamp(min=1e-6)
    uv = torch.cat(
        (intrinsics.fx * cam[..., :1] / z + intrinsics.cx, intrinsics.fy * cam[..., 1:2] / z + intrinsics.cy), -1
    )
    lo_px = uv.amin(1).floor()
    hi_px = uv.amax(1).ceil() + 1
    return torch.cat((lo_px, hi_px), -1).clamp(0, size).long()[:, [0, 1, 2, 3]]


def box_pixel_bounds(
    aabb: torch.Tensor, pose: torch.Tensor, intrinsics: Intrinsics, world_scale: float, size: int
) -> tuple[int, int, int, int]:
    """Pixel rectangle ``(x0, y0, x1, y1)`` (exclusive ends, clipped to the frame) covering the
    projection of the box ``aabb`` [6] (in head units) under head-to-camera ``pose`` [4, 4]."""
    lo, hi = aabb[:3], aabb[3:]
    corners = torch.stack([torch.stack([(hi if (c >> i) & 1 else lo)[i] for i in range(3)]) for c in range(8)])
    uv = project_points(corners * world_scale, pose, intrinsics)
    x0 = int(max(0, min(size, int(uv[:, 0].min().floor()))))
    y0 = int(max(0, min(size, int(uv[:, 1].min().floor()))))
    x1 = int(max(0, min(size, int(uv[:, 0].max().ceil()) + 1)))
    y1 = int(max(0, min(size, int(uv[:, 1].max().ceil()) + 1)))
    return x0, y0, x1, y1
