"""``torch.func`` transforms (grad, jvp, vmap) through block-sparse layers and sparse BERTs: the
eager autograd.Functions must be the new style (``setup_context``), which functorch requires;
the results must equal plain autograd's."""
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

import sparsebert
from sparsebert import bsr_linear

from conftest import random_layout, skip_unavailable

BACKENDS = ["reference", "dense", "cpu", "auto"]


def _backward_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


def _func_grads(model, loss_fn):
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    return grad(lambda p: loss_fn(lambda *a, **kw: functional_call(model, p, a, kw)))(params)


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for k in want:
        if want[k] is None:       # not used by the loss (BertModel's pooler): functorch gives zeros
            assert not got[k].any(), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_func_grad_of_a_sparse_layer_equals_backward(backend, activation):
    skip_unavailable(backend)
    torch.manual_seed(0)
    layer = sparsebert.BlockSparseLinear.from_dense(torch.nn.Linear(64, 48), sparsity=0.5, block=(16, 16),
                                                    backend=backend)
    layer.activation = activation
    x = torch.randn(3, 5, 64)
    loss = lambda m: m(x).pow(2).mean()
    _assert_same(_func_grads(layer, loss), _backward_grads(layer, loss))


def _tiny_bert(cls_name="BertModel"):
    import transformers
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, vocab_size=100, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    m = getattr(transformers, cls_name)(cfg)
    sparsebert.sparsify(m, sparsity=0.5, block=(16, 16))
    return m


@pytest.mark.parametrize("optimized", [False, True])
@pytest.mark.parametrize("gelu", ["save", "recompute"])
def test_func_grad_of_a_sparse_bert_equals_backward(optimized, gelu):
    if gelu == "recompute" and not optimized:
        pytest.skip("the gelu mode is an optimize option")
    m = _tiny_bert()
    if optimized:
        sparsebert.optimize(m, gelu=gelu)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    loss = lambda model: model(input_ids=ids, attention_mask=mask)[0].pow(2).mean()
    _assert_same(_func_grads(m, loss), _backward_grads(m, loss))


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_func_jvp_of_a_sparse_layer_equals_the_dense_jvp(backend):
    skip_unavailable(backend)
    lay = random_layout(3, 4, 0.5, (16, 16))
    g = torch.Generator().manual_seed(0)
    x, tx = torch.randn(2, 7, 64, generator=g), torch.randn(2, 7, 64, generator=g)
    v, tv = torch.randn(lay.nnz, 16, 16, generator=g), torch.randn(lay.nnz, 16, 16, generator=g)
    got = jvp(lambda x, v: bsr_linear(x, v, lay, backend=backend), (x, v), (tx, tv))
    want = jvp(lambda x, v: F.linear(x, lay.scatter(v)), (x, v), (tx, tv))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
def test_vmap_of_a_sparse_layer_equals_the_loop(backend):
    skip_unavailable(backend)
    lay = random_layout(3, 4, 0.5, (16, 16))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 64, generator=g)
    v = torch.randn(4, lay.nnz, 16, 16, generator=g)
    b = torch.randn(48, generator=g)
    f = lambda x, v: bsr_linear(x, v, lay, b, backend=backend)
    # batched input, shared weights (in_dims 1: the batch dim need not lead)
    torch.testing.assert_close(vmap(f, in_dims=(1, None))(x, v[0]),
                               torch.stack([f(x[:, i], v[0]) for i in range(5)]))
    # batched weights too
    torch.testing.assert_close(vmap(f)(x, v), torch.stack([f(x[i], v[i]) for i in range(4)]))


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
def test_per_sample_gradients_of_a_sparse_layer_equal_the_loop(backend):
    """vmap over grad: the weight gradient per example (the usual per-sample-gradient recipe)."""
    skip_unavailable(backend)
    torch.manual_seed(0)
    layer = sparsebert.BlockSparseLinear.from_dense(torch.nn.Linear(64, 48), sparsity=0.5, block=(16, 16),
                                                    backend=backend)
    xs = torch.randn(4, 3, 64)
    params = {k: p.detach() for k, p in layer.named_parameters()}
    loss = lambda p, x: functional_call(layer, p, (x,)).pow(2).sum()
    got = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(4):
        want = _backward_grads(layer, lambda m: m(xs[i]).pow(2).sum())
        for k in want:
            torch.testing.assert_close(got[k][i], want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_per_sample_gradients_of_a_sparse_bert_equal_the_loop():
    m = _tiny_bert().eval()
    ids = torch.randint(0, 100, (3, 1, 10), generator=torch.Generator().manual_seed(1))
    params = {k: p.detach() for k, p in m.named_parameters()}
    loss = lambda p, i: functional_call(m, p, (i,))[0].pow(2).mean()
    got = vmap(grad(loss), in_dims=(None, 0))(params, ids)
    for i in range(3):
        want = _backward_grads(m, lambda model: model(ids[i])[0].pow(2).mean())
        for k in ("encoder.layer.0.intermediate.dense.values", "encoder.layer.1.attention.self.query.values",
                  "encoder.layer.1.output.dense.bias"):
            torch.testing.assert_close(got[k][i], want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_func_grad_of_an_optimized_bert_in_training_with_dropout_equals_backward():
    """Training mode, hidden dropout on: under torch.func the fast dropout (an autograd.Function
    without a vmap rule) gives way to F.dropout, whose random numbers dropout="torch" draws too."""
    import transformers
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, vocab_size=100, hidden_dropout_prob=0.2,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    m = sparsebert.sparsify(transformers.BertModel(cfg), sparsity=0.5, block=(16, 16)).train()
    ref = sparsebert.optimize(copy.deepcopy(m), dropout="torch")
    sparsebert.optimize(m, dropout="fast")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = lambda model: model(input_ids=ids)[0].pow(2).mean()
    torch.manual_seed(5)
    got = _func_grads(m, loss)
    torch.manual_seed(5)
    _assert_same(got, _backward_grads(ref, loss))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("recompute", [False, True])
def test_func_grad_of_linear_gelu_equals_backward(recompute, backend):
    """The training-fused GELU Function itself (optimize's layers leave it under torch.func)."""
    skip_unavailable(backend)
    opt_mod = importlib.import_module("sparsebert.optimize")
    lay = random_layout(3, 4, 0.5, (16, 16))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 64, generator=g)
    v = torch.randn(lay.nnz, 16, 16, generator=g, requires_grad=True)
    b = torch.randn(48, generator=g, requires_grad=True)
    f = lambda v, b: opt_mod.linear_gelu(x, v, lay, b, backend=backend, recompute=recompute).pow(2).sum()
    got = grad(f, argnums=(0, 1))(v.detach(), b.detach())
    f(v, b).backward()
    torch.testing.assert_close(got[0], v.grad)
    torch.testing.assert_close(got[1], b.grad)


def test_vmap_of_an_optimized_bert_at_inference_equals_the_loop():
    """No gradient under vmap: the fused inference paths (kernels without batching rules) decline."""
    m = sparsebert.optimize(_tiny_bert().eval())
    ids = torch.randint(0, 100, (3, 2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = vmap(lambda i: m(i)[0])(ids)
        want = torch.stack([m(i)[0] for i in ids])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
