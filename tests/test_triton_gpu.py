"""Triton backend on a real GPU at BERT-base sizes (run on the GPU machine: ``pytest -m gpu``).

Same checks as tests/test_triton.py (fp64 reference, relative error within 2x the
reference's own same-dtype error), at M=4096/16384 and 768/3072 shapes, with the configs the
backend picks on this GPU (tuned.json, else autotuning or, with SPARSEBERT_TRITON_AUTOTUNE=0, the
first default), and every shipped config once.
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
    import sparsebert.ops.triton as triton_backend
    reason = triton_backend.unavailable_reason(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield triton_backend
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
            dw2, db = tb.grad_weight_bias(x, dy, lt)
            assert torch.equal(dw, dw2) and db.shape == (N,)
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


def _configs():
    """DSD configs at blocks 64 and 128 (where fit() changes them most), SDD configs at 32 too
    (the transposed accumulator); the defaults at 16/32 are covered above."""
    from sparsebert.ops.triton import dsd, sdd
    return ([("dsd", i, b) for b in (64, 128) for i in range(len(dsd.CONFIGS))]
            + [("sdd", i, b) for b in (32, 64, 128) for i in range(len(sdd.CONFIGS))])


@pytest.mark.parametrize("kind,i,block", _configs(), ids=lambda v: str(v))
def test_every_config_gpu(tb, kind, i, block):
    """Every shipped config is correct on the GPU (odd M, an empty row block, 50 % and 90 %), so
    whatever benchmarks/tune_triton.py or the autotuner picks is correct."""
    from sparsebert.ops.triton import dsd, sdd
    K, N, dtype = 768, 3072, torch.bfloat16
    cfg = (dsd.CONFIGS if kind == "dsd" else sdd.CONFIGS)[i]
    elem = 2
    if kind == "dsd" and dsd.fit(cfg, elem, block, block) is None:
        pytest.skip(f"{cfg} does not fit block {block}")
    for M, sparsity in ((4093, 0.5), (2047, 0.9)):
        layout = layout_for(N, K, block, sparsity, seed=block)
        lt = layout.tensors("cuda")
        torch.manual_seed(M)
        x = torch.randn(M, K, device="cuda").to(dtype)
        values = (torch.randn(layout.nnz, block, block, device="cuda") / K ** 0.5).to(dtype)
        bias = torch.randn(N, device="cuda").to(dtype)
        dy = torch.randn(M, N, device="cuda").to(dtype)
        x64, v64, b64, dy64 = (t.double() for t in (x, values, bias, dy))
        tag = f"{kind} {cfg} b{block} M={M} s={sparsity}"
        if kind == "dsd":
            check(tb.forward(x, values, bias, lt, activation="gelu", config=cfg),
                  F.gelu(ref.forward(x, values, bias, lt).float()).to(dtype),
                  F.gelu(ref.forward(x64, v64, b64, lt)), dtype, f"forward {tag}")
            check(tb.grad_input(dy, values, lt, config=cfg), ref.grad_input(dy, values, lt),
                  ref.grad_input(dy64, v64, lt), dtype, f"grad_input {tag}")
        else:
            dw, db = tb.grad_weight_bias(x, dy, lt, config=cfg)
            check(dw, ref.grad_weight(x, dy, lt), ref.grad_weight(x64, dy64, lt), dtype, f"dw {tag}")
            check(db, dy.float().sum(0).to(dtype), dy64.sum(0), dtype, f"dbias {tag}")
