"""Second-order gradients (``create_graph=True``) of ``bsr_linear``, every backend and both op
paths (the eager ``autograd.Function`` and the custom ops' registered autograd), against the
double backward of the dense equivalent."""
import importlib

import pytest
import torch

from sparsebert import bsr_linear
from sparsebert.ops import backends

from conftest import random_layout, skip_unavailable

BACKENDS = ["reference", "dense", "cpu", "triton", "auto"]



def _problem(dtype, seed=0, M=7):
    # 16x16 blocks: every backend (cpu needs multiples of 16, triton 16..128) runs them.
    lay = random_layout(3, 4, 0.5, (16, 16), seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, 64, generator=g, dtype=torch.float64)
    v = torch.randn(lay.nnz, 16, 16, generator=g, dtype=torch.float64) / 8
    b = torch.randn(48, generator=g, dtype=torch.float64)
    probes = [torch.randn(M, 64, generator=g, dtype=torch.float64),
              torch.randn(lay.nnz, 16, 16, generator=g, dtype=torch.float64),
              torch.randn(48, generator=g, dtype=torch.float64)]
    return lay, [t.to(dtype) for t in (x, v, b)], [t.to(dtype) for t in probes]


def _tiny(seed):
    """A small float64 problem for gradgradcheck (its cost grows with the number of input
    elements squared): 4x4 blocks, which the reference and dense backends take."""
    lay = random_layout(2, 3, 0.6, (4, 4), seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(lay.nnz, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    return lay, (x, v, b)


def _second_order(f, inputs, probes):
    """d/d(inputs) of <d L/d(inputs), probes>, L = sum(sin(f(inputs))): every second-order path
    (x-x is zero for a linear op, but x-values, values-x, and the values/bias ones through sin'')."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = f(*inputs)
    loss = torch.sin(y).sum()
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    assert all(g.requires_grad for g in grads), "first-order gradients are not differentiable"
    s = sum((g * p).sum() for g, p in zip(grads, probes))
    return [g.detach() for g in grads], torch.autograd.grad(s, inputs)


def _dense_f(lay):
    def f(x, v, b):
        return x @ lay.scatter(v).T + b
    return f


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_gradgradcheck_float64_reference():
    lay, args = _tiny(3)
    f = lambda x, v, b: bsr_linear(x, v, lay, b, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_gradgradcheck_float64_custom_op():
    """The custom op's registered autograd (the path ``torch.compile`` traces), called eagerly."""
    lay, args = _tiny(4)
    idx = lay.index()

    def f(x, v, b):
        return torch.ops.sparsebert.bsr_fwd(x, v, b, idx, 8, 12, 4, 4, "reference")
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_matches_dense(backend, monkeypatch):
    skip_unavailable(backend)
    if backend == "auto" and backends.unavailable_reason("cpu", "cpu") is None:
        # auto as it is on CPU when the compiled kernels win (the zero second-order grads)
        monkeypatch.setattr(backends, "_time_ops", lambda mod, *a, **k: {
            op: (1.0 if mod.NAME == "cpu" else 2.0) for op in backends._OPS})
    backends.clear_auto_cache()
    lay, inputs, probes = _problem(torch.float32, seed=5)
    g1, g2 = _second_order(lambda x, v, b: bsr_linear(x, v, lay, b, backend=backend), inputs, probes)
    r1, r2 = _second_order(_dense_f(lay), [t.double() for t in inputs], [p.double() for p in probes])
    for a, r, name in zip(g1 + list(g2), r1 + list(r2),
                          ("dx", "dvalues", "dbias", "d2x", "d2values", "d2bias")):
        assert r.abs().max() > 0, name
        assert _rel(a, r) < 1e-4, f"{backend}: {name} differs from the dense double backward"
    backends.clear_auto_cache()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_second_order_through_the_custom_ops(backend):
    skip_unavailable(backend)
    lay, inputs, probes = _problem(torch.float32, seed=6)
    idx = lay.index()

    def f(x, v, b):
        return torch.ops.sparsebert.bsr_fwd(x, v, b, idx, 48, 64, 16, 16, backend)
    _, g2 = _second_order(f, inputs, probes)
    _, r2 = _second_order(_dense_f(lay), [t.double() for t in inputs], [p.double() for p in probes])
    for a, r in zip(g2, r2):
        assert _rel(a, r) < 1e-4


def test_third_order_and_mixed_plan(monkeypatch):
    """Gradients of any order run on the same three ops, each on its own backend of the plan."""
    lay, args = _tiny(8)
    monkeypatch.setattr(backends, "_candidates", lambda device: ("dense", "reference"))
    fake = {"forward": "dense", "grad_input": "reference", "grad_weight": "dense"}
    monkeypatch.setattr(backends, "_time_ops", lambda mod, x, v, lt, train, reps=3: {
        op: (1.0 if fake[op] == mod.NAME else 2.0) for op in backends._OPS})
    backends.clear_auto_cache()
    try:
        f = lambda x, v, b: torch.sin(bsr_linear(x, v, lay, b, backend="auto"))  # noqa: E731
        assert torch.autograd.gradgradcheck(f, args)
        assert backends.plan_names(next(iter(backends._choice_cache.values()))) == \
            ("dense", "reference", "dense")
        # third order: d/dx of d/dv of d/dx
        y = f(*args).sum()
        gx, = torch.autograd.grad(y, args[0], create_graph=True)
        gv, = torch.autograd.grad(gx.sum(), args[1], create_graph=True)
        g3, = torch.autograd.grad(gv.sum(), args[0])
        yd = torch.sin(_dense_f(lay)(*args)).sum()
        rx, = torch.autograd.grad(yd, args[0], create_graph=True)
        rv, = torch.autograd.grad(rx.sum(), args[1], create_graph=True)
        r3, = torch.autograd.grad(rv.sum(), args[0])
        assert torch.allclose(g3, r3, rtol=1e-10, atol=1e-12)
    finally:
        backends.clear_auto_cache()


def test_first_order_backward_stays_on_the_fast_path(monkeypatch):
    """Without create_graph the backward calls the backends directly (no extra Function nodes)
    and uses the fused weight+bias gradient where the backend has one."""
    op = importlib.import_module("sparsebert.ops.bsr_linear")
    calls = []
    for cls in (op._GradInputEager, op._GradWeightEager):
        monkeypatch.setattr(cls, "apply", lambda *a, _c=cls: calls.append(_c) or None)
    lay, inputs, _ = _problem(torch.float32, seed=9)
    x, v, b = (t.requires_grad_() for t in inputs)
    bsr_linear(x, v, lay, b, backend="reference").sum().backward()
    assert calls == [] and x.grad is not None and v.grad is not None and b.grad is not None
