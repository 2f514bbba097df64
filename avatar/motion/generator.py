"""audio2motion: GeneFace's "VAE with flow prior" (Ye et al., ICLR 2023, Sec. 3.1 and App. B).

Audio features at 50 Hz -> a 25 Hz audio condition -> a conditional VAE (FVAE) over the
identity-free 3-D landmark expression ``lm3d - lm3d_mean`` (68 x 3, canonical frame, 25 fps),
whose prior is a normalising flow conditioned on the audio. Inference samples
``u ~ N(0, temperature^2)``, maps it through the inverse flow to the latent ``z`` (6.25 Hz,
stride 4) and decodes.

Shapes (B batch, T video frames, T multiple of ``stride``):
    features  float32 [B, 2T, D]   normalised 50 Hz audio features
    expr      float32 [B, T, 204]  normalised expression (flattened 68 x 3)
    z, noise  float32 [B, latent, T / stride]
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from avatar.config import from_dict, to_dict
from avatar.errors import BundleCorrupt, ClipTooShort, InvalidInput
from avatar.motion.bundle import CONFIG, STATS, MotionStats, load_module, read_json
from avatar.motion.layers import WN, ChannelNorm, FlowPrior, gaussian_log_prob

log = logging.getLogger(__name__)

EXPR_DIM = 68 * 3
GENERATOR_FILE = "generator.safetensors"
SYNCNET_FILE = "syncnet.safetensors"
NOISE_BLOCK = 64  # latent positions per seeded noise block
_HINT = "retrain it with `avatar train-generator CORPUS --out DIR`"


@dataclass
class GeneratorConfig:
    """Architecture of :class:`VAEFlowGenerator` (defaults: GeneFace ``lm3d_vae_sync``)."""

    feature_dim: int = 80
    cond_dim: int = 64
    hidden: int = 256
    latent: int = 16
    kernel: int = 5
    enc_layers: int = 8
    dec_layers: int = 4
    stride: int = 4
    flow_blocks: int = 4
    flow_hidden: int = 64
    flow_layers: int = 4
    flow_kernel: int = 3
    dropout: float = 0.0

    def context_frames(self) -> int:
        """Video frames of context each side that cover the inference receptive field (chunking)."""
        flow_r = self.flow_blocks * self.flow_layers * (self.flow_kernel // 2)  # latent frames
        dec_r = self.dec_layers * (self.kernel // 2) + 4  # video frames (decoder WN + audio encoder)
        return self.stride * (flow_r + 1 + math.ceil(dec_r / self.stride) + 1)


class AudioEncoder(nn.Module):
    """50 Hz features [B, 2T, D] -> 25 Hz condition [B, cond_dim, T] (Conv1d stride 2 + Conv1d)."""

    def __init__(self, feature_dim: int, cond_dim: int):
        super().__init__()
        self.down = nn.Conv1d(feature_dim, cond_dim, kernel_size=4, stride=2, padding=1)
        self.norm = ChannelNorm(cond_dim)
        self.out = nn.Conv1d(cond_dim, cond_dim, kernel_size=3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.norm(self.down(features.transpose(1, 2)))))


class VAEFlowGenerator(nn.Module):
    """The audio2motion network. See module docstring for shapes."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        s = cfg.stride
        self.audio_encoder = AudioEncoder(cfg.feature_dim, cfg.cond_dim)
        self.enc_pre = nn.Conv1d(EXPR_DIM, cfg.hidden, kernel_size=s, stride=s)
        self.enc_wn = WN(cfg.hidden, cfg.kernel, cfg.enc_layers, cfg.cond_dim, cfg.dropout)
        self.enc_proj = nn.Conv1d(cfg.hidden, 2 * cfg.latent, 1)
        self.dec_pre = nn.ConvTranspose1d(cfg.latent, cfg.hidden, kernel_size=s, stride=s)
        self.dec_wn = WN(cfg.hidden, cfg.kernel, cfg.dec_layers, cfg.cond_dim, cfg.dropout)
        self.dec_proj = nn.Conv1d(cfg.hidden, EXPR_DIM, 1)
        self.prior = FlowPrior(
            cfg.latent, cfg.flow_hidden, cfg.flow_kernel, cfg.flow_layers, cfg.flow_blocks, cfg.cond_dim
        )

    def condition(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, 2T, D] -> (c [B, cond, T], c_latent [B, cond, T/stride])."""
        c = self.audio_encoder(features)
        return c, F.avg_pool1d(c, self.cfg.stride)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """z [B, latent, T/stride], c [B, cond, T] -> expr [B, T, 204]."""
        return self.dec_proj(self.dec_wn(self.dec_pre(z), c)).transpose(1, 2)

    def forward(self, features: torch.Tensor, expr: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training pass (posterior sample). Returns ``pred [B, T, 204]`` and ``kl`` (scalar, nats
        per latent element): Monte-Carlo ``log q(z|x,c) - log p_flow(z|c)`` (GeneFace Eq. 2)."""
        T = expr.shape[1]
        if T % self.cfg.stride or features.shape[1] != 2 * T:
            raise ValueError(f"need T multiple of {self.cfg.stride} and 2T features; got T={T}, F={features.shape[1]}")
        c, c_lat = self.condition(features)
        h = self.enc_wn(self.enc_pre(expr.transpose(1, 2)), c_lat)
        m, logs = self.enc_proj(h).chunk(2, dim=1)
        logs = logs.clamp(-7.0, 4.0)
        z = m + torch.randn_like(m) * torch.exp(logs)
        kl = (gaussian_log_prob(z, m, logs) - self.prior.log_prob(z, c_lat)).mean() / z[0].numel()
        return {"pred": self.decode(z, c), "kl": kl, "z": z}

    @torch.no_grad()
    def infer(self, features: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """features [B, 2T, D], noise [B, latent, T/stride] (already scaled by the temperature)
        -> expr [B, T, 204] (normalised)."""
        c, c_lat = self.condition(features)
        z = self.prior.reverse(noise, c_lat)
        return self.decode(z, c)


class Audio2Motion:
    """Inference wrapper: a trained generator plus its normalisation statistics (and SyncNet).

    Attributes:
        feature_kind: "mel" or "hubert", the audio features the generator expects.
        config: :class:`GeneratorConfig`; stats: :class:`MotionStats`; syncnet: the landmark
            SyncNet trained with it (or None).
    """

    def __init__(
        self, net: VAEFlowGenerator, stats: MotionStats, syncnet=None, device: str | torch.device | None = None
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.to(self.device).eval()
        self.config = net.cfg
        self.stats = stats
        self.syncnet = syncnet.to(self.device).eval() if syncnet is not None else None
        self._fm = torch.tensor(stats.feature_mean, dtype=torch.float32, device=self.device)
        self._fs = torch.tensor(stats.feature_std, dtype=torch.float32, device=self.device)
        self._em = torch.tensor(stats.expr_mean, dtype=torch.float32, device=self.device)
        self._es = torch.tensor(stats.expr_std, dtype=torch.float32, device=self.device)

    @property
    def feature_kind(self) -> str:
        return self.stats.feature_kind

    def normalize_features(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self._fm) / self._fs

    def normalize_expr(self, expr: torch.Tensor) -> torch.Tensor:
        return (expr - self._em) / self._es

    def denormalize_expr(self, expr: torch.Tensor) -> torch.Tensor:
        return expr * self._es + self._em

    @property
    def hubert_path(self) -> str | None:
        """Local HuBERT directory the generator was trained with (None for mel features)."""
        return self.stats.extra.get("hubert_path")

    @property
    def context_frames(self) -> int:
        """Video frames of audio context each side that fully determine a frame's output."""
        return self.config.context_frames()

    def prior_noise(self, seed: int, lat0: int, lat1: int, temperature: float) -> torch.Tensor:
        """Prior noise u for absolute latent positions [lat0, lat1) (may be negative), ``[1, latent, n]``.

        The noise of a position depends only on (seed, position): drawn in blocks of
        ``NOISE_BLOCK`` positions from a generator seeded with (seed, block index), so any window of
        a sequence sees the same noise as the whole sequence (chunked / streamed == single pass).
        """
        b0, b1 = lat0 // NOISE_BLOCK, -(-lat1 // NOISE_BLOCK)
        parts = []
        for blk in range(b0, b1):
            g = torch.Generator().manual_seed((int(seed) * 1_000_003 + blk) % (2**63))
            parts.append(torch.randn((self.config.latent, NOISE_BLOCK), generator=g))
        u = torch.cat(parts, dim=1)[:, lat0 - b0 * NOISE_BLOCK : lat1 - b0 * NOISE_BLOCK]
        return (u * float(temperature))[None]

    def predict(
        self,
        features: np.ndarray,
        temperature: float = 1.0,
        seed: int = 0,
        feature_kind: str | None = None,
        start_frame: int = 0,
        chunk_frames: int = 1000,
    ) -> np.ndarray:
        """Audio features -> expression landmarks, any length, bounded memory.

        Args:
            features: float32 [F, D] un-normalised audio features at 50 Hz.
            temperature: scale of the prior noise (0 = the flow's mode given the audio; 1 = as trained).
                Regression models (``model == "tcn"``) are deterministic and ignore it and ``seed``.
            seed: seeds the prior noise; same inputs + seed -> same output.
            feature_kind: if given, checked against :attr:`feature_kind`.
            start_frame: absolute video-frame index of ``features[0:2]`` (may be negative). The latent
                grid (stride 4) and the prior noise are anchored at absolute frame 0, so predicting a
                window of a longer sequence with enough context reproduces the whole-sequence result.
            chunk_frames: video frames per chunk. Each chunk runs with :attr:`context_frames` of real
                context on each side and shares the position-indexed prior noise, so the result equals
                a single pass (up to float rounding) while memory stays bounded.
        Returns:
            float32 [F // 2, 68, 3] expression (``lm3d - lm3d_mean``, canonical units) at 25 fps.
        Raises:
            FeatureMismatch: wrong feature kind or dimension. ClipTooShort: fewer than 2 feature
            frames (40 ms). InvalidInput: NaN/inf features, negative temperature.
        """
        features = np.asarray(features, dtype=np.float32)
        self.stats.check_features(features, feature_kind)
        if temperature < 0 or not math.isfinite(temperature):
            raise InvalidInput(f"temperature must be a finite number >= 0, got {temperature}")
        n = features.shape[0] // 2
        if n < 1:
            raise ClipTooShort(
                f"audio gives {features.shape[0]} feature frames; at least 2 (40 ms of audio) are needed"
            )
        if not self.stochastic:
            return self._predict_regression(features[: 2 * n], int(start_frame), int(chunk_frames))
        s = self.config.stride
        start_frame = int(start_frame)
        lead = start_frame % s  # frames before start_frame in its latent cell
        lat_first = (start_frame - lead) // s  # absolute latent index of the first cell
        total = lead + n
        lat = -(-total // s)
        # pad to whole latent cells by repeating the edge feature frames
        feats = np.concatenate(
            [
                np.repeat(features[:1], 2 * lead, axis=0),
                features[: 2 * n],
                np.repeat(features[2 * n - 1 : 2 * n], 2 * (lat * s - total), axis=0),
            ],
            axis=0,
        )
        chunk_lat = max(1, int(chunk_frames) // s)
        ctx_lat = self.config.context_frames() // s
        out = np.empty((lat * s, EXPR_DIM), dtype=np.float32)
        for a in range(0, lat, chunk_lat):
            b = min(lat, a + chunk_lat)
            a0, b0 = max(0, a - ctx_lat), min(lat, b + ctx_lat)
            ft = torch.from_numpy(np.ascontiguousarray(feats[2 * s * a0 : 2 * s * b0])).to(self.device)
            noise = self.prior_noise(seed, lat_first + a0, lat_first + b0, temperature).to(self.device)
            y = self.net.infer(self.normalize_features(ft)[None], noise)[0]
            out[s * a : s * b] = self.denormalize_expr(y)[s * (a - a0) : s * (b - a0)].cpu().numpy()
        return out[lead : lead + n].reshape(n, 68, 3)

    def _predict_regression(self, features: np.ndarray, start_frame: int, chunk_frames: int) -> np.ndarray:
        """Deterministic models (:class:`avatar.motion.regression.TCNGenerator`): the causal input
        transform over the whole array (absolute positions from ``start_frame``), then the net in
        chunks with :attr:`context_frames` of real context each side. float32 [n, 68, 3]."""
        from avatar.motion.tcn import transform_features

        n = features.shape[0] // 2
        x = torch.from_numpy(transform_features(features, self.config, start=2 * start_frame)).to(self.device)
        x = self.net.normalize_inputs(x)
        ctx = self.context_frames
        step = max(1, int(chunk_frames))
        out = np.empty((n, EXPR_DIM), dtype=np.float32)
        for a in range(0, n, step):
            b = min(n, a + step)
            a0, b0 = max(0, a - ctx), min(n, b + ctx)
            y = self.net.infer(x[2 * a0 : 2 * b0][None])[0]
            out[a:b] = y[a - a0 : b - a0].cpu().numpy()
        return out.reshape(n, 68, 3)

    @property
    def future_frames(self) -> int:
        """Video frames after a frame whose audio features its output depends on (its share of the
        streaming lookahead): the TCN's right receptive field (``RegressionConfig.future_frames``, cut by
        ``future``), or the VAE + flow's context (:attr:`context_frames`, symmetric)."""
        cfg = self.config
        return int(cfg.future_frames()) if hasattr(cfg, "future_frames") else int(cfg.context_frames())

    @property
    def history_frames(self) -> int:
        """Video frames of past audio the input transform of a frame looks at (0 for vae-flow)."""
        return self.config.history_frames() if hasattr(self.config, "history_frames") else 0

    @property
    def stochastic(self) -> bool:
        """True for the VAE + flow generator (temperature and seed matter); False for regression models."""
        return bool(getattr(self.net, "stochastic", True))

    @property
    def model(self) -> str:
        """The audio2motion model kind: "vae-flow" (GeneFace) or "tcn" (:mod:`avatar.motion.regression`)."""
        return getattr(self.config, "model", "vae-flow")


def load_generator(root: str | Path, device: str | torch.device | None = None) -> Audio2Motion:
    """Load a generator bundle written by ``avatar train-generator``.

    Files: ``config.json`` ({"generator": GeneratorConfig, "syncnet": SyncNetConfig, ...}),
    ``stats.json`` (:class:`MotionStats`), ``generator.safetensors``, ``syncnet.safetensors``.

    Raises:
        BundleCorrupt: a file is missing or unreadable (the message names it).
    """
    from avatar.motion.syncnet import LandmarkSyncNet, SyncNetConfig

    root = Path(root)
    if not root.is_dir():
        raise BundleCorrupt(f"generator bundle {root} does not exist; {_HINT}")
    cfg = read_json(root, CONFIG, _HINT)
    stats = MotionStats.from_dict(read_json(root, STATS, _HINT))
    try:
        gdict = dict(cfg["generator"])
        if gdict.get("model", "vae-flow") == "tcn":
            from avatar.motion.tcn import RegressionConfig, TCNGenerator

            gcfg, make = from_dict(RegressionConfig, gdict), TCNGenerator
        else:
            gdict.pop("model", None)
            gcfg, make = from_dict(GeneratorConfig, gdict), VAEFlowGenerator
        scfg = from_dict(SyncNetConfig, cfg["syncnet"])
    except (KeyError, InvalidInput, TypeError) as e:
        raise BundleCorrupt(f"{root / CONFIG} is not a generator config ({e}); {_HINT}") from e
    net = load_module(make(gcfg), root / GENERATOR_FILE, _HINT)
    sync = load_module(LandmarkSyncNet(scfg), root / SYNCNET_FILE, _HINT)
    return Audio2Motion(net, stats, sync, device)


def generator_config_dict(gcfg: GeneratorConfig, scfg, train_cfg=None) -> dict:
    """The ``config.json`` content of a generator bundle."""
    d = {"generator": to_dict(gcfg), "syncnet": to_dict(scfg)}
    if train_cfg is not None:
        d["train"] = to_dict(train_cfg)
    return d
