"""The TCN audio2motion model itself: its config, its input transform and the network.

Kept apart from the fitting code (:mod:`avatar.motion.regression`) so that loading a generator
(:func:`avatar.motion.generator.load_generator`) needs only this module: the import graph stays
one-way (generator -> tcn; regression -> generator, metrics, tcn). The design and why it exists are
described in :mod:`avatar.motion.regression` and ``docs/MOTION.md``.

Tensor shapes: features float32 [F, D] at 50 Hz (F = 2T), expression float32 [T, 204] at 25 fps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from avatar.motion.layers import ChannelNorm

EXPR_DIM = 68 * 3
ENERGY_FLOOR = -4.0  # relative log10 energy of silence (40 dB below the window's peak)
ENERGY_REF_MIN = -1.5  # log10 of the summed mel power below which a window's peak counts as silence


@dataclass
class RegressionConfig:
    """Architecture + input transform of :class:`TCNGenerator` (stored in the bundle's config.json)."""

    model: str = "tcn"
    feature_dim: int = 80  # raw feature dimension (80 log-mel bins, or HuBERT's)
    cmn: bool = True  # subtract the causal sliding mean per bin (else: raw features, normalised
    # only by the corpus statistics)
    energy: bool = True  # append the relative log-energy channel (log-mel features only)
    cmn_window: int = 100  # feature frames (2 s) of the causal sliding mean / energy peak
    hidden: int = 128
    kernel: int = 3
    dilations: tuple[int, ...] = (1, 2, 4, 4)
    dropout: float = 0.2
    n_basis: int = 16  # PCA components of the expression predicted
    future: int = -1  # video frames of future audio a frame may see (lookahead for streaming);
    # -1: symmetric, receptive_frames() each side

    def paddings(self) -> list[tuple[int, int]]:
        """(left, right) zero padding of each dilated convolution: symmetric, or with the right
        (future) side cut to the ``future`` budget (the stride-2 input convolution takes one frame of it,
        the first blocks the rest) and the left side widened to keep the length."""
        half = self.kernel // 2
        budget = self.receptive_frames() if self.future < 0 else max(0, self.future - 1)
        out = []
        for d in self.dilations:
            r = min(d * half, budget)
            budget -= r
            out.append((2 * d * half - r, r))
        return out

    def future_frames(self) -> int:
        """Video frames of audio after a frame that its output depends on (the streaming lookahead)."""
        return 1 + sum(r for _, r in self.paddings())

    @property
    def input_dim(self) -> int:
        return self.feature_dim + (1 if self.energy else 0)

    def receptive_frames(self) -> int:
        """Video frames of audio each side that a frame's output may depend on (after the transform;
        the wider side when ``future`` cuts the right one)."""
        sym = 1 + sum(d * (self.kernel // 2) for d in self.dilations)
        if self.future < 0:
            return sym
        return max(sym, 1 + sum(2 * d * (self.kernel // 2) for d in self.dilations) - (self.future_frames() - 1))

    def context_frames(self) -> int:
        """Context each side for chunked inference over already-transformed features."""
        return self.receptive_frames() + 1

    def history_frames(self) -> int:
        """Video frames of past audio the input transform of a frame depends on."""
        return -(-self.cmn_window // 2) if (self.cmn or self.energy) else 0


def transform_features(features: np.ndarray, cfg: RegressionConfig, start: int = 0) -> np.ndarray:
    """Raw 50 Hz features -> the net's input: causal sliding CMN (+ relative log-energy).

    Args:
        features: float32 [F, D] raw features (log10 mel for ``energy``), feature frame ``i`` at
            absolute feature index ``start + i``.
        cfg: the transform's window and options.
        start: absolute feature index of ``features[0]``; frames at negative indices (padding before
            the audio starts) are left out of every frame's statistics, so a window of a longer
            signal with ``history_frames()`` of left context transforms exactly like the whole.
    Returns:
        float32 [F, input_dim]. Padding frames (negative index) get 0 (the mean; raw features are kept
        when ``cmn`` is off) and the energy floor.
    """
    f = np.asarray(features, np.float64)
    n = len(f)
    idx = start + np.arange(n)
    lo_abs = np.maximum(0, idx - cfg.cmn_window + 1)
    lo = np.clip(lo_abs - start, 0, n)
    hi = np.arange(1, n + 1)
    cs = np.concatenate([np.zeros((1, f.shape[1])), np.cumsum(f, axis=0)])
    cnt = np.maximum(hi - lo, 1)[:, None]
    out = f - (cs[hi] - cs[lo]) / cnt if cfg.cmn else f.copy()
    pad = idx < 0
    if cfg.cmn:
        out[pad] = 0.0
    if cfg.energy:
        e = np.log10(np.sum(np.power(10.0, f), axis=1) + 1e-12)
        mx = _running_max(np.where(pad, -np.inf, e), cfg.cmn_window)
        rel = e - np.maximum(mx, ENERGY_REF_MIN)
        rel = np.clip(rel, ENERGY_FLOOR, 0.0)
        rel[pad] = ENERGY_FLOOR
        out = np.concatenate([out, rel[:, None]], axis=1)
    return out.astype(np.float32)


def _running_max(x: np.ndarray, w: int) -> np.ndarray:
    """``out[i] = max(x[max(0, i - w + 1): i + 1])`` for float64 [N] (``-inf`` entries ignored)."""
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.concatenate([np.full(w - 1, -np.inf), x])
    return sliding_window_view(padded, w).max(axis=1)


class TCNGenerator(nn.Module):
    """Temporal-CNN audio2motion: transformed features -> PCA coefficients -> expression.

    Buffers (saved with the weights): ``in_mean``/``in_std`` [input_dim] input normalisation;
    ``basis`` [n_basis, 204] and ``basis_mean`` [204] the expression PCA (canonical units);
    ``coef_std`` [n_basis] the training coefficients' std (the net predicts unit-variance
    coefficients).

    Shapes: ``forward(x)`` x float32 [B, 2T, input_dim] (normalised) -> coefficients [B, T, n_basis];
    ``infer(x, noise=None)`` -> expression float32 [B, T, 204] in canonical units.
    """

    #: the output of :meth:`infer` is the expression itself, not normalised by the motion stats
    outputs_canonical = True
    stochastic = False

    def __init__(self, cfg: RegressionConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.inp = nn.Conv1d(cfg.input_dim, h, kernel_size=4, stride=2, padding=1)
        self.blocks = nn.ModuleList(nn.Conv1d(h, h, cfg.kernel, dilation=d) for d in cfg.dilations)
        self.pads = cfg.paddings()
        self.norms = nn.ModuleList(ChannelNorm(h) for _ in cfg.dilations)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Conv1d(h, cfg.n_basis, 1)
        self.register_buffer("in_mean", torch.zeros(cfg.input_dim))
        self.register_buffer("in_std", torch.ones(cfg.input_dim))
        self.register_buffer("basis", torch.zeros(cfg.n_basis, EXPR_DIM))
        self.register_buffer("basis_mean", torch.zeros(EXPR_DIM))
        self.register_buffer("coef_std", torch.ones(cfg.n_basis))

    def normalize_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.in_mean) / self.in_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.transpose(1, 2))
        for conv, norm, pad in zip(self.blocks, self.norms, self.pads):
            h = h + self.drop(F.gelu(norm(conv(F.pad(h, pad)))))
        return self.out(h).transpose(1, 2)

    def coefficients(self, expr: torch.Tensor) -> torch.Tensor:
        """expression [..., 204] -> unit-variance PCA coefficients [..., n_basis]."""
        return (expr - self.basis_mean) @ self.basis.T / self.coef_std

    def expression(self, coef: torch.Tensor) -> torch.Tensor:
        """unit-variance PCA coefficients [..., n_basis] -> expression [..., 204] (canonical units)."""
        return (coef * self.coef_std) @ self.basis + self.basis_mean

    @torch.no_grad()
    def infer(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.expression(self(x))
