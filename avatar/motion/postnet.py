"""Per-person postnet: domain adaptation of the shared generator's expression to one speaker.

GeneFace (Ye et al., ICLR 2023, Sec. 3.2 "domain adaptation"): a residual 1-D CNN refines the
generator's expression sequence (x + delta); it is trained semi-supervised with
    * a paired MSE on the person's own clip (generator(person audio) -> person's tracked landmarks),
    * an LSGAN frame discriminator (an MLP scoring single frames: the person's tracked expressions
      are "real", postnet outputs of the person's and the corpus' audio are "fake"),
    * the SyncNet loss, so refined mouths stay in sync with the (corpus and person) audio.
Peers make users hand-pick the checkpoint; here it is chosen on the validation tail (lowest mouth
LMD among checkpoints that keep >= 80 % of the generator's sync confidence). Divergence (NaN,
discriminator collapse, validation LMD blowing up) stops training; if no checkpoint beats the
identity map, :class:`TrainingDiverged` is raised instead of writing garbage.

Speech amplitude calibration (ours): the paired MSE pulls every model towards the conditional mean,
so the refined mouth opens about 0.65-0.75x as much as the real one on the person's unseen speech
(bench/RESULTS.md, issues 11 and 18) while its timing (Pearson r with the real opening) is right.
After training, one gain ``g`` per person is fitted on the *training* frames: the lower face (jaw +
mouth landmarks) is scaled about the person's predicted rest shape ``c`` (the mean refined
expression over the quietest 10 % of the training audio), ``y' = c + g (y - c)``, with ``g`` = real
/ refined std of the inner-lip opening, clipped to [1, ``amplitude_gain_max``]. A pointwise affine map:
Pearson r, silence and stream == batch identity are unchanged; only the size moves.
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
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from avatar.atomic import atomic_dir, check_output_dir
from avatar.config import from_dict, to_dict
from avatar.data.dataset import MOUTH, Dataset
from avatar.face.contracts import JAW, mouth_opening
from avatar.errors import BundleCorrupt, InvalidInput, TrainingDiverged
from avatar.motion.bundle import CONFIG, METRICS, STATS, load_module, read_json, save_module, write_json
from avatar.motion.generator import EXPR_DIM, Audio2Motion, load_generator
from avatar.motion.layers import leaky
from avatar.motion.syncnet import sync_confidence, sync_loss
from avatar.runtime import resolve_device

log = logging.getLogger(__name__)

POSTNET_FILE = "postnet.safetensors"
_HINT = "retrain it with `avatar train-postnet DATASET --generator DIR --out DIR`"


@dataclass
class PostnetConfig:
    """Architecture: residual CNN 204 -> channels -> 204 (GeneFace CNNPostNet: 128, 256, 128)."""

    channels: tuple[int, ...] = (128, 256, 128)
    kernel: int = 3
    disc_hidden: tuple[int, ...] = (128, 256, 256, 128)
    disc_dropout: float = 0.25
    future: int | None = None  # frames of generator output after a frame that its refinement reads (the
    # postnet's share of the streaming lookahead): -1 symmetric (radius each
    # side, GeneFace); n >= 0 the right side cut to n, the left widened to keep
    # the receptive field. None: follow the generator (training resolves it:
    # symmetric for a symmetric generator, 0 for one built with a limited future,
    # so an avatar onboarded on a low-latency generator stays low-latency)

    def paddings(self) -> list[tuple[int, int]]:
        """(left, right) zero padding of each convolution (see ``future``; None counts as symmetric)."""
        half = self.kernel // 2
        n = len(self.channels) + 1
        budget = n * half if self.future is None or self.future < 0 else int(self.future)
        out = []
        for _ in range(n):
            r = min(half, budget)
            budget -= r
            out.append((2 * half - r, r))
        return out


@dataclass
class TrainPostnetConfig:
    """A postnet training run (stored in the bundle). Loss weights: GeneFace uses mse 0.05 / adv 0.85 /
    sync 0.1 with hand-picked checkpoints; we weight the paired term more and select automatically."""

    preset: str = "cpu"
    postnet: PostnetConfig = field(default_factory=PostnetConfig)
    steps: int = 1500
    batch: int = 8
    window: int = 64
    lr: float = 1e-4
    lr_disc: float = 1e-4
    lambda_mse: float = 1.0
    lambda_adv: float = 0.1
    lambda_sync: float = 0.05
    eval_every: int = 100
    patience: int = 3  # evaluations of a divergence sign before stopping
    sync_keep: float = 0.8  # a checkpoint must keep this fraction of the generator's sync confidence
    temperature: float = 1.0  # generator sampling temperature of the training inputs
    seeds: tuple[int, ...] = (0, 1)
    seed: int = 0
    device: str = "auto"
    cpu_threads: int = 1  # see TrainGeneratorConfig.cpu_threads
    amplitude_gain_max: float = 2.0  # upper clip of the fitted speech-amplitude gain (1 = no calibration)


PRESETS: dict[str, TrainPostnetConfig] = {
    "smoke": TrainPostnetConfig(
        preset="smoke",
        postnet=PostnetConfig(channels=(32, 64, 32), disc_hidden=(32, 32)),
        steps=30,
        batch=4,
        window=32,
        eval_every=10,
        lr=1e-3,
        lr_disc=1e-3,
        seeds=(0,),
    ),
    "cpu": TrainPostnetConfig(preset="cpu", steps=1500, eval_every=100, lr=3e-4, lr_disc=1e-4),
    "gpu": TrainPostnetConfig(
        preset="gpu", steps=20000, batch=32, window=128, eval_every=500, lr=1e-4, seeds=(0, 1, 2, 3)
    ),
}


class CNNPostNet(nn.Module):
    """Residual 1-D CNN: ``x [B, T, 204] -> x + delta(x)`` (normalised expression). The last conv is
    zero-initialised, so an untrained postnet is the identity."""

    def __init__(self, cfg: PostnetConfig):
        super().__init__()
        self.cfg = cfg
        dims = (EXPR_DIM, *cfg.channels, EXPR_DIM)
        pads = cfg.paddings()
        # symmetric: the convolutions pad themselves (the original layout, bit-identical outputs);
        # a cut future: explicit (left, right) zero padding before each convolution
        self.symmetric = all(a == b for a, b in pads)
        self.pads = pads
        self.convs = nn.ModuleList(
            nn.Conv1d(a, b, cfg.kernel, padding=cfg.kernel // 2 if self.symmetric else 0)
            for a, b in zip(dims[:-1], dims[1:])
        )
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)
        self.left = sum(a for a, _ in pads)  # frames before / after a frame that its output reads
        self.right = sum(b for _, b in pads)
        self.radius = max(self.left, self.right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)
        for i, conv in enumerate(self.convs):
            h = conv(h if self.symmetric else F.pad(h, self.pads[i]))
            if i < len(self.convs) - 1:
                h = leaky(h)
        return x + h.transpose(1, 2)


class FrameDiscriminator(nn.Module):
    """Per-frame MLP discriminator (GeneFace MLPDiscriminator): ``[..., 204] -> [...]`` LSGAN score."""

    def __init__(self, cfg: PostnetConfig):
        super().__init__()
        dims = (EXPR_DIM, *cfg.disc_hidden)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2), nn.Dropout(cfg.disc_dropout)]
        layers.append(nn.Linear(dims[-1], 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[..., 0]


LOWER_FACE = np.array(JAW + MOUTH)  # landmarks the speech-amplitude gain scales (jaw line + mouth)


class Postnet:
    """Inference wrapper: ``apply(expr [N, 68, 3]) -> [N, 68, 3]`` (canonical units), any length.

    ``gain`` / ``rest`` (float, float32 [68, 3]): the person's speech-amplitude calibration (module
    docstring); ``gain=1`` is the plain CNN output.
    """

    def __init__(
        self,
        net: CNNPostNet,
        expr_mean,
        expr_std,
        device=None,
        metrics: dict | None = None,
        gain: float = 1.0,
        rest: np.ndarray | None = None,
    ):
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.em = torch.as_tensor(np.asarray(expr_mean, np.float32), device=self.device)
        self.es = torch.as_tensor(np.asarray(expr_std, np.float32), device=self.device)
        self.metrics = metrics or {}
        self.gain = float(gain)
        self.rest = np.zeros((68, 3), np.float32) if rest is None else np.asarray(rest, np.float32).reshape(68, 3)

    @property
    def future_frames(self) -> int:
        """Frames of generator output after a frame that its refined output depends on."""
        return int(self.net.right)

    @torch.no_grad()
    def apply(self, expr: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Refine an expression sequence.

        Args: expr float32 [N, 68, 3] generator output (``lm3d - lm3d_mean``, canonical units, 25 fps).
        Returns: float32 [N, 68, 3]. Chunks of ``chunk`` frames with the CNN's receptive field as
        context give the single-pass result.
        Raises: InvalidInput on a wrong shape or NaN.
        """
        expr = np.asarray(expr, dtype=np.float32)
        if expr.ndim != 3 or expr.shape[1:] != (68, 3):
            raise InvalidInput(f"postnet input must be [N, 68, 3], got {expr.shape}")
        if not np.isfinite(expr).all():
            raise InvalidInput("postnet input contains NaN/inf")
        n = expr.shape[0]
        out = np.empty_like(expr)
        x = (torch.from_numpy(expr.reshape(n, EXPR_DIM)).to(self.device) - self.em) / self.es
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            a0, b0 = max(0, a - self.net.left), min(n, b + self.net.right)
            y = self.net(x[a0:b0][None])[0] * self.es + self.em
            out[a:b] = y[a - a0 : b - a0].reshape(-1, 68, 3).cpu().numpy()
        if self.gain != 1.0:
            c = self.rest[LOWER_FACE]
            out[:, LOWER_FACE] = c + np.float32(self.gain) * (out[:, LOWER_FACE] - c)
        return out


def fit_amplitude_gain(
    refined: np.ndarray,
    real: np.ndarray,
    energy: np.ndarray,
    lm3d_mean: np.ndarray,
    frames: range,
    gain_max: float = 2.0,
) -> tuple[float, np.ndarray, dict]:
    """Fit the speech-amplitude gain of a person's refined expressions (module docstring).

    Args:
        refined: float32 [N, 68, 3] postnet output for the person's clip (canonical units, 25 fps).
        real: float32 [N, 68, 3] the tracked expressions (``lm3d - lm3d_mean``) of the same frames.
        energy: float32 [N] audio RMS energy per frame (:func:`avatar.audio.audio_energy`).
        lm3d_mean: float32 [68, 3] the person's mean landmarks.
        frames: the frames to fit on (the training range; never the validation tail).
        gain_max: upper clip of the gain (>= 1; 1 disables the calibration).
    Returns:
        (gain, rest float32 [68, 3], {"amplitude_gain", "train_open_std_ratio"}).
    Raises:
        InvalidInput: fewer than 16 frames, mismatched shapes or ``gain_max < 1``.
    """
    if gain_max < 1.0:
        raise InvalidInput(f"amplitude_gain_max must be >= 1, got {gain_max}")
    if refined.shape != real.shape or len(frames) < 16 or frames.stop > refined.shape[0]:
        raise InvalidInput(
            f"amplitude calibration needs >= 16 frames of matching [N, 68, 3] arrays, "
            f"got {refined.shape} / {real.shape} over {frames}"
        )
    sl = slice(frames.start, frames.stop)
    mean = np.asarray(lm3d_mean, np.float32)[None]
    std_pred = float(mouth_opening(refined[sl] + mean).std())
    std_real = float(mouth_opening(real[sl] + mean).std())
    ratio = std_pred / max(std_real, 1e-12)
    gain = float(np.clip(std_real / max(std_pred, 1e-12), 1.0, gain_max))
    e = np.asarray(energy, np.float32)[sl]
    quiet = e <= np.quantile(e, 0.1)
    rest = refined[sl][quiet].mean(0).astype(np.float32)
    return gain, rest, {"amplitude_gain": gain, "train_open_std_ratio": ratio}


def follow_generator_future(gen: Audio2Motion) -> int:
    """``PostnetConfig.future`` for ``future=None``: -1 (symmetric) for a generator that sees its symmetric
    receptive field, 0 (causal: the refinement of a frame reads no later generator frame) for a
    generator built with a limited ``future`` (``avatar train-generator --future N``)."""
    return 0 if getattr(gen.config, "future", -1) >= 0 else -1


def load_postnet(root: str | Path, device=None) -> Postnet:
    """Load a postnet bundle (``postnet.safetensors``, ``config.json``, ``stats.json``, ``metrics.json``).

    Raises: BundleCorrupt naming the missing/corrupt file.
    """
    root = Path(root)
    if not root.is_dir():
        raise BundleCorrupt(f"postnet bundle {root} does not exist; {_HINT}")
    cfg = read_json(root, CONFIG, _HINT)
    stats = read_json(root, STATS, _HINT)
    metrics = read_json(root, METRICS, _HINT)
    try:
        pcfg = from_dict(PostnetConfig, cfg["postnet"])
        em, es = stats["expr_mean"], stats["expr_std"]
    except (KeyError, InvalidInput, TypeError) as e:
        raise BundleCorrupt(f"{root}: config.json/stats.json are not a postnet's ({e}); {_HINT}") from e
    net = load_module(CNNPostNet(pcfg), root / POSTNET_FILE, _HINT)
    gain = float(stats.get("amplitude_gain", 1.0))  # bundles from before the calibration: 1
    rest = stats.get("amplitude_rest")
    if not (math.isfinite(gain) and gain > 0) or (rest is not None and np.asarray(rest).size != 204):
        raise BundleCorrupt(f"{root}: stats.json has a bad amplitude calibration; {_HINT}")
    return Postnet(net, em, es, device, metrics, gain=gain, rest=rest)


def mouth_lmd(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> float:
    """Mean Euclidean distance of the 20 mouth landmarks, canonical units."""
    pred, gt = torch.as_tensor(pred), torch.as_tensor(gt)
    return float((pred[:, MOUTH] - gt[:, MOUTH]).norm(dim=-1).mean())


def _sequence_sync(gen: Audio2Motion, feats_norm: torch.Tensor, expr: np.ndarray) -> float:
    return sync_confidence(gen.syncnet, feats_norm, torch.from_numpy(expr))["confidence"]


def train_postnet(
    dataset: str | Path,
    generator: str | Path,
    out: str | Path,
    preset: str | TrainPostnetConfig = "cpu",
    corpus_cache: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callback: Callable[[float, str], None] | None = None,
    cancel=None,
    seed: int | None = None,
) -> Path:
    """Train a person's postnet and write its bundle atomically.

    Args:
        dataset: the person's dataset (``avatar preprocess`` output); its validation tail selects
            the checkpoint. generator: a generator bundle directory.
        out: postnet bundle directory. preset: "smoke", "cpu", "gpu" or a config.
        corpus_cache: a directory of corpus datasets (e.g. ``GENERATOR/cache``) for the unpaired
            adversarial + sync terms; default: ``generator/cache`` when it exists, else none.
        callback: ``callback(fraction, message)`` progress hook. cancel: a ``threading.Event``.
        seed: replaces the preset's ``seed`` (initialisation, window sampling) and shifts its
            generator sampling ``seeds`` by as much (``(0, 1)`` with seed 3: ``(3, 4)``); None keeps them.
    Returns: ``out``.
    Raises:
        OutputExists, FeatureMismatch (dataset features differ from the generator's), InvalidInput,
        TrainingDiverged (NaN, or divergence before any checkpoint beat the identity map).
    """
    cfg = PRESETS[preset] if isinstance(preset, str) and preset in PRESETS else preset
    if not isinstance(cfg, TrainPostnetConfig):
        raise InvalidInput(f"unknown postnet preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if seed is not None:
        cfg = replace(cfg, seed=int(seed), seeds=tuple(int(seed) + s - cfg.seed for s in cfg.seeds))
    from avatar.runtime import cpu_threads

    device = resolve_device(cfg.device)
    with cpu_threads(cfg.cpu_threads if device.type == "cpu" else 0):
        return _train(dataset, generator, out, cfg, device, corpus_cache, overwrite, progress, callback, cancel)


def _train(
    dataset, generator, out, cfg: TrainPostnetConfig, device, corpus_cache, overwrite, progress, callback, cancel
) -> Path:
    out = check_output_dir(out, overwrite)
    t0 = time.perf_counter()
    gen = load_generator(generator, device=device)
    if cfg.postnet.future is None:  # follow the generator: a low-latency generator gets a causal postnet
        cfg = replace(cfg, postnet=replace(cfg.postnet, future=follow_generator_future(gen)))
    ds = Dataset(dataset)
    gen.stats.check_features(np.asarray(ds.features[:2]), ds.feature_kind)
    tr, va = ds.train_range, ds.val_range
    if len(tr) < cfg.window or len(va) < 16:
        raise InvalidInput(
            f"{dataset}: needs >= {cfg.window} training and 16 validation frames "
            f"(has {len(tr)} / {len(va)}); give a longer clip"
        )
    feats = np.array(ds.features, dtype=np.float32)
    gt = np.asarray(ds.lm3d, dtype=np.float32) - np.asarray(ds.lm3d_mean, dtype=np.float32)
    preds = np.stack([gen.predict(feats, cfg.temperature, seed=s) for s in cfg.seeds])  # [S, N, 68, 3]
    corpus_preds = _corpus_predictions(gen, generator, corpus_cache, cfg)
    fn = gen.normalize_features(torch.from_numpy(feats).to(device))
    val_feats = fn[2 * va.start : 2 * va.stop]

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net, disc = CNNPostNet(cfg.postnet).to(device), FrameDiscriminator(cfg.postnet).to(device)
    opt_g = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    opt_d = torch.optim.RMSprop(disc.parameters(), lr=cfg.lr_disc)
    em, es = gen._em, gen._es
    norm = lambda a: (torch.from_numpy(np.ascontiguousarray(a)).to(device).flatten(-2) - em) / es  # noqa: E731
    canon = lambda y: (y * es + em).reshape(*y.shape[:-1], 68, 3)  # noqa: E731
    P, G = norm(preds), norm(gt)
    C = [(norm(e), f) for e, f in corpus_preds]
    post = Postnet(net, em.cpu(), es.cpu(), device)

    def evaluate() -> dict:
        net.eval()
        y = post.apply(preds[0, va.start : va.stop])
        net.train()
        return {
            "val_mouth_lmd": mouth_lmd(y, gt[va.start : va.stop]),
            "val_sync_conf": _sequence_sync(gen, val_feats, y),
        }

    base = evaluate()
    log.info(
        "generator only on the validation tail: mouth LMD %.4f, sync conf %.3f",
        base["val_mouth_lmd"],
        base["val_sync_conf"],
    )
    best = dict(base, step=0)
    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    history, warn, diverged = [dict(base, step=0)], 0, None
    bar = tqdm(range(1, cfg.steps + 1), desc="postnet", disable=not progress, dynamic_ncols=True)
    W = cfg.window
    for step in bar:
        if cancel is not None and cancel.is_set():
            from avatar.errors import Cancelled

            raise Cancelled("postnet training cancelled; rerun the same command to resume")
        starts = rng.integers(tr.start, tr.stop - W + 1, cfg.batch)
        si = rng.integers(0, P.shape[0], cfg.batch)
        x = torch.stack([P[s, a : a + W] for s, a in zip(si, starts)])
        y = torch.stack([G[a : a + W] for a in starts])
        f = torch.stack([fn[2 * a : 2 * a + 2 * W] for a in starts])
        xs, fs = [x], [f]
        if C:
            for _ in range(cfg.batch):
                ci = int(rng.integers(0, len(C)))
                cp, cf = C[ci]
                if cp.shape[0] < W:
                    continue
                a = int(rng.integers(0, cp.shape[0] - W + 1))
                xs.append(cp[a : a + W][None])
                fs.append(cf[2 * a : 2 * a + 2 * W][None])
        xall, fall = torch.cat(xs), torch.cat(fs)
        yall = net(xall)
        # discriminator (LSGAN): person's real frames -> 1, refined frames -> 0
        d_real = disc(y.reshape(-1, EXPR_DIM))
        d_fake = disc(yall.detach().reshape(-1, EXPR_DIM))
        loss_d = ((d_real - 1) ** 2).mean() + (d_fake**2).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # postnet
        mse = F.mse_loss(yall[: cfg.batch], y)
        adv = ((disc(yall.reshape(-1, EXPR_DIM)) - 1) ** 2).mean()
        sync = sync_loss(gen.syncnet, fall, canon(yall))
        loss = cfg.lambda_mse * mse + cfg.lambda_adv * adv + cfg.lambda_sync * sync
        if not (torch.isfinite(loss) and torch.isfinite(loss_d)):
            raise TrainingDiverged(
                f"postnet training produced NaN/inf at step {step} (loss {loss.item()}, D loss {loss_d.item()}); "
                f"lower the learning rates of the preset"
            )
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = dict(
                evaluate(),
                step=step,
                loss_d=float(loss_d.detach()),
                mse=float(mse.detach()),
                adv=float(adv.detach()),
                sync=float(sync.detach()),
                d_real=float(d_real.mean()),
                d_fake=float(d_fake.mean()),
            )
            history.append(ev)
            bar.set_postfix(lmd=f"{ev['val_mouth_lmd']:.4f}", d=f"{ev['loss_d']:.3f}")
            ok_sync = (
                not math.isfinite(base["val_sync_conf"]) or ev["val_sync_conf"] >= cfg.sync_keep * base["val_sync_conf"]
            )
            if ok_sync and ev["val_mouth_lmd"] < best["val_mouth_lmd"]:
                best = ev
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            collapse = ev["loss_d"] < 1e-3
            blowup = ev["val_mouth_lmd"] > 2.0 * best["val_mouth_lmd"]
            warn = warn + 1 if (collapse or blowup) else 0
            if callback:
                callback(step / cfg.steps, f"postnet step {step}, val mouth LMD {ev['val_mouth_lmd']:.4f}")
            if warn >= cfg.patience:
                diverged = "discriminator collapse (D loss -> 0)" if collapse else "validation mouth LMD blew up"
                log.warning(
                    "postnet training diverged at step %d: %s; keeping the best checkpoint (step %d)",
                    step,
                    diverged,
                    best["step"],
                )
                break
    if diverged and best["step"] == 0:
        raise TrainingDiverged(
            f"postnet training diverged ({diverged}) before any checkpoint beat the generator alone "
            f"(val mouth LMD {base['val_mouth_lmd']:.4f}); lower lambda_adv / learning rates or use "
            f"LLE projection (lle_blend) instead of the postnet"
        )
    net.load_state_dict(best_state)
    from avatar.audio import audio_energy

    refined = post.apply(gen.predict(feats, temperature=1.0, seed=0))  # the render path's defaults
    gain, rest, amp = fit_amplitude_gain(
        refined,
        gt,
        audio_energy(np.asarray(ds.audio, np.float32), ds.n_frames),
        ds.lm3d_mean,
        tr,
        cfg.amplitude_gain_max,
    )
    calibrated = Postnet(net, em.cpu(), es.cpu(), device, gain=gain, rest=rest).apply(refined[va.start : va.stop])
    amp["val_mouth_lmd_calibrated"] = mouth_lmd(calibrated, gt[va.start : va.stop])
    log.info(
        "speech amplitude: refined/real opening std %.2f on the training frames -> gain %.2f "
        "(val mouth LMD %.4f -> %.4f)",
        amp["train_open_std_ratio"],
        gain,
        best["val_mouth_lmd"],
        amp["val_mouth_lmd_calibrated"],
    )
    metrics = {
        "generator_val_mouth_lmd": base["val_mouth_lmd"],
        "generator_val_sync_conf": base["val_sync_conf"],
        "val_mouth_lmd": best["val_mouth_lmd"],
        "val_sync_conf": best["val_sync_conf"],
        "best_step": best["step"],
        "diverged": diverged,
        "history": history,
        "corpus_clips": len(C),
        **amp,
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_module(net, tmp / POSTNET_FILE)
        write_json(
            tmp,
            CONFIG,
            {
                "postnet": to_dict(cfg.postnet),
                "train": to_dict(cfg),
                "dataset": str(dataset),
                "generator": str(generator),
            },
        )
        write_json(
            tmp,
            STATS,
            {
                "expr_mean": gen.stats.expr_mean,
                "expr_std": gen.stats.expr_std,
                "lm3d_mean": np.asarray(ds.lm3d_mean, np.float32).ravel().tolist(),
                "amplitude_gain": gain,
                "amplitude_rest": rest.ravel().tolist(),
            },
        )
        write_json(tmp, METRICS, metrics)
    log.info(
        "postnet written to %s: val mouth LMD %.4f -> %.4f (step %d)",
        out,
        base["val_mouth_lmd"],
        best["val_mouth_lmd"],
        best["step"],
    )
    return out


def _corpus_predictions(gen: Audio2Motion, generator: str | Path, corpus_cache, cfg: TrainPostnetConfig) -> list:
    """Generator outputs on the corpus clips (unpaired set): list of (expr [N, 68, 3], features [2N, D])."""
    root = Path(corpus_cache) if corpus_cache else Path(generator) / "cache"
    if not root.is_dir():
        if corpus_cache:
            raise InvalidInput(f"--corpus-cache {root} is not a directory of datasets")
        return []
    outs = []
    for d in sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()):
        try:
            ds = Dataset(d)
            gen.stats.check_features(np.asarray(ds.features[:2]), ds.feature_kind)
        except Exception as e:  # a broken cache entry must not stop postnet training
            log.warning("corpus clip %s left out: %s", d, e)
            continue
        f = np.array(ds.features, dtype=np.float32)
        if f.shape[0] < 2 * cfg.window:
            continue
        outs.append((gen.predict(f, cfg.temperature, seed=cfg.seed), f))
    log.info("postnet: %d corpus clips for the unpaired terms", len(outs))
    return [(e, gen.normalize_features(torch.from_numpy(f).to(gen.device))) for e, f in outs]
