"""Training data of the NeRF trainer: decoded pixels, per-dataset scene tensors, ray batches.

The data-manager role of nerfstudio's split (field / model with its losses / data manager / trainer):
everything that turns a :class:`~avatar.data.dataset.Dataset` into what one optimiser step consumes,
and nothing that touches a network's weights. :class:`FramePixels` decodes frames and masks once;
:class:`Scene` holds the frame-independent tensors (normalisation statistics, the head box grown
until it holds the hair, conditioning windows); :class:`HeadBatch` / :class:`TorsoBatch` draw one
step's pixels (head rays inside the projected head box with a share in the mouth box; torso rays
over the whole frame, half of them on torso/neck pixels). The pixel boxes (:func:`mouth_box`,
:func:`face_box`) and :func:`landmark_window` are shared with evaluation (:mod:`avatar.nerf.evaluate`).
Every random draw goes through the ``rng`` handed in, in a fixed order, so a seed gives the same batches.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from avatar.data.dataset import MASK_HEAD, MASK_TORSO, MOUTH, Dataset
from avatar.errors import InvalidInput
from avatar.nerf.model import HeadNerf, TorsoNerf, head_aabb
from avatar.nerf.presets import NerfConfig
from avatar.nerf.rays import box_pixel_bounds, camera_rays, ray_aabb

log = logging.getLogger(__name__)


def landmark_window(n_frames: int, idx: np.ndarray, window: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Frame indices [len(idx), window] centred on each index, clamped to ``[lo, hi)``."""
    hi = n_frames if hi is None else hi
    off = np.arange(window) - window // 2
    return np.clip(idx[:, None] + off[None, :], lo, hi - 1)


def box_of(points: np.ndarray, pad: float, size: int) -> tuple[int, int, int, int]:
    """Integer pixel box (x0, y0, x1, y1), exclusive ends, around 2-D points grown by ``pad`` x its size."""
    lo, hi = points.min(0), points.max(0)
    ext = (hi - lo) * pad
    lo, hi = lo - ext, hi + ext
    x0, y0 = int(np.clip(np.floor(lo[0]), 0, size - 1)), int(np.clip(np.floor(lo[1]), 0, size - 1))
    x1, y1 = int(np.clip(np.ceil(hi[0]) + 1, x0 + 1, size)), int(np.clip(np.ceil(hi[1]) + 1, y0 + 1, size))
    return x0, y0, x1, y1


def mouth_box(lm2d: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """Pixel box of the 20 mouth landmarks grown by 20 %."""
    return box_of(lm2d[MOUTH], 0.2, size)


def face_box(lm2d: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """Pixel box of all 68 landmarks grown by 10 %."""
    return box_of(lm2d, 0.1, size)


#: decoded frames + masks above this many bytes stay encoded on a CPU device (decoded per batch)
DECODE_BUDGET_BYTES = int(os.environ.get("AVATAR_DECODE_BUDGET_GB", "6")) << 30


class FramePixels:
    """The dataset's frames and masks decoded once at training start, for pixel gathers.

    On CUDA the decoded frames live in GPU memory (uint8: N * S * S * 4 bytes, 7.9 GB for 5 minutes at
    512 px, fine on an 80-141 GB GPU); the masks are also kept on the host, where the torso sampler
    looks up torso pixels. On a CPU device the decoded arrays are kept while they fit in
    ``DECODE_BUDGET_BYTES`` (``$AVATAR_DECODE_BUDGET_GB``, default 6); above it frames are decoded per
    batch from the encoded dataset (4-8 JPEG decodes per step).

    Attributes:
        decoded: True when everything was decoded once.
        seconds: wall time of the initial decode.
    """

    def __init__(self, ds: Dataset, device: torch.device):
        self.ds, self.device = ds, device
        S, n = ds.size, ds.n_frames
        nbytes = n * S * S * 4
        self.decoded = device.type == "cuda" or nbytes <= DECODE_BUDGET_BYTES
        t0 = time.perf_counter()
        if self.decoded:
            self.masks_host = ds.masks.decode_all()  # uint8 [N, S, S]
            self.frames = torch.from_numpy(ds.frames.decode_all()).to(device)  # uint8 [N, S, S, 3]
            self.masks = torch.from_numpy(self.masks_host).to(device)  # uint8 [N, S, S]
        self.seconds = time.perf_counter() - t0
        if self.decoded:
            log.info(
                "decoded %d frames of %d px once (%.1f s, %.0f MB on %s)", n, S, self.seconds, nbytes / 1e6, device
            )

    def mask(self, f: int) -> np.ndarray:
        """uint8 [S, S] labels of frame ``f`` (host)."""
        return self.masks_host[f] if self.decoded else self.ds.masks[int(f)]

    def gather(self, f: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels (frame ``f``, row ``y``, column ``x``), int arrays [M] -> (uint8 [M, 3] RGB, uint8 [M]
        labels) on the device."""
        if self.decoded:
            fi, yi, xi = (torch.from_numpy(np.asarray(a, np.int64)).to(self.device) for a in (f, y, x))
            return self.frames[fi, yi, xi], self.masks[fi, yi, xi]
        rgb = np.empty((len(f), 3), np.uint8)
        lab = np.empty(len(f), np.uint8)
        for g in np.unique(f):
            sel = np.flatnonzero(f == g)
            rgb[sel] = self.ds.frames[int(g)][y[sel], x[sel]]
            lab[sel] = self.ds.masks[int(g)][y[sel], x[sel]]
        return torch.from_numpy(rgb).to(self.device), torch.from_numpy(lab).to(self.device)


def person_box(pixels: FramePixels, frames: np.ndarray, size: int, margin: float = 0.05) -> torch.Tensor:
    """Union of the person's mask (labels != background) over ``frames``, grown by ``margin`` x ``size``
    on each side: float32 [4] ``(x0, y0, x1, y1)`` in frame fractions (exclusive ends); the whole
    frame when no person pixel exists."""
    union = np.zeros((size, size), bool)
    for f in frames:
        union |= pixels.mask(int(f)) != 0
    rows, cols = np.flatnonzero(union.any(1)), np.flatnonzero(union.any(0))
    if not len(rows):
        return torch.tensor([0.0, 0.0, 1.0, 1.0])
    m = margin * size
    x0, x1 = max(0.0, cols[0] - m), min(float(size), cols[-1] + 1 + m)
    y0, y1 = max(0.0, rows[0] - m), min(float(size), rows[-1] + 1 + m)
    return torch.tensor([x0, y0, x1, y1], dtype=torch.float32) / size


def head_box_coverage(ds: Dataset, aabb: torch.Tensor, frames: np.ndarray, max_frames: int = 24) -> float:
    """Share of head-mask pixels whose camera ray meets the head NeRF's box ``aabb`` (float32 [6],
    canonical units), over up to ``max_frames`` of ``frames`` (evenly spaced). Below ~1 the box cuts
    the head (typically the top of the hair): those pixels cannot be rendered by the head NeRF and
    show a seam / a ghost crown where the torso and plate fill in (issue 18). Returns 1.0 when no
    head pixel exists."""
    pick = np.asarray(frames)[
        np.unique(np.linspace(0, len(frames) - 1, min(len(frames), max_frames)).round().astype(int))
    ]
    pose = torch.from_numpy(np.asarray(ds.pose, dtype=np.float32)[pick])
    hit, total = 0, 0
    for f, P in zip(pick, pose):
        ys, xs = np.nonzero(np.asarray(ds.masks[int(f)]) == MASK_HEAD)
        if not len(xs):
            continue
        o, d = camera_rays(
            torch.from_numpy(np.stack((xs, ys), -1)).float(), ds.intrinsics, torch.linalg.inv(P), ds.head_scale
        )
        hit += int(ray_aabb(o, d, aabb)[2].sum())
        total += len(xs)
    return hit / total if total else 1.0


class Scene:
    """Frame-independent tensors derived from a dataset (normalisation stats, head box) and the
    decoded frames (:class:`FramePixels`)."""

    def __init__(self, ds: Dataset, cfg: NerfConfig, device: torch.device):
        self.ds = ds
        self.cfg = cfg
        self.device = device
        self.size = ds.size
        self.K = ds.intrinsics
        self.hs = ds.head_scale
        self.train = np.arange(ds.train_range.start, ds.train_range.stop)
        if len(self.train) < 2:
            raise InvalidInput(f"{ds.root}: only {len(self.train)} training frames; NeRF training needs a longer clip")
        self.val = np.arange(ds.val_range.start, ds.val_range.stop)
        # the box grows upwards (0.2 units at a time, up to 3) until the rays of >= 99.5 % of the head-mask
        # pixels meet it: big hair is not cut by a straight line (the "second crown" seam of issue 18)
        self.box_top = cfg.head.box_top
        while True:
            self.aabb = head_aabb(np.asarray(ds.lm3d_mean), cfg.head.box_margin, self.box_top)
            self.box_coverage = head_box_coverage(ds, self.aabb, self.train)
            if self.box_coverage >= 0.995 or self.box_top >= 3.0:
                break
            self.box_top = round(self.box_top + 0.2, 3)
        if self.box_top != cfg.head.box_top:
            log.info("head box raised to %.1f units above the landmarks to hold the hair", self.box_top)
        if self.box_coverage < 0.99:
            log.warning(
                "the head box meets only %.1f %% of the head-mask pixels; the rest will show the torso / "
                "plate through a seam",
                100 * self.box_coverage,
            )
        self.lm3d = torch.from_numpy(np.array(ds.lm3d, dtype=np.float32))
        self.blink = torch.from_numpy(np.array(ds.blink, dtype=np.float32))
        self.pose = torch.from_numpy(np.array(ds.pose, dtype=np.float32))
        self.lm2d = np.array(ds.lm2d, dtype=np.float32)
        self.bg = torch.from_numpy(np.array(ds.background)).float().div(255)
        self.pixels = FramePixels(ds, device)

    def init_head_stats(self, head: HeadNerf) -> None:
        tr = self.lm3d[self.train]
        cn = head.field.cond_net
        cn.lm3d_mean.copy_(torch.from_numpy(np.array(self.ds.lm3d_mean)))
        cn.lm3d_std.copy_(tr.std(0).clamp(min=1e-3))
        b = self.blink[self.train]
        cn.blink_mean.fill_(float(b.mean()))
        cn.blink_std.fill_(float(b.std().clamp(min=1e-3)))

    def init_torso_stats(self, torso: TorsoNerf) -> None:
        t = self.pose[self.train, :3, 3]
        torso.field.t_mean.copy_(t.mean(0))
        torso.field.t_scale.fill_(float(t.std(0).max().clamp(min=1e-4)))
        torso.background.copy_(torch.from_numpy(np.array(self.ds.background)))
        torso.person_box.copy_(person_box(self.pixels, self.train, self.size))

    def cond_inputs(self, frames: np.ndarray, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        win = landmark_window(self.ds.n_frames, frames, self.cfg.head.window, lo, hi)
        return self.lm3d[win].to(self.device), self.blink[win].to(self.device)


def sample_pixels(rng: np.random.Generator, n: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """``n`` uniform pixel positions int [n, 2] ``(x, y)`` inside ``box`` (exclusive ends)."""
    x0, y0, x1, y1 = box
    return np.stack((rng.integers(x0, x1, n), rng.integers(y0, y1, n)), -1)


class HeadBatch:
    """One head training batch: rays, targets, per-ray frame indices and loss weights."""

    def __init__(self, scene: Scene, rng: np.random.Generator):
        cfg = scene.cfg.train
        S = scene.size
        frames = rng.choice(scene.train, size=cfg.frames_per_step, replace=len(scene.train) < cfg.frames_per_step)
        n_mouth = int(round(cfg.rays_per_frame * cfg.mouth_ray_fraction))
        pix, fid, w, outside_face = [], [], [], []
        origins, dirs = [], []
        for f in frames:
            pose = scene.pose[f]
            hb = box_pixel_bounds(scene.aabb, pose, scene.K, scene.hs, S)
            if hb[2] <= hb[0] or hb[3] <= hb[1]:
                hb = (0, 0, S, S)
            mb = mouth_box(scene.lm2d[f], S)
            fb = face_box(scene.lm2d[f], S)
            p = np.concatenate((sample_pixels(rng, n_mouth, mb), sample_pixels(rng, cfg.rays_per_frame - n_mouth, hb)))
            in_mouth = (p[:, 0] >= mb[0]) & (p[:, 0] < mb[2]) & (p[:, 1] >= mb[1]) & (p[:, 1] < mb[3])
            in_face = (p[:, 0] >= fb[0]) & (p[:, 0] < fb[2]) & (p[:, 1] >= fb[1]) & (p[:, 1] < fb[3])
            c2w = torch.linalg.inv(pose)
            o, d = camera_rays(torch.from_numpy(p).float(), scene.K, c2w, scene.hs)
            origins.append(o)
            dirs.append(d)
            pix.append(torch.from_numpy(p))
            fid.append(torch.full((len(p),), int(f)))
            w.append(torch.from_numpy(1.0 + cfg.mouth_weight * in_mouth).float())
            outside_face.append(torch.from_numpy(~in_face).float())
        dev = scene.device
        self.frames = frames
        self.origins, self.dirs = torch.cat(origins).to(dev), torch.cat(dirs).to(dev)
        self.weight = torch.cat(w).to(dev)
        self.outside_face = torch.cat(outside_face).to(dev)
        self.pix = torch.cat(pix)
        self.frame_of_ray = torch.cat(fid)
        self.ray_group = torch.repeat_interleave(torch.arange(len(frames)), cfg.rays_per_frame).to(dev)
        self.bg = scene.bg[self.pix[:, 1], self.pix[:, 0]].to(dev)
        # targets: one gather from the decoded frames (on the device); head pixels over the plate
        img, msk = scene.pixels.gather(self.frame_of_ray.numpy(), self.pix[:, 1].numpy(), self.pix[:, 0].numpy())
        self.target = torch.where((msk == MASK_HEAD)[:, None], img.float() / 255, self.bg)


class TorsoBatch:
    """One torso training batch: ``frames_per_step`` frames, ``rays_per_frame`` pixels from each (half of
    them on torso/neck pixels when the frame has any, the rest uniform over the frame) and their targets.

    Attributes:
        frames: int [F] the drawn frames; pix: int [N, 2] ``(x, y)``; fid: int [N] frame of each pixel;
        target: float [N, 3] RGB in [0, 1] (device); mask: uint8 [N] labels (device).
    """

    def __init__(self, scene: Scene, rng: np.random.Generator):
        cfg = scene.cfg.train
        S = scene.size
        frames = rng.choice(scene.train, size=cfg.frames_per_step, replace=len(scene.train) < cfg.frames_per_step)
        pix, fid = [], []
        for f in frames:
            msk = scene.pixels.mask(int(f))
            ys, xs = np.nonzero(msk == MASK_TORSO)
            n_t = cfg.rays_per_frame // 2 if len(xs) else 0
            sel = rng.integers(0, max(len(xs), 1), n_t)
            p = np.concatenate(
                (
                    np.stack((xs[sel], ys[sel]), -1).reshape(-1, 2),
                    sample_pixels(rng, cfg.rays_per_frame - n_t, (0, 0, S, S)),
                )
            )
            pix.append(p)
            fid.append(np.full(len(p), f))
        self.frames = frames
        self.pix, self.fid = np.concatenate(pix), np.concatenate(fid)
        img, self.mask = scene.pixels.gather(self.fid, self.pix[:, 1], self.pix[:, 0])
        self.target = img.float().div(255)


def train_pos(scene: Scene, fid: torch.Tensor) -> torch.Tensor:
    """Frame index -> position in the training range (individual-code row)."""
    return fid - int(scene.train[0])
