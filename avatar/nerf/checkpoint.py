"""Resumable training state of one NeRF part: model, optimiser, step and RNG states in one file.

The checkpointing half of nerfstudio's trainer role, kept out of the loop (:mod:`avatar.nerf.trainer`):
a safetensors file (never pickled) with the model's and Adam's tensors, the torch and generator RNG
states as tensors, and the step, parameter groups and numpy RNG state as metadata; written atomically
(:func:`avatar.nerf.model.atomic_save`), so a killed run leaves the previous checkpoint whole and a
resumed run continues bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from avatar.nerf.model import atomic_save


class Checkpoint:
    """Model + optimiser + step + RNG state in one safetensors file (atomic writes)."""

    def __init__(self, path: Path):
        self.path = path

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        rng: np.random.Generator,
        torch_gen: torch.Generator,
        extra: dict | None = None,
    ) -> None:
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.generator"] = torch_gen.get_state()
        meta = {
            "step": str(step),
            "param_groups": json.dumps(sd["param_groups"]),
            "numpy_rng": json.dumps(rng.bit_generator.state),
            "extra": json.dumps(extra or {}),
        }
        atomic_save(tensors, self.path, meta)

    def load(
        self, model: torch.nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator, torch_gen: torch.Generator
    ) -> tuple[int, dict]:
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        torch.set_rng_state(tensors["rng.torch"])
        torch_gen.set_state(tensors["rng.generator"])
        rng.bit_generator.state = json.loads(meta["numpy_rng"])
        return int(meta["step"]), json.loads(meta.get("extra", "{}"))
