"""Training of the shared motion models on a corpus of datasets: landmark SyncNet, then the
audio2motion generator (GeneFace, Ye et al. ICLR 2023, Sec. 3.1; task ``lm3d_vae_sync``).

Generator loss (per window, normalised expression x, prediction x^):
    L = |x^ - x|^2 + 3 |D x^ - D x|^2 + 0.4 KL + 0.01 L_sync        (D: frame difference)
with KL = log q(z|x,c) - log p_flow(z|c) and L_sync switched on once the SyncNet's accuracy on
held-out pairs exceeds ``sync_threshold``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from avatar.atomic import atomic_dir, check_output_dir
from avatar.audio import silence_features
from avatar.data.dataset import MOUTH
from avatar.errors import InvalidInput, TrainingDiverged
from avatar.runtime import cpu_threads, resolve_device
from avatar.motion.bundle import CONFIG, METRICS, STATS, MotionStats, save_module, write_json
from avatar.motion.data import Corpus
from avatar.motion.regression import RegressionConfig, RegressionTrainConfig
from avatar.motion.generator import (
    GENERATOR_FILE,
    SYNCNET_FILE,
    Audio2Motion,
    GeneratorConfig,
    VAEFlowGenerator,
    generator_config_dict,
)
from avatar.motion.syncnet import VIDEO_WIN, LandmarkSyncNet, SyncNetConfig, sync_loss

log = logging.getLogger(__name__)


@dataclass
class TrainGeneratorConfig:
    """Everything that defines a generator training run (stored in the bundle's config.json)."""

    preset: str = "cpu"
    model: str = "tcn"  # "tcn" (avatar.motion.regression, the default: it generalises to unseen
    # speakers, see bench/RESULTS.md) or "vae-flow" (GeneFace's generator)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    regression_fit: RegressionTrainConfig = field(default_factory=RegressionTrainConfig)
    syncnet: SyncNetConfig = field(default_factory=SyncNetConfig)
    window: int = 64  # video frames per training window (multiple of generator.stride)
    batch: int = 16
    syncnet_steps: int = 1500
    syncnet_batch: int = 64
    syncnet_lr: float = 1e-3
    steps: int = 3000
    lr: float = 5e-4
    lr_final_ratio: float = 0.1  # exponential decay to lr * ratio at the last step
    lambda_cont: float = 3.0
    lambda_kl: float = 0.4
    lambda_sync: float = 0.01
    sync_threshold: float = 0.7  # held-out SyncNet accuracy that switches the sync loss on
    silence_prob: float = 0.1  # windows with a span of digital silence -> rest expression (Corpus.windows)
    eval_every: int = 250
    seed: int = 0
    device: str = "auto"
    cpu_threads: int = 1  # torch CPU threads while training (0 = torch default); 1 avoids
    # OpenMP spin-wait collapse on a shared machine (measured 40x)


PRESETS: dict[str, TrainGeneratorConfig] = {
    # unit tests: seconds on 2 CPU cores
    "smoke": TrainGeneratorConfig(
        preset="smoke",
        generator=GeneratorConfig(
            hidden=32, enc_layers=2, dec_layers=2, flow_blocks=2, flow_layers=2, flow_hidden=16, cond_dim=32
        ),
        regression=RegressionConfig(hidden=32, n_basis=8),
        regression_fit=RegressionTrainConfig(steps=40, batch=4, window=32, eval_every=20),
        syncnet=SyncNetConfig(hidden=32, embed=64),
        window=32,
        batch=4,
        syncnet_steps=40,
        syncnet_batch=32,
        steps=40,
        eval_every=20,
        lr=2e-3,
        sync_threshold=0.0,
    ),
    # the small real corpus on 2 CPU cores (make demo): ~10-15 min
    "cpu": TrainGeneratorConfig(
        preset="cpu",
        generator=GeneratorConfig(hidden=128, enc_layers=8, dec_layers=4, dropout=0.1),
        syncnet=SyncNetConfig(hidden=128, embed=512),
        window=64,
        batch=12,
        syncnet_steps=1500,
        steps=2500,
        eval_every=250,
        lr=1e-3,
    ),
    # GeneFace's LRS3 schedule on a GPU
    "gpu": TrainGeneratorConfig(
        preset="gpu",
        generator=GeneratorConfig(),
        syncnet=SyncNetConfig(),
        window=128,
        batch=64,
        syncnet_steps=40000,
        syncnet_batch=256,
        steps=40000,
        eval_every=1000,
        lr=5e-4,
    ),
}


def _check_finite(loss: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"{what} loss became {loss.item()} at step {step}; lower the learning rate "
            f"(preset lr) or check the datasets for NaN landmarks/features"
        )


def _decay(opt: torch.optim.Optimizer, base_lr: float, ratio: float, step: int, steps: int) -> None:
    lr = base_lr * ratio ** (step / max(1, steps))
    for g in opt.param_groups:
        g["lr"] = lr


@torch.no_grad()
def syncnet_accuracy(
    net: LandmarkSyncNet, corpus: Corpus, stats: MotionStats, device, n: int = 512, seed: int = 1234
) -> dict:
    """Accuracy and BCE of ``net`` on ``n`` fixed pairs (half in sync) of ``corpus``."""
    net.eval()
    a, m, y = corpus.sync_pairs(np.random.default_rng(seed), n)
    fm, fs = np.asarray(stats.feature_mean, np.float32), np.asarray(stats.feature_std, np.float32)
    at = torch.from_numpy((a - fm) / fs).to(device)
    mt = torch.from_numpy(m[:, :, MOUTH]).to(device)
    logits = torch.cat([net(at[i : i + 256], mt[i : i + 256]) for i in range(0, n, 256)])
    yt = torch.from_numpy(y).to(device)
    net.train()
    return {
        "acc": float(((logits > 0).float() == yt).float().mean()),
        "bce": float(F.binary_cross_entropy_with_logits(logits, yt)),
    }


def train_syncnet(
    train: Corpus,
    val: Corpus,
    cfg: TrainGeneratorConfig,
    stats: MotionStats,
    device,
    progress: bool = True,
    writer=None,
    callback: Callable | None = None,
) -> tuple[LandmarkSyncNet, dict]:
    """Train the landmark SyncNet; keeps the weights with the best held-out accuracy.

    Returns (net in eval mode, {"syncnet_val_acc", "syncnet_val_bce", "syncnet_steps"}).
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = LandmarkSyncNet(cfg.syncnet).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.syncnet_lr)
    fm, fs = np.asarray(stats.feature_mean, np.float32), np.asarray(stats.feature_std, np.float32)
    best, best_state = {"acc": -1.0, "bce": math.inf}, None
    bar = tqdm(range(1, cfg.syncnet_steps + 1), desc="syncnet", disable=not progress, dynamic_ncols=True)
    for step in bar:
        _decay(opt, cfg.syncnet_lr, cfg.lr_final_ratio, step, cfg.syncnet_steps)
        a, m, y = train.sync_pairs(rng, cfg.syncnet_batch)
        logits = net(torch.from_numpy((a - fm) / fs).to(device), torch.from_numpy(m[:, :, MOUTH]).to(device))
        loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(y).to(device))
        _check_finite(loss, "syncnet", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.syncnet_steps:
            ev = syncnet_accuracy(net, val, stats, device)
            bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{ev['acc']:.3f}")
            if writer is not None:
                writer.add_scalar("syncnet/train_bce", loss.item(), step)
                writer.add_scalar("syncnet/val_acc", ev["acc"], step)
            if ev["acc"] > best["acc"]:
                best = ev
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            if callback:
                callback(0.3 * step / cfg.syncnet_steps, f"syncnet step {step}, val acc {ev['acc']:.3f}")
    net.load_state_dict(best_state)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, {"syncnet_val_acc": best["acc"], "syncnet_val_bce": best["bce"], "syncnet_steps": cfg.syncnet_steps}


def generator_loss(
    net: VAEFlowGenerator,
    feats: torch.Tensor,
    expr: torch.Tensor,
    cfg: TrainGeneratorConfig,
    syncnet: LandmarkSyncNet | None,
    es: torch.Tensor,
    em: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Loss terms for normalised ``feats [B, 2W, D]`` and ``expr [B, W, 204]`` (see module docstring)."""
    out = net(feats, expr)
    pred = out["pred"]
    mse = F.mse_loss(pred, expr)
    cont = F.mse_loss(pred[:, 1:] - pred[:, :-1], expr[:, 1:] - expr[:, :-1])
    total = mse + cfg.lambda_cont * cont + cfg.lambda_kl * out["kl"]
    terms = {"mse": mse, "cont": cont, "kl": out["kl"]}
    if syncnet is not None:
        canon = (pred * es + em).reshape(pred.shape[0], pred.shape[1], 68, 3)
        terms["sync"] = sync_loss(syncnet, feats, canon)
        total = total + cfg.lambda_sync * terms["sync"]
    terms["total"] = total
    return terms


@torch.no_grad()
def generator_val(net: VAEFlowGenerator, val: Corpus, stats: MotionStats, device) -> dict:
    """Validation on every clip's held-out tail, each predicted in its full clip context at
    temperature 0: mouth LMD (canonical units), the trivial mean-expression LMD for reference,
    normalised MSE, and the pooled Pearson r of the inner-lip opening (per-clip mean removed).
    Checkpoints are selected on ``val_open_r`` (lip motion following the audio) -- LMD alone
    favours predicting the mean shape."""
    from avatar.motion.metrics import mouth_opening, pearson

    net.eval()
    a2m = Audio2Motion(net, stats, device=device)
    em, es = np.asarray(stats.expr_mean, np.float32), np.asarray(stats.expr_std, np.float32)
    lmds, trivial, mses, op, og, n = 0.0, 0.0, 0.0, [], [], 0
    for c in val.clips:
        pred = a2m.predict(np.asarray(c.features, np.float32), temperature=0.0)[c.start : c.stop]
        gt = c.expr(c.start, c.stop)
        k = len(gt)
        lmds += np.linalg.norm(pred[:, MOUTH] - gt[:, MOUTH], axis=-1).mean() * k
        trivial += np.linalg.norm(em.reshape(68, 3)[MOUTH] - gt[:, MOUTH], axis=-1).mean() * k
        mses += (((pred.reshape(k, -1) - gt.reshape(k, -1)) / es) ** 2).mean() * k
        po, go = mouth_opening(pred + c.mean), mouth_opening(gt + c.mean)
        op.append(po - po.mean())
        og.append(go - go.mean())
        n += k
    net.train()
    return {
        "val_mouth_lmd": float(lmds / n),
        "val_mean_shape_mouth_lmd": float(trivial / n),
        "val_mse": float(mses / n),
        "val_open_r": pearson(np.concatenate(op), np.concatenate(og)),
    }


def _train_vae_flow(
    train: Corpus,
    val: Corpus,
    cfg: TrainGeneratorConfig,
    gcfg: GeneratorConfig,
    stats: MotionStats,
    syncnet: LandmarkSyncNet,
    syncnet_acc: float,
    device,
    progress: bool,
    writer,
    callback,
    hubert_path: str | None,
) -> tuple[VAEFlowGenerator, dict]:
    """GeneFace's VAE + flow generator (module docstring loss); checkpoint chosen on the held-out
    tails' mouth-opening r. Returns (net with the best weights, metrics)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    net = VAEFlowGenerator(gcfg).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    fm, fs, em, es = (
        torch.tensor(np.asarray(x, np.float32), device=device)
        for x in (stats.feature_mean, stats.feature_std, stats.expr_mean, stats.expr_std)
    )
    sync_on = syncnet_acc > cfg.sync_threshold
    if not sync_on:
        log.warning(
            "SyncNet held-out accuracy %.3f <= %.2f: generator trained without the sync loss",
            syncnet_acc,
            cfg.sync_threshold,
        )
    best, best_state, first = math.inf, None, None
    silence = silence_features(train.feature_kind, hubert_path) if cfg.silence_prob > 0 else None
    bar = tqdm(range(1, cfg.steps + 1), desc="generator", disable=not progress, dynamic_ncols=True)
    for step in bar:
        _decay(opt, cfg.lr, cfg.lr_final_ratio, step, cfg.steps)
        f, e = train.windows(rng, cfg.batch, cfg.window, silence, cfg.silence_prob)
        ft = (torch.from_numpy(f).to(device) - fm) / fs
        et = (torch.from_numpy(e).to(device).flatten(2) - em) / es
        terms = generator_loss(net, ft, et, cfg, syncnet if sync_on else None, es, em)
        _check_finite(terms["total"], "generator", step)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        if first is None:
            first = {k: float(v.detach()) for k, v in terms.items()}
        if step % 10 == 0:
            for k, v in terms.items():
                writer.add_scalar(f"generator/{k}", float(v.detach()), step)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = generator_val(net, val, stats, device)
            for k, v in ev.items():
                writer.add_scalar(f"generator/{k}", v, step)
            bar.set_postfix(
                loss=f"{terms['total'].item():.3f}",
                val_open_r=f"{ev['val_open_r']:.3f}",
                val_lmd=f"{ev['val_mouth_lmd']:.4f}",
            )
            score = -ev["val_open_r"] if np.isfinite(ev["val_open_r"]) else ev["val_mse"]
            if best_state is None or score < best:
                best, best_ev, best_step = score, ev, step
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            if callback:
                callback(0.3 + 0.7 * step / cfg.steps, f"generator step {step}, val open r {ev['val_open_r']:.3f}")
    net.load_state_dict(best_state)
    last = {k: float(v.detach()) for k, v in terms.items()}
    metrics = {f"first_{k}": v for k, v in first.items()}
    metrics.update({f"last_{k}": v for k, v in last.items()})
    metrics.update(best_ev)
    metrics.update(
        {
            "best_step": best_step,
            "steps": cfg.steps,
            "sync_loss_on": sync_on,
            "clips": len(train.clips),
            "train_frames": train.n_frames,
        }
    )
    return net, metrics


def _train_regression(
    datasets: list,
    cfg: TrainGeneratorConfig,
    device,
    progress: bool,
    writer,
    callback,
    feature_kind: str,
    hubert_path: str | None,
):
    """The :mod:`avatar.motion.regression` generator on whole clips; about ``heldout_fraction`` of the
    clips (whole clips: other speakers) choose the checkpoint. Returns (net, metrics, config)."""
    from avatar.motion.regression import build_generator, clips_from_datasets, fit, split_heldout

    clips = clips_from_datasets(datasets, "all")
    rcfg = replace(
        cfg.regression,
        feature_dim=int(clips[0].features.shape[1]),
        energy=cfg.regression.energy and feature_kind == "mel",
    )
    fit_cfg = replace(cfg.regression_fit, seed=cfg.seed)
    train, held = split_heldout(clips, fit_cfg.heldout_fraction)
    log.info(
        "audio2motion (tcn): %d training clips (%.1f min), %d held-out clips (%.1f min) for checkpoint selection",
        len(train),
        sum(len(c) for c in train) / 1500,
        len(held),
        sum(len(c) for c in held) / 1500,
    )
    net = build_generator(train, rcfg, device)
    silence = silence_features(feature_kind, hubert_path) if fit_cfg.silence_prob > 0 else None
    cb = (lambda f, msg: callback(0.3 + 0.7 * f, msg)) if callback else None
    m = fit(net, train, held, fit_cfg, silence, progress=progress, desc="audio2motion", callback=cb, writer=writer)
    m.update({"clips": len(train), "heldout_clips": len(held), "train_frames": int(sum(len(c) for c in train))})
    return net, m, rcfg


def train_generator(
    datasets: list[str | Path],
    out: str | Path,
    cfg: TrainGeneratorConfig,
    overwrite: bool = False,
    progress: bool = True,
    hubert_path: str | None = None,
    extra_metrics: dict | None = None,
    callback: Callable | None = None,
) -> Path:
    """Train SyncNet + generator on preprocessed datasets and write a generator bundle atomically.

    Args:
        datasets: dataset directories (one clip each); each one's validation tail is held out.
        out: bundle directory (``generator.safetensors``, ``syncnet.safetensors``, ``config.json``,
            ``stats.json``, ``metrics.json``, ``runs/`` TensorBoard logs).
        cfg: a preset from :data:`PRESETS` or a custom config.
    Returns: ``out``.
    Raises:
        OutputExists, InvalidInput (no usable clip), FeatureMismatch (mixed features),
        TrainingDiverged (NaN losses).
    """
    if cfg.model not in ("tcn", "vae-flow"):
        raise InvalidInput(f"unknown audio2motion model {cfg.model!r}; choose tcn or vae-flow")
    out = check_output_dir(out, overwrite)
    if cfg.window % cfg.generator.stride:
        raise InvalidInput(f"window {cfg.window} must be a multiple of the stride {cfg.generator.stride}")
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    train = Corpus(datasets, "train", min_frames=cfg.window)
    try:
        val = Corpus(datasets, "val", min_frames=VIDEO_WIN + 2 * 5 + 1)
        heldout = True
    except InvalidInput:
        log.warning("no dataset has a validation tail long enough; validating on training frames")
        val, heldout = train, False
    gcfg = replace(cfg.generator, feature_dim=train.feature_dim)
    fm_np, fs_np, em_np, es_np = train.fit_stats()
    mouth_std = float(es_np.reshape(68, 3)[MOUTH].mean())
    scfg = replace(cfg.syncnet, feature_dim=train.feature_dim, mouth_scale=1.0 / mouth_std)
    cfg = replace(cfg, generator=gcfg, syncnet=scfg)
    stats = MotionStats(
        train.feature_kind,
        fm_np.tolist(),
        fs_np.tolist(),
        em_np.tolist(),
        es_np.tolist(),
        {"hubert_path": hubert_path} if hubert_path else {},
    )
    log.info(
        "training on %d clips, %d frames (%.1f min) of %s features (dim %d), device %s",
        len(train.clips),
        train.n_frames,
        train.n_frames / 25 / 60,
        train.feature_kind,
        train.feature_dim,
        device,
    )
    from torch.utils.tensorboard import SummaryWriter

    with atomic_dir(out, overwrite=overwrite) as tmp, cpu_threads(cfg.cpu_threads if device.type == "cpu" else 0):
        writer = SummaryWriter(str(tmp / "runs"))
        syncnet, metrics = train_syncnet(train, val, cfg, stats, device, progress, writer, callback)
        if cfg.model == "tcn":
            net, gen_metrics, gcfg_out = _train_regression(
                datasets, cfg, device, progress, writer, callback, train.feature_kind, hubert_path
            )
        elif cfg.model == "vae-flow":
            net, gen_metrics = _train_vae_flow(
                train,
                val,
                cfg,
                gcfg,
                stats,
                syncnet,
                metrics["syncnet_val_acc"],
                device,
                progress,
                writer,
                callback,
                hubert_path,
            )
            gcfg_out = gcfg
        else:
            raise InvalidInput(f"unknown audio2motion model {cfg.model!r}; choose tcn or vae-flow")
        metrics.update(gen_metrics)
        metrics.update(
            {
                "model": cfg.model,
                "heldout_val": heldout,
                "train_seconds": round(time.perf_counter() - t0, 1),
                "device": str(device),
            }
        )
        metrics.update(extra_metrics or {})
        writer.close()
        save_module(net, tmp / GENERATOR_FILE)
        save_module(syncnet, tmp / SYNCNET_FILE)
        write_json(tmp, CONFIG, generator_config_dict(gcfg_out, scfg, cfg))
        write_json(tmp, STATS, stats.to_dict())
        write_json(tmp, METRICS, metrics)
    log.info(
        "generator bundle written to %s (val mouth-opening r %.3f, mouth LMD %.4f vs mean shape %.4f, "
        "syncnet acc %.3f, %.0f s)",
        out,
        metrics["val_open_r"],
        metrics["val_mouth_lmd"],
        metrics["val_mean_shape_mouth_lmd"],
        metrics["syncnet_val_acc"],
        metrics["train_seconds"],
    )
    return out
