"""What the op layer promises the backends and the callers (docs/CONTRACT.md): contiguous inputs
for every backend, and a fast ``auto`` choice inside ``torch.compile`` without an eager warm-up."""
import pytest
import torch

from sparsebert import bsr_linear
from sparsebert.ops import backends, reference

import backend_harness as H
from conftest import random_layout, skip_unavailable

BACKENDS = list(backends.NAMES)    # every registered backend (those that cannot run here skip, saying why)


def _problem(seed=0, M=13):
    lay = random_layout(3, 4, 0.5, (16, 16), seed=seed)
    g = torch.Generator().manual_seed(seed)
    return (lay, torch.randn(M, 64, generator=g), torch.randn(lay.nnz, 16, 16, generator=g) / 8,
            torch.randn(48, generator=g))


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_non_contiguous_inputs_reach_every_backend_contiguous(backend):
    skip_unavailable(backend)
    lay, x, v, b = _problem(seed=1)
    ref64 = bsr_linear(x.double(), v.double(), lay, b.double(), backend="reference")
    torch_own = torch.nn.functional.linear(x, lay.scatter(v), b)      # the shared rule's baseline
    gelu = torch.nn.functional.gelu
    # strided views of the same numbers: a bias slice, a transposed x, permuted value blocks
    b_full = torch.stack([b, torch.zeros_like(b)], 1).reshape(-1).requires_grad_()
    b_nc = b_full[::2]
    x_nc = x.t().contiguous().t().requires_grad_()
    v_nc = v.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not (b_nc.is_contiguous() or x_nc.is_contiguous() or v_nc.is_contiguous())
    y = bsr_linear(x_nc, v_nc, lay, b_nc, backend=backend)
    H.check_rule(y, torch_own, ref64, x.dtype, f"{backend} forward of strided inputs")
    y.sum().backward()
    torch.testing.assert_close(b_full.grad[::2], torch.full_like(b, x.shape[0]))
    assert not b_full.grad[1::2].any()
    with torch.no_grad():   # the no-autograd path and the fused GELU path too
        H.check_rule(bsr_linear(x_nc, v_nc, lay, b_nc, backend=backend), torch_own, ref64, x.dtype,
                     f"{backend} no-grad forward of strided inputs")
        H.check_rule(bsr_linear(x_nc, v_nc, lay, b_nc, backend=backend, activation="gelu"), gelu(torch_own),
                     gelu(ref64), x.dtype, f"{backend} forward+gelu of strided inputs")


@pytest.fixture
def fresh_auto(monkeypatch):
    """No eager choice cached (as in a process that compiles before any eager call)."""
    backends.clear_auto_cache()
    monkeypatch.setattr(backends, "_last_choice", {}, raising=False)   # the old trace-time fallback
    torch._dynamo.reset()
    yield
    backends.clear_auto_cache()
    torch._dynamo.reset()


@pytest.fixture
def reference_spy(monkeypatch):
    calls = []
    for op in ("forward", "grad_input", "grad_weight"):
        real = getattr(reference, op)
        monkeypatch.setattr(reference, op, lambda *a, _op=op, _f=real, **k: calls.append(_op) or _f(*a, **k))
    return calls


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_auto_before_any_eager_call_does_not_run_reference(fresh_auto, reference_spy, dynamic):
    lay, x, v, b = _problem(seed=2, M=64)
    v.requires_grad_()

    def f(x):
        return bsr_linear(x, v, lay, b, backend="auto")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    xs = x.clone().requires_grad_()
    y = compiled(xs)
    y.square().sum().backward()
    assert reference_spy == [], f"compiled auto ran the reference backend: {reference_spy}"
    # It timed the candidates on the real inputs, as eager mode would have.
    (plan,) = backends._choice_cache.values()
    assert set(backends.plan_names(plan)) <= {"cpu", "dense"}
    ref_x = x.clone().requires_grad_()
    ref_v = v.detach().clone().requires_grad_()
    yr = bsr_linear(ref_x, ref_v, lay, b, backend="dense")
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xs.grad, ref_x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v.grad, ref_v.grad, rtol=1e-4, atol=1e-4)
    with torch.no_grad():   # inference, new token count
        compiled(torch.randn(5, 64))
    assert reference_spy == []


def test_compiled_auto_uses_the_eager_choice_when_there_is_one(fresh_auto, monkeypatch):
    lay, x, v, b = _problem(seed=3, M=32)
    monkeypatch.setattr(backends, "_time_ops", lambda mod, *a, **k: {
        op: (1.0 if mod.NAME == "dense" else 2.0) for op in backends._OPS})
    bsr_linear(x, v, lay, b)                         # eager: settles "dense" for this key
    assert list(backends._choice_cache.values()) == ["dense"]
    used = []
    dense = backends.get("dense")
    real = dense.forward
    monkeypatch.setattr(dense, "forward", lambda *a, **k: used.append("dense") or real(*a, **k))
    monkeypatch.setattr(backends, "_time_ops", lambda *a, **k: pytest.fail("timed again"))
    compiled = torch.compile(lambda x: bsr_linear(x, v, lay, b), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), bsr_linear(x, v, lay, b, backend="reference"),
                               rtol=1e-5, atol=1e-5)
    assert used == ["dense"]


def test_compiled_named_backend_that_cannot_run_says_why(fresh_auto):
    lay, x, v, b = _problem(seed=4)
    compiled = torch.compile(lambda x: bsr_linear(x, v, lay, b, backend="cuda"), backend="aot_eager")
    with pytest.raises(Exception, match="backend 'cuda' cannot run this call"):
        compiled(x)
