"""Training losses of the head and torso NeRFs, and the project's one PSNR.

The losses of nerfstudio's "model with its losses" role (its ``Model.get_loss_dict``), kept apart from
the data (:mod:`avatar.nerf.datamanager`) and the loop (:mod:`avatar.nerf.trainer`). Head (GeneFace's
RAD-NeRF trainer): per-pixel MSE with extra weight in the mouth box (``HeadBatch.weight``), opacity
entropy (``weights_entropy``), and the ambient regulariser (|ambient coordinate| outside the face box)
ramped in over the first quarter of the run. Torso: MSE plus a small penalty on torso opacity over
background pixels. Each loss function returns ``(loss, stats)``: the scalar to back-propagate and the
floats that are logged (``stats["mse"]`` feeds the training PSNR).
"""

from __future__ import annotations

import math

import torch

from avatar.nerf.datamanager import HeadBatch, TorsoBatch
from avatar.nerf.presets import TrainConfig
from avatar.nerf.render import composite

#: weight of the torso opacity over background pixels (labels 0) in the torso loss
TORSO_BG_ALPHA_WEIGHT = 0.01


def opacity_entropy(acc: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy (bits) of ray opacities ``acc`` [N]: pushes each ray to fully opaque or empty."""
    a = acc.clamp(1e-5, 1 - 1e-5)
    return (-a * torch.log2(a) - (1 - a) * torch.log2(1 - a)).mean()


def ambient_ramp(step: int, steps: int) -> float:
    """Weight factor of the ambient regulariser: 0 -> 1 over the first quarter of ``steps`` (GeneFace)."""
    return min(1.0, step / max(1, steps // 4))


def head_loss(
    out: dict[str, torch.Tensor], batch: HeadBatch, cfg: TrainConfig, ramp: float
) -> tuple[torch.Tensor, dict]:
    """Head loss of the rendered rays ``out`` (``rgb``, ``acc``, ``ambient``) against ``batch``."""
    pred = composite(batch.bg, out["rgb"], out["acc"])
    err = ((pred.float() - batch.target) ** 2).mean(-1)
    mse = (err * batch.weight).sum() / batch.weight.sum()
    ent = opacity_entropy(out["acc"].float())
    amb = (out["ambient"].float() * batch.outside_face).mean()
    loss = mse + cfg.lambda_entropy * ent + cfg.lambda_ambient * ramp * amb
    return loss, {"loss": loss.item(), "mse": err.mean().item(), "entropy": ent.item(), "ambient": amb.item()}


def torso_loss(out: dict[str, torch.Tensor], batch: TorsoBatch) -> tuple[torch.Tensor, dict]:
    """Torso loss of the composited pixels ``out`` (``rgb``, ``torso_alpha``) against ``batch``."""
    err = ((out["rgb"].float() - batch.target) ** 2).mean(-1)
    mse = err.mean()
    bg_alpha = (out["torso_alpha"].float() * (batch.mask == 0)).mean()
    loss = mse + TORSO_BG_ALPHA_WEIGHT * bg_alpha
    return loss, {"loss": loss.item(), "mse": mse.item(), "bg_alpha": bg_alpha.item()}


def psnr_from_mse(mse: float, peak: float = 1.0) -> float:
    """PSNR in dB of a mean squared error on a ``[0, peak]`` scale (inf for a zero error). The one
    PSNR of the project (training logs, ``avatar/nerf/evaluate.py``)."""
    return float("inf") if mse <= 0 else float(10 * math.log10(peak**2 / mse))


def train_psnr(mse: float) -> float:
    """Training-log PSNR of a [0, 1] loss, capped at 100 dB."""
    return psnr_from_mse(max(mse, 1e-10))
