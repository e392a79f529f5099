"""``bsr_linear`` under ``torch.autocast`` behaves like ``nn.Linear``: inputs, kept blocks and bias
cast to the autocast dtype, output in that dtype, gradients of fp32 parameters in fp32; eager and
``torch.compile``; ``auto`` falls back from a backend that lacks the autocast dtype."""
import pytest
import torch
import torch.nn.functional as F

from sparsebert import BlockSparseLinear, bsr_linear
from sparsebert.ops import backends

from conftest import random_layout, skip_unavailable

BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()



def _params(seed=0, M=11):
    lay = random_layout(3, 4, 0.5, (16, 16), seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, M, 64, generator=g)
    v = torch.randn(lay.nnz, 16, 16, generator=g) / 8
    b = torch.randn(48, generator=g)
    return lay, x, v, b


def _run(fn, x, v, b, dtype=torch.bfloat16):
    xs, vs, bs = (t.clone().requires_grad_() for t in (x, v, b))
    with torch.autocast("cpu", dtype=dtype):
        y = fn(xs, vs, bs)
    y.float().square().sum().backward()
    return y, xs.grad, vs.grad, bs.grad


def _dense(lay):
    return lambda x, v, b: F.linear(x, lay.scatter(v), b)


def _assert_like_linear(out, ref, dtype=torch.bfloat16):
    y, gx, gv, gb = out
    ry, rgx, rgv, rgb = ref
    assert y.dtype == ry.dtype == dtype
    assert gx.dtype == gv.dtype == gb.dtype == torch.float32       # fp32 master parameters
    # Both round the same bf16 products; the sums (fp32) and the final roundings differ.
    for a, r, name in zip(out, ref, ("y", "dx", "dvalues", "dbias")):
        assert _rel(a, r) < 1e-2, f"{name}: relative error {_rel(a, r):.2e}"


@pytest.mark.parametrize("backend", ["auto", "reference", "dense", "cpu", "triton"])
def test_matches_linear_under_autocast(backend):
    skip_unavailable(backend)
    lay, x, v, b = _params(seed=1)
    out = _run(lambda x, v, b: bsr_linear(x, v, lay, b, backend=backend), x, v, b)
    _assert_like_linear(out, _run(_dense(lay), x, v, b))


def test_input_already_in_the_autocast_dtype():
    """The issue's failure: x is bf16 (the output of an earlier autocast layer), values fp32."""
    lay, x, v, b = _params(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bsr_linear(x.bfloat16(), v, lay, b)
        ref = F.linear(x.bfloat16(), lay.scatter(v), b)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, **BF16_TOL)


def test_block_sparse_linear_module_under_autocast():
    lay, x, _, _ = _params(seed=3)
    layer = BlockSparseLinear(lay)
    dense_w = lay.scatter(layer.values.detach()).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ry = F.linear(x, dense_w, layer.bias)
    assert y.dtype == ry.dtype == torch.bfloat16
    torch.testing.assert_close(y, ry, **BF16_TOL)
    y.float().sum().backward()
    ry.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32
    torch.testing.assert_close(layer.values.grad, lay.gather(dense_w.grad), **BF16_TOL)


def test_gelu_under_autocast():
    lay, x, v, b = _params(seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y = bsr_linear(x, v, lay, b, activation="gelu")
        ref = F.gelu(F.linear(x, lay.scatter(v), b))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, **BF16_TOL)


def test_float16_autocast_falls_back_from_the_cpu_backend():
    """The cpu kernels take fp32/bf16 only: ``auto`` picks another backend for fp16, and an explicit
    ``backend="cpu"`` says why it cannot run."""
    lay, x, v, b = _params(seed=5)
    backends.clear_auto_cache()
    try:
        out = _run(lambda x, v, b: bsr_linear(x, v, lay, b), x, v, b, dtype=torch.float16)
        _assert_like_linear(out, _run(_dense(lay), x, v, b, dtype=torch.float16), dtype=torch.float16)
        (plan,) = backends._choice_cache.values()
        assert "cpu" not in backends.plan_names(plan)
    finally:
        backends.clear_auto_cache()
    if backends.unavailable_reason("cpu", "cpu") is None:
        with torch.autocast("cpu", dtype=torch.float16), pytest.raises(RuntimeError, match="float16"):
            bsr_linear(x, v, lay, b, backend="cpu")


def test_no_autocast_leaves_dtypes_alone():
    lay, x, v, b = _params(seed=6)
    with pytest.raises(TypeError, match="does not match"):
        bsr_linear(x.bfloat16(), v, lay, b)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert bsr_linear(x, v, lay, b).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):    # float64 is never autocast (as F.linear)
        assert bsr_linear(x.double(), v.double(), lay, b.double(), backend="reference").dtype == torch.float64


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
@pytest.mark.parametrize("where", ["inside", "outside"])
def test_compiled_under_autocast(backend, where):
    skip_unavailable(backend)
    torch._dynamo.reset()
    lay, x, v, b = _params(seed=7)

    def f(x, v, b):
        if where == "inside":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return bsr_linear(x, v, lay, b, backend=backend)
        return bsr_linear(x, v, lay, b, backend=backend)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xs, vs, bs = (t.clone().requires_grad_() for t in (x, v, b))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=where == "outside"):
        y = compiled(xs, vs, bs)
    y.float().square().sum().backward()
    out = (y, xs.grad, vs.grad, bs.grad)
    _assert_like_linear(out, _run(_dense(lay), x, v, b))
    torch._dynamo.reset()
