"""The Triton hash-grid kernels against ``hashgrid_reference`` (values and gradients).

On CPU the kernels run in Triton's interpreter (small sizes); the same kernels are compiled for
sm_90 ahead of time (no GPU needed) so a kernel that only fails to compile is caught here too.
The ``cuda`` tests run the compiled kernels on a real GPU at production sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton not installed (pip install triton)")

from avatar.nerf.encoding import HashGridConfig, HashGridEncoding, hashgrid_reference, level_layout  # noqa: E402
from avatar.nerf.triton_hashgrid import compile_for_arch, hashgrid_triton, triton_available  # noqa: E402

# small grids that still have both dense and hashed levels
CFG2 = HashGridConfig(
    dim=2, n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, finest_resolution=64
)
CFG3 = HashGridConfig(
    dim=3, n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, finest_resolution=64
)


def _table(cfg: HashGridConfig, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    rows = sum(level_layout(cfg)[2])
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, cfg.n_features_per_level, generator=g) * 2 - 1).to(dtype)


def _levels_kinds(cfg: HashGridConfig) -> set[bool]:
    _, res, rows, _ = level_layout(cfg)
    return {r**cfg.dim > t for r, t in zip(res, rows)}


def _points(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, dim, generator=g)
    x[:4] = torch.tensor([[0.0] * dim, [1.0] * dim, [0.5] * dim, [1.0] + [0.0] * (dim - 1)])  # edges
    return x


@pytest.mark.parametrize("cfg", [CFG2, CFG3], ids=["2d", "3d"])
def test_forward_matches_reference(cfg):
    assert _levels_kinds(cfg) == {False, True}, "test grid must have dense and hashed levels"
    x = _points(1500, cfg.dim, seed=1)  # not a multiple of the block: exercises the tail mask
    table = _table(cfg)
    out = hashgrid_triton(x, table, cfg)
    ref = hashgrid_reference(x.double(), table.double(), cfg)
    assert out.dtype == torch.float32 and out.shape == (1500, cfg.n_levels * cfg.n_features_per_level)
    np.testing.assert_allclose(out.double().numpy(), ref.numpy(), atol=2e-5, rtol=0)
    assert ref.abs().max() > 0.1  # a non-trivial comparison


@pytest.mark.parametrize("cfg", [CFG2, CFG3], ids=["2d", "3d"])
def test_gradients_match_reference(cfg):
    x = _points(700, cfg.dim, seed=2)[4:].clone().requires_grad_(True)  # interior points: x-grad is defined
    table = _table(cfg, seed=3).requires_grad_(True)
    g = torch.randn(x.shape[0], cfg.n_levels * cfg.n_features_per_level, generator=torch.Generator().manual_seed(4))
    gx, gt = torch.autograd.grad(hashgrid_triton(x, table, cfg), (x, table), g)

    xr = x.detach().double().requires_grad_(True)
    tr = table.detach().double().requires_grad_(True)
    gxr, gtr = torch.autograd.grad(hashgrid_reference(xr, tr, cfg), (xr, tr), g.double())
    np.testing.assert_allclose(gt.double().numpy(), gtr.numpy(), atol=5e-5, rtol=0)
    # d out / d x scales with the finest resolution (~64 here): compare relative to the magnitude
    np.testing.assert_allclose(gx.double().numpy(), gxr.numpy(), atol=1e-5 * float(gxr.abs().max()), rtol=0)
    assert (gtr != 0).sum() > 100


def test_table_only_and_x_only_gradients():
    cfg = CFG3
    x = _points(300, 3, seed=5)[4:]
    table = _table(cfg, seed=6)
    # table only (the usual NeRF case: sample positions are constants)
    t1 = table.clone().requires_grad_(True)
    hashgrid_triton(x, t1, cfg).square().sum().backward()
    t2 = table.double().requires_grad_(True)
    hashgrid_reference(x.double(), t2, cfg).square().sum().backward()
    np.testing.assert_allclose(t1.grad.double().numpy(), t2.grad.numpy(), atol=5e-5, rtol=0)
    # x only (a frozen grid queried by a trainable network, e.g. the ambient coordinate)
    x1 = x.clone().requires_grad_(True)
    hashgrid_triton(x1, table, cfg).sum().backward()
    x2 = x.double().requires_grad_(True)
    hashgrid_reference(x2, table.double(), cfg).sum().backward()
    np.testing.assert_allclose(x1.grad.double().numpy(), x2.grad.numpy(), atol=1e-5 * float(x2.grad.abs().max()))


@pytest.mark.parametrize("F", [1, 4])
def test_other_feature_widths(F):
    cfg = HashGridConfig(
        dim=3, n_levels=3, n_features_per_level=F, log2_hashmap_size=9, base_resolution=4, finest_resolution=32
    )
    x = _points(200, 3, seed=7)
    table = _table(cfg, seed=8)
    ref = hashgrid_reference(x.double(), table.double(), cfg)
    np.testing.assert_allclose(hashgrid_triton(x, table, cfg).double().numpy(), ref.numpy(), atol=2e-5)


def test_half_table_forward_and_grad_dtype():
    cfg = CFG2
    x = _points(300, 2, seed=9)
    table = _table(cfg, seed=10, dtype=torch.float16).requires_grad_(True)
    out = hashgrid_triton(x, table, cfg)
    ref = hashgrid_reference(x.double(), table.detach().double(), cfg)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.detach().double().numpy(), ref.numpy(), atol=2e-5)  # fp32 blend of fp16 rows
    out.sum().backward()
    assert table.grad.dtype == torch.float16 and torch.isfinite(table.grad).all()


def test_matches_module_with_production_config():
    """The NeRF's real head-grid config (16 levels, T=2^16, 16..2048): Triton == torch backend."""
    enc = HashGridEncoding(3, 16, 2, 16, 16, 2048, backend="torch")
    with torch.no_grad():
        enc.table.uniform_(-1, 1)
    x = _points(256, 3, seed=11)
    np.testing.assert_allclose(
        hashgrid_triton(x, enc.table.detach(), enc.cfg).numpy(), enc(x).detach().numpy(), atol=2e-5
    )


def test_empty_batch():
    out = hashgrid_triton(torch.empty(0, 3), _table(CFG3), CFG3)
    assert out.shape == (0, 8)


def test_bad_inputs_raise():
    table = _table(CFG3)
    with pytest.raises(ValueError, match=r"x must be \[B, 3\]"):
        hashgrid_triton(torch.rand(10, 2), table, CFG3)
    with pytest.raises(ValueError, match="table must be"):
        hashgrid_triton(torch.rand(10, 3), table[:-1], CFG3)
    with pytest.raises(ValueError, match="dtype"):
        hashgrid_triton(torch.rand(10, 3), table.double(), CFG3)
    cfg = HashGridConfig(
        dim=3, n_levels=2, n_features_per_level=3, log2_hashmap_size=8, base_resolution=4, finest_resolution=8
    )
    with pytest.raises(ValueError, match="n_features_per_level"):
        hashgrid_triton(torch.rand(10, 3), _table(cfg), cfg)


def test_availability_on_this_machine():
    assert triton_available("cpu")
    assert triton_available() == torch.cuda.is_available()


def test_kernels_compile_for_h100():
    """Full Triton -> PTX -> ptxas pipeline for sm_90, every dim x backward variant (no GPU needed)."""
    sizes = compile_for_arch(90, dims=(2, 3), features=(2,))
    assert len(sizes) == 8 and all(n > 1000 for n in sizes.values()), sizes


# ------------------------------------------------------------------------------ real GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dim", [2, 3])
def test_cuda_matches_torch_backend(dim):
    dev = torch.device("cuda")
    enc = HashGridEncoding(dim, 16, 2, 19 if dim == 3 else 14, 16, 2048, backend="torch").to(dev)
    with torch.no_grad():
        enc.table.uniform_(-1, 1)
    x = torch.rand(1 << 18, dim, device=dev, requires_grad=True)
    g = torch.randn(x.shape[0], enc.output_dim, device=dev)
    out_t = hashgrid_triton(x, enc.table, enc.cfg)
    gx_t, gt_t = torch.autograd.grad(out_t, (x, enc.table), g)
    out_r = enc(x)
    gx_r, gt_r = torch.autograd.grad(out_r, (x, enc.table), g)
    # FMA vs unfused `x * scale + 0.5` may move a point within 1 ulp of a cell boundary to the next
    # cell: values and table gradients are continuous there, the input gradient is not
    torch.testing.assert_close(out_t, out_r, atol=1e-4, rtol=0)
    torch.testing.assert_close(gt_t, gt_r, atol=1e-2, rtol=1e-3)
    bad = ((gx_t - gx_r).abs() > 1e-2 + 1e-3 * gx_r.abs()).any(1)
    assert bad.float().mean() < 1e-4, f"{int(bad.sum())} points with a different input gradient"


@pytest.mark.cuda
def test_cuda_matches_tinycudann():
    tcnn = pytest.importorskip("tinycudann")  # noqa: F841
    enc = HashGridEncoding(3, 16, 2, 19, 16, 2048, backend="tcnn").cuda()
    with torch.no_grad():
        enc.table.uniform_(-1, 1)
    x = torch.rand(1 << 16, 3, device="cuda")
    out_tcnn = enc(x)
    out = hashgrid_triton(x, enc.table, enc.cfg)
    torch.testing.assert_close(out, out_tcnn, atol=1e-3, rtol=1e-3)  # tcnn may blend in fp16
