"""The CUDA C++ backend (``sparsebert.ops.cuda_bsr``, kernels in ``csrc/cuda``) against float64,
under the shared rule of tests/backend_harness.py (error within 2x of PyTorch's own same-dtype error).

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

import backend_harness as H
from sparsebert.layout import BlockLayout
from sparsebert.ops import cuda_bsr, reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture
def cuda_backend():
    """Skips unless the CUDA backend can run here (queried at test time, not at import)."""
    reason = cuda_bsr.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")
    return cuda_bsr


def _layout(N, K, block, density, seed=0, mask=None):
    bn, bk = block
    if mask is None:
        g = torch.Generator().manual_seed(seed)
        mask = torch.rand(N // bn, K // bk, generator=g) < density
    return BlockLayout.from_mask(mask, (bn, bk), (N, K))


def _rand(*shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=torch.float32, generator=g).to(dtype)


def _poison(*shapes_dtypes):
    """Fill the caching allocator's free blocks of these sizes with NaN, so an output tile the
    kernel forgets to write shows up as NaN (outputs are allocated with torch.empty)."""
    for shape, dtype in shapes_dtypes:
        t = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
        del t


def _check_all(layout, M, dtype, seed=0):
    """The shared rule (tests/backend_harness.py) for forward (with and without bias), grad_input
    and grad_weight on fresh inputs, with the allocator's free blocks NaN-poisoned before each op."""
    N, K = layout.shape
    bn, bk = layout.block
    p = H.make_problem(layout, M, dtype, "cuda", seed=H.session_seed() + seed)
    shapes = [((M, N), dtype), ((M, K), dtype), ((layout.nnz, bn, bk), dtype),
              ((layout.nnz, bn, bk), torch.float32)]
    H.check_backend("cuda", p, tag=f"M={M} {K}->{N} block {layout.block} {dtype}", before=lambda: _poison(*shapes))


# ---- smoke test in a child process: a crash (segfault, illegal address) fails here, with the
# child's output, instead of killing the whole pytest session ---------------------------------
_SMOKE = textwrap.dedent("""
    import faulthandler, sys, torch
    faulthandler.enable()
    from sparsebert.layout import BlockLayout
    from sparsebert.ops import cuda_bsr, reference
    g = torch.Generator().manual_seed(0)
    for block in [(64, 64), (32, 32), (64, 32), (32, 64)]:
        mask = torch.rand(256 // block[0], 192 // block[1], generator=g) < 0.5
        layout = BlockLayout.from_mask(mask, block, (256, 192))
        lt = layout.tensors("cuda")
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(300, 192, device="cuda").to(dtype)
            dy = torch.randn(300, 256, device="cuda").to(dtype)
            v = torch.randn(layout.nnz, *block, device="cuda").to(dtype)
            for op in ("forward", "grad_input", "grad_weight"):
                print("run", block, dtype, op, flush=True)
                if op == "forward":
                    out = cuda_bsr.forward(x, v, None, lt)
                    ref = reference.forward(x.double(), v.double(), None, lt)
                elif op == "grad_input":
                    out = cuda_bsr.grad_input(dy, v, lt)
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
def test_pipeline_depths(cuda_backend, dtype, block):
    """Output blocks with 0, 1, 2, ... kept blocks: fewer, as many and more steps than the
    pipeline's stages (3 or 4, bsr_dsd.cu's DsdShape) in both DSD directions, and M tails."""
    N, K = 448, 512
    bn, bk = block
    R, C = N // bn, K // bk
    mask = torch.zeros(R, C, dtype=torch.bool)
    for r in range(R):
        mask[r, :r % (C + 1)] = True          # row r keeps r % (C + 1) blocks: 0, 1, 2, ...
    mask = mask[:, torch.randperm(C, generator=torch.Generator().manual_seed(bn + bk))]
    layout = _layout(N, K, block, 0, mask=mask)
    for M in (1, 130, 2049):
        _check_all(layout, M, dtype, seed=M)


@pytest.mark.gpu
def test_cpu_index_rejected(cuda_backend):
    layout, x, values, index, N, K = _op_args()
    with pytest.raises(ValueError, match="layout index is on cpu"):
        cuda_bsr.forward(x, values, None, layout.tensors("cpu"))


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
    torch.cuda.synchronize()
    ref64 = reference.forward(x.double(), values.double(), None, lt)
    torch_own = torch.nn.functional.linear(x, layout.scatter(values))
    H.check_rule(y, torch_own, ref64, torch.float16, "forward on a side stream")


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
    with pytest.raises(RuntimeError):   # the variant argument is gone from the schema
        ops.forward(x, values, None, index, N, K, bn, bk, 1)


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
