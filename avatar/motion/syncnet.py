"""Landmark SyncNet ("sync expert"): is this mouth motion in sync with this audio?

GeneFace (Ye et al., ICLR 2023, Sec. 3.1 "landmark sync expert"; after Wav2Lip's expert, Prajwal
et al. 2020, Sec. 3.1): an audio window of 10 feature frames (0.2 s at 50 Hz) and the 20 mouth
landmarks (iBUG 48-67, expression in the canonical frame) over the 5 matching video frames are each
encoded to a 512-d unit vector; their cosine similarity, through a learned affine map, is the logit
of "in sync", trained with BCE on in-sync / off-sync pairs.

Confidence (SyncNet, Chung & Zisserman 2016, Sec. 4.2): for every audio/video offset in
``[-max_offset, max_offset]`` frames, the mean embedding distance ``1 - cos`` over the clip; the
offset is the argmin and ``confidence = median(distances) - min(distances)`` (unitless, cosine-
distance units; higher = more clearly in sync; ~0 for unrelated audio).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from avatar.data.dataset import MOUTH

AUDIO_WIN = 10  # feature frames (50 Hz) = 0.2 s
VIDEO_WIN = 5  # video frames (25 fps) = 0.2 s


@dataclass
class SyncNetConfig:
    """Architecture of :class:`LandmarkSyncNet`.

    ``mouth_scale``: canonical-units -> network-units factor for mouth expressions (set from the
    corpus: 1 / std of the mouth expression), stored so inference uses the training scale.
    """

    feature_dim: int = 80
    hidden: int = 256
    embed: int = 512
    mouth_scale: float = 1.0


class LandmarkSyncNet(nn.Module):
    """Two encoders to 512-d and a cosine-similarity logit.

    Inputs: ``audio [B, 10, D]`` normalised features; ``mouth [B, 5, 20, 3]`` mouth expression
    (``(lm3d - lm3d_mean)[:, 48:68]``, canonical units). Output of :meth:`forward`: logits ``[B]``.
    """

    def __init__(self, cfg: SyncNetConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.audio = nn.Sequential(
            nn.Conv1d(cfg.feature_dim, h, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv1d(h, h, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv1d(h, h, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),  # 10 -> 5
        )
        self.audio_fc = nn.Linear(h * VIDEO_WIN, cfg.embed)
        self.mouth = nn.Sequential(
            nn.Conv1d(len(MOUTH) * 3, h, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv1d(h, h, 3, padding=1),
            nn.LeakyReLU(0.2),
        )
        self.mouth_fc = nn.Linear(h * VIDEO_WIN, cfg.embed)
        self.logit_w = nn.Parameter(torch.tensor(5.0))
        self.logit_b = nn.Parameter(torch.tensor(-2.0))

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, 10, D] -> unit vectors [B, embed]."""
        h = self.audio(audio.transpose(1, 2))
        return F.normalize(self.audio_fc(h.flatten(1)), dim=-1)

    def embed_mouth(self, mouth: torch.Tensor) -> torch.Tensor:
        """[B, 5, 20, 3] canonical mouth expression -> unit vectors [B, embed]."""
        x = (mouth * self.cfg.mouth_scale).flatten(2).transpose(1, 2)
        return F.normalize(self.mouth_fc(self.mouth(x).flatten(1)), dim=-1)

    def forward(self, audio: torch.Tensor, mouth: torch.Tensor) -> torch.Tensor:
        cos = (self.embed_audio(audio) * self.embed_mouth(mouth)).sum(-1)
        return self.logit_w * cos + self.logit_b


def windows(x: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """Gather ``x[s : s + length]`` for every start; x [T, ...] -> [len(starts), length, ...]."""
    idx = starts[:, None] + torch.arange(length, device=starts.device)[None]
    return x[idx]


def sync_loss(
    syncnet: LandmarkSyncNet,
    features: torch.Tensor,
    expr: torch.Tensor,
    n_windows: int = 8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BCE pushing predicted mouths to be judged in sync (GeneFace's L_sync).

    Args:
        features: [B, 2T, D] normalised features. expr: [B, T, 68, 3] expression, canonical units.
    Returns: scalar loss (mean BCE over ``n_windows`` random windows per sequence).
    """
    B, T = expr.shape[:2]
    starts = torch.randint(0, T - VIDEO_WIN + 1, (B, n_windows), generator=generator).to(expr.device)
    b = torch.arange(B, device=expr.device)[:, None].expand(B, n_windows)
    vid = starts[..., None] + torch.arange(VIDEO_WIN, device=expr.device)
    aud = 2 * starts[..., None] + torch.arange(AUDIO_WIN, device=expr.device)
    mouth = expr[b[..., None], vid][..., MOUTH, :].flatten(0, 1)
    audio = features[b[..., None], aud].flatten(0, 1)
    logits = syncnet(audio, mouth)
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


@torch.no_grad()
def sync_confidence(
    syncnet: LandmarkSyncNet, features: torch.Tensor, expr: torch.Tensor, max_offset: int = 15
) -> dict[str, float]:
    """SyncNet-style AV offset and confidence of one clip.

    Args:
        features: [2N, D] normalised 50 Hz features. expr: [N, 68, 3] expression (canonical units).
        max_offset: offsets searched, video frames each way (reduced for short clips).
    Returns:
        {"offset": frames (audio shift that best matches; 0 = in sync), "confidence": median - min
        of the mean distances (higher is better), "min_dist": min mean distance}; NaNs when the clip
        is shorter than 0.2 s + 2 offsets.
    """
    N = expr.shape[0]
    max_offset = int(min(max_offset, (N - VIDEO_WIN) // 2 - 1))
    if max_offset < 1:
        return {"offset": float("nan"), "confidence": float("nan"), "min_dist": float("nan")}
    dev = next(syncnet.parameters()).device
    features, expr = features.to(dev), expr.to(dev)
    n_starts = N - VIDEO_WIN + 1
    em = syncnet.embed_mouth(windows(expr[:, MOUTH], torch.arange(n_starts, device=dev), VIDEO_WIN))
    ea = syncnet.embed_audio(windows(features, 2 * torch.arange(n_starts, device=dev), AUDIO_WIN))
    t = torch.arange(max_offset, n_starts - max_offset, device=dev)
    dists = []
    for o in range(-max_offset, max_offset + 1):
        dists.append((1 - (em[t] * ea[t + o]).sum(-1)).mean())
    d = torch.stack(dists).cpu().numpy()
    i = int(np.argmin(d))
    return {"offset": float(i - max_offset), "confidence": float(np.median(d) - d[i]), "min_dist": float(d[i])}
