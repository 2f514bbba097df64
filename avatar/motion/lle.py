"""Locally-linear projection of predicted landmarks onto a person's own landmarks (GeneFace++
``modules/postnet/lle.py``, after Roweis & Saul 2000 LLE, Eq. 2-3).

For every predicted frame x (204-d): take its K nearest frames r_1..r_K among the person's training
landmarks, solve the reconstruction weights ``w = argmin |x - sum_j w_j r_j|^2`` subject to
``sum_j w_j = 1`` (regularised local Gram system), and blend ``(1 - blend) * x + blend * w @ R``.
It pulls out-of-distribution mouth shapes towards shapes the person really makes.
"""

from __future__ import annotations

import numpy as np
import torch

from avatar.errors import InvalidInput


def lle_project(
    lm3d: np.ndarray, reference: np.ndarray, k: int = 10, blend: float = 0.25, reg: float = 1e-3, batch: int = 2048
) -> np.ndarray:
    """Project landmark frames onto the span of their K nearest reference frames and blend.

    Args:
        lm3d: float32 [N, 68, 3] predicted landmarks (or expressions; same space as ``reference``).
        reference: float32 [M, 68, 3] the person's tracked training landmarks, M >= 1.
        k: neighbours (clipped to M). blend: weight of the projection in [0, 1].
        reg: Tikhonov regulariser of the local Gram matrix, relative to its trace.
        batch: frames per distance block (bounds memory to batch x M floats).
    Returns:
        float32 [N, 68, 3].
    Raises:
        InvalidInput: shapes are not [*, 68, 3], reference empty, blend outside [0, 1], k < 1.
    """
    lm3d = np.asarray(lm3d, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    if lm3d.ndim != 3 or lm3d.shape[1:] != (68, 3) or reference.ndim != 3 or reference.shape[1:] != (68, 3):
        raise InvalidInput(
            f"lle_project needs [N, 68, 3] landmarks and reference, got {lm3d.shape} and {reference.shape}"
        )
    if reference.shape[0] < 1:
        raise InvalidInput("lle_project: the reference set is empty; pass the person's training landmarks")
    if not 0.0 <= blend <= 1.0 or k < 1:
        raise InvalidInput(f"lle_project: need 0 <= blend <= 1 and k >= 1, got blend={blend}, k={k}")
    if lm3d.shape[0] == 0 or blend == 0.0:
        return lm3d.copy()
    k = min(k, reference.shape[0])
    R = torch.from_numpy(reference.reshape(reference.shape[0], -1)).double()
    out = np.empty_like(lm3d)
    for a in range(0, lm3d.shape[0], batch):
        X = torch.from_numpy(lm3d[a : a + batch].reshape(-1, 204)).double()
        idx = torch.cdist(X, R).topk(k, largest=False).indices  # [n, k]
        nb = R[idx]  # [n, k, 204]
        diff = nb - X[:, None]  # [n, k, 204]
        G = diff @ diff.transpose(1, 2)  # [n, k, k]
        tr = G.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-12)
        G = G + (reg * tr)[:, None, None] * torch.eye(k, dtype=G.dtype)
        w = torch.linalg.solve(G, torch.ones(X.shape[0], k, 1, dtype=G.dtype))[..., 0]
        w = w / w.sum(-1, keepdim=True)
        proj = (w[:, :, None] * nb).sum(1)
        out[a : a + batch] = ((1 - blend) * X + blend * proj).float().numpy().reshape(-1, 68, 3)
    return out
