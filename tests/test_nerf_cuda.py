"""nerfacc occupancy-grid estimator path (``avatar.nerf.cuda_sampler``).

CPU tests: the estimator is stored with the head model, legacy models get it from the PyTorch grid,
and CPU rendering ignores it (bit-identical). ``@pytest.mark.cuda`` tests (skipped without a GPU):
a tiny head trained on CUDA with the estimator renders like the PyTorch sampler on the same field,
and its estimator survives save/load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_nerf_train import dataset  # noqa: F401  (module fixture: a real 3 s, 64 px dataset)

from avatar.config import to_dict
from avatar.nerf.cuda_sampler import OCC_THRE, estimator_from_grid, estimator_is_empty, render_step_size, use_nerfacc
from avatar.nerf.model import atomic_save, build_head, load_head
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


def test_estimator_saved_with_head_and_legacy_models_use_the_grid(tmp_path):
    cfg, head = _tiny_head()
    G = cfg.train.occ_resolution
    head.occ.density = torch.rand(G, G, G, generator=torch.Generator().manual_seed(1)) * 0.3
    state = head.state_dict()
    assert {"estimator.occs", "estimator.binaries", "estimator.aabbs", "estimator.resolution"} <= set(state)
    assert estimator_is_empty(head.estimator)

    # legacy file (no estimator keys): the estimator is derived from the PyTorch grid
    _write_part(tmp_path / "legacy", cfg, {k: v for k, v in state.items() if not k.startswith("estimator.")})
    legacy, _ = load_head(tmp_path / "legacy")
    step = render_step_size(head.field.aabb, cfg.train.n_samples)
    occs = head.occ.density.reshape(-1) * step
    expect = occs > min(float(occs.mean()), OCC_THRE)
    assert torch.equal(legacy.estimator.binaries.reshape(-1), expect)
    assert 0 < int(expect.sum()) < expect.numel()
    assert torch.allclose(legacy.estimator.aabbs[0], head.field.aabb)

    # round trip: a trained estimator state comes back exactly
    head.estimator.occs.copy_(torch.rand(G**3, generator=torch.Generator().manual_seed(2)) * 0.02)
    head.estimator.binaries.copy_((head.estimator.occs > 0.01).view_as(head.estimator.binaries))
    _write_part(tmp_path / "new", cfg, head.state_dict())
    back, _ = load_head(tmp_path / "new")
    assert torch.equal(back.estimator.occs, head.estimator.occs)
    assert torch.equal(back.estimator.binaries, head.estimator.binaries)


def test_never_updated_grid_marks_every_cell_occupied():
    _, head = _tiny_head()
    estimator_from_grid(head.estimator, head.occ.density, 0.1)  # density is +inf before any update
    assert bool(head.estimator.binaries.all())
    with pytest.raises(ValueError):
        estimator_from_grid(head.estimator, torch.zeros(3, 3, 3), 0.1)


def test_cpu_render_ignores_estimator_bit_identical():
    cfg, head = _tiny_head()
    gen = torch.Generator().manual_seed(3)
    o, d = _rays(32, gen)
    cond = torch.randn(32, cfg.head.cond_dim, generator=gen)
    code = torch.randn(32, cfg.head.ind_dim, generator=gen)
    with torch.no_grad():
        a = render_head_rays(head.field, head.occ, o, d, cond, code, 12)
        b = render_head_rays(head.field, head.occ, o, d, cond, code, 12, estimator=head.estimator, amp=True)
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
        acc = render_head_rays(head.field, head.occ, o, d, cond, code, 256, estimator=head.estimator)
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
    assert torch.isfinite(head.occ.density).all()  # PyTorch grid synced


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
