"""Every backend against float64 under one rule (tests/backend_harness.py): error within 2x of
PyTorch's own same-dtype error, on fresh random inputs; forward (with and without bias, GELU
epilogue), grad_input, grad_weight (and the fused bias gradient); odd M, M = 0, empty rows and
columns, empty and dense layouts, blocks 16..128, every dtype the backend claims.

CPU: reference, dense, cpu, and triton under TRITON_INTERPRET=1 (a small subset: the interpreter
is slow); cuda is skipped here with its reason. GPU (``-m gpu``): triton, cuda, dense on CUDA.
"""
import pytest
import torch

import backend_harness as H

# (M, N, K, block, layout kind)
CASES = [
    (37, 128, 192, (32, 32), "holes"),
    (1, 256, 384, (16, 16), "random"),     # M = 1: few outputs, so N, K large enough for a stable error
    (0, 64, 64, (32, 32), "random"),
    (53, 128, 128, (64, 64), "empty"),
    (29, 96, 128, (32, 64), "single"),
    (19, 256, 256, (128, 128), "dense"),
    (67, 64, 256, (64, 16), "holes"),
]
TRITON_CASES = [CASES[0], CASES[1], (5, 256, 128, (128, 64), "holes")]
GPU_CASES = CASES + [
    (4099, 3072, 768, (64, 64), "random"),
    (16385, 768, 768, (32, 32), "holes"),
    (2047, 768, 3072, (64, 32), "random"),
]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _case_id(c):
    M, N, K, (bn, bk), kind = c
    return f"M{M}-{K}to{N}-b{bn}x{bk}-{kind}"


def _params(names, cases):
    out = []
    for name in names:
        claims = H.CLAIMS[name]
        for c in cases:
            bn, bk = c[3]
            if bn not in claims["blocks"] or bk not in claims["blocks"]:
                continue
            for dt in H.ALL_DTYPES:
                if dt in claims["dtypes"]:
                    out.append(pytest.param(name, c, dt, id=f"{name}-{_case_id(c)}-{DTYPE_IDS[dt]}"))
    return out


def _run(name, case, dtype, device):
    why = H.skip_reason(name, device)
    if why is not None:
        pytest.skip(f"{name} backend unavailable on {device}: {why}")
    M, N, K, block, kind = case
    seed = H.session_seed() + hash((name, case, str(dtype))) % 100_000
    layout = H.make_layout(N, K, block, kind, seed)
    p = H.make_problem(layout, M, dtype, device, seed)
    H.check_backend(name, p, tag=f"{_case_id(case)} {DTYPE_IDS[dtype]} on {device}")


@pytest.mark.parametrize("name,case,dtype", _params(["reference", "dense", "cpu"], CASES))
def test_cpu_backends(name, case, dtype):
    _run(name, case, dtype, "cpu")


@pytest.mark.parametrize("name,case,dtype", _params(["triton"], TRITON_CASES))
def test_triton_interpreted(name, case, dtype):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: triton is checked on it (-m gpu)")
    _run(name, case, dtype, "cpu")


def test_cuda_backend_skips_with_its_reason():
    """Where the cuda backend cannot run (no GPU, or a build without nvcc) it says why."""
    why = H.skip_reason("cuda", "cuda")
    if why is None:
        pytest.skip("the cuda backend can run here: its cases run under -m gpu")
    assert any(s in why for s in ("sparsebert._C", "without CUDA", "no CUDA device")), why


@pytest.mark.gpu
@pytest.mark.parametrize("name,case,dtype", _params(["triton", "cuda", "dense"], GPU_CASES))
def test_gpu_backends(name, case, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32 means fp32: PyTorch's and the kernels'
    try:
        _run(name, case, dtype, "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_rule_catches_a_wrong_kernel():
    """The rule fails a result that is off by more than rounding (and passes PyTorch's own)."""
    layout = H.make_layout(64, 64, (16, 16), "random", seed=1)
    p = H.make_problem(layout, 33, torch.bfloat16, seed=2)
    w64 = layout.scatter(p.values.double())
    ref64 = p.x.double() @ w64.t()
    good = torch.nn.functional.linear(p.x, layout.scatter(p.values))
    assert H.check_rule(good, good, ref64, torch.bfloat16, "torch itself") <= 1 / H.FACTOR + 1e-6
    # summing in bf16 instead of fp32: a real accumulation bug, a few times PyTorch's error
    bad = torch.zeros_like(good)
    for k in range(64):
        bad = bad + p.x[:, k:k + 1] * layout.scatter(p.values)[:, k]
    with pytest.raises(AssertionError, match="rel err"):
        H.check_rule(bad, good, ref64, torch.bfloat16, "bf16 accumulation")
    with pytest.raises(AssertionError, match="non-finite"):
        H.check_rule(torch.full_like(good, float("nan")), good, ref64, torch.bfloat16, "nan")
