"""``avatar train-nerf``: head NeRF, then torso NeRF on the frozen head (GeneFace / RAD-NeRF recipe).

Per step, ``frames_per_step`` training frames are drawn and ``rays_per_frame`` pixels from each:
head rays inside the projection of the head box with a share inside the mouth box (from lm2d);
torso rays over the whole frame with half of them on torso/neck pixels. Losses (GeneFace's RAD-NeRF trainer):
per-pixel MSE with extra weight in the mouth box, opacity entropy (``weights_entropy``), and the
ambient regulariser (|ambient coordinate| outside the face box). Adam with separate learning rates
for hash tables and MLPs. Checkpoints (model + optimiser + step + RNG states, safetensors) are
written atomically every ``ckpt_every`` steps; rerunning the same command resumes from the last
one and reaches the same final step. Training is deterministic for a given seed on one device (bit for
bit on CPU with one thread, ``AVATAR_THREADS=1``: multi-threaded float reductions vary in order).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from avatar.data.dataset import MASK_HEAD, MASK_TORSO, MOUTH, Dataset
from avatar.errors import InvalidInput
from avatar.nerf.cuda_sampler import grid_from_estimator, render_step_size, update_estimator, use_nerfacc
from avatar.nerf.model import (HeadNerf, TorsoNerf, atomic_save, build_head, build_torso, grid_parameters,
                               head_aabb, load_head, part_info, write_json_atomic)
from avatar.nerf.presets import NerfConfig, get_preset
from avatar.nerf.rays import box_pixel_bounds, camera_rays, ray_aabb
from avatar.nerf.render import composite, render_head_rays
from avatar.runtime import configure_threads, resolve_device

log = logging.getLogger(__name__)

PARTS = ("head", "torso")


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
            self.masks_host = ds.masks.decode_all()                      # uint8 [N, S, S]
            self.frames = torch.from_numpy(ds.frames.decode_all()).to(device)  # uint8 [N, S, S, 3]
            self.masks = torch.from_numpy(self.masks_host).to(device)   # uint8 [N, S, S]
        self.seconds = time.perf_counter() - t0
        if self.decoded:
            log.info("decoded %d frames of %d px once (%.1f s, %.0f MB on %s)", n, S, self.seconds, nbytes / 1e6, device)

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
    pick = np.asarray(frames)[np.unique(np.linspace(0, len(frames) - 1, min(len(frames), max_frames)).round().astype(int))]
    pose = torch.from_numpy(np.asarray(ds.pose, dtype=np.float32)[pick])
    hit, total = 0, 0
    for f, P in zip(pick, pose):
        ys, xs = np.nonzero(np.asarray(ds.masks[int(f)]) == MASK_HEAD)
        if not len(xs):
            continue
        o, d = camera_rays(torch.from_numpy(np.stack((xs, ys), -1)).float(), ds.intrinsics, torch.linalg.inv(P), ds.head_scale)
        hit += int(ray_aabb(o, d, aabb)[2].sum())
        total += len(xs)
    return hit / total if total else 1.0


class _Scene:
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
            log.warning("the head box meets only %.1f %% of the head-mask pixels; the rest will show the torso / "
                        "plate through a seam", 100 * self.box_coverage)
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


def _entropy(acc: torch.Tensor) -> torch.Tensor:
    a = acc.clamp(1e-5, 1 - 1e-5)
    return (-a * torch.log2(a) - (1 - a) * torch.log2(1 - a)).mean()


def _sample_pixels(rng: np.random.Generator, n: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.stack((rng.integers(x0, x1, n), rng.integers(y0, y1, n)), -1)


class _Checkpoint:
    """Model + optimiser + step + RNG state in one safetensors file (atomic writes)."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator,
             torch_gen: torch.Generator, extra: dict | None = None) -> None:
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.generator"] = torch_gen.get_state()
        meta = {"step": str(step), "param_groups": json.dumps(sd["param_groups"]),
                "numpy_rng": json.dumps(rng.bit_generator.state), "extra": json.dumps(extra or {})}
        atomic_save(tensors, self.path, meta)

    def load(self, model: torch.nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator,
             torch_gen: torch.Generator) -> tuple[int, dict]:
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        torch.set_rng_state(tensors["rng.torch"])
        torch_gen.set_state(tensors["rng.generator"])
        rng.bit_generator.state = json.loads(meta["numpy_rng"])
        return int(meta["step"]), json.loads(meta.get("extra", "{}"))


def _make_optimizer(model: torch.nn.Module, cfg: NerfConfig) -> torch.optim.Optimizer:
    grids, nets = grid_parameters(model)
    return torch.optim.Adam([{"params": grids, "lr": cfg.train.lr_grid}, {"params": nets, "lr": cfg.train.lr_net}],
                            betas=(0.9, 0.99), eps=1e-15)


def _lr_factor(step: int, total: int) -> float:
    """Exponential decay to 0.1x over the run (RAD-NeRF's schedule shape)."""
    return 0.1 ** (step / max(total, 1))


class _HeadBatch:
    """One head training batch: rays, targets, per-ray frame indices and loss weights."""

    def __init__(self, scene: _Scene, rng: np.random.Generator):
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
            p = np.concatenate((_sample_pixels(rng, n_mouth, mb), _sample_pixels(rng, cfg.rays_per_frame - n_mouth, hb)))
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


def _head_forward(head: HeadNerf, scene: _Scene, batch: _HeadBatch, train: bool, gen: torch.Generator):
    lm, bl = scene.cond_inputs(batch.frames, scene.train[0], scene.train[-1] + 1)
    cond = head.field.cond_net(lm, bl if head.field.cfg.use_blink else None)[batch.ray_group]
    code = head.field.individual_code(_train_pos(scene, batch.frame_of_ray).to(scene.device), len(batch.frame_of_ray))
    return render_head_rays(head.field, head.occ, batch.origins, batch.dirs, cond, code,
                            scene.cfg.train.n_samples, jitter=train, generator=gen,
                            estimator=head.estimator)  # CUDA: nerfacc estimator


def _autocast(device: torch.device, cfg: NerfConfig):
    enabled = device.type == "cuda" and cfg.train.amp
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _update_occupancy(head: HeadNerf, scene: _Scene, rng: np.random.Generator, gen: torch.Generator) -> None:
    """Occupancy from the density under the condition of a random training frame."""
    f = rng.choice(scene.train, size=1)
    lm, bl = scene.cond_inputs(f, scene.train[0], scene.train[-1] + 1)
    with torch.no_grad():
        cond = head.field.cond_net(lm, bl if head.field.cfg.use_blink else None)
        aabb = head.field.aabb

        def density(u):
            x = aabb[:3] + u * (aabb[3:] - aabb[:3])
            return head.field.density(x, cond.expand(len(u), -1))[0].float()

        head.occ.update(density, generator=gen)


def _update_estimator(head: HeadNerf, scene: _Scene, rng: np.random.Generator, step: int) -> None:
    """CUDA path: nerfacc ``update_every_n_steps`` under the condition of a random training frame."""
    t = scene.cfg.train

    def cond_fn() -> torch.Tensor:
        f = rng.choice(scene.train, size=1)
        lm, bl = scene.cond_inputs(f, scene.train[0], scene.train[-1] + 1)
        with torch.no_grad():
            return head.field.cond_net(lm, bl if head.field.cfg.use_blink else None)

    update_estimator(head.estimator, head.field, cond_fn, step, t.n_samples, t.occ_every, t.occ_warmup)


def _set_lr(opt: torch.optim.Optimizer, cfg: NerfConfig, step: int, total: int) -> None:
    f = _lr_factor(step, total)
    opt.param_groups[0]["lr"] = cfg.train.lr_grid * f
    opt.param_groups[1]["lr"] = cfg.train.lr_net * f


def psnr_from_mse(mse: float, peak: float = 1.0) -> float:
    """PSNR in dB of a mean squared error on a ``[0, peak]`` scale (inf for a zero error). The one
    PSNR of the project (training logs, ``avatar/nerf/evaluate.py``)."""
    return float("inf") if mse <= 0 else float(10 * math.log10(peak ** 2 / mse))


def _psnr(mse: float) -> float:
    """Training-log PSNR of a [0, 1] loss, capped at 100 dB."""
    return psnr_from_mse(max(mse, 1e-10))


# noqa below: the training loop in one place (resume, budget, cancel, occupancy updates, the step, divergence,
# logging, checkpoints); its steps are already functions, and splitting the bookkeeping would scatter the loop state
def _train_part(part: str, scene: _Scene, out: Path, steps: int, seed: int, progress: bool, callback, cancel,  # noqa: C901
                head_frozen: HeadNerf | None = None, max_seconds: float | None = None) -> dict:
    cfg, dev = scene.cfg, scene.device
    pdir = out / part
    pdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n_train = len(scene.train)
    if part == "head":
        model: torch.nn.Module = build_head(cfg, n_train, scene.aabb)
        scene.init_head_stats(model)
    else:
        model = build_torso(cfg, n_train, scene.size)
        scene.init_torso_stats(model)
    model.to(dev)
    nerfacc_on = part == "head" and use_nerfacc(dev)  # CUDA + nerfacc extension: estimator sampling
    if cfg.train.compile:
        # opt-in: the field's forward is compiled (state-dict keys unchanged); compile time is
        # reported by `python -m bench.bench_nerf --compile` and dominates short CPU runs
        model.field.forward = torch.compile(model.field.forward, dynamic=True)
    opt = _make_optimizer(model, cfg)
    ckpt = _Checkpoint(pdir / "checkpoint.safetensors")
    step, extra = 0, {}
    if ckpt.path.is_file():
        step, extra = ckpt.load(model, opt, rng, gen)
        log.info("%s: resumed from %s at step %d", part, ckpt.path, step)
    write_json_atomic(part_info(cfg, scene.ds), pdir / "config.json")
    writer = None
    try:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(pdir / "runs"))
    except Exception as e:  # tensorboard missing/broken: training still works
        log.warning("TensorBoard disabled: %s", e)
    t_start = time.perf_counter()
    losses: list[float] = extra.get("losses", [])
    bar = tqdm(total=steps, initial=step, desc=f"train {part}", disable=not progress, unit="step")
    model.train()
    while step < steps:
        if max_seconds is not None and time.perf_counter() - t_start >= max_seconds:
            log.info("%s: wall-time budget of %.0f s reached at step %d of %d", part, max_seconds, step, steps)
            break
        if cancel is not None and cancel.is_set():
            ckpt.save(step, model, opt, rng, gen, {"losses": losses})
            from avatar.errors import Cancelled
            raise Cancelled(f"NeRF {part} training cancelled at step {step}; rerun to resume")
        _set_lr(opt, cfg, step, steps)
        if nerfacc_on:
            _update_estimator(model, scene, rng, step)
        elif part == "head" and step >= cfg.train.occ_warmup and step % cfg.train.occ_every == 0:
            _update_occupancy(model, scene, rng, gen)
        with _autocast(dev, cfg):
            if part == "head":
                loss, stats = _head_step(model, scene, rng, gen, step, steps)
            else:
                loss, stats = _torso_step(model, head_frozen, scene, rng, gen)
        if not torch.isfinite(loss):
            from avatar.errors import TrainingDiverged
            raise TrainingDiverged(f"NeRF {part} loss became {loss.item()} at step {step}; the last checkpoint "
                                   f"({ckpt.path}) is kept; retry with another --seed or a lower learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(stats["mse"]))
        losses = losses[-200:]
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == steps:
            bar.set_postfix(psnr=f"{_psnr(np.mean(losses[-cfg.train.log_every:])):.2f}")
            if writer:
                for k, v in stats.items():
                    writer.add_scalar(f"{part}/{k}", float(v), step)
        if callback is not None:
            callback(step / steps, f"{part} step {step}/{steps}")
        if writer and cfg.train.preview_every and step % cfg.train.preview_every == 0 and len(scene.val):
            _preview(writer, part, model, head_frozen, scene, step)
        if step % cfg.train.ckpt_every == 0 and step < steps:
            ckpt.save(step, model, opt, rng, gen, {"losses": losses})
    bar.close()
    model.eval()
    if nerfacc_on:  # the PyTorch grid (CPU rendering of this model) follows the estimator
        model.occ.density = grid_from_estimator(model.estimator, render_step_size(model.field.aabb, cfg.train.n_samples))
    metrics = {"part": part, "steps": step, "steps_planned": steps, "seed": seed,
               "train_psnr_last": _psnr(float(np.mean(losses[-20:]))) if losses else None,
               "seconds_this_run": round(time.perf_counter() - t_start, 1), "preset": cfg.preset}
    if part == "head":
        metrics["head_box_coverage"] = round(scene.box_coverage, 4)
        metrics["head_box_top"] = scene.box_top
    if len(scene.val):
        metrics["val_psnr_preview"] = _val_psnr(part, model, head_frozen, scene)
    atomic_save(model.state_dict(), pdir / "model.safetensors")
    write_json_atomic(metrics, pdir / "metrics.json")
    if writer:
        writer.close()
    ckpt.path.unlink(missing_ok=True)
    log.info("%s: done, %s", part, metrics)
    return metrics


def _head_step(head: HeadNerf, scene: _Scene, rng, gen, step: int, steps: int):
    cfg = scene.cfg.train
    batch = _HeadBatch(scene, rng)
    r = _head_forward(head, scene, batch, True, gen)
    pred = composite(batch.bg, r["rgb"], r["acc"])
    err = ((pred.float() - batch.target) ** 2).mean(-1)
    mse = (err * batch.weight).sum() / batch.weight.sum()
    ent = _entropy(r["acc"].float())
    ramp = min(1.0, step / max(1, steps // 4))  # ambient regulariser ramped in (GeneFace)
    amb = (r["ambient"].float() * batch.outside_face).mean()
    loss = mse + cfg.lambda_entropy * ent + cfg.lambda_ambient * ramp * amb
    return loss, {"loss": loss.item(), "mse": err.mean().item(), "entropy": ent.item(), "ambient": amb.item()}


def _torso_step(torso: TorsoNerf, head: HeadNerf, scene: _Scene, rng, gen):
    cfg = scene.cfg.train
    S = scene.size
    frames = rng.choice(scene.train, size=cfg.frames_per_step, replace=len(scene.train) < cfg.frames_per_step)
    pix, fid = [], []
    for f in frames:
        msk = scene.pixels.mask(int(f))
        ys, xs = np.nonzero(msk == MASK_TORSO)
        n_t = cfg.rays_per_frame // 2 if len(xs) else 0
        sel = rng.integers(0, max(len(xs), 1), n_t)
        p = np.concatenate((np.stack((xs[sel], ys[sel]), -1).reshape(-1, 2),
                            _sample_pixels(rng, cfg.rays_per_frame - n_t, (0, 0, S, S))))
        pix.append(p)
        fid.append(np.full(len(p), f))
    pix_np, fid_np = np.concatenate(pix), np.concatenate(fid)
    img, mask = scene.pixels.gather(fid_np, pix_np[:, 1], pix_np[:, 0])
    target = img.float().div(255)
    r = _torso_rays(torso, head, scene, torch.from_numpy(pix_np), torch.from_numpy(fid_np), frames, train=True)
    err = ((r["rgb"].float() - target) ** 2).mean(-1)
    mse = err.mean()
    bg_alpha = (r["torso_alpha"].float() * (mask == 0)).mean()
    loss = mse + 0.01 * bg_alpha
    return loss, {"loss": loss.item(), "mse": mse.item(), "bg_alpha": bg_alpha.item()}


def _torso_rays(torso: TorsoNerf, head: HeadNerf, scene: _Scene, pix: torch.Tensor, fid: torch.Tensor,
                frames: np.ndarray, train: bool) -> dict[str, torch.Tensor]:
    """Composite (bg -> torso -> frozen head) at pixels ``pix`` [N, 2] of frames ``fid`` [N]."""
    dev, S = scene.device, scene.size
    head_rgb = torch.zeros(len(pix), 3, device=dev)
    head_acc = torch.zeros(len(pix), device=dev)
    with torch.no_grad():
        lm, bl = scene.cond_inputs(np.asarray(frames), 0, scene.ds.n_frames)
        conds = head.field.cond_net(lm, bl if head.field.cfg.use_blink else None)
        for j, f in enumerate(frames):
            sel = (fid == int(f)).nonzero().squeeze(1)
            if not len(sel):
                continue
            c2w = torch.linalg.inv(scene.pose[f])
            o, d = camera_rays(pix[sel].float(), scene.K, c2w, scene.hs)
            code = head.field.individual_code(None, len(sel))
            hr = render_head_rays(head.field, head.occ, o.to(dev), d.to(dev), conds[j].expand(len(sel), -1), code,
                                  scene.cfg.train.n_samples, estimator=head.estimator)  # CUDA: nerfacc
            head_rgb[sel.to(dev)] = hr["rgb"].float()
            head_acc[sel.to(dev)] = hr["acc"].float()
    uv = (pix.float() + 0.5).to(dev) / S
    tcode = torso.field.individual_code(None if not train else _train_pos(scene, fid).to(dev), len(pix))
    alpha, trgb = torso.field(uv, scene.pose[fid].to(dev), tcode, torch.cat((head_rgb, head_acc[:, None]), -1))
    bg = torso.background[pix[:, 1], pix[:, 0]].float().div(255).to(dev)
    return {"rgb": composite(bg, head_rgb, head_acc, trgb, alpha), "torso_alpha": alpha}


def _train_pos(scene: _Scene, fid: torch.Tensor) -> torch.Tensor:
    """Frame index -> position in the training range (individual-code row)."""
    return fid - int(scene.train[0])


@torch.no_grad()
def _render_val_frame(part: str, model, head_frozen, scene: _Scene, f: int) -> np.ndarray:
    from avatar.nerf.inference import AvatarNerf

    head = model if part == "head" else head_frozen
    torso = model if part == "torso" else None
    nerf = AvatarNerf(head, torso, scene.size, scene.K, scene.hs, scene.cfg.head.window, device=scene.device)
    nerf.set_background(np.asarray(scene.ds.background))
    win = landmark_window(scene.ds.n_frames, np.array([f]), scene.cfg.head.window)
    img = nerf.render(scene.lm3d[win], scene.pose[f][None], blink=scene.blink[win[:, scene.cfg.head.window // 2]])
    return img[0].cpu().numpy()


def _val_target(part: str, scene: _Scene, f: int) -> np.ndarray:
    img = np.asarray(scene.ds.frames[f])
    if part == "head":
        m = np.asarray(scene.ds.masks[f]) == MASK_HEAD
        return np.where(m[..., None], img, np.asarray(scene.ds.background))
    return img


def _val_psnr(part: str, model, head_frozen, scene: _Scene, n: int = 2) -> float:
    frames = scene.val[np.linspace(0, len(scene.val) - 1, n).astype(int)]
    mses = []
    for f in frames:
        pred = _render_val_frame(part, model, head_frozen, scene, int(f)).astype(np.float32) / 255
        mses.append(float(((pred - _val_target(part, scene, int(f)).astype(np.float32) / 255) ** 2).mean()))
    return round(_psnr(float(np.mean(mses))), 3)


def _preview(writer, part: str, model, head_frozen, scene: _Scene, step: int) -> None:
    f = int(scene.val[len(scene.val) // 2])
    was = model.training
    model.eval()
    pred = _render_val_frame(part, model, head_frozen, scene, f)
    model.train(was)
    both = np.concatenate((_val_target(part, scene, f), pred), 1)
    writer.add_image(f"{part}/val_gt_vs_render", both, step, dataformats="HWC")


def train_nerf(dataset: str | Path, out: str | Path, part: str = "all", preset: str = "cpu-small",
               steps: int | None = None, seed: int = 0, overwrite: bool = False, progress: bool = True,
               callback=None, cancel=None, device: str | None = None, max_seconds: float | None = None) -> Path:
    """Train the head NeRF and/or the torso NeRF (on the frozen head) of one dataset.

    Args:
        dataset: dataset directory (``avatar preprocess`` output).
        out: output directory; gets ``head/`` and ``torso/`` (model.safetensors, config.json, metrics.json).
        part: ``"head"``, ``"torso"`` (needs a trained head in ``out/head``) or ``"all"``.
        preset: ``cpu-smoke``, ``cpu-small`` or ``gpu-full`` (:mod:`avatar.nerf.presets`).
        steps: overrides the preset's step count of each trained part.
        seed: RNG seed (training is deterministic for a seed on one device).
        overwrite: retrain parts that are already finished (otherwise they are kept).
        callback: ``callback(fraction, message)`` progress hook; cancel: ``threading.Event``.
        max_seconds: wall-time budget of each trained part (seconds, from its first step); a part
            that reaches it stops early and is finished as usual (``metrics.json`` ``steps`` says how
            many were done; the learning-rate schedule still spans ``steps``). Used by benchmarks.

    Returns:
        ``Path(out)``.

    Raises:
        InvalidInput: unknown part/preset, torso without a head, too few training frames.
        BundleCorrupt: unreadable dataset or head model.
        TrainingDiverged: NaN loss (the last checkpoint is kept).
    """
    if part not in ("head", "torso", "all"):
        raise InvalidInput(f"--part must be head, torso or all, got {part!r}")
    if steps is not None and steps < 1:
        raise InvalidInput(f"--steps must be >= 1, got {steps}")
    cfg = get_preset(preset)
    dev = resolve_device(device)
    configure_threads()  # torch threads = CPUs this process may use (affinity, cgroup quota)
    ds = Dataset(dataset)
    scene = _Scene(ds, cfg, dev)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = PARTS if part == "all" else (part,)
    for p in parts:
        pdir = out / p
        if overwrite:  # start this part from scratch (no resume from an older run's checkpoint)
            for name in ("metrics.json", "checkpoint.safetensors"):
                (pdir / name).unlink(missing_ok=True)
        elif (pdir / "metrics.json").is_file() and (pdir / "model.safetensors").is_file():
            log.info("%s already trained in %s (pass --overwrite to retrain)", p, pdir)
            continue
        n = steps or (cfg.train.head_steps if p == "head" else cfg.train.torso_steps)
        head = None
        if p == "torso":
            if not (out / "head" / "model.safetensors").is_file():
                raise InvalidInput(f"torso training needs a trained head in {out / 'head'}; run with --part head first")
            head, _ = load_head(out / "head", dev)
            for q in head.parameters():
                q.requires_grad_(False)
        cb = None
        if callback is not None:
            k = parts.index(p)
            cb = lambda frac, msg, k=k: callback((k + frac) / len(parts), msg)  # noqa: E731
        _train_part(p, scene, out, n, seed, progress, cb, cancel, head_frozen=head, max_seconds=max_seconds)
    return out
