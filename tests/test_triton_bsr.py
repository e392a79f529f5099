"""Triton backend on the CPU (``TRITON_INTERPRET=1``, set by tests/conftest.py before any import),
checked against the fp64 reference; plus a compile-only check of every kernel for sm_90."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from sparsebert.layout import BlockLayout  # noqa: E402
from sparsebert.ops import reference as ref  # noqa: E402
from sparsebert.ops import triton_bsr as tb  # noqa: E402

pytestmark = pytest.mark.skipif(
    tb.unavailable_reason(torch.device("cpu")) is not None,
    reason=f"triton backend unavailable on CPU: {tb.unavailable_reason(torch.device('cpu'))}",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Floor for the relative error, on top of "within 2x the reference's own same-dtype error".
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}
LIMIT = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def make_layout(N, K, bn, bk, kind, seed):
    g = torch.Generator().manual_seed(seed)
    R, C = N // bn, K // bk
    if kind == "empty":
        mask = torch.zeros(R, C, dtype=torch.bool)
    elif kind == "dense":
        mask = torch.ones(R, C, dtype=torch.bool)
    else:
        mask = torch.rand(R, C, generator=g) < 0.5
        if kind == "holes":           # a row block and a column block with nothing kept
            mask[R // 2] = False
            mask[:, 0] = False
            mask[0, C - 1] = True
    return BlockLayout.from_mask(mask, (bn, bk), (N, K))


def make_inputs(M, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    N, K = layout.shape
    bn, bk = layout.block
    x = torch.randn(M, K, generator=g).to(dtype)
    values = (torch.randn(layout.nnz, bn, bk, generator=g) / K ** 0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    dy = torch.randn(M, N, generator=g).to(dtype)
    return x, values, bias, dy


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(out, ref_lowp, ref64, dtype, what):
    assert out.dtype == dtype and out.shape == ref64.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    if ref64.numel() == 0 or ref64.abs().max() == 0:
        assert torch.equal(out.double(), ref64), f"{what}: expected exact zeros"
        return
    err, err_ref = rel_err(out, ref64), rel_err(ref_lowp, ref64)
    tol = min(LIMIT[dtype], max(2 * err_ref, FLOOR[dtype]))
    assert err <= tol, f"{what}: rel err {err:.2e} > {tol:.2e} (reference's own: {err_ref:.2e})"


def check_all(M, N, K, bn, bk, dtype, kind, seed=0, variant=None, sdd_variant=None):
    layout = make_layout(N, K, bn, bk, kind, seed)
    lt = layout.tensors("cpu")
    x, values, bias, dy = make_inputs(M, layout, dtype, seed + 1)
    x64, v64, b64, dy64 = (t.double() for t in (x, values, bias, dy))
    tag = f"M={M} N={N} K={K} block=({bn},{bk}) {dtype} {kind}"

    tag += f" variant={variant}/{sdd_variant}"
    y = tb.forward(x, values, bias, lt, variant=variant)
    assert_close(y, ref.forward(x, values, bias, lt), ref.forward(x64, v64, b64, lt), dtype, f"forward {tag}")
    y0 = tb.forward(x, values, None, lt, variant=variant)
    assert_close(y0, ref.forward(x, values, None, lt), ref.forward(x64, v64, None, lt), dtype,
                 f"forward/no bias {tag}")
    yg = tb.forward(x, values, bias, lt, activation="gelu", variant=variant)
    ref_g = F.gelu(ref.forward(x, values, bias, lt).float()).to(dtype)
    assert_close(yg, ref_g, F.gelu(ref.forward(x64, v64, b64, lt)), dtype, f"forward+gelu {tag}")
    dx = tb.grad_input(dy, values, lt, variant=variant)
    assert_close(dx, ref.grad_input(dy, values, lt), ref.grad_input(dy64, v64, lt), dtype, f"grad_input {tag}")
    dw_ref = ref.grad_weight(x, dy, lt)
    dw_ref64 = ref.grad_weight(x64, dy64, lt)
    assert_close(tb.grad_weight(x, dy, lt, variant=sdd_variant), dw_ref, dw_ref64, dtype, f"grad_weight {tag}")
    if M > 64:  # the split-M path (fp32 atomics or two-pass buffer)
        assert_close(tb.grad_weight(x, dy, lt, split=3, variant=sdd_variant), dw_ref, dw_ref64, dtype,
                     f"grad_weight/split {tag}")

    # Output blocks with nothing kept must hold exactly the bias (catches unwritten tiles).
    empty_rows = (lt.row_ptr[1:] == lt.row_ptr[:-1]).nonzero().flatten().tolist()
    for r in empty_rows:
        cols = slice(r * bn, (r + 1) * bn)
        assert torch.equal(y[:, cols], bias[cols].expand(M, -1)), f"row block {r} not bias, {tag}"
        assert torch.equal(y0[:, cols], torch.zeros_like(y0[:, cols])), f"row block {r} not zero, {tag}"
    empty_cols = (lt.col_ptr[1:] == lt.col_ptr[:-1]).nonzero().flatten().tolist()
    for c in empty_cols:
        assert torch.equal(dx[:, c * bk:(c + 1) * bk], torch.zeros_like(dx[:, c * bk:(c + 1) * bk]))


# (M, N, K, bn, bk, kind): every block size, odd M, non-square blocks, all layout kinds.
CASES = [
    (37, 64, 96, 16, 16, "holes"),
    (130, 128, 96, 32, 32, "random"),
    (1, 192, 128, 64, 64, "holes"),
    (130, 256, 128, 128, 128, "random"),
    (37, 128, 192, 32, 64, "holes"),
    (5, 128, 64, 64, 16, "dense"),
    (130, 64, 128, 32, 32, "empty"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-{c[1]}x{c[2]}-b{c[3]}x{c[4]}-{c[5]}")
def test_kernels_match_reference(case, dtype):
    M, N, K, bn, bk, kind = case
    check_all(M, N, K, bn, bk, dtype, kind, seed=hash(case) % 1000)


# Every kernel family, against the reference (the default choice is covered above).
VARIANT_CASES = [
    # (DSD spec, SDD spec, case)
    ("legacy", "legacy", (130, 128, 96, 32, 32, "holes")),
    ("g4r1m128w4s3", "g4m128w4s3p2", (130, 128, 192, 32, 32, "holes")),
    ("g2r2m128w4s3", "g2m128w4s3a2", (37, 192, 128, 64, 64, "random")),
    ("g4r2m64w4s3", "g2m64w4s3p1", (130, 96, 128, 32, 64, "holes")),     # R=2 with odd block count
    ("g2r4m128w8s3", "g4m128w4s3a1", (5, 128, 64, 16, 16, "dense")),
    ("g2r2m128w4s3", "g2m128w4s3p2", (37, 128, 128, 32, 32, "empty")),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("vc", VARIANT_CASES, ids=lambda v: f"{v[0]}-{v[1]}-b{v[2][3]}x{v[2][4]}-{v[2][5]}")
def test_variants_match_reference(vc, dtype):
    spec, sdd_spec, (M, N, K, bn, bk, kind) = vc
    check_all(M, N, K, bn, bk, dtype, kind, seed=7, variant=spec, sdd_variant=sdd_spec)


def test_variant_choice_and_env(monkeypatch):
    lt = make_layout(128, 128, 32, 32, "random", 0).tensors("cpu")
    for op in ("forward", "grad_input"):
        assert tb._parse_dsd(tb.choose_variant(op, lt)) is not None or tb.choose_variant(op, lt) == "legacy"
    assert tb.choose_variant("grad_weight", lt) in ("legacy",) or tb._parse_sdd(tb.choose_variant("grad_weight", lt))
    monkeypatch.setenv("SPARSEBERT_TRITON_VARIANT", "g1r1m64w4s2")
    monkeypatch.setenv("SPARSEBERT_TRITON_SDD_VARIANT", "legacy")
    assert tb.choose_variant("forward", lt) == "g1r1m64w4s2"
    assert tb.choose_variant("grad_weight", lt) == "legacy"
    monkeypatch.delenv("SPARSEBERT_TRITON_VARIANT")
    key = ("forward", 128, 128, 32, int(round(100 * (1 - lt.nnz / 16))))
    monkeypatch.setitem(tb._VARIANT_OVERRIDES, key, "g2r1m64w4s2")
    assert tb.choose_variant("forward", lt) == "g2r1m64w4s2"
    with pytest.raises(ValueError, match="variant"):
        tb._parse_dsd("g3r1m64w4s2")
    with pytest.raises(ValueError, match="variant"):
        tb._parse_sdd("g2m64w4s2x2")
    # every spec in the table parses
    for (op, _), rows in tb._VARIANT_TABLE.items():
        for _, spec in rows:
            (tb._parse_sdd if op == "grad_weight" else tb._parse_dsd)(spec)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_empty_layout_is_exact(dtype):
    layout = make_layout(128, 64, 32, 32, "empty", 0)
    lt = layout.tensors("cpu")
    x, values, bias, dy = make_inputs(37, layout, dtype, 0)
    assert torch.equal(tb.forward(x, values, bias, lt), bias.expand(37, -1))
    assert torch.equal(tb.forward(x, values, None, lt), torch.zeros(37, 128, dtype=dtype))
    # erf differs from PyTorch's in the last bits: close, not equal.
    torch.testing.assert_close(tb.forward(x, values, bias, lt, activation="gelu"),
                               F.gelu(bias.float()).to(dtype).expand(37, -1))
    assert torch.equal(tb.grad_input(dy, values, lt), torch.zeros(37, 64, dtype=dtype))
    dw = tb.grad_weight(x, dy, lt)
    assert dw.shape == (0, 32, 32) and dw.dtype == dtype


def test_zero_tokens():
    layout = make_layout(64, 64, 32, 32, "random", 3)
    lt = layout.tensors("cpu")
    x, values, bias, dy = make_inputs(0, layout, torch.float32, 0)
    assert tb.forward(x, values, bias, lt).shape == (0, 64)
    assert tb.grad_input(dy, values, lt).shape == (0, 64)
    dw = tb.grad_weight(x, dy, lt)
    assert dw.shape == (layout.nnz, 32, 32) and not dw.any()


def test_bad_inputs_raise_value_error():
    layout = make_layout(64, 64, 32, 32, "random", 1)
    lt = layout.tensors("cpu")
    x, values, bias, dy = make_inputs(8, layout, torch.float32, 0)
    with pytest.raises(ValueError, match="dtype"):
        tb.forward(x.double(), values.double(), None, lt)
    with pytest.raises(ValueError, match="dtype"):
        tb.forward(x, values.half(), None, lt)
    with pytest.raises(ValueError, match="x must be"):
        tb.forward(x[:, :32].contiguous(), values, None, lt)
    with pytest.raises(ValueError, match="values has shape"):
        tb.forward(x, values[:-1], None, lt) if layout.nnz else tb.forward(x, values[None], None, lt)
    with pytest.raises(ValueError, match="bias must be"):
        tb.forward(x, values, bias[:-1].contiguous(), lt)
    with pytest.raises(ValueError, match="contiguous"):
        tb.forward(x.t().contiguous().t(), values, None, lt)
    with pytest.raises(ValueError, match="activation"):
        tb.forward(x, values, None, lt, activation="relu")
    with pytest.raises(ValueError, match="dy must be"):
        tb.grad_input(x[:, :32].contiguous(), values, lt)
    with pytest.raises(ValueError, match="grad_weight"):
        tb.grad_weight(x[:4], dy, lt)
    with pytest.raises(ValueError, match="int32"):
        tb.forward(x, values, None, lt._replace(col_idx=lt.col_idx.long()))
    odd = BlockLayout.from_mask(torch.ones(8, 8, dtype=torch.bool), (8, 8)).tensors("cpu")
    with pytest.raises(ValueError, match="block"):
        tb.forward(x, torch.zeros(64, 8, 8), None, odd)


def test_unsupported_reason():
    lt = make_layout(64, 64, 32, 32, "dense", 0).tensors("cpu")
    x = torch.zeros(4, 64)
    v = torch.zeros(4, 32, 32)
    assert tb.unsupported_reason(x, v, lt) is None
    assert "dtype" in tb.unsupported_reason(x.double(), v.double(), lt)
    lt48 = BlockLayout.dense((96, 96), (48, 48)).tensors("cpu")
    assert "block" in tb.unsupported_reason(torch.zeros(4, 96), torch.zeros(4, 48, 48), lt48)
    assert tb.unavailable_reason(torch.device("cpu")) is None
    assert tb.NAME == "triton"


def test_through_bsr_linear_autograd():
    """The op layer (sparsebert.ops.bsr_linear) with backend="triton", forward and backward."""
    ops = pytest.importorskip("sparsebert.ops")
    if not hasattr(ops, "bsr_linear"):
        pytest.skip("sparsebert.ops.bsr_linear not available yet")
    layout = make_layout(128, 96, 32, 32, "holes", 7)
    x, values, bias, dy = make_inputs(37, layout, torch.float32, 7)
    xs = [x.clone().requires_grad_(), values.clone().requires_grad_(), bias.clone().requires_grad_()]
    xr = [t.detach().double().requires_grad_() for t in xs]
    y = ops.bsr_linear(xs[0], xs[1], layout, xs[2], backend="triton")
    yr = ops.bsr_linear(xr[0], xr[1], layout, xr[2], backend="reference")
    y.backward(dy)
    yr.backward(dy.double())
    assert rel_err(y, yr) < 1e-5
    for a, b, name in zip(xs, xr, ("dx", "dvalues", "dbias")):
        assert rel_err(a.grad, b.grad) < 1e-5, name


_COMPILE_SCRIPT = r"""
import json, torch
from sparsebert.ops import triton_bsr as tb
out = {}
for dtype, blocks in ((torch.float16, (64,)), (torch.bfloat16, (32, 64, 128)), (torch.float32, (32,))):
    for b in blocks:
        ks = tb.compile_for_sm90(dtype, b, b, block_m=128 if b < 128 else 64)
        for name, k in ks.items():
            ttgir = k.asm["ttgir"]
            out[f"{dtype}/{b}/{name}"] = {
                # wgmma needs a 64-row accumulator: grad_weight's [bn, bk] tile with bn < 64 uses mma.sync
                "wgmma": "warp_group_dot" in ttgir or (name.startswith("grad_weight") and b < 64),
                "pipelined": "async_copy_global_to_local" in ttgir,
                "shared": k.metadata.shared,
            }
# Every spec of the variant table and of benchmarks/triton_variants.py, bf16 blocks 32/64
import sys, os
sys.path.insert(0, "benchmarks")
import triton_variants as tv
specs = set()
for (op, blk), rows in tb._VARIANT_TABLE.items():
    if blk in (32, 64):
        specs |= {(op, s, blk) for _, s in rows}
for op, fam in (("forward", tv.DSD_FAMILIES), ("grad_input", tv.DSD_FAMILIES), ("grad_weight", tv.SDD_FAMILIES)):
    for blk in (32, 64):
        specs |= {(op, s, blk) for s in fam(blk)}
var = {}
for op, s, blk in sorted(specs):
    if s == "legacy":
        continue
    rep = tb.kernel_report(tb.compile_variant_for_sm90(op, s, torch.bfloat16, blk, blk))
    var[f"bf16/{blk}/{op}/{s}"] = rep
for op, s in (("forward", "g2r2m128w4s3"), ("grad_weight", "g2m128w4s3p2")):
    for dt in (torch.float16, torch.float32):
        var[f"{dt}/64/{op}/{s}"] = tb.kernel_report(tb.compile_variant_for_sm90(op, s, dt, 64, 64))
print("RESULT" + json.dumps(out))
print("VARIANTS" + json.dumps(var))
"""


def test_kernels_compile_for_sm90():
    """Triton's real compiler (interpreter off, in a subprocess) accepts every kernel for sm_90,
    uses wgmma and pipelines the loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    result = json.loads(line[len("RESULT"):])
    assert len(result) == 5 * 4
    for key, info in result.items():
        assert info["wgmma"], f"{key}: no wgmma"
        assert info["pipelined"], f"{key}: loads not pipelined"
        assert info["shared"] <= 227 * 1024, f"{key}: {info['shared']} bytes of shared memory"
    var = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("VARIANTS")][-1][len("VARIANTS"):])
    assert len(var) >= 10
    for key, info in var.items():
        assert info["wgmma"], f"{key}: no wgmma"
        assert info["pipelined"], f"{key}: loads not pipelined"
        if "float32" not in key:
            assert info["cp_async_max_bytes"] == 16, f"{key}: operand loads not 16-byte vectorised"
        assert info["shared"] <= 227 * 1024, f"{key}: {info['shared']} bytes of shared memory"


def test_autotune_configs_fit_shared_memory():
    """The config pruning keeps only configs whose operand buffers fit (checked without a GPU)."""
    class Arg:
        def __init__(self, elem):
            self._e = elem

        def element_size(self):
            return self._e

    for elem in (2, 4):
        for bo in (16, 32, 64, 128):
            for br in (16, 32, 64, 128):
                kept = tb._prune_dsd(tb._dsd_configs(), {"a_ptr": Arg(elem)}, BO=bo, BR=br)
                assert kept
                for c in kept:
                    smem = max(2, c.num_stages - 1) * (c.kwargs["BLOCK_M"] * br + br * bo) * elem
                    assert smem <= 227 * 1024
                kept = tb._prune_sdd(tb._sdd_configs(), {"x_ptr": Arg(elem)}, BN=bo, BK=br)
                assert kept
    # bf16 64x64 blocks: every config is a candidate
    assert len(tb._prune_dsd(tb._dsd_configs(), {"a_ptr": Arg(2)}, BO=64, BR=64)) == len(tb._dsd_configs())
