"""The CUDA C++ backend (``sparsebert.ops.cuda_bsr``, kernels in ``csrc/cuda``) against the
float64 reference.

GPU tests are marked ``gpu`` (run with ``pytest -m gpu`` on a CUDA machine with ``sparsebert._C``
built with CUDA); they skip when the backend is unavailable. The last tests run anywhere and
check that the backend explains itself when it cannot run.
"""
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from sparsebert.layout import BlockLayout
from sparsebert.ops import cuda_bsr, reference

# Relative Frobenius error allowed against the fp64 reference.
TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-5}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture
def cuda_backend():
    """Skips unless the CUDA backend can run here (queried at test time, not at import)."""
    reason = cuda_bsr.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")
    return cuda_bsr


def _variants():
    """The DSD kernel variants of the loaded library (0 when it cannot be asked)."""
    try:
        n, _ = cuda_bsr.variants()
    except Exception:  # noqa: BLE001 - unavailable backend: the tests using this skip anyway
        n = 1
    return list(range(n))


def _layout(N, K, block, density, seed=0, mask=None):
    bn, bk = block
    if mask is None:
        g = torch.Generator().manual_seed(seed)
        mask = torch.rand(N // bn, K // bk, generator=g) < density
    return BlockLayout.from_mask(mask, (bn, bk), (N, K))


def _rand(*shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=torch.float32, generator=g).to(dtype)


def _rel_err(out, ref):
    """Relative Frobenius error; exact-zero references must be matched exactly."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (unwritten output tiles?)"
    diff = (out.double() - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else diff


def _poison(*shapes_dtypes):
    """Fill the caching allocator's free blocks of these sizes with NaN, so an output tile the
    kernel forgets to write shows up as NaN (outputs are allocated with torch.empty)."""
    for shape, dtype in shapes_dtypes:
        t = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
        del t


def _check_all(layout, M, dtype, seed=0, with_bias=True, variant=None):
    N, K = layout.shape
    bn, bk = layout.block
    lt = layout.tensors("cuda")
    x = _rand(M, K, dtype=dtype, seed=seed)
    dy = _rand(M, N, dtype=dtype, seed=seed + 1)
    values = _rand(layout.nnz, bn, bk, dtype=dtype, seed=seed + 2)
    bias = _rand(N, dtype=dtype, seed=seed + 3) if with_bias else None
    x64, dy64, v64 = x.double(), dy.double(), values.double()
    b64 = bias.double() if bias is not None else None
    tol = TOL[dtype]

    _poison(((M, N), dtype))
    y = cuda_bsr.forward(x, values, bias, lt, variant=variant)
    torch.cuda.synchronize()  # a kernel fault shows up here, attributed to this op
    assert y.dtype == dtype and y.device == x.device
    err = _rel_err(y, reference.forward(x64, v64, b64, lt))
    assert err < tol, f"forward (variant {variant}): rel err {err:.3g} >= {tol}"

    _poison(((M, K), dtype))
    dx = cuda_bsr.grad_input(dy, values, lt, variant=variant)
    torch.cuda.synchronize()
    assert dx.dtype == dtype
    err = _rel_err(dx, reference.grad_input(dy64, v64, lt))
    assert err < tol, f"grad_input (variant {variant}): rel err {err:.3g} >= {tol}"

    _poison(((layout.nnz, bn, bk), dtype), ((layout.nnz, bn, bk), torch.float32))
    dv = cuda_bsr.grad_weight(x, dy, lt)
    torch.cuda.synchronize()
    assert dv.dtype == dtype and tuple(dv.shape) == (layout.nnz, bn, bk)
    err = _rel_err(dv, reference.grad_weight(x64, dy64, lt))
    assert err < tol, f"grad_weight: rel err {err:.3g} >= {tol}"


# ---- smoke test in a child process: a crash (segfault, illegal address) fails here, with the
# child's output, instead of killing the whole pytest session ---------------------------------
_SMOKE = textwrap.dedent("""
    import faulthandler, sys, torch
    faulthandler.enable()
    from sparsebert.layout import BlockLayout
    from sparsebert.ops import cuda_bsr, reference
    n_var, default = cuda_bsr.variants()
    print("variants", n_var, "default", default, flush=True)
    g = torch.Generator().manual_seed(0)
    for block in [(64, 64), (32, 32), (64, 32), (32, 64)]:
        mask = torch.rand(256 // block[0], 192 // block[1], generator=g) < 0.5
        layout = BlockLayout.from_mask(mask, block, (256, 192))
        lt = layout.tensors("cuda")
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(300, 192, device="cuda").to(dtype)
            dy = torch.randn(300, 256, device="cuda").to(dtype)
            v = torch.randn(layout.nnz, *block, device="cuda").to(dtype)
            for var in range(n_var if dtype != torch.float32 else 1):
                for op in ("forward", "grad_input", "grad_weight"):
                    print("run", block, dtype, "variant", var, op, flush=True)
                    if op == "forward":
                        out = cuda_bsr.forward(x, v, None, lt, variant=var)
                        ref = reference.forward(x.double(), v.double(), None, lt)
                    elif op == "grad_input":
                        out = cuda_bsr.grad_input(dy, v, lt, variant=var)
                        ref = reference.grad_input(dy.double(), v.double(), lt)
                    else:
                        out = cuda_bsr.grad_weight(x, dy, lt)
                        ref = reference.grad_weight(x.double(), dy.double(), lt)
                    torch.cuda.synchronize()
                    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                    print("   rel err", f"{err:.2e}", flush=True)
    print("SMOKE OK")
""")


@pytest.mark.gpu
def test_smoke_in_subprocess(cuda_backend):
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _SMOKE], env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "SMOKE OK" in out, (
        f"CUDA smoke run failed (exit {r.returncode}); last output:\n{out[-4000:]}")


# ---- numerics ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [(32, 32), (64, 64), (32, 64), (64, 32)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("M", [1, 37, 1000, 16385])
def test_random_layouts(cuda_backend, dtype, block, M):
    layout = _layout(256, 384, block, density=0.5, seed=M)
    _check_all(layout, M, dtype, seed=M)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [(32, 32), (64, 64)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("kind", ["empty", "dense", "empty_rows_cols", "single"])
def test_odd_layouts(cuda_backend, dtype, block, kind):
    N, K = 320, 192
    bn, bk = block
    R, C = N // bn, K // bk
    if kind == "empty":
        mask = torch.zeros(R, C, dtype=torch.bool)
    elif kind == "dense":
        mask = torch.ones(R, C, dtype=torch.bool)
    elif kind == "empty_rows_cols":
        mask = torch.rand(R, C, generator=torch.Generator().manual_seed(1)) < 0.6
        mask[0] = False
        mask[R // 2] = False
        mask[:, C - 1] = False
    else:
        mask = torch.zeros(R, C, dtype=torch.bool)
        mask[R - 1, 0] = True
    layout = _layout(N, K, block, 0, mask=mask)
    for M in (0, 1, 129):
        _check_all(layout, M, dtype, seed=M + 7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block", [(32, 32), (64, 64), (32, 64), (64, 32)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("variant", [0, 1, 2, 3])
def test_variants(cuda_backend, dtype, block, variant):
    """Every tensor-core variant, with row/column blocks whose kept counts are not multiples of the
    blocks-per-stage (partial last stage), an empty row, a dense row, and M tails."""
    if variant not in _variants():
        pytest.skip(f"the built library has no variant {variant}")
    N, K = 384, 448
    bn, bk = block
    g = torch.Generator().manual_seed(variant * 7 + bn + bk)
    mask = torch.rand(N // bn, K // bk, generator=g) < 0.45
    mask[0] = False
    mask[1] = True
    mask[:, 2] = True
    layout = _layout(N, K, block, 0, mask=mask)
    for M in (1, 130, 2049):
        _check_all(layout, M, dtype, seed=M + variant, variant=variant)


@pytest.mark.gpu
def test_bad_variant(cuda_backend):
    layout, x, values, index, N, K = _op_args()
    with pytest.raises(RuntimeError, match="variant must be"):
        torch.ops.sparsebert_cuda.forward(x, values, None, index, N, K, 64, 64, 99)


@pytest.mark.gpu
def test_cpu_index_rejected(cuda_backend):
    layout, x, values, index, N, K = _op_args()
    with pytest.raises(ValueError, match="layout index is on cpu"):
        cuda_bsr.forward(x, values, None, layout.tensors("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_bias(cuda_backend, dtype):
    _check_all(_layout(128, 256, (64, 64), 0.5), 300, dtype, with_bias=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(768, 768), (3072, 768), (768, 3072)], ids=lambda s: f"{s[1]}to{s[0]}")
@pytest.mark.parametrize("density", [0.5, 0.25, 0.1])
def test_bert_sizes(cuda_backend, dtype, shape, density):
    _check_all(_layout(*shape, (64, 64), density, seed=3), 16384, dtype)


@pytest.mark.gpu
def test_bert_size_fp32_block32(cuda_backend):
    _check_all(_layout(768, 3072, (32, 32), 0.3, seed=4), 4096, torch.float32)


@pytest.mark.gpu
def test_uses_current_stream(cuda_backend):
    layout = _layout(256, 256, (64, 64), 0.5)
    lt = layout.tensors("cuda")
    x = _rand(513, 256, dtype=torch.float16, seed=0)
    values = _rand(layout.nnz, 64, 64, dtype=torch.float16, seed=1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = cuda_bsr.forward(x, values, None, lt)
    torch.cuda.current_stream().wait_stream(s)
    assert _rel_err(y, reference.forward(x.double(), values.double(), None, lt)) < TOL[torch.float16]


# ---- bad inputs: clear errors, never a crash ---------------------------------------------------
def _op_args(dtype=torch.float16, block=(64, 64), M=64):
    layout = _layout(256, 128, block, 0.5)
    N, K = layout.shape
    x = _rand(M, K, dtype=dtype, seed=0)
    values = _rand(layout.nnz, *block, dtype=dtype, seed=1)
    return layout, x, values, layout.index("cuda"), N, K


@pytest.mark.gpu
def test_bad_inputs(cuda_backend):
    ops = torch.ops.sparsebert_cuda
    layout, x, values, index, N, K = _op_args()
    bn, bk = layout.block
    dy = torch.zeros(x.shape[0], N, device="cuda", dtype=x.dtype)

    with pytest.raises(RuntimeError, match="values must be a CUDA tensor"):
        ops.forward(x, values.cpu(), None, index, N, K, bn, bk)
    with pytest.raises(RuntimeError, match="index must be a CUDA tensor"):
        ops.grad_input(dy, values, index.cpu(), N, K, bn, bk)
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16 or float32"):
        ops.forward(x.double(), values.double(), None, index, N, K, bn, bk)
    with pytest.raises(RuntimeError, match="values has dtype"):
        ops.forward(x, values.float(), None, index, N, K, bn, bk)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        xt = torch.zeros(K, x.shape[0], device="cuda", dtype=x.dtype).t()
        ops.forward(xt, values, None, index, N, K, bn, bk)
    with pytest.raises(RuntimeError, match="index has"):
        ops.forward(x, values, None, index[:-1], N, K, bn, bk)
    with pytest.raises(RuntimeError, match="index has"):
        ops.grad_weight(x, dy, index[:-1], N, K, bn, bk)
    with pytest.raises(RuntimeError, match="index must be int32"):
        ops.forward(x, values, None, index.long(), N, K, bn, bk)
    with pytest.raises(RuntimeError, match="x must have 128 columns"):
        ops.forward(x[:, :64].contiguous(), values, None, index, N, K, bn, bk)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.forward(x, values, torch.zeros(N + 1, device="cuda", dtype=x.dtype), index, N, K, bn, bk)
    with pytest.raises(RuntimeError, match="x has 64 rows but dy has"):
        ops.grad_weight(x, dy[:-1], index, N, K, bn, bk)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        flat = torch.zeros(x.numel() + 1, device="cuda", dtype=x.dtype)
        ops.forward(flat[1:].view_as(x), values, None, index, N, K, bn, bk)


@pytest.mark.gpu
def test_unsupported_block(cuda_backend):
    layout = _layout(64, 64, (16, 16), 0.5)
    x = torch.zeros(8, 64, device="cuda", dtype=torch.float16)
    values = torch.zeros(layout.nnz, 16, 16, device="cuda", dtype=torch.float16)
    lt = layout.tensors("cuda")
    assert "block (16, 16) not supported" in cuda_bsr.unsupported_reason(x, values, lt)
    with pytest.raises(RuntimeError, match=r"block \(16, 16\) is not supported"):
        torch.ops.sparsebert_cuda.forward(x, values, None, layout.index("cuda"), 64, 64, 16, 16)


# ---- runs anywhere -----------------------------------------------------------------------------
def test_reports_why_unavailable():
    reason = cuda_bsr.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "CUDA devices only" in reason
    reason = cuda_bsr.unavailable_reason()
    if not torch.cuda.is_available():
        assert reason is not None
        assert any(s in reason for s in ("sparsebert._C", "without CUDA", "no CUDA device")), reason
    if reason is not None:
        layout = _layout(64, 64, (32, 32), 0.5)
        with pytest.raises(RuntimeError, match="cuda backend unavailable"):
            cuda_bsr.forward(torch.zeros(1, 64), torch.zeros(layout.nnz, 32, 32), None, layout.tensors())


def test_unsupported_reason_explains():
    lt = _layout(64, 64, (32, 32), 0.5).tensors()
    cuda = torch.device("cuda")
    assert cuda_bsr.unsupported_reason(SimpleNamespace(device=cuda, dtype=torch.float16), None, lt) is None
    assert "float64" in cuda_bsr.unsupported_reason(SimpleNamespace(device=cuda, dtype=torch.float64), None, lt)
    lt16 = _layout(64, 64, (16, 16), 0.5).tensors()
    assert "(16, 16) not supported" in cuda_bsr.unsupported_reason(
        SimpleNamespace(device=cuda, dtype=torch.float16), None, lt16)
    assert "CUDA tensors" in cuda_bsr.unsupported_reason(torch.zeros(1, 64), None, lt)
