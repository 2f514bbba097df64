"""Building blocks shared by the motion models: WaveNet (WN) stacks and affine-coupling flows.

All blocks are *time-local* (no normalisation over time or batch), so a sequence processed in
overlapping chunks gives the same result as one pass once the chunk context covers the receptive
field (see :func:`receptive_field`). Tensors are channels-first ``[B, C, T]`` float32.

Sources: WaveNet gated residual stack as used by VITS (Kim et al. 2021, Sec. 2.5, "WN" module) and
GeneFace (Ye et al. ICLR 2023, Sec. 3.1, audio2motion VAE); affine coupling flow: RealNVP (Dinh et
al. 2017, Sec. 3.3), conditioned on audio as in GeneFace's flow prior.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ChannelNorm(nn.Module):
    """LayerNorm over channels of ``[B, C, T]`` (per frame; never mixes frames or batch items)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class WN(nn.Module):
    """Non-causal WaveNet stack: dilated conv -> gated tanh*sigmoid (+ condition) -> residual/skip.

    Args:
        hidden: channels C of input and output.
        kernel: odd kernel size.
        n_layers: number of gated layers.
        cond_channels: channels of the condition ``g`` ``[B, Cg, T]`` (0: unconditioned).
    Shapes: ``x [B, C, T]``, ``g [B, Cg, T]`` -> ``[B, C, T]`` (sum of skip outputs).
    """

    def __init__(self, hidden: int, kernel: int, n_layers: int, cond_channels: int = 0, dropout: float = 0.0):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError("WN kernel must be odd")
        self.hidden, self.n_layers = hidden, n_layers
        self.in_layers = nn.ModuleList(
            nn.Conv1d(hidden, 2 * hidden, kernel, padding=kernel // 2) for _ in range(n_layers)
        )
        self.res_skip = nn.ModuleList(
            nn.Conv1d(hidden, 2 * hidden if i < n_layers - 1 else hidden, 1) for i in range(n_layers)
        )
        self.cond = nn.Conv1d(cond_channels, 2 * hidden * n_layers, 1) if cond_channels else None
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.zeros_like(x)
        gc = self.cond(g) if (self.cond is not None and g is not None) else None
        h = self.hidden
        for i in range(self.n_layers):
            a = self.in_layers[i](x)
            if gc is not None:
                a = a + gc[:, 2 * h * i : 2 * h * (i + 1)]
            acts = self.drop(torch.tanh(a[:, :h]) * torch.sigmoid(a[:, h:]))
            rs = self.res_skip[i](acts)
            if i < self.n_layers - 1:
                x = x + rs[:, :h]
                out = out + rs[:, h:]
            else:
                out = out + rs
        return out


class AffineCoupling(nn.Module):
    """Conditional affine coupling layer (RealNVP Eq. 7-8): the second half of the channels is
    scaled and shifted by functions of the first half and the condition; log|det J| is returned.

    Shapes: ``x [B, C, T]`` (C even), ``g [B, Cg, T]``; returns ``(y [B, C, T], logdet [B])``.
    Log-scales are bounded with ``tanh`` (|log s| <= 2) for numerical stability.
    """

    def __init__(self, channels: int, hidden: int, kernel: int, n_layers: int, cond_channels: int):
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = WN(hidden, kernel, n_layers, cond_channels)
        self.post = nn.Conv1d(hidden, 2 * (channels - self.half), 1)
        nn.init.zeros_(self.post.weight)  # starts as the identity map
        nn.init.zeros_(self.post.bias)

    def forward(self, x: torch.Tensor, g: torch.Tensor, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x0, x1 = x[:, : self.half], x[:, self.half :]
        stats = self.post(self.enc(self.pre(x0), g))
        m, logs = stats.chunk(2, dim=1)
        logs = 2.0 * torch.tanh(logs / 2.0)
        if not reverse:
            x1 = m + x1 * torch.exp(logs)
            logdet = logs.sum(dim=(1, 2))
        else:
            x1 = (x1 - m) * torch.exp(-logs)
            logdet = -logs.sum(dim=(1, 2))
        return torch.cat([x0, x1], dim=1), logdet


class FlowPrior(nn.Module):
    """Audio-conditioned normalising flow f: z -> u with u ~ N(0, I) (GeneFace Sec. 3.1 "flow prior").

    ``n_blocks`` affine couplings, each followed by a channel flip (VITS ResidualCouplingBlock).
    ``log p(z|c) = log N(f(z); 0, I) + log|det df/dz|``. Sampling: ``z = f^-1(u * temperature)``.
    Shapes: ``z [B, latent, T']``, ``g [B, Cg, T']``.
    """

    def __init__(self, latent: int, hidden: int, kernel: int, n_layers: int, n_blocks: int, cond_channels: int):
        super().__init__()
        self.couplings = nn.ModuleList(
            AffineCoupling(latent, hidden, kernel, n_layers, cond_channels) for _ in range(n_blocks)
        )

    def forward(self, z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z -> (u, logdet [B])."""
        logdet = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        for c in self.couplings:
            z, ld = c(z, g)
            logdet = logdet + ld
            z = torch.flip(z, dims=[1])
        return z, logdet

    def reverse(self, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """u -> z (exact inverse of :meth:`forward`)."""
        for c in reversed(self.couplings):
            u = torch.flip(u, dims=[1])
            u, _ = c(u, g, reverse=True)
        return u

    def log_prob(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Elementwise-summed log density log p(z|g) per batch item, nats, ``[B]``."""
        u, logdet = self.forward(z, g)
        return (-0.5 * (u**2 + torch.log(torch.tensor(2 * torch.pi, dtype=u.dtype)))).sum(dim=(1, 2)) + logdet


def gaussian_log_prob(z: torch.Tensor, m: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
    """log N(z; m, exp(logs)^2) summed over channels and time, ``[B]`` (nats)."""
    return (
        -0.5 * ((z - m) * torch.exp(-logs)) ** 2 - logs - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=z.dtype))
    ).sum(dim=(1, 2))


def leaky(x: torch.Tensor) -> torch.Tensor:
    """LeakyReLU(0.2), the activation of GeneFace's postnet and discriminator."""
    return F.leaky_relu(x, 0.2)
