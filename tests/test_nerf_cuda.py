"""The head's one occupancy grid (nerfacc's estimator) on disk, and the nerfacc path (``avatar.nerf.cuda_sampler``).

CPU tests: the grid is stored with the head model; files saved before the one grid (with the old
PyTorch density grid ``occ.density``) load with the same occupied cells; the CPU sampler ignores
``amp`` (bit-identical). ``@pytest.mark.cuda`` tests (skipped without a GPU): a tiny head trained on
CUDA renders through nerfacc's marcher like the dense PyTorch quadrature on the same field, and its
grid survives save/load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_nerf_train import dataset  # noqa: F401  (module fixture: a real 3 s, 64 px dataset)

from avatar.config import to_dict
from avatar.nerf.cuda_sampler import use_nerfacc
from avatar.nerf.model import atomic_save, build_head, load_head
from avatar.nerf.occupancy import DENSITY_THRE, grid_from_legacy_density, make_grid
from avatar.nerf.presets import get_preset
from avatar.nerf.render import render_head_rays


def _tiny_head():
    torch.manual_seed(0)
    cfg = get_preset("cpu-smoke")
    return cfg, build_head(cfg, 4, torch.tensor([-1.0, -1.2, -0.9, 1.1, 1.0, 0.8]))


def _write_part(part: Path, cfg, state: dict[str, torch.Tensor]) -> None:
    part.mkdir(parents=True, exist_ok=True)
    (part / "config.json").write_text(json.dumps({"config": to_dict(cfg), "n_train_frames": 4}))
    atomic_save(state, part / "model.safetensors")


def _rays(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    o = torch.tensor([[0.0, 0.0, -4.0]]).repeat(n, 1)
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen) * 0.15 + torch.tensor([0.0, 0.0, 1.0]), dim=-1)
    return o, d


def test_use_nerfacc_is_false_on_cpu():
    assert use_nerfacc("cpu") is False
    assert use_nerfacc(torch.device("cpu")) is False


def _legacy_state(head, density: torch.Tensor, estimator: bool = True) -> dict[str, torch.Tensor]:
    """A head state dict as saved before the one grid: ``occ.density`` beside an estimator that a CPU
    run never updated (occs 0, binaries all False), or (``estimator=False``) no estimator at all."""
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("estimator.")}
    state["occ.density"] = density
    if estimator:
        state["estimator.occs"] = torch.zeros_like(head.estimator.occs)
        state["estimator.binaries"] = torch.zeros_like(head.estimator.binaries)
        state["estimator.aabbs"] = head.estimator.aabbs.clone()
        state["estimator.resolution"] = head.estimator.resolution.clone()
    return state


def test_grid_saved_with_head_and_legacy_density_grids_load(tmp_path):
    cfg, head = _tiny_head()
    G = cfg.train.occ_resolution
    state = head.state_dict()
    assert {"estimator.occs", "estimator.binaries", "estimator.aabbs", "estimator.resolution"} <= set(state)
    assert not any(k.startswith("occ.") for k in state)  # one grid
    assert bool(head.estimator.binaries.all())  # a new grid has every cell occupied

    # files saved before the one grid: the occupied cells are the old sampler's (density > min(mean, 0.5))
    density = torch.rand(G, G, G, generator=torch.Generator().manual_seed(1)) * 0.8
    expect = density > min(float(density.mean()), DENSITY_THRE)
    assert 0 < int(expect.sum()) < expect.numel()
    for name, legacy_state in (
        ("legacy", _legacy_state(head, density)),
        ("oldest", _legacy_state(head, density, False)),
    ):
        _write_part(tmp_path / name, cfg, legacy_state)
        legacy, _ = load_head(tmp_path / name)
        assert torch.equal(legacy.estimator.binaries[0], expect), name
        torch.testing.assert_close(legacy.estimator.occs, density.reshape(-1) * legacy.step_size)
        assert torch.allclose(legacy.estimator.aabbs[0], head.field.aabb)

    # a legacy CUDA-trained file (its estimator was updated): the estimator is kept, the density dropped
    trained = _legacy_state(head, density)
    trained["estimator.occs"] = torch.rand(G**3, generator=torch.Generator().manual_seed(2)) * 0.02
    trained["estimator.binaries"] = (trained["estimator.occs"] > 0.01).view_as(head.estimator.binaries)
    _write_part(tmp_path / "cuda_legacy", cfg, trained)
    back, _ = load_head(tmp_path / "cuda_legacy")
    assert torch.equal(back.estimator.occs, trained["estimator.occs"])
    assert torch.equal(back.estimator.binaries, trained["estimator.binaries"])

    # round trip: a trained grid comes back exactly
    head.estimator.occs.copy_(trained["estimator.occs"])
    head.estimator.binaries.copy_(trained["estimator.binaries"])
    _write_part(tmp_path / "new", cfg, head.state_dict())
    back, _ = load_head(tmp_path / "new")
    assert torch.equal(back.estimator.occs, head.estimator.occs)
    assert torch.equal(back.estimator.binaries, head.estimator.binaries)


def test_never_updated_legacy_grid_marks_every_cell_occupied():
    _, head = _tiny_head()
    G = int(head.estimator.resolution[0])
    grid = make_grid(head.field.aabb, G)
    grid.binaries.zero_()
    grid_from_legacy_density(grid, torch.full((G, G, G), float("inf")), 0.1)  # +inf: never updated
    assert bool(grid.binaries.all())
    with pytest.raises(ValueError):
        grid_from_legacy_density(grid, torch.zeros(3, 3, 3), 0.1)


def test_cpu_render_ignores_amp_bit_identical():
    cfg, head = _tiny_head()
    gen = torch.Generator().manual_seed(3)
    o, d = _rays(32, gen)
    cond = torch.randn(32, cfg.head.cond_dim, generator=gen)
    code = torch.randn(32, cfg.head.ind_dim, generator=gen)
    with torch.no_grad():
        a = render_head_rays(head.field, head.estimator, o, d, cond, code, 12)
        b = render_head_rays(head.field, head.estimator, o, d, cond, code, 12, amp=True)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------ CUDA
@pytest.fixture(scope="module")
def trained_cuda(dataset, tmp_path_factory) -> Path:  # noqa: F811
    if not use_nerfacc("cuda"):
        pytest.skip("nerfacc's CUDA extension does not load on this machine")
    from avatar.nerf.trainer import train_nerf

    out = tmp_path_factory.mktemp("nerf_cuda")
    train_nerf(dataset, out, part="head", preset="cpu-smoke", steps=150, seed=0, progress=False, device="cuda")
    return out


def _val_rays(dataset, head, n_max: int = 2048):  # noqa: F811
    from avatar.data.dataset import Dataset
    from avatar.nerf.rays import box_pixel_bounds, camera_rays
    from avatar.nerf.datamanager import landmark_window

    ds = Dataset(dataset)
    f = int(ds.val_range.start)
    pose = torch.from_numpy(np.array(ds.pose[f], dtype=np.float32))
    x0, y0, x1, y1 = box_pixel_bounds(head.field.aabb.cpu(), pose, ds.intrinsics, ds.head_scale, ds.size)
    ys, xs = torch.meshgrid(torch.arange(y0, y1), torch.arange(x0, x1), indexing="ij")
    pix = torch.stack((xs, ys), -1).reshape(-1, 2)[:n_max].float()
    o, d = camera_rays(pix, ds.intrinsics, torch.linalg.inv(pose), ds.head_scale)
    win = landmark_window(ds.n_frames, np.array([f]), head.field.cfg.window)
    lm = torch.from_numpy(np.array(ds.lm3d, dtype=np.float32)[win]).cuda()
    cond = head.field.cond_net(lm, None)
    n = len(pix)
    return o.cuda(), d.cuda(), cond.expand(n, -1), head.field.individual_code(None, n)


@pytest.mark.cuda
def test_nerfacc_matches_pytorch_sampler(dataset, trained_cuda):  # noqa: F811
    head, _ = load_head(trained_cuda / "head", "cuda")
    with torch.no_grad():
        o, d, cond, code = _val_rays(dataset, head)
        ref = render_head_rays(head.field, None, o, d, cond, code, 256)  # dense PyTorch quadrature
        acc = render_head_rays(head.field, head.estimator, o, d, cond, code, 256)
    assert "ray_indices" in acc and acc["weights"].dim() == 1  # the nerfacc path ran
    assert acc["weights"].numel() < o.shape[0] * 256  # and skipped space
    assert float(ref["acc"].max()) > 0.5  # the head is there
    for k in ("rgb", "acc", "depth", "ambient"):
        assert acc[k].shape == ref[k].shape, k
    assert float((acc["rgb"] - ref["rgb"]).abs().mean()) < 0.02
    assert float((acc["acc"] - ref["acc"]).abs().mean()) < 0.02
    assert float((acc["depth"] - ref["depth"]).abs().mean()) < 0.05 * float(ref["depth"].abs().mean() + 1e-6)


@pytest.mark.cuda
def test_estimator_round_trip_cuda(trained_cuda):
    from safetensors.torch import load_file

    state = load_file(str(trained_cuda / "head" / "model.safetensors"))
    assert float(state["estimator.occs"].abs().sum()) > 0  # updated in training
    assert 0 < int(state["estimator.binaries"].sum()) < state["estimator.binaries"].numel()
    head, _ = load_head(trained_cuda / "head", "cuda")
    assert torch.equal(head.estimator.occs.cpu(), state["estimator.occs"])
    assert torch.equal(head.estimator.binaries.cpu(), state["estimator.binaries"])


@pytest.mark.cuda
def test_inference_cuda_bf16_close_to_cpu(dataset, trained_cuda):  # noqa: F811
    from avatar.data.dataset import Dataset
    from avatar.nerf.inference import load_nerf
    from avatar.nerf.datamanager import landmark_window

    ds = Dataset(dataset)
    f = int(ds.val_range.start)
    win = landmark_window(ds.n_frames, np.array([f]), get_preset("cpu-smoke").head.window)
    lm = torch.from_numpy(np.array(ds.lm3d, dtype=np.float32)[win])
    pose = torch.from_numpy(np.array(ds.pose, dtype=np.float32)[[f]])
    imgs = [
        load_nerf(trained_cuda, device=dev, n_samples=64).render(lm, pose).cpu().float() / 255
        for dev in ("cuda", "cpu")
    ]
    mse = float(((imgs[0] - imgs[1]) ** 2).mean())
    assert -10 * np.log10(max(mse, 1e-10)) > 28.0
