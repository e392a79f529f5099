"""The op against a dense masked reference: forward, backward, dtypes, odd shapes, compile."""
import pytest
import torch

from sparsebert import BlockLayout, bsr_linear
from sparsebert.ops import backends, reference

from conftest import random_layout

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _dense_ref(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("backend", ["reference", "dense"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead, N, K, block, density", [
    ((37,), 48, 40, (16, 8), 0.5),     # tokens not a multiple of anything, rectangular blocks
    ((3, 5), 64, 64, (32, 32), 0.3),   # 3-D input
    ((1,), 96, 64, (32, 16), 1.0),     # fully dense layout
    ((9,), 64, 64, (16, 16), 0.0),     # empty layout
])
def test_forward_and_backward_match_masked_dense(backend, dtype, lead, N, K, block, density):
    lay = random_layout(N // block[0], K // block[1], density, block, seed=N + K)
    torch.manual_seed(N * K + len(lead))
    w = torch.randn(N, K, dtype=torch.float64) * lay.element_mask()
    x = torch.randn(*lead, K, dtype=torch.float64)
    b = torch.randn(N, dtype=torch.float64)
    xs = x.to(dtype).requires_grad_()
    vs = lay.gather(w).to(dtype).requires_grad_()
    bs = b.to(dtype).requires_grad_()
    y = bsr_linear(xs, vs, lay, bs, backend=backend)
    assert y.shape == (*lead, N) and y.dtype == dtype
    ref = _dense_ref(xs.detach(), w.to(dtype), bs.detach())
    assert _rel(y, ref) < TOL[dtype]
    dy = torch.randn_like(y)
    y.backward(dy)
    w_d = w.to(dtype).double()
    dx_ref = dy.double() @ w_d
    dw_ref = lay.gather(dy.double().reshape(-1, N).T @ xs.detach().double().reshape(-1, K))
    assert xs.grad.shape == xs.shape and vs.grad.shape == vs.shape
    if lay.nnz:
        assert _rel(xs.grad, dx_ref) < TOL[dtype]
        assert _rel(vs.grad, dw_ref) < TOL[dtype]
    else:
        assert torch.count_nonzero(xs.grad) == 0
    assert _rel(bs.grad, dy.double().reshape(-1, N).sum(0)) < TOL[dtype]


def test_gradcheck_float64():
    lay = random_layout(3, 4, 0.5, (8, 8), seed=3)
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    v = torch.randn(lay.nnz, 8, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: bsr_linear(x, v, lay, b, backend="reference"), (x, v, b))


def test_rows_without_blocks_give_bias_only():
    mask = torch.tensor([[1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    lay = BlockLayout.from_mask(mask, (16, 16))
    x = torch.randn(7, 32)
    b = torch.randn(48)
    y = bsr_linear(x, torch.randn(lay.nnz, 16, 16), lay, b, backend="reference")
    assert torch.equal(y[:, 16:32], b[16:32].expand(7, 16))


def test_opcheck_contract():
    lay = random_layout(2, 3, 0.6, (16, 16), seed=5)
    x = torch.randn(11, 48)
    v = torch.randn(lay.nnz, 16, 16, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    torch.library.opcheck(torch.ops.sparsebert.bsr_fwd,
                          (x.requires_grad_(), v, b, lay.index(), 32, 48, 16, 16, "reference"))


def test_opcheck_gradient_ops():
    """The gradient ops are differentiable too (double backward): opcheck their autograd."""
    lay = random_layout(2, 3, 0.6, (16, 16), seed=6)
    dy = torch.randn(7, 32, requires_grad=True)
    x = torch.randn(7, 48, requires_grad=True)
    v = torch.randn(lay.nnz, 16, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.sparsebert.bsr_grad_input,
                          (dy, v, lay.index(), 32, 48, 16, 16, "reference"))
    torch.library.opcheck(torch.ops.sparsebert.bsr_grad_weight,
                          (x, dy, lay.index(), 32, 48, 16, 16, "reference"))


def test_torch_compile_fullgraph_has_no_graph_break():
    lay = random_layout(4, 2, 0.5, (16, 16), seed=7)
    v = torch.randn(lay.nnz, 16, 16, requires_grad=True)
    b = torch.randn(64, requires_grad=True)

    def f(x):
        return torch.relu(bsr_linear(x, v, lay, b, backend="reference")).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 9, 32, requires_grad=True)
    out = compiled(x)
    out.backward()
    gx, gv = x.grad.clone(), v.grad.clone()
    x.grad = v.grad = None
    f(x).backward()
    assert torch.allclose(out, f(x), rtol=1e-5, atol=1e-5)
    assert torch.allclose(gx, x.grad, rtol=1e-5, atol=1e-5) and torch.allclose(gv, v.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, exc, message", [
    (lambda lay: (torch.randn(4, 30), torch.randn(lay.nnz, 16, 16), None), ValueError, "in_features=32"),
    (lambda lay: (torch.randn(4, 32), torch.randn(lay.nnz + 1, 16, 16), None), ValueError, "values has shape"),
    (lambda lay: (torch.randn(4, 32), torch.randn(lay.nnz, 16, 16, dtype=torch.float64), None), TypeError, "does not match"),
    (lambda lay: (torch.randint(0, 3, (4, 32)), torch.randn(lay.nnz, 16, 16), None), TypeError, "supports"),
    (lambda lay: (torch.randn(4, 32), torch.randn(lay.nnz, 16, 16), torch.randn(33)), ValueError, "bias has shape"),
])
def test_bad_input_raises_a_clear_error(make, exc, message):
    lay = random_layout(2, 2, 1.0, (16, 16))
    x, v, b = make(lay)
    with pytest.raises(exc, match=message):
        bsr_linear(x, v, lay, b)


def test_unknown_or_unusable_backend_is_named():
    lay = random_layout(2, 2, 1.0, (16, 16))
    x, v = torch.randn(3, 32), torch.randn(lay.nnz, 16, 16)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        bsr_linear(x, v, lay, backend="nope")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        bsr_linear(x, v, lay, backend="cuda")


def test_auto_picks_a_usable_backend_and_caches_it():
    backends.clear_auto_cache()
    lay = random_layout(4, 4, 0.5, (16, 16), seed=11)
    x, v = torch.randn(64, 64), torch.randn(lay.nnz, 16, 16)
    y = bsr_linear(x, v, lay, backend="auto")
    assert len(backends._choice_cache) == 1
    (choice,) = backends._choice_cache.values()
    assert backends.unavailable_reason(choice, "cpu") is None
    assert torch.allclose(y, bsr_linear(x, v, lay, backend="reference"), rtol=1e-4, atol=1e-4)


def test_reference_chunks_tokens_without_changing_results(monkeypatch):
    lay = random_layout(3, 3, 0.7, (8, 8), seed=2)
    x, v, dy = torch.randn(50, 24, dtype=torch.float64), torch.randn(lay.nnz, 8, 8, dtype=torch.float64), \
        torch.randn(50, 24, dtype=torch.float64)
    lt = lay.tensors()
    full = (reference.forward(x, v, None, lt), reference.grad_input(dy, v, lt), reference.grad_weight(x, dy, lt))
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 8 * lay.nnz * 7)   # 7-token chunks
    chunked = (reference.forward(x, v, None, lt), reference.grad_input(dy, v, lt), reference.grad_weight(x, dy, lt))
    for a, b in zip(full, chunked):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("grad", [False, True])
def test_gelu_activation_matches_separate_gelu(grad, backend, monkeypatch):
    if backends.unavailable_reason(backend, "cpu") is not None:
        pytest.skip(backends.unavailable_reason(backend, "cpu"))
    lay = random_layout(3, 4, 0.5, (16, 16), seed=4)
    x = torch.randn(2, 9, 64, requires_grad=grad)
    v = torch.randn(lay.nnz, 16, 16, requires_grad=grad)
    b = torch.randn(48, requires_grad=grad)
    mod = backends.get(backend)
    activations = []
    real_forward = mod.forward
    monkeypatch.setattr(mod, "forward", lambda *a, **k: activations.append(k.get("activation", "none"))
                        or real_forward(*a, **k))
    y = bsr_linear(x, v, lay, b, backend=backend, activation="gelu")
    # Without autograd a backend that lists "gelu" in ACTIVATIONS fuses it into its forward.
    fused = not grad and "gelu" in getattr(mod, "ACTIVATIONS", ())
    assert activations == ["gelu" if fused else "none"]
    ref = torch.nn.functional.gelu(bsr_linear(x, v, lay, b, backend="reference"))
    assert torch.allclose(y, ref, atol=1e-5)
    if grad:
        y.sum().backward()
        assert x.grad is not None and v.grad is not None
    with pytest.raises(ValueError, match="activation"):
        bsr_linear(x, v, lay, b, activation="relu")


def test_auto_takes_the_fastest_backend_per_op_when_training(monkeypatch):
    backends.clear_auto_cache()
    fastest = {"forward": "dense", "grad_input": "reference", "grad_weight": "dense"}

    def fake_times(mod, x, values, lt, train, reps=3):
        ops = ("forward", "grad_input", "grad_weight") if train else ("forward",)
        return {op: (1.0 if mod.NAME == fastest[op] else 2.0) for op in ops}

    monkeypatch.setattr(backends, "_time_ops", fake_times)
    monkeypatch.setattr(backends, "_candidates", lambda device: ("dense", "reference"))
    used = []

    def spy(name, op, fn):
        def wrapped(*args, **kwargs):
            used.append((name, op))
            return fn(*args, **kwargs)
        return wrapped

    for name in ("dense", "reference"):
        mod = backends.get(name)
        for op in ("forward", "grad_input", "grad_weight"):
            monkeypatch.setattr(mod, op, spy(name, op, getattr(mod, op)))
    lay = random_layout(4, 4, 0.5, (16, 16), seed=12)
    x = torch.randn(32, 64, requires_grad=True)
    v = torch.randn(lay.nnz, 16, 16, requires_grad=True)
    y = bsr_linear(x, v, lay, backend="auto")
    (plan,) = backends._choice_cache.values()
    assert backends.plan_names(plan)[1:] == ("reference", "dense")
    used.clear()
    y.backward(torch.ones_like(y))
    assert ("reference", "grad_input") in used and ("dense", "grad_weight") in used
    ref_x, ref_v = x.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    bsr_linear(ref_x, ref_v, lay, backend="reference").backward(torch.ones_like(y))
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-4) and torch.allclose(v.grad, ref_v.grad, atol=1e-4)
    backends.clear_auto_cache()


# ---- the per-call dispatch: what it computes once, and what it reads every call -----------------
def _bad_inputs(lay):
    """Inputs _check rejects (and a few it accepts), for a (32, 32) layout of (16, 16) blocks."""
    nnz = lay.nnz
    x, v, b = torch.randn(4, 32), torch.randn(nnz, 16, 16), torch.randn(32)
    return [
        (x, v, b), (x.double(), v.double(), b.double()), (torch.randn(2, 3, 32), v, None),
        (x.t().contiguous().t()[:, :32], v, b[::1]),                       # strided x: accepted
        (torch.randn(32), v, b),                                           # 1-D x: accepted
        (torch.randn(4, 30), v, b), (torch.tensor(1.0), v, b), (x.half(), v, b), (x.int(), v, b),
        (x, torch.randn(nnz + 1, 16, 16), b), (x, torch.randn(nnz, 16, 8), b), (x, v.reshape(nnz, 256), b),
        (x, v.double(), b), (x, v, torch.randn(33)), (x, v, b.double()), (x, v, torch.randn(1, 32)),
        (x, v.to("meta"), b), (x, v, b.to("meta")), ([[1.0] * 32], v, b), (x, v.numpy(), b),
    ]


def _outcome(fn, *args):
    try:
        fn(*args)
    except Exception as e:    # noqa: BLE001 - the error itself is what is compared
        return type(e), str(e)
    return None


def test_fast_input_test_accepts_exactly_what_check_accepts():
    import importlib
    op = importlib.import_module("sparsebert.ops.bsr_linear")   # the module (its function shadows it)
    lay = random_layout(2, 2, 0.5, (16, 16), seed=1)
    consts = op._consts(lay)
    for x, v, b in _bad_inputs(lay):
        assert op._accepts(x, v, b, consts) == (_outcome(op._check, x, v, lay, b) is None), \
            (getattr(x, "shape", x), getattr(v, "shape", v))


def test_bad_input_gets_the_same_error_after_good_calls():
    # The first call fills the layout's cache; every later call is still checked in full.
    lay = random_layout(2, 2, 0.5, (16, 16), seed=1)
    fresh = BlockLayout.from_mask(lay.block_mask, lay.block, lay.shape)   # same layout, empty cache
    x, v, b = _bad_inputs(lay)[0]
    bsr_linear(x, v, lay, b, backend="reference")
    for x2, v2, b2 in _bad_inputs(lay)[5:]:
        got = _outcome(bsr_linear, x2, v2, lay, b2, "reference")
        assert got is not None and got == _outcome(bsr_linear, x2, v2, fresh, b2, "reference")
    with pytest.raises(TypeError, match="layout must be a sparsebert.BlockLayout"):
        bsr_linear(x, v, lay.tensors(), b)


def test_dispatch_follows_a_new_layout_new_values_and_grad_mode():
    from sparsebert import BlockSparseLinear
    torch.manual_seed(3)
    layer = BlockSparseLinear.from_dense(torch.nn.Linear(64, 64), 0.25, block=(16, 16), backend="reference")
    x = torch.randn(5, 64)

    def expect():
        return x @ layer.dense_weight().detach().T + layer.bias.detach()

    with torch.no_grad():
        torch.testing.assert_close(layer(x), expect(), rtol=0, atol=1e-5)
        old_layout, old_values = layer.layout, layer.values.detach().clone()
        layer.values.mul_(2)                              # in place: read at the next call
        torch.testing.assert_close(layer(x), expect(), rtol=0, atol=1e-5)
        layer.values.data = layer.values.data * 0.5       # .data write: the same
        torch.testing.assert_close(layer(x), expect(), rtol=0, atol=1e-5)
        layer.set_layout(old_layout.intersect(torch.rand(4, 4) < 0.5))   # new layout, fewer blocks
        assert layer.layout.nnz < old_layout.nnz
        torch.testing.assert_close(layer(x), expect(), rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="values has shape"):       # old values, new layout
            bsr_linear(x, old_values, layer.layout, layer.bias)
    y = layer(x.requires_grad_())                          # grad mode on: the autograd path
    assert y.grad_fn is not None
    y.sum().backward()
    assert layer.values.grad.shape == layer.values.shape


def test_auto_cache_key_follows_the_layout_density(monkeypatch):
    backends.clear_auto_cache()
    monkeypatch.setattr(backends, "_candidates", lambda device: ("dense", "reference"))
    monkeypatch.setattr(backends, "_time_ops", lambda mod, x, v, lt, train, reps=3: {
        op: (1.0 if mod.NAME == "reference" else 2.0) for op in ("forward", "grad_input", "grad_weight")})
    full = BlockLayout.dense((32, 32), (16, 16))
    half = full.intersect(torch.tensor([[True, False], [False, True]]))
    x = torch.randn(3, 32)
    bsr_linear(x, torch.randn(full.nnz, 16, 16), full)
    bsr_linear(x, torch.randn(half.nnz, 16, 16), half)
    assert sorted(k[5] for k in backends._choice_cache) == [0.5, 1.0]
    backends.clear_auto_cache()                            # cleared: timed again on the next call
    bsr_linear(x, torch.randn(half.nnz, 16, 16), half)
    assert len(backends._choice_cache) == 1
    backends.clear_auto_cache()


def test_layer_reads_parametrized_or_swapped_parameters():
    # The layer reads values/bias from its parameter dict when they are there, through getattr
    # otherwise: functional_call's swapped tensors and a parametrization's property are both seen.
    from torch.func import functional_call
    from torch.nn.utils import parametrize
    from sparsebert import BlockSparseLinear
    torch.manual_seed(4)
    layer = BlockSparseLinear.from_dense(torch.nn.Linear(32, 32), 0.5, block=(16, 16), backend="reference")
    x = torch.randn(3, 32)

    def direct(values, bias):
        return bsr_linear(x, values, layer.layout, bias, backend="reference")

    with torch.no_grad():
        v2, b2 = torch.randn_like(layer.values), torch.randn_like(layer.bias)
        assert torch.equal(functional_call(layer, {"values": v2, "bias": b2}, (x,)), direct(v2, b2))
        assert torch.equal(layer(x), direct(layer.values, layer.bias))

        class Negate(torch.nn.Module):
            def forward(self, v):
                return -v

        # (a parametrization of "values" itself clashes with ModuleDict.values in torch)
        parametrize.register_parametrization(layer, "bias", Negate())
        assert "bias" not in layer._parameters
        original = layer.parametrizations.bias.original
        assert torch.equal(layer(x), direct(layer.values, -original))


def test_layer_sees_the_onnx_export_flags_torch_reads():
    # nn._in_onnx_export reads the two flags torch.onnx.is_in_onnx_export() reads, without its imports.
    from sparsebert import nn as sbnn
    assert sbnn._in_onnx_export() is torch.onnx.is_in_onnx_export() is False
    holders = sbnn._onnx_flag_holders()
    if holders is None:
        pytest.skip("this torch keeps the ONNX export flags elsewhere: torch's own function is used")
    flags, globals_ = holders
    for obj, attr in ((globals_, "in_onnx_export"), (flags, "_is_onnx_exporting")):
        old = getattr(obj, attr)
        setattr(obj, attr, True)
        try:
            assert torch.onnx.is_in_onnx_export() and sbnn._in_onnx_export() and sbnn._exporting()
        finally:
            setattr(obj, attr, old)
        assert not sbnn._exporting()


def test_plan_names_cached_and_unchanged():
    assert backends.plan_names("cpu") == ("cpu", "cpu", "cpu")
    assert backends.plan_names("dense,reference,cpu") == ("dense", "reference", "cpu")
    assert backends.plan_names("cpu") is backends.plan_names("cpu")


def test_layer_compiles_whole_and_matches_eager():
    # The layer's forward (its parameter-dict reads, the export test) traces without a graph break.
    from sparsebert import BlockSparseLinear
    torch.manual_seed(0)
    layer = BlockSparseLinear.from_dense(torch.nn.Linear(32, 48), 0.5, block=(16, 16), backend="reference")
    layer.activation = "gelu"
    x = torch.randn(2, 5, 32, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    grad = layer.values.grad.clone()
    layer.values.grad = None
    y_eager = layer(x)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, layer.values.grad, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)


def test_backend_environment_variable_read_at_every_call(monkeypatch):
    lay = random_layout(2, 2, 0.5, (16, 16), seed=6)
    x, v = torch.randn(3, 32), torch.randn(lay.nnz, 16, 16)
    used = []
    for name in ("reference", "dense"):
        mod = backends.get(name)
        monkeypatch.setattr(mod, "forward", lambda *a, _f=mod.forward, _n=name, **k: used.append(_n) or _f(*a, **k))
    monkeypatch.setattr(backends, "choose", lambda *a, **k: "dense")
    bsr_linear(x, v, lay)
    monkeypatch.setenv("SPARSEBERT_BACKEND", "reference")
    bsr_linear(x, v, lay)
    monkeypatch.setenv("SPARSEBERT_BACKEND", "")              # empty: auto
    bsr_linear(x, v, lay)
    monkeypatch.setenv("SPARSEBERT_BACKEND", "reference")
    bsr_linear(x, v, lay, backend="dense")                     # a named backend wins
    monkeypatch.delenv("SPARSEBERT_BACKEND")
    bsr_linear(x, v, lay)
    import os
    monkeypatch.setattr(os, "environ", {"SPARSEBERT_BACKEND": "reference"})   # another mapping
    bsr_linear(x, v, lay)
    assert used == ["dense", "reference", "dense", "dense", "dense", "reference"]


@pytest.mark.parametrize("ref_time, want", [(1.04, "reference"), (1.06, "dense")])
def test_auto_on_cpu_takes_dense_only_when_it_is_clearly_faster(monkeypatch, ref_time, want):
    # timed alone, dense is flattered on CPUs (fresh pages in a model, reused alone): it must be
    # more than 5% faster than the sparse candidate to be chosen there
    backends.clear_auto_cache()
    monkeypatch.setattr(backends, "_candidates", lambda device: ("dense", "reference"))
    monkeypatch.setattr(backends, "_time_ops", lambda mod, x, v, lt, train, reps=3: {
        op: (1.0 if mod.NAME == "dense" else ref_time) for op in ("forward", "grad_input", "grad_weight")})
    lay = BlockLayout.dense((32, 32), (16, 16))
    assert backends.choose(torch.randn(4, 32), torch.randn(lay.nnz, 16, 16), lay) == want


def test_auto_times_cpu_candidates_with_l2_evicted(monkeypatch):
    evictions = []
    real = backends._evict_cpu_caches
    monkeypatch.setattr(backends, "_evict_cpu_caches", lambda: evictions.append(1) or real())
    lay = BlockLayout.dense((32, 32), (16, 16))
    x, v = torch.randn(4, 32), torch.randn(lay.nnz, 16, 16)
    t = backends._time_ops(backends.get("reference"), x, v, lay.tensors(), train=True, reps=3)
    assert set(t) == {"forward", "grad_input", "grad_weight"}
    assert len(evictions) == 3 * 5                  # every rep of every op (5 reps on CPU)
