"""Triton backend on the CPU (``TRITON_INTERPRET=1``, set by tests/conftest.py before any import),
checked against the fp64 reference on fresh random inputs; every kernel configuration the backend
ships runs at least once here (tensor-descriptor and pointer loads, swap-AB, persistent programs,
split-K, grouped weight gradient)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from sparsebert import BlockSparseLinear  # noqa: E402
from sparsebert.layout import BlockLayout  # noqa: E402
from sparsebert.ops import backends  # noqa: E402
from sparsebert.ops import reference as ref  # noqa: E402
import sparsebert.ops.triton as tb  # noqa: E402
from sparsebert.ops.triton import common, dsd, sdd  # noqa: E402

pytestmark = pytest.mark.skipif(
    tb.unavailable_reason(torch.device("cpu")) is not None,
    reason=f"triton backend unavailable on CPU: {tb.unavailable_reason(torch.device('cpu'))}",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = lambda d: str(d).split(".")[-1]  # noqa: E731
# One tolerance rule: within 2x PyTorch's own same-dtype error against fp64, with a floor.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}
LIMIT = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def make_layout(N, K, bn, bk, kind, gen):
    R, C = N // bn, K // bk
    if kind == "empty":
        mask = torch.zeros(R, C, dtype=torch.bool)
    elif kind == "dense":
        mask = torch.ones(R, C, dtype=torch.bool)
    else:
        mask = torch.rand(R, C, generator=gen) < 0.5
        if kind == "holes":           # a row block and a column block with nothing kept
            mask[R // 2] = False
            mask[:, 0] = False
            mask[0, C - 1] = True
    return BlockLayout.from_mask(mask, (bn, bk), (N, K))


def make_inputs(M, layout, dtype, gen):
    N, K = layout.shape
    bn, bk = layout.block
    x = torch.randn(M, K, generator=gen).to(dtype)
    values = (torch.randn(layout.nnz, bn, bk, generator=gen) / K ** 0.5).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    dy = torch.randn(M, N, generator=gen).to(dtype)
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


def check_all(M, N, K, bn, bk, kind, dtype, *, dsd_cfg=None, sdd_cfg=None, n_progs=None,
              split=None, gelu=True):
    gen = torch.Generator().manual_seed(torch.randint(0, 2 ** 31, (1,)).item())
    layout = make_layout(N, K, bn, bk, kind, gen)
    lt = layout.tensors("cpu")
    x, values, bias, dy = make_inputs(M, layout, dtype, gen)
    x64, v64, b64, dy64 = (t.double() for t in (x, values, bias, dy))
    tag = f"M={M} N={N} K={K} block=({bn},{bk}) {dtype} {kind} dsd={dsd_cfg} sdd={sdd_cfg}"
    fk = dict(config=dsd_cfg, n_progs=n_progs)
    wk = dict(config=sdd_cfg, n_progs=n_progs, split=split)

    y = tb.forward(x, values, bias, lt, **fk)
    assert_close(y, ref.forward(x, values, bias, lt), ref.forward(x64, v64, b64, lt), dtype, f"forward {tag}")
    if gelu:
        yg = tb.forward(x, values, bias, lt, activation="gelu", **fk)
        ref_g = F.gelu(ref.forward(x, values, bias, lt).float()).to(dtype)
        assert_close(yg, ref_g, F.gelu(ref.forward(x64, v64, b64, lt)), dtype, f"forward+gelu {tag}")
    dx = tb.grad_input(dy, values, lt, **fk)
    assert_close(dx, ref.grad_input(dy, values, lt), ref.grad_input(dy64, v64, lt), dtype, f"grad_input {tag}")
    dw_ref, dw_ref64 = ref.grad_weight(x, dy, lt), ref.grad_weight(x64, dy64, lt)
    dw, db = tb.grad_weight_bias(x, dy, lt, **wk)
    assert_close(dw, dw_ref, dw_ref64, dtype, f"grad_weight_bias/dw {tag}")
    assert_close(db, dy.float().sum(0).to(dtype), dy64.sum(0), dtype, f"grad_weight_bias/db {tag}")
    assert torch.equal(tb.grad_weight(x, dy, lt, **wk), dw), f"grad_weight != grad_weight_bias {tag}"

    # Output blocks with nothing kept hold exactly the bias / zeros (catches unwritten tiles).
    for r in (lt.row_ptr[1:] == lt.row_ptr[:-1]).nonzero().flatten().tolist():
        cols = slice(r * bn, (r + 1) * bn)
        assert torch.equal(y[:, cols], bias[cols].expand(M, -1)), f"row block {r} not bias, {tag}"
    for c in (lt.col_ptr[1:] == lt.col_ptr[:-1]).nonzero().flatten().tolist():
        assert not dx[:, c * bk:(c + 1) * bk].any(), f"column block {c} not zero, {tag}"


# (M, N, K, bn, bk, kind): every block size 16..128, odd M, non-square blocks, all layout kinds,
# under the interpreter's default config (TMA, grouped SDD).
CASES = [
    (37, 64, 96, 16, 16, "holes"),
    (130, 128, 96, 32, 32, "random"),
    (1, 192, 128, 64, 64, "holes"),
    (130, 256, 256, 128, 128, "random"),
    (37, 128, 192, 32, 64, "holes"),
    (5, 128, 64, 64, 16, "dense"),
    (130, 64, 128, 32, 32, "empty"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-{c[1]}x{c[2]}-b{c[3]}x{c[4]}-{c[5]}")
def test_kernels_match_reference(case, dtype):
    check_all(*case, dtype)


def _cfg_id(c):
    return "-".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in c.items())


# Every shipped configuration (the GPU's candidates), with few persistent programs and a forced
# split so that both loops run more than once.
# Dtypes alternate over the configs (the dtype paths are covered above; this is about configs).
@pytest.mark.parametrize("i", range(len(dsd.CONFIGS)), ids=lambda i: _cfg_id(dsd.CONFIGS[i]))
def test_every_dsd_config(i):
    dtype = (torch.bfloat16, torch.float16)[i % 2]
    check_all(300, 128, 192, 64, 64, "holes", dtype, dsd_cfg=dsd.CONFIGS[i], n_progs=3, gelu=False)


@pytest.mark.parametrize("i", range(len(sdd.CONFIGS)), ids=lambda i: _cfg_id(sdd.CONFIGS[i]))
def test_every_sdd_config(i):
    # 64-wide blocks for odd configs: with bn = 32, fit() widens G = 1 to 2 (wgmma), and the
    # G = 1 descriptor load of x would never run
    dtype, b = ((torch.bfloat16, 32), (torch.float32, 64))[i % 2]
    check_all(600, 3 * b, 4 * b, b, b, "holes", dtype, sdd_cfg=sdd.CONFIGS[i], n_progs=5, split=3, gelu=False)


def test_swap_needs_wide_output_blocks():
    swap = next(c for c in dsd.CONFIGS if c["SWAP"])
    assert dsd.fit(swap, 2, 32, 64) is None and dsd.fit(swap, 2, 64, 32) is not None
    lt = make_layout(64, 64, 32, 32, "dense", torch.Generator().manual_seed(0)).tensors("cpu")
    with pytest.raises(ValueError, match="does not fit"):
        tb.forward(torch.zeros(4, 64), torch.zeros(4, 32, 32), None, lt, config=swap)


def test_misaligned_input_takes_pointer_loads():
    """TMA needs 16-byte aligned bases; a contiguous view at an odd offset still works."""
    gen = torch.Generator().manual_seed(1)
    layout = make_layout(64, 64, 16, 16, "random", gen)
    lt = layout.tensors("cpu")
    buf = torch.randn(37 * 64 + 1, generator=gen)
    x = buf[1:].view(37, 64)
    assert not common.tma_ok(x) and x.is_contiguous()
    values = torch.randn(layout.nnz, 16, 16, generator=gen)
    assert_close(tb.forward(x, values, None, lt), ref.forward(x, values, None, lt),
                 ref.forward(x.double(), values.double(), None, lt), torch.float32, "misaligned")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_empty_layout_is_exact(dtype):
    layout = make_layout(128, 64, 32, 32, "empty", None)
    lt = layout.tensors("cpu")
    x, values, bias, dy = make_inputs(37, layout, dtype, torch.Generator().manual_seed(0))
    assert torch.equal(tb.forward(x, values, bias, lt), bias.expand(37, -1))
    assert torch.equal(tb.forward(x, values, None, lt), torch.zeros(37, 128, dtype=dtype))
    # erf differs from PyTorch's in the last bits: close, not equal.
    torch.testing.assert_close(tb.forward(x, values, bias, lt, activation="gelu"),
                               F.gelu(bias.float()).to(dtype).expand(37, -1))
    assert torch.equal(tb.grad_input(dy, values, lt), torch.zeros(37, 64, dtype=dtype))
    dw = tb.grad_weight(x, dy, lt)
    assert dw.shape == (0, 32, 32) and dw.dtype == dtype
    dw, db = tb.grad_weight_bias(x, dy, lt)
    assert dw.shape == (0, 32, 32)
    torch.testing.assert_close(db, dy.float().sum(0).to(dtype))


def test_zero_tokens():
    layout = make_layout(64, 64, 32, 32, "random", torch.Generator().manual_seed(3))
    lt = layout.tensors("cpu")
    x, values, bias, dy = make_inputs(0, layout, torch.float32, torch.Generator().manual_seed(0))
    assert tb.forward(x, values, bias, lt).shape == (0, 64)
    assert tb.grad_input(dy, values, lt).shape == (0, 64)
    dw = tb.grad_weight(x, dy, lt)
    assert dw.shape == (layout.nnz, 32, 32) and not dw.any()
    dw, db = tb.grad_weight_bias(x, dy, lt)
    assert db.shape == (64,) and not db.any() and not dw.any()


def test_bad_inputs_raise_value_error():
    layout = make_layout(64, 64, 32, 32, "random", torch.Generator().manual_seed(1))
    lt = layout.tensors("cpu")
    x, values, bias, dy = make_inputs(8, layout, torch.float32, torch.Generator().manual_seed(0))
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
    with pytest.raises(ValueError, match="split"):
        tb.grad_weight_bias(x, dy, lt, split=0)
    with pytest.raises(ValueError, match="int32"):
        tb.forward(x, values, None, lt._replace(col_idx=lt.col_idx.long()))
    odd = BlockLayout.from_mask(torch.ones(8, 8, dtype=torch.bool), (8, 8)).tensors("cpu")
    with pytest.raises(ValueError, match="block"):
        tb.forward(x, torch.zeros(64, 8, 8), None, odd)


def test_unsupported_reason():
    lt = make_layout(64, 64, 32, 32, "dense", None).tensors("cpu")
    x, v = torch.zeros(4, 64), torch.zeros(4, 32, 32)
    assert tb.unsupported_reason(x, v, lt) is None
    assert "dtype" in tb.unsupported_reason(x.double(), v.double(), lt)
    lt48 = BlockLayout.dense((96, 96), (48, 48)).tensors("cpu")
    assert "block" in tb.unsupported_reason(torch.zeros(4, 96), torch.zeros(4, 48, 48), lt48)
    assert tb.NAME == "triton" and backends.get("triton") is tb


def test_configs_fit_shared_memory():
    """Every candidate that fits() keeps its own estimate within the H200's 227 KB, and every
    block/dtype has at least one candidate (tests/test_triton_compile.py checks the estimate
    against the compiled kernels)."""
    for elem, exact in ((2, False), (4, False), (4, True)):
        for bo in (16, 32, 64, 128):
            for br in (16, 32, 64, 128):
                cands = dsd.candidates(elem, bo, br, exact)
                assert cands and all(dsd.smem_bytes(c, elem, bo, br) <= common.SMEM_BUDGET for c in cands)
                assert not exact or not any(c["TMA"] or c["SWAP"] for c in cands)
                cands = sdd.candidates(elem, bo, br)
                assert cands and all(sdd.smem_bytes(c, elem, bo, br) <= common.SMEM_BUDGET for c in cands)


def test_tuned_table_lookup(tmp_path, monkeypatch):
    import json
    lt = make_layout(128, 64, 32, 32, "dense", None).tensors("cpu")
    key = common.tune_key("GPU X", torch.bfloat16, "forward", 16384, lt)
    assert key == "GPU X|bf16|forward|16384|128x64|32x32|1.00"
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"entries": {key: {"config": dsd.CONFIGS[1], "us": 1.0}}}))
    monkeypatch.setattr(common, "TUNED_PATH", str(path))
    try:
        assert common.tuned_config("GPU X", torch.bfloat16, "forward", 16384, lt) == dsd.CONFIGS[1]
        # another token count: the nearest tuned bucket of the same shape
        assert common.tuned_config("GPU X", torch.bfloat16, "forward", 1000, lt) == dsd.CONFIGS[1]
        assert common.tuned_config("GPU Y", torch.bfloat16, "forward", 16384, lt) is None
        assert common.tuned_config("GPU X", torch.float16, "forward", 16384, lt) is None
    finally:
        common._load_table.cache_clear()


def test_shipped_tuned_file_parses():
    """The data file written by benchmarks/tune_triton.py: every entry's config is a candidate."""
    table = common.tuned_table()
    for key, entry in table.items():
        gpu, dt, op, mb, shape, block, dens = key.split("|")
        assert op in ("forward", "grad_input", "grad_weight"), key
        keys = set((dsd.CONFIGS if op != "grad_weight" else sdd.CONFIGS)[0])
        assert set(entry["config"]) == keys, key


def test_through_block_sparse_linear():
    """BlockSparseLinear(backend="triton"), forward and backward, against the fp64 reference."""
    gen = torch.Generator().manual_seed(7)
    layout = make_layout(128, 96, 32, 32, "holes", gen)
    layer = BlockSparseLinear(layout, backend="triton")
    with torch.no_grad():
        layer.bias.normal_(generator=gen)
    ref_layer = BlockSparseLinear(layout, backend="reference", dtype=torch.float64)
    ref_layer.load_state_dict({k: v.double() if v.is_floating_point() else v
                               for k, v in layer.state_dict().items()})
    x = torch.randn(37, 96, generator=gen)
    dy = torch.randn(37, 128, generator=gen)
    xs, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    y, yr = layer(xs), ref_layer(xr)
    y.backward(dy)
    yr.backward(dy.double())
    assert rel_err(y, yr) < 1e-5
    for a, b, name in ((xs.grad, xr.grad, "dx"), (layer.values.grad, ref_layer.values.grad, "dvalues"),
                       (layer.bias.grad, ref_layer.bias.grad, "dbias")):
        assert rel_err(a, b) < 1e-5, name
    # no tokens: empty output, zero parameter gradients
    layer.zero_grad()
    x0 = torch.zeros(0, 96, requires_grad=True)
    y0 = layer(x0)
    assert y0.shape == (0, 128)
    y0.sum().backward()
    assert x0.grad.shape == (0, 96) and not layer.values.grad.any() and not layer.bias.grad.any()


def test_auto_warns_when_a_backend_raises(monkeypatch):
    """auto never falls back silently: a backend that raises while being timed is named."""
    from sparsebert.ops import backends as B
    monkeypatch.setattr(B, "_candidates", lambda device: ("triton", "dense"))
    monkeypatch.setattr(B, "_warned", set())
    B.clear_auto_cache()

    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(tb, "forward", boom)
    lay = make_layout(64, 64, 16, 16, "random", torch.Generator().manual_seed(2))
    x, v = torch.randn(8, 64), torch.randn(lay.nnz, 16, 16)
    try:
        with pytest.warns(RuntimeWarning, match="'triton' raised while being timed.*kernel exploded"):
            assert B.choose(x, v, lay) == "dense"
        monkeypatch.setattr(B, "_candidates", lambda device: ("cuda", "dense"))
        B.clear_auto_cache()
        with pytest.warns(RuntimeWarning, match="no sparse backend can run.*cuda"):
            assert B.choose(x, v, lay) == "dense"
    finally:
        B.clear_auto_cache()


def test_tune_script_dry_run(tmp_path, monkeypatch, capsys):
    """benchmarks/tune_triton.py end to end on the CPU: every candidate checked and timed, the
    winners written under the keys the backend looks up, other entries kept."""
    import json
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(root, "benchmarks"))
    import tune_triton
    out = tmp_path / "tuned.json"
    out.write_text(json.dumps({"format": 1, "entries": {"other|key": {"config": {}}}}))
    assert tune_triton.main(["--dry-run", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "other|key" in data["entries"]
    lay = tune_triton._random_layout(128, 64, 32, 0.5, 0)
    monkeypatch.setattr(common, "TUNED_PATH", str(out))
    try:
        exact = dsd.candidates(4, 32, 32, exact_fp32=True)   # fp32 on the CPU: exact dots
        for op, cands in (("forward", exact), ("grad_input", exact),
                          ("grad_weight", sdd.candidates(4, 32, 32))):
            key = common.tune_key("cpu", torch.float32, op, 100, lay.tensors("cpu"))
            entry = data["entries"][key]
            assert entry["config"] in cands and entry["us"] > 0
            assert len(entry["all_us"]) == len(cands)
            assert common.tuned_config("cpu", torch.float32, op, 100, lay.tensors("cpu")) == entry["config"]
    finally:
        common._load_table.cache_clear()
    assert "wrote" in capsys.readouterr().out
    sys.modules.pop("tune_triton", None)


def test_config_choice_on_a_gpu(monkeypatch, tmp_path):
    """On a GPU: a tuned entry is used untimed; an untuned key warns once, autotunes over the
    candidates once and is cached; SPARSEBERT_TRITON_AUTOTUNE=0 takes the first, still warning.
    (A fake CUDA device: only the choice logic runs.)"""
    import json
    import types
    lt = make_layout(128, 64, 32, 32, "dense", None).tensors("cpu")
    dev = types.SimpleNamespace(type="cuda")
    monkeypatch.setattr(common, "device_name", lambda d: "Fake GPU")
    monkeypatch.setattr(common, "_autotuned", {})
    monkeypatch.setattr(common, "_warned", set())
    timings = {0: 3.0, 1: 1.0, 2: 2.0}
    calls = []

    def fake_bench(fn, **kw):
        fn()
        return timings[calls[-1]]
    monkeypatch.setattr(common.triton.testing, "do_bench", fake_bench)
    cands = [dict(c, idx=i) for i, c in enumerate(dsd.CONFIGS[:3])]
    run = lambda c: calls.append(c["idx"])  # noqa: E731
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"entries": {}}))
    monkeypatch.setattr(common, "TUNED_PATH", str(path))
    try:
        with pytest.warns(RuntimeWarning, match="no tuned config for Fake GPU.*autotuning 3"):
            assert common.choose_config("forward", torch.bfloat16, 16384, lt, dev, cands, run)["idx"] == 1
        assert calls == [0, 1, 2]
        assert common.choose_config("forward", torch.bfloat16, 16000, lt, dev, cands, run)["idx"] == 1
        assert calls == [0, 1, 2]                 # same key: cached, not timed, not warned again
        monkeypatch.setattr(common, "AUTOTUNE", False)
        with pytest.warns(RuntimeWarning, match="using the default"):
            assert common.choose_config("grad_input", torch.bfloat16, 64, lt, dev, cands, run)["idx"] == 0
        assert calls == [0, 1, 2]
        key = common.tune_key("Fake GPU", torch.bfloat16, "grad_weight", 64, lt)
        path.write_text(json.dumps({"entries": {key: {"config": cands[2]}}}))
        common._load_table.cache_clear()
        assert common.choose_config("grad_weight", torch.bfloat16, 64, lt, dev, cands, run)["idx"] == 2
        assert calls == [0, 1, 2]
    finally:
        common._load_table.cache_clear()
