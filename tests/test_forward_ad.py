"""Forward-mode AD (``torch.autograd.forward_ad`` dual tensors) through block-sparse layers and
sparse BERTs, with and without :func:`sparsebert.optimize`: the JVP must equal the dense masked
twin's. The compiled kernels have no forward-AD formula; calling them on dual tensors used to
drop the tangent silently (None for a layer, a wrong JVP for a model)."""
import copy
import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import sparsebert
from sparsebert import bsr_linear

from conftest import random_layout, skip_unavailable

BACKENDS = ["reference", "dense", "cpu", "auto"]


def _layer_problem(seed=0, M=8):
    lay = random_layout(3, 4, 0.5, (16, 16), seed=seed)
    g = torch.Generator().manual_seed(seed)
    x, tx = torch.randn(M, 64, generator=g), torch.randn(M, 64, generator=g)
    v, tv = (torch.randn(lay.nnz, 16, 16, generator=g) / 8 for _ in range(2))
    b, tb = torch.randn(48, generator=g), torch.randn(48, generator=g)
    return lay, (x, v, b), (tx, tv, tb)


def _jvp(fn, primals, tangents):
    """(output, tangent) of ``fn(*duals)``; a None tangent stands for "no tangent"."""
    with fwAD.dual_level():
        duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        out = fwAD.unpack_dual(fn(*duals))
        return out.primal, out.tangent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", [False, True])
@pytest.mark.parametrize("which", ["x", "values", "bias", "all"])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_layer_jvp_equals_the_dense_jvp(backend, grad_mode, which, activation):
    skip_unavailable(backend)
    lay, primals, tangents = _layer_problem()
    keep = {"x": (0,), "values": (1,), "bias": (2,), "all": (0, 1, 2)}[which]
    tangents = [t if i in keep else None for i, t in enumerate(tangents)]

    def dense(x, v, b):
        y = F.linear(x, lay.scatter(v), b)
        return F.gelu(y) if activation == "gelu" else y

    with torch.set_grad_enabled(grad_mode):
        y, ty = _jvp(lambda x, v, b: bsr_linear(x, v, lay, b, backend=backend, activation=activation),
                     primals, tangents)
        yd, tyd = _jvp(dense, primals, tangents)
    assert ty is not None, "the tangent was dropped"
    torch.testing.assert_close(y, yd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ty, tyd, rtol=1e-4, atol=1e-4)


def test_layer_module_jvp_under_no_grad_matches_its_dense_twin():
    torch.manual_seed(0)
    sp = sparsebert.BlockSparseLinear.from_dense(torch.nn.Linear(64, 64), sparsity=0.5, block=(16, 16),
                                                 backend="cpu")
    skip_unavailable("cpu")
    dense = sp.to_dense()
    x, t = torch.randn(2, 8, 64), torch.randn(2, 8, 64)
    with torch.no_grad():
        _, ts = _jvp(sp, (x,), (t,))
        _, td = _jvp(dense, (x,), (t,))
    assert ts is not None
    torch.testing.assert_close(ts, td, rtol=1e-4, atol=1e-4)


def test_no_dual_level_keeps_the_plain_kernel_path(monkeypatch):
    """Outside a dual level the forward is the backend's own call, as before (no autograd node)."""
    lay, (x, v, b), _ = _layer_problem()
    mod = importlib.import_module("sparsebert.ops.bsr_linear")
    monkeypatch.setattr(mod._BsrLinearEager, "apply", lambda *a: pytest.fail("autograd node built"))
    with torch.no_grad():
        bsr_linear(x, v, lay, b, backend="reference")


def _tiny_bert(attn):
    from transformers import BertConfig, BertModel
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     vocab_size=100)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    m = BertModel(cfg).eval()
    sparsebert.sparsify(m, sparsity=0.5, block=(16, 16))
    return m


def _model_jvp(model, emb, tan, mask=None):
    with torch.no_grad():
        return _jvp(lambda e: model(inputs_embeds=e, attention_mask=mask)[0], (emb,), (tan,))


@pytest.mark.parametrize("padded", [False, True])
def test_sparse_bert_jvp_equals_its_dense_twin_before_and_after_optimize(padded):
    # eager attention: torch's CPU SDPA kernel has no forward-AD formula (it raises), so the dense
    # twin needs the eager one; optimize switches the sparse model to sparsebert's attention
    m = _tiny_bert("eager")
    twin = sparsebert.densify(copy.deepcopy(m))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = None
    if padded:
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 7:] = 0
    with torch.no_grad():
        emb = m.embeddings(ids)
    tan = torch.randn(emb.shape, generator=torch.Generator().manual_seed(2))
    ref_y, ref_t = _model_jvp(twin, emb, tan, mask)
    for stage in ("sparse", "optimized"):
        if stage == "optimized":
            sparsebert.optimize(m)
        y, t = _model_jvp(m, emb, tan, mask)
        assert t is not None, f"{stage}: the tangent was dropped"
        torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-4, msg=f"{stage}: outputs differ")
        torch.testing.assert_close(t, ref_t, rtol=1e-4, atol=1e-4, msg=f"{stage}: JVPs differ")
    # and the optimized model outside forward AD is still what it was (the fast paths still run)
    with torch.no_grad():
        torch.testing.assert_close(m(inputs_embeds=emb, attention_mask=mask)[0], ref_y, rtol=1e-4, atol=1e-4)


def test_optimized_bert_jvp_with_grad_mode_on_equals_its_dense_twin():
    """Grad mode on (parameters requiring grad): the training-fused GELU layer's autograd node has
    no jvp, so under forward AD the layer takes the plain block-sparse path."""
    m = _tiny_bert("eager")
    twin = sparsebert.densify(copy.deepcopy(m))
    sparsebert.optimize(m)
    emb = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(1))
    tan = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(2))
    ref_y, ref_t = _jvp(lambda e: twin(inputs_embeds=e)[0], (emb,), (tan,))
    y, t = _jvp(lambda e: m(inputs_embeds=e)[0], (emb,), (tan,))
    assert t is not None
    torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(t, ref_t, rtol=1e-4, atol=1e-4)
    y.sum().backward()        # and the reverse pass through the same call still works
    assert m.encoder.layer[0].intermediate.dense.values.grad is not None


def test_fused_attention_kernel_refuses_dual_tensors():
    from sparsebert.ops import cpu_attention
    if not cpu_attention.available():
        pytest.skip("no fused attention kernel")
    q = torch.randn(1, 2, 5, 8)
    with fwAD.dual_level():
        assert cpu_attention.unsupported_reason(q, q, q) is not None
        with pytest.raises(ValueError, match="forward-AD"):
            cpu_attention.attention(fwAD.make_dual(q, torch.randn_like(q)), q, q)


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_forward_over_reverse_gradient_tangent_equals_the_dense_one(backend):
    """A JVP of a gradient (Hessian-vector products): the backward runs on dual tensors, so it
    must run the differentiable gradient ops, not the kernels directly, even without create_graph."""
    skip_unavailable(backend)
    lay, (x, v, b), (tx, tv, _) = _layer_problem()

    def grads(fn):
        with fwAD.dual_level():
            xd = fwAD.make_dual(x, tx).requires_grad_()
            vd = fwAD.make_dual(v, tv).requires_grad_()
            loss = fn(xd, vd).pow(2).sum()
            gx, gv = torch.autograd.grad(loss, (xd, vd))
            return [fwAD.unpack_dual(g).tangent for g in (gx, gv)]

    got = grads(lambda x, v: bsr_linear(x, v, lay, b, backend=backend))
    want = grads(lambda x, v: F.linear(x, lay.scatter(v), b))
    for g, w in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
