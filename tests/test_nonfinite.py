"""The NaN/Inf contract (docs/CONTRACT.md): pruned blocks are structural zeros, never multiplied,
so a non-finite input reaches exactly the outputs whose kept blocks read it — in the forward, the
input gradient and the weight gradient, for every backend and whatever ``auto`` picks."""
import pytest
import torch

from sparsebert import BlockLayout, bsr_linear
from sparsebert.ops import backends, dense
from conftest import skip_unavailable

BACKENDS = ["reference", "dense", "cpu", "triton"]
# the Triton interpreter runs tl.dot on numpy, which warns on NaN
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
BN, BK = 16, 16



def _layout():
    # Row block 1 and column block 0 hold nothing; block (0, 2) kept, (2, 2) pruned.
    mask = torch.tensor([[0, 1, 1, 0],
                         [0, 0, 0, 0],
                         [0, 1, 0, 1]], dtype=torch.bool)
    return BlockLayout.from_mask(mask, (BN, BK))


def _inputs(lay, M=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, K = lay.shape
    x = torch.randn(M, K, generator=g)
    v = torch.randn(lay.nnz, BN, BK, generator=g) / 8
    b = torch.randn(N, generator=g)
    dy = torch.randn(M, N, generator=g)
    # x: NaN in column block 0 (read by no kept block), +Inf in column block 2 (kept only in row
    # block 0), -Inf in column block 3 (kept only in row block 2), and a NaN read by two blocks.
    x[0, 3] = float("nan")
    x[2, 2 * BK + 5] = float("inf")
    x[4, 3 * BK + 1] = float("-inf")
    x[6, BK + 7] = float("nan")
    # dy: NaN in row block 1 (no kept block), Inf in row block 0, -Inf in row block 2.
    dy[1, BN + 2] = float("nan")
    dy[3, 4] = float("inf")
    dy[5, 2 * BN + 9] = float("-inf")
    return x, v, b, dy


def _expected(lay, x, dy):
    """Where non-finite values must appear: y, dx and dvalues computed with the kept blocks only,
    on the indicator of non-finite inputs."""
    keep = lay.element_mask().float()                      # [N, K]
    nf_x, nf_dy = (~torch.isfinite(x)).float(), (~torch.isfinite(dy)).float()
    y = (nf_x @ keep.T) > 0                                 # [M, N]
    dx = (nf_dy @ keep) > 0                                 # [M, K]
    dw_dense = (nf_dy.T @ torch.ones_like(x) + torch.ones_like(dy).T @ nf_x) > 0   # [N, K]
    dw = lay.gather(dw_dense.float()) > 0
    assert y.any() and (~y).any() and dx.any() and (~dx).any() and dw.any() and (~dw).any()
    return y, dx, dw


def _check(name, out, expect, ref):
    assert torch.equal(~torch.isfinite(out), expect), \
        f"{name}: non-finite values outside the outputs whose kept blocks read a non-finite input"
    # The same NaN / +Inf / -Inf as the reference, and the same finite values.
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isposinf(), ref.isposinf())
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-4, atol=1e-4)


def _run(backend, lay, x, v, b, dy):
    xs, vs, bs = (t.clone().requires_grad_() for t in (x, v, b))
    y = bsr_linear(xs, vs, lay, bs, backend=backend)
    y.backward(dy)
    return y.detach(), xs.grad, vs.grad, bs.grad


def _reference(lay, x, v, b, dy):
    lt = lay.tensors()
    ref = backends.get("reference")
    return ref.forward(x, v, b, lt), ref.grad_input(dy, v, lt), ref.grad_weight(x, dy, lt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_functions_follow_the_contract(backend):
    skip_unavailable(backend)
    lay = _layout()
    x, v, b, dy = _inputs(lay)
    ey, edx, edw = _expected(lay, x, dy)
    ry, rdx, rdw = _reference(lay, x, v, b, dy)
    mod, lt = backends.get(backend), lay.tensors()
    _check(f"{backend} forward", mod.forward(x, v, b, lt), ey, ry)
    _check(f"{backend} grad_input", mod.grad_input(dy, v, lt), edx, rdx)
    _check(f"{backend} grad_weight", mod.grad_weight(x, dy, lt), edw, rdw)
    if hasattr(mod, "grad_weight_bias"):
        dw, db = mod.grad_weight_bias(x, dy, lt)
        _check(f"{backend} grad_weight_bias", dw, edw, rdw)
        assert torch.equal(db.isnan(), dy.sum(0).isnan())


@pytest.mark.parametrize("backend", BACKENDS)
def test_through_bsr_linear(backend):
    skip_unavailable(backend)
    lay = _layout()
    x, v, b, dy = _inputs(lay, seed=1)
    ey, edx, edw = _expected(lay, x, dy)
    ry, rdx, rdw = _reference(lay, x, v, b, dy)
    y, gx, gv, gb = _run(backend, lay, x, v, b, dy)
    _check(f"{backend} y", y, ey, ry)
    _check(f"{backend} dx", gx, edx, rdx)
    _check(f"{backend} dvalues", gv, edw, rdw)
    assert torch.equal(gb.isnan(), dy.sum(0).isnan())


@pytest.mark.parametrize("winner", ["dense", "cpu", "reference"])
def test_auto_gives_the_same_answer_whichever_backend_it_picks(winner, monkeypatch):
    if winner != "reference":
        skip_unavailable(winner)
    monkeypatch.setattr(backends, "_candidates", lambda device: ("cpu", "dense", "reference"))
    monkeypatch.setattr(backends, "_time_ops", lambda mod, *a, **k: {
        op: (1.0 if mod.NAME == winner else 2.0) for op in backends._OPS})
    backends.clear_auto_cache()
    try:
        lay = _layout()
        x, v, b, dy = _inputs(lay, seed=2)
        ey, edx, edw = _expected(lay, x, dy)
        ry, rdx, rdw = _reference(lay, x, v, b, dy)
        y, gx, gv, _ = _run("auto", lay, x, v, b, dy)
        assert backends.plan_names(next(iter(backends._choice_cache.values()))) == (winner,) * 3
        _check("auto y", y, ey, ry)
        _check("auto dx", gx, edx, rdx)
        _check("auto dvalues", gv, edw, rdw)
    finally:
        backends.clear_auto_cache()


def test_dense_takes_the_structural_path_only_for_non_finite_inputs(monkeypatch):
    lay = _layout()
    x, v, b, dy = _inputs(lay)
    ref = backends.get("reference")
    calls = []
    for op in ("forward", "grad_input", "grad_weight"):
        real = getattr(ref, op)
        monkeypatch.setattr(ref, op, lambda *a, _op=op, _f=real: calls.append(_op) or _f(*a))
    lt = lay.tensors()
    xf, dyf = torch.nan_to_num(x, 0.0, 0.0, 0.0), torch.nan_to_num(dy, 0.0, 0.0, 0.0)
    dense.forward(xf, v, b, lt), dense.grad_input(dyf, v, lt), dense.grad_weight(x, dy, lt)
    assert calls == []
    dense.forward(x, v, b, lt), dense.grad_input(dy, v, lt)
    assert calls == ["forward", "grad_input"]
    # fp16: a finite tensor whose sum overflows fp16 is still seen as finite (fp32 accumulation).
    big = torch.full((64, 64), 60000.0, dtype=torch.float16)
    assert not dense.has_nonfinite(big) and dense.has_nonfinite(big.clone().fill_(float("inf")))
