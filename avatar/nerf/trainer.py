"""``avatar train-nerf``: head NeRF, then torso NeRF on the frozen head (GeneFace / RAD-NeRF recipe).

The trainer role of nerfstudio's split (field / model with its losses / data manager / trainer): the
optimisation loop and what it schedules, over parts that live elsewhere. Fields and the stored
models: :mod:`avatar.nerf.fields`, :mod:`avatar.nerf.model`; batches (frames, pixels, rays, targets):
:mod:`avatar.nerf.datamanager`; losses and the training PSNR: :mod:`avatar.nerf.losses`; resumable
state: :mod:`avatar.nerf.checkpoint`. Here: the optimiser and its learning-rate schedule, occupancy
updates, the head / torso steps (render the batch, take its loss), the loop (resume, wall-time budget,
cancel, divergence, logging, checkpoints), validation PSNR and TensorBoard previews, and
:func:`train_nerf`.

Per step, ``frames_per_step`` training frames are drawn and ``rays_per_frame`` pixels from each
(:class:`~avatar.nerf.datamanager.HeadBatch`, :class:`~avatar.nerf.datamanager.TorsoBatch`). Adam with
separate learning rates for hash tables and MLPs. Checkpoints (model + optimiser + step + RNG states,
safetensors) are written atomically every ``ckpt_every`` steps; rerunning the same command resumes
from the last one and reaches the same final step. Training is deterministic for a given seed on one
device (bit for bit on CPU with one thread, ``AVATAR_THREADS=1``: multi-threaded float reductions vary
in order).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from avatar.data.dataset import MASK_HEAD, Dataset
from avatar.errors import InvalidInput
from avatar.nerf.checkpoint import Checkpoint
from avatar.nerf.occupancy import update_grid
from avatar.nerf.datamanager import HeadBatch, Scene, TorsoBatch, landmark_window, train_pos
from avatar.nerf.losses import ambient_ramp, head_loss, torso_loss, train_psnr
from avatar.nerf.model import (
    HeadNerf,
    TorsoNerf,
    atomic_save,
    build_head,
    build_torso,
    grid_parameters,
    load_head,
    part_info,
    write_json_atomic,
)
from avatar.nerf.presets import NerfConfig, get_preset
from avatar.nerf.rays import camera_rays
from avatar.nerf.render import composite, render_head_rays
from avatar.runtime import configure_threads, resolve_device

log = logging.getLogger(__name__)

PARTS = ("head", "torso")


def _make_optimizer(model: torch.nn.Module, cfg: NerfConfig) -> torch.optim.Optimizer:
    grids, nets = grid_parameters(model)
    return torch.optim.Adam(
        [{"params": grids, "lr": cfg.train.lr_grid}, {"params": nets, "lr": cfg.train.lr_net}],
        betas=(0.9, 0.99),
        eps=1e-15,
    )


def _lr_factor(step: int, total: int) -> float:
    """Exponential decay to 0.1x over the run (RAD-NeRF's schedule shape)."""
    return 0.1 ** (step / max(total, 1))


def _head_forward(head: HeadNerf, scene: Scene, batch: HeadBatch, train: bool, gen: torch.Generator):
    lm, bl = scene.cond_inputs(batch.frames, scene.train[0], scene.train[-1] + 1)
    cond = head.field.cond_net(lm, bl if head.field.cfg.use_blink else None)[batch.ray_group]
    code = head.field.individual_code(train_pos(scene, batch.frame_of_ray).to(scene.device), len(batch.frame_of_ray))
    return render_head_rays(
        head.field,
        head.estimator,
        batch.origins,
        batch.dirs,
        cond,
        code,
        scene.cfg.train.n_samples,
        jitter=train,
        generator=gen,
    )  # CUDA: nerfacc's marcher


def _autocast(device: torch.device, cfg: NerfConfig):
    enabled = device.type == "cuda" and cfg.train.amp
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _update_grid(head: HeadNerf, scene: Scene, rng: np.random.Generator, step: int) -> None:
    """The occupancy grid's update (:func:`avatar.nerf.occupancy.update_grid`, every device) under the
    condition of a random training frame."""
    t = scene.cfg.train

    def cond_fn() -> torch.Tensor:
        f = rng.choice(scene.train, size=1)
        lm, bl = scene.cond_inputs(f, scene.train[0], scene.train[-1] + 1)
        with torch.no_grad():
            return head.field.cond_net(lm, bl if head.field.cfg.use_blink else None)

    update_grid(head.estimator, head.field, cond_fn, step, t.n_samples, t.occ_every, t.occ_warmup)


def _set_lr(opt: torch.optim.Optimizer, cfg: NerfConfig, step: int, total: int) -> None:
    f = _lr_factor(step, total)
    opt.param_groups[0]["lr"] = cfg.train.lr_grid * f
    opt.param_groups[1]["lr"] = cfg.train.lr_net * f


# noqa below: the training loop in one place (resume, budget, cancel, occupancy updates, the step, divergence,
# logging, checkpoints); its steps are already functions, and splitting the bookkeeping would scatter the loop state
def _train_part(  # noqa: C901
    part: str,
    scene: Scene,
    out: Path,
    steps: int,
    seed: int,
    progress: bool,
    callback,
    cancel,
    head_frozen: HeadNerf | None = None,
    max_seconds: float | None = None,
) -> dict:
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
    if cfg.train.compile:
        # opt-in: the field's forward is compiled (state-dict keys unchanged); compile time is
        # reported by `python -m avatar_bench.bench_nerf --compile` and dominates short CPU runs
        model.field.forward = torch.compile(model.field.forward, dynamic=True)
    opt = _make_optimizer(model, cfg)
    ckpt = Checkpoint(pdir / "checkpoint.safetensors")
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
        if part == "head":
            _update_grid(model, scene, rng, step)
        with _autocast(dev, cfg):
            if part == "head":
                loss, stats = _head_step(model, scene, rng, gen, step, steps)
            else:
                loss, stats = _torso_step(model, head_frozen, scene, rng, gen)
        if not torch.isfinite(loss):
            from avatar.errors import TrainingDiverged

            raise TrainingDiverged(
                f"NeRF {part} loss became {loss.item()} at step {step}; the last checkpoint "
                f"({ckpt.path}) is kept; retry with another --seed or a lower learning rate"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(stats["mse"]))
        losses = losses[-200:]
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == steps:
            bar.set_postfix(psnr=f"{train_psnr(np.mean(losses[-cfg.train.log_every :])):.2f}")
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
    metrics = {
        "part": part,
        "steps": step,
        "steps_planned": steps,
        "seed": seed,
        "train_psnr_last": train_psnr(float(np.mean(losses[-20:]))) if losses else None,
        "seconds_this_run": round(time.perf_counter() - t_start, 1),
        "preset": cfg.preset,
    }
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


def _head_step(head: HeadNerf, scene: Scene, rng, gen, step: int, steps: int):
    batch = HeadBatch(scene, rng)
    r = _head_forward(head, scene, batch, True, gen)
    return head_loss(r, batch, scene.cfg.train, ambient_ramp(step, steps))


def _torso_step(torso: TorsoNerf, head: HeadNerf, scene: Scene, rng, gen):
    batch = TorsoBatch(scene, rng)
    r = _torso_rays(
        torso, head, scene, torch.from_numpy(batch.pix), torch.from_numpy(batch.fid), batch.frames, train=True
    )
    return torso_loss(r, batch)


def _torso_rays(
    torso: TorsoNerf,
    head: HeadNerf,
    scene: Scene,
    pix: torch.Tensor,
    fid: torch.Tensor,
    frames: np.ndarray,
    train: bool,
) -> dict[str, torch.Tensor]:
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
            hr = render_head_rays(
                head.field,
                head.estimator,
                o.to(dev),
                d.to(dev),
                conds[j].expand(len(sel), -1),
                code,
                scene.cfg.train.n_samples,
            )  # CUDA: nerfacc
            head_rgb[sel.to(dev)] = hr["rgb"].float()
            head_acc[sel.to(dev)] = hr["acc"].float()
    uv = (pix.float() + 0.5).to(dev) / S
    tcode = torso.field.individual_code(None if not train else train_pos(scene, fid).to(dev), len(pix))
    alpha, trgb = torso.field(uv, scene.pose[fid].to(dev), tcode, torch.cat((head_rgb, head_acc[:, None]), -1))
    bg = torso.background[pix[:, 1], pix[:, 0]].float().div(255).to(dev)
    return {"rgb": composite(bg, head_rgb, head_acc, trgb, alpha), "torso_alpha": alpha}


@torch.no_grad()
def _render_val_frame(part: str, model, head_frozen, scene: Scene, f: int) -> np.ndarray:
    from avatar.nerf.inference import AvatarNerf

    head = model if part == "head" else head_frozen
    torso = model if part == "torso" else None
    nerf = AvatarNerf(head, torso, scene.size, scene.K, scene.hs, scene.cfg.head.window, device=scene.device)
    nerf.set_background(np.asarray(scene.ds.background))
    win = landmark_window(scene.ds.n_frames, np.array([f]), scene.cfg.head.window)
    img = nerf.render(scene.lm3d[win], scene.pose[f][None], blink=scene.blink[win[:, scene.cfg.head.window // 2]])
    return img[0].cpu().numpy()


def _val_target(part: str, scene: Scene, f: int) -> np.ndarray:
    img = np.asarray(scene.ds.frames[f])
    if part == "head":
        m = np.asarray(scene.ds.masks[f]) == MASK_HEAD
        return np.where(m[..., None], img, np.asarray(scene.ds.background))
    return img


def _val_psnr(part: str, model, head_frozen, scene: Scene, n: int = 2) -> float:
    frames = scene.val[np.linspace(0, len(scene.val) - 1, n).astype(int)]
    mses = []
    for f in frames:
        pred = _render_val_frame(part, model, head_frozen, scene, int(f)).astype(np.float32) / 255
        mses.append(float(((pred - _val_target(part, scene, int(f)).astype(np.float32) / 255) ** 2).mean()))
    return round(train_psnr(float(np.mean(mses))), 3)


def _preview(writer, part: str, model, head_frozen, scene: Scene, step: int) -> None:
    f = int(scene.val[len(scene.val) // 2])
    was = model.training
    model.eval()
    pred = _render_val_frame(part, model, head_frozen, scene, f)
    model.train(was)
    both = np.concatenate((_val_target(part, scene, f), pred), 1)
    writer.add_image(f"{part}/val_gt_vs_render", both, step, dataformats="HWC")


def train_nerf(
    dataset: str | Path,
    out: str | Path,
    part: str = "all",
    preset: str = "cpu-small",
    steps: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    callback=None,
    cancel=None,
    device: str | None = None,
    max_seconds: float | None = None,
) -> Path:
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
    scene = Scene(ds, cfg, dev)
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
