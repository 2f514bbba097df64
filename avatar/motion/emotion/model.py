"""The category emotion network (EAT-style): emotion code -> mapping network -> deformation network,
its hyper-parameters and its files.

EAT (Gan et al., ICCV 2023): Sec. 3.3 emotion latent + mapping network ("emotion prompt"),
Sec. 3.4 emotional deformation network (EDN) predicting a keypoint displacement. EAT predicts a
45-d delta on 15 implicit 3-D keypoints; ours predicts [68, 3] on GeneFace's canonical landmarks
from a causal window of the audio-driven speech landmarks (anchors D.4 option b).

Its training targets: :mod:`.targets`; its training and calibration: :mod:`.train`; held-out
metrics and baselines: :mod:`.evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from avatar.errors import BundleCorrupt

from .geometry import MOVABLE_MASK, SPEECH
from .neutral import MAX_IDENTITY, NeutralStats
from .schedule import LABELS

SCHEMA = "avatar.emotion/2"
_OLD_SCHEMAS = ("avatar.emotion/1",)


@dataclass
class EmotionConfig:
    """Hyper-parameters of the category emotion model (stored as ``config.json``).

    Attributes:
        embed_dim: emotion code size (EAT's latent_dim 16).
        code_dim: mapping-network output (the "emotion prompt").
        hidden: deformation-network width.
        window: causal window of speech frames fed to the deformation network (25 fps).
        steps, batch, lr, weight_decay: AdamW training schedule.
        no_neutral_weight: loss weight of clips whose speaker has no neutral clip (their neutral is
            estimated from shared statistics, so their targets carry identity error).
        symmetric: train symmetric labels (all but :data:`~.geometry.ASYMMETRIC`) on the
            left-right symmetric part of the displacement.
        calibrate: fit the per-label gain so that strength 1 equals the real size on average.
        holdout: speaker id excluded from training and used for the held-out metrics (or None).
        seed: RNG seed.
    """

    embed_dim: int = 16
    code_dim: int = 64
    hidden: int = 256
    window: int = 5
    steps: int = 1500
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    no_neutral_weight: float = 0.5
    symmetric: bool = True
    calibrate: bool = True
    holdout: str | None = None
    seed: int = 0


class EmotionNet(nn.Module):
    """Emotion code -> mapping network -> deformation network -> displacement.

    ``forward(speech [B, window*len(SPEECH)*3] float32, label int64 [B]) -> delta [B, 68, 3]``
    (canonical units, calibrated: strength 1), zero at :data:`~.geometry.FROZEN` points and for
    the neutral label (EAT Sec. 3.3: emotion latent + mapping network; Sec. 3.4: emotional
    deformation network). Buffers carry the input normalisation, the per-label ``gain`` and the
    shared neutral statistics (``template``, ``id_basis``/``n_identity``, ``ex_basis``) that the
    reference-video path also uses.
    """

    def __init__(self, cfg: EmotionConfig):
        super().__init__()
        d_in = cfg.window * len(SPEECH) * 3
        self.embedding = nn.Embedding(len(LABELS), cfg.embed_dim)
        self.mapping = nn.Sequential(
            nn.Linear(cfg.embed_dim, cfg.code_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(cfg.code_dim, cfg.code_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(cfg.code_dim, cfg.code_dim),
        )
        self.deform = nn.Sequential(
            nn.Linear(d_in + cfg.code_dim, cfg.hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(cfg.hidden, 68 * 3),
        )
        self.register_buffer("in_mean", torch.zeros(d_in))
        self.register_buffer("in_std", torch.ones(d_in))
        self.register_buffer("out_scale", torch.ones(1))
        self.register_buffer("gain", torch.ones(len(LABELS)))
        self.register_buffer("template", torch.zeros(68, 3))  # training speakers' mean neutral shape
        self.register_buffer("id_basis", torch.zeros(MAX_IDENTITY, 68, 3))
        self.register_buffer("n_identity", torch.zeros((), dtype=torch.int64))
        self.register_buffer("ex_basis", torch.zeros(len(LABELS) - 1, 68, 3))
        self.register_buffer("mask", torch.from_numpy(MOVABLE_MASK.copy()))
        self.cfg = cfg

    def forward(self, speech: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        code = self.mapping(self.embedding(label))
        x = (speech - self.in_mean) / self.in_std
        out = self.deform(torch.cat([x, code], -1)).view(-1, 68, 3) * self.out_scale * self.gain[label][:, None, None]
        return out * self.mask * (label != 0).to(out.dtype)[:, None, None]

    def neutral_stats(self) -> NeutralStats:
        """The shared neutral statistics stored with the model (:class:`~.neutral.NeutralStats`)."""
        k = int(self.n_identity)
        ex = self.ex_basis.numpy()
        ex = ex[np.linalg.norm(ex.reshape(len(ex), -1), axis=1) > 0]
        return NeutralStats(self.template.numpy().copy(), self.id_basis.numpy()[:k].copy(), ex.copy())

    def set_neutral_stats(self, stats: NeutralStats) -> None:
        """Store ``stats`` in the buffers (identity directions beyond :data:`MAX_IDENTITY` dropped)."""
        self.template.copy_(torch.from_numpy(np.asarray(stats.template, np.float32)))
        k = min(len(stats.id_basis), MAX_IDENTITY)
        self.id_basis.zero_()
        if k:
            self.id_basis[:k] = torch.from_numpy(np.asarray(stats.id_basis[:k], np.float32))
        self.n_identity.fill_(k)
        self.ex_basis.zero_()
        m = min(len(stats.ex_basis), len(self.ex_basis))
        if m:
            self.ex_basis[:m] = torch.from_numpy(np.asarray(stats.ex_basis[:m], np.float32))

    def predict(self, speech: np.ndarray, label: str) -> np.ndarray:
        """float32 [K, 68, 3] displacement for speech windows [K, D] and one label (no grad)."""
        with torch.no_grad():
            return self(
                torch.from_numpy(np.asarray(speech, np.float32)), torch.full((len(speech),), LABELS.index(label))
            ).numpy()


# ---------------------------------------------------------------------------------------------
# persistence
def save_emotion_model(
    net: EmotionNet, cfg: EmotionConfig, metrics: dict, out: str | Path, overwrite: bool = False
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``metrics.json`` atomically to ``out``."""
    from safetensors.torch import save_file

    from avatar.atomic import atomic_dir
    from avatar.config import save_json, to_dict

    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(Path(tmp) / "model.safetensors"))
        save_json(
            {"schema": SCHEMA, "labels": list(LABELS), "speech_points": list(SPEECH), "config": to_dict(cfg)},
            Path(tmp) / "config.json",
        )
        save_json(metrics, Path(tmp) / "metrics.json")
    return Path(out)


def load_emotion_model(path: str | Path) -> EmotionNet:
    """Load a model written by :func:`save_emotion_model` (safetensors only; never unpickles).

    A model of the previous schema (``avatar.emotion/1``: no gain, no neutral statistics) loads with
    gain 1 and its template as the only statistics.

    Raises:
        BundleCorrupt: missing/unreadable files or a different schema.
    """
    from safetensors.torch import load_file

    from avatar.config import from_dict, load_json

    path = Path(path)
    try:
        meta = load_json(path / "config.json")
        schema = meta.get("schema")
        if schema not in (SCHEMA, *_OLD_SCHEMAS) or tuple(meta.get("labels", ())) != LABELS:
            raise BundleCorrupt(f"{path}: not an {SCHEMA} model; retrain it with `avatar train-emotion`")
        known = set(EmotionConfig.__dataclass_fields__)
        cfg = from_dict(EmotionConfig, {k: v for k, v in meta["config"].items() if k in known})
        net = EmotionNet(cfg)
        state = load_file(str(path / "model.safetensors"))
        missing, unexpected = net.load_state_dict(state, strict=schema == SCHEMA)
        if unexpected or not set(missing) <= {"gain", "id_basis", "n_identity", "ex_basis"}:
            raise BundleCorrupt(f"{path}: unexpected tensors {unexpected} / missing {missing}")
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise BundleCorrupt(
            f"{path}: emotion model unreadable ({e}); retrain it with `avatar train-emotion CLIPS_DIR --out {path}`"
        ) from e
    net.cfg = cfg
    return net.eval()
