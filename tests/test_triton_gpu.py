"""Triton backend on a real GPU at BERT-base sizes (run on the GPU machine: ``pytest -m gpu``).

Same checks as tests/test_triton_bsr.py (fp64 reference, relative error within 2x the
reference's own same-dtype error), at M=4096/16384 and 768/3072 shapes.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from sparsebert.layout import BlockLayout  # noqa: E402
from sparsebert.ops import reference as ref  # noqa: E402

pytestmark = pytest.mark.gpu

LIMIT = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


@pytest.fixture
def tb():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from sparsebert.ops import triton_bsr
    reason = triton_bsr.unavailable_reason(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield triton_bsr
    torch.backends.cuda.matmul.allow_tf32 = old


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(out, lowp, ref64, dtype, what):
    assert out.dtype == dtype and out.shape == ref64.shape and torch.isfinite(out).all(), what
    err, err_ref = rel_err(out, ref64), rel_err(lowp, ref64)
    tol = min(LIMIT[dtype], max(2 * err_ref, FLOOR[dtype]))
    assert err <= tol, f"{what}: rel err {err:.2e} > {tol:.2e} (reference's own {err_ref:.2e})"


def layout_for(N, K, block, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    R, C = N // block, K // block
    mask = torch.zeros(R * C, dtype=torch.bool)
    mask[torch.randperm(R * C, generator=g)[:int(round((1 - sparsity) * R * C))]] = True
    mask = mask.view(R, C)
    mask[R // 3] = False              # one output row block with nothing kept
    return BlockLayout.from_mask(mask, (block, block), (N, K))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("K,N", [(768, 768), (768, 3072), (3072, 768)])
@pytest.mark.parametrize("M,sparsity", [(4096, 0.5), (16384, 0.9), (4093, 0.0)])
def test_kernels_gpu(tb, M, sparsity, K, N, block, dtype):
    torch.manual_seed(M + K + N + block)
    layout = layout_for(N, K, block, sparsity, seed=block)
    lt = layout.tensors("cuda")
    x = torch.randn(M, K, device="cuda").to(dtype)
    values = (torch.randn(layout.nnz, block, block, device="cuda") / K ** 0.5).to(dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    dy = torch.randn(M, N, device="cuda").to(dtype)
    x64, v64, b64, dy64 = (t.double() for t in (x, values, bias, dy))
    tag = f"M={M} {K}->{N} b{block} {dtype} s={sparsity}"

    y = tb.forward(x, values, bias, lt)
    check(y, ref.forward(x, values, bias, lt), ref.forward(x64, v64, b64, lt), dtype, f"forward {tag}")
    yg = tb.forward(x, values, bias, lt, activation="gelu")
    check(yg, F.gelu(ref.forward(x, values, bias, lt).float()).to(dtype),
          F.gelu(ref.forward(x64, v64, b64, lt)), dtype, f"gelu {tag}")
    check(tb.grad_input(dy, values, lt), ref.grad_input(dy, values, lt),
          ref.grad_input(dy64, v64, lt), dtype, f"grad_input {tag}")
    check(tb.grad_weight(x, dy, lt), ref.grad_weight(x, dy, lt),
          ref.grad_weight(x64, dy64, lt), dtype, f"grad_weight {tag}")
    r = N // block // 3
    assert torch.equal(y[:, r * block:(r + 1) * block], bias[r * block:(r + 1) * block].expand(M, -1))


@pytest.mark.parametrize("block", [16, 128])
def test_other_blocks_and_edges_gpu(tb, block):
    """Blocks 16/128, M=0, M=1, empty layout, forced split-M weight gradient."""
    K = N = 512
    dtype = torch.bfloat16
    for sparsity in (0.5, 1.0):
        layout = layout_for(N, K, block, sparsity, seed=1)
        lt = layout.tensors("cuda")
        values = (torch.randn(layout.nnz, block, block, device="cuda") / K ** 0.5).to(dtype)
        bias = torch.randn(N, device="cuda").to(dtype)
        for M in (0, 1, 333):
            x = torch.randn(M, K, device="cuda").to(dtype)
            dy = torch.randn(M, N, device="cuda").to(dtype)
            y = tb.forward(x, values, bias, lt)
            dx = tb.grad_input(dy, values, lt)
            dw = tb.grad_weight(x, dy, lt)
            assert y.shape == (M, N) and dx.shape == (M, K) and dw.shape == (layout.nnz, block, block)
            if M:
                x64, v64, dy64 = x.double(), values.double(), dy.double()
                for out, r64 in ((y, ref.forward(x64, v64, bias.double(), lt)),
                                 (dx, ref.grad_input(dy64, v64, lt)),
                                 (dw, ref.grad_weight(x64, dy64, lt)),
                                 (tb.grad_weight(x, dy, lt, split=4), ref.grad_weight(x64, dy64, lt))):
                    if r64.numel() and r64.abs().max() > 0:
                        assert rel_err(out, r64) < 1e-2
                    else:
                        assert not out.any()


def test_tf32_flag_gpu(tb):
    """fp32 with allow_tf32 on runs (tf32 dot) and stays within tf32 accuracy."""
    torch.backends.cuda.matmul.allow_tf32 = True
    layout = layout_for(768, 768, 64, 0.5, seed=0)
    lt = layout.tensors("cuda")
    x = torch.randn(1024, 768, device="cuda")
    values = torch.randn(layout.nnz, 64, 64, device="cuda") / 768 ** 0.5
    y = tb.forward(x, values, None, lt)
    assert rel_err(y, ref.forward(x.double(), values.double(), None, lt)) < 5e-3


def _variant_params():
    """The specs the backend uses by default (legacy is covered above); every spec the tuning
    benchmark times with SPARSEBERT_TEST_ALL_VARIANTS=1 (slow: each compiles)."""
    import os
    import sys
    if os.environ.get("SPARSEBERT_TEST_ALL_VARIANTS") == "1":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
        import triton_variants as tv
        return [(op, block, spec) for block in (32, 64) for op in tv.OPS for spec in tv.families(op, block)]
    from sparsebert.ops import triton_bsr
    used = {(op, block, spec) for (op, block), rows in triton_bsr._VARIANT_TABLE.items()
            for _, spec in rows if block in (32, 64)}
    used |= {(op, block, spec) for (op, _K, _N, block, _s), spec in triton_bsr._VARIANT_OVERRIDES.items()}
    return sorted(p for p in used if p[2] != "legacy")


@pytest.mark.parametrize("op,block,spec", _variant_params(), ids=lambda v: str(v))
def test_every_variant_gpu(tb, op, block, spec):
    """Every spec timed by benchmarks/triton_variants.py is correct on the GPU (odd M, an empty row
    block, 90 % and 50 % sparsity) — so the benchmark's winners can go straight into the table."""
    K, N, dtype = 768, 3072, torch.bfloat16
    for M, sparsity in ((4093, 0.5), (2047, 0.9)):
        layout = layout_for(N, K, block, sparsity, seed=block)
        lt = layout.tensors("cuda")
        torch.manual_seed(M)
        x = torch.randn(M, K, device="cuda").to(dtype)
        values = (torch.randn(layout.nnz, block, block, device="cuda") / K ** 0.5).to(dtype)
        bias = torch.randn(N, device="cuda").to(dtype)
        dy = torch.randn(M, N, device="cuda").to(dtype)
        x64, v64, b64, dy64 = (t.double() for t in (x, values, bias, dy))
        tag = f"{op} {spec} b{block} M={M} s={sparsity}"
        if op == "forward":
            out, lowp, r64 = (tb.forward(x, values, bias, lt, variant=spec),
                              ref.forward(x, values, bias, lt), ref.forward(x64, v64, b64, lt))
        elif op == "grad_input":
            out, lowp, r64 = (tb.grad_input(dy, values, lt, variant=spec),
                              ref.grad_input(dy, values, lt), ref.grad_input(dy64, v64, lt))
        else:
            out, lowp, r64 = (tb.grad_weight(x, dy, lt, variant=spec),
                              ref.grad_weight(x, dy, lt), ref.grad_weight(x64, dy64, lt))
        check(out, lowp, r64, dtype, tag)
