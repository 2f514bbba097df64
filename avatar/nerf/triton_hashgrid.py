"""Fused multiresolution hash encoding in Triton (forward + backward), no CUDA extension needed.

The same encoding as :class:`avatar.nerf.encoding.HashGridEncoding` (Instant-NGP, Mueller et al.,
SIGGRAPH 2022, Sec. 3, Eq. 1-4; tiny-cuda-nn ``HashGrid`` with ``Linear`` interpolation), with the
exact index/interpolation semantics of ``avatar/nerf/encoding.py``'s module docstring:
``p = x * scale_l + 0.5``, lower vertex ``floor(p)``, d-linear weights, dense index
``sum_i v_i R_l**i`` or spatial hash ``XOR_i v_i * pi_i`` (uint32), ``mod T_l``, plus the level's
row offset. It is a drop-in third backend next to ``torch`` and ``tcnn``, for machines where
tiny-cuda-nn does not build (the peers' users' most common install failure).

Kernels (one program = ``BLOCK`` points x one level, like tiny-cuda-nn's grid over levels):

* forward: per level, gather the ``2**dim`` corner feature rows and blend them; nothing is stored
  for backward except the inputs (indices and weights are recomputed, which is cheaper than
  writing and reading ``[B, L, 2**dim]`` tensors);
* backward: recompute, ``atomic_add`` ``w_c * dL/dout`` into the float32 table gradient, and, when
  ``x`` needs a gradient, ``dL/dx_i = sum_l scale_l sum_c (dw_c / df_i) <dL/dout_l, feat_c>``
  written per level and summed over levels in PyTorch (deterministic).

The kernels use Triton builtins only (``tl.full``, not ``tl.zeros``/``tl.sum``, which are library
kernels): that lets the same code run in the interpreter even when ``TRITON_INTERPRET`` was not set
before triton was imported. Second derivatives are not supported (neither are they in tiny-cuda-nn's hash grid).

Devices: on CUDA tensors the kernels are compiled by Triton; on CPU tensors they run in Triton's
interpreter (the same kernel code executed with NumPy; slow, for verification only, what the tests
use on machines without a GPU). ``HashGridEncoding`` should pick this backend automatically only on
CUDA.
"""

from __future__ import annotations

import functools
import logging

import torch

from avatar.nerf.grid import HashGridConfig, level_layout

log = logging.getLogger(__name__)

__all__ = ["triton_available", "hashgrid_triton", "TritonHashGridFunction", "LevelParams", "level_params"]

SUPPORTED_FEATURES = (1, 2, 4, 8)  # tl.arange needs a power of two; tiny-cuda-nn supports the same set
_BLOCK_CUDA = 128
_BLOCK_INTERPRET = 4096  # the interpreter runs programs one after another: few, wide programs
# FMA in `x * scale + 0.5` like tiny-cuda-nn's `fmaf(scale, x, 0.5f)` (differs from the unfused
# PyTorch backend only for points within 1 ulp of a cell boundary)
_CUDA_OPTIONS = {"num_warps": 4, "enable_fp_fusion": True}

try:  # triton is optional (the `cuda` extra); everything else falls back to PyTorch without it
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as e:  # ImportError, or a broken install raising at import
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = e


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when this backend can run on ``device``.

    ``None`` or a CUDA device: Triton imports and a CUDA GPU is present (the production case).
    A CPU device: Triton imports (kernels run in Triton's interpreter, slowly).
    """
    if triton is None:
        return False
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cpu":
        return True
    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Kernel bodies (plain Python functions; wrapped by `triton.jit` for CUDA and by the interpreter
# for CPU tensors in `_kernels`).
# --------------------------------------------------------------------------------------------


def _corner(c: tl.constexpr, D: tl.constexpr, v0, v1, v2, f0, f1, f2, R, T, hashed):
    """Index (int64 row within the level) and weight of corner ``c`` (a compile-time constant).

    Bit ``i`` of ``c`` selects the upper vertex on axis ``i``.
    """
    if c & 1:
        i0 = v0 + 1
        w = f0
    else:
        i0 = v0
        w = 1.0 - f0
    if (c >> 1) & 1:
        i1 = v1 + 1
        w = w * f1
    else:
        i1 = v1
        w = w * (1.0 - f1)
    u0 = i0.to(tl.uint32)
    u1 = i1.to(tl.uint32)
    Ru = R.to(tl.uint32)
    dense = u0 + u1 * Ru
    hsh = u0 ^ (u1 * tl.full((), 2654435761, tl.uint32))
    if D == 3:
        if (c >> 2) & 1:
            i2 = v2 + 1
            w = w * f2
        else:
            i2 = v2
            w = w * (1.0 - f2)
        u2 = i2.to(tl.uint32)
        dense = dense + u2 * Ru * Ru
        hsh = hsh ^ (u2 * tl.full((), 805459861, tl.uint32))
    idx = tl.where(hashed != 0, hsh, dense) % T.to(tl.uint32)
    return idx.to(tl.int64), w


def _dweight(c: tl.constexpr, i: tl.constexpr, D: tl.constexpr, f0, f1, f2):
    """d w_c / d f_i for corner ``c`` and axis ``i`` (both compile-time constants)."""
    if (c >> i) & 1:
        g = tl.full(f0.shape, 1.0, tl.float32)
    else:
        g = tl.full(f0.shape, -1.0, tl.float32)
    if i != 0:
        if c & 1:
            g = g * f0
        else:
            g = g * (1.0 - f0)
    if i != 1:
        if (c >> 1) & 1:
            g = g * f1
        else:
            g = g * (1.0 - f1)
    if D == 3:
        if i != 2:
            if (c >> 2) & 1:
                g = g * f2
            else:
                g = g * (1.0 - f2)
    return g


def _setup(x_ptr, scales_ptr, res_ptr, rows_ptr, offsets_ptr, hashed_ptr, B, D: tl.constexpr, BLOCK: tl.constexpr):
    """Point offsets, mask, level constants and per-axis (vertex, fraction) of this program."""
    pid = tl.program_id(0)
    lvl = tl.program_id(1)
    pts = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = pts < B
    scale = tl.load(scales_ptr + lvl)
    R = tl.load(res_ptr + lvl)
    T = tl.load(rows_ptr + lvl)
    row0 = tl.load(offsets_ptr + lvl).to(tl.int64)
    hashed = tl.load(hashed_ptr + lvl)
    p0 = tl.load(x_ptr + pts * D, mask=mask, other=0.0) * scale + 0.5
    p1 = tl.load(x_ptr + pts * D + 1, mask=mask, other=0.0) * scale + 0.5
    fl0 = tl.floor(p0)
    fl1 = tl.floor(p1)
    if D == 3:
        p2 = tl.load(x_ptr + pts * D + 2, mask=mask, other=0.0) * scale + 0.5
        fl2 = tl.floor(p2)
        f2 = p2 - fl2
        v2 = fl2.to(tl.int32)
    else:
        f2 = p0  # unused when D == 2
        v2 = fl0.to(tl.int32)
    return (pts, mask, lvl, scale, R, T, row0, hashed, fl0.to(tl.int32), fl1.to(tl.int32), v2, p0 - fl0, p1 - fl1, f2)


def _fwd_body(
    x_ptr,
    table_ptr,
    out_ptr,
    scales_ptr,
    res_ptr,
    rows_ptr,
    offsets_ptr,
    hashed_ptr,
    B,
    L,
    D: tl.constexpr,
    F: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pts, mask, lvl, scale, R, T, row0, hashed, v0, v1, v2, f0, f1, f2 = _setup(
        x_ptr, scales_ptr, res_ptr, rows_ptr, offsets_ptr, hashed_ptr, B, D, BLOCK
    )
    feat = tl.arange(0, F)
    acc = tl.full((BLOCK, F), 0.0, tl.float32)
    for c in tl.static_range(2**D):
        idx, w = _corner(c, D, v0, v1, v2, f0, f1, f2, R, T, hashed)
        rows = (row0 + idx) * F
        val = tl.load(table_ptr + rows[:, None] + feat[None, :], mask=mask[:, None], other=0.0)
        acc += w[:, None] * val.to(tl.float32)
    out_off = pts[:, None] * (L * F) + lvl * F + feat[None, :]
    tl.store(out_ptr + out_off, acc, mask=mask[:, None])


def _bwd_body(
    x_ptr,
    table_ptr,
    grad_out_ptr,
    grad_table_ptr,
    grad_x_ptr,
    scales_ptr,
    res_ptr,
    rows_ptr,
    offsets_ptr,
    hashed_ptr,
    B,
    L,
    D: tl.constexpr,
    F: tl.constexpr,
    BLOCK: tl.constexpr,
    NEED_TABLE: tl.constexpr,
    NEED_X: tl.constexpr,
):
    pts, mask, lvl, scale, R, T, row0, hashed, v0, v1, v2, f0, f1, f2 = _setup(
        x_ptr, scales_ptr, res_ptr, rows_ptr, offsets_ptr, hashed_ptr, B, D, BLOCK
    )
    feat = tl.arange(0, F)
    g = tl.load(grad_out_ptr + pts[:, None] * (L * F) + lvl * F + feat[None, :], mask=mask[:, None], other=0.0).to(
        tl.float32
    )
    gx0 = tl.full((BLOCK,), 0.0, tl.float32)
    gx1 = tl.full((BLOCK,), 0.0, tl.float32)
    gx2 = tl.full((BLOCK,), 0.0, tl.float32)
    for c in tl.static_range(2**D):
        idx, w = _corner(c, D, v0, v1, v2, f0, f1, f2, R, T, hashed)
        rows = (row0 + idx) * F
        if NEED_TABLE:
            tl.atomic_add(grad_table_ptr + rows[:, None] + feat[None, :], w[:, None] * g, mask=mask[:, None])
        if NEED_X:
            # <dL/dout_l, feat_c>, one feature column at a time (no tl.sum: see module docstring)
            dot = tl.full((BLOCK,), 0.0, tl.float32)
            for f in tl.static_range(F):
                gf = tl.load(grad_out_ptr + pts * (L * F) + lvl * F + f, mask=mask, other=0.0).to(tl.float32)
                vf = tl.load(table_ptr + rows + f, mask=mask, other=0.0).to(tl.float32)
                dot += vf * gf
            gx0 += _dweight(c, 0, D, f0, f1, f2) * dot
            gx1 += _dweight(c, 1, D, f0, f1, f2) * dot
            if D == 3:
                gx2 += _dweight(c, 2, D, f0, f1, f2) * dot
    if NEED_X:
        base = pts * (L * D) + lvl * D
        tl.store(grad_x_ptr + base, gx0 * scale, mask=mask)
        tl.store(grad_x_ptr + base + 1, gx1 * scale, mask=mask)
        if D == 3:
            tl.store(grad_x_ptr + base + 2, gx2 * scale, mask=mask)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """(forward, backward) kernels: compiled (``interpret=False``) or interpreted (CPU tensors)."""
    if triton is None:
        raise RuntimeError(f"triton is not importable ({_TRITON_IMPORT_ERROR}); install the [cuda] extra")
    from triton import knobs

    old = knobs.runtime.interpret
    knobs.runtime.interpret = interpret  # `triton.jit` picks the interpreter at decoration time
    try:
        helpers = {f.__name__: triton.jit(f) for f in (_corner, _dweight, _setup)}
        kernels = []
        for body in (_fwd_body, _bwd_body):
            # give each kernel body a globals dict in which the helpers are the jitted versions
            glb = dict(body.__globals__)
            glb.update(helpers)
            fn = type(body)(body.__code__, glb, body.__name__, body.__defaults__, body.__closure__)
            fn.__annotations__ = body.__annotations__
            fn.__module__ = body.__module__
            fn.__qualname__ = body.__qualname__
            kernels.append(triton.jit(fn))
    finally:
        knobs.runtime.interpret = old
    return tuple(kernels)


class LevelParams:
    """Per-level constants of a hash grid on one device (from :func:`avatar.nerf.encoding.level_layout`).

    Tensors ``[L]``: ``scales`` float32 (``scale_l``), ``res`` int32 (``R_l``), ``rows`` int32
    (``T_l``), ``offsets`` int32 (first table row of the level), ``hashed`` int32 (1 = spatial hash).
    """

    def __init__(self, cfg: HashGridConfig, device: torch.device):
        if cfg.dim not in (2, 3):
            raise ValueError(f"the Triton hash grid supports dim 2 or 3, got {cfg.dim}")
        if cfg.n_features_per_level not in SUPPORTED_FEATURES:
            raise ValueError(
                f"the Triton hash grid needs n_features_per_level in {SUPPORTED_FEATURES}, "
                f"got {cfg.n_features_per_level}; use backend='torch'"
            )
        scales, res, rows, offsets = level_layout(cfg)
        if sum(rows) * cfg.n_features_per_level >= 2**31:
            raise ValueError("hash table too large for int32 offsets; lower log2_hashmap_size")
        self.dim = cfg.dim
        self.n_levels = cfg.n_levels
        self.n_features = cfg.n_features_per_level
        self.table_rows = sum(rows)
        self.scales = torch.tensor(scales, dtype=torch.float32, device=device)
        self.res = torch.tensor(res, dtype=torch.int32, device=device)
        self.rows = torch.tensor(rows, dtype=torch.int32, device=device)
        self.offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
        self.hashed = torch.tensor([int(r**cfg.dim > t) for r, t in zip(res, rows)], dtype=torch.int32, device=device)


def _cfg_key(cfg: HashGridConfig) -> tuple:
    return (
        cfg.dim,
        cfg.n_levels,
        cfg.n_features_per_level,
        cfg.log2_hashmap_size,
        cfg.base_resolution,
        cfg.finest_resolution,
        cfg.per_level_scale,
    )


@functools.lru_cache(maxsize=64)
def _level_params_cached(key: tuple, device: torch.device) -> LevelParams:
    return LevelParams(HashGridConfig(*key), device)


def level_params(cfg: HashGridConfig, device: torch.device | str) -> LevelParams:
    """Cached :class:`LevelParams` of ``cfg`` on ``device``."""
    return _level_params_cached(_cfg_key(cfg), torch.device(device))


def _launch_shape(B: int, L: int, interpret: bool) -> tuple[int, tuple[int, int]]:
    block = _BLOCK_INTERPRET if interpret else _BLOCK_CUDA
    return block, (triton.cdiv(B, block), L)


class TritonHashGridFunction(torch.autograd.Function):
    """``out [B, L*F] float32 = hashgrid(x [B, d] float32 in [0,1], table [rows, F])``.

    ``table`` may be float32, float16 or bfloat16 (gathered and blended in float32); its gradient is
    accumulated in float32 with atomics and returned in the table's dtype. Gradients flow to
    ``table`` and to ``x`` (first order only).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, params: LevelParams) -> torch.Tensor:
        B = x.shape[0]
        L, F = params.n_levels, params.n_features
        interpret = not x.is_cuda
        fwd, _ = _kernels(interpret)
        out = torch.empty(B, L * F, dtype=torch.float32, device=x.device)
        if B > 0:
            block, grid = _launch_shape(B, L, interpret)
            extra = {} if interpret else _CUDA_OPTIONS
            fwd[grid](
                x,
                table,
                out,
                params.scales,
                params.res,
                params.rows,
                params.offsets,
                params.hashed,
                B,
                L,
                D=params.dim,
                F=F,
                BLOCK=block,
                **extra,
            )
        ctx.save_for_backward(x, table)
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, table = ctx.saved_tensors
        params: LevelParams = ctx.params
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_table):
            return None, None, None
        B = x.shape[0]
        L, F, D = params.n_levels, params.n_features, params.dim
        grad_out = grad_out.float().contiguous()
        grad_table = torch.zeros(table.shape, dtype=torch.float32, device=x.device) if need_table else None
        grad_x_lvl = torch.empty(B, L, D, dtype=torch.float32, device=x.device) if need_x else None
        if B > 0:
            interpret = not x.is_cuda
            _, bwd = _kernels(interpret)
            block, grid = _launch_shape(B, L, interpret)
            extra = {} if interpret else _CUDA_OPTIONS
            dummy = grad_out  # any tensor; never dereferenced when its flag is off
            bwd[grid](
                x,
                table,
                grad_out,
                grad_table if need_table else dummy,
                grad_x_lvl if need_x else dummy,
                params.scales,
                params.res,
                params.rows,
                params.offsets,
                params.hashed,
                B,
                L,
                D=D,
                F=F,
                BLOCK=block,
                NEED_TABLE=bool(need_table),
                NEED_X=bool(need_x),
                **extra,
            )
        grad_x = grad_x_lvl.sum(1).to(x.dtype) if need_x else None
        if need_table:
            grad_table = grad_table.to(table.dtype)
        return grad_x, grad_table, None


def hashgrid_triton(x: torch.Tensor, table: torch.Tensor, cfg: HashGridConfig) -> torch.Tensor:
    """Hash-grid encoding of ``x`` with the Triton kernels (semantics of ``avatar/nerf/encoding.py``).

    Args:
        x: float32 ``[B, cfg.dim]`` in ``[0, 1]`` (the caller clamps; values outside wrap like the
            other backends). Other float dtypes are converted to float32.
        table: ``[sum_l T_l, cfg.n_features_per_level]`` float32/float16/bfloat16, on ``x``'s device.
        cfg: the grid's :class:`HashGridConfig`.

    Returns:
        float32 ``[B, n_levels * n_features_per_level]``, level-major (``out[:, l * F + f]``).

    Raises:
        RuntimeError: Triton is not installed (or, for CUDA tensors, no GPU).
        ValueError: shapes/devices disagree with ``cfg``, or an unsupported ``n_features_per_level``.

    Source: Mueller et al., "Instant Neural Graphics Primitives", SIGGRAPH 2022, Sec. 3.
    """
    if not triton_available(x.device):
        raise RuntimeError(
            "the Triton hash grid needs `triton` (pip install the [cuda] extra) "
            f"and, for CUDA tensors, a GPU; import error: {_TRITON_IMPORT_ERROR}"
        )
    if x.dim() != 2 or x.shape[1] != cfg.dim:
        raise ValueError(f"x must be [B, {cfg.dim}], got {tuple(x.shape)}")
    params = level_params(cfg, x.device)
    if table.shape != (params.table_rows, cfg.n_features_per_level):
        raise ValueError(f"table must be [{params.table_rows}, {cfg.n_features_per_level}], got {tuple(table.shape)}")
    if table.device != x.device:
        raise ValueError(f"x is on {x.device} but the table on {table.device}")
    if table.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"table dtype must be float32/float16/bfloat16, got {table.dtype}")
    return TritonHashGridFunction.apply(x.float().contiguous(), table.contiguous(), params)


def compile_for_arch(
    arch: int = 90, dims: tuple[int, ...] = (2, 3), features: tuple[int, ...] = (2,), table_dtype: str = "fp32"
) -> dict[str, int]:
    """Compile the forward and backward kernels ahead of time for CUDA ``sm_{arch}`` (no GPU needed).

    Runs Triton's full pipeline (Triton IR -> LLVM -> PTX -> ``ptxas`` cubin) for every
    ``dim`` x ``F`` x backward-flag variant, so a broken kernel is caught on a CPU-only machine.
    ``table_dtype`` is Triton's pointer type name (``fp32``, ``fp16``, ``bf16``).

    Returns:
        ``{variant name: size of the cubin in bytes}``.

    Raises:
        RuntimeError: Triton is not installed. Triton's ``CompilationError`` for a kernel bug.
    """
    if triton is None:
        raise RuntimeError(f"triton is not importable ({_TRITON_IMPORT_ERROR}); install the [cuda] extra")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fwd, bwd = _kernels(False)
    target = GPUTarget("cuda", arch, 32)
    lvl = {
        "scales_ptr": "*fp32",
        "res_ptr": "*i32",
        "rows_ptr": "*i32",
        "offsets_ptr": "*i32",
        "hashed_ptr": "*i32",
        "B": "i32",
        "L": "i32",
    }
    opts = dict(_CUDA_OPTIONS)
    result = {}
    for D in dims:
        for F in features:
            sig = {
                "x_ptr": "*fp32",
                "table_ptr": f"*{table_dtype}",
                "out_ptr": "*fp32",
                **lvl,
                "D": "constexpr",
                "F": "constexpr",
                "BLOCK": "constexpr",
            }
            variants = [("fwd", fwd, sig, {"D": D, "F": F, "BLOCK": _BLOCK_CUDA})]
            sig_b = {
                "x_ptr": "*fp32",
                "table_ptr": f"*{table_dtype}",
                "grad_out_ptr": "*fp32",
                "grad_table_ptr": "*fp32",
                "grad_x_ptr": "*fp32",
                **lvl,
                "D": "constexpr",
                "F": "constexpr",
                "BLOCK": "constexpr",
                "NEED_TABLE": "constexpr",
                "NEED_X": "constexpr",
            }
            for nt, nx in ((True, True), (True, False), (False, True)):
                variants.append(
                    (
                        f"bwd{'_table' if nt else ''}{'_x' if nx else ''}",
                        bwd,
                        sig_b,
                        {"D": D, "F": F, "BLOCK": _BLOCK_CUDA, "NEED_TABLE": nt, "NEED_X": nx},
                    )
                )
            for name, kern, s, const in variants:
                k = triton.compile(ASTSource(kern, s, constexprs=const), target=target, options=opts)
                result[f"{name}_d{D}_f{F}_sm{arch}"] = len(k.asm["cubin"])
    return result
