"""Model bundles on disk: ``*.safetensors`` weights + ``config.json`` + ``stats.json`` + ``metrics.json``.

Weights are safetensors (never pickle). Every reader names the missing/corrupt file in a
:class:`avatar.errors.BundleCorrupt` whose message says how to recreate the bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from avatar.errors import BundleCorrupt, FeatureMismatch, InvalidInput

CONFIG, STATS, METRICS = "config.json", "stats.json", "metrics.json"


def save_module(module: torch.nn.Module, path: Path) -> None:
    """Write ``module.state_dict()`` (contiguous CPU tensors) as safetensors."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def load_module(module: torch.nn.Module, path: Path, hint: str) -> torch.nn.Module:
    """Load safetensors weights into ``module`` (strict).

    Raises:
        BundleCorrupt: file missing, unreadable, or keys/shapes do not match the config.
    """
    if not path.is_file():
        raise BundleCorrupt(f"{path.parent}: missing {path.name}; {hint}")
    try:
        state = load_file(str(path))
        module.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise BundleCorrupt(f"{path}: weights do not load ({e}); {hint}") from e
    return module


def read_json(root: Path, name: str, hint: str) -> dict:
    """Read ``root/name`` as JSON. Raises BundleCorrupt naming the file when missing or invalid."""
    path = Path(root) / name
    if not path.is_file():
        raise BundleCorrupt(f"{root}: missing {name}; {hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleCorrupt(f"{path} is not valid JSON ({e}); {hint}") from e


def write_json(root: Path, name: str, data: dict) -> None:
    (Path(root) / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass
class MotionStats:
    """Normalisation statistics stored with a generator (``stats.json``).

    Attributes:
        feature_kind: audio feature kind the model was trained on ("mel" or "hubert").
        feature_mean, feature_std: per-dimension statistics of the 50 Hz features, length D.
        expr_mean, expr_std: per-coordinate statistics of the expression ``lm3d - lm3d_mean``,
            length 204 (68 x 3 flattened, canonical units).
    """

    feature_kind: str
    feature_mean: list[float]
    feature_std: list[float]
    expr_mean: list[float]
    expr_std: list[float]
    extra: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return len(self.feature_mean)

    def check_features(self, features: np.ndarray, kind: str | None = None) -> None:
        """Validate a feature array against the training features.

        Raises:
            FeatureMismatch: ``kind`` differs from ``feature_kind`` or the dimension differs.
            InvalidInput: not a finite 2-D array.
        """
        if kind is not None and kind != self.feature_kind:
            raise FeatureMismatch(
                f"audio features are {kind!r} but this generator was trained on {self.feature_kind!r}; "
                f"extract {self.feature_kind!r} features (e.g. re-run preprocess with audio_features={self.feature_kind!r})"
            )
        if features.ndim != 2:
            raise InvalidInput(f"features must be [frames, dim] at 50 Hz, got shape {tuple(features.shape)}")
        if features.shape[1] != self.feature_dim:
            raise FeatureMismatch(
                f"features have dim {features.shape[1]} but this generator expects {self.feature_dim} "
                f"({self.feature_kind!r} features); extract {self.feature_kind!r} features"
            )
        if not np.isfinite(features).all():
            raise InvalidInput("audio features contain NaN/inf; check the input audio (decode errors?)")

    def to_dict(self) -> dict:
        return {
            "feature_kind": self.feature_kind,
            "feature_dim": self.feature_dim,
            "feature_mean": self.feature_mean,
            "feature_std": self.feature_std,
            "expr_mean": self.expr_mean,
            "expr_std": self.expr_std,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MotionStats":
        try:
            return cls(
                d["feature_kind"],
                list(d["feature_mean"]),
                list(d["feature_std"]),
                list(d["expr_mean"]),
                list(d["expr_std"]),
                dict(d.get("extra", {})),
            )
        except KeyError as e:
            raise BundleCorrupt(f"stats.json lacks {e}; retrain the generator") from e
