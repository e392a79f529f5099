"""The dense backend on a full layout (every block kept, e.g. ``sparsify(..., sparsity=0)``): one
permuting copy of ``values`` instead of a scatter, and no finiteness check, since there is no
structural zero a dense product could multiply. Results must equal the reference backend's, NaN
and Inf included, and follow every write to ``values``."""
import torch

from sparsebert import BlockLayout, BlockSparseLinear
from sparsebert.ops import backends, dense, reference


def _full(R=3, C=4, bn=16, bk=32):
    return BlockLayout.dense((R * bn, C * bk), (bn, bk))


def _problem(lay, M=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, K = lay.shape
    bn, bk = lay.block
    x = torch.randn(M, K, generator=g, dtype=dtype)
    v = torch.randn(lay.nnz, bn, bk, generator=g, dtype=dtype)
    return x, v, torch.randn(N, generator=g, dtype=dtype), torch.randn(M, N, generator=g, dtype=dtype)


def test_full_layout_equals_reference_fp64():
    lay = _full()
    lt = lay.tensors()
    x, v, b, dy = _problem(lay)
    assert dense.is_full(lt)
    assert torch.equal(dense.densify_values(v, lt), lay.scatter(v))
    torch.testing.assert_close(dense.forward(x, v, b, lt), reference.forward(x, v, b, lt), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense.grad_input(dy, v, lt), reference.grad_input(dy, v, lt), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense.grad_weight(x, dy, lt), reference.grad_weight(x, dy, lt), rtol=1e-12, atol=1e-12)


def test_partial_layout_densify_puts_each_block_in_place():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    lay = BlockLayout.from_mask(mask, (16, 32))
    lt = lay.tensors()
    x, v, b, dy = _problem(lay, seed=1)
    assert not dense.is_full(lt)
    W = dense.densify_values(v, lt)
    for i, (r, c) in enumerate(zip(lt.row_idx.tolist(), lt.col_idx.tolist())):
        assert torch.equal(W[r * 16:(r + 1) * 16, c * 32:(c + 1) * 32], v[i])
    assert torch.count_nonzero(W) == v.count_nonzero()
    torch.testing.assert_close(dense.grad_weight(x, dy, lt), reference.grad_weight(x, dy, lt), rtol=1e-12, atol=1e-12)


def test_full_layout_non_finite_inputs_match_reference_without_the_structural_path(monkeypatch):
    lay = _full()
    lt = lay.tensors()
    x, v, b, dy = _problem(lay, dtype=torch.float32, seed=2)
    x[1, 5], x[4, 40], x[7, 100] = float("nan"), float("inf"), float("-inf")
    dy[2, 3], dy[6, 30] = float("inf"), float("nan")
    ry, rdx = reference.forward(x, v, b, lt), reference.grad_input(dy, v, lt)
    calls = []
    for op in ("forward", "grad_input"):
        real = getattr(reference, op)
        monkeypatch.setattr(reference, op, lambda *a, _op=op, _f=real: calls.append(_op) or _f(*a))
    y, dx = dense.forward(x, v, b, lt), dense.grad_input(dy, v, lt)
    assert calls == []                     # nothing structural to protect at full density
    for out, ref in ((y, ry), (dx, rdx)):
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
        assert torch.equal(torch.isposinf(out), torch.isposinf(ref))
        assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
        fin = torch.isfinite(ref)
        torch.testing.assert_close(out[fin], ref[fin], rtol=1e-4, atol=1e-4)


def test_full_layer_on_dense_backend_sees_every_write_and_trains_like_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, dtype=torch.float64)
    layers = {n: BlockSparseLinear.from_dense(lin, sparsity=0.0, block=(32, 32), backend=n)
              for n in ("dense", "reference")}
    assert layers["dense"].layout.density == 1.0
    x = torch.randn(19, 128, dtype=torch.float64)
    opts = {n: torch.optim.AdamW(l.parameters(), lr=1e-2, fused=False) for n, l in layers.items()}
    for _ in range(3):
        losses = {}
        for n, l in layers.items():
            loss = (l(x) ** 2).mean()
            loss.backward()
            opts[n].step()
            opts[n].zero_grad()
            losses[n] = loss.item()
        assert abs(losses["dense"] - losses["reference"]) < 1e-12
    for l in layers.values():
        l.values.data.mul_(-2.0)              # no version bump seen by autograd-unaware caches
    torch.testing.assert_close(layers["dense"](x), layers["reference"](x), rtol=1e-12, atol=1e-12)
    assert backends.get("dense").NAME == "dense"


def test_dense_backend_reuses_its_cpu_scratch_weight_only_without_autograd():
    from sparsebert.layout import BlockLayout
    from sparsebert.ops import dense, reference
    torch.manual_seed(0)
    dense.empty_cache()
    lay = BlockLayout.from_mask(torch.ones(1, 1, dtype=torch.bool), (16, 16), (16, 16))
    with torch.inference_mode():                    # a scratch made in inference mode...
        dense.forward(torch.randn(2, 16), torch.randn(1, 16, 16), None, lay.tensors("cpu"))
    dense.forward(torch.randn(2, 16), torch.randn(1, 16, 16), None, lay.tensors("cpu"))   # ...serves outside
    outs, ptrs = [], []
    for N, K, keep in ((32, 64, None), (48, 32, None), (48, 32, 0.5)):   # two full layouts, one partial
        mask = torch.ones(N // 16, K // 16, dtype=torch.bool) if keep is None else torch.rand(N // 16, K // 16) < keep
        mask[0, 0] = True
        lay = BlockLayout.from_mask(mask, (16, 16), (N, K))
        lt = lay.tensors("cpu")
        values, x = torch.randn(lay.nnz, 16, 16), torch.randn(5, K)
        y = dense.forward(x, values, None, lt)
        outs.append((y, reference.forward(x, values, None, lt)))
        ptrs.append(dense._scratch.buffers[torch.float32].data_ptr())
    assert ptrs[0] == ptrs[1] == ptrs[2]            # one scratch (the largest first) for all
    for y, ref in outs:                             # each result stays its own after later calls
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    lay = BlockLayout.from_mask(torch.ones(2, 2, dtype=torch.bool), (16, 16), (32, 32))
    values = torch.randn(4, 16, 16, requires_grad=True)
    w = dense.densify_values(values, lay.tensors("cpu"), reuse=True)   # autograd records: a new tensor
    assert w.requires_grad and w.data_ptr() != dense._scratch.buffers[torch.float32].data_ptr()
    w.sum().backward()
    assert torch.equal(values.grad, torch.ones_like(values))
