"""MaskedLinear / MaskedEmbedding / BlockSparseLinear behaviour."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsebert import BlockLayout, BlockSparseLinear, MaskedEmbedding, MaskedLinear


def test_masked_weights_stay_exactly_zero_through_adamw():
    torch.manual_seed(0)
    lin = MaskedLinear.from_dense(nn.Linear(40, 24), sparsity=0.6)
    emb = MaskedEmbedding.from_dense(nn.Embedding(30, 40), sparsity=0.5)
    pruned_lin, pruned_emb = ~lin.mask, ~emb.mask
    assert pruned_lin.sum() == round(0.6 * 40 * 24) and pruned_emb.sum() == 600
    opt = torch.optim.AdamW(list(lin.parameters()) + list(emb.parameters()), lr=1e-2, weight_decay=0.1)
    for _ in range(50):
        ids = torch.randint(0, 30, (8, 5))
        loss = lin(emb(ids)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.count_nonzero(lin.weight[pruned_lin]) == 0
    assert torch.count_nonzero(emb.weight[pruned_emb]) == 0
    assert torch.count_nonzero(lin.weight[lin.mask]) == lin.mask.sum()   # kept weights trained


def test_masked_linear_matches_dense_with_zeros_and_converts_back():
    dense = nn.Linear(16, 8)
    mask = torch.rand(8, 16) < 0.5
    layer = MaskedLinear.from_dense(dense, mask=mask)
    x = torch.randn(3, 16)
    assert torch.allclose(layer(x), x @ (dense.weight * mask).T + dense.bias)
    back = layer.to_dense()
    assert type(back) is nn.Linear and torch.equal(back.weight == 0, ~mask | (back.weight == 0))
    assert torch.allclose(back(x), layer(x))


@pytest.mark.parametrize("kw", [{}, {"padding_idx": 3}, {"scale_grad_by_freq": True},
                                {"max_norm": 1.0}])
def test_masked_embedding_masks_looked_up_rows_like_the_masked_table(kw):
    """The forward masks only the rows it looks up; values and gradients must equal embedding
    the masked table (the paper's semantics), including padding_idx, scale_grad_by_freq and
    max_norm (which takes the whole-table path)."""
    torch.manual_seed(1)
    base = nn.Embedding(30, 12, **kw)
    mask = torch.rand(30, 12) < 0.5
    layer = MaskedEmbedding.from_dense(copy.deepcopy(base), mask=mask)
    ref = nn.Embedding(30, 12, **kw)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)               # already zero where pruned
    ids = torch.tensor([[1, 3, 3, 7], [29, 0, 3, 1]])
    out, want = layer(ids), F.embedding(ids, ref.weight * mask, **kw)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    out.backward(g)
    w = ref.weight.detach().clone().requires_grad_()
    F.embedding(ids, w * mask, **kw).backward(g)
    torch.testing.assert_close(layer.weight.grad, w.grad)
    assert torch.count_nonzero(layer.weight.grad[~mask]) == 0


def test_from_dense_needs_exactly_one_of_sparsity_and_mask():
    with pytest.raises(ValueError, match="exactly one"):
        MaskedLinear.from_dense(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="mask has shape"):
        MaskedLinear.from_dense(nn.Linear(4, 4), mask=torch.ones(4, 5, dtype=torch.bool))


def test_block_sparse_linear_stores_only_kept_blocks():
    torch.manual_seed(1)
    dense = nn.Linear(128, 64)
    layer = BlockSparseLinear.from_dense(dense, sparsity=0.75, block=(16, 32))
    total = (64 // 16) * (128 // 32)
    assert layer.layout.nnz == total // 4
    assert layer.values.shape == (total // 4, 16, 32)
    assert sum(p.numel() for p in layer.parameters()) == layer.values.numel() + 64
    # kept blocks are the largest by L2 norm
    norms = dense.weight.detach().reshape(4, 16, 4, 32).pow(2).sum((1, 3))
    assert norms[layer.layout.block_mask].min() >= norms[~layer.layout.block_mask].max()
    x = torch.randn(2, 3, 128)
    w = dense.weight.detach() * layer.layout.element_mask()
    assert torch.allclose(layer(x), x @ w.T + dense.bias, atol=1e-5)
    assert torch.allclose(layer.to_dense().weight, w)
    assert "block=(16, 32)" in repr(layer) and "0.250" in repr(layer) and "backend='auto'" in repr(layer)


def test_block_sparse_linear_rejects_block_not_dividing_weight():
    with pytest.raises(ValueError, match="does not divide"):
        BlockSparseLinear.from_dense(nn.Linear(100, 64), sparsity=0.5, block=32)


def test_set_layout_shrinks_values_and_adamw_state_consistently():
    torch.manual_seed(2)
    layer = BlockSparseLinear.from_dense(nn.Linear(64, 64), sparsity=0.0, block=16, backend="reference")
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x, target = torch.randn(32, 64), torch.randn(32, 64)
    loss = lambda: (layer(x) - target).square().mean()
    for _ in range(3):
        opt.zero_grad(); loss().backward(); opt.step()
    param = layer.values
    old_values = param.detach().clone()
    old_state = {k: v.clone() for k, v in opt.state[param].items()}
    keep_mask = torch.rand(4, 4) < 0.5
    new = layer.layout.intersect(keep_mask)
    kept = layer.set_layout(new, opt)
    assert kept.tolist() == torch.arange(16)[keep_mask.flatten()].tolist()
    # The same Parameter object, shrunk in place: the optimizer still holds it.
    assert layer.values is param and layer.values.shape == (new.nnz, 16, 16)
    assert torch.equal(layer.values, old_values[kept])
    assert sum(p is param for p in opt.param_groups[0]["params"]) == 1 and len(opt.state) == 2
    st = opt.state[layer.values]
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(st[k], old_state[k][kept])
    assert torch.equal(st["step"], old_state["step"])
    # Training continues on the smaller layout, and the pruned blocks stay pruned.
    before = loss().item()
    for _ in range(20):
        opt.zero_grad(); loss().backward(); opt.step()
    assert loss().item() < before
    assert torch.equal(layer.dense_weight().detach()[~new.element_mask()], torch.zeros(int((~new.element_mask()).sum())))


def test_state_dict_round_trip_keeps_layout():
    layer = BlockSparseLinear.from_dense(nn.Linear(64, 32), sparsity=0.5, block=16)
    other = BlockSparseLinear(layer.layout, bias=True)
    other.load_state_dict(layer.state_dict())
    assert other.layout == layer.layout and torch.equal(other.values, layer.values)


def test_set_layout_while_the_last_graph_is_alive():
    """The usual loop keeps `loss` (and its graph) alive until the next forward has run."""
    layer = BlockSparseLinear.from_dense(nn.Linear(64, 64), sparsity=0.0, block=16, backend="reference")
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x = torch.randn(8, 64)
    loss = layer(x).square().sum()
    loss.backward()
    opt.step()
    layer.set_layout(layer.layout.intersect(torch.rand(4, 4) < 0.5), opt)
    opt.zero_grad()
    loss = layer(x).square().sum()      # the previous graph is still referenced until here
    loss.backward()
    opt.step()
    assert layer.values.grad.shape == layer.values.shape


def test_masked_layers_refuse_float_masks_like_block_masks():
    """One rule for every mask: boolean or 0/1 integers. A float mask used to be cast to bool,
    so a soft mask of 0.3s silently kept everything."""
    soft = torch.full((8, 16), 0.3)
    with pytest.raises(ValueError, match="MaskedLinear mask must be boolean"):
        MaskedLinear.from_dense(nn.Linear(16, 8), mask=soft)
    with pytest.raises(ValueError, match="must be boolean"):
        MaskedLinear(16, 8, mask=soft)
    with pytest.raises(ValueError, match="MaskedEmbedding mask must be boolean"):
        MaskedEmbedding.from_dense(nn.Embedding(8, 16), mask=soft)
    layer = MaskedLinear.from_dense(nn.Linear(16, 8), mask=torch.ones(8, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="must be boolean"):
        layer.set_mask(soft)
    with pytest.raises(ValueError, match="other than 0 and 1"):
        layer.set_mask(torch.full((8, 16), 2))
    layer.set_mask(torch.eye(8, 16, dtype=torch.int32))
    assert layer.mask.dtype == torch.bool and int(layer.mask.sum()) == 8
    with pytest.raises(ValueError, match="boolean"):    # BlockSparseLinear: the same rule
        BlockSparseLinear.from_dense(nn.Linear(64, 64), mask=torch.full((4, 4), 0.3), block=16)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_pruned_means_exactly_zero_even_for_inf_or_nan(bad):
    """Masking multiplied by the mask: inf * 0 is nan. Pruned weights are set to zero instead."""
    dense = nn.Linear(16, 8)
    mask = torch.ones(8, 16, dtype=torch.bool)
    mask[0, :4] = False
    with torch.no_grad():
        dense.weight[0, :4] = bad
    layer = MaskedLinear.from_dense(dense, mask=mask)
    assert torch.equal(layer.weight[~mask], torch.zeros(4))
    back = layer.to_dense()
    assert torch.isfinite(back.weight).all() and torch.equal(back.weight[~mask], torch.zeros(4))
    assert torch.isfinite(layer(torch.randn(2, 16))).all()

    emb = nn.Embedding(5, 4)
    with torch.no_grad():
        emb.weight[1] = bad
    emask = torch.ones(5, 4, dtype=torch.bool)
    emask[1] = False
    memb = MaskedEmbedding.from_dense(emb, mask=emask)
    assert torch.equal(memb.to_dense().weight[1], torch.zeros(4))
    with torch.no_grad():                  # set_mask: weights that became inf since are zeroed too
        memb.weight[2, 0] = bad
    emask[2, 0] = False
    memb.set_mask(emask)
    assert torch.isfinite(memb.weight).all() and memb.weight[2, 0] == 0


def test_from_dense_keeps_frozen_layers_frozen():
    dense = nn.Linear(64, 32)
    dense.weight.requires_grad_(False)
    layer = BlockSparseLinear.from_dense(dense, sparsity=0.5, block=16)
    assert not layer.values.requires_grad and layer.bias.requires_grad
    dense.bias.requires_grad_(False)
    layer = BlockSparseLinear.from_dense(dense, sparsity=0.5, block=16)
    assert not layer.values.requires_grad and not layer.bias.requires_grad
    assert MaskedLinear.from_dense(dense, sparsity=0.5).weight.requires_grad is False


def test_set_layout_keeps_the_parameter_and_its_flags_and_gathers_grad():
    """values is shrunk in place: a list of parameters taken earlier (clip_grad_norm_, EMA,
    logging) still holds it, requires_grad is kept and the pending gradient is gathered."""
    torch.manual_seed(3)
    layer = BlockSparseLinear.from_dense(nn.Linear(64, 64), sparsity=0.0, block=16, backend="reference")
    params = list(layer.parameters())
    x = torch.randn(8, 64)
    loss = layer(x).square().sum()
    loss.backward()
    grad_before = layer.values.grad.clone()
    new = layer.layout.intersect(torch.rand(4, 4) < 0.5)
    kept = layer.set_layout(new)
    assert params[0] is layer.values and layer.values.shape[0] == new.nnz
    assert torch.equal(layer.values.grad, grad_before[kept])
    torch.nn.utils.clip_grad_norm_(params, 1.0)        # the shrunk grad is the one clipped
    layer.values.grad = None
    loss = layer(x).square().sum()                     # the old graph was alive until here
    loss.backward()
    assert layer.values.grad.shape == layer.values.shape

    frozen = BlockSparseLinear.from_dense(nn.Linear(64, 64), sparsity=0.0, block=16)
    frozen.values.requires_grad_(False)
    frozen.set_layout(frozen.layout.intersect(torch.eye(4, dtype=torch.bool)))
    assert not frozen.values.requires_grad and frozen.values.shape[0] == 4
    with pytest.raises(ValueError, match="only shrink"):
        frozen.set_layout(BlockLayout.dense((64, 64), 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_masked_weight_is_where_bit_for_bit_with_its_gradients(dtype):
    """masked_weight (an integer product of the weight's bits with the mask on CPU) equals
    torch.where(mask, w, 0) bit for bit, nan/inf/-0.0 included, and so do its gradients (first,
    second, forward-mode); a .data write to the weight is seen at the next call."""
    from sparsebert.nn import MaskedLinear
    g = torch.Generator().manual_seed(0)
    lin = MaskedLinear(16, 8, mask=torch.rand(8, 16, generator=g) > 0.5).to(dtype)
    w = lin.weight
    with torch.no_grad():
        w.copy_(torch.randn(8, 16, generator=g).to(dtype))
        w[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    lin.mask[0, :4] = torch.tensor([True, False, True, False])
    lin.mask[1, :4] = torch.tensor([False, True, False, True])
    with torch.no_grad():
        w[1, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])

    def bits(t):
        return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

    got, ref = lin.masked_weight(), torch.where(lin.mask, w, 0.0)
    assert torch.equal(bits(got), bits(ref))
    up = torch.randn(8, 16, generator=g).to(dtype)
    up[2, :3] = float("nan")
    (gw,) = torch.autograd.grad(got, w, up, create_graph=True)
    (rw,) = torch.autograd.grad(ref, w, up, create_graph=True)
    assert torch.equal(bits(gw), bits(rw))
    if dtype == torch.float64:
        with torch.no_grad():
            w.nan_to_num_(0.0, 0.0, 0.0)          # finite differences need finite weights
        torch.autograd.gradcheck(lambda t: lin.masked_weight() * t, torch.randn(8, 16, dtype=dtype, requires_grad=True))
        from sparsebert.nn import _MaskApply
        tan = torch.randn(8, 16, dtype=dtype, generator=g)
        _, jt = torch.func.jvp(lambda t: _MaskApply.apply(t, lin.mask), (w.detach(),), (tan,))
        assert torch.equal(jt, torch.where(lin.mask, tan, 0.0))
        x = torch.randn(3, 16, dtype=dtype, requires_grad=True)
        torch.autograd.gradgradcheck(lambda x, t: F.linear(x, lin.masked_weight() * t),
                                     (x, torch.randn(8, 16, dtype=dtype, requires_grad=True)))
    lin.mask[3, 5] = True
    w.data[3, 5] = 7.0
    assert float(lin.masked_weight().detach()[3, 5]) == 7.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_mask_zeroes_weight_and_grad_like_masked_fill(dtype):
    """apply_mask_ (in place, an integer product of the bits on CPU) gives exactly
    masked_fill_(~mask, 0): kept bits untouched (nan, inf, -0.0), pruned +0.0 (nan included)."""
    g = torch.Generator().manual_seed(1)
    lin = MaskedLinear(16, 8).to(dtype)
    mask = torch.rand(8, 16, generator=g) > 0.5
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 16, generator=g).to(dtype))
        lin.weight[:2, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    lin.weight.grad = torch.randn(8, 16, generator=g).to(dtype)
    lin.weight.grad[2, :3] = float("nan")
    want_w = lin.weight.detach().clone().masked_fill_(~mask, 0.0)
    want_g = lin.weight.grad.clone().masked_fill_(~mask, 0.0)
    lin.set_mask(mask)
    ib = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    assert torch.equal(lin.weight.detach().view(ib), want_w.view(ib))
    assert torch.equal(lin.weight.grad.view(ib), want_g.view(ib))
