"""Multiresolution hash encoding (Instant-NGP, Mueller et al. 2022, Sec. 3) with two backends.

``HashGridEncoding`` maps points in ``[0, 1]^dim`` to ``[B, n_levels * n_features_per_level]``
features. Backends, chosen by ``backend="auto"``:

* ``tcnn``: tiny-cuda-nn's ``tinycudann.Encoding`` (CUDA only; used when importable and the
  module lives on a CUDA device);
* ``torch``: our PyTorch implementation below (any device), a custom autograd Function whose
  backward scatters into the table (``bincount`` on CPU, ``index_add_`` on CUDA);
* ``triton``: fused Triton kernels (``avatar/nerf/triton_hashgrid.py``), used by ``"auto"`` on
  CUDA when tinycudann is missing and Triton imports.

Exact semantics (identical to tiny-cuda-nn's ``HashGrid`` with ``Linear`` interpolation, so that a
table trained with one backend renders identically with the other; the Triton kernel must match):

* per-level scale ``b = exp((ln N_max - ln N_min) / (L - 1))`` when ``finest_resolution`` is given
  (else ``per_level_scale``); ``scale_l = N_min * b**l - 1`` (float32, computed as
  ``exp2(l * log2(b)) * N_min - 1``) and the level has ``R_l = ceil(scale_l) + 1`` vertices per
  axis. tiny-cuda-nn's ``- 1`` makes ``N_min`` count grid *vertices*; the paper's
  ``N_l = floor(N_min * b**l)`` counts cells (Sec. 3, Eq. 2-3). The difference is a half-cell shift.
* a point ``x`` in ``[0, 1]`` maps to ``p = x * scale_l + 0.5`` (half-cell offset, i.e. *not*
  align-corners); the lower corner is ``floor(p)`` (int32) and the weight ``f = p - floor(p)``;
  d-linear interpolation over the ``2**dim`` corners, corner ``c`` (bit ``i`` of ``c`` = +1 on axis
  ``i``) has weight ``prod_i (f_i if bit_i else 1 - f_i)``.
* level ``l`` owns ``T_l = min(next_multiple(R_l**dim, 8), 2**log2_hashmap_size)`` table rows.
  If ``R_l**dim <= T_l`` the index is dense: ``sum_i v_i * R_l**i`` (axis 0 fastest); otherwise
  the spatial hash ``(v_0 * 1) XOR (v_1 * 2654435761) XOR (v_2 * 805459861)`` in uint32 arithmetic
  (wrap-around multiplication). The index is taken ``mod T_l``.
* the table is one float32 parameter ``[sum_l T_l, F]`` (levels concatenated, level 0 first);
  tiny-cuda-nn's flat parameter vector is this table flattened. Initialised ``U(-1e-4, 1e-4)``.
* output layout: level-major, ``out[:, l * F + f]``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from avatar.nerf.grid import PRIMES, GridConfig, HashGridConfig, _as_int32, level_layout

log = logging.getLogger(__name__)

__all__ = ["PRIMES", "GridConfig", "HashGridConfig", "HashGridEncoding", "hashgrid_reference", "level_layout"]


class _HashGridFunction(torch.autograd.Function):
    """out[B, L, F] = sum_c w[B, L, c] * table[idx[B, L, c]]; backward scatters with index_add_."""

    @staticmethod
    def forward(ctx, x, table, scales, mults, is_hash, rows, offsets, corners):
        # x [B, d] in [0,1]; scales [L]; mults [L, d] int32 (strides or primes); corners [C, d] int32
        B, d = x.shape
        L = scales.shape[0]
        pos = x[:, None, :] * scales[None, :, None] + 0.5  # [B, L, d]
        base = torch.floor(pos)
        frac = pos - base
        base = base.to(torch.int32)
        # per axis, the two candidate terms (corner bit 0 / 1): [B, L, d, 2]
        cand = torch.stack((base, base + 1), dim=-1) * mults[None, :, :, None]
        idx_sum = None
        idx_xor = None
        for i in range(d):
            shape = [B, L] + [1] * d
            shape[2 + i] = 2
            t = cand[:, :, i, :].reshape(shape)
            idx_sum = t if idx_sum is None else idx_sum + t
            idx_xor = t if idx_xor is None else torch.bitwise_xor(idx_xor, t)
        # flattened in (axis 0, axis 1, ...) order: corner c has bit (c >> (d-1-i)) & 1 on axis i,
        # which is how `corners` is enumerated
        hmask = is_hash.view(1, L, *([1] * d))
        idx = torch.where(hmask, idx_xor, idx_sum).reshape(B, L, -1)
        # mod T_l: a bit mask on hashed levels (T_l = 2^k, equal to uint32 mod on the int32 bits);
        # dense levels need it too, the upper corner of x = 1 is vertex R_l (wraps, as tcnn does)
        idx = torch.remainder(idx, rows.view(1, L, 1)) + offsets.view(1, L, 1)
        # weights [B, L, C]
        wsel = torch.stack((1 - frac, frac), dim=-1)  # [B, L, d, 2]
        w = None
        for i in range(d):
            shape = [B, L] + [1] * d
            shape[2 + i] = 2
            t = wsel[:, :, i, :].reshape(shape)
            w = t if w is None else w * t
        w = w.reshape(B, L, -1)
        feats = table.index_select(0, idx.reshape(-1)).view(B, L, idx.shape[-1], -1)
        out = (w.unsqueeze(-1) * feats).sum(2)
        ctx.save_for_backward(idx, w, frac, feats if x.requires_grad else torch.empty(0), scales, corners)
        ctx.table_rows = table.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        idx, w, frac, feats, scales, corners = ctx.saved_tensors
        B, L, C = w.shape
        F = grad_out.shape[-1]
        grad_table = grad_x = None
        if ctx.needs_input_grad[1]:
            src = (w.unsqueeze(-1) * grad_out.unsqueeze(2)).reshape(-1, F)
            flat = idx.reshape(-1)
            if flat.is_cuda:
                grad_table = torch.zeros(ctx.table_rows, F, dtype=grad_out.dtype, device=grad_out.device)
                grad_table.index_add_(0, flat, src)
            else:
                # CPU: one bincount per feature is ~15x faster than index_add_ with int32 indices
                flat = flat.long()
                grad_table = torch.stack(
                    [torch.bincount(flat, weights=src[:, f], minlength=ctx.table_rows) for f in range(F)], -1
                ).to(grad_out.dtype)
        if ctx.needs_input_grad[0]:
            d = frac.shape[-1]
            # dot[B, L, C] = <grad_out, feature of corner c>
            dot = (feats * grad_out.unsqueeze(2)).sum(-1)
            bits = corners.to(frac.dtype)  # [C, d]
            gx = []
            for i in range(d):
                # d w_c / d f_i = (+1 if bit_i else -1) * prod_{j != i} (f_j or 1 - f_j)
                dw = (bits[:, i] * 2 - 1).view(1, 1, C).expand(B, L, C)
                for j in range(d):
                    if j == i:
                        continue
                    fj = frac[:, :, j : j + 1]
                    dw = dw * torch.where(bits[:, j].view(1, 1, C) > 0, fj, 1 - fj)
                gx.append(((dw * dot).sum(-1) * scales.view(1, L)).sum(1))
            grad_x = torch.stack(gx, dim=-1)
        return grad_x, grad_table, None, None, None, None, None, None


def _tcnn_available() -> bool:
    try:
        import tinycudann  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return False
    return torch.cuda.is_available()


class HashGridEncoding(nn.Module):
    """Multiresolution hash encoding of points ``x`` float32 ``[B, dim]`` in ``[0, 1]^dim``.

    Returns float32 ``[B, n_levels * n_features_per_level]`` (see the module docstring for the
    exact index/interpolation semantics). Points outside ``[0, 1]`` are clamped.

    Args:
        backend: ``"auto"`` (on CUDA: tiny-cuda-nn when importable, else Triton when importable;
            else ``"torch"``), ``"torch"``, ``"tcnn"`` or ``"triton"``.

    Raises:
        ValueError: ``dim`` not 2 or 3, or ``backend="tcnn"`` without tinycudann + CUDA.

    Source: Mueller et al., "Instant Neural Graphics Primitives", SIGGRAPH 2022, Sec. 3.
    """

    def __init__(
        self,
        dim: int = 3,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        finest_resolution: int | None = 2048,
        per_level_scale: float | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"HashGridEncoding supports dim 2 or 3, got {dim}")
        self.cfg = HashGridConfig(
            dim, n_levels, n_features_per_level, log2_hashmap_size, base_resolution, finest_resolution, per_level_scale
        )
        scales, res, rows, offsets = level_layout(self.cfg)
        self.resolutions = res
        self.level_rows = rows
        self.output_dim = n_levels * n_features_per_level
        self.table = nn.Parameter(torch.empty(sum(rows), n_features_per_level).uniform_(-1e-4, 1e-4))
        is_hash = [r**dim > t for r, t in zip(res, rows)]
        mults = []
        for r, h in zip(res, is_hash):
            mults.append([_as_int32(PRIMES[i]) for i in range(dim)] if h else [r**i for i in range(dim)])
        self.register_buffer("_scales", torch.tensor(scales, dtype=torch.float32), persistent=False)
        self.register_buffer("_mults", torch.tensor(mults, dtype=torch.int32), persistent=False)
        self.register_buffer("_is_hash", torch.tensor(is_hash), persistent=False)
        self.register_buffer("_rows", torch.tensor(rows, dtype=torch.int32), persistent=False)
        self.register_buffer("_offsets", torch.tensor(offsets, dtype=torch.int32), persistent=False)
        corners = [[(c >> (dim - 1 - i)) & 1 for i in range(dim)] for c in range(2**dim)]
        self.register_buffer("_corners", torch.tensor(corners, dtype=torch.int32), persistent=False)
        if backend not in ("auto", "torch", "tcnn", "triton"):
            raise ValueError(f"unknown hash-grid backend {backend!r}; use auto, torch, tcnn or triton")
        if backend == "tcnn" and not _tcnn_available():
            raise ValueError(
                "backend='tcnn' needs tinycudann and a CUDA GPU; install the [cuda] extra or use backend='torch'"
            )
        self.backend = backend
        self._tcnn: Any = None  # tinycudann.Encoding, built on first CUDA use

    def _use_tcnn(self, x: torch.Tensor) -> bool:
        return self.backend == "tcnn" or (self.backend == "auto" and x.is_cuda and _tcnn_available())

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend == "triton":
            return True
        if self.backend != "auto" or not x.is_cuda:
            return False
        try:
            from avatar.nerf.triton_hashgrid import triton_available
        except ImportError:
            return False
        return triton_available(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(0.0, 1.0)
        if not self._use_tcnn(x) and self._use_triton(x):
            from avatar.nerf.triton_hashgrid import hashgrid_triton

            return hashgrid_triton(x, self.table, self.cfg)
        if self._use_tcnn(x):
            try:
                return self._forward_tcnn(x)
            except (ImportError, AttributeError, RuntimeError) as e:
                if self.backend == "tcnn":
                    raise
                log.warning("tinycudann encoding failed (%s); using the PyTorch hash grid", e)
                self.backend = "torch"
        out = _HashGridFunction.apply(
            x, self.table, self._scales, self._mults, self._is_hash, self._rows, self._offsets, self._corners
        )
        return out.reshape(x.shape[0], self.output_dim)

    def _forward_tcnn(self, x: torch.Tensor) -> torch.Tensor:
        import tinycudann as tcnn

        if self._tcnn is None:
            enc = tcnn.Encoding(self.cfg.dim, self.cfg.tcnn_config(), dtype=torch.float32).to(x.device)
            if enc.params.numel() != self.table.numel():
                raise RuntimeError(f"tinycudann table has {enc.params.numel()} params, ours {self.table.numel()}")
            object.__setattr__(self, "_tcnn", enc)  # not a submodule: our `table` owns the weights
        # tinycudann's autograd Function takes the flat parameter vector explicitly; our table
        # flattened has the same layout, so gradients land in `self.table`.
        from tinycudann.modules import _module_function

        out = _module_function.apply(
            self._tcnn.native_tcnn_module, x.contiguous(), self.table.view(-1).contiguous(), self._tcnn.loss_scale
        )
        return out.float()

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"dim={c.dim}, levels={c.n_levels}x{c.n_features_per_level}, T=2^{c.log2_hashmap_size}, "
            f"N_min={c.base_resolution}, b={c.resolved_per_level_scale():.4f}, backend={self.backend}"
        )


def hashgrid_reference(x: torch.Tensor, table: torch.Tensor, cfg: HashGridConfig) -> torch.Tensor:
    """Brute-force reference of :class:`HashGridEncoding` (per level, per corner, Python ints).

    Written straight from the module docstring with plain autograd indexing; used by the tests.
    ``x`` [B, dim] float64/32, ``table`` [rows, F] -> [B, L * F].
    """
    scales, res, rows, offsets = level_layout(cfg)
    d = cfg.dim
    outs = []
    for lvl in range(cfg.n_levels):
        p = x * torch.tensor(scales[lvl], dtype=torch.float32).to(x.dtype) + 0.5
        v0 = torch.floor(p).long()
        f = p - torch.floor(p)
        acc = 0
        for c in range(2**d):
            bits = [(c >> i) & 1 for i in range(d)]
            v = [v0[:, i] + bits[i] for i in range(d)]
            w = 1
            for i in range(d):
                w = w * (f[:, i] if bits[i] else 1 - f[:, i])
            if res[lvl] ** d <= rows[lvl]:
                idx = sum(v[i] * res[lvl] ** i for i in range(d))
            else:
                h = torch.zeros_like(v[0])
                for i in range(d):
                    h = h ^ ((v[i] * PRIMES[i]) & 0xFFFFFFFF)
                idx = h
            idx = idx % rows[lvl] + offsets[lvl]
            acc = acc + w[:, None] * table[idx]
        outs.append(acc)
    return torch.cat(outs, dim=-1)
