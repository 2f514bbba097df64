"""Rays against a hand-computed camera, ray-box intersection, volume rendering in closed form,
spherical harmonics, occupancy skipping through the one occupancy grid (its schedule and threshold)."""

from __future__ import annotations

import math

import torch
from torch import nn

from avatar.data.dataset import Intrinsics
from avatar.nerf.fields import sh_encoding
from avatar.nerf.rays import box_pixel_bounds, camera_rays, project_points, ray_aabb
from avatar.nerf.occupancy import DENSITY_THRE, make_grid, occupied, render_step_size, update_grid
from avatar.nerf.render import composite, render_head_rays


def test_camera_rays_hand_computed():
    K = Intrinsics(100.0, 200.0, 50.0, 40.0)
    # camera at (1, 2, 3), rotated 90 degrees about +y: camera z axis -> world +x
    c2w = torch.eye(4)
    c2w[:3, :3] = torch.tensor([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])
    c2w[:3, 3] = torch.tensor([1.0, 2, 3])
    pix = torch.tensor([[49.0, 39.0], [59.0, 39.0]])  # integer pixels; centres at +0.5
    o, d = camera_rays(pix, K, c2w, world_scale=2.0)
    torch.testing.assert_close(o, torch.tensor([[0.5, 1.0, 1.5]] * 2))
    # pixel (49, 39): centre (49.5, 39.5) -> cam dir (-0.005, -0.0025, 1)
    dc = torch.tensor([-0.005, -0.0025, 1.0])
    expected0 = torch.tensor([dc[2], dc[1], -dc[0]]) / dc.norm()
    torch.testing.assert_close(d[0], expected0)
    dc = torch.tensor([0.095, -0.0025, 1.0])  # pixel (59, 39)
    torch.testing.assert_close(d[1], torch.tensor([dc[2], dc[1], -dc[0]]) / dc.norm())


def test_projection_inverts_rays():
    K = Intrinsics(150.0, 150.0, 32.0, 32.0)
    pose = torch.eye(4)
    pose[:3, 3] = torch.tensor([0.01, -0.02, 0.8])
    pix = torch.tensor([[10.0, 20.0], [40.0, 5.0]])
    o, d = camera_rays(pix, K, torch.linalg.inv(pose))
    pts = o + 0.7 * d
    torch.testing.assert_close(project_points(pts, pose, K), pix + 0.5, atol=1e-4, rtol=0)
    x0, y0, x1, y1 = box_pixel_bounds(torch.tensor([-0.05, -0.05, -0.05, 0.05, 0.05, 0.05]), pose, K, 1.0, 64)
    assert 0 <= x0 < 32 < x1 <= 64 and 0 <= y0 < 28 < y1 <= 64


def test_ray_aabb():
    o = torch.tensor([[0.0, 0, -5], [0.0, 5, -5], [0.5, 0.5, 0.0]])
    d = torch.tensor([[0.0, 0, 1], [0.0, 0, 1], [0.0, 0, 1]])
    near, far, hit = ray_aabb(o, d, torch.tensor([-1.0, -1, -1, 1, 1, 1]))
    assert hit.tolist() == [True, False, True]
    torch.testing.assert_close(near[[0, 2]], torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(far[[0, 2]], torch.tensor([6.0, 1.0]))


class _ConstantSlab(nn.Module):
    """Test field: constant density and colour inside a box (closed-form transmittance)."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma
        self.register_buffer("aabb", torch.tensor([-1.0, -1, 0, 1, 1, 0.5]))

    def normalize(self, x):
        return (x - self.aabb[:3]) / (self.aabb[3:] - self.aabb[:3])

    def forward(self, x, d, cond, code):
        n = x.shape[0]
        return torch.full((n,), self.sigma), torch.tensor([0.2, 0.4, 0.8]).expand(n, 3), torch.zeros(n, 2)


def test_volume_rendering_constant_slab_closed_form():
    sigma = 3.0
    field = _ConstantSlab(sigma)
    o = torch.tensor([[0.0, 0, -2], [0.3, 0, -2], [5.0, 0, -2]])
    d = torch.nn.functional.normalize(torch.tensor([[0.0, 0, 1], [0.2, 0, 1], [0.0, 0, 1]]), dim=-1)
    r = render_head_rays(field, None, o, d, torch.zeros(3, 1), torch.zeros(3, 1), n_samples=64)
    length = torch.tensor([0.5, 0.5 / float(d[1, 2]), 0.0])  # path length inside the slab
    acc = 1 - torch.exp(-sigma * length)  # transmittance exp(-sigma * d)
    torch.testing.assert_close(r["acc"], acc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r["rgb"], acc[:, None] * torch.tensor([0.2, 0.4, 0.8]), atol=1e-5, rtol=1e-5)
    out = composite(torch.ones(3, 3), r["rgb"], r["acc"])
    torch.testing.assert_close(out[2], torch.ones(3))


def test_occupancy_grid_skips_empty_cells():
    """One grid (nerfacc's estimator) for the CPU sampler: every cell occupied until the first update
    at ``warmup``; then cells whose density is below ``min(mean, DENSITY_THRE)`` are skipped."""
    calls = []

    class Probe(_ConstantSlab):
        def density(self, x, cond):  # sigma 10 in the right half of the box, 0 in the left
            return ((x[:, 0] > 0.5).float() * 10.0,)

        def forward(self, x, d, cond, code):
            calls.append(x.shape[0])
            return super().forward(x, d, cond, code)

    f = Probe(1.0)
    f.aabb = torch.tensor([0.0, 0, 0, 1, 1, 1])
    grid = make_grid(f.aabb, 8)
    u = torch.tensor([[0.1, 0.5, 0.5], [0.9, 0.5, 0.5]])
    assert occupied(grid, u).all()  # before any update everything is occupied
    cond_calls = []

    def cond_fn():
        cond_calls.append(1)
        return torch.zeros(1, 1)

    torch.manual_seed(0)
    for step in range(0, 4):  # before warmup (4): no update, and no condition is computed
        update_grid(grid, f, cond_fn, step, n_samples=16, every=2, warmup=4)
    assert occupied(grid, u).all() and not cond_calls
    update_grid(grid, f, cond_fn, 5, n_samples=16, every=2, warmup=4)  # not a multiple of `every`
    assert occupied(grid, u).all() and not cond_calls
    update_grid(grid, f, cond_fn, 4, n_samples=16, every=2, warmup=4)
    assert occupied(grid, u).tolist() == [False, True] and cond_calls == [1]
    step = render_step_size(f.aabb, 16)
    occs = grid.occs.view(8, 8, 8)
    torch.testing.assert_close(occs[4:], torch.full((4, 8, 8), 10.0 * step))  # sigma * step, right half
    assert float(occs[:4].abs().max()) == 0 and 10.0 > DENSITY_THRE
    o = torch.tensor([[0.25, 0.5, -1], [0.75, 0.5, -1]])
    d = torch.tensor([[0.0, 0, 1], [0.0, 0, 1]])
    r = render_head_rays(f, grid, o, d, torch.zeros(2, 1), torch.zeros(2, 1), n_samples=16)
    assert calls == [16] and r["acc"][0] == 0 and r["acc"][1] > 0.5


def test_spherical_harmonics_orthonormal():
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(200_000, 3, generator=g, dtype=torch.float64), dim=-1)
    y = sh_encoding(d)
    gram = (y.T @ y) * (4 * math.pi / d.shape[0])
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=0.03, rtol=0)
