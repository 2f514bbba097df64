"""audio2motion as a deterministic regression: speaker-normalised audio -> low-dimensional expression.

Why this exists next to GeneFace's VAE + flow generator (:mod:`avatar.motion.generator`): with the
minutes of multi-speaker data we have (not LRS3's hundreds of hours), the VAE memorises its corpus
(train MSE 0.06 vs validation 1.35) and its mouth follows unseen speakers' words worse than the
audio-energy envelope. This model is built to generalise from little data:

* **Speaker/channel-normalised input** (:func:`transform_features`): causal sliding-window cepstral
  mean normalisation of the log-mel (per bin, over the past ``cmn_window`` feature frames, as in
  Kaldi's ``apply-cmvn-sliding``), which removes the microphone, codec, loudness and much of the
  speaker's timbre, plus the frame's log-energy relative to the loudest frame of that window
  (speech ~0, pauses and digital silence at the floor): "silence is silence" in any recording.
* **A small temporal CNN** (:class:`TCNGenerator`): stride-2 convolution 50 Hz -> 25 Hz, then
  residual dilated 1-D convolutions (receptive field +-``receptive_frames()`` video frames, so a
  frame's mouth sees ~0.45 s of audio on each side: coarticulation and the lip-audio lead),
  dropout, per-frame LayerNorm (nothing mixes frames beyond the receptive field, so chunked,
  windowed and streamed inference equal one pass).
* **A PCA expression basis**: the net predicts ``n_basis`` coefficients of the principal components
  of the identity-free expression ``lm3d - lm3d_mean`` (fitted on the training corpus) instead of
  204 free coordinates (regularises to the data size; coefficients scaled to unit variance).
* **Augmentation** (:func:`augment_window`): vocal-tract-length-style warping of the mel axis
  (speaker pitch/formants), loudness, SpecAugment-style frequency/time masks, noise, and spans of
  digital silence whose target is the clip's resting (closed-mouth) expression.
* **Early stopping on held-out clips** (whole clips of other speakers, scored by the Pearson r of
  the mouth opening), and **per-person fine-tuning** on the onboarded person's own audio and
  landmarks (:func:`finetune_generator`; RAD-NeRF / ER-NeRF / GeneFace++ condition on the person's
  own audio for the same reason), checkpoint chosen on the person's validation tail.

The sync loss of GeneFace is not used: the landmark SyncNet trained on this data does not reach the
accuracy at which its gradient helps (see ``bench/RESULTS.md``), so it is only a metric here.

Tensor shapes: features float32 [F, D] at 50 Hz (F = 2T), expression float32 [T, 68, 3] at 25 fps.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from avatar.data.dataset import MOUTH
from avatar.errors import InvalidInput
from avatar.motion.tcn import (  # noqa: F401  (re-exported: the model's public home is tcn.py)
    ENERGY_FLOOR,
    ENERGY_REF_MIN,
    EXPR_DIM,
    RegressionConfig,
    TCNGenerator,
    transform_features,
)

log = logging.getLogger(__name__)


def fit_basis(
    exprs: list[np.ndarray], n_basis: int, max_rows: int = 50_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of identity-free expressions.

    Args:
        exprs: float32 [N_i, 204] per clip. n_basis: components kept.
    Returns:
        (mean [204], basis [n_basis, 204] orthonormal rows, coefficient std [n_basis]), float32.
    Raises:
        InvalidInput: fewer frames than components.
    """
    x = np.concatenate(exprs).astype(np.float64)
    if len(x) < n_basis:
        raise InvalidInput(f"{len(x)} frames are too few for a {n_basis}-component expression basis")
    step = max(1, len(x) // max_rows)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x[::step] - mean, full_matrices=False)
    basis = vt[:n_basis]
    coef_std = ((x - mean) @ basis.T).std(0) + 1e-6
    return mean.astype(np.float32), basis.astype(np.float32), coef_std.astype(np.float32)


# ------------------------------------------------------------------------------------ training data
@dataclass
class RegressionTrainConfig:
    """A training (or per-person fine-tuning) run of :class:`TCNGenerator`."""

    steps: int = 1500  # ~4 min on one CPU core for the 9 min of corpus + corpus2
    batch: int = 16
    window: int = 64  # video frames per training window
    lr: float = 2e-3
    weight_decay: float = 1e-4
    lambda_vel: float = 1.0  # weight of the frame-difference (velocity) loss
    mouth_weight: float = 1.0  # extra weight on the mouth/jaw points' reconstruction
    lambda_open: float = 0.0  # weight of the mouth-opening loss (1 - windowed Pearson r + log-std ratio^2)
    eval_every: int = 250
    silence_prob: float = 0.1  # windows with a span of digital silence -> resting expression
    warp: float = 0.1  # mel-axis warp factor range (1 +- warp): speaker augmentation
    noise: float = 0.1  # Gaussian noise on the normalised input
    spec_mask_prob: float = 0.5
    heldout_fraction: float = 0.15  # whole clips held out for checkpoint selection (shared training)
    seed: int = 0


class ClipArrays:
    """One clip for training: raw features [2N, D], expression [N, 204], rest expression [204]."""

    def __init__(self, name: str, features: np.ndarray, expr: np.ndarray, lm3d_mean: np.ndarray):
        self.name = name
        self.features = np.asarray(features, np.float32)
        self.expr = np.asarray(expr, np.float32).reshape(len(expr), EXPR_DIM)
        self.mean = np.asarray(lm3d_mean, np.float32)
        from avatar.motion.metrics import mouth_opening

        opening = mouth_opening(self.expr.reshape(-1, 68, 3) + self.mean)
        self.rest = self.expr[opening <= np.percentile(opening, 10)].mean(0)

    def __len__(self) -> int:
        return len(self.expr)


def clips_from_datasets(roots: list, part: str = "all") -> list[ClipArrays]:
    """Load the features + expressions of dataset directories (``part``: all / train / val)."""
    from avatar.data.dataset import Dataset

    out = []
    for r in roots:
        ds = Dataset(r)
        rng = {"train": ds.train_range, "val": ds.val_range, "all": range(0, ds.n_frames)}[part]
        mean = np.asarray(ds.lm3d_mean, np.float32)
        expr = np.asarray(ds.lm3d[rng.start : rng.stop], np.float32) - mean
        feats = np.asarray(ds.features[2 * rng.start : 2 * rng.stop], np.float32)
        out.append(ClipArrays(ds.root.name, feats, expr, mean))
    return out


def warp_mel(f: np.ndarray, factor: float) -> np.ndarray:
    """Stretch the mel (frequency) axis of log-mel frames [F, D] by ``factor`` (linear interpolation,
    edges clamped): a cheap vocal-tract-length perturbation (Jaitly & Hinton 2013, "VTLP")."""
    d = f.shape[1]
    src = np.clip(np.arange(d) / factor, 0, d - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, d - 1)
    w = (src - i0).astype(np.float32)
    return f[:, i0] * (1 - w) + f[:, i1] * w


def augment_window(
    clip: ClipArrays,
    a: int,
    window: int,
    cfg: RegressionConfig,
    tcfg: RegressionTrainConfig,
    rng: np.random.Generator,
    silence: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One training window at frame ``a``: (transformed, un-normalised input [2W, input_dim], expr [W, 204]).

    The transform is computed over ``history_frames()`` of left context (from the clip start if
    nearer), exactly as at inference; augmentations act on the raw log-mel before it.
    """
    h0 = max(0, a - cfg.history_frames())
    raw = clip.features[2 * h0 : 2 * (a + window)].copy()
    expr = clip.expr[a : a + window].copy()
    if silence is not None and rng.random() < tcfg.silence_prob:
        n = int(rng.integers(max(1, window // 4), window + 1))
        s = int(rng.integers(0, window - n + 1))
        o = 2 * (a - h0)
        raw[o + 2 * s : o + 2 * (s + n)] = silence
        expr[s : s + n] = clip.rest
    if tcfg.warp > 0 and cfg.energy:
        raw = warp_mel(raw, float(rng.uniform(1 - tcfg.warp, 1 + tcfg.warp)))
    if cfg.energy:
        raw = raw + float(rng.uniform(-1.0, 1.0))  # loudness +-10 dB (log10 power units)
    x = transform_features(raw, cfg, start=2 * h0)[2 * (a - h0) :]
    if rng.random() < tcfg.spec_mask_prob:
        f0 = int(rng.integers(0, cfg.feature_dim - 8))
        x[:, f0 : f0 + int(rng.integers(1, 9))] = 0.0
    if rng.random() < tcfg.spec_mask_prob * 0.5:
        t0 = int(rng.integers(0, len(x) - 6))
        x[t0 : t0 + int(rng.integers(1, 6))] = 0.0
    return x, expr


def opening_r(pred: np.ndarray, gt: np.ndarray, mean: np.ndarray) -> float:
    """Pearson r of the inner-lip opening of two expression tracks [N, 204] on one face ``mean`` [68, 3]."""
    from avatar.motion.metrics import mouth_opening, pearson

    return pearson(mouth_opening(pred.reshape(-1, 68, 3) + mean), mouth_opening(gt.reshape(-1, 68, 3) + mean))


@torch.no_grad()
def predict_clip(net: TCNGenerator, features: np.ndarray, start: int = 0) -> np.ndarray:
    """Whole-clip inference: raw features [2N, D] -> expression float32 [N, 204] (canonical)."""
    was = net.training
    net.eval()
    x = torch.from_numpy(transform_features(features, net.cfg, start=start)).to(net.basis.device)
    y = net.infer(net.normalize_inputs(x)[None])[0].cpu().numpy()
    net.train(was)
    return y


def validate(net: TCNGenerator, clips: list[ClipArrays]) -> dict:
    """Mean over ``clips`` of the mouth-opening r, and mouth LMD vs the mean-shape baseline."""
    from avatar.motion.metrics import lmd

    rs, err, base, n = [], 0.0, 0.0, 0
    for c in clips:
        p = predict_clip(net, c.features)[: len(c)].reshape(-1, 68, 3)
        gt = c.expr.reshape(-1, 68, 3)
        rs.append(opening_r(p, gt, c.mean))
        err += lmd(p, gt, MOUTH) * len(c)
        base += lmd(np.zeros_like(gt), gt, MOUTH) * len(c)
        n += len(c)
    return {
        "val_open_r": float(np.nanmean(rs)),
        "val_mouth_lmd": float(err / n),
        "val_mean_shape_mouth_lmd": float(base / n),
    }


def _mouth_weights(cfg_weight: float) -> np.ndarray:
    w = np.ones((68, 3), np.float32)
    w[MOUTH] = cfg_weight
    w[list(range(0, 17))] = max(1.0, cfg_weight * 0.5)  # jaw line
    return w.reshape(EXPR_DIM)


def opening_loss(recon: torch.Tensor, target: torch.Tensor, means: torch.Tensor, min_std: float) -> torch.Tensor:
    """Mouth-opening loss of a batch of windows: ``1 - r`` (Pearson r of the predicted vs the real
    inner-lip opening over each window) + ``log(std_pred / std_real)^2``.

    MSE alone shrinks an uncertain prediction towards the mean (the mouth then moves at about half
    the real amplitude); this term rewards following the real opening's shape and size directly.
    Windows whose real opening barely moves (std < ``min_std``: pauses) are left out.

    Args:
        recon, target: float32 [B, W, 204] expressions (canonical units); means: float32 [B, 68, 3]
            each window's identity mean shape; min_std: canonical units.
    Returns: scalar tensor (0 when no window qualifies).
    """
    from avatar.motion.metrics import INNER_LOWER, INNER_UPPER

    def opening(e: torch.Tensor) -> torch.Tensor:
        lm = e.reshape(e.shape[0], e.shape[1], 68, 3) + means[:, None]
        d = lm[:, :, INNER_UPPER] - lm[:, :, INNER_LOWER]
        return torch.sqrt((d * d).sum(-1) + 1e-12).mean(-1)

    op, og = opening(recon), opening(target)
    pc, gc = op - op.mean(1, keepdim=True), og - og.mean(1, keepdim=True)
    sp, sg = torch.sqrt((pc * pc).mean(1) + 1e-12), torch.sqrt((gc * gc).mean(1) + 1e-12)
    valid = (sg > min_std).float()
    r = (pc * gc).mean(1) / (sp * sg)
    per = (1.0 - r) + torch.log(sp / sg) ** 2
    return (per * valid).sum() / valid.sum().clamp(min=1.0)


def fit(
    net: TCNGenerator,
    train: list[ClipArrays],
    val: list[ClipArrays],
    tcfg: RegressionTrainConfig,
    silence: np.ndarray | None,
    progress: bool = True,
    desc: str = "audio2motion",
    callback: Callable | None = None,
    writer=None,
    select_initial: bool = False,
) -> dict:
    """Train ``net`` in place on windows of ``train``; keep the weights with the best ``val`` r.

    Loss: MSE of the unit-variance PCA coefficients + ``lambda_vel`` x MSE of their frame
    differences + the expression reconstruction error on the mouth/jaw points (weighted).
    ``select_initial``: the weights before training compete too (fine-tuning never makes the
    person's validation tail worse than the shared model).

    Returns: metrics {best_step, val_open_r, val_mouth_lmd, val_mean_shape_mouth_lmd, train_loss}.
    Raises: TrainingDiverged on a non-finite loss.
    """
    from avatar.errors import TrainingDiverged

    rng = np.random.default_rng(tcfg.seed)
    torch.manual_seed(tcfg.seed)
    cfg = net.cfg
    device = net.basis.device
    lens = np.array([len(c) for c in train])
    w = np.clip(lens - tcfg.window + 1, 0, None).astype(np.float64)
    if w.sum() == 0:
        raise InvalidInput(f"no training clip has {tcfg.window} frames; give longer clips")
    p = w / w.sum()
    mw = torch.from_numpy(_mouth_weights(tcfg.mouth_weight)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, tcfg.lr, total_steps=tcfg.steps, pct_start=0.1)
    min_std = 0.0
    if tcfg.lambda_open > 0:  # a quarter of the median per-window opening std of the training clips
        from avatar.motion.metrics import mouth_opening

        stds = [
            mouth_opening(c.expr[a : a + tcfg.window].reshape(-1, 68, 3) + c.mean).std()
            for c in train
            for a in range(0, max(1, len(c) - tcfg.window + 1), tcfg.window)
        ]
        min_std = 0.25 * float(np.median(stds))
    best = {"val_open_r": -math.inf}
    best_state, best_step = None, 0
    if select_initial:
        best = validate(net, val)
        best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.train()
    bar = tqdm(range(1, tcfg.steps + 1), desc=desc, disable=not progress, dynamic_ncols=True)
    loss_v = float("nan")
    for step in bar:
        xs, ys, ms = [], [], []
        for _ in range(tcfg.batch):
            i = int(rng.choice(len(train), p=p))
            a = int(rng.integers(0, lens[i] - tcfg.window + 1))
            x, y = augment_window(train[i], a, tcfg.window, cfg, tcfg, rng, silence)
            xs.append(x)
            ys.append(y)
            ms.append(train[i].mean.reshape(68, 3))
        x = net.normalize_inputs(torch.from_numpy(np.stack(xs)).to(device))
        if tcfg.noise > 0:
            x = x + tcfg.noise * torch.randn_like(x)
        y = torch.from_numpy(np.stack(ys)).to(device)
        target = net.coefficients(y)
        coef = net(x)
        recon = net.expression(coef)
        loss = (
            F.mse_loss(coef, target)
            + tcfg.lambda_vel * F.mse_loss(coef[:, 1:] - coef[:, :-1], target[:, 1:] - target[:, :-1])
            + (((recon - y) ** 2) * mw).mean() / (net.coef_std**2).mean()
        )
        if tcfg.lambda_open > 0:
            means = torch.from_numpy(np.stack(ms)).to(device)
            loss = loss + tcfg.lambda_open * opening_loss(recon, y, means, min_std)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"{desc} loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        if writer is not None and step % 10 == 0:
            writer.add_scalar(f"{desc}/loss", loss_v, step)
        if step % tcfg.eval_every == 0 or step == tcfg.steps:
            ev = validate(net, val)
            if writer is not None:
                for k, v in ev.items():
                    writer.add_scalar(f"{desc}/{k}", v, step)
            bar.set_postfix(loss=f"{loss_v:.3f}", val_open_r=f"{ev['val_open_r']:.3f}")
            if np.isfinite(ev["val_open_r"]) and ev["val_open_r"] > best["val_open_r"]:
                best, best_step = ev, step
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            if callback:
                callback(step / tcfg.steps, f"{desc} step {step}, held-out mouth r {ev['val_open_r']:.3f}")
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return {**best, "best_step": best_step, "train_loss": loss_v}


def build_generator(train: list[ClipArrays], cfg: RegressionConfig, device: torch.device | str = "cpu") -> TCNGenerator:
    """A fresh :class:`TCNGenerator` with input statistics and the expression basis fitted on ``train``."""
    net = TCNGenerator(cfg)
    xs = np.concatenate([transform_features(c.features, cfg) for c in train])
    net.in_mean.copy_(torch.from_numpy(xs.mean(0)))
    net.in_std.copy_(torch.from_numpy(xs.std(0) + 1e-3))
    mean, basis, coef_std = fit_basis([c.expr for c in train], cfg.n_basis)
    net.basis.copy_(torch.from_numpy(basis))
    net.basis_mean.copy_(torch.from_numpy(mean))
    net.coef_std.copy_(torch.from_numpy(coef_std))
    return net.to(device)


def split_heldout(clips: list[ClipArrays], fraction: float) -> tuple[list[ClipArrays], list[ClipArrays]]:
    """Hold out whole clips (about ``fraction`` of the frames, every k-th clip in name order) for
    checkpoint selection: they stand for unseen speakers. Returns (train, held-out)."""
    if len(clips) < 3 or fraction <= 0:
        return clips, clips
    order = sorted(range(len(clips)), key=lambda i: clips[i].name)
    k = max(2, round(1 / fraction))
    chosen = {i for j, i in enumerate(order) if j % k == k // 2} or {order[len(order) // 2]}
    return [c for i, c in enumerate(clips) if i not in chosen], [c for i, c in enumerate(clips) if i in chosen]


#: per-person fine-tuning presets (onboarding's postnet preset names)
FINETUNE_PRESETS: dict[str, RegressionTrainConfig] = {
    "smoke": RegressionTrainConfig(steps=20, batch=4, window=32, lr=5e-4, eval_every=10),
    "cpu": RegressionTrainConfig(steps=800, batch=16, window=64, lr=5e-4, eval_every=100),
    "gpu": RegressionTrainConfig(steps=2000, batch=32, window=64, lr=5e-4, eval_every=100),
}


def finetune_generator(
    generator: str | Path,
    dataset: str | Path,
    out: str | Path,
    preset: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    callback: Callable | None = None,
    cancel=None,
    seed: int = 0,
) -> Path:
    """Adapt the shared audio2motion to one person: fine-tune on the person's own audio and tracked
    landmarks (the dataset's training range); the checkpoint (the shared weights included) with the
    best mouth-opening r on the person's validation tail is kept.

    The person's 3-5 minutes are more data than the whole shared corpus; conditioning on the
    person's own audio is what makes RAD-NeRF / ER-NeRF / GeneFace++ sync well. A ``vae-flow``
    generator is copied unchanged (its postnet does the adaptation, GeneFace Sec. 3.2).

    Args:
        generator: shared generator bundle. dataset: the person's dataset. out: the adapted bundle
            (same format as the shared one, plus ``person_*`` metrics).
        preset: a key of :data:`FINETUNE_PRESETS`. cancel: an Event checked between evaluations.
        seed: the fine-tuning's window sampling and augmentation seed (:attr:`RegressionTrainConfig.seed`).
    Returns: ``out``.
    Raises: InvalidInput (bad preset, too short a clip), OutputExists, BundleCorrupt,
        FeatureMismatch (dataset features differ from the generator's), Cancelled.
    """
    import shutil

    from avatar.atomic import atomic_dir, check_output_dir
    from avatar.data.dataset import Dataset
    from avatar.motion.bundle import METRICS, read_json, save_module, write_json
    from avatar.motion.generator import GENERATOR_FILE, load_generator
    from avatar.audio import silence_features
    from avatar.runtime import cpu_threads

    if preset not in FINETUNE_PRESETS:
        raise InvalidInput(f"unknown fine-tuning preset {preset!r}; choose one of {', '.join(FINETUNE_PRESETS)}")
    generator, out = Path(generator), check_output_dir(out, overwrite)
    gen = load_generator(generator, device="cpu")
    ds = Dataset(dataset)
    gen.stats.check_features(np.asarray(ds.features[:2], np.float32), ds.feature_kind)
    metrics = dict(read_json(generator, METRICS, "retrain the generator"))
    with atomic_dir(out, overwrite=overwrite) as tmp, cpu_threads(1):
        for f in generator.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        if gen.model != "tcn":
            log.info("generator %s is %s: copied without per-person fine-tuning", generator, gen.model)
            return out
        net = gen.net.train()
        tcfg = replace(FINETUNE_PRESETS[preset], seed=int(seed))
        train = clips_from_datasets([ds.root], "train")
        val = clips_from_datasets([ds.root], "val")
        if len(val[0]) < 8:
            val = train
        tcfg = replace(tcfg, window=min(tcfg.window, len(train[0]) - len(train[0]) % 4))
        silence = silence_features(gen.feature_kind, gen.hubert_path) if tcfg.silence_prob > 0 else None
        shared = validate(net, val)

        def cb(frac, msg):
            if cancel is not None and cancel.is_set():
                from avatar.errors import Cancelled

                raise Cancelled("per-person audio2motion fine-tuning cancelled; rerun to resume")
            if callback:
                callback(frac, msg)

        t0 = time.perf_counter()
        m = fit(
            net,
            train,
            val,
            tcfg,
            silence,
            progress=progress,
            desc="audio2motion (person)",
            callback=cb,
            select_initial=True,
        )
        metrics.update(
            {
                "person_shared_val_open_r": shared["val_open_r"],
                "person_val_open_r": m["val_open_r"],
                "person_val_mouth_lmd": m["val_mouth_lmd"],
                "person_val_mean_shape_mouth_lmd": m["val_mean_shape_mouth_lmd"],
                "person_best_step": m["best_step"],
                "person_steps": tcfg.steps,
                "person_seconds": round(time.perf_counter() - t0, 1),
                "person_dataset": str(ds.root),
            }
        )
        save_module(net, tmp / GENERATOR_FILE)
        write_json(tmp, METRICS, metrics)
    log.info(
        "person audio2motion: validation-tail mouth r %.3f (shared model %.3f), checkpoint step %d",
        m["val_open_r"],
        shared["val_open_r"],
        m["best_step"],
    )
    return out
