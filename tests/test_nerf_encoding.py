"""Hash-grid encoding: brute-force reference values + gradients (2-D, 3-D), layout, tcnn parity."""

from __future__ import annotations

import pytest
import torch

from avatar.nerf.encoding import HashGridConfig, HashGridEncoding, hashgrid_reference, level_layout


@pytest.mark.parametrize("dim", [2, 3])
def test_matches_bruteforce_values_and_gradients(dim):
    torch.manual_seed(dim)
    enc = HashGridEncoding(
        dim=dim,
        n_levels=6,
        n_features_per_level=2,
        log2_hashmap_size=9,
        base_resolution=4,
        finest_resolution=64,
        backend="torch",
    )
    assert enc._is_hash.any() and (~enc._is_hash).any(), "config must exercise dense and hashed levels"
    with torch.no_grad():
        enc.table.uniform_(-1, 1)
    x = torch.rand(300, dim)
    x[:4] = torch.tensor([[0.0] * dim, [1.0] * dim, [0.5] * dim, [1.0, 0.0, 1.0][:dim]])  # borders wrap like tcnn
    x.requires_grad_(True)
    y = enc(x)
    assert y.shape == (300, 12) and y.dtype == torch.float32
    yr = hashgrid_reference(x, enc.table, enc.cfg)
    torch.testing.assert_close(y, yr, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y)
    gx, gt = torch.autograd.grad((y * g).sum(), [x, enc.table])
    gxr, gtr = torch.autograd.grad((yr * g).sum(), [x, enc.table])
    torch.testing.assert_close(gt, gtr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx[4:], gxr[4:], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dim", [2, 3])
def test_gradcheck_double(dim):
    torch.manual_seed(0)
    enc = HashGridEncoding(dim=dim, n_levels=3, log2_hashmap_size=6, base_resolution=3, finest_resolution=12).double()
    with torch.no_grad():
        enc.table.uniform_(-1, 1)
    x = (torch.rand(8, dim, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    table = enc.table

    def f(x, t):
        from avatar.nerf.encoding import _HashGridFunction

        return _HashGridFunction.apply(
            x, t, enc._scales, enc._mults, enc._is_hash, enc._rows, enc._offsets, enc._corners
        )

    assert torch.autograd.gradcheck(f, (x, table), eps=1e-6, atol=1e-5)


def test_level_layout_follows_tcnn():
    # tiny-cuda-nn: scale_l = N_min * b^l - 1, R_l = ceil(scale_l) + 1 (base 16, finest 512, 16 levels)
    cfg = HashGridConfig(dim=3, n_levels=16, log2_hashmap_size=19, base_resolution=16, finest_resolution=512)
    scales, res, rows, offsets = level_layout(cfg)
    assert scales[0] == 15.0 and res[0] == 16 and rows[0] == 16**3
    assert res[-1] == 512 and rows[-1] == 2**19
    assert abs(scales[1] - (16 * 32 ** (1 / 15) - 1)) < 1e-4
    assert offsets[1] == rows[0] and all(r % 8 == 0 for r in rows)


def test_rejects_bad_dim_and_backend():
    with pytest.raises(ValueError):
        HashGridEncoding(dim=4)
    with pytest.raises(ValueError):
        HashGridEncoding(dim=3, backend="nope")


@pytest.mark.cuda
def test_matches_tinycudann():
    pytest.importorskip("tinycudann")
    torch.manual_seed(0)
    ours = HashGridEncoding(
        dim=3, n_levels=8, log2_hashmap_size=14, base_resolution=16, finest_resolution=512, backend="torch"
    ).cuda()
    theirs = HashGridEncoding(
        dim=3, n_levels=8, log2_hashmap_size=14, base_resolution=16, finest_resolution=512, backend="tcnn"
    ).cuda()
    with torch.no_grad():
        ours.table.uniform_(-1, 1)
        theirs.table.copy_(ours.table)
    x = torch.rand(4096, 3, device="cuda", requires_grad=True)
    y0, y1 = ours(x), theirs(x)
    torch.testing.assert_close(y0, y1, atol=1e-4, rtol=1e-3)
    g = torch.randn_like(y0)
    (y0 * g).sum().backward()
    (y1 * g).sum().backward()
    torch.testing.assert_close(ours.table.grad, theirs.table.grad, atol=1e-3, rtol=1e-3)


@pytest.mark.cuda
def test_torch_backend_cuda_matches_cpu():
    torch.manual_seed(0)
    enc = HashGridEncoding(
        dim=3, n_levels=8, log2_hashmap_size=14, base_resolution=16, finest_resolution=512, backend="torch"
    )
    with torch.no_grad():
        enc.table.uniform_(-1, 1)
    x = torch.rand(4096, 3)
    y_cpu = enc(x)
    y_gpu = enc.cuda()(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-5, rtol=1e-5)


def test_triton_backend_matches_torch_backend():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    kw = dict(dim=3, n_levels=4, log2_hashmap_size=8, base_resolution=4, finest_resolution=32)
    ours, tri = HashGridEncoding(**kw, backend="torch"), HashGridEncoding(**kw, backend="triton")
    with torch.no_grad():
        ours.table.uniform_(-1, 1)
        tri.table.copy_(ours.table)
    x = torch.rand(64, 3)
    y0, y1 = ours(x), tri(x)  # CPU: Triton's interpreter
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y0)
    (y0 * g).sum().backward()
    (y1 * g).sum().backward()
    torch.testing.assert_close(tri.table.grad, ours.table.grad, atol=1e-5, rtol=1e-5)
