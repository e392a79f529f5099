"""sparsebert.optimize: same loss and gradients as the unoptimized model, faster step."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

import sparsebert
from sparsebert import BlockSparseLinear, MaskedLinear
from sparsebert.ops import backends
from sparsebert.optimize import (LinearGelu, TrainingFusedBlockSparseLinear, is_optimized, linear_gelu,
                                 optimize, unoptimize)

from conftest import random_layout

VOCAB = 200


def _config(dropout=0.0, attn="sdpa"):
    return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout, attn_implementation=attn)


def _model(kind, dtype=torch.float64, dropout=0.0, attn="sdpa", cls=BertForMaskedLM):
    torch.manual_seed(0)
    m = cls(_config(dropout, attn))
    if kind == "block":
        sparsebert.sparsify(m, 0.5, block=(16, 16))
    elif kind == "unstructured":
        sparsebert.sparsify(m, 0.5, mode="unstructured")
    return m.to(dtype)


def _batch(B=3, T=24, frac=0.25, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = ids.clone()
    labels[torch.rand(B, T, generator=g) > frac] = -100
    labels[0, 0] = ids[0, 0]            # at least one labelled position
    return ids, labels


def _loss_and_grads(model, ids, labels, seed=0, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["dense", "block", "unstructured"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_loss_gradients_and_labelled_logits_equal_unoptimized(kind, dtype, dropout):
    # The base model uses SDPA (Hugging Face's default) and dropout="torch" keeps PyTorch's dropout,
    # so with dropout on both consume the same random numbers in the same order: the same seed
    # gives the same loss. (The default, dropout="fast", is tested statistically below.)
    ref = _model(kind, dtype, dropout).train(dropout > 0)
    opt = optimize(copy.deepcopy(ref), dropout="torch" if dropout else "fast")
    ids, labels = _batch()
    out_ref, g_ref = _loss_and_grads(ref, ids, labels)
    out_opt, g_opt = _loss_and_grads(opt, ids, labels)
    torch.testing.assert_close(out_opt.loss, out_ref.loss, **_tol(dtype))
    sel = labels != -100
    assert out_opt.logits.shape == (int(sel.sum()), VOCAB)
    torch.testing.assert_close(out_opt.logits, out_ref.logits[sel], **_tol(dtype))
    assert g_opt.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_opt[n], g_ref[n], **_tol(dtype), msg=lambda m, n=n: f"{n}: {m}")


def test_block_model_intermediates_use_the_fused_training_gelu():
    m = optimize(_model("block"))
    inter = [l.intermediate.dense for l in m.bert.encoder.layer]
    assert all(type(d) is TrainingFusedBlockSparseLinear and d.activation == "gelu" for d in inter)
    assert isinstance(inter[0], BlockSparseLinear)
    # Q/K/V etc. keep their class
    assert type(m.bert.encoder.layer[0].attention.self.query) is BlockSparseLinear


def test_unfused_block_model_gets_fused_and_matches():
    torch.manual_seed(0)
    ref = BertForMaskedLM(_config()).double()
    sparsebert.sparsify(ref, 0.5, block=(16, 16), fuse_activation=False)
    opt = optimize(copy.deepcopy(ref))
    assert all(l.intermediate.dense.activation == "gelu" for l in opt.bert.encoder.layer)
    ids, labels = _batch()
    (o1, g1), (o2, g2) = _loss_and_grads(ref, ids, labels), _loss_and_grads(opt, ids, labels)
    torch.testing.assert_close(o2.loss, o1.loss, **_tol(torch.float64))
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], **_tol(torch.float64))


@pytest.mark.parametrize("kind", ["dense", "block"])
def test_eager_attention_model_switches_to_sdpa_same_loss_without_dropout(kind):
    ref = _model(kind, attn="eager").eval()
    opt = optimize(copy.deepcopy(ref), dropout="torch")
    assert opt.config._attn_implementation == "sparsebert_sdpa_torch_dropout"   # SDPA + the CPU inference kernel
    ids, labels = _batch()
    (o1, g1), (o2, g2) = _loss_and_grads(ref, ids, labels), _loss_and_grads(opt, ids, labels)
    torch.testing.assert_close(o2.loss, o1.loss, **_tol(torch.float64))
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], **_tol(torch.float64))
    unoptimize(opt)
    assert opt.config._attn_implementation == "eager"


@pytest.mark.parametrize("attn,mode", [("eager", "torch"), ("eager", "fast"), ("sdpa", "fast")])
def test_dropout_that_draws_differently_matches_statistically(attn, mode):
    # Eager attention and SDPA draw the attention-dropout mask differently, and the fast CPU
    # dropout draws fewer random numbers: the same seed gives different losses, but their
    # distribution over seeds is the same.
    ref = _model("block", dropout=0.1, attn=attn).train()
    opt = optimize(copy.deepcopy(ref), dropout=mode)
    ids, labels = _batch(B=4, T=32, frac=0.5)
    a, b = [], []
    with torch.no_grad():
        for seed in range(40):
            torch.manual_seed(seed)
            a.append(float(ref(input_ids=ids, labels=labels).loss))
            torch.manual_seed(seed)
            b.append(float(opt(input_ids=ids, labels=labels).loss))
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert not torch.equal(a, b)                 # really different random numbers
    se = (a.var() / len(a) + b.var() / len(b)).sqrt()
    assert abs(float(a.mean() - b.mean())) < 4 * float(se)
    ratio = float(a.std() / b.std())
    assert 0.5 < ratio < 2.0


def test_without_labels_the_head_covers_every_token_and_positional_labels_work():
    ref = _model("block").eval()
    opt = optimize(copy.deepcopy(ref))
    ids, labels = _batch()
    with torch.no_grad():
        full = opt(input_ids=ids).logits
        torch.testing.assert_close(full, ref(input_ids=ids).logits)
        # labels as a positional argument, and return_dict=False
        r = ref(ids, None, None, None, None, None, None, labels, return_dict=False)
        o = opt(ids, None, None, None, None, None, None, labels, return_dict=False)
    torch.testing.assert_close(o[0], r[0])
    torch.testing.assert_close(o[1], r[1][labels != -100])
    assert full.shape == (*ids.shape, VOCAB)


def test_all_labels_ignored_gives_hugging_faces_nan():
    ref = _model("dense").eval()
    opt = optimize(copy.deepcopy(ref))
    ids, labels = _batch()
    labels[:] = -100
    with torch.no_grad():
        assert torch.isnan(ref(input_ids=ids, labels=labels).loss)
        out = opt(input_ids=ids, labels=labels)
    assert torch.isnan(out.loss) and out.logits.shape == (0, VOCAB)


def test_a_failed_call_leaves_no_selection_behind():
    opt = optimize(_model("dense").eval())
    ids, labels = _batch()
    def boom(*args):
        raise RuntimeError("boom")
    h = opt.bert.register_forward_hook(boom)     # fails after the selection, before the head
    with pytest.raises(RuntimeError, match="boom"):
        opt(input_ids=ids, labels=labels)
    h.remove()
    hidden = torch.randn(2, 5, 64, dtype=torch.float64)
    assert opt.cls(hidden).shape == (2, 5, VOCAB)    # the head called directly: every row


def test_pretraining_model_mlm_and_nsp_loss_equal():
    ref = _model("block", cls=BertForPreTraining).eval()
    opt = optimize(copy.deepcopy(ref))
    ids, labels = _batch()
    nsp = torch.tensor([0, 1, 0])
    (o1, g1) = _loss_and_grads(ref, ids, labels, next_sentence_label=nsp)
    (o2, g2) = _loss_and_grads(opt, ids, labels, next_sentence_label=nsp)
    torch.testing.assert_close(o2.loss, o1.loss)
    torch.testing.assert_close(o2.prediction_logits, o1.prediction_logits[labels != -100])
    torch.testing.assert_close(o2.seq_relationship_logits, o1.seq_relationship_logits)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n])


def test_state_dict_unchanged_idempotent_and_unoptimize():
    ref = _model("block")
    keys = list(ref.state_dict())
    opt = optimize(optimize(copy.deepcopy(ref)), gelu="recompute")
    assert is_optimized(opt) and list(opt.state_dict()) == keys
    assert len(opt._forward_pre_hooks) == 1 and len(opt.cls._forward_pre_hooks) == 1
    assert opt.bert.encoder.layer[0].intermediate.dense.gelu_mode == "recompute"
    copy.deepcopy(opt)                                  # still copyable
    unoptimize(opt)
    assert not is_optimized(opt) and not opt._forward_pre_hooks and not opt.cls._forward_pre_hooks
    assert type(opt.bert.encoder.layer[0].intermediate.dense) is BlockSparseLinear
    ids, labels = _batch()
    assert opt(input_ids=ids, labels=labels).logits.shape == (*ids.shape, VOCAB)


def test_unstructured_model_keeps_masked_layers():
    opt = optimize(_model("unstructured"))
    assert isinstance(opt.cls.predictions.decoder, MaskedLinear)


# ---- the fused training GELU ------------------------------------------------------------------
def _backend_cases():
    cases = [("reference", torch.float64), ("dense", torch.float64)]
    if backends.unavailable_reason("cpu", "cpu") is None:
        cases.append(("cpu", torch.float32))
    return cases


@pytest.mark.parametrize("backend,dtype", _backend_cases())
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_matches_f_gelu_forward_and_backward(backend, dtype, recompute, bias):
    layout = random_layout(6, 4, 0.5, (16, 32), seed=3)      # N = 96, K = 128
    g = torch.Generator().manual_seed(0)
    values = torch.randn(layout.nnz, 16, 32, generator=g, dtype=dtype).mul_(0.2).requires_grad_()
    b = torch.randn(96, generator=g, dtype=dtype).requires_grad_() if bias else None
    x = torch.randn(2, 20, 128, generator=g, dtype=dtype).requires_grad_()
    dy = torch.randn(2, 20, 96, generator=g, dtype=dtype)
    ref = F.gelu(sparsebert.bsr_linear(x, values, layout, b, backend="reference"))
    grads_ref = torch.autograd.grad(ref, [x, values] + ([b] if bias else []), dy)
    y = linear_gelu(x, values, layout, b, backend=backend, recompute=recompute)
    grads = torch.autograd.grad(y, [x, values] + ([b] if bias else []), dy)
    tol = _tol(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, ref, **tol)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **tol)


def test_linear_gelu_only_the_needed_gradients():
    layout = random_layout(2, 2, 1.0, (16, 16))
    values = torch.randn(layout.nnz, 16, 16, dtype=torch.float64)
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(32, dtype=torch.float64)
    y = LinearGelu.apply(x, values, b, layout.tensors(), "reference", False)
    (dx,) = torch.autograd.grad(y.sum(), [x])
    want = torch.autograd.grad(F.gelu(x @ layout.scatter(values).t()).sum(), [x])[0]
    torch.testing.assert_close(dx, want)


def test_fused_layer_inference_and_no_grad_use_the_plain_path():
    m = optimize(_model("block", dtype=torch.float32)).eval()
    ids, _ = _batch()
    ref = copy.deepcopy(m)
    unoptimize(ref)
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, ref(input_ids=ids).logits)


# ---- the fast CPU dropout ---------------------------------------------------------------------
def test_keep_mask_frequency_lanes_independence_and_seed():
    from sparsebert.fused import keep_mask
    torch.manual_seed(0)
    n = 2_000_001                                   # odd: the last draw is half used
    k = keep_mask((n,), 0.1)
    assert k.dtype == torch.bool and k.shape == (n,)
    sd = (0.09 / n) ** 0.5
    assert abs(float(k.double().mean()) - 0.9) < 5 * sd
    for lane in (0, 1):                             # the low and the high half of each draw
        assert abs(float(k[lane::2].double().mean()) - 0.9) < 5 * sd * 2 ** 0.5
    both = (k[:-1:2] & k[1::2]).double().mean()     # neighbours (same draw) independent
    assert abs(float(both) - 0.81) < 5 * (0.81 * 0.19 / (n // 2)) ** 0.5
    assert abs(float(keep_mask((n,), 0.7).double().mean()) - 0.3) < 5 * (0.21 / n) ** 0.5
    torch.manual_seed(3)
    a = keep_mask((5, 7), 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask((5, 7), 0.5))


def test_fast_dropout_forward_backward_and_fallbacks():
    from sparsebert.fused import FastDropout, dropout
    x = torch.randn(64, 96, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.25, True)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx, dy * kept / 0.75)
    assert dropout(x, 0.25, False) is x
    m = FastDropout(0.25)
    assert isinstance(m, torch.nn.Dropout)
    m.eval()
    assert torch.equal(m(x), x)
    m.train()
    m.inplace = True
    with torch.no_grad():
        z = torch.ones(1000)
        m(z)                                      # in place: PyTorch's own dropout
    assert (z == 0).any() and ((z == 0) | (z == 1 / 0.75)).all()


def test_attention_math_equals_sdpa_and_is_unbiased_with_dropout():
    from sparsebert.fused import attention_math
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool)
    mask[1, :, :, 7:] = False                      # padding in the second sequence
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention_math(q, k, v, mask, 8 ** -0.5, 0.0), want)
    torch.manual_seed(0)
    mean = sum(attention_math(q, k, v, mask, 8 ** -0.5, 0.2) for _ in range(2000)) / 2000
    assert (mean - want).abs().max() < 0.1
    assert (mean - want).abs().mean() < 0.02


def test_fast_dropout_modules_swapped_and_restored():
    ref = _model("dense", dropout=0.1)
    opt = optimize(copy.deepcopy(ref))
    from sparsebert.fused import ATTENTION_NAME, FastDropout
    assert opt.config._attn_implementation == ATTENTION_NAME
    assert all(type(m) is FastDropout for m in opt.modules() if isinstance(m, torch.nn.Dropout))
    unoptimize(opt)
    assert opt.config._attn_implementation == "sdpa"
    assert all(type(m) is torch.nn.Dropout for m in opt.modules() if isinstance(m, torch.nn.Dropout))


def test_padding_mask_through_the_registered_attention():
    ref = _model("block", dropout=0.1).eval()
    opt = optimize(copy.deepcopy(ref))
    ids, labels = _batch()
    am = torch.ones_like(ids)
    am[1, 15:] = 0
    labels[1, 15:] = -100
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=am, labels=labels)
        o = opt(input_ids=ids, attention_mask=am, labels=labels)
        torch.testing.assert_close(o.loss, r.loss)
        # training, dropout p -> 0 limit: the fast path's mask handling equals SDPA's
        for m in opt.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 1e-12
        opt.config.attention_probs_dropout_prob = 1e-12
        for layer in opt.bert.encoder.layer:
            layer.attention.self.dropout.p = 1e-12
        opt.train()
        torch.testing.assert_close(opt(input_ids=ids, attention_mask=am, labels=labels).loss, r.loss)


def test_models_sharing_a_config_are_not_switched_together():
    cfg = _config(dropout=0.1)
    torch.manual_seed(0)
    a, b = BertForMaskedLM(cfg), BertForMaskedLM(cfg)
    assert a.config is b.config
    optimize(a)
    assert a.config._attn_implementation != "sdpa" and b.config._attn_implementation == "sdpa"
    assert all(m.config is a.config for m in a.modules() if "config" in m.__dict__)
    unoptimize(a)
    assert a.config._attn_implementation == "sdpa"


# ---- residual add + LayerNorm at CPU inference ------------------------------------------------
def _cpu_backend_or_skip():
    from sparsebert.ops import cpu_bsr
    if cpu_bsr.unavailable_reason() is not None:
        pytest.skip(cpu_bsr.unavailable_reason())
    return cpu_bsr


@pytest.mark.parametrize("shape, affine", [((3, 7, 64), True), ((5, 384), True), ((2, 3, 40), False)])
def test_add_layernorm_matches_layer_norm_of_the_sum(shape, affine):
    cpu_bsr = _cpu_backend_or_skip()
    g = torch.Generator().manual_seed(0)
    y = torch.randn(*shape, generator=g) * 3 + 1
    r = torch.randn(*shape, generator=g)
    w = torch.randn(shape[-1], generator=g) if affine else None
    b = torch.randn(shape[-1], generator=g) if affine else None
    ref = F.layer_norm(y.double() + r.double(), (shape[-1],), None if w is None else w.double(),
                       None if b is None else b.double(), 1e-12)
    out = y.clone()
    assert cpu_bsr.add_layernorm_(out, r, w, b, 1e-12) is out          # in place
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, match", [
    ("dtype", "float32 only"), ("shape", "residual"), ("strided", "contiguous"), ("weight", "weight and bias")])
def test_add_layernorm_rejects_bad_inputs(case, match):
    cpu_bsr = _cpu_backend_or_skip()
    y, r, w = torch.randn(4, 32), torch.randn(4, 32), torch.ones(32)
    if case == "dtype":
        y, r = y.double(), r.double()
    elif case == "shape":
        r = torch.randn(4, 16)
    elif case == "strided":
        y = torch.randn(32, 4).t()
    else:
        w = torch.ones(16)
    with pytest.raises(RuntimeError, match=match):
        cpu_bsr.add_layernorm_(y, r, w, None, 1e-5)


@pytest.mark.parametrize("kind", ["dense", "block"])
def test_inference_add_norm_fused_only_without_gradients(kind, monkeypatch):
    cpu_bsr = _cpu_backend_or_skip()
    ref = _model(kind, torch.float32, dropout=0.1).eval()
    opt = optimize(copy.deepcopy(ref)).eval()
    assert type(opt.bert.encoder.layer[0].output).__name__ == "AddNormBertOutput"
    assert type(opt.bert.encoder.layer[0].attention.output).__name__ == "AddNormBertSelfOutput"
    calls = []
    real = cpu_bsr.add_layernorm_
    monkeypatch.setattr(cpu_bsr, "add_layernorm_", lambda *a: calls.append(1) or real(*a))
    # the whole-layer op runs the same C++ pass without this function (tests/test_infer_layer.py)
    monkeypatch.setattr(_optimize_module(), "_infer_layer_op", lambda *a: None)
    ids, labels = _batch()
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            a, b = ref.bert(input_ids=ids).last_hidden_state, opt.bert(input_ids=ids).last_hidden_state
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 * 2 * 2                     # 2 blocks x 2 layers x 2 calls
    calls.clear()
    (out_ref, g_ref), (out, g) = _loss_and_grads(ref, ids, labels), _loss_and_grads(opt, ids, labels)
    assert calls == []                                 # with autograd: Hugging Face's code
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    opt.train()
    with torch.no_grad():                              # training-mode dropout: not fused
        opt.bert(input_ids=ids)
    assert calls == []


def test_add_norm_classes_pickle_and_unoptimize():
    import pickle
    _cpu_backend_or_skip()
    m = optimize(_model("block", torch.float32)).eval()
    m2 = pickle.loads(pickle.dumps(m))
    assert type(m2.bert.encoder.layer[1].output) is type(m.bert.encoder.layer[1].output)
    unoptimize(m)
    assert type(m.bert.encoder.layer[1].output).__name__ == "BertOutput"
    assert type(m.bert.encoder.layer[1].attention.output).__name__ == "BertSelfOutput"


def test_add_norm_fusion_follows_changes_to_the_blocks(monkeypatch):
    # Every condition is read at each call: a block whose LayerNorm, mode or backend changes after
    # optimize (and after fused calls) runs Hugging Face's code, and the output stays that model's.
    cpu_bsr = _cpu_backend_or_skip()
    opt_mod = _optimize_module()
    ref = _model("block", torch.float32, dropout=0.1).eval()
    opt = optimize(copy.deepcopy(ref)).eval()
    calls = []
    real = cpu_bsr.add_layernorm_
    monkeypatch.setattr(cpu_bsr, "add_layernorm_", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(opt_mod, "_infer_layer_op", lambda *a: None)   # (its C++ pass: not counted)
    ids, _ = _batch()

    def run():
        calls.clear()
        with torch.no_grad():
            a, b = ref.bert(input_ids=ids).last_hidden_state, opt.bert(input_ids=ids).last_hidden_state
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        return len(calls)

    assert run() == 4
    for m in (ref, opt):                        # no LayerNorm any more in one block
        m.bert.encoder.layer[1].output.LayerNorm = torch.nn.Identity()
    assert run() == 3
    for m in (ref, opt):                        # a LayerNorm without affine parameters: fused
        m.bert.encoder.layer[1].output.LayerNorm = torch.nn.LayerNorm(64, elementwise_affine=False)
    assert run() == 4
    calls.clear()
    opt.bert.encoder.layer[0].attention.output.train()    # training mode, dropout on: not fused
    with torch.no_grad():
        opt.bert(input_ids=ids)
    assert len(calls) == 3
    for m in (ref, opt):
        m.bert.encoder.layer[0].attention.output.eval()
        m.bert.encoder.layer[0].attention.output.dropout.p = 0.0
        m.bert.encoder.layer[0].attention.output.train()       # training mode, p = 0: fused
    assert run() == 4
    monkeypatch.setattr(opt_mod, "_cpu_kernels", [None])        # no cpu kernels here: none fused
    assert run() == 0


def _optimize_module():
    import importlib
    return importlib.import_module("sparsebert.optimize")    # (sparsebert.optimize is the function)


def _direct_ff_or_skip():
    from transformers.models.bert.modeling_bert import BertLayer
    opt_mod = _optimize_module()
    if not opt_mod._direct_ff_ok(BertLayer):
        pytest.skip("this transformers' BertLayer.forward is not the one optimize restates")
    return opt_mod


def _base_layers(model):
    """A copy of ``model`` whose DirectFF layers are Hugging Face's BertLayer again."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if type(mod).__name__ == "DirectFFBertLayer":
            mod.__class__ = type(mod)._sparsebert_base
    return m


@pytest.mark.parametrize("kind", ["dense", "block"])
def test_direct_feed_forward_is_bitwise_hugging_faces_layer(kind, monkeypatch):
    opt_mod = _direct_ff_or_skip()
    from transformers import pytorch_utils
    from transformers.models.bert import modeling_bert
    opt = optimize(_model(kind, torch.float32, dropout=0.1))
    assert all(type(layer).__name__ == "DirectFFBertLayer" for layer in opt.bert.encoder.layer)
    base = _base_layers(opt)
    chunked = []
    real = pytorch_utils.apply_chunking_to_forward
    monkeypatch.setattr(modeling_bert, "apply_chunking_to_forward",
                        lambda fn, size, *a: chunked.append(size) or real(fn, size, *a))
    ids, labels = _batch()
    with torch.no_grad():                       # inference: bit for bit, HF's chunking never asked
        opt.eval(), base.eval()
        assert torch.equal(opt.bert(input_ids=ids).last_hidden_state, base.bert(input_ids=ids).last_hidden_state)
    assert len(chunked) == 2                    # only the base model's two layers
    opt.train(), base.train()                   # training, with dropout: same draws, same bits
    (o1, g1), (o2, g2) = _loss_and_grads(opt, ids, labels), _loss_and_grads(base, ids, labels)
    assert torch.equal(o1.loss, o2.loss) and all(torch.equal(g1[n], g2[n]) for n in g2)
    checkpointed = []
    for m in (opt, base):                       # gradient checkpointing: the wrapper still applies
        (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
        for layer in m.bert.encoder.layer:
            real_ckpt = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = (
                lambda *a, f=real_ckpt, **k: checkpointed.append(1) or f(*a, **k))
    (o1, g1), (o2, g2) = _loss_and_grads(opt, ids, labels), _loss_and_grads(base, ids, labels)
    assert torch.equal(o1.loss, o2.loss) and all(torch.equal(g1[n], g2[n]) for n in g2)
    assert len(checkpointed) == 4
    chunked.clear()
    for m in (opt, base):                       # a chunked feed-forward: Hugging Face's code
        (getattr(m, "activation_checkpointing_disable", None) or m.gradient_checkpointing_disable)()
        m.eval()
        for layer in m.bert.encoder.layer:
            layer.chunk_size_feed_forward = 8
    with torch.no_grad():
        assert torch.equal(opt.bert(input_ids=ids).last_hidden_state, base.bert(input_ids=ids).last_hidden_state)
    assert chunked == [8] * 4
    assert opt_mod._direct_ff_ok(type(opt.bert.encoder.layer[0])._sparsebert_base)


def test_direct_attention_path_is_taken_only_where_it_restates_hugging_face(monkeypatch):
    # BertAttention / BertSelfAttention are skipped in the plain case (their results bitwise equal:
    # test_direct_feed_forward_is_bitwise_hugging_faces_layer); any other case runs their forwards
    import functools
    opt_mod = _direct_ff_or_skip()
    from transformers.models.bert.modeling_bert import BertSelfAttention
    real = BertSelfAttention.forward
    calls = []

    def changed(*a, **k):                        # another forward: its code is not the one restated
        calls.append(1)
        return real(*a, **k)

    @functools.wraps(real)
    def counted(*a, **k):                        # the same forward (unwraps to it), counted
        calls.append(1)
        return real(*a, **k)

    m = optimize(_model("block", torch.float32)).eval()
    ids, _ = _batch()
    for fn, want in ((changed, 2), (counted, 0)):
        monkeypatch.setattr(BertSelfAttention, "forward", fn)
        opt_mod._restated_checked.clear()
        calls.clear()
        with torch.no_grad():
            out = m.bert(input_ids=ids).last_hidden_state
        assert len(calls) == want
        if want == 2:
            ref = out
    assert torch.equal(out, ref)
    calls.clear()
    with torch.no_grad():                        # output_attentions: an argument and capture hooks
        m.bert(input_ids=ids, output_attentions=True)
    assert len(calls) == 2
    calls.clear()
    for layer in m.bert.encoder.layer:           # a hook of the user's on the module: it must run
        layer.attention.self._forward_hooks.clear()
    hooked = []
    m.bert.encoder.layer[0].attention.self.register_forward_hook(lambda *a: hooked.append(1))
    with torch.no_grad():
        m.bert(input_ids=ids)
    assert hooked == [1] and len(calls) == 1
    calls.clear()
    m.set_attn_implementation("eager")           # not sparsebert's attention function
    with torch.no_grad():
        torch.testing.assert_close(m.bert(input_ids=ids).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


def test_direct_feed_forward_layers_pickle_and_unoptimize():
    _direct_ff_or_skip()
    import pickle
    m = optimize(_model("block", torch.float32)).eval()
    m2 = pickle.loads(pickle.dumps(m))
    assert type(m2.bert.encoder.layer[0]) is type(m.bert.encoder.layer[0])
    assert type(m.bert.encoder.layer[0]).__name__ == "DirectFFBertLayer"
    unoptimize(m)
    assert {type(layer).__name__ for layer in m.bert.encoder.layer} == {"BertLayer"}
    assert not any(type(x).__module__ == "sparsebert.optimize" for x in m.modules())


def test_a_changed_bert_layer_forward_is_left_alone(monkeypatch):
    # optimize restates one version of BertLayer.forward: any other is left to Hugging Face.
    opt_mod = _direct_ff_or_skip()
    from transformers.models.bert.modeling_bert import BertLayer

    class OtherLayer(BertLayer):
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            return super().forward(hidden_states, attention_mask, **kwargs) * 2

    assert not opt_mod._direct_ff_ok(OtherLayer)
    m = _model("block", torch.float32)
    for layer in m.bert.encoder.layer:
        layer.__class__ = OtherLayer
    monkeypatch.setattr(opt_mod, "_LAYER_CLASSES", ("OtherLayer",))
    optimize(m)
    assert {type(layer) for layer in m.bert.encoder.layer} == {OtherLayer}


@pytest.mark.parametrize("dropout_mode", ["fast", "torch"])
def test_cpu_inference_attention_runs_the_fused_kernel_and_equals_sdpa(dropout_mode, monkeypatch):
    from sparsebert.ops import cpu_attention
    if not cpu_attention.available():
        pytest.skip("sparsebert._C without the attention op")
    ref = _model("block", dtype=torch.float32).eval()
    opt = optimize(copy.deepcopy(ref), dropout=dropout_mode)
    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    # the whole-layer op calls the kernel from C++ (tests/test_infer_layer.py)
    monkeypatch.setattr(_optimize_module(), "_infer_layer_op", lambda *a: None)
    ids, _ = _batch()
    am = torch.ones_like(ids)
    am[1, 15:] = 0
    with torch.no_grad():
        r = ref.bert(input_ids=ids, attention_mask=am).last_hidden_state
        o = opt.bert(input_ids=ids, attention_mask=am).last_hidden_state
    assert len(calls) == 2                       # one per layer
    torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)
    # with a gradient wanted the kernel (no backward) is not used
    calls.clear()
    opt.bert(input_ids=ids, attention_mask=am).last_hidden_state.sum().backward()
    assert calls == []
