"""Batched renderer (issue 12): all rays of B frames in one pass, head boxes on the device, torso only
inside the person box; the pixels equal a frame-by-frame reference (the renderer before batching)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.data.dataset import Dataset, Intrinsics
from avatar.nerf.inference import AvatarNerf
from avatar.nerf.model import build_head, build_torso, head_aabb
from avatar.nerf.presets import get_preset
from avatar.nerf.rays import box_pixel_bounds, box_pixel_bounds_batch, camera_rays
from avatar.nerf.render import composite, render_head_rays
from avatar.nerf.datamanager import FramePixels, landmark_window, person_box
from synthetic_dataset import make_dataset


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A synthetic dataset and randomly initialised head + torso NeRFs (no training needed: the
    renderer's arithmetic, not the picture, is under test)."""
    torch.manual_seed(0)
    ds = Dataset(make_dataset(tmp_path_factory.mktemp("batch") / "ds", n_frames=12, size=40))
    cfg = get_preset("cpu-smoke")
    head = build_head(cfg, len(ds.train_range), head_aabb(np.asarray(ds.lm3d_mean), cfg.head.box_margin))
    torso = build_torso(cfg, len(ds.train_range), ds.size)
    torso.background.copy_(torch.from_numpy(np.array(ds.background)))
    for m in (head, torso):
        for p in m.parameters():
            p.data.normal_(0, 0.5) if p.dim() > 1 else p.data.uniform_(-0.5, 0.5)
    idx = np.array([0, 3, 7])
    win = landmark_window(ds.n_frames, idx, cfg.head.window)
    inputs = (
        torch.from_numpy(np.asarray(ds.lm3d)[win]),
        torch.from_numpy(np.asarray(ds.pose)[idx]),
        torch.from_numpy(np.asarray(ds.blink)[idx]),
    )
    return ds, cfg, head, torso, inputs


def _nerf(ds, cfg, head, torso, chunk=8192):
    nerf = AvatarNerf(
        head,
        torso,
        ds.size,
        ds.intrinsics,
        ds.head_scale,
        cfg.head.window,
        device="cpu",
        n_samples=cfg.train.n_samples,
        chunk=chunk,
    )
    nerf.set_background(np.asarray(ds.background))
    return nerf


@torch.no_grad()
def _reference(nerf: AvatarNerf, lm, pose, blink) -> torch.Tensor:
    """The renderer as it was before batching: one frame at a time, head box via the host, torso on
    every pixel of the frame."""
    size, K, field = nerf.size, nerf.intrinsics, nerf.head.field
    B, W = lm.shape[:2]
    cond = field.cond_net(lm, blink.reshape(B, 1).expand(B, W) if field.cfg.use_blink else None)
    bg = nerf._background_at(size, None).reshape(-1, 3)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    all_pix = torch.stack((xs, ys), -1).reshape(-1, 2)
    out = []
    for b in range(B):
        head_rgb, head_acc = torch.zeros(size * size, 3), torch.zeros(size * size)
        x0, y0, x1, y1 = box_pixel_bounds(field.aabb, pose[b], K, nerf.head_scale, size)
        sub = (all_pix[:, 0] >= x0) & (all_pix[:, 0] < x1) & (all_pix[:, 1] >= y0) & (all_pix[:, 1] < y1)
        idx = sub.nonzero().squeeze(1)
        if len(idx):
            o, d = camera_rays(all_pix[idx].float(), K, torch.linalg.inv(pose[b]), nerf.head_scale)
            r = render_head_rays(
                field,
                nerf.head.estimator,
                o,
                d,
                cond[b].expand(len(idx), -1),
                field.individual_code(None, len(idx)),
                nerf.n_samples,
            )
            head_rgb[idx], head_acc[idx] = r["rgb"], r["acc"]
        rgb = composite(bg, head_rgb, head_acc)
        if nerf.torso is not None:
            tf = nerf.torso.field
            n = size * size
            alpha, trgb = tf(
                (all_pix.float() + 0.5) / size,
                pose[b].expand(n, 4, 4),
                tf.individual_code(None, n),
                torch.cat((head_rgb, head_acc[:, None]), -1),
            )
            rgb = composite(bg, head_rgb, head_acc, trgb, alpha)
        out.append((rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).reshape(size, size, 3))
    return torch.stack(out)


def test_box_bounds_batch_matches_per_pose():
    g = torch.Generator().manual_seed(0)
    K = Intrinsics(150.0, 150.0, 32.0, 32.0)
    aabb = torch.tensor([-1.5, -1.8, -1.2, 1.4, 1.6, 1.0])
    poses = torch.eye(4).repeat(16, 1, 1)
    ang = torch.rand(16, generator=g) * 0.6 - 0.3
    poses[:, 0, 0], poses[:, 0, 2], poses[:, 2, 0], poses[:, 2, 2] = ang.cos(), ang.sin(), -ang.sin(), ang.cos()
    poses[:, :3, 3] = torch.rand(16, 3, generator=g) * torch.tensor([0.2, 0.2, 0.4]) + torch.tensor([-0.1, -0.1, 0.35])
    batch = box_pixel_bounds_batch(aabb, poses, K, 0.09, 64)
    assert batch.dtype == torch.int64 and batch.shape == (16, 4)
    for b in range(16):
        assert tuple(batch[b].tolist()) == box_pixel_bounds(aabb, poses[b], K, 0.09, 64)


def test_batched_render_equals_frame_by_frame_reference(scene):
    ds, cfg, head, torso, (lm, pose, blink) = scene
    nerf = _nerf(ds, cfg, head, torso, chunk=500)  # chunks straddle frame boundaries
    ref = _reference(nerf, lm, pose, blink)  # torso over the whole frame (person_box = whole frame)
    out = nerf.render(lm, pose, blink)
    assert out.shape == (3, ds.size, ds.size, 3) and out.dtype == torch.uint8
    assert (out.int() - ref.int()).abs().max() <= 1  # float summation order of a chunk's GEMMs
    assert (out != ref).float().mean() < 1e-3
    # frame b of a batch == the same frame rendered alone
    for b in range(3):
        assert torch.equal(nerf.render(lm[b : b + 1], pose[b : b + 1], blink[b : b + 1])[0], out[b])
    assert ref.float().std() > 5  # the random fields draw something (the comparison is not vacuous)


def test_torso_only_inside_person_box(scene):
    ds, cfg, head, torso, (lm, pose, blink) = scene
    binaries = head.estimator.binaries.clone()
    head.estimator.binaries.zero_()  # an empty head (no sample is occupied): the torso shows everywhere
    try:
        full = _nerf(ds, cfg, head, torso).render(lm, pose, blink)
        no_torso = _nerf(ds, cfg, head, None).render(lm, pose, blink)
        torso.person_box.copy_(torch.tensor([0.25, 0.5, 0.75, 1.0]))
        boxed = _nerf(ds, cfg, head, torso).render(lm, pose, blink)
    finally:
        torso.person_box.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))
        head.estimator.binaries.copy_(binaries)
    S = ds.size
    inside = torch.zeros(S, S, dtype=torch.bool)
    inside[S // 2 :, S // 4 : 3 * S // 4] = True
    assert torch.equal(boxed[:, inside], full[:, inside])
    assert torch.equal(boxed[:, ~inside], no_torso[:, ~inside])
    assert not torch.equal(full[:, ~inside], no_torso[:, ~inside])  # the torso did draw out there


def test_person_box_from_masks(scene):
    ds = scene[0]
    px = FramePixels(ds, torch.device("cpu"))
    box = person_box(px, np.arange(ds.n_frames), ds.size, margin=0.0)
    union = (np.asarray(ds.masks) != 0).any(0)
    rows, cols = np.flatnonzero(union.any(1)), np.flatnonzero(union.any(0))
    expect = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32) / ds.size
    torch.testing.assert_close(box, expect)
    assert 0 < float(box[0]) and float(box[3]) == 1.0  # the synthetic torso reaches the bottom edge


def test_torso_saved_before_person_box_loads_with_whole_frame(scene, tmp_path):
    from avatar.nerf.model import atomic_save, load_torso, part_info, write_json_atomic

    ds, cfg, _, torso, _ = scene
    state = {k: v for k, v in torso.state_dict().items() if k != "person_box"}
    atomic_save(state, tmp_path / "model.safetensors")
    write_json_atomic(part_info(cfg, ds), tmp_path / "config.json")
    old, _ = load_torso(tmp_path)
    assert old.person_box.tolist() == [0.0, 0.0, 1.0, 1.0]
    torch.testing.assert_close(old.field.grid.table, torso.field.grid.table)


@pytest.mark.slow
def test_compiled_fields_render_the_same(scene):
    """``AvatarNerf.compile()`` (torch.compile of the field MLPs) renders the same frames (Inductor may
    reorder float operations: within 1/255)."""
    ds, cfg, head, torso, (lm, pose, blink) = scene
    from avatar.nerf.model import build_head, build_torso

    head2 = build_head(cfg, len(ds.train_range), head.field.aabb)
    head2.load_state_dict(head.state_dict())
    torso2 = build_torso(cfg, len(ds.train_range), ds.size)
    torso2.load_state_dict(torso.state_dict())
    ref = _nerf(ds, cfg, head, torso).render(lm, pose, blink)
    nerf = _nerf(ds, cfg, head2, torso2)
    nerf.compile()
    out = nerf.render(lm, pose, blink)
    assert (out.int() - ref.int()).abs().max() <= 1
